"""Attacks on the kernel from outside, third review round (the retry walk over gated peers,
refused connection moves, handles in queued messages, and the rest of the surface).

Each test reproduces one attack that works against the kernel as it is and fails until the
kernel is fixed; its docstring gives the severity, the harm and the suggested fix. Attacks
tried in this round that did not work are listed in the round's report, not here.
"""

from __future__ import annotations

import socket

import trio
from capbus._kernel import lib

import capbus
from capbus import _wire
from capbus.testing import wait_for_statistics

from .other_uid import needs_root, run_as
from .test_attacks_review import _FLOODING_CHILD, _parents_uid_still_served

ATTACKER = 1001
TIMEOUT = 60


def adopt(kernel: capbus.Kernel, uid: int) -> socket.socket:
    """A new peer of the embedded kernel, charged to ``uid`` for good."""
    theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), uid, uid, 0) == 0
    return theirs


async def test_children_refused_a_move_cannot_stop_their_parents_uid_on_the_connections_it_made() -> None:
    """Severity MEDIUM. A connection is charged to the uid that writes to it
    (cb_peer_charge_to), but when that move does not fit the writer's uid (EDQUOT: the uid is
    at its peers_per_user, past half its user_backlog, or at its fair share of kernel fds)
    the frame is refused with an EDQUOT *reply*, and that reply is queued on the connection,
    charged to the backlog of the uid that made it. The writer, who can put its own uid in
    that state at will (here: it holds its whole peers_per_user), then floods the
    connections its parent handed it with frames it never reads the answers of (to be
    refused it only has to hold its fair share of the kernel's fds, a few hundred
    connections on a daemon with 1,024, or its peers_per_user as here): every
    connection's backlog fills to 1 MiB charged to the parent's uid, and past 17 of them
    (user_backlog, 16 MiB) no peer of the parent's uid is read any more, the parent's own
    included. This is test_attacks_review's children attack again, through the refusal path
    that the fix of round one left charged to the maker.

    Fix: do not let a writer whose move is refused queue anything charged to the maker: after
    the first refused frame stop reading the connection from that writer (doom it, or treat
    it like a protocol violation with its count), or charge the refusal replies to the
    writer's uid (its backlog, not the maker's), or answer all refusals with one reply."""
    needs_root()
    limit = 32
    async with capbus.open_kernel(limits=capbus.Limits(peers_per_user=limit)) as kernel:
        # The attacker's uid at its peers_per_user: no connection can move to it.
        own = [adopt(kernel, ATTACKER) for _ in range(limit)]
        parent = await kernel.connect()
        sibling = await kernel.connect()
        connections = [await parent.create_peer(b"child") for _ in range(12)]
        connections += [kernel.socket_for_child() for _ in range(12)]
        try:
            child = await run_as(
                ATTACKER,
                _FLOODING_CHILD,
                "0",
                *(str(c.fileno()) for c in connections),
                pass_fds=tuple(c.fileno() for c in connections),
            )
        finally:
            for connection in connections:
                connection.close()
        try:
            await _parents_uid_still_served(kernel, parent, sibling, child, "children refused a move")
        finally:
            for sock in own:
                sock.close()


async def _flood_until_gated(kernel: capbus.Kernel, sock: socket.socket) -> None:
    """Writes commands on ``sock`` (whose replies no one reads) until its uid is gated."""
    sock.setblocking(False)
    frame = _wire.command(_wire.CMD_PEER_QUERY, 1)
    with trio.fail_after(TIMEOUT):
        while kernel.statistics().peers_gated == 0:
            try:
                sock.send(frame)
            except BlockingIOError:  # until the kernel reads it again, or gates it
                async with trio.open_nursery() as nursery:

                    async def writable() -> None:
                        await trio.lowlevel.wait_writable(sock)
                        nursery.cancel_scope.cancel()

                    async def gated_now() -> None:
                        await wait_for_statistics(kernel, lambda s: s.peers_gated > 0)
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(writable)
                    nursery.start_soon(gated_now)


async def test_a_uid_past_its_backlog_does_not_make_the_kernel_spin() -> None:
    """Severity MEDIUM. A peer's EPOLLIN is armed or not by cb_peer_update_events, called
    for the peer being served; but a peer is also "over backlog" when its *uid* is past
    user_backlog, which other peers of that uid change. A peer B of the uid that was armed
    before the uid went over stays armed: when it has a frame to read, read_peer(B) sees
    cb_peer_over_backlog and returns at once without reading and without re-arming it, and
    the level-triggered epoll reports B again at once, forever. B is not on the gated list
    either (it was never re-evaluated), so the retry walk never fixes it. Any uid does this
    at will with two connections: one that never reads its replies (past the uid's backlog),
    one with a frame written. The kernel thread then burns a whole core (measured: ~360,000
    wakeups a second, 0.92 s of CPU per second; an idle kernel: 0), for as long as the
    attacker likes; in embedded mode that is the application's own process, and every other
    peer's service shares the core with the spin. Each such peer spins on its own: with
    N of them (armed before, one frame each after) every other uid waits behind N always
    ready fds in epoll; measured, the round trip of a peer of another uid went from ~50 us
    to 0.9 ms median with 5,000 (19x) and 1.5 ms with 8,000 (30x, the most one uid gets
    of a kernel with RLIMIT_NOFILE 20,000; linear in N, so ~60x at peers_per_user).

    Fix: when read_peer stops on cb_peer_over_backlog, call cb_peer_update_events(peer)
    (which disarms EPOLLIN and puts it on the gated list); or, when a uid crosses
    user_backlog, re-evaluate (or disarm) all of its peers, not only the one served."""
    needs_root()
    async with capbus.open_kernel(limits=capbus.Limits(user_backlog=16384)) as kernel:
        flooder = adopt(kernel, ATTACKER)
        other = adopt(kernel, ATTACKER)  # armed now, while the uid is under its backlog
        try:
            await _flood_until_gated(kernel, flooder)
            other.send(_wire.command(_wire.CMD_PEER_QUERY, 2))
            # Not a synchronisation: a window to count the kernel's wakeups in while nothing
            # happens. A retry round every 1 to 128 ms is all a stalled uid may cost; a spin
            # is hundreds of thousands. The bound is gross on purpose.
            before = kernel.statistics().wakeups
            await trio.sleep(0.5)
            wakeups = kernel.statistics().wakeups - before
            assert wakeups < 10_000, f"the kernel woke {wakeups} times in 0.5 s with nothing to do: it spins"
        finally:
            flooder.close()
            other.close()


async def test_destroy_notifications_of_another_uid_cannot_stop_a_uid_being_served() -> None:
    """Severity MEDIUM. Node-destroy notifications are charged to no sender: they count in
    the *receiving* peer's and uid's backlog (cb_queue_notify), the bound past which the
    kernel stops reading that uid's peers. An attacker turns its bounded quota into an
    unbounded charge on its victim's uid: it sends a victim peer that is not reading just
    now messages carrying 256 handles to fresh nodes each, until its fair share of that
    peer's queue is used (~14,600 handles, ~120 KB charged to the attacker), then destroys
    all those nodes at once: one notification per handle, ~5.8 MB of kernel memory queued
    to the victim and charged to the victim's backlog, ~25 times what the attacker paid
    and outside its user_bytes. Six such victim peers (measured: 8 peers gave +46 MB of
    kernel memory in 0.7 s) put the victim's uid past user_backlog (16 MiB): the kernel
    stops reading every peer of that uid, here its one active peer, which reads everything,
    until the idle ones drain their queues. It also pins kernel memory no quota bounds.

    Fix: charge the notifications a destroy causes to the destroying peer's uid (as it is
    charged for the messages it sends, fair share on the receiver, refusing or deferring
    the destroy otherwise), or, as bus1 does, embed the destroy notification in the handle
    (allocated and charged with it, so queueing it needs no memory and counts in no backlog)."""
    needs_root()
    victims_count = 6
    async with capbus.open_kernel() as kernel:
        active = await kernel.connect()
        victims = [await kernel.connect() for _ in range(victims_count)]  # not reading now
        attackers = [capbus.Peer.from_socket(adopt(kernel, ATTACKER)) for _ in range(victims_count)]
        try:
            with trio.fail_after(TIMEOUT):
                for victim, attacker in zip(victims, attackers, strict=True):
                    target = await victim.transfer(await victim.create_node(), attacker)
                    nodes = []
                    while True:  # fresh handles for the victim, up to the attacker's share
                        batch = [await attacker.create_node() for _ in range(lib.CAPBUS_HANDLES_MAX)]
                        nodes += batch
                        try:
                            await attacker.send(target, b"", handles=batch)
                        except capbus.errors.QuotaExceeded:
                            break
                    for i in range(0, len(nodes), lib.CAPBUS_DESTROY_MAX):
                        await attacker.destroy(*nodes[i : i + lib.CAPBUS_DESTROY_MAX])
            with trio.move_on_after(10) as waited:
                assert (await active.info()).uid == 0
            assert not waited.cancelled_caught, (
                "another uid's destroy notifications stopped every peer of this uid being served "
                f"(statistics: {kernel.statistics()})"
            )
        finally:
            for attacker in attackers:
                await attacker.aclose()


async def test_a_multicast_does_not_take_a_uid_past_its_user_handles() -> None:
    """Severity LOW. A send checks, for each destination, that the receiver's uid stays
    within user_handles (prepare: receiver->user->n_handles + new_handles), but against the
    count as of before the send: the installs of all destinations happen at commit. A
    multicast to many peers of one uid thus installs destinations x handles new handles on
    that uid at once, each destination having passed the check alone: up to 1024 x 256 =
    262,144 handles (the whole default user_handles again, ~30 MB of kernel memory) past
    the bound, charged to the victim's uid, in one send. Here, with user_handles 2,000, 32
    peers of this uid end up with 8,224 handles. The overshoot is once per send (the next
    one finds the uid over), so this bounds the harm to about twice the limit.

    Fix: in cb_send, sum the new handles per receiving uid over all destinations before the
    commit (or count the prepared ones into the uid as they are reserved and undo on
    failure), and refuse the destinations that would take that uid past user_handles."""
    needs_root()
    limit, peers = 2000, 32
    async with capbus.open_kernel(limits=capbus.Limits(user_handles=limit)) as kernel:
        victims = [await kernel.connect() for _ in range(peers)]
        attacker = capbus.Peer.from_socket(adopt(kernel, ATTACKER))
        try:
            with trio.fail_after(TIMEOUT):
                targets = [await victim.transfer(await victim.create_node(), attacker) for victim in victims]
                fresh = [await attacker.create_node() for _ in range(lib.CAPBUS_HANDLES_MAX)]
                await attacker.send(targets, b"", handles=fresh)
            attackers_own = len(fresh) + len(targets)
            victims_uid = kernel.statistics().handles - attackers_own
            assert victims_uid <= limit, (
                f"one multicast took a uid to {victims_uid} handles ({limit} allowed)"
            )
        finally:
            await attacker.aclose()


async def test_handles_queued_by_another_uid_cannot_use_up_a_uids_user_handles() -> None:
    """Severity MEDIUM. Handles attached to a message are installed in the receiver when the
    send commits (handle.h), and charged to the *receiver's* uid (handle_new: charged_to =
    the receiving peer's user), in its user_handles (262,144 for all peers of the uid) and
    its peers' handles_held. Queued messages are bounded by the fair share of the
    receiver's queue, but that bounds the attached handles per peer only (~14,600 new
    handles from one uid on one peer that does not read just now: 22% of handles_held,
    measured), not per uid: the same ~14,600 nodes of the attacker, sent to 19 peers of the
    victim's uid that are not reading at the moment, are 19 handles each, ~277,000 handles
    charged to the victim's uid. Then no peer of that uid can create a node, nor receive a
    handle from anyone (EDQUOT), its active peers included, until the idle ones read and
    release. The attacker pays only its own ~14,600 nodes and its queue shares.

    Fix: charge the handles of a queued message to its sender's uid until the receiver
    takes the message (install at delivery, or move the charge on write to the socket), or
    give each sending uid a fair share of the receiving uid's user_handles (the quota.h rule
    for the other kernel-wide budgets)."""
    needs_root()
    victims_count = 19
    async with capbus.open_kernel() as kernel:
        active = await kernel.connect()
        victims = [await kernel.connect() for _ in range(victims_count)]  # not reading now
        attacker = capbus.Peer.from_socket(adopt(kernel, ATTACKER))
        try:
            with trio.fail_after(TIMEOUT):
                targets = [await victim.transfer(await victim.create_node(), attacker) for victim in victims]
                full: set[int] = set()
                while len(full) < len(targets):
                    batch = [await attacker.create_node() for _ in range(lib.CAPBUS_HANDLES_MAX)]
                    for i, target in enumerate(targets):
                        if i in full:
                            continue
                        try:
                            await attacker.send(target, b"", handles=batch)
                        except capbus.errors.QuotaExceeded:
                            full.add(i)
                # Topped up one handle at a time, on a peer whose queue still has room.
                for target in reversed(targets):
                    try:
                        while True:
                            await attacker.send(target, b"", handles=[await attacker.create_node()])
                    except capbus.errors.QuotaExceeded:
                        pass
                try:
                    await active.create_node()
                except capbus.errors.QuotaExceeded:
                    raise AssertionError(
                        "another uid's queued messages used up this uid's user_handles: no node for it "
                        f"(statistics: {kernel.statistics()})"
                    ) from None
        finally:
            await attacker.aclose()
