"""pycapnp's own RPC (the C++ Cap'n Proto implementation under asyncio) over a unix socket,
with the same schema as capbus."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .processes import Offer, Spawn, free_tcp_port
from .workloads import DATA_SIZES, MULTICASTS, PAYLOAD, data_rate, in_flight_asyncio, round_trips, run_plan

LABEL = "pycapnp RPC"
PACKAGES: dict[str, str] = {}
PROGRAMS: dict[str, str] = {}
UNSUPPORTED = {
    "data64Msealed": "not measured: capbus's Data that travels as the caller's sealed memfd; see data64M",
    "stream1G": "not measured: pycapnp's streaming calls are not wired into this bench yet",
    "oneway": "Cap'n Proto has no one-way calls",
    **dict.fromkeys(MULTICASTS, "Cap'n Proto RPC has no multicast"),
}


def _schema() -> Any:
    import capnp

    from capbus._resources import schema_directory

    capnp.remove_import_hook()
    # (its sink method streams: "/capnp/stream.capnp", which pycapnp ships in its package)
    standard = os.path.dirname(os.path.dirname(capnp.__file__))
    return capnp.load(os.path.join(schema_directory(), "capbus", "bench.capnp"), imports=[standard])


@asynccontextmanager
async def sitting(spawn_server: Spawn, plan: dict[str, int]) -> AsyncIterator[Offer]:
    with tempfile.TemporaryDirectory(prefix="capbus-bench-") as directory:
        config = {"path": os.path.join(directory, "pycapnp"), "tcp_port": free_tcp_port()}
        await spawn_server(config, [])
        yield config, []


def serve(config: dict[str, Any]) -> None:
    import asyncio

    import capnp

    schema = _schema()

    class Bench(schema.Bench.Server):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.calls = 0

        async def echo(self, text: str, **kwargs: Any) -> str:
            return text

        async def ping(self, **kwargs: Any) -> None:
            self.calls += 1

        async def take(self, cap: Any, **kwargs: Any) -> None:
            self.calls += 1

        async def received(self, **kwargs: Any) -> int:
            return self.calls

        async def data(self, data: bytes, **kwargs: Any) -> int:
            return len(data)

    async def main() -> None:
        async def connection(stream: Any) -> None:
            await capnp.TwoPartyServer(stream, bootstrap=Bench()).on_disconnect()

        server = await capnp.AsyncIoStream.create_unix_server(connection, config["path"])
        tcp = await capnp.AsyncIoStream.create_server(connection, "127.0.0.1", config["tcp_port"])
        print("ready", flush=True)
        async with server, tcp:
            await asyncio.gather(server.serve_forever(), tcp.serve_forever())

    asyncio.run(capnp.run(main()))


def measure(config: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    import capnp

    schema = _schema()

    class Local(schema.Bench.Server):  # type: ignore[misc,name-defined]
        pass

    out: dict[str, Any] = {}

    async def main() -> None:
        stream = await capnp.AsyncIoStream.create_unix_connection(config["path"])
        bench = capnp.TwoPartyClient(stream).bootstrap().cast_as(schema.Bench)
        for _ in range(200):
            await bench.echo(PAYLOAD)

        async def carry(size: int, n: int) -> dict[str, float]:
            data = bytes(size)
            return data_rate(size, await round_trips(lambda: bench.data(data), n))

        tcp_stream = await capnp.AsyncIoStream.create_connection(host="127.0.0.1", port=config["tcp_port"])
        tcp = capnp.TwoPartyClient(tcp_stream).bootstrap().cast_as(schema.Bench)
        for _ in range(200):
            await tcp.echo(PAYLOAD)

        async def connect_once() -> None:
            stream = await capnp.AsyncIoStream.create_unix_connection(config["path"])
            reached = capnp.TwoPartyClient(stream).bootstrap().cast_as(schema.Bench)
            await reached.echo(PAYLOAD)

        out.update(
            await run_plan(
                config["plan"],
                {
                    "echo32": lambda n: round_trips(lambda: bench.echo(PAYLOAD), n),
                    "tcp_echo32": lambda n: round_trips(lambda: tcp.echo(PAYLOAD), n),
                    "tcp_inflight64": lambda n: in_flight_asyncio(tcp.ping, n),
                    "connect": lambda n: round_trips(connect_once, n),
                    "inflight64": lambda n: in_flight_asyncio(bench.ping, n),
                    "cap": lambda n: round_trips(lambda: bench.take(Local()), n),
                    "ping": lambda n: round_trips(bench.ping, n),
                    **{name: functools.partial(carry, size) for name, size in DATA_SIZES.items()},
                },
            )
        )

    asyncio.run(capnp.run(main()))
    return out
