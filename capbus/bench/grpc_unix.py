"""gRPC (grpcio's asyncio API) over a unix socket, bytes in and out (no protobuf: generic
handlers, so that serialisation costs nothing beyond gRPC's own framing)."""

from __future__ import annotations

import functools
import os
import struct
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .processes import Offer, Spawn
from .workloads import (
    DATA_SIZES,
    MULTICASTS,
    NETWORK,
    PAYLOAD,
    data_rate,
    in_flight_asyncio,
    round_trips,
    run_plan,
)

LABEL = "gRPC (unix socket)"
PACKAGES = {"grpc": "grpcio"}
PROGRAMS: dict[str, str] = {}
UNSUPPORTED = {
    "data64Msealed": "not measured: capbus's Data that travels as the caller's sealed memfd; see data64M",
    "stream1G": "not measured: gRPC client streaming is not wired into this bench yet",
    "oneway": "gRPC has no one-way calls",
    "cap": "gRPC has no capabilities",
    "ping": "gRPC has no capabilities",
    **dict.fromkeys(MULTICASTS, "gRPC has no multicast"),
    **dict.fromkeys(NETWORK, "gRPC is not Cap'n Proto's RPC protocol"),
}
_LARGEST = 128 << 20
_OPTIONS = [("grpc.max_send_message_length", _LARGEST), ("grpc.max_receive_message_length", _LARGEST)]


@asynccontextmanager
async def sitting(spawn_server: Spawn, plan: dict[str, int]) -> AsyncIterator[Offer]:
    with tempfile.TemporaryDirectory(prefix="capbus-bench-") as directory:
        target = {"target": f"unix:{os.path.join(directory, 'grpc')}"}
        await spawn_server(target, [])
        yield target, []


def serve(config: dict[str, Any]) -> None:
    import asyncio

    import grpc

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def ping(request: bytes, context: Any) -> bytes:
        return b""

    async def data(request: bytes, context: Any) -> bytes:
        return struct.pack("<Q", len(request))

    handlers = grpc.method_handlers_generic_handler(
        "capbus.Bench",
        {
            name: grpc.unary_unary_rpc_method_handler(fn)
            for name, fn in (("Echo", echo), ("Ping", ping), ("Data", data))
        },
    )

    async def main() -> None:
        server = grpc.aio.server(options=_OPTIONS)
        server.add_generic_rpc_handlers((handlers,))
        server.add_insecure_port(config["target"])
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def measure(config: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    import grpc

    out: dict[str, Any] = {}

    async def main() -> None:
        async with grpc.aio.insecure_channel(config["target"], options=_OPTIONS) as channel:
            echo = channel.unary_unary("/capbus.Bench/Echo")
            ping = channel.unary_unary("/capbus.Bench/Ping")
            data_call = channel.unary_unary("/capbus.Bench/Data")
            message = PAYLOAD.encode()
            for _ in range(200):
                await echo(message)

            async def carry(size: int, n: int) -> dict[str, float]:
                data = bytes(size)
                return data_rate(size, await round_trips(lambda: data_call(data), n))

            out.update(
                await run_plan(
                    config["plan"],
                    {
                        "echo32": lambda n: round_trips(lambda: echo(message), n),
                        "inflight64": lambda n: in_flight_asyncio(lambda: ping(b""), n),
                        **{name: functools.partial(carry, size) for name, size in DATA_SIZES.items()},
                    },
                )
            )

    asyncio.run(main())
    return out
