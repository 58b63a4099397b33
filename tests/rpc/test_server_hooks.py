"""What a server's author can rely on: ``on_released`` when the last other peer lets go of
the object (a subscription can stop itself), and a cancelled ``await promise`` cancelling
the callee's handler even while the promise object lives on."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import capbus
from capbus.rpc import errors
from capbus.rpc.vat import open_vat

from .hostile import until
from .services import CounterServer, FactoryServer, Pair, schema

TIMEOUT = 10


class WatchedCounter(CounterServer):
    def __init__(self) -> None:
        super().__init__()
        self.released = trio.Event()
        self.times = 0

    async def on_released(self) -> None:
        self.times += 1
        self.released.set()


class WatchingFactory(FactoryServer):
    def __init__(self) -> None:
        super().__init__()
        self.made: list[WatchedCounter] = []

    async def newCounter(self) -> WatchedCounter:
        self.made.append(WatchedCounter())
        return self.made[-1]


async def test_on_released_when_the_last_client_lets_go_or_its_peer_goes(kernel: capbus.Kernel) -> None:
    server_peer, first, second = await kernel.connect(), await kernel.connect(), await kernel.connect()
    factory_server = WatchingFactory()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(first) as first_vat:
            node = await server_vat.export(factory_server)
            factory = first_vat.client(await server_peer.transfer(node, first), schema.Factory)
            with trio.fail_after(TIMEOUT):
                counter = (await factory.newCounter()).counter
                assert (await counter.increment(by=2)).value == 2
                (watched,) = factory_server.made
                assert not watched.released.is_set()
                await counter.aclose()  # the last (only) client lets go
                await watched.released.wait()
                assert watched.times == 1
                async with open_vat(second) as second_vat:  # a peer that goes away holding one
                    other = second_vat.client(await server_peer.transfer(node, second), schema.Factory)
                    held = (await other.newCounter()).counter
                    assert (await held.increment(by=1)).value == 1
                await second.aclose()
                await factory_server.made[1].released.wait()
                assert factory_server.made[1].times == 1
    finally:
        for peer in (server_peer, first, second):
            await peer.aclose()


async def test_an_exception_in_on_released_is_logged_and_the_vat_goes_on(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    class Failing(CounterServer):
        def on_released(self) -> None:
            raise RuntimeError("the hook's own bug")

    class Making(FactoryServer):
        async def newCounter(self) -> Any:
            return Failing()

    node = await pair.server_vat.export(Making())
    peer = pair.client_vat.peer
    with trio.fail_after(TIMEOUT):
        handle = await pair.server_vat.peer.transfer(node, peer)
        making = pair.client_vat.client(handle, schema.Factory)
        counter = (await making.newCounter()).counter
        await counter.aclose()
        await until(lambda: any("on_released raised" in r.getMessage() for r in caplog.records))
        assert (await pair.factory.echo(text="still serving")).text == "still serving"


async def test_a_cancelled_await_of_a_held_promise_cancels_the_handler(pair: Pair) -> None:
    promise = await pair.factory.slow.send()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def wait() -> None:
                with scope:
                    await promise

            nursery.start_soon(wait)
            await pair.server.slow_started.wait()
            scope.cancel()
        await pair.server.slow_cancelled.wait()  # the callee's handler was cancelled
        with pytest.raises(errors.Failed, match="canceled by its caller"):
            await promise  # (still referenced here all along)
        assert (await pair.factory.echo(text="after")).text == "after"
