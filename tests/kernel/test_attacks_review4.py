"""Review round 4: attacks on round three's fixes (refusals in the writer's backlog, gated
peers, prepaid NODE_DESTROY notifications, the fair share of user_handles per sending uid,
a multicast summed per receiving uid). Each test shows a harm on the code as reviewed and
passes once it is fixed; each docstring says how bad, the harm, a fix and the numbers."""

from __future__ import annotations

import os
import socket

import trio
from capbus._kernel import lib

import capbus
from capbus import _wire

TIMEOUT = 60


def adopt_raw(kernel: capbus.Kernel, uid: int) -> socket.socket:
    """A new peer of the embedded kernel charged to ``uid``; our end of it, raw."""
    theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), uid, uid, 0) == 0
    return theirs


async def test_released_handles_prepaid_notes_are_not_bounded_by_user_handles() -> None:
    """MEDIUM/HIGH. A holder's NODE_DESTROY is allocated with its handle and, once its node is
    destroyed, queued outside any backlog (prepaid). But the holder may then release the
    handle: its n_handles (user_handles) goes back down while the note stays queued, paid by
    nothing. The next handle allocates a new note, and so on. A uid's replies jump ahead of
    notes in its queue (replies first), so a holder that reads one frame per command it
    writes drains its replies (no backlog, never gated) and never lets a note out: one uid,
    alone, makes the kernel hold notes without bound (memory grows linearly, ~210 B a note)
    with user_handles = 256 and user_backlog = 256 KiB.
    Fix: charge a queued prepaid note to its holder's handle count until it is written (keep
    charged_to->n_handles up, or count queued prepaid notes against user_handles / the
    uid's backlog when the handle is freed before its note is written).
    Numbers: 20,000 cycles queue 20,000 notes: memory_bytes grows by ~2 MB while the
    limits bound it to ~(256 x 210 B + 256 KiB) ~ 310 KB."""
    batch = 100
    rounds = 200
    limits = capbus.Limits(user_handles=256, user_backlog=256 * 1024)
    with trio.fail_after(TIMEOUT):
        async with capbus.open_kernel(limits=limits) as kernel:
            raw = adopt_raw(kernel, os.getuid())
            holder = capbus.Peer.from_socket(os.dup(raw.fileno()))
            await holder.info()  # its key, for transfers
            async with await kernel.connect() as owner:
                before = kernel.statistics().memory_bytes
                raw.setblocking(False)
                cookie = 1 << 40
                for _ in range(rounds):
                    nodes = [await owner.create_node() for _ in range(batch)]
                    held = [await owner.transfer(node, holder) for node in nodes]
                    await owner.destroy(*nodes, release=True)
                    for handle in held:
                        cookie += 1
                        frame = _wire.FRAME.pack(_wire.FRAME.size + 8, _wire.CMD_HANDLE_RELEASE, 0, cookie)
                        await trio.lowlevel.wait_writable(raw)
                        raw.send(frame + handle.id.to_bytes(8, "little"))
                    for _ in range(batch):
                        await trio.lowlevel.wait_readable(raw)
                        raw.recv(65536)
                stats = kernel.statistics()
                grown = stats.memory_bytes - before
                bound = limits.user_handles * 210 + limits.user_backlog + 64 * 1024
                assert stats.handles <= 4, stats.handles
                assert grown <= bound, f"memory grew by {grown} B, bound {bound} B"


async def test_transfers_into_a_handed_over_connection_bring_no_more_than_a_fair_share() -> None:
    """HIGH. Round three bounded what a sending uid's *messages* make another uid hold (a fair
    share of its user_handles, cb_handles_may_bring), but HANDLE_TRANSFER installs with no
    sender (cb_handle_install(target, node, NULL)) and checks only user_handles. A uid knows
    the key of every connection it made, including one it handed to a process of another uid
    (which the kernel then charges to that uid, docs: a connection handed over). Transferring
    into it makes the victim uid hold the attacker's handles without the fair share: the
    round-three harm again (the victim can create no node and receive no handle).
    Fix: pass the transferring peer's uid as the sender (cb_handles_may_bring before the
    install, brought_by after it) when the target is charged to another uid, as for a send.
    Numbers: user_handles = 100; the attacker makes the victim uid hold all 100 handles
    (the fair share allows ~50) and the victim's own peer is refused its first node."""
    from .other_uid import NOBODY, needs_root, run_as, read_line

    needs_root()
    limit = 100
    with trio.fail_after(TIMEOUT):
        async with capbus.open_kernel(limits=capbus.Limits(user_handles=limit)) as kernel:
            # A connection the attacker makes (charged to whoever writes it) and hands over.
            theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), -1, -1, -1) == 0
            handed = capbus.Peer.from_socket(os.dup(theirs.fileno()))
            await handed.info()  # the attacker knows its key
            victim_raw = adopt_raw(kernel, NOBODY)
            victim = capbus.Peer.from_socket(victim_raw)
            # The victim process writes on it once: it is charged to the victim's uid now.
            child = await run_as(
                NOBODY,
                """
                fd = int(sys.argv[1])
                s = socket.socket(fileno=fd)
                s.send(struct.pack("<IHHQ", 16, int(sys.argv[2]), 0, 7))
                select.select([s], [], [], 30)
                s.recv(65536)
                print("moved", flush=True)
                """,
                str(theirs.fileno()),
                str(_wire.CMD_PEER_QUERY),
                pass_fds=(theirs.fileno(),),
            )
            assert await read_line(child) == "moved"
            await child.wait()
            async with await kernel.connect() as attacker:
                brought = 0
                for _ in range(limit):
                    try:
                        node = await attacker.create_node()
                        await attacker.transfer(node, handed)
                    except capbus.errors.QuotaExceeded:
                        break
                    brought += 1
                made = 0
                for _ in range(10):
                    try:
                        await victim.create_node()
                    except capbus.errors.QuotaExceeded:
                        break
                    made += 1
                assert brought <= limit // 2 + 2 and made == 10, (
                    f"another uid made the victim uid hold {brought} handles of {limit};"
                    f" the victim could create {made} nodes of 10"
                )
            await victim.aclose()
