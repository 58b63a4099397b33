"""A caller reads the peer's messages itself while it waits for its return (Vat._await_return):
everything else that arrives meanwhile is still handled, and the receive loop takes the
socket back whenever no caller reads, however the caller stops (answered, cancelled,
failed)."""

from __future__ import annotations

import pytest
import trio

import capbus
from capbus.rpc import errors
from capbus.rpc.vat import open_vat

from .services import CounterServer, FactoryServer, Pair, schema

TIMEOUT = 10


async def test_a_callback_into_the_callers_vat_is_served_while_the_caller_waits(pair: Pair) -> None:
    """sum() calls increment() on each counter it is given: on counters of the caller's own
    vat, those calls arrive while the caller waits for sum's return."""
    mine = [CounterServer(), CounterServer()]
    mine[0].value, mine[1].value = 3, 4
    with trio.fail_after(TIMEOUT):
        assert (await pair.factory.sum(counters=mine)).total == 7
        assert (await pair.factory.sum(counters=[mine[1], mine[1]])).total == 8


async def test_the_loop_serves_once_a_reading_caller_is_cancelled(kernel: capbus.Kernel) -> None:
    """A caller cancelled while it reads the socket gives it back: a call into its vat
    that comes later, while this vat makes no call, is answered."""
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    server = FactoryServer()
    counter = CounterServer()
    async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
        factory = client_vat.client(
            await server_peer.transfer(await server_vat.export(server), client_peer), schema.Factory
        )
        counter_at_server = server_vat.client(
            await client_peer.transfer(await client_vat.export(counter), server_peer), schema.Counter
        )
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                reader = trio.CancelScope()

                async def slow() -> None:
                    with reader:
                        await factory.slow()

                nursery.start_soon(slow)
                await server.slow_started.wait()  # the slow call is in: its caller reads
                reader.cancel()
            await server.slow_cancelled.wait()
            assert (await counter_at_server.increment(by=5)).value == 5
            assert counter.value == 5
            assert (await factory.echo("after")).text == "after"
    await server_peer.aclose()
    await client_peer.aclose()


async def test_calls_still_waiting_are_answered_after_the_reading_caller_is_cancelled(
    pair: Pair,
) -> None:
    """The first of several callers reads for all of them; it is cancelled before their
    returns come: they come through the receive loop."""
    pair.server.gate = trio.Event()  # newCounter() waits for it
    results: list[int] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            reader = trio.CancelScope()

            async def slow() -> None:
                with reader:
                    await pair.factory.slow()

            async def new_counter() -> None:
                counter = (await pair.factory.newCounter()).counter
                results.append((await counter.increment(by=1)).value)

            nursery.start_soon(slow)
            await pair.server.slow_started.wait()
            for _ in range(5):
                nursery.start_soon(new_counter)
            assert (await pair.factory.echo("all in")).text == "all in"  # (read by the slow caller)
            reader.cancel()
            await pair.server.slow_cancelled.wait()
            pair.server.gate.set()
    assert results == [1] * 5


async def test_many_callers_in_flight_all_get_their_returns(pair: Pair) -> None:
    texts = [f"call {i}" for i in range(64)]
    answers: dict[str, str] = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for text in texts:

                async def call(text: str = text) -> None:
                    answers[text] = (await pair.factory.echo(text)).text

                nursery.start_soon(call)
    assert answers == {text: text for text in texts}


async def test_a_reading_caller_hears_its_error_and_the_vat_goes_on(pair: Pair) -> None:
    with trio.fail_after(TIMEOUT):
        for _ in range(3):
            with pytest.raises(errors.Overloaded):
                await pair.factory.fail("overloaded")
        assert (await pair.factory.echo("still")).text == "still"
