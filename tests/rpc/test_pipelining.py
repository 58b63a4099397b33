"""Promise pipelining: calls on capabilities in results that have not arrived yet."""

from __future__ import annotations

import gc

import pytest
import trio

import capbus
from capbus.rpc import errors
from capbus.rpc.vat import open_vat
from capbus.testing import wait_for_statistics

from .services import CounterServer, FactoryServer, Pair, schema


async def test_a_pipelined_chain_is_one_round_trip(pair: Pair) -> None:
    with trio.fail_after(10):
        await pair.factory.echo("warm up")
        pair.server.gate = trio.Event()  # hold newCounter until both calls are at the server
        before = pair.kernel.statistics().messages_sent
        promise = await pair.factory.newCounter.send()
        results: list[int] = []

        async def pipelined() -> None:
            results.append((await promise.counter.increment(by=5)).value)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipelined)
            # Both calls reached the server while the first had no results yet ...
            await wait_for_statistics(pair.kernel, lambda s: s.messages_sent == before + 2)
            pair.server.gate.set()
        # ... and the chain took those two calls and their two returns: one round trip (the
        # first call's return may be written after the pipelined call's: wait for both).
        await wait_for_statistics(pair.kernel, lambda s: s.messages_sent >= before + 4)
        assert pair.kernel.statistics().messages_sent == before + 4
        assert results == [5]
        counter = (await promise).counter
        assert (await counter.increment(by=1)).value == 6  # the same object


async def test_calls_sent_on_promised_capabilities_chain_in_one_round_trip(pair: Pair) -> None:
    """send() on a promised capability gives a promise too: a chain of any length is one
    round trip."""
    with trio.fail_after(10):
        await pair.factory.echo("warm up")
        pair.server.gate = trio.Event()
        before = pair.kernel.statistics().messages_sent
        first = await pair.factory.newCounter.send()
        second = await first.counter.spawn.send()  # first's results have not arrived
        results: list[int] = []

        async def pipelined() -> None:
            results.append((await second.counter.increment(by=2)).value)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipelined)
            await wait_for_statistics(pair.kernel, lambda s: s.messages_sent == before + 3)
            pair.server.gate.set()
        await wait_for_statistics(pair.kernel, lambda s: s.messages_sent >= before + 6)
        assert pair.kernel.statistics().messages_sent == before + 6  # three calls, three returns
        assert results == [2]
        spawned = (await second).counter
        assert (await spawned.increment(by=1)).value == 3
        assert (await (await first).counter.increment(by=0)).value == 0  # a separate counter


async def test_a_oneway_call_on_a_promised_capability_runs(pair: Pair) -> None:
    with trio.fail_after(10):
        promise = await pair.factory.newCounter.send()
        await promise.counter.increment.oneway(by=3)
        counter = (await promise).counter
        assert (await counter.increment(by=0)).value == 3  # it ran first (E-order)


async def test_a_promised_capability_cannot_be_passed_before_it_exists(pair: Pair) -> None:
    with trio.fail_after(10):
        promise = await pair.factory.newCounter.send()
        with pytest.raises(ValueError, match="before its results arrive"):
            await pair.factory.same(cap=promise.counter)
        increment = promise.counter.interface.methods["increment"]
        with pytest.raises(ValueError, match="multicast"):
            await pair.client_vat.multicast([promise.counter], increment, {"by": 1})
        counter = (await promise).counter
        assert (await pair.factory.same(cap=counter)).cap is counter  # once it exists, it can


async def test_pipelining_on_a_failed_call_fails_with_its_error(pair: Pair) -> None:
    with trio.fail_after(10):
        promise = await pair.factory.same.send()  # no capability given: the result is null
        try:
            await promise.cap.increment(by=1)
        except errors.Failed as error:
            assert "null" in error.reason
        else:
            raise AssertionError("a call on a null capability succeeded")


async def test_a_pipelined_call_on_the_callers_own_object_runs_there(pair: Pair) -> None:
    """The server redirects it (rpc.capnp's Return.redirect): the caller's vat runs it."""
    with trio.fail_after(10):
        mine = CounterServer()  # lives in the client's vat
        promise = await pair.factory.same.send(cap=mine)
        assert (await promise.cap.increment(by=7)).value == 7
        assert mine.value == 7
        chained = await (await promise.cap.spawn.send()).counter.increment.send(by=2)
        assert (await chained).value == 9  # (spawn starts where the counter was)
        assert mine.value == 7
        assert pair.server_vat.statistics().questions == 0


class GatedCounter(CounterServer):
    """A counter whose spawn() waits for ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.incremented = trio.Event()

    async def spawn(self) -> CounterServer:
        await self.gate.wait()
        return await super().spawn()

    async def increment(self, by: int) -> int:
        self.incremented.set()
        return await super().increment(by)


async def test_calls_pipelined_on_another_vats_capability_go_there_from_the_caller(
    kernel: capbus.Kernel,
) -> None:
    """S returns T's counter; A pipelines on it through S. S makes none of those calls (it
    redirects them): A sends them to T itself, a promise's call again as a promise, and a
    call pipelined on that one follows it to T without waiting for its results."""
    peers = [await kernel.connect() for _ in range(3)]
    t_peer, s_peer, a_peer = peers
    async with open_vat(t_peer) as t_vat, open_vat(s_peer) as s_vat, open_vat(a_peer) as a_vat:
        t = GatedCounter()
        t_node, s_node = await t_vat.export(t), await s_vat.export(FactoryServer())
        s = a_vat.client(await s_peer.transfer(s_node, a_peer), schema.Factory)
        t_at_a = a_vat.client(await t_peer.transfer(t_node, a_peer), schema.Counter)
        with trio.fail_after(10):
            promise = await s.same.send(cap=t_at_a)
            spawned = await promise.cap.spawn.send()  # waits at T, for the gate
            incremented = await spawned.counter.increment.send(by=4)
            while not t_vat.engine.waiting_calls:  # the increment waits at T (polled, bounded)
                await trio.sleep(0.001)
            assert s_vat.statistics().questions == 0  # S called no one
            t.gate.set()
            assert (await incremented).value == 4
            assert (await (await spawned).counter.increment(by=1)).value == 5
            assert t.value == 0  # (the spawned counter took the increments)
            await promise.cap.increment.oneway(by=10)
            await t.incremented.wait()
            assert t.value == 10
            assert s_vat.statistics().questions == 0
    for peer in peers:
        await peer.aclose()


async def test_finish_frees_the_kept_results(pair: Pair) -> None:
    with trio.fail_after(10):
        promise = await pair.factory.newCounter.send()
        await promise
        assert pair.server_vat.statistics().answers == 1  # kept for pipelining
        del promise
        gc.collect()
        while pair.server_vat.statistics().answers:
            await trio.sleep(0.001)  # bounded by fail_after; the Finish is on its way


async def test_a_call_sent_on_a_dropped_promise_is_still_answered(pair: Pair) -> None:
    """The promise a pipelined send was made on is gone (a temporary): the derived promise
    keeps it open at the callee, and the call is answered."""
    with trio.fail_after(10):
        pair.server.gate = trio.Event()
        derived = await (await pair.factory.newCounter.send()).counter.increment.send(by=1)
        gc.collect()  # no one holds the base promise but the derived one
        assert len(pair.client_vat.engine.questions) == 2  # both still open: no Finish for the base
        pair.server.gate.set()
        assert (await derived).value == 1


async def test_calls_pipelined_on_a_canceled_call_fail_rather_than_hang(pair: Pair) -> None:
    """The caller gives up on a call (Finish) while a pipelined call waits on its answer:
    that call fails with the reason, it does not wait for ever."""
    with trio.fail_after(10):
        pair.server.gate = trio.Event()
        base = await pair.factory.newCounter.send()
        pipelined = await base.counter.increment.send(by=1)
        pipelined.base = None  # drop the link: the base's Finish goes out when it is collected
        del base
        gc.collect()
        with pytest.raises(errors.Failed, match="canceled"):
            await pipelined
        pair.server.gate.set()


async def test_waiting_pipelined_calls_are_bounded(kernel: capbus.Kernel) -> None:
    """Pipelined calls waiting for an answer not yet given count against the vat's bound:
    past it they are answered Overloaded at once; the others run once the answer comes."""
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    server = FactoryServer()
    server.gate = trio.Event()
    async with open_vat(server_peer, max_queued_calls=5) as server_vat, open_vat(client_peer) as client_vat:
        node = await server_vat.export(server)
        factory = client_vat.client(await server_peer.transfer(node, client_peer), schema.Factory)
        with trio.fail_after(10):
            base = await factory.newCounter.send()
            sent = [await base.counter.increment.send(by=1) for _ in range(10)]
            outcomes: list[str] = []
            for promise in sent[5:]:  # the last five came in past the bound
                with pytest.raises(errors.Overloaded, match="pipelined calls are already waiting"):
                    await promise
                outcomes.append("overloaded")
            server.gate.set()
            values = sorted([(await promise).value for promise in sent[:5]])
            assert values == [1, 2, 3, 4, 5] and outcomes == ["overloaded"] * 5
            assert server_vat.engine.waiting_calls == 0
    for peer in (server_peer, client_peer):
        await peer.aclose()


async def test_answers_kept_for_one_caller_are_bounded(pair: Pair) -> None:
    """A caller that never sends Finish cannot make the callee keep its results without
    end: past the bound, answers are not kept (pipelining on them fails), and the rest of
    its calls are still served."""
    pair.server_vat.engine.max_kept_per_caller = 3
    with trio.fail_after(10):
        promises = [await pair.factory.newCounter.send() for _ in range(5)]
        for promise in promises:
            await promise
        assert pair.server_vat.statistics().answers == 3
        assert (await promises[2].counter.increment(by=1)).value == 1  # kept: pipelining works
        with pytest.raises(errors.Failed, match="no answer"):
            await promises[4].counter.increment(by=1)  # not kept


async def test_answers_go_with_their_caller(pair: Pair) -> None:
    """A caller's reply node destroyed: the callee drops what it kept for that caller."""
    with trio.fail_after(10):
        promises = [await pair.factory.newCounter.send() for _ in range(3)]
        for promise in promises:
            await promise
        assert pair.server_vat.statistics().answers == 3
        reply = pair.client_vat.engine.reply_for(pair.factory.handle)
        assert reply is not None
        await pair.client_vat.peer.destroy(reply)
        while pair.server_vat.statistics().answers:  # polled, bounded by fail_after
            await trio.sleep(0.001)
