"""Introspection (issue 13, part 3, the kernel's side): CAPBUS_CMD_SNAPSHOT writes the whole
object model, at one instant, into a sealed memfd, for a peer holding a handle to a live
monitor node. On an embedded kernel and on a daemon; the picture is asserted, not looked at."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest
import trio

import capbus
from capbus.snapshot import NodeFlags, PeerFlags, decode

from .conftest import Connect

TIMEOUT = 30


async def serials(watcher: capbus.Peer, *peers: capbus.Peer) -> list[int]:
    """The kernel's serial of each of ``peers``: the ``peer`` of their messages' metadata."""
    await watcher.want_metadata()
    inbox = await watcher.create_node()
    found, handed = [], []
    for peer in peers:
        handed.append(await watcher.transfer(inbox, peer))
        await peer.send(handed[-1], b"me")
        message = await watcher.recv()
        assert message.sender is not None
        found.append(message.sender.peer)
    await watcher.destroy(inbox, release=True)
    for peer, handle in zip(peers, handed, strict=True):
        await peer.recv()  # (its NODE_DESTROYED)
        await peer.release(handle)
    await watcher.want_metadata(False)
    return found


async def test_a_snapshot_shows_who_owns_and_holds_what(connect: Connect) -> None:
    watcher, service, client, other = [await connect() for _ in range(4)]
    monitor = await watcher.create_monitor()
    api = await service.create_node()
    callback = await client.create_node()
    client_api = await service.transfer(api, client)
    await service.transfer(api, other)
    await client.transfer(callback, service)
    with trio.fail_after(TIMEOUT):
        service_serial, client_serial, other_serial = await serials(watcher, service, client, other)
        await other.hold_messages()
        to_other_node = await other.create_node()
        to_other = await other.transfer(to_other_node, client)
        await client.send(to_other, b"held for other", priority=2)
        await client.send(client_api, b"to the service")
        await service.recv()
        snapshot = await watcher.snapshot(monitor)

    assert (
        snapshot.you not in (service_serial, client_serial, other_serial) and snapshot.you in snapshot.peers
    )

    api_node = next(n for n in snapshot.owned_by(service_serial))
    assert snapshot.holders_of(api_node.serial) == sorted([client_serial, other_serial])
    assert api_node.holders == 2 and api_node.flags == NodeFlags(0)
    callback_node = snapshot.owned_by(client_serial)[0]
    assert snapshot.holders_of(callback_node.serial) == [service_serial]
    assert [h.node for h in snapshot.held_by(client_serial)] == sorted(
        [api_node.serial, snapshot.owned_by(other_serial)[0].serial]
    )
    held = {h.node: h.id for h in snapshot.held_by(client_serial)}
    assert held[api_node.serial] == client_api.id  # (the id the holder knows it by)
    monitor_node = snapshot.owned_by(snapshot.you)[0]
    assert monitor_node.monitor and snapshot.holders_of(monitor_node.serial) == []

    other_status = snapshot.peers[other_serial]
    assert PeerFlags.HOLD in other_status.flags
    assert other_status.queued == 1 and other_status.queued_messages == 1
    assert other_status.queued_bytes == len(b"held for other")
    client_status = snapshot.peers[client_serial]
    assert client_status.sent_messages == 3  # (and its b"me" to the watcher)
    assert client_status.sent_bytes == len(b"held for other") + len(b"to the service") + len(b"me")
    service_status = snapshot.peers[service_serial]
    assert service_status.received_messages == 1 and service_status.received_bytes == len(b"to the service")
    assert service_status.nodes == 1 and service_status.handles == 2  # its node and the callback
    info = await client.info()
    assert client_status.uid == info.uid and client_status.pid == info.pid
    user = snapshot.users[info.uid]
    assert user.peers >= 4 and user.handles >= len(snapshot.handles)
    assert snapshot.messages_sent >= 2 and snapshot.limits.peer_messages > 0


async def test_snapshots_follow_the_global_order(connect: Connect) -> None:
    watcher, alice, bob = [await connect() for _ in range(3)]
    monitor = await watcher.create_monitor()
    with trio.fail_after(TIMEOUT):
        before = await watcher.snapshot(monitor)
        node = await bob.create_node()
        await bob.transfer(node, alice)
        await bob.send(await alice.transfer(await alice.create_node(), bob), b"x")
        after = await watcher.snapshot(monitor)
    assert after.seq > before.seq
    assert len(after.handles) == len(before.handles) + 4  # two nodes, each held once
    assert len(after.nodes) == len(before.nodes) + 2


async def test_a_node_let_go_by_its_owner_is_still_listed_while_held(connect: Connect) -> None:
    watcher, owner, holder = [await connect() for _ in range(3)]
    monitor = await watcher.create_monitor()
    node = await owner.create_node()
    held = await owner.transfer(node, holder)
    with trio.fail_after(TIMEOUT):
        await owner.destroy(node, release=True)
        await holder.recv()  # (its NODE_DESTROYED)
        snapshot = await watcher.snapshot(monitor)
    orphans = [n for n in snapshot.nodes.values() if n.owner == 0]
    assert len(orphans) == 1 and orphans[0].destroyed
    (holding,) = [h for h in snapshot.handles if h.node == orphans[0].serial]
    assert holding.id == held.id and not holding.owner


async def test_only_a_holder_of_a_live_monitor_node_may_ask(connect: Connect) -> None:
    owner, delegate, stranger = [await connect() for _ in range(3)]
    monitor = await owner.create_monitor()
    plain = await owner.create_node()
    with trio.fail_after(TIMEOUT):
        with pytest.raises(capbus.errors.InvalidArgument):
            await owner.snapshot(plain)
        with pytest.raises(capbus.errors.NoSuchHandle):
            await stranger.snapshot(monitor.id)  # (another peer's id is nothing here)
        passed = await owner.transfer(monitor, delegate)
        snapshot = await delegate.snapshot(passed)  # (the capability, handed on)
        assert snapshot.you != (await owner.snapshot(monitor)).you
        await owner.destroy(monitor)  # (revoked)
        with pytest.raises(capbus.errors.AlreadyDestroyed):
            await delegate.snapshot(passed)
        with pytest.raises(capbus.errors.AlreadyDestroyed):
            await owner.snapshot(monitor)


async def test_the_snapshot_is_a_sealed_memfd_and_costs_no_lasting_fd() -> None:
    async with capbus.open_kernel() as kernel:
        peer = await kernel.connect()
        await kernel.grant_monitor(peer)
        monitor = await peer.create_monitor()
        baseline = kernel.statistics().fds_held
        with trio.fail_after(TIMEOUT):
            for _ in range(50):
                reply = await peer._call(
                    capbus.peer._wire.CMD_SNAPSHOT, capbus.peer._wire.U64.pack(monitor.id)
                )
                (fd,) = reply.fds
                try:
                    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                    assert (
                        seals & fcntl.F_SEAL_WRITE
                        and seals & fcntl.F_SEAL_SHRINK
                        and seals & fcntl.F_SEAL_SEAL
                    )
                    with open(fd, "rb", closefd=False) as file:
                        assert decode(file.read()).you
                finally:
                    os.close(fd)
        assert kernel.statistics().fds_held == baseline
        await peer.aclose()


async def test_kernel_snapshot_leaves_out_the_peer_it_asks_through() -> None:
    async with capbus.open_kernel() as kernel:
        alice, bob = await kernel.connect(), await kernel.connect()
        node = await alice.create_node()
        await alice.transfer(node, bob)
        with trio.fail_after(TIMEOUT):
            snapshot = await kernel.snapshot()
        assert len(snapshot.peers) == 2 and len(snapshot.nodes) == 1 and len(snapshot.handles) == 2
        assert snapshot.you not in snapshot.peers
        (edge,) = list(snapshot.edges())
        assert snapshot.nodes[edge[1]].owner != edge[0]
        await alice.aclose()
        await bob.aclose()


async def test_a_large_bus_is_counted_whole(connect: Connect) -> None:
    watcher = await connect()
    monitor = await watcher.create_monitor()
    peers = [await connect() for _ in range(20)]
    with trio.fail_after(TIMEOUT):
        nodes = [await peer.create_node() for peer in peers for _ in range(10)]
        for index, node in enumerate(nodes):
            owner = peers[index // 10]
            for other in peers[:5]:
                if other is not owner:
                    await owner.transfer(node, other)
        snapshot = await watcher.snapshot(monitor)
    ours = [n for n in snapshot.nodes.values() if n.owner != snapshot.you]
    assert len(ours) == 200
    held = [h for h in snapshot.handles if not h.owner and h.peer != snapshot.you]
    assert len(held) == sum(n.holders for n in ours)
    assert len(held) == 200 * 5 - 50  # (five holders each, less the owner among the first five)


async def test_tasks_of_one_peer_asking_at_once_all_get_their_snapshot(connect: Connect) -> None:
    watcher = await connect()
    monitor = await watcher.create_monitor()
    taken: list[int] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for _ in range(8):

                async def take() -> None:
                    taken.append((await watcher.snapshot(monitor)).seq)

                nursery.start_soon(take)
    assert len(taken) == 8  # (none refused EBUSY: one peer's asks go one at a time)


async def test_a_pipeline_of_snapshots_gets_one_and_busy_for_the_rest() -> None:
    async with capbus.open_kernel() as kernel:
        watcher = await kernel.connect()
        await kernel.grant_monitor(watcher)
        monitor = await watcher.create_monitor()
        with trio.fail_after(TIMEOUT):
            replies = []
            async with trio.open_nursery() as nursery:
                for _ in range(5):

                    async def raw_ask() -> None:
                        try:
                            reply = await watcher._call(
                                capbus.peer._wire.CMD_SNAPSHOT, capbus.peer._wire.U64.pack(monitor.id)
                            )
                        except capbus.CapbusError as error:
                            replies.append(error.errno)
                        else:
                            for fd in reply.fds:
                                os.close(fd)
                            replies.append(0)

                    nursery.start_soon(raw_ask)
        assert replies.count(0) >= 1 and set(replies) <= {0, errno.EBUSY}
        await watcher.aclose()
