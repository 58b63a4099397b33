"""docs/design.md 2.1 rules 1-6: peers, nodes, handles, dedup, release and destroy."""

from __future__ import annotations

import errno

import pytest
import trio

import capbus
from capbus.testing import PeerFactory, assert_queue_empty, recv_kind, wait_for_statistics

DATA = capbus.MessageKind.DATA
DESTROYED = capbus.MessageKind.NODE_DESTROYED
RELEASED = capbus.MessageKind.NODE_RELEASED


async def test_rule1_new_peer_has_nothing_and_reaches_no_one(new_peer: PeerFactory) -> None:
    a = await new_peer()
    b = await new_peer()
    assert_queue_empty(a)
    # Without a handle there is nothing to name: every small id is refused.
    for guess in range(0, 64):
        with pytest.raises(capbus.NoSuchHandle) as info:
            await a.send(guess, b"hi")
        assert info.value.errno == errno.ENXIO
    assert_queue_empty(b)


async def test_rule2_create_node_returns_owner_handle(new_peer: PeerFactory) -> None:
    a = await new_peer()
    n1 = await a.create_node()
    n2 = await a.create_node()
    assert n1.is_owner and n2.is_owner
    assert n1 != n2
    state = await a.handle_state(n1)
    assert state == capbus.HandleState(references=1, owner=True, destroyed=False)


async def test_rule2_ids_are_unforgeable(new_peer: PeerFactory) -> None:
    a = await new_peer()
    b = await new_peer()
    node = await a.create_node()
    # b guesses a's id for the node: ids are per peer, so it means nothing in b.
    with pytest.raises(capbus.NoSuchHandle):
        await b.send(node.id, b"x")
    for forged in (node.id | 2, node.id + 8, 2**63, 2**64 - 1, 0):
        with pytest.raises(capbus.NoSuchHandle):
            await b.send(forged, b"x")
    assert_queue_empty(a)


async def test_rule3_handles_travel_and_dedup(new_peer: PeerFactory) -> None:
    a = await new_peer()
    b = await new_peer()
    c = await new_peer()
    inbox_b = await b.create_node()
    to_b = await b.transfer(inbox_b, a)
    node = await c.create_node()
    node_in_a = await c.transfer(node, a)

    await a.send(to_b, b"one", handles=[node_in_a])
    await a.send(to_b, b"two", handles=[node_in_a, node_in_a])
    first = await recv_kind(b, DATA)
    second = await recv_kind(b, DATA)
    assert first.destination == inbox_b
    assert len(first.handles) == 1 and first.handles[0].is_valid and not first.handles[0].is_owner
    # The same node always arrives as the same id in one peer.
    assert second.handles == (first.handles[0], first.handles[0])
    assert (await b.handle_state(first.handles[0])).references == 3
    # And b can use it: the message reaches c's node.
    await b.send(first.handles[0], b"via b")
    got = await recv_kind(c, DATA)
    assert got.destination == node and got.payload == b"via b"


async def test_rule3_own_node_comes_back_as_its_own_id(new_peer: PeerFactory) -> None:
    a = await new_peer()
    node = await a.create_node()
    await a.send(node, b"self", handles=[node])
    message = await recv_kind(a, DATA)
    assert message.destination == node
    assert message.handles == (node,)
    assert (await a.handle_state(node)).references == 2


async def test_rule4_release_notification_when_last_remote_handle_goes(new_peer: PeerFactory) -> None:
    a = await new_peer()
    b = await new_peer()
    c = await new_peer()
    node = await a.create_node()
    in_b = await a.transfer(node, b)
    in_c = await a.transfer(node, c)
    await a.transfer(node, c)  # c now holds two references
    await b.release(in_b)
    await c.release(in_c)
    assert_queue_empty(a)
    with pytest.raises(capbus.NoSuchHandle):
        await b.release(in_b)
    await c.release(in_c)
    released = await recv_kind(a, RELEASED)
    assert released.destination == node
    # It fires again on the next fall to zero.
    again = await a.transfer(node, b)
    await b.release(again)
    assert (await recv_kind(a, RELEASED)).destination == node
    assert_queue_empty(a)


async def test_rule4_owner_pin_and_release_after_destroy(new_peer: PeerFactory) -> None:
    a = await new_peer()
    node = await a.create_node()
    with pytest.raises(capbus.HandleBusy) as info:
        await a.release(node)
    assert info.value.errno == errno.EBUSY
    await a.destroy(node)
    await recv_kind(a, DESTROYED)
    await a.release(node)
    with pytest.raises(capbus.NoSuchHandle):
        await a.handle_state(node)


async def test_rule4_no_release_notification_for_never_shared_node(new_peer: PeerFactory) -> None:
    a = await new_peer()
    node = await a.create_node()
    await a.send(node, b"", handles=[node])
    await recv_kind(a, DATA)
    await a.release(node)  # the extra owner reference from receiving our own node
    await a.send(node, b"marker")
    assert (await a.recv()).payload == b"marker"


async def test_rule5_destroy_notifies_every_holder_and_owner(new_peer: PeerFactory) -> None:
    a = await new_peer()
    holders = [await new_peer() for _ in range(3)]
    node = await a.create_node()
    ids = [await a.transfer(node, h) for h in holders]
    await a.destroy(node)
    for holder, handle in zip(holders, ids, strict=True):
        note = await recv_kind(holder, DESTROYED)
        assert note.destination == handle
        with pytest.raises(capbus.NodeDestroyed) as info:
            await holder.send(handle, b"late")
        assert info.value.errno == errno.EHOSTUNREACH
        assert (await holder.handle_state(handle)).destroyed
    assert (await recv_kind(a, DESTROYED)).destination == node


async def test_rule5_destroy_errors(new_peer: PeerFactory) -> None:
    a = await new_peer()
    b = await new_peer()
    node = await a.create_node()
    other = await a.create_node()
    in_b = await a.transfer(node, b)
    with pytest.raises(capbus.NotOwner) as remote:
        await b.destroy(in_b)
    assert remote.value.errno == errno.EREMOTE
    with pytest.raises(capbus.DuplicateId):
        await a.destroy(node, node)
    with pytest.raises(capbus.NoSuchHandle):
        await a.destroy(node, 12345)
    # All-or-nothing: the failed calls destroyed nothing.
    assert not (await a.handle_state(node)).destroyed
    assert not (await a.handle_state(other)).destroyed
    await a.destroy(node)
    with pytest.raises(capbus.AlreadyDestroyed) as stale:
        await a.destroy(node)
    assert stale.value.errno == errno.ESTALE


async def test_rule5_destroy_many_is_one_transaction(new_peer: PeerFactory) -> None:
    a = await new_peer()
    b = await new_peer()
    nodes = [await a.create_node() for _ in range(4)]
    held = [await a.transfer(n, b) for n in nodes]
    await a.destroy(*nodes, release=True)
    notes = [await recv_kind(b, DESTROYED) for _ in nodes]
    assert [n.destination for n in notes] == held
    assert len({n.seq for n in notes}) == 1
    assert [n.continues for n in notes] == [True, True, True, False]
    # release=True dropped the owner's pins.
    for node in nodes:
        with pytest.raises(capbus.NoSuchHandle):
            await a.handle_state(node)


async def test_rule6_handles_reveal_nothing_about_owners(new_peer: PeerFactory) -> None:
    a = await new_peer()
    b = await new_peer()
    c = await new_peer()
    same_owner = [await a.create_node(), await a.create_node()]
    other_owner = await b.create_node()
    in_c = [await a.transfer(n, c) for n in same_owner] + [await b.transfer(other_owner, c)]
    states = [await c.handle_state(h) for h in in_c]
    # Nothing in what c can see tells the first two apart from the third.
    assert len(set(states)) == 1
    assert all(not h.is_owner for h in in_c)
    assert sorted(h.id & 0x7 for h in in_c) == [3, 3, 3]


async def test_disconnect_releases_everything(kernel: capbus.Kernel, new_peer: PeerFactory) -> None:
    a = await new_peer()
    b = await new_peer()
    node = await a.create_node()
    await a.transfer(node, b)
    await b.create_node()
    await a.aclose()
    await b.aclose()
    with trio.fail_after(5):
        stats = await wait_for_statistics(kernel, lambda s: s.peers == 0)
    assert (stats.nodes, stats.handles, stats.queued_messages) == (0, 0, 0)


async def test_release_many_references_at_once(new_peer: PeerFactory) -> None:
    owner = await new_peer()
    holder = await new_peer()
    node = await owner.create_node()
    for _ in range(5):
        held = await owner.transfer(node, holder)
    assert (await holder.handle_state(held)).references == 5
    assert (await owner.handle_state(node)).holders == 1
    with pytest.raises(capbus.InvalidArgument):
        await holder.release(held, 6)  # more than held: nothing happens
    assert (await holder.handle_state(held)).references == 5
    await holder.release(held, 4)
    assert_queue_empty(owner)
    await holder.release(held, 1)
    assert (await recv_kind(owner, RELEASED)).destination == node
    assert (await owner.handle_state(node)).holders == 0
    # The owner's pin cannot go in a batch either, until the node is destroyed.
    await owner.send(node, b"", handles=[node])
    await recv_kind(owner, DATA)
    with pytest.raises(capbus.HandleBusy):
        await owner.release(node, 2)
    await owner.release(node, 1)
    await owner.destroy(node)
    await owner.release(node, 1)
    with pytest.raises(capbus.NoSuchHandle):
        await owner.release(node, 1)
