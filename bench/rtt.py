"""Round trip latency: A -> kernel -> B -> kernel -> A, against a raw socketpair ping-pong.

    .venv/bin/python bench/rtt.py [--quick] [--mode in|cross|both] [--pin CPU]

One round trip is 32 bytes from A to B and the same bytes back. Four ways, each measured
with the same A side (a trio task timing every round trip) and the same B side (an echo,
either another trio task of this process or a child process):

  raw      a SOCK_SEQPACKET socketpair between A and B, trio sockets: the baseline;
  relay    A and B each connected to bench/relay.c, a C epoll relay process that forwards
           datagrams both ways: what any broker in the middle costs at the least;
  frames   through the capbus kernel, writing pre-built SEND frames and reading MESSAGE
           frames on trio sockets (no Peer API): the kernel hop alone, including the
           kernel's reply to every send;
  peer     through the capbus kernel with the Peer API (send waits for its reply, recv
           wraps a Message): what a capbus program sees.

The kernel runs embedded (a thread of this process, no GIL held). ``in`` runs B as a task
next to A; ``cross`` runs B in a child process (the realistic case). Runs are interleaved
(raw, relay, frames, peer, raw, ...) and the table gives the median over runs of each run's
median and p99, and the range of the runs' medians. Ratios are against the raw socketpair
of the same mode.

Where the scheduler puts the threads matters a lot on a small virtual machine: a wakeup on
another CPU costs an inter-processor interrupt, one on the same CPU a context switch. Left
alone (the default) the runs land on either; ``--pin CPU`` puts everything on one CPU.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import trio
from _common import (
    FRAME_MESSAGE,
    MSG_DATA,
    PAYLOAD,
    RECV_SIZE,
    Latency,
    build_relay,
    frame_type,
    machine,
    message_kind,
    note,
    peer_echo,
    peer_round_trips,
    send_frame,
    table,
)

import capbus

Variant = Literal["raw", "relay", "frames", "frames-oneway", "peer", "peer-oneway"]
Mode = Literal["in-process", "cross-process"]
VARIANTS: tuple[Variant, ...] = ("raw", "relay", "frames", "frames-oneway", "peer", "peer-oneway")
LABELS: dict[Variant, str] = {
    "raw": "raw socketpair (baseline)",
    "relay": "C epoll relay in between",
    "frames": "capbus, raw frames",
    "frames-oneway": "capbus, raw frames, one-way sends",
    "peer": "capbus, Peer API (send)",
    "peer-oneway": "capbus, Peer API (send_oneway)",
}
GOAL = 1.25
WAIT = 20.0  # seconds: bound on any setup or teardown step


# -- B: the echo side (a task or a child process) ---------------------------------------------


async def b_setup(sock: socket.socket) -> tuple[capbus.Peer, capbus.Handle]:
    """B's bootstrap: its seed carries a handle to A's node; it creates its own node and
    sends A a handle to it. Returns the peer and its handle to A's node."""
    b = capbus.Peer.from_socket(sock)
    seed = await b.take_seed()
    to_a = seed.handles[0]
    node = await b.create_node()
    await b.send(to_a, b"hello", handles=[node])
    return b, to_a


async def run_b(variant: Variant, sock: socket.socket) -> None:
    """Echoes until A goes away."""
    if variant in ("raw", "relay"):
        raw = trio.socket.from_stdlib_socket(sock)
        with raw:
            buffer = bytearray(RECV_SIZE)
            while n := await raw.recv_into(buffer):
                await raw.send(memoryview(buffer)[:n])
        return
    b, to_a = await b_setup(sock)
    if variant in ("peer", "peer-oneway"):
        async with b:
            await peer_echo(b, to_a, oneway=variant == "peer-oneway")
        return
    frame = send_frame(to_a.id, oneway=variant == "frames-oneway")
    with trio.socket.from_stdlib_socket(b.detach()) as raw:
        buffer = bytearray(RECV_SIZE)
        while n := await raw.recv_into(buffer):
            if frame_type(buffer) == FRAME_MESSAGE:  # replies to our own sends are skipped
                if message_kind(buffer) != MSG_DATA:
                    return  # A's node was destroyed: A is gone
                await raw.send(frame)


@asynccontextmanager
async def b_side(variant: Variant, mode: Mode, sock: socket.socket) -> AsyncIterator[None]:
    """Runs B for the duration of the block; A must have hung up by the block's end."""
    if mode == "in-process":
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_b, variant, sock)
            yield
            nursery.cancel_scope.deadline = trio.current_time() + WAIT
        return
    command = [sys.executable, __file__, "--child", variant, "--fd", str(sock.fileno())]
    process = await trio.lowlevel.open_process(command, pass_fds=(sock.fileno(),))
    sock.close()
    try:
        yield
    finally:
        await reap(process)


# -- A: the timed side --------------------------------------------------------------------------


async def raw_round_trips(
    sock: trio.socket.SocketType, message: bytes, iterations: int, warmup: int, *, through_kernel: bool
) -> list[int]:
    """Round trips over a raw socket: write ``message``, read the answer; through the kernel
    the reply to our SEND comes first and is skipped."""
    clock = time.perf_counter_ns
    buffer = bytearray(RECV_SIZE)
    samples: list[int] = []
    for i in range(warmup + iterations):
        start = clock()
        await sock.send(message)
        await sock.recv_into(buffer)
        if through_kernel:
            while frame_type(buffer) != FRAME_MESSAGE:
                await sock.recv_into(buffer)
        end = clock()
        if i >= warmup:
            samples.append(end - start)
    return samples


async def raw_measure(
    variant: Variant, mode: Mode, a_end: socket.socket, b_end: socket.socket, iterations: int, warmup: int
) -> list[int]:
    with trio.socket.from_stdlib_socket(a_end) as a_sock:
        async with b_side(variant, mode, b_end):
            try:
                return await raw_round_trips(a_sock, PAYLOAD, iterations, warmup, through_kernel=False)
            finally:
                a_sock.close()


async def reap(process: trio.Process) -> None:
    """Waits (boundedly, even when cancelled) for a child that should exit by itself, else
    kills it."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(WAIT):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def measure(
    kernel: capbus.Kernel, variant: Variant, mode: Mode, iterations: int, warmup: int
) -> list[int]:
    if variant == "raw":
        a_end, b_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return await raw_measure(variant, mode, a_end, b_end, iterations, warmup)
    if variant == "relay":
        a_end, relay_a = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        b_end, relay_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = (relay_a.fileno(), relay_b.fileno())
        relay = await trio.lowlevel.open_process([str(build_relay()), *map(str, fds)], pass_fds=fds)
        relay_a.close()
        relay_b.close()
        try:
            return await raw_measure(variant, mode, a_end, b_end, iterations, warmup)
        finally:
            await reap(relay)
    a = await kernel.connect()
    async with a:
        node = await a.create_node()
        b_sock = await a.create_peer(handles=[node])
        async with b_side(variant, mode, b_sock):
            try:
                with trio.fail_after(WAIT):
                    hello = await a.recv()
                to_b = hello.handles[0]
                if variant in ("peer", "peer-oneway"):
                    return await peer_round_trips(
                        a, to_b, iterations, warmup, oneway=variant == "peer-oneway"
                    )
                with trio.socket.from_stdlib_socket(a.detach()) as a_sock:
                    frame = send_frame(to_b.id, oneway=variant == "frames-oneway")
                    return await raw_round_trips(a_sock, frame, iterations, warmup, through_kernel=True)
            finally:
                await a.aclose()


async def main(args: argparse.Namespace) -> None:
    choices: dict[str, list[Mode]] = {
        "in": ["in-process"],
        "cross": ["cross-process"],
        "both": ["in-process", "cross-process"],
    }
    modes = choices[args.mode]
    results: dict[tuple[Mode, Variant], list[Latency]] = {(m, v): [] for m in modes for v in VARIANTS}
    if args.pin is not None:
        # Before the kernel thread and the children start: they inherit it.
        os.sched_setaffinity(0, {args.pin})
    async with capbus.open_kernel() as kernel:
        for run in range(args.runs):
            for mode in modes:
                for variant in VARIANTS:
                    # A stuck echo (a child that died, say) fails the benchmark, not hangs it.
                    with trio.fail_after(WAIT + (args.iterations + args.warmup) / 1000):
                        samples = await measure(kernel, variant, mode, args.iterations, args.warmup)
                    results[mode, variant].append(Latency.of(samples))
            note(f"rtt: run {run + 1}/{args.runs} done")
    where = f"everything on CPU {args.pin}" if args.pin is not None else "not pinned"
    print(f"# rtt: {args.iterations} round trips x {args.runs} runs, 32-byte payload, {where}; {machine()}")
    for mode in modes:
        raw = Latency.combine(results[mode, "raw"])
        rows = []
        for variant in VARIANTS:
            lat = Latency.combine(results[mode, variant])
            medians = [r.median_us for r in results[mode, variant]]
            rows.append(
                [
                    LABELS[variant],
                    lat.median_us,
                    lat.p99_us,
                    f"{lat.median_us / raw.median_us:.2f}x",
                    f"{lat.p99_us / raw.p99_us:.2f}x",
                    f"{min(medians):.0f}-{max(medians):.0f}",
                ]
            )
        print(f"\n## {mode} (B {'is a task next to A' if mode == 'in-process' else 'in a child process'})\n")
        headers = ["variant", "median us", "p99 us", "median / raw", "p99 / raw", "runs' medians"]
        print(table(headers, rows))
        for variant in ("peer", "peer-oneway"):
            ratio = Latency.combine(results[mode, variant]).median_us / raw.median_us
            verdict = "meets" if ratio <= GOAL else "misses"
            print(f"\n{LABELS[variant]} round trip = {ratio:.2f}x raw ({verdict} the goal of <= {GOAL:.2f}x)")


async def child(variant: Variant, fd: int) -> None:
    await run_b(variant, socket.socket(fileno=fd))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a run of about 10 seconds")
    parser.add_argument("--mode", choices=["in", "cross", "both"], default="both")
    parser.add_argument("--iterations", type=int, help="timed round trips per run (default 5000, quick 1000)")
    parser.add_argument("--warmup", type=int, help="untimed round trips first (default 500, quick 200)")
    parser.add_argument("--runs", type=int, help="runs of each variant (default 5, quick 2)")
    parser.add_argument(
        "--pin",
        type=int,
        metavar="CPU",
        help="run everything (this process, the kernel thread, B, the relay) on this one CPU",
    )
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.iterations = args.iterations or (1000 if args.quick else 5000)
    args.warmup = args.warmup if args.warmup is not None else (200 if args.quick else 500)
    args.runs = args.runs or (2 if args.quick else 5)
    return args


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    if arguments.child:
        trio.run(child, arguments.child, arguments.fd)
    else:
        trio.run(main, arguments)
