"""Spawn benchmark (issue 5): from starting a child to the first completed call on its
capability.

    .venv/bin/python bench/spawn.py [--runs N]

Variants, measured in this run, interleaved run by run:
- capbus.spawn with the strict sandbox (every layer);
- capbus.spawn with no sandbox layer (Sandbox.none(): still a clean start);
- multiprocessing, "spawn" start method (a fresh interpreter, as capbus's children are),
  answering a first call through a Pipe;
- multiprocessing, "fork" (no new interpreter at all: the floor for any new process).
Goal: the strict sandbox adds < 50 ms over no sandbox.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import trio

import capbus
from capbus.rpc.vat import Vat, open_vat

HERE = Path(__file__).resolve().parent
schema: Any = capbus.load(HERE / "rpc_bench.capnp")


def pipe_child(connection: Connection) -> None:
    """The multiprocessing child: answers one call through the Pipe."""
    connection.send(connection.recv())


def multiprocessing_once(method: str) -> float:
    context = multiprocessing.get_context(method)
    start = time.perf_counter()
    ours, theirs = context.Pipe()
    process = context.Process(target=pipe_child, args=(theirs,))
    process.start()
    ours.send("ping")
    assert ours.recv() == "ping"
    elapsed = time.perf_counter() - start
    process.join()
    return elapsed


async def capbus_once(vat: Vat, sandbox: capbus.Sandbox) -> float:
    start = time.perf_counter()
    async with capbus.spawn(vat, "spawn_child:main", code=[HERE], sandbox=sandbox) as child:
        echo = await child.capability("bench", schema.Bench)
        assert (await echo.echo(text="ping")).text == "ping"
        elapsed = time.perf_counter() - start
    return elapsed


def summary(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1000, ordered[int(len(ordered) * 0.9) - 1] * 1000, ordered[0] * 1000


async def main(runs: int) -> None:
    results: dict[str, list[float]] = {"strict": [], "none": [], "mp spawn": [], "mp fork": []}
    async with capbus.open_kernel() as kernel, await kernel.connect() as peer, open_vat(peer) as vat:
        variants: list[tuple[str, Callable[[], Awaitable[float]]]] = [
            ("strict", lambda: capbus_once(vat, capbus.Sandbox.strict())),
            ("none", lambda: capbus_once(vat, capbus.Sandbox.none())),
            ("mp spawn", lambda: trio.to_thread.run_sync(multiprocessing_once, "spawn")),
            ("mp fork", lambda: trio.to_thread.run_sync(multiprocessing_once, "fork")),
        ]
        for name, once in variants:  # warm-up: page cache, seccomp program
            await once()
            del name
        for i in range(runs):
            print(f"run {i + 1}/{runs}", file=sys.stderr, flush=True)
            for name, once in variants:
                results[name].append(await once())
    print(f"# spawn: start to first completed call, {runs} runs each, interleaved\n")
    print("| variant | median ms | p90 ms | best ms |")
    print("|---|---:|---:|---:|")
    labels = {
        "strict": "capbus.spawn, strict sandbox",
        "none": "capbus.spawn, no sandbox layer",
        "mp spawn": "multiprocessing 'spawn' + Pipe",
        "mp fork": "multiprocessing 'fork' + Pipe",
    }
    medians = {}
    for name, label in labels.items():
        median, p90, best = summary(results[name])
        medians[name] = median
        print(f"| {label} | {median:.1f} | {p90:.1f} | {best:.1f} |")
    added = medians["strict"] - medians["none"]
    print(f"\nthe strict sandbox adds {added:.1f} ms (goal < 50 ms: {'met' if added < 50 else 'missed'})")
    print(f"capbus.spawn strict / multiprocessing 'spawn' = {medians['strict'] / medians['mp spawn']:.2f}")


if __name__ == "__main__":
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--runs", type=int, default=20)
    trio.run(main, parser.parse_args().runs)
