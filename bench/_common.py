"""Shared pieces of the capbus benchmarks (not a benchmark itself).

Statistics, table printing, resource limits, raw capbus frames (for drivers that bypass
the Peer API) and the in-process round trip through the Peer API that rtt.py and scale.py
both measure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

import capbus
from capbus import _wire

BENCH_DIR = Path(__file__).resolve().parent
BUILD_DIR = BENCH_DIR / "build"

PAYLOAD = bytes(range(32))
"""The message every benchmark sends: 32 bytes."""

RECV_SIZE = _wire.FRAME_MAX + 1
ROUND_TRIPS_TIMEOUT = 30.0  # seconds, plus 1 ms per round trip: a stuck echo fails the bench
_FRAME_TYPE = struct.Struct("<H")
_MESSAGE_KIND = struct.Struct("<H")
_REPLY_ERROR = struct.Struct("<i")


# -- statistics --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Latency:
    """One run's (or several runs' combined) latency, in microseconds."""

    median_us: float
    p99_us: float

    @classmethod
    def of(cls, samples_ns: Sequence[int]) -> Latency:
        ordered = sorted(samples_ns)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return cls(statistics.median(ordered) / 1000, p99 / 1000)

    @classmethod
    def combine(cls, runs: Sequence[Latency]) -> Latency:
        """The median over runs of each run's median and p99."""
        return cls(statistics.median(r.median_us for r in runs), statistics.median(r.p99_us for r in runs))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table, columns padded so that it also reads well in a terminal."""
    cells = [[str(h) for h in headers], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            + " |"
        )

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), separator, *(line(r) for r in cells[1:])])


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def machine() -> str:
    """One line saying where and when the numbers were taken."""
    model = "unknown cpu"
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{datetime.date.today().isoformat()}, {os.cpu_count()} cpus ({model}), "
        f"Linux {platform.release()}, Python {platform.python_version()}, trio {trio.__version__}"
    )


def note(text: str) -> None:
    """Progress on stderr, so that stdout holds only results."""
    print(text, file=sys.stderr, flush=True)


# -- resources ----------------------------------------------------------------------------------


def raise_nofile(wanted: int) -> int:
    """Raises RLIMIT_NOFILE towards ``wanted`` (the hard limit too, when privileged) and
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _load_mallinfo2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        function = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _Mallinfo2
    function.argtypes = []
    return function


_mallinfo2 = _load_mallinfo2()


def heap_bytes() -> int | None:
    """Bytes the process has allocated with malloc (glibc mallinfo2: every arena, mmapped
    chunks included), or None off glibc. The embedded kernel's real footprint, malloc's own
    overhead included, shows up here; Python's small objects mostly do not (pymalloc)."""
    if _mallinfo2 is None:
        return None
    info = _mallinfo2()
    return int(info.uordblks + info.hblkhd)


# -- raw capbus frames ------------------------------------------------------------------------


def send_frame(
    destination: int,
    payload: bytes = PAYLOAD,
    *,
    handles: Sequence[int] = (),
    cookie: int = 1,
    oneway: bool = False,
) -> bytes:
    """A complete CAPBUS_CMD_SEND frame, built once and written as often as wanted (the
    kernel just echoes the cookie, so reusing one is fine for a driver that only counts).
    ``oneway`` sets CAPBUS_SEND_FLAG_QUIET: the kernel answers only failures."""
    flags = _wire.SEND_FLAG_QUIET if oneway else 0
    if oneway:
        cookie |= _wire.ONEWAY_COOKIE
    frames = _wire.send_frame(cookie, [destination], list(handles), 0, payload, 0, flags)
    return b"".join(bytes(b) for b in frames)


def frame_type(frame: bytes | bytearray | memoryview) -> int:
    return int(_FRAME_TYPE.unpack_from(frame, 4)[0])


def message_kind(frame: bytes | bytearray | memoryview) -> int:
    """The kind of a CAPBUS_FRAME_MESSAGE (data, node destroyed, ...)."""
    return int(_MESSAGE_KIND.unpack_from(frame, _wire.FRAME.size)[0])


def reply_error(frame: bytes | bytearray | memoryview) -> int:
    """The errno of a CAPBUS_FRAME_REPLY (0 for success)."""
    return int(_REPLY_ERROR.unpack_from(frame, _wire.FRAME.size)[0])


def send_results(frame: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """The per-destination errnos of a successful SEND reply."""
    offset = _wire.FRAME.size + _wire.REPLY.size
    n, _ = _wire.SEND_RESULT.unpack_from(frame, offset)
    return struct.unpack_from(f"<{n}i", frame, offset + _wire.SEND_RESULT.size)


FRAME_MESSAGE = _wire.FRAME_MESSAGE
FRAME_REPLY = _wire.FRAME_REPLY
MSG_DATA = _wire.MSG_DATA


# -- the Peer API round trip --------------------------------------------------------------------


async def peer_echo(b: capbus.Peer, back: capbus.HandleLike, *, oneway: bool = False) -> None:
    """B's side of a round trip: sends every data message back to ``back`` (with
    ``send_oneway`` if ``oneway``); returns when A's node goes away (A disconnected) or the
    kernel does."""
    send = b.send_oneway if oneway else b.send
    try:
        while True:
            message = await b.recv()
            if message.kind is capbus.MessageKind.DATA:
                await send(back, message.payload_view)
            elif message.kind is capbus.MessageKind.NODE_DESTROYED:
                return
    except (capbus.Disconnected, capbus.NodeDestroyed, trio.ClosedResourceError):
        return


async def peer_round_trips(
    a: capbus.Peer, to_b: capbus.HandleLike, iterations: int, warmup: int, *, oneway: bool = False
) -> list[int]:
    """A's side: ``iterations`` timed round trips (after ``warmup`` untimed ones), in ns.
    One round trip: A sends 32 bytes to B's node, B's echo sends them back to A's node.
    ``oneway``: both sides use ``send_oneway`` (no answer from the kernel)."""
    samples: list[int] = []
    clock = time.perf_counter_ns
    send = a.send_oneway if oneway else a.send
    for i in range(warmup + iterations):
        start = clock()
        await send(to_b, PAYLOAD)
        message = await a.recv()
        end = clock()
        if message.kind is not capbus.MessageKind.DATA:
            raise RuntimeError(f"round trip got {message.kind}, not data")
        if i >= warmup:
            samples.append(end - start)
    return samples


@dataclass(slots=True)
class PeerPair:
    """Two peers of one kernel that know each other's node: A's handle to B's node and the
    reverse, for round trips."""

    a: capbus.Peer
    b: capbus.Peer
    b_in_a: capbus.Handle
    a_in_b: capbus.Handle

    @classmethod
    async def connect(cls, kernel: capbus.Kernel) -> PeerPair:
        a = await kernel.connect()
        b = await kernel.connect()
        node_a = await a.create_node()
        node_b = await b.create_node()
        return cls(a, b, await b.transfer(node_b, a), await a.transfer(node_a, b))

    async def round_trips(self, iterations: int, warmup: int) -> list[int]:
        """In-process round trips: B's echo runs as a task of this trio run."""
        with trio.fail_after(ROUND_TRIPS_TIMEOUT + (iterations + warmup) / 1000):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer_echo, self.b, self.a_in_b)
                try:
                    return await peer_round_trips(self.a, self.b_in_a, iterations, warmup)
                finally:
                    nursery.cancel_scope.cancel()

    async def aclose(self) -> None:
        await self.a.aclose()
        await self.b.aclose()


# -- the C relay --------------------------------------------------------------------------------


async def oneway_rate(
    sender: capbus.Peer,
    receiver: capbus.Peer,
    target: capbus.HandleLike,
    seconds: float,
    *,
    tagged: bool = False,
) -> float:
    """One-way 32-byte messages per second from ``sender`` to ``receiver`` (its node behind
    ``target``) over ``seconds``, after a 0.2 s warm-up; tagged sends if asked (tracked)."""
    received = 0
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            tag = 0
            while True:
                tag += 1
                try:
                    await sender.send_oneway(target, b"x" * 32, tag=tag if tagged else None)
                except capbus.QuotaExceeded:
                    await trio.sleep(0)  # (the receiver's queue is full: let it read)

        async def receive() -> None:
            nonlocal received
            while True:
                await receiver.recv()
                received += 1

        nursery.start_soon(receive)
        nursery.start_soon(send)
        await trio.sleep(0.2)  # (warm up)
        start, received = time.perf_counter(), 0
        await trio.sleep(seconds)
        rate = received / (time.perf_counter() - start)
        nursery.cancel_scope.cancel()
    return rate


def build_relay() -> Path:
    """Compiles bench/relay.c into bench/build/relay (again only when the source changed)."""
    source = BENCH_DIR / "relay.c"
    binary = BUILD_DIR / "relay"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    BUILD_DIR.mkdir(exist_ok=True)
    compiler = os.environ.get("CC", "gcc")
    subprocess.run(
        [compiler, "-O2", "-std=c11", "-Wall", "-Wextra", "-o", str(binary), str(source)],
        check=True,
    )
    return binary


# -- CPU clocks ---------------------------------------------------------------------------------


def _load_clock_getcpuclockid() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        function = ctypes.CDLL(name, use_errno=True).clock_getcpuclockid
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    return function


_clock_getcpuclockid = _load_clock_getcpuclockid()


def process_cpu_clock(pid: int) -> int | None:
    """The CPU-time clock of another process (clock_getcpuclockid), or None."""
    if _clock_getcpuclockid is None:
        return None
    clock = ctypes.c_int()
    if _clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
        return None
    return clock.value


def thread_cpu_clock(thread: threading.Thread) -> int | None:
    """The CPU-time clock of a thread of this process, or None."""
    if thread.ident is None:
        return None
    try:
        return time.pthread_getcpuclockid(thread.ident)
    except (AttributeError, OSError):
        return None


def cpu_ns(clock: int | None) -> int | None:
    """CPU time consumed so far on ``clock``, or None once it is gone."""
    if clock is None:
        return None
    try:
        return time.clock_gettime_ns(clock)
    except OSError:
        return None


@contextmanager
def pinned(cpu: int | None, *threads: threading.Thread) -> Iterator[None]:
    """Runs the calling thread and ``threads`` (of this process) on one CPU for the block:
    a thread's wakeup then costs a context switch instead of an inter-processor interrupt,
    which on a virtual machine varies a lot from run to run. No-op for ``cpu`` None."""
    if cpu is None:
        yield
        return
    tids = [0, *(t.native_id for t in threads if t.native_id is not None)]
    saved = [(tid, os.sched_getaffinity(tid)) for tid in tids]
    for tid in tids:
        os.sched_setaffinity(tid, {cpu})
    try:
        yield
    finally:
        for tid, mask in saved:
            os.sched_setaffinity(tid, mask)
