"""ZeroMQ (pyzmq's asyncio sockets) over ipc://: a DEALER client and a ROUTER server, one
frame per call and one per answer, no broker."""

from __future__ import annotations

import functools
import os
import struct
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .processes import Offer, Spawn, Tally, stamp_asyncio, subscribers_process
from .workloads import (
    DATA_SIZES,
    IN_FLIGHT,
    NETWORK,
    PAYLOAD,
    SUBSCRIBERS,
    data_rate,
    oneway_rate,
    round_trips,
    run_plan,
    subscriptions,
)

LABEL = "ZeroMQ (ipc://)"
PACKAGES = {"zmq": "pyzmq"}
PROGRAMS: dict[str, str] = {}
UNSUPPORTED = {
    "data64Msealed": "not measured: capbus's Data that travels as the caller's sealed memfd; see data64M",
    "stream1G": "not measured: ZeroMQ has no flow-controlled calls",
    "cap": "ZeroMQ has no capabilities",
    "ping": "ZeroMQ has no capabilities",
    **dict.fromkeys(NETWORK, "ZeroMQ is not Cap'n Proto's RPC protocol"),
}
_CALL, _ONEWAY, _COUNT, _DATA = b"c", b"o", b"n", b"d"


@asynccontextmanager
async def sitting(spawn_server: Spawn, plan: dict[str, int]) -> AsyncIterator[Offer]:
    with tempfile.TemporaryDirectory(prefix="capbus-bench-") as directory:
        endpoint = {
            "endpoint": f"ipc://{os.path.join(directory, 'zmq')}",
            "publisher": f"ipc://{os.path.join(directory, 'pub')}",
        }
        await spawn_server(endpoint, [])
        async with subscribers_process(spawn_server, plan, endpoint, []) as pipe:
            yield {**endpoint, "pipe": pipe}, [] if pipe is None else [pipe]


def serve(config: dict[str, Any]) -> None:
    import asyncio

    import zmq
    import zmq.asyncio

    async def main() -> None:
        context = zmq.asyncio.Context()
        router = context.socket(zmq.ROUTER)
        router.bind(config["endpoint"])
        print("ready", flush=True)
        count = 0
        while True:
            peer, kind, body = await router.recv_multipart(copy=False)
            tag = kind.bytes
            if tag == _CALL:
                await router.send_multipart([peer, kind, body], copy=False)
            elif tag == _ONEWAY:
                count += 1
            elif tag == _COUNT:
                await router.send_multipart([peer, kind, struct.pack("<Q", count)])
            else:
                await router.send_multipart([peer, kind, struct.pack("<Q", len(body.buffer))])

    asyncio.run(main())


def _topic(n: int) -> bytes:
    return f"E{n}.".encode()  # "E1." is no prefix of "E16."


def subscribe(config: dict[str, Any]) -> None:
    """The subscribers process: a SUB socket per subscriber, connected to the publisher's
    endpoint (bound by the client once it starts), subscribed to the topic of every
    multicast width that reaches it ("E16.": subscribers 0 to 15)."""
    import asyncio

    import zmq
    import zmq.asyncio

    tally = Tally(config["plan"], config["pipe"])

    async def listen(sub: Any) -> None:
        while True:
            await sub.recv_multipart(copy=False)
            tally.delivered()

    async def main() -> None:
        context = zmq.asyncio.Context()
        subs = []
        for index in range(SUBSCRIBERS):
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.RECONNECT_IVL, 10)  # the publisher binds when the client starts
            sub.connect(config["publisher"])
            for n in subscriptions(index):
                sub.setsockopt(zmq.SUBSCRIBE, _topic(n))
            subs.append(sub)
        print("ready", flush=True)
        await asyncio.gather(*(listen(sub) for sub in subs))

    asyncio.run(main())


def measure(config: dict[str, Any]) -> dict[str, Any]:
    import asyncio
    import time

    import zmq
    import zmq.asyncio

    out: dict[str, Any] = {}

    async def main() -> None:
        context = zmq.asyncio.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.connect(config["endpoint"])
        message = PAYLOAD.encode()

        async def call(kind: bytes = _CALL, body: bytes = message) -> list[Any]:
            await dealer.send_multipart([kind, body], copy=len(body) < 65536)
            frames: list[Any] = await dealer.recv_multipart(copy=False)
            return frames

        async def oneway() -> None:
            await dealer.send_multipart([_ONEWAY, b""])

        async def count() -> int:
            return int(struct.unpack("<Q", (await call(_COUNT, b""))[1].bytes)[0])

        async def window(n: int) -> dict[str, float]:
            # 64 calls outstanding at all times: an answer lets the next call go.
            start = time.perf_counter()
            for _ in range(IN_FLIGHT):
                await dealer.send_multipart([_CALL, message])
            for i in range(n):
                await dealer.recv_multipart(copy=False)
                if i + IN_FLIGHT < n:
                    await dealer.send_multipart([_CALL, message])
            return {"rate": n / (time.perf_counter() - start)}

        async def carry(size: int, n: int) -> dict[str, float]:
            data = bytes(size)
            return data_rate(size, await round_trips(lambda: call(_DATA, data), n))

        publisher = None
        if config["pipe"] is not None:
            # XPUB_VERBOSE: every subscription reaches the publisher, which measures only once
            # all of them have arrived (a PUB drops what no subscription takes yet).
            publisher = context.socket(zmq.XPUB)
            publisher.setsockopt(zmq.XPUB_VERBOSE, 1)
            publisher.bind(config["publisher"])
            expected = sum(len(subscriptions(i)) for i in range(SUBSCRIBERS))
            async with asyncio.timeout(60):
                while expected:
                    expected -= (await publisher.recv())[:1] == b"\x01"

        async def publish(n: int, seq: int) -> None:
            assert publisher is not None
            await publisher.send_multipart([_topic(n), struct.pack("<Q", seq)])

        for _ in range(200):
            await call()
        out.update(
            await run_plan(
                config["plan"],
                {
                    "echo32": lambda n: round_trips(call, n),
                    "oneway": lambda n: oneway_rate(oneway, count, n),
                    "inflight64": lambda n: window(max(n, IN_FLIGHT)),
                    **{name: functools.partial(carry, size) for name, size in DATA_SIZES.items()},
                },
                publish,
                functools.partial(stamp_asyncio, config["pipe"]),
            )
        )
        dealer.close(linger=0)
        if publisher is not None:
            publisher.close(linger=0)
        context.term()

    asyncio.run(main())
    return out
