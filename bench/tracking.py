"""What tracking costs (issue 13, graceful disconnect): a one-way send given a tag is tracked
by the kernel (CAPBUS_SEND_FLAG_TRACK: it keeps who sent it until it is written, to say so
if it is lost). Every RPC call is such a send. One-way messages per second between two
peers, untagged and tagged, alternating rounds of the same run.

    .venv/bin/python bench/tracking.py [--rounds R] [--seconds S]
"""

from __future__ import annotations

import argparse
import statistics

import trio
from _common import oneway_rate  # (bench/ is the script's directory)

import capbus


async def one_round(seconds: float, tagged: bool) -> float:
    async with capbus.open_kernel() as kernel:
        sender, receiver = await kernel.connect(), await kernel.connect()
        target = await receiver.transfer(await receiver.create_node(), sender)
        rate = await oneway_rate(sender, receiver, target, seconds, tagged=tagged)
    return rate


async def main(args: argparse.Namespace) -> None:
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for tagged in (False, True):
            rates[tagged].append(await one_round(args.seconds, tagged))
    plain, tracked = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"# one-way messages, untracked and tracked ({args.rounds} rounds of {args.seconds:g} s)\n")
    print("| | messages/s | vs untracked |")
    print("|---|---:|---:|")
    print(f"| untagged (not tracked) | {plain:,.0f}/s | 1.00x |")
    print(f"| tagged (tracked) | {tracked:,.0f}/s | {tracked / plain:.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    trio.run(main, parser.parse_args())
