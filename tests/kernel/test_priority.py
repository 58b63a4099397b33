"""Priority receive done by the kernel (issue 13, part 1): a peer that holds its messages
(Peer.hold_messages, CAPBUS_PEER_FLAG_HOLD) has them kept queued in the kernel and takes
them one at a time (CAPBUS_CMD_RECV); ``recv(priority=P)`` makes the kernel choose the most
urgent at or above P among everything it holds. On an embedded kernel and on a kernel
daemon, with senders in other processes."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import capbus

from .conftest import Connect

TIMEOUT = 60

SENDER = textwrap.dedent(
    """
    import sys, trio, capbus

    async def main():
        async with capbus.Peer.from_socket(int(sys.argv[1])) as peer:
            (target,) = (await peer.take_seed()).handles
            for spec in sys.argv[2:]:  # "count:priority:name"
                count, priority, name = spec.split(":")
                for i in range(int(count)):
                    await peer.send(target, f"{name}{i}".encode(), priority=int(priority))

    trio.run(main)
    """
)


@asynccontextmanager
async def receiving(connect: Connect) -> AsyncIterator[tuple[capbus.Peer, capbus.Handle]]:
    """A peer that holds its messages, and its node."""
    receiver = await connect()
    await receiver.hold_messages()
    yield receiver, await receiver.create_node()


async def send_from_another_process(receiver: capbus.Peer, node: capbus.Handle, *specs: str) -> None:
    """Runs a sender process holding a handle to ``node`` that sends ``specs``
    ("count:priority:name" each, in order) and returns once it is done."""
    sock = await receiver.create_peer(handles=[node])
    with sock:
        command = [sys.executable, "-c", SENDER, str(sock.fileno()), *specs]
        with trio.fail_after(TIMEOUT):
            done = await trio.run_process(command, pass_fds=[sock.fileno()], capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()


async def test_an_urgent_message_behind_thousands_is_received_first_every_time(connect: Connect) -> None:
    async with receiving(connect) as (receiver, node):
        for round_ in range(3):
            await send_from_another_process(receiver, node, "3000:0:low", "1:5:urgent", "2:0:after")
            with trio.fail_after(TIMEOUT):
                first = await receiver.recv(priority=0)
                assert first.payload == b"urgent0", f"round {round_}: {bytes(first.payload)!r}"
                rest = [await receiver.recv() for _ in range(3003)]
            payloads = [bytes(m.payload) for m in rest[:-1]]
            assert payloads == [f"low{i}".encode() for i in range(3000)] + [b"after0", b"after1"]
            assert rest[-1].kind == capbus.MessageKind.NODE_RELEASED  # (the sender went, after)


async def test_equal_priorities_keep_their_order_and_plain_recv_the_global_order(connect: Connect) -> None:
    async with receiving(connect) as (receiver, node):
        await send_from_another_process(receiver, node, "3:1:a", "2:7:b", "3:1:c", "2:7:d")
        with trio.fail_after(TIMEOUT):
            by_priority = [bytes((await receiver.recv(priority=1)).payload) for _ in range(4)]
            assert by_priority == [b"b0", b"b1", b"d0", b"d1"]
            plain = [bytes((await receiver.recv()).payload) for _ in range(6)]
        assert plain == [b"a0", b"a1", b"a2", b"c0", b"c1", b"c2"]


async def test_notifications_keep_their_place_for_plain_recv(connect: Connect) -> None:
    """A node destroyed between two messages: plain recv sees message, notification,
    message (rule 8); a priority receive above 0 passes the notification by."""
    sender = await connect()
    async with receiving(connect) as (receiver, node):
        other = await sender.create_node()
        held = await sender.transfer(other, receiver)
        target = await receiver.transfer(node, sender)
        await sender.send(target, b"one", priority=3)
        await sender.destroy(other)
        await sender.send(target, b"two", priority=3)
        with trio.fail_after(TIMEOUT):
            urgent = await receiver.recv(priority=1)
            assert urgent.payload == b"one"
            urgent = await receiver.recv(priority=1)
            assert urgent.payload == b"two"
            note = await receiver.recv()
        assert note.kind == capbus.MessageKind.NODE_DESTROYED and note.destination == held
        await sender.send(target, b"three")
        another = await sender.create_node()
        await sender.transfer(another, receiver)
        await sender.destroy(another)
        await sender.send(target, b"four")
        with trio.fail_after(TIMEOUT):
            kinds = [(await receiver.recv()).kind for _ in range(3)]
        data, destroyed = capbus.MessageKind.DATA, capbus.MessageKind.NODE_DESTROYED
        assert kinds == [data, destroyed, data]


async def test_a_priority_receive_waits_for_an_urgent_enough_message(connect: Connect) -> None:
    sender = await connect()
    async with receiving(connect) as (receiver, node):
        target = await receiver.transfer(node, sender)
        await sender.send(target, b"routine", priority=0)
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                got.append(bytes((await receiver.recv(priority=5)).payload))

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert not got  # (the routine one is below it: it waits)
            await sender.send(target, b"alarm", priority=9)
        assert got == [b"alarm"]
        with trio.fail_after(TIMEOUT):
            assert (await receiver.recv()).payload == b"routine"


async def test_a_cancelled_receive_loses_nothing(connect: Connect) -> None:
    sender = await connect()
    async with receiving(connect) as (receiver, node):
        target = await receiver.transfer(node, sender)
        with trio.move_on_after(0.05):
            await receiver.recv(priority=3)  # (waits in the kernel, then is given up)
        await sender.send(target, b"for the cancelled one", priority=4)
        await sender.send(target, b"next", priority=0)
        with trio.fail_after(TIMEOUT):
            assert (await receiver.recv()).payload == b"for the cancelled one"
            assert (await receiver.recv()).payload == b"next"


async def test_held_messages_count_against_the_receivers_quota(connect: Connect) -> None:
    """Holding changes nothing in the accounting: a receiver that takes nothing fills its
    queue, and its senders are refused (QuotaExceeded) as if it did not read."""
    sender = await connect()
    async with receiving(connect) as (receiver, node):
        target = await receiver.transfer(node, sender)
        sent = 0
        with pytest.raises(capbus.QuotaExceeded), trio.fail_after(TIMEOUT):
            while True:
                await sender.send(target, b"x")
                sent += 1
        assert 0 < sent <= capbus.Limits().peer_messages
        with trio.fail_after(TIMEOUT):
            for i in range(sent):
                assert (await receiver.recv()).payload == b"x", i
        await sender.send(target, b"room again")  # (taken: the quota is given back)
        with trio.fail_after(TIMEOUT):
            assert (await receiver.recv()).payload == b"room again"


async def test_holding_off_writes_what_was_held_in_order(connect: Connect) -> None:
    sender = await connect()
    async with receiving(connect) as (receiver, node):
        target = await receiver.transfer(node, sender)
        for i in range(5):
            await sender.send(target, b"%d" % i, priority=i)
        await receiver.hold_messages(False)
        assert not receiver.holds_messages
        with trio.fail_after(TIMEOUT):
            assert [bytes((await receiver.recv()).payload) for _ in range(5)] == [
                b"0",
                b"1",
                b"2",
                b"3",
                b"4",
            ]


async def test_priority_needs_holding_and_an_int(connect: Connect) -> None:
    peer = await connect()
    with pytest.raises(capbus.InvalidArgument, match="hold_messages"):
        await peer.recv(priority=1)
    await peer.hold_messages()
    with pytest.raises(TypeError, match="priority is an int"):
        await peer.recv(priority=True)


async def test_the_kernel_refuses_a_receive_of_a_peer_that_does_not_hold(connect: Connect) -> None:
    """The command itself, as a hostile peer would write it (not through Peer.recv)."""
    from capbus import _wire

    peer = await connect()
    with pytest.raises(capbus.InvalidArgument):
        await peer._call(_wire.CMD_RECV, _wire.RECV.pack(0, 0))
    await peer.hold_messages()
    with pytest.raises(capbus.InvalidArgument):
        await peer._call(_wire.CMD_RECV, _wire.RECV.pack(0, 0x80))  # (an unknown flag)
    with pytest.raises(capbus.InvalidArgument):
        await peer._call(_wire.CMD_RECV, b"\0" * 4)  # (a short body)


async def test_negative_priorities_come_after_plain_ones(connect: Connect) -> None:
    """Below 0 is less urgent than a plain message: the kernel's index of messages of a
    priority other than 0 and the oldest plain one together give the same choice as looking
    at every message."""
    async with receiving(connect) as (receiver, node):
        await send_from_another_process(receiver, node, "1:-3:n3_", "1:0:z", "1:-1:n1_", "1:2:two", "1:0:y")
        with trio.fail_after(TIMEOUT):
            taken = [await receiver.recv(priority=-5) for _ in range(6)]
        released = capbus.MessageKind.NODE_RELEASED  # (the sender's going: priority 0, after y)
        kinds = [m.kind for m in taken]
        # (the kernel may see the sender go before n1 is taken, or after: 0 beats -1 or not yet)
        assert kinds.count(released) == 1 and kinds.index(released) in (3, 4), kinds
        payloads = [bytes(m.payload) for m in taken if m.kind != released]
        assert payloads == [b"two0", b"z0", b"y0", b"n1_0", b"n3_0"]
        sender = await connect()
        target = await receiver.transfer(node, sender)
        await sender.send(target, b"m", priority=-3)
        await sender.send(target, b"k", priority=-1)
        with trio.fail_after(TIMEOUT):
            assert (await receiver.recv(priority=-2)).payload == b"k"
            assert (await receiver.recv()).payload == b"m"


async def test_a_holder_past_its_backlog_may_only_drain(connect: Connect) -> None:
    """Held notifications past the reply backlog bound (some 5,000 NODE_RELEASE notes, none
    charged to a sender): the holder's commands are still read, but only those that drain
    are carried out -- making a node is refused (QuotaExceeded) until it has taken enough,
    a receive and a query work throughout."""
    holder = await connect()
    other = await connect()
    await holder.hold_messages()
    given = []
    with trio.fail_after(TIMEOUT):
        for _ in range(8000):
            given.append(await holder.transfer(await holder.create_node(), other))
        for handle in given:
            await other.release(handle)
        with pytest.raises(capbus.QuotaExceeded):
            await holder.create_node()
        await holder.info()  # (answered)
        taken = 0
        while True:
            assert (await holder.recv()).kind == capbus.MessageKind.NODE_RELEASED
            taken += 1
            try:
                await holder.create_node()
                break
            except capbus.QuotaExceeded:
                continue
    assert 0 < taken < 8000
