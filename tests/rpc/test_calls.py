"""Calls through the vat between two peers on a real kernel: returns, exceptions,
capabilities in params and results, identity, inheritance, disconnection, cancellation,
one-way calls and distributed GC of exports."""

from __future__ import annotations

import pytest
import trio

import capbus
from capbus.rpc import errors, protocol
from capbus.rpc.vat import SPARE_NODES, Vat, open_vat
from capbus.testing import wait_for_statistics

from .services import CounterServer, FactoryServer, Pair, made, made_nodes, schema

ECHO = schema.Factory.interface.methods["echo"]


async def test_call_and_return(pair: Pair) -> None:
    with trio.fail_after(10):
        results = await pair.factory.echo("hello")
        assert results.text == "hello"
        assert (await pair.factory.echo(text="again")).text == "again"


async def test_exceptions_keep_their_type_and_message(pair: Pair) -> None:
    with trio.fail_after(10):
        with pytest.raises(errors.Overloaded, match="too busy to answer"):
            await pair.factory.fail("overloaded")
        with pytest.raises(errors.Failed, match="ValueError: a bug in the server"):
            await pair.factory.fail("other")
        counter = (await pair.factory.newCounter()).counter
        # A method the server's interface does not have: call Factory.same on a Counter.
        with pytest.raises(errors.Unimplemented):
            await pair.client_vat.call(counter, schema.Factory.interface.methods["same"], {})
        assert (await pair.factory.echo("still serving")).text == "still serving"


async def test_capabilities_in_results_and_params_keep_identity(pair: Pair) -> None:
    with trio.fail_after(10):
        counter = (await pair.factory.newCounter()).counter
        assert (await counter.increment(by=2)).value == 2
        assert (await counter.increment(by=3)).value == 5
        back = (await pair.factory.same(cap=counter)).cap
        assert back is counter  # the same object comes back as the same client
        other = (await pair.factory.newCounter()).counter
        assert other is not counter
        await other.increment(by=10)
        assert (await pair.factory.sum(counters=[counter, other, counter])).total == 20


async def test_inherited_methods(pair: Pair) -> None:
    assert pair.factory.interface.implements(schema.Echo.interface.id)
    with trio.fail_after(10):
        assert (await pair.factory.echo("via Echo")).text == "via Echo"


async def test_cancelling_the_caller_cancels_the_handler(pair: Pair) -> None:
    with trio.move_on_after(0.5) as scope:  # the caller's timeout, not a synchronisation
        await pair.factory.slow()
    assert scope.cancelled_caught
    with trio.fail_after(10):
        await pair.server.slow_started.wait()
        await pair.server.slow_cancelled.wait()
        assert (await pair.factory.echo("after")).text == "after"


async def test_dead_server_disconnects_pending_and_later_calls(kernel: capbus.Kernel) -> None:
    server_peer = await kernel.connect()
    client_peer = await kernel.connect()
    server = FactoryServer()
    async with open_vat(client_peer) as client_vat:
        async with open_vat(server_peer) as server_vat:
            node = await server_vat.export(server)
            factory = client_vat.client(await server_peer.transfer(node, client_peer), schema.Factory)

        async def call_slow() -> None:
            with pytest.raises(errors.Disconnected):
                await factory.slow()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call_slow)
                await server_peer.aclose()  # the server dies with the call in flight
        with trio.fail_after(10), pytest.raises(errors.Disconnected):
            await factory.echo("anyone?")
    await client_peer.aclose()


async def test_oneway_call_runs_without_a_return(pair: Pair) -> None:
    with trio.fail_after(10):
        await pair.factory.echo.oneway("fire and forget")
        await pair.server.heard_event.wait()
        assert pair.server.heard == ["fire and forget"]
        assert pair.server_vat.statistics().answers == 0


async def test_exports_are_collected_when_no_one_holds_them(pair: Pair) -> None:
    with trio.fail_after(10):
        await pair.factory.echo("warm up")  # the client's reply node for the factory is made
        vats = (pair.server_vat, pair.client_vat)
        before = made_nodes(pair.kernel.statistics(), *vats)
        for _ in range(20):
            counter = (await pair.factory.newCounter()).counter
            await counter.increment(by=1)
            await counter.aclose()
            del counter
        # Every counter's node is retired (destroyed, or kept as a spare) once its only
        # client let go.
        await wait_for_statistics(pair.kernel, lambda s: made_nodes(s, *vats) == before)
        assert made_nodes(pair.kernel.statistics(), *vats) == before
        assert pair.server_vat.statistics().exports == 1  # only the factory


async def test_capability_passing_leaves_nothing_behind(pair: Pair) -> None:
    """Distributed GC, checked with the kernel's own counts: after many calls that pass
    capabilities both ways (new servers exported by the caller, called back by the callee;
    new servers returned by the callee and dropped), no node or handle is left over."""
    with trio.fail_after(60):
        await pair.factory.echo("warm up")
        # The factory; each vat's first reply node; the client's reply node for the factory.
        vats = (pair.server_vat, pair.client_vat)
        start = made(pair.kernel.statistics(), *vats)
        assert start[0] == 4
        for i in range(500):
            # The caller exports a fresh counter; the server calls back into it.
            assert (await pair.factory.sum(counters=[CounterServer()])).total == 0
            # The server exports a fresh counter; the caller uses it and lets it go.
            counter = (await pair.factory.newCounter()).counter
            assert (await counter.increment(by=i)).value == i
            del counter
        # Settled: back to those nodes, their owners' handles, the client's handle to the
        # factory and the server's to the client's reply node for it (a callee keeps its
        # recent callers' reply handles, to release references in batches). The reply
        # nodes made for each counter called went with the counter. Nothing else.
        await wait_for_statistics(pair.kernel, lambda s: made(s, *vats) == start)
    assert made(pair.kernel.statistics(), *vats) == (4, 6)
    assert pair.server_vat.statistics().exports == 1
    assert pair.client_vat.statistics().exports == 0
    assert pair.client_vat.statistics().imports == 1  # the factory


async def test_many_concurrent_calls_on_one_client(pair: Pair) -> None:
    answers: dict[int, str] = {}

    async def ask(i: int) -> None:
        answers[i] = (await pair.factory.echo(f"call {i}")).text

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(ask, i)
    assert answers == {i: f"call {i}" for i in range(200)}


async def test_the_server_bounds_how_many_calls_run_at_once(kernel: capbus.Kernel) -> None:
    server_peer = await kernel.connect()
    client_peer = await kernel.connect()
    server = FactoryServer()
    server.release_slow = trio.Event()
    async with (
        open_vat(server_peer, max_concurrent_calls=3) as server_vat,
        open_vat(client_peer) as client_vat,
    ):
        node = await server_vat.export(server)
        factory = client_vat.client(await server_peer.transfer(node, client_peer), schema.Factory)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(factory.slow)
                while server.running < 3:
                    await trio.sleep(0.001)  # bounded by fail_after: waiting for the first three
                # More calls are waiting at the server, but only three handlers run.
                await pair_settles(server_vat)
                assert server.running == 3
                server.release_slow.set()
        assert server.most_running == 3
    await server_peer.aclose()
    await client_peer.aclose()


async def test_calls_past_the_queue_bound_are_refused_overloaded(kernel: capbus.Kernel) -> None:
    """One handler runs, two calls may wait; the rest of a burst is answered Overloaded at
    once, and every call gets exactly one answer."""
    server_peer = await kernel.connect()
    client_peer = await kernel.connect()
    server = FactoryServer()
    server.release_slow = trio.Event()
    async with (
        open_vat(server_peer, max_concurrent_calls=1, max_queued_calls=2) as server_vat,
        open_vat(client_peer) as client_vat,
    ):
        node = await server_vat.export(server)
        factory = client_vat.client(await server_peer.transfer(node, client_peer), schema.Factory)
        outcomes: list[str] = []

        async def call() -> None:
            try:
                await factory.slow()
                outcomes.append("done")
            except errors.Overloaded as error:
                assert "calls are already waiting here" in error.reason
                outcomes.append("overloaded")

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(call)
                while outcomes.count("overloaded") < 7:  # bounded by fail_after
                    await trio.sleep(0.001)
                server.release_slow.set()
        # Two waiting, one running: three at most (two, if the burst came in before the
        # first handler started, as it counts as waiting until then).
        assert len(outcomes) == 10 and outcomes.count("done") in (2, 3)
        assert server.most_running == 1
    await server_peer.aclose()
    await client_peer.aclose()


async def pair_settles(vat: Vat) -> None:
    """Waits until all ten calls have arrived at the server (its answers table has them)."""
    while vat.statistics().answers < 10:
        await trio.sleep(0.001)


async def test_calls_released_together_start_in_arrival_order(pair: Pair) -> None:
    """E-order: calls that become ready at once (pipelined calls freed by one answer, say)
    start in arrival order, although trio may run a batch of new tasks in any order."""
    vat = pair.server_vat
    node = next(iter(vat.engine.exports))
    events = []
    for i in range(50):
        call = protocol.encode_call(i, ECHO, {"text": f"{i}"}, oneway=True)
        message = capbus.Message(
            capbus.MessageKind.DATA, capbus.Handle(vat.peer, node), memoryview(call.payload)
        )
        events.extend(vat.engine.receive(message))
    for event in events:  # one burst: every handler task is spawned in the same step
        vat._handle(event)
    with trio.fail_after(20):
        while len(pair.server.heard) < 50:
            await trio.sleep(0.001)  # bounded by fail_after: one-way calls have no answer to wait on
    assert pair.server.heard == [f"{i}" for i in range(50)]


async def test_a_retired_node_serves_the_next_object_exported(pair: Pair) -> None:
    """Each call passes a new object (a counter at its own value, which the callee reads
    by calling it back): retired nodes are kept as spares and reused for the next objects,
    each one reaching the object it was given to, and no more nodes are made than that."""
    vats = (pair.server_vat, pair.client_vat)
    with trio.fail_after(30):
        await pair.factory.echo("warm up")
        base = pair.kernel.statistics().nodes
        most = base
        for i in range(100):
            counter = CounterServer()
            counter.value = 1000 + i
            assert (await pair.factory.sum(counters=[counter])).total == 1000 + i
            most = max(most, pair.kernel.statistics().nodes)
        assert pair.client_vat.statistics().spare_nodes > 0  # retired nodes, kept
        assert most <= base + SPARE_NODES + 2, (
            f"{most - base} more nodes for 100 objects passed one at a time"
        )
        await wait_for_statistics(pair.kernel, lambda s: made_nodes(s, *vats) == base)
        assert pair.client_vat.statistics().exports == 0
