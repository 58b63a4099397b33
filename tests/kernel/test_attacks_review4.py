"""Review round 4: attacks on round three's fixes (refusals in the writer's backlog, gated
peers, prepaid NODE_DESTROY notifications, the fair share of user_handles per sending uid,
a multicast summed per receiving uid). Each test shows a harm on the code as reviewed and
passes once it is fixed; each docstring says how bad, the harm, a fix and the numbers."""

from __future__ import annotations

import fcntl
import os
import socket
import termios

import trio
from capbus._kernel import lib

import capbus
from capbus import _wire

from .other_uid import NOBODY, needs_root, read_line, run_as

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
                        # (a fix that gates the holder may leave nothing to read: go on)
                        with trio.move_on_after(2):
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


async def test_refusals_of_another_uids_writes_are_bounded_by_its_user_backlog() -> None:
    """MEDIUM. Round three counts a refused move's reply in the writer's uid (cb_queue_refuse,
    backlog_of) instead of the maker's. But whether a connection is read is decided by its
    own backlog and its maker's uid (cb_peer_over_backlog: peer->user), never by the writer's:
    a writer whose uid is far past user_backlog goes on being read on every connection it
    writes to, until that connection alone has CAPBUS_REPLY_BACKLOG_MAX (1 MiB) queued.
    So two uids (one makes connections: up to peers_per_user = 16,384, in practice its fair
    share of the kernel's fds, thousands; the other writes frames it knows are refused and
    reads nothing) queue GiBs of refusals (1 MiB per connection), where user_backlog
    (16 MiB) was the bound before: the writer's uid backlog is counted, and then ignored.
    Fix: in cb_peer_over_backlog (and the gate), also stop reading a connection whose foreign
    backlog belongs to a uid past user_backlog (e.g. keep the last refused writer's uid on the
    peer and check its backlog_bytes), or refuse a frame, without a reply, once its writer's
    uid is past user_backlog.
    Numbers: user_backlog = 64 KiB, 8 connections, 4,000 refused frames each: the writer's
    uid has ~4 MB of refusals queued in the kernel (memory_bytes), 60x its user_backlog."""

    needs_root()
    n_connections = 8
    frames = 4000
    limits = capbus.Limits(user_backlog=64 * 1024, peers_per_user=n_connections + 1)
    with trio.fail_after(TIMEOUT):
        async with capbus.open_kernel(limits=limits) as kernel:
            # The writer's uid has all its peers: every move to it is refused (EDQUOT).
            writer_own = [adopt_raw(kernel, NOBODY) for _ in range(n_connections + 1)]
            made = []
            for _ in range(n_connections):
                theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), -1, -1, -1) == 0
                made.append(theirs)
            before = kernel.statistics().memory_bytes
            fds = tuple(s.fileno() for s in made)
            child = await run_as(
                NOBODY,
                """
                n = int(sys.argv[1])
                for fd in sys.argv[2:]:
                    s = socket.socket(fileno=int(fd))
                    s.setblocking(True)
                    for cookie in range(n):
                        s.send(struct.pack("<IHHQ", 16, 0x01, 0, cookie + 1))
                print("written", flush=True)
                """,
                str(frames),
                *(str(fd) for fd in fds),
                pass_fds=fds,
            )
            assert await read_line(child) == "written"
            await child.wait()

            def unread() -> int:
                total = 0
                for s in made:
                    buf = bytearray(4)
                    fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, buf)
                    total += int.from_bytes(buf, "little")
                return total

            # Until the kernel has read everything, or reads no more (a fix gates them).
            last, still = unread(), 0
            while last and still < 40:
                await trio.sleep(0.05)
                now = unread()
                still = still + 1 if now == last else 0
                last = now
            grown = kernel.statistics().memory_bytes - before
            bound = 2 * limits.user_backlog
            assert grown <= bound, f"{grown} B of refusals queued, user_backlog {limits.user_backlog}"
            for s in writer_own:
                s.close()


async def test_a_handle_attached_twice_counts_once_against_user_handles() -> None:
    """LOW. prepare() counts a message's new handles per attached id (cb_handle_is_new for
    each of attached[]), but a peer holds one handle per node: a node attached twice (legal:
    two user references) installs one new handle and is counted as two. A send that fits the
    receiving uid's user_handles (and a sending uid's fair share, also computed from it) is
    refused with EDQUOT; the counts are only pessimistic, nothing is lost.
    Fix: count distinct nodes (e.g. mark attached nodes with the send serial while counting).
    Numbers: one handle of room; [node] is accepted, [node, node] refused."""
    limit = 4  # the receiver's node, the sender's handle to it, the sender's node: room for 1
    with trio.fail_after(TIMEOUT):
        async with capbus.open_kernel(limits=capbus.Limits(user_handles=limit)) as kernel:
            async with await kernel.connect() as receiver, await kernel.connect() as sender:
                target = await receiver.transfer(await receiver.create_node(), sender)
                node = await sender.create_node()
                assert kernel.statistics().handles == limit - 1
                await sender.send(target, b"", handles=[node, node])
                assert kernel.statistics().handles == limit
