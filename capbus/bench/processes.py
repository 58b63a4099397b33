"""What a contender's sitting gets from the runner and gives its client; and the subscribers
process of the multicast workloads, with the pipe through which it tells the client when
each batch of events has arrived."""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, Protocol

from .workloads import (
    MULTICAST_BATCH,
    MULTICAST_TIMEOUT,
    SUBSCRIBERS,
    multicast_subscribers,
    wants_subscribers,
)

Offer = tuple[dict[str, Any], list[int]]
"""What a sitting gives its client: the config, and the fds to pass it."""


class Spawn(Protocol):
    """The runner's ``spawn_server`` a sitting gets: starts the contender's ``role`` process
    ("serve" or "subscribe") with ``config`` (plus the plan) and ``fds``, once it is ready."""

    def __call__(self, config: dict[str, Any], fds: list[int], role: str = "serve") -> Awaitable[Any]: ...


def subscribers_wanted(plan: dict[str, int]) -> int:
    """How many subscribers the sitting makes: all, or none if the plan has no multicast."""
    return SUBSCRIBERS if wants_subscribers(plan) else 0


@asynccontextmanager
async def subscribers_process(
    spawn_server: Spawn, plan: dict[str, int], config: dict[str, Any], fds: list[int]
) -> AsyncIterator[int | None]:
    """Starts the subscribers process (``subscribe``, with ``config`` and ``fds`` and the
    pipe's write end as ``config["pipe"]``) if the plan has multicast workloads, and yields
    the pipe's read end for the client (None if there is no such process)."""
    if not wants_subscribers(plan):
        yield None
        return
    read, write = os.pipe()
    try:
        try:
            await spawn_server({**config, "pipe": write}, [*fds, write], role="subscribe")
        finally:
            os.close(write)  # the client sees the end of the pipe if the subscribers die
        yield read
    finally:
        os.close(read)


class Tally:
    """The subscribers process's side: counts deliveries against the plan's batches (in the
    plan's order) and writes the time of each batch's last delivery to the pipe."""

    def __init__(self, plan: dict[str, int], fd: int) -> None:
        self.fd = fd
        self.expected = [
            n * MULTICAST_BATCH
            for name, batches in plan.items()
            if (n := multicast_subscribers(name))
            for _ in range(max(2, batches))
        ]
        self.expected.reverse()
        self.remaining = self.expected.pop() if self.expected else 0

    def delivered(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            os.write(self.fd, struct.pack("<Q", time.perf_counter_ns()))
            self.remaining = self.expected.pop() if self.expected else 0


async def stamp_trio(fd: int) -> int:
    """The next batch's completion time from the subscribers' pipe (trio)."""
    import trio

    data = b""
    with trio.move_on_after(MULTICAST_TIMEOUT):
        while len(data) < 8:
            await trio.lowlevel.wait_readable(fd)
            data += _read(fd, 8 - len(data))
    return _stamp(data)


async def stamp_asyncio(fd: int) -> int:
    """The next batch's completion time from the subscribers' pipe (asyncio)."""
    import asyncio

    loop = asyncio.get_running_loop()
    data = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(MULTICAST_TIMEOUT):
            while len(data) < 8:
                readable: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fd, functools.partial(_settle, readable))
                try:
                    await readable
                finally:
                    loop.remove_reader(fd)
                data += _read(fd, 8 - len(data))
    return _stamp(data)


def _stamp(data: bytes) -> int:
    if len(data) < 8:
        raise TimeoutError(
            f"the batch's last delivery did not come within {MULTICAST_TIMEOUT} s: events were lost"
        )
    return int(struct.unpack("<Q", data)[0])


def _settle(future: Any) -> None:
    if not future.done():
        future.set_result(None)


def _read(fd: int, n: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, n)
    except BlockingIOError:
        return b""
    if not data:
        raise EOFError("the subscribers process is gone")
    return data


def free_tcp_port() -> int:
    """A loopback TCP port free now, for a server process to listen on (the sitting tells
    both processes; a port taken in between fails that sitting, which is reported)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
