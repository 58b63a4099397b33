"""The services the RPC tests call: a factory of counters, an echo, a slow method."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

import capbus
from capbus.rpc import errors, protocol
from capbus.rpc.vat import Vat, open_vat

schema: Any = capbus.load(Path(__file__).with_name("calls.capnp"))


class CounterServer(schema.Counter.Server):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        self.value = 0

    async def increment(self, by: int) -> int:
        self.value += by
        return self.value

    async def spawn(self) -> CounterServer:
        spawned = CounterServer()
        spawned.value = self.value
        return spawned


class FactoryServer(schema.Factory.Server):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        self.slow_started = trio.Event()
        self.slow_cancelled = trio.Event()
        self.heard: list[str] = []
        self.heard_event = trio.Event()
        self.gate = trio.Event()  # newCounter waits for it (tests close it to hold a call)
        self.gate.set()
        self.running = self.most_running = 0
        self.release_slow: trio.Event | None = None  # slow() returns once it is set

    async def echo(self, text: str) -> str:
        self.heard.append(text)
        self.heard_event.set()
        return text

    async def fail(self, kind: str) -> None:
        if kind == "overloaded":
            raise errors.Overloaded("too busy to answer")
        raise ValueError("a bug in the server")

    async def slow(self) -> None:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.slow_started.set()
        try:
            if self.release_slow is None:
                await trio.sleep_forever()
            await self.release_slow.wait()
        finally:
            self.running -= 1
            self.slow_cancelled.set()

    async def newCounter(self) -> CounterServer:
        await self.gate.wait()
        return CounterServer()

    async def same(self, cap: Any) -> Any:
        return cap

    async def sum(self, counters: list[Any]) -> int:
        total = 0
        for counter in counters:
            total += (await counter.increment(by=0)).value
        return total


@dataclass
class Pair:
    kernel: capbus.Kernel
    server: FactoryServer
    server_vat: Vat
    client_vat: Vat
    factory: Any


async def make_pair(kernel: capbus.Kernel) -> AsyncIterator[Pair]:
    """Two peers with vats; the client holds the server's factory (for the ``pair`` fixture)."""
    server_peer = await kernel.connect()
    client_peer = await kernel.connect()
    async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
        server = FactoryServer()
        node = await server_vat.export(server)
        handle = await server_peer.transfer(node, client_peer)
        yield Pair(kernel, server, server_vat, client_vat, client_vat.client(handle, schema.Factory))
    await server_peer.aclose()
    await client_peer.aclose()


async def next_call(peer: capbus.Peer) -> tuple[capbus.Message, protocol.ReceivedCall]:
    """The next call a bare peer (playing a hostile callee) receives, skipping the rest."""
    while True:
        message = await peer.recv()
        if message.kind is capbus.MessageKind.DATA:
            call = protocol.decode(message.payload_view, list(range(len(message.handles))))
            if isinstance(call, protocol.ReceivedCall):
                return message, call


def made(stats: capbus.KernelStatistics, *vats: Vat) -> tuple[int, int]:
    """The kernel's node and handle counts less the vats' spare nodes (retired ones kept for
    the next objects exported, each with its owner's handle): what the calls so far have
    left."""
    spare = sum(vat.statistics().spare_nodes for vat in vats)
    return stats.nodes - spare, stats.handles - spare


def made_nodes(stats: capbus.KernelStatistics, *vats: Vat) -> int:
    """The node count of :func:`made`."""
    return made(stats, *vats)[0]
