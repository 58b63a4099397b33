"""Attack review 18: the HOLD mode and CAPBUS_CMD_RECV (a peer whose messages and
notifications stay queued in the kernel until a RECV takes one; Peer.hold_messages,
Peer.recv(priority=P)). Attackers are real peers over real sockets to an embedded kernel,
some speaking raw frames.

Findings (each test fails now and passes once fixed), then a "held" section: attacks that
did not work, kept as cheap regression tests."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

import capbus
from capbus import _wire

TIMEOUT = 30
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
LEFTOVERS = (
    "nodes",
    "handles",
    "queued_messages",
    "queued_bytes",
    "queued_fds",
    "memory_bytes",
    "fds_held",
    "fds_in_flight",
    "peers_gated",
    "peers_stalled",
)


async def raw_replies(sock: socket.socket, n: int) -> list[_wire.Reply | _wire.Incoming]:
    """Reads frames until ``n`` replies came (bounded by the caller's fail_after)."""
    frames: list[_wire.Reply | _wire.Incoming] = []
    replies = 0
    while replies < n:
        try:
            data, anc, _flags, _ = sock.recvmsg(_wire.FRAME_MAX + 1, socket.CMSG_SPACE(4 * _wire.FDS_MAX))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        assert data, "the kernel hung up"
        fds: list[int] = []
        for level, kind, item in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"{len(item) // 4}i", item[: len(item) - len(item) % 4]))
        event = _wire.decode(data, fds)
        for fd in fds:
            os.close(fd)
        frames.append(event)
        replies += isinstance(event, _wire.Reply)
    return frames


async def settled(kernel: capbus.Kernel) -> capbus.KernelStatistics:
    """The statistics once every peer is gone (bounded polling)."""
    while kernel.statistics().peers:
        await trio.sleep(0.01)
    return kernel.statistics()


# -- findings ------------------------------------------------------------------------------------


@asynccontextmanager
async def receiver_and_sender(
    *, hold: bool = False
) -> AsyncIterator[tuple[capbus.Kernel, capbus.Peer, capbus.Peer, capbus.Handle, capbus.Handle]]:
    """An embedded kernel, a receiving peer (holding its messages if ``hold``) with a node,
    and a sender holding a handle to it."""
    async with capbus.open_kernel() as kernel:
        peer = await kernel.connect()
        sender = await kernel.connect()
        node = await peer.create_node()
        handle = await peer.transfer(node, sender)
        if hold:
            await peer.hold_messages()
        yield kernel, peer, sender, node, handle


async def test_held_release_notes_wedge_a_holding_peer_for_ever() -> None:
    """HIGH. Attack: a peer that holds its messages hands out handles to its nodes (as any
    service does); the holders release them. Each last release queues a NODE_RELEASE to the
    owner, charged to no sender: it counts in the owner's reply backlog. Held, these are
    never written, so reading the socket never lowers that backlog; past
    CAPBUS_REPLY_BACKLOG_MAX (1 MiB, some 5,000 notes) the kernel stops reading the holder's
    commands (cb_peer_over_backlog) -- and RECV, like PEER_SET_FLAGS to stop holding, is a
    command. (A monitor that holds wedges the same way on its MONITOR records.)
    Now: the holding peer is wedged for ever: recv() never returns (nor would
    hold_messages(False)); nothing it writes is read again. With 1,000 notes it works.
    Should: held entries must not gate the commands that drain them (count only what
    reading the socket can drain, or always read RECV/SET_FLAGS, or bound held notes), so a
    holder can always take what is held."""
    with trio.fail_after(TIMEOUT):
        async with capbus.open_kernel() as kernel:
            victim = await kernel.connect()
            attacker = await kernel.connect()
            await victim.hold_messages()
            given = []
            for _ in range(8000):
                node = await victim.create_node()
                given.append(await victim.transfer(node, attacker))
            for handle in given:
                await attacker.release(handle)
            got = None
            with trio.move_on_after(5):
                got = await victim.recv()
            assert got is not None, "the holding peer could not take a held notification: wedged"
            assert got.kind is capbus.MessageKind.NODE_RELEASED
            await victim.aclose()
            await attacker.aclose()


async def test_one_held_message_makes_the_kernel_thread_spin() -> None:
    """HIGH. Attack: any peer sets HOLD and sends one message to a node of its own (or gets
    one from anybody), then never receives it. cb_peer_update_events arms EPOLLOUT whenever
    queue.entries is non-empty -- held entries included -- and the socket is writable, so
    the level-triggered epoll wakes the loop at once, cb_queue_flush writes nothing (held),
    and again: the kernel's one thread spins at 100% CPU for as long as the message is held.
    Now: ~1,000,000 loop wakeups per second (statistics().wakeups) with one held message;
    0 when idle. Any peer of any uid can pin a core of a shared daemon, with one message.
    Should: EPOLLOUT only when something is writable (taken or replies, or entries when not
    holding): the loop sleeps while messages are merely held."""
    with trio.fail_after(TIMEOUT):
        async with capbus.open_kernel() as kernel:
            attacker = await kernel.connect()
            await attacker.hold_messages()
            node = await attacker.create_node()
            await attacker.send(node, b"never received")
            before = kernel.statistics().wakeups
            await trio.sleep(0.25)  # (a measuring window, not synchronisation)
            wakeups = kernel.statistics().wakeups - before
            assert wakeups < 100, f"the kernel loop woke {wakeups} times in 0.25 s with one held message"
            assert (await attacker.recv()).payload == b"never received"
            await attacker.aclose()


async def test_priority_recv_splits_a_transaction_announced_with_continue() -> None:
    """LOW. Attack: a sender fills a receiver's socket with fds (3 x 64 unread, the socket
    bound is 4 x 64), then multicasts one message with 64 fds to two of its nodes: the first
    frame is written saying CONTINUE, the second waits for fd room. The receiver then holds
    and a sender sends an urgent message; RECV(priority=5) takes it.
    Now: on the wire, the frame after one that said CONTINUE is the urgent message of
    another transaction (the rest of the multicast comes later): CONTINUE ("the next message
    belongs to the same transaction", wire-format.md) is broken, and continued_seq is reset
    to 0, so the kept-note exception of cb_queue_withdraw no longer holds either.
    Should: while a written frame announced more (continued_seq != 0), a RECV takes the
    rest of that transaction first: no other transaction's frame is written in between."""
    with trio.fail_after(TIMEOUT):
        async with capbus.open_kernel() as kernel:
            victim = await kernel.connect()
            sender = await kernel.connect()
            a, b = await victim.create_node(), await victim.create_node()
            ha, hb = await victim.transfer(a, sender), await victim.transfer(b, sender)
            r, w = os.pipe()
            try:
                for i in range(3):
                    await sender.send(ha, f"fill{i}".encode(), fds=[r] * _wire.FDS_MAX)
                await sender.send([ha, hb], b"multi", fds=[r] * _wire.FDS_MAX)
                await victim.hold_messages()  # (reads what was written: fill0-2, multi)
                await sender.send(ha, b"urgent", priority=5)
                urgent = await victim.recv(priority=5)
                arrived = list(victim._inbox)
                written = [*arrived, urgent]  # in the order the kernel wrote them
                for m in written:
                    m.close_fds()
                multi = next(i for i, m in enumerate(written) if m.payload == b"multi")
                if written[multi].continues:
                    assert written[multi + 1].seq == written[multi].seq, (
                        "a frame that said CONTINUE was followed by another transaction's: "
                        f"{bytes(written[multi + 1].payload)!r}"
                    )
            finally:
                os.close(r)
                os.close(w)
            await victim.aclose()
            await sender.aclose()


async def test_a_cancelled_recv_on_a_holding_peer_loses_the_message_it_took() -> None:
    """MEDIUM. Attack (on the receiver's own code; any sender helps): a holding Peer has a
    message in its inbox (written for an earlier RECV whose caller was cancelled -- the case
    the docs promise loses nothing); a recv() runs in a scope that is cancelled (a timeout,
    a vat's receive loop that a caller cancels to take the socket, _await_return). _take
    pops the message (_from_inbox) and only then awaits trio.lowlevel.checkpoint(), which
    raises Cancelled.
    Now: the message is gone (its fds left open, unreferenced); the next recv() waits for
    ever. Under load, two tasks receiving with timeouts lose messages every few ms.
    Should: checkpoint before taking from the inbox (as the plain recv path does), so a
    cancelled recv leaves the message for the next."""
    with trio.fail_after(TIMEOUT):
        async with receiver_and_sender(hold=True) as (kernel, peer, sender, node, handle):
            await sender.send(handle, b"precious")
            await peer._call(_wire.CMD_RECV, _wire.RECV.pack(0, 0))  # (a RECV whose caller went)
            assert len(peer._inbox) == 1
            scope = trio.CancelScope()

            async def impatient() -> None:
                with scope:
                    await peer.recv()

            # Another receive holds the lock (one RECV at a time); this one waits for it, is
            # handed the lock, and its timeout strikes before it runs again.
            async with trio.open_nursery() as nursery:
                await peer._recv_lock.acquire()
                nursery.start_soon(impatient)
                await trio.testing.wait_all_tasks_blocked()
                peer._recv_lock.release()
                scope.cancel()
            got = None
            with trio.move_on_after(2):
                got = await peer.recv()
            assert got is not None and got.payload == b"precious", "the cancelled recv lost the message"
            await peer.aclose()
            await sender.aclose()


async def test_a_recv_waiting_when_holding_stops_raises_invalid_argument() -> None:
    """LOW. Attack (a receive loop and a task that turns holding off, e.g. a vat on a peer
    that held for a while): task A waits in recv() on a holding peer (its RECV waits in the
    kernel); task B calls hold_messages(False). The kernel answers A's RECV ECANCELED;
    _take takes that for "replaced by another receive", loops, finds the inbox empty and
    sends another RECV -- to a peer that no longer holds.
    Now: A's recv() raises InvalidArgument (EINVAL); the message sent next is never
    returned to it (a vat's receive loop dies).
    Should: on ECANCELED, _take looks at whether the peer still holds and, if not, receives
    the plain way (the flushed messages come in order)."""
    with trio.fail_after(TIMEOUT):
        async with receiver_and_sender(hold=True) as (kernel, peer, sender, node, handle):
            result: list[object] = []

            async def receiver() -> None:
                try:
                    result.append(bytes((await peer.recv()).payload))
                except capbus.CapbusError as error:
                    result.append(error)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                await trio.testing.wait_all_tasks_blocked()
                await peer.hold_messages(False)
                await sender.send(handle, b"after")
            assert result == [b"after"], f"the waiting recv got {result}"
            await peer.aclose()
            await sender.aclose()


async def test_a_recv_waiting_when_holding_starts_never_gets_a_message() -> None:
    """LOW. Attack (as above, the other way): task A waits in a plain recv() on a peer that
    does not hold (it waits for the socket); task B calls hold_messages(). Messages now stay
    in the kernel, but A never sends a RECV: it waits for the socket for ever.
    Now: A's recv() never returns although messages are queued for the peer.
    Should: a recv that waits notices that the peer now holds (e.g. B's change wakes
    waiting receivers) and takes with RECV."""
    with trio.fail_after(TIMEOUT):
        async with receiver_and_sender() as (kernel, peer, sender, node, handle):
            result: list[bytes] = []

            async def receiver() -> None:
                result.append(bytes((await peer.recv()).payload))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                await trio.testing.wait_all_tasks_blocked()
                await peer.hold_messages()
                await sender.send(handle, b"held")
                with trio.move_on_after(3):
                    while not result:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            assert result == [b"held"], "the waiting recv never got the held message"
            await peer.aclose()
            await sender.aclose()


# -- held: attacks that did not work ---------------------------------------------------------------


async def test_held_nothing_left_after_holders_with_taken_and_waiting_recvs_disconnect() -> None:
    """Held. A raw holding peer takes messages (large, with fds, of many priorities, a
    multicast to three of its nodes, prepaid destroy notes) with 30 RECVs it never reads
    the replies of, releases the handles whose notes are taken, and disconnects with entries
    taken, held and a RECV waiting: every count returns to zero."""
    with trio.fail_after(TIMEOUT):
        async with capbus.open_kernel() as kernel:
            victim = await kernel.connect()
            sender = await kernel.connect()
            await victim.hold_messages()
            nodes = [await victim.create_node() for _ in range(3)]
            handles = [await victim.transfer(n, sender) for n in nodes]
            theirs = [await sender.create_node() for _ in range(3)]
            held = [await sender.transfer(n, victim) for n in theirs]
            r, w = os.pipe()
            for i in range(40):
                fds = [r] if i % 4 == 0 else []
                await sender.send(handles[i % 3], b"y" * 60000, fds=fds, priority=i % 5 - 2)
            os.close(r)
            os.close(w)
            await sender.send(handles, b"multi")
            await sender.destroy(*theirs)
            sock = victim._sock
            for i in range(30):
                prio = INT32_MIN if i % 2 else INT32_MAX
                flags = _wire.RECV_FLAG_PRIORITY if i % 3 else 0
                sock.send(_wire.command(_wire.CMD_RECV, 10_000 + i, _wire.RECV.pack(prio, flags)))
            for i, h in enumerate(held):
                sock.send(_wire.command(_wire.CMD_HANDLE_RELEASE, 20_000 + i, _wire.U64.pack(h.id)))
            await victim.aclose()
            await sender.aclose()
            end = await settled(kernel)
            assert {f: getattr(end, f) for f in LEFTOVERS} == dict.fromkeys(LEFTOVERS, 0)


async def test_held_recv_flood_replacing_itself_gates_only_the_flooder() -> None:
    """Held. A raw holding peer writes 50,000 RECVs and reads nothing: each replaces the one
    before (ECANCELED), the replies pile up in its own backlog until the kernel stops
    reading it; another peer of the same kernel still sends and receives, and the flooder,
    reading at last, finds every RECV answered once."""
    with trio.fail_after(TIMEOUT):
        async with capbus.open_kernel() as kernel:
            flooder = await kernel.connect()
            await flooder.hold_messages()
            sock = flooder._sock
            sent = 0
            while sent < 50_000:
                try:
                    sock.send(_wire.command(_wire.CMD_RECV, 1 + sent, _wire.RECV.pack(INT32_MAX, 1)))
                except BlockingIOError:
                    break
                sent += 1
            witness = await kernel.connect()
            node = await witness.create_node()
            await witness.send(node, b"still served")
            assert (await witness.recv()).payload == b"still served"
            frames = await raw_replies(sock, sent - 1)
            codes = [f.error for f in frames if isinstance(f, _wire.Reply)]
            assert codes == [errno.ECANCELED] * (sent - 1)
            await flooder.aclose()
            await witness.aclose()
            end = await settled(kernel)
            assert {f: getattr(end, f) for f in LEFTOVERS} == dict.fromkeys(LEFTOVERS, 0)


async def test_held_recv_is_refused_unless_holding_and_extreme_priorities_choose_right() -> None:
    """Held. RECV on a peer that does not hold, with unknown flags or a wrong size: EINVAL.
    INT32_MAX takes only a message of INT32_MAX; INT32_MIN takes the most urgent (0 beats
    negatives)."""
    with trio.fail_after(TIMEOUT):
        async with capbus.open_kernel() as kernel:
            peer = await kernel.connect()
            node = await peer.create_node()
            for body in (_wire.RECV.pack(0, 0), _wire.RECV.pack(0, 1)):
                try:
                    await peer._call(_wire.CMD_RECV, body)
                except capbus.InvalidArgument:
                    pass
                else:
                    raise AssertionError("RECV on a peer that does not hold was accepted")
            await peer.hold_messages()
            for body in (_wire.RECV.pack(0, 0x80000000), b"\0" * 4, b"\0" * 12):
                try:
                    await peer._call(_wire.CMD_RECV, body)
                except capbus.InvalidArgument:
                    pass
                else:
                    raise AssertionError(f"RECV {body!r} accepted")
            for prio in (INT32_MIN, -1, 0, INT32_MAX):
                await peer.send(node, str(prio).encode(), priority=prio)
            assert (await peer.recv(priority=INT32_MAX)).priority == INT32_MAX
            assert (await peer.recv(priority=INT32_MIN)).priority == 0
            assert (await peer.recv(priority=INT32_MIN)).priority == -1
            assert (await peer.recv(priority=INT32_MIN)).priority == INT32_MIN
            await peer.aclose()


async def test_held_toggling_hold_with_a_waiting_recv_loses_nothing() -> None:
    """Held. A receive cancelled while its RECV waits, HOLD cleared and set again 200 times
    with raw RECVs waiting in between, messages sent meanwhile: every message arrives once,
    in order, and a waiting RECV is answered ECANCELED when HOLD is cleared."""
    with trio.fail_after(TIMEOUT):
        async with receiver_and_sender(hold=True) as (kernel, peer, sender, node, handle):
            with trio.move_on_after(0.01):
                await peer.recv(priority=1)  # cancelled: its RECV still waits in the kernel
            for i in range(200):
                await sender.send(handle, f"{i}".encode())
                cookie = 1_000_000 + i
                peer._abandoned.add(cookie)  # (its reply, whatever it is, is not ours)
                peer._sock.send(_wire.command(_wire.CMD_RECV, cookie, _wire.RECV.pack(7, 1)))
                await peer.hold_messages(i % 2 == 1)
            await peer.hold_messages(False)
            got = [bytes((await peer.recv()).payload) for _ in range(200)]
            assert got == [f"{i}".encode() for i in range(200)]
            await peer.aclose()
            await sender.aclose()


async def test_held_two_tasks_receiving_on_one_holding_peer_each_get_distinct_messages() -> None:
    """Held. Two tasks recv() concurrently on one holding Peer (one RECV at a time, a lock),
    with priorities mixed: no message is lost or delivered twice, nothing is left over."""
    with trio.fail_after(TIMEOUT):
        async with receiver_and_sender(hold=True) as (kernel, peer, sender, node, handle):
            got: list[bytes] = []

            async def take(priority: int | None) -> None:
                while True:
                    got.append(bytes((await peer.recv(priority=priority)).payload))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(take, None)
                nursery.start_soon(take, None)
                for i in range(300):
                    await sender.send(handle, f"{i}".encode(), priority=i % 3)
                while len(got) < 300:
                    await trio.sleep(0.005)
                nursery.cancel_scope.cancel()
            assert sorted(got) == sorted(f"{i}".encode() for i in range(300))
            await peer.aclose()
            await sender.aclose()
            end = await settled(kernel)
            assert {f: getattr(end, f) for f in LEFTOVERS} == dict.fromkeys(LEFTOVERS, 0)


async def test_held_a_holder_that_never_receives_pins_its_senders_like_a_non_reader() -> None:
    """Held. A holding peer that never sends RECV pins what senders queued to it exactly as
    a peer that never reads does: past peer_messages the sender gets EDQUOT for it (other
    receivers still take its messages), and once the holder goes, everything is returned."""
    with trio.fail_after(TIMEOUT):
        async with capbus.open_kernel(limits=capbus.Limits(peer_messages=16)) as kernel:
            holder = await kernel.connect()
            sender = await kernel.connect()
            other = await kernel.connect()
            await holder.hold_messages()
            node = await holder.create_node()
            handle = await holder.transfer(node, sender)
            accepted = 0
            while accepted <= 16:
                try:
                    await sender.send(handle, b"x" * 1000, priority=accepted)
                except capbus.QuotaExceeded:
                    break
                accepted += 1
            assert 1 <= accepted <= 16, f"a holder that never receives took {accepted} (peer_messages 16)"
            theirs = await other.create_node()
            to_other = await other.transfer(theirs, sender)
            await sender.send(to_other, b"others still served")
            assert (await other.recv()).payload == b"others still served"
            await holder.aclose()
            await sender.aclose()
            await other.aclose()
            end = await settled(kernel)
            assert {f: getattr(end, f) for f in LEFTOVERS} == dict.fromkeys(LEFTOVERS, 0)
