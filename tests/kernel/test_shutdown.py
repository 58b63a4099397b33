"""Graceful disconnect (issue 13, part 4): CAPBUS_CMD_SHUTDOWN destroys a peer's nodes in one
transaction and queues DRAINED behind everything already queued, so the peer reads all that
was accepted for it before it goes; a receiver that dies with tracked messages unwritten
tells each sender that asked (a one-way send's tag) what was not delivered. On an embedded
kernel and on a daemon; receivers killed as real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import trio

import capbus

from .conftest import Connect

TIMEOUT = 30
DATA = capbus.MessageKind.DATA


async def test_shutdown_hands_back_everything_queued_in_order(connect: Connect) -> None:
    receiver, sender = await connect(), await connect()
    inbox = await receiver.create_node()
    to_inbox = await receiver.transfer(inbox, sender)
    with trio.fail_after(TIMEOUT):
        for index in range(3000):  # (more than the socket takes: most wait in the kernel)
            await sender.send_oneway(to_inbox, b"%d" % index)
        await sender.info()  # (a round trip: every send before it is committed)
        remaining = await receiver.shutdown()
    payloads = [bytes(m.payload) for m in remaining if m.kind is DATA]
    assert payloads == [b"%d" % i for i in range(3000)]
    assert len(remaining) == 3000  # (no note of its own node's destroy: it asked for it)
    with trio.fail_after(TIMEOUT):
        note = await sender.recv()
    assert note.kind is capbus.MessageKind.NODE_DESTROYED and note.destination.id == to_inbox.id


async def test_after_shutdown_begins_nothing_new_arrives_and_it_can_still_answer(connect: Connect) -> None:
    server, client = await connect(), await connect()
    service = await server.create_node()
    reply_node = await client.create_node()
    to_service = await server.transfer(service, client)
    to_client = await client.transfer(reply_node, server)
    with trio.fail_after(TIMEOUT):
        await client.send(to_service, b"question before")
        await client.info()
        await server.begin_shutdown()
        with pytest.raises(capbus.NodeDestroyed):
            await client.send(to_service, b"question after")
        made = await server.create_node()  # (allowed: an answer may hand out a new object)
        with pytest.raises(capbus.CapbusError) as again:
            await server.begin_shutdown()
        assert again.value.errno == 114  # EALREADY
        question = await server.recv()
        assert question.payload == b"question before"
        await server.send(to_client, b"answer")  # (sending still works)
        assert (await server.handle_state(made)).destroyed is False
        with pytest.raises(capbus.ShutDown):
            await server.recv()
        with pytest.raises(capbus.ShutDown):  # (and stays so)
            server.recv_nowait()
        answer = await client.recv()
        while answer.kind is not DATA:
            answer = await client.recv()
        assert answer.payload == b"answer"


async def test_a_holding_peer_takes_everything_then_drained(connect: Connect) -> None:
    receiver, sender = await connect(), await connect()
    await receiver.hold_messages()
    inbox = await receiver.create_node()
    to_inbox = await receiver.transfer(inbox, sender)
    with trio.fail_after(TIMEOUT):
        for index in range(100):
            await sender.send_oneway(to_inbox, b"%d" % index, priority=index % 3)
        await sender.info()
        await receiver.begin_shutdown()
        urgent = await receiver.recv(priority=2)  # (priorities still choose among what is held)
        assert urgent.payload == b"2"
        rest = []
        while True:
            try:
                rest.append(await receiver.recv())
            except capbus.ShutDown:
                break
    payloads = [bytes(m.payload) for m in rest if m.kind is DATA]
    assert payloads == [b"%d" % i for i in range(100) if i != 2]


async def test_a_dead_receiver_s_unwritten_tracked_messages_are_named_to_their_senders(
    connect: Connect,
) -> None:
    receiver, sender, bystander = await connect(), await connect(), await connect()
    await receiver.hold_messages()  # (nothing is written to it until it takes it)
    inbox = await receiver.create_node()
    other = await bystander.create_node()
    to_inbox = await receiver.transfer(inbox, sender)
    to_other = await bystander.transfer(other, sender)
    with trio.fail_after(TIMEOUT):
        for tag in range(10):
            await sender.send_oneway(to_inbox, b"tracked", tag=1000 + tag)
        await sender.send_oneway(to_inbox, b"not tracked")
        await sender.send_oneway([to_inbox, to_other], b"both", tag=77)
        first = await receiver.recv()  # (taken and written: delivered)
        assert first.payload == b"tracked"
        await receiver.aclose()  # (abruptly: nine tracked, one untracked and a multicast left)
        notices = []
        while True:
            message = await sender.recv()
            if message.kind is capbus.MessageKind.NODE_DESTROYED:
                break
            notices.append(message)
    assert [m.kind for m in notices] == [capbus.MessageKind.UNDELIVERED] * 10
    assert [m.tag for m in notices] == [1000 + t for t in range(1, 10)] + [77]
    assert all(m.destination.id == to_inbox.id for m in notices)
    assert all(isinstance(m.error, capbus.Undelivered) for m in notices)
    assert [m.seq for m in notices] == sorted(m.seq for m in notices)  # (the lost messages' order)
    with trio.fail_after(TIMEOUT):
        delivered = await bystander.recv()
    assert delivered.payload == b"both"  # (the multicast's other destination got it)


async def test_a_sender_gone_first_is_told_nothing_and_the_bus_goes_on(connect: Connect) -> None:
    receiver, sender, later = await connect(), await connect(), await connect()
    await receiver.hold_messages()
    inbox = await receiver.create_node()
    to_inbox = await receiver.transfer(inbox, sender)
    later_inbox = await receiver.transfer(inbox, later)
    with trio.fail_after(TIMEOUT):
        for tag in range(50):
            await sender.send_oneway(to_inbox, b"x", tag=tag)
        await sender.info()
        await sender.aclose()
        await later.send_oneway(later_inbox, b"y", tag=1)
        await receiver.aclose()
        notice = await later.recv()
    assert notice.kind is capbus.MessageKind.UNDELIVERED and notice.tag == 1


async def test_a_sender_that_released_its_handle_is_told_without_one(connect: Connect) -> None:
    receiver, sender = await connect(), await connect()
    await receiver.hold_messages()
    inbox = await receiver.create_node()
    to_inbox = await receiver.transfer(inbox, sender)
    with trio.fail_after(TIMEOUT):
        await sender.send_oneway(to_inbox, b"x", tag=5)
        await sender.release(to_inbox)
        await receiver.aclose()
        notice = await sender.recv()
    assert notice.kind is capbus.MessageKind.UNDELIVERED and notice.tag == 5
    assert not notice.destination.is_valid


CHILD = """
import socket, sys, trio, capbus

async def main():
    peer = capbus.Peer(socket.socket(fileno=int(sys.argv[1])))
    seed = await peer.take_seed()
    await peer.hold_messages()
    inbox = await peer.create_node()
    await peer.send(seed.handles[0], b"my inbox", handles=[inbox])
    print("holding", flush=True)
    await trio.sleep_forever()

trio.run(main)
"""


async def test_a_receiver_killed_with_sigkill_tells_its_senders(connect: Connect) -> None:
    """A real process owning the receiving peer dies: the kernel sees its connection end,
    and tells the sender what it never got."""
    sender = await connect()
    intake = await sender.create_node()
    connection = await sender.create_peer(handles=[intake])
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(connection.fileno())],
        pass_fds=(connection.fileno(),),
        stdout=subprocess.PIPE,
    )
    connection.close()  # (the child's alone now)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"holding\n"
        with trio.fail_after(TIMEOUT):
            introduction = await sender.recv()
            assert introduction.payload == b"my inbox"
            to_inbox = introduction.handles[0]
            for tag in range(3):
                await sender.send_oneway(to_inbox, b"job", tag=tag)
            await sender.info()
            os.kill(child.pid, signal.SIGKILL)
            tags = []
            while len(tags) < 3:
                message = await sender.recv()
                if message.kind is capbus.MessageKind.UNDELIVERED:
                    tags.append(message.tag)
        assert tags == [0, 1, 2]
    finally:
        child.kill()
        child.wait()


async def test_kept_nodes_still_receive_after_drained(connect: Connect) -> None:
    peer, other = await connect(), await connect()
    service = await peer.create_node()
    answers = await peer.create_node()
    to_service = await peer.transfer(service, other)
    to_answers = await peer.transfer(answers, other)
    with trio.fail_after(TIMEOUT):
        await other.send(to_service, b"a call")
        await other.info()
        await peer.begin_shutdown(keep=[answers])
        with pytest.raises(capbus.NodeDestroyed):
            await other.send(to_service, b"too late")
        await other.send(to_answers, b"an answer")  # (a kept node: still reached)
        kinds = []
        while True:
            message = await peer.recv()
            kinds.append((message.kind, bytes(message.payload)))
            if message.payload == b"an answer":
                break
    assert kinds == [
        (DATA, b"a call"),
        (capbus.MessageKind.DRAINED, b""),  # (as a message: it kept a node)
        (DATA, b"an answer"),
    ]
    with trio.fail_after(TIMEOUT):
        note = await other.recv()
        assert note.kind is capbus.MessageKind.NODE_DESTROYED and note.draining
        assert note.destination.id == to_service.id
        await peer.aclose()
        final = [await other.recv(), await other.recv()]
    # (the kept node is destroyed as usual; the service node's holders hear the owner went)
    assert {(m.destination.id, m.draining) for m in final} == {(to_answers.id, False), (to_service.id, False)}


async def test_what_a_shutdown_may_keep_is_checked_and_nothing_done_if_wrong(connect: Connect) -> None:
    peer, other = await connect(), await connect()
    own = await peer.create_node()
    foreign = await other.create_node()
    held = await other.transfer(foreign, peer)
    gone = await peer.create_node()
    await peer.destroy(gone)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(capbus.NoSuchHandle):
            await peer.begin_shutdown(keep=[own, 0x7777])
        with pytest.raises(capbus.NotOwner):
            await peer.begin_shutdown(keep=[held])
        with pytest.raises(capbus.AlreadyDestroyed):
            await peer.begin_shutdown(keep=[gone])
        assert (await peer.handle_state(own)).destroyed is False  # (nothing done)
        await peer.create_node()  # (not closing either)
        await peer.begin_shutdown(keep=[own])
        assert (await peer.handle_state(own)).destroyed is False
