"""What a monitor costs the bus (issue 13): one-way messages per second between two peers,
with and without a monitor attached that reads every record, in the same run.

    .venv/bin/python bench/monitor.py [--rounds R] [--seconds S]

The kernel runs embedded (its own thread); sender and receiver are tasks of this process,
each on its own peer; the monitor is a process of its own (as `capbus monitor` is), on a
peer this process made for it. The sender uses Peer.send_oneway (no reply to wait for); the
receiver counts what arrives during --seconds. Rounds alternate (without, with, ...); the
table gives the median over rounds and the ratio of the two.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

import trio
from _common import oneway_rate  # (bench/ is the script's directory)

import capbus

WATCHER = """
import sys, trio, capbus

async def main():
    async with capbus.Peer.from_socket(int(sys.argv[1])) as peer:
        await peer.attach_monitor(await peer.create_monitor())
        print("watching", flush=True)
        while True:
            await peer.recv()

trio.run(main)
"""


async def one_round(seconds: float, monitored: bool) -> float:
    async with capbus.open_kernel() as kernel:
        sender, receiver = await kernel.connect(), await kernel.connect()
        node = await receiver.create_node()
        target = await receiver.transfer(node, sender)
        watcher = None
        if monitored:  # (a process of its own: it prints once it watches)
            sock = await sender.create_peer()
            watcher = await trio.lowlevel.open_process(
                [sys.executable, "-c", WATCHER, str(sock.fileno())],
                pass_fds=[sock.fileno()],
                stdout=subprocess.PIPE,
            )
            sock.close()
            assert watcher.stdout is not None
            assert await watcher.stdout.receive_some(64) == b"watching\n"
        rate = await oneway_rate(sender, receiver, target, seconds)
        if watcher is not None:
            watcher.terminate()
            await watcher.wait()
    return rate


async def main(args: argparse.Namespace) -> None:
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for monitored in (False, True):
            rates[monitored].append(await one_round(args.seconds, monitored))
    without, with_ = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"# one-way messages with and without a monitor ({args.rounds} rounds of {args.seconds:g} s)\n")
    print("| | messages/s | vs without |")
    print("|---|---:|---:|")
    print(f"| without a monitor | {without:,.0f}/s | 1.00x |")
    print(f"| with a monitor reading every record | {with_:,.0f}/s | {with_ / without:.2f}x |")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, parse())
