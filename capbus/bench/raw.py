"""The floor: a trio AF_UNIX stream socketpair, length-prefixed frames, no broker, no RPC."""

from __future__ import annotations

import functools
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from .processes import Offer, Spawn, Tally, stamp_trio, subscribers_process, subscribers_wanted
from .workloads import DATA_SIZES, IN_FLIGHT, NETWORK, PAYLOAD, data_rate, oneway_rate, round_trips, run_plan

LABEL = "raw trio socketpair"
PACKAGES: dict[str, str] = {}
PROGRAMS: dict[str, str] = {}
UNSUPPORTED = {
    "data64Msealed": "not measured: capbus's Data that travels as the caller's sealed memfd; see data64M",
    "stream1G": "not measured: a SOCK_SEQPACKET pair takes no 1 MiB datagram",
    "cap": "no capabilities",
    "ping": "no capabilities",
    **dict.fromkeys(NETWORK, "a socketpair has no address nor RPC protocol"),
}
_HEAD = struct.Struct("<IB")  # length of the body, kind
_CALL, _ONEWAY, _COUNT = 1, 2, 3


@asynccontextmanager
async def sitting(spawn_server: Spawn, plan: dict[str, int]) -> AsyncIterator[Offer]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # The multicast workloads' subscribers: a socketpair each.
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(subscribers_wanted(plan))]
    try:
        with ours, theirs:
            await spawn_server({"fd": theirs.fileno()}, [theirs.fileno()])
            ends = [b.fileno() for _, b in pairs]
            async with subscribers_process(spawn_server, plan, {"fds": ends}, ends) as pipe:
                for _, b in pairs:
                    b.close()
                publishing = [a.fileno() for a, _ in pairs]
                fds = [ours.fileno(), *publishing, *([] if pipe is None else [pipe])]
                yield {"fd": ours.fileno(), "subscribers": publishing, "pipe": pipe}, fds
    finally:
        for a, b in pairs:
            a.close()
            b.close()


class _Frames:
    """Length-prefixed frames over a stream, read in large chunks into one reused buffer
    (what any stream protocol does: one recv for many small frames)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buffer = bytearray(1 << 16)
        self.start = self.end = 0

    async def _fill(self, n: int) -> None:
        """At least ``n`` bytes buffered from ``start``."""
        if self.start + n > len(self.buffer):
            kept = self.buffer[self.start : self.end]
            if n > len(self.buffer):
                self.buffer = bytearray(n + (1 << 16))
            self.buffer[: len(kept)] = kept
            self.start, self.end = 0, len(kept)
        view = memoryview(self.buffer)
        while self.end - self.start < n:
            read = await self.sock.recv_into(view[self.end :])
            if not read:
                raise EOFError
            self.end += read

    async def read(self) -> tuple[int, memoryview]:
        await self._fill(_HEAD.size)
        size, kind = _HEAD.unpack_from(self.buffer, self.start)
        self.start += _HEAD.size
        await self._fill(size)
        body = memoryview(self.buffer)[self.start : self.start + size]
        self.start += size
        return kind, body

    async def write(self, kind: int, body: bytes | memoryview) -> None:
        head = _HEAD.pack(len(body), kind)
        if len(body) <= 4096:
            await self._send_all(head + body)  # one syscall for a small frame
        else:
            await self._send_all(head)
            await self._send_all(body)

    async def _send_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view) :]


def serve(config: dict[str, Any]) -> None:
    async def main() -> None:
        with trio.socket.from_stdlib_socket(socket.socket(fileno=config["fd"])) as sock:
            frames = _Frames(sock)
            print("ready", flush=True)
            count = 0
            try:
                while True:
                    kind, body = await frames.read()
                    if kind == _CALL:
                        await frames.write(_CALL, body if len(body) <= 64 else struct.pack("<Q", len(body)))
                    elif kind == _ONEWAY:
                        count += 1
                    else:
                        await frames.write(_COUNT, struct.pack("<Q", count))
            except (EOFError, OSError):
                pass

    trio.run(main)


def subscribe(config: dict[str, Any]) -> None:
    """The subscribers process: a task reading events from each socket."""
    tally = Tally(config["plan"], config["pipe"])

    async def listen(fd: int) -> None:
        with trio.socket.from_stdlib_socket(socket.socket(fileno=fd)) as sock:
            frames = _Frames(sock)
            try:
                while True:
                    await frames.read()
                    tally.delivered()
            except (EOFError, OSError):
                pass

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for fd in config["fds"]:
                nursery.start_soon(listen, fd)
            print("ready", flush=True)

    trio.run(main)


def measure(config: dict[str, Any]) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        with trio.socket.from_stdlib_socket(socket.socket(fileno=config["fd"])) as sock:
            frames = _Frames(sock)
            message = PAYLOAD.encode()

            async def call(body: bytes = message) -> memoryview:
                await frames.write(_CALL, body)
                return (await frames.read())[1]

            async def oneway() -> None:
                await frames.write(_ONEWAY, b"")

            async def count() -> int:
                await frames.write(_COUNT, b"")
                return int(struct.unpack("<Q", (await frames.read())[1])[0])

            async def window(n: int) -> dict[str, float]:
                # 64 calls outstanding at all times: a reply lets the next call go.
                start = time.perf_counter()
                for _ in range(IN_FLIGHT):
                    await frames.write(_CALL, message)
                for i in range(n):
                    await frames.read()
                    if i + IN_FLIGHT < n:
                        await frames.write(_CALL, message)
                return {"rate": n / (time.perf_counter() - start)}

            async def carry(size: int, n: int) -> dict[str, float]:
                data = bytes(size)
                return data_rate(size, await round_trips(lambda: call(data), n))

            subscribers = [
                _Frames(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
                for fd in config["subscribers"]
            ]

            async def publish(n: int, seq: int) -> None:
                event = struct.pack("<Q", seq)
                for subscriber in subscribers[:n]:  # one send each
                    await subscriber.write(_ONEWAY, event)

            for _ in range(100):
                await call()
            return await run_plan(
                config["plan"],
                {
                    "echo32": lambda n: round_trips(call, n),
                    "oneway": lambda n: oneway_rate(oneway, count, n),
                    "inflight64": lambda n: window(max(n, IN_FLIGHT)),
                    **{name: functools.partial(carry, size) for name, size in DATA_SIZES.items()},
                },
                publish,
                functools.partial(stamp_trio, config["pipe"]),
            )

    result: dict[str, Any] = trio.run(main)
    return result
