"""What all callers of one uid may take of a vat together. A caller is a peer connection
(the kernel attests it), and a uid can connect many peers, up to the kernel's
peers_per_user: without a bound per uid, each connection would bring a fresh share of every
per-caller bound (handler slots, queued calls, objects handed out, kept answers, pipelined
calls waiting). Peers of this process are all root's, each a caller of its own: the tests
below use several of them as one uid's connections, and one attacker of another uid in a
process of its own shows that such a uid leaves the others served."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc import errors
from capbus.rpc.vat import Vat, open_vat

from .hostile import TIMEOUT, until
from .processes import attacker_process
from .services import FactoryServer, schema

NOBODY = 65534


@asynccontextmanager
async def one_uid(
    kernel: capbus.Kernel, connections: int, **options: int
) -> AsyncIterator[tuple[FactoryServer, Vat, list[Any]]]:
    """A factory server with ``options``, and ``connections`` clients of it, each on a peer
    connection of its own (all root's: one uid)."""
    async with AsyncExitStack() as stack:
        server_peer = await kernel.connect()
        stack.push_async_callback(server_peer.aclose)
        server_vat = await stack.enter_async_context(open_vat(server_peer, **options))
        server = FactoryServer()
        node = await server_vat.export(server)
        clients = []
        for _ in range(connections):
            peer = await kernel.connect()
            stack.push_async_callback(peer.aclose)
            vat = await stack.enter_async_context(open_vat(peer))
            clients.append(vat.client(await server_peer.transfer(node, peer), schema.Factory))
        yield server, server_vat, clients


async def outcome(call: Any) -> Any:
    try:
        return await call
    except errors.RpcError as error:
        return error


def assert_uid_refused(error: object) -> None:
    assert isinstance(error, errors.Overloaded), error
    assert "uid" in error.reason, error.reason


async def test_a_uids_connections_share_its_handler_slots(kernel: capbus.Kernel) -> None:
    """max_calls_per_caller=1, uid_share=2: two of one uid's handlers run at once, however
    many connections it has; the third waits for one of them to end."""
    async with one_uid(kernel, 3, max_calls_per_caller=1, uid_share=2) as (server, server_vat, clients):
        server.release_slow = trio.Event()
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(client.slow)
                await until(lambda: server.running == 2 and server_vat.statistics().queued == 1)
                server.release_slow.set()
            assert server.most_running == 2


async def test_a_uids_connections_share_its_queue(kernel: capbus.Kernel) -> None:
    """max_calls_per_caller=1, max_queued_calls=2, uid_share=2: the uid runs 2 handlers and
    may have 4 calls waiting over all its connections; a fifth connection's first call is
    refused, naming the uid."""
    async with one_uid(kernel, 5, max_calls_per_caller=1, max_queued_calls=2, uid_share=2) as (
        server,
        server_vat,
        clients,
    ):
        server.release_slow = trio.Event()
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for client in clients[:2]:
                    nursery.start_soon(client.slow)
                await until(lambda: server.running == 2)
                for client in clients[2:4]:
                    for _ in range(2):
                        nursery.start_soon(client.slow)
                await until(lambda: server_vat.statistics().queued == 4)
                assert_uid_refused(await outcome(clients[4].slow()))
                server.release_slow.set()
            assert (await clients[4].echo("served once the others are done")).text.startswith("served")


async def test_a_uids_connections_share_its_objects(kernel: capbus.Kernel) -> None:
    """max_exports_per_caller=2, uid_share=2: one uid may hold 4 objects of the vat over
    all its connections; once it lets one go, it may be given one again."""
    async with one_uid(kernel, 3, max_exports_per_caller=2, uid_share=2) as (server, server_vat, clients):
        with trio.fail_after(TIMEOUT):
            held = [(await client.newCounter()).counter for client in clients[:2] for _ in range(2)]
            assert_uid_refused(await outcome(clients[2].newCounter()))
            exports = server_vat.statistics().exports
            await held.pop().aclose()
            await until(lambda: server_vat.statistics().exports < exports)
            counter = (await clients[2].newCounter()).counter
            assert (await counter.increment(by=3)).value == 3


async def test_a_uids_connections_share_its_kept_answers(kernel: capbus.Kernel) -> None:
    """One kept answer per caller, uid_share=2: a third connection's answer is not kept, so
    a call pipelined on it fails (as past the per-caller bound), while the first two work."""
    async with one_uid(kernel, 3, uid_share=2) as (server, server_vat, clients):
        server_vat.engine.max_kept_per_caller = 1
        with trio.fail_after(TIMEOUT):
            promises = [await client.newCounter.send() for client in clients]
            for promise in promises:
                await promise
            for promise in promises[:2]:
                assert (await promise.counter.increment(by=1)).value == 1
            refused = await outcome(promises[2].counter.increment(by=1))
            assert isinstance(refused, errors.Failed) and "no answer" in refused.reason, refused


async def test_a_uids_connections_share_its_pipelining_budget(kernel: capbus.Kernel) -> None:
    """max_queued_calls=1 (one pipelined call of a caller may wait), uid_share=2: a third
    connection's pipelined call on an answer not given yet is refused, naming the uid."""
    async with one_uid(kernel, 3, max_queued_calls=1, uid_share=2) as (server, server_vat, clients):
        server.gate = trio.Event()  # newCounter waits: calls pipelined on it wait too
        with trio.fail_after(TIMEOUT):
            promises = [await client.newCounter.send() for client in clients]
            results: list[Any] = [None] * 3
            async with trio.open_nursery() as nursery:

                async def pipelined(index: int) -> None:
                    results[index] = await outcome(promises[index].counter.increment(by=index + 1))

                for index in range(2):
                    nursery.start_soon(pipelined, index)
                await until(lambda: server_vat.engine.waiting_calls == 2)
                await pipelined(2)
                server.gate.set()
            assert [r.value for r in results[:2]] == [1, 2]
            assert_uid_refused(results[2])


async def test_a_uid_with_many_connections_leaves_other_uids_served(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    """An attacker of another uid, in a process of its own, connects 6 peers of its uid and
    calls a never-ending method on each, with max_calls_per_caller=1: its uid runs 4
    handlers (uid_share=4) and its other calls wait, while a root caller's calls run."""
    async with one_uid(kernel, 1, max_calls_per_caller=1) as (server, server_vat, (honest,)):
        server_peer = server_vat.peer
        node = await server_vat.export(server)
        attack = """
        async def attack(peer, report, target):
            async def call(sock):
                async with capbus.Peer.from_socket(sock.detach()) as extra, open_vat(extra) as vat:
                    handle = (await extra.take_seed()).handles[0]
                    await vat.client(handle, schema.Factory).slow()

            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(call, await peer.create_peer(handles=[target]))
                await report("connected")
                await trio.sleep_forever()
        """
        server.release_slow = trio.Event()
        with trio.fail_after(TIMEOUT):
            async with attacker_process(kernel, tmp_path, attack, server_peer, [node], user=NOBODY) as report:
                assert report == "connected"
                await until(lambda: server.running == 4 and server_vat.statistics().queued == 2)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(honest.slow)
                    await until(lambda: server.running == 5)  # (its one slot: max_calls_per_caller)
                    server.release_slow.set()
                assert (await honest.echo("served")).text == "served"


@pytest.mark.parametrize("share", [1, 3])
async def test_uid_share_scales_every_bound(kernel: capbus.Kernel, share: int) -> None:
    """uid_share callers' worth of objects, no more (and uid_share=1: a uid is one caller)."""
    async with one_uid(kernel, share + 1, max_exports_per_caller=1, uid_share=share) as (_, _vat, clients):
        with trio.fail_after(TIMEOUT):
            kept = [(await client.newCounter()).counter for client in clients[:share]]
            assert len(kept) == share
            assert_uid_refused(await outcome(clients[share].newCounter()))
