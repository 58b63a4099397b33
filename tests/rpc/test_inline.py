"""Handlers written as plain functions run inline in the receive loop (server.py), and keep
every promise async handlers make: results and errors, capabilities in results, E-order
against async handlers that arrived first, and an answer for every call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc import errors, protocol
from capbus.rpc.vat import Vat, open_vat

from .services import CounterServer, schema

METHODS = schema.Factory.interface.methods


class InlineFactory(schema.Factory.Server):  # type: ignore[misc,name-defined]
    """echo, fail, newCounter and same as plain functions; slow stays async."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.slow_started = trio.Event()
        self.release_slow = trio.Event()
        self.kept: Any = None
        self.vat: Any = None  # the vat serving it (set by the fixture)

    def echo(self, text: str) -> str:
        self.log.append(text)
        return text

    def fail(self, kind: str) -> None:
        if kind == "overloaded":
            raise errors.Overloaded("inline and too busy")
        raise KeyError(kind)

    async def slow(self) -> None:
        self.log.append("slow")
        self.slow_started.set()
        await self.release_slow.wait()

    def newCounter(self) -> CounterServer:
        return CounterServer()  # a new object: its node is made on the way out

    def same(self, cap: Any) -> Any:
        if cap is None:
            return self.kept  # a capability kept from an earlier call
        self.kept = cap
        return cap

    def sum(self, counters: list[Any]) -> Any:
        async def later() -> int:  # a plain function may still hand back an awaitable
            total = 0
            for counter in counters:
                total += (await counter.increment(by=0)).value
            return total

        return later()


async def inline_pair(kernel: capbus.Kernel) -> AsyncIterator[tuple[InlineFactory, Vat, Any]]:
    server_peer = await kernel.connect()
    client_peer = await kernel.connect()
    async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
        server = InlineFactory()
        server.vat = server_vat
        node = await server_vat.export(server)
        handle = await server_peer.transfer(node, client_peer)
        yield server, client_vat, client_vat.client(handle, schema.Factory)
    await server_peer.aclose()
    await client_peer.aclose()


@pytest.fixture
async def inline(kernel: capbus.Kernel) -> AsyncIterator[tuple[InlineFactory, Vat, Any]]:
    async for made in inline_pair(kernel):
        yield made


def test_plain_functions_are_told_apart_from_async_ones() -> None:
    server = InlineFactory()
    assert server._runs_inline(METHODS["echo"]) and server._runs_inline(METHODS["sum"])
    assert not server._runs_inline(METHODS["slow"])


async def test_inline_handlers_return_results_and_errors(inline: tuple[InlineFactory, Vat, Any]) -> None:
    server, _, factory = inline
    with trio.fail_after(10):
        assert (await factory.echo("inline")).text == "inline"
        with pytest.raises(errors.Overloaded, match="inline and too busy"):
            await factory.fail("overloaded")
        with pytest.raises(errors.Failed, match="KeyError"):
            await factory.fail("other")
        assert server.log == ["inline"]


async def test_inline_handlers_return_capabilities(inline: tuple[InlineFactory, Vat, Any]) -> None:
    _, _, factory = inline
    with trio.fail_after(10):
        counter = (await factory.newCounter()).counter
        assert (await counter.increment(by=3)).value == 3
        assert (await factory.same(counter)).cap is counter  # identity holds
        assert (await factory.sum([counter, counter])).total == 6  # the awaitable case


async def test_an_inline_call_does_not_overtake_an_async_one(inline: tuple[InlineFactory, Vat, Any]) -> None:
    """E-order: slow (async) arrives first, echo (inline) second, in one burst: slow must
    start first, although echo could run at once while slow's task has not run yet."""
    server, _, factory = inline
    server_vat = server.vat
    node = next(iter(server_vat.engine.exports))
    events = []
    for method, params in ((METHODS["slow"], {}), (METHODS["echo"], {"text": "after slow"})):
        call = protocol.encode_call(0, method, params, oneway=True)
        message = capbus.Message(
            capbus.MessageKind.DATA, capbus.Handle(server_vat.peer, node), memoryview(call.payload)
        )
        events.extend(server_vat.engine.receive(message))
    for event in events:  # one burst, as when both arrive in one read
        server_vat._handle(event)
    with trio.fail_after(10):
        await server.slow_started.wait()
        server.release_slow.set()
        assert (await factory.echo("last")).text == "last"
    assert server.log == ["slow", "after slow", "last"]


async def test_results_that_cannot_be_sent_reach_the_caller_as_an_error(
    inline: tuple[InlineFactory, Vat, Any],
) -> None:
    """A handler returns a capability whose object is gone: the caller gets Disconnected
    instead of waiting forever for a return that was never sent."""
    server, client_vat, factory = inline
    counter = client_vat.local(CounterServer())
    with trio.fail_after(10):
        assert (await factory.same(counter)).cap is counter  # the server keeps a client of it
        node = client_vat.engine.export_node(counter.server)
        assert node is not None
        await client_vat.peer.destroy(node)  # the object is gone for everyone
        with pytest.raises(errors.Disconnected):
            await server.kept.increment(by=0)  # the server now knows
        with pytest.raises(errors.Disconnected):
            await factory.same(None)  # returns the gone capability
        assert (await factory.echo("still serving")).text == "still serving"
