"""What a snapshot costs (issue 13, `capbus status` and `capbus graph`): the kernel walks the
whole object model on its one thread while every peer waits, so its time is the pause a
snapshot puts on the bus. Measured for buses of growing size, with a plain kernel round trip
(PEER_QUERY) in the same run as the baseline, and the Python decode apart.

    .venv/bin/python bench/snapshot.py [--rounds R]

The kernel runs embedded; a builder peer makes the nodes, a second peer holds a handle to
each (two handles a node); the watcher asks for the snapshots.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import trio

import capbus
from capbus import _wire
from capbus.snapshot import decode


async def measure(nodes: int, rounds: int) -> tuple[float, float, float, int]:
    """(round trip, snapshot: kernel + read, decode) medians in µs, and the snapshot's size."""
    async with capbus.open_kernel() as kernel:
        watcher, builder, holder = await kernel.connect(), await kernel.connect(), await kernel.connect()
        await kernel.grant_monitor(watcher)
        monitor = await watcher.create_monitor()
        for _ in range(nodes):
            await builder.transfer(await builder.create_node(), holder)
        trips, takes, decodes, size = [], [], [], 0
        for _ in range(rounds):
            start = time.perf_counter()
            await watcher.info()
            trips.append(time.perf_counter() - start)
            start = time.perf_counter()
            reply = await watcher._call(_wire.CMD_SNAPSHOT, _wire.U64.pack(monitor.id))
            (fd,) = reply.fds
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0)
            takes.append(time.perf_counter() - start)
            os.close(fd)
            start = time.perf_counter()
            decode(data)
            decodes.append(time.perf_counter() - start)
        for peer in (watcher, builder, holder):
            await peer.aclose()
    return (
        statistics.median(trips) * 1e6,
        statistics.median(takes) * 1e6,
        statistics.median(decodes) * 1e6,
        size,
    )


async def main(args: argparse.Namespace) -> None:
    print(f"# a snapshot's cost by bus size (median of {args.rounds})\n")
    print(
        "| nodes (handles) | kernel round trip | snapshot (walk, memfd, read) | vs round trip | size "
        "| Python decode |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for nodes in (100, 1_000, 10_000, 50_000):
        trip, take, decoded, size = await measure(nodes, args.rounds)
        print(
            f"| {nodes:,} ({2 * nodes:,}) | {trip:,.0f} µs | {take:,.0f} µs | {take / trip:,.1f}x "
            f"| {size / 1024:,.0f} KiB | {decoded / 1000:,.1f} ms |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    trio.run(main, parser.parse_args())
