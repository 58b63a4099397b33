"""The workloads, how many iterations each gets, and the timing loops every client uses (they
only await, so asyncio and trio clients share them)."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    unit: str
    """"us" (lower is better) or "/s" or "MB/s" (higher is better)."""
    quick: int
    full: int

    @property
    def higher_is_better(self) -> bool:
        return self.unit != "us"


PAYLOAD = "x" * 32
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("echo32", "32 B call round trip", "us", 1_000, 5_000),
        Workload("oneway", "one-way calls", "/s", 5_000, 20_000),
        Workload("inflight64", "two-way calls, 64 in flight", "/s", 4_000, 16_000),
        Workload("cap", "a call passing a capability", "us", 500, 2_000),
        Workload("ping", "the same call without one", "us", 500, 2_000),
        Workload("data1M", "a call carrying 1 MiB of Data", "MB/s", 30, 100),
        Workload("data64M", "a call carrying 64 MiB (less 1 KiB) of Data", "MB/s", 3, 8),
        # The same call, its Data already in a sealed memfd (capbus.memfd.sealed_payload):
        # sent as that memfd, no copy on either side (capbus/rpc/segments.py).
        Workload("data64Msealed", "the same, its Data already in a sealed memfd", "MB/s", 3, 8),
        # Iterations are 1 MiB chunks: 1 GiB in a full run.
        Workload("stream1G", "a stream of 1 MiB Data calls (1 GiB in a full run)", "MB/s", 256, 1024),
        # Multicast: iterations are batches of MULTICAST_BATCH events (the first one a warm-up).
        *(
            Workload(
                f"multicast{n}",
                f"an event to {n} subscriber{'s' * (n > 1)}: time per delivery, lower is better",
                "us",
                6,
                25,
            )
            for n in (1, 16, 256)
        ),
    )
}
# Over the network and at an address (issue 12): Cap'n Proto's RPC protocol over TCP
# loopback, capbus's and pycapnp's; and a program reaching a service at a unix: address.
WORKLOADS.update(
    (w.name, w)
    for w in (
        Workload("tcp_echo32", "32 B call round trip over TCP loopback (rpc.capnp)", "us", 1_000, 5_000),
        Workload("tcp_inflight64", "two-way calls over TCP loopback, 64 in flight", "/s", 4_000, 16_000),
        Workload("connect", "connecting to a unix: address, to its first call returned", "us", 30, 100),
    )
)
NETWORK = ("tcp_echo32", "tcp_inflight64", "connect")
"""What only the Cap'n Proto contenders measure."""
MULTICASTS = tuple(name for name in WORKLOADS if name.startswith("multicast"))
DATA_SIZES = {"data1M": 1 << 20, "data64M": (64 << 20) - 1024}
"""64 MiB less 1 KiB: Cap'n Proto's (and D-Bus's) 64 MiB message limit holds the envelope too."""
ONEWAY_BATCH = 256
"""One-way calls have no flow control of their own: a two-way call every this many."""
IN_FLIGHT = 64
MULTICAST_BATCH = 64
"""Events per multicast batch: the publisher sends them all, then waits until the last
subscriber has the last one."""
SUBSCRIBERS = 256
"""Subscribers the subscribers process holds (each with its own connection); a multicast
workload reaches the first N."""
MULTICAST_TIMEOUT = 20
"""Seconds a multicast batch may take before it counts as lost."""


def multicast_subscribers(workload: str) -> int | None:
    """How many subscribers ``workload`` reaches, or None if it is not a multicast one."""
    return int(workload.removeprefix("multicast")) if workload.startswith("multicast") else None


def subscriptions(index: int) -> list[int]:
    """The multicast widths that reach subscriber ``index`` (each reaches the first N)."""
    return [n for name in MULTICASTS if (n := multicast_subscribers(name) or 0) > index]


def wants_subscribers(plan: dict[str, int]) -> bool:
    return any(multicast_subscribers(name) for name in plan)


@dataclass(frozen=True)
class Goal:
    """A target from issue 10, on capbus's figure for ``workload``, compared as a cost per
    operation (microseconds for a latency, 1 / rate for a rate): at most ``factor`` times the
    cost of ``baseline`` (a workload of contender ``against``) plus ``offset`` us, or, with no
    baseline, at most ``bound`` (in the workload's own unit: a latency at most, a rate at
    least)."""

    text: str
    workload: str
    factor: float = 1.0
    baseline: str | None = None
    against: str = "capbus_rpc"
    offset: float = 0.0
    bound: float | None = None


GOALS = (
    Goal("32 B echo round trip <= 0.7x pycapnp's RPC", "echo32", 0.7, "echo32", "pycapnp_rpc"),
    Goal("32 B echo round trip <= 1.0x D-Bus (dbus-broker + dbus-fast)", "echo32", 1.0, "echo32", "dbus"),
    Goal("32 B echo round trip <= 1.6x the raw trio socketpair", "echo32", 1.6, "echo32", "raw"),
    Goal("one-way calls >= 100,000/s", "oneway", bound=100_000),
    Goal("one-way calls >= 1.2x dbus-fast's rate", "oneway", 1 / 1.2, "oneway", "dbus"),
    Goal("two-way calls with 64 in flight >= 50,000/s", "inflight64", bound=50_000),
    Goal("passing a capability costs <= +20 us over the same call without", "cap", 1.0, "ping", offset=20),
    Goal("64 MiB Data call >= 3,000 MB/s (from bytes)", "data64M", bound=3_000),
    Goal("64 MiB Data call >= 3,000 MB/s (Data in a sealed memfd)", "data64Msealed", bound=3_000),
    Goal("64 MiB Data call >= 2x ZeroMQ's rate (from bytes)", "data64M", 0.5, "data64M", "zeromq"),
    Goal(
        "64 MiB Data call >= 2x ZeroMQ's rate (Data in a sealed memfd)",
        "data64Msealed",
        0.5,
        "data64M",
        "zeromq",
    ),
    Goal(
        "32 B echo over TCP <= 1.0x pycapnp's",
        "tcp_echo32",
        1.0,
        "tcp_echo32",
        "pycapnp_rpc",
    ),
    Goal(
        "two-way calls over TCP, 64 in flight >= 1.0x pycapnp's",
        "tcp_inflight64",
        1.0,
        "tcp_inflight64",
        "pycapnp_rpc",
    ),
    Goal(
        "a multicast delivery to each of 256 subscribers costs <= 0.2x a one-way call",
        "multicast256",
        0.2,
        "oneway",
    ),
)


def summary(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    return {
        "median_us": statistics.median(ordered) / 1000,
        "p99_us": ordered[max(0, int(len(ordered) * 0.99) - 1)] / 1000,
    }


async def round_trips(call: Callable[[], Awaitable[Any]], iterations: int) -> dict[str, float]:
    """Each of ``iterations`` awaited calls timed on its own."""
    samples = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        start = clock()
        await call()
        samples.append(clock() - start)
    return summary(samples)


async def oneway_rate(
    send: Callable[[], Awaitable[Any]], barrier: Callable[[], Awaitable[int]], iterations: int
) -> dict[str, float]:
    """One-way sends in batches, each closed by a two-way ``barrier`` returning how many
    arrived so far: the rate of what arrived, and how many were lost."""
    before = await barrier()
    batches = max(1, iterations // ONEWAY_BATCH)
    start = time.perf_counter()
    for _ in range(batches):
        for _ in range(ONEWAY_BATCH):
            await send()
        arrived = await barrier()
    elapsed = time.perf_counter() - start
    sent = batches * ONEWAY_BATCH
    return {"rate": sent / elapsed, "lost": sent - (arrived - before)}


STREAM_CHUNK = 1 << 20


async def stream_rate(
    send: Callable[[bytes], Awaitable[Any]], barrier: Callable[[], Awaitable[Any]], chunks: int
) -> dict[str, float]:
    """``chunks`` stream calls of STREAM_CHUNK bytes each, then ``barrier`` (a regular call
    on the same capability, which waits until every stream call is acknowledged): the rate
    of what arrived."""
    chunk = bytes(STREAM_CHUNK)
    await send(chunk)  # (a warm-up)
    await barrier()
    start = time.perf_counter()
    for _ in range(chunks):
        await send(chunk)
    await barrier()
    return {"rate": chunks * STREAM_CHUNK / (time.perf_counter() - start) / 1e6}


def data_rate(size: int, timing: dict[str, float]) -> dict[str, float]:
    """A data call's effective rate: its bytes over the median round trip."""
    return {"rate": size / timing["median_us"], **timing}  # bytes per us = MB/s


async def in_flight_trio(call: Callable[[], Awaitable[Any]], iterations: int) -> dict[str, float]:
    import trio

    per_task = max(1, iterations // IN_FLIGHT)

    async def worker() -> None:
        for _ in range(per_task):
            await call()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(IN_FLIGHT):
            nursery.start_soon(worker)
    return {"rate": per_task * IN_FLIGHT / (time.perf_counter() - start)}


async def in_flight_asyncio(call: Callable[[], Awaitable[Any]], iterations: int) -> dict[str, float]:
    import asyncio

    per_task = max(1, iterations // IN_FLIGHT)

    async def worker() -> None:
        for _ in range(per_task):
            await call()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return {"rate": per_task * IN_FLIGHT / (time.perf_counter() - start)}


Runner = Callable[[int], Awaitable[dict[str, float]]]


async def multicast_rate(
    publish: Callable[[int], Awaitable[Any]],
    stamp: Callable[[], Awaitable[int]],
    subscribers: int,
    batches: int,
) -> dict[str, float]:
    """Batches of ``MULTICAST_BATCH`` events (``publish(seq)`` sends one to ``subscribers``),
    each timed from its first send until ``stamp()`` (the subscribers process's
    perf_counter_ns of the batch's last delivery: CLOCK_MONOTONIC, the same in every
    process) and divided by its deliveries. The first batch warms up and is not counted."""
    samples = []
    seq = 0
    for batch in range(max(2, batches)):
        start = time.perf_counter_ns()
        for _ in range(MULTICAST_BATCH):
            await publish(seq)
            seq += 1
        done = await stamp()
        if batch:
            samples.append((done - start) // subscribers)
    per_batch = summary(samples)
    return {key: value / MULTICAST_BATCH for key, value in per_batch.items()}


async def run_plan(
    plan: dict[str, int],
    runners: dict[str, Runner],
    publish: Callable[[int, int], Awaitable[Any]] | None = None,
    stamp: Callable[[], Awaitable[int]] | None = None,
) -> dict[str, Any]:
    """Runs each planned workload; one that fails is recorded with its error, and the rest
    still run (but for the multicast workloads after a failed one: the subscribers' count of
    batches is off). The multicast workloads need ``publish(n, seq)``, which publishes event
    ``seq`` to the first ``n`` subscribers, and ``stamp`` (see :func:`multicast_rate`)."""
    if publish is not None and stamp is not None:
        runners = dict(runners)
        for name in MULTICASTS:
            n = multicast_subscribers(name)
            assert n is not None
            runners[name] = functools.partial(multicast_rate, functools.partial(publish, n), stamp, n)
    results: dict[str, Any] = {}
    multicast_failed: str | None = None
    for name, iterations in plan.items():
        if multicast_failed and name in MULTICASTS:
            results[name] = {"error": f"not run: {multicast_failed} failed before it"}
            continue
        try:
            results[name] = await runners[name](iterations)
        except Exception as error:
            results[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
            if name in MULTICASTS:
                multicast_failed = name
    return results
