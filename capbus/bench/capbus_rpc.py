"""capbus: an embedded kernel in the runner, the server and the client each a peer of it in
their own process, calls through capbus.rpc with dynamic stubs and plain ``def`` handlers
(run inline in the server's receive loop)."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from .workloads import DATA_SIZES, PAYLOAD, data_rate, in_flight_trio, oneway_rate, round_trips, run_plan

LABEL = "capbus"
PACKAGES: dict[str, str] = {}
PROGRAMS: dict[str, str] = {}
UNSUPPORTED: dict[str, str] = {}
_LARGEST = 128 << 20
"""The server takes calls this large (the 64 MiB data call and its envelope)."""
Spawn = Callable[[dict[str, Any], list[int]], Awaitable[Any]]


def _schema() -> Any:
    import capbus
    from capbus._resources import schema_directory

    return capbus.load(os.path.join(schema_directory(), "capbus", "bench.capnp"))


@asynccontextmanager
async def sitting(spawn_server: Spawn) -> AsyncIterator[tuple[dict[str, Any], list[int]]]:
    import capbus

    async with capbus.open_kernel() as kernel, await kernel.connect() as launcher:
        inbox = await launcher.create_node()
        with await launcher.create_peer(handles=[inbox]) as server_socket:
            await spawn_server({"fd": server_socket.fileno()}, [server_socket.fileno()])
        with trio.fail_after(60):
            (handle,) = (await launcher.recv()).handles
        with await launcher.create_peer(handles=[handle]) as client_socket:
            yield {"fd": client_socket.fileno()}, [client_socket.fileno()]


def serve(config: dict[str, Any]) -> None:
    import capbus
    from capbus.rpc.vat import open_vat

    schema = _schema()

    class Bench(schema.Bench.Server):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.calls = 0

        def echo(self, text: str) -> str:
            return text

        def ping(self) -> None:
            self.calls += 1

        def take(self, cap: Any) -> None:
            self.calls += 1

        def received(self) -> int:
            return self.calls

        def data(self, data: bytes) -> int:
            return len(data)

    async def main() -> None:
        try:
            async with (
                capbus.Peer.from_socket(config["fd"]) as peer,
                open_vat(peer, max_message_bytes=_LARGEST) as vat,
            ):
                (launcher,) = (await peer.take_seed()).handles
                await peer.send(launcher, b"bench", handles=[await vat.export(Bench())])
                print("ready", flush=True)
                await trio.sleep_forever()
        except capbus.Disconnected:
            pass

    trio.run(main)


def measure(config: dict[str, Any]) -> dict[str, Any]:
    import capbus
    from capbus.rpc.vat import open_vat

    schema = _schema()

    class Local(schema.Bench.Server):  # type: ignore[misc,name-defined]
        pass

    async def main() -> dict[str, Any]:
        async with capbus.Peer.from_socket(config["fd"]) as peer, open_vat(peer) as vat:
            (handle,) = (await peer.take_seed()).handles
            bench = vat.client(handle, schema.Bench)
            for _ in range(200):
                await bench.echo(PAYLOAD)

            async def received() -> int:
                return int((await bench.received()).calls)

            async def carry(size: int, n: int) -> dict[str, float]:
                data = bytes(size)
                return data_rate(size, await round_trips(lambda: bench.data(data=data), n))

            return await run_plan(
                config["plan"],
                {
                    "echo32": lambda n: round_trips(lambda: bench.echo(PAYLOAD), n),
                    "oneway": lambda n: oneway_rate(bench.ping.oneway, received, n),
                    "inflight64": lambda n: in_flight_trio(bench.ping, n),
                    # A new object each call: exported, passed, released and collected.
                    "cap": lambda n: round_trips(lambda: bench.take(cap=Local()), n),
                    "ping": lambda n: round_trips(bench.ping, n),
                    **{name: functools.partial(carry, size) for name, size in DATA_SIZES.items()},
                },
            )

    result: dict[str, Any] = trio.run(main)
    return result
