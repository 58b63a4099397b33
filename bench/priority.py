"""What choosing by priority costs in the kernel (issue 13): a receive with 10,000 messages
queued for the receiver, by priority against in order, and against a plain receive of a
peer that does not hold its messages.

    .venv/bin/python bench/priority.py [--queued N] [--rounds R] [--iterations I]

Each iteration sends one message and receives one, with N older messages of priority 0
kept queued for the receiver all along (so every receive sees N):

  push      the receiver does not hold its messages: the kernel writes each as it comes
            and recv() reads the oldest (the N sit in its socket and its inbox);
  held      the receiver holds them (Peer.hold_messages): recv() is a RECV command that
            takes the oldest from the kernel's queue;
  priority  held, and the message sent is urgent (priority 1): recv(priority=1) makes the
            kernel look at all N + 1 to find it.

The kernel runs embedded; sender and receiver are peers of this process. The table gives
the median over rounds of each round's median per iteration (send + receive), and its
ratio to ``push``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio

import capbus


async def one_round(mode: str, queued: int, iterations: int) -> float:
    limits = capbus.Limits(peer_messages=4 * queued + 1024)
    async with capbus.open_kernel(limits=limits) as kernel:
        receiver = await kernel.connect()
        senders = [await kernel.connect() for _ in range(4)]
        if mode != "push":
            await receiver.hold_messages()
        node = await receiver.create_node()
        targets = [await receiver.transfer(node, sender) for sender in senders]
        for i in range(queued):  # (spread over senders: each may fill part of the queue)
            await senders[i % len(senders)].send(targets[i % len(senders)], b"old", priority=0)
        sender, target = senders[0], targets[0]
        timings = []
        for _ in range(iterations):
            start = time.perf_counter()
            if mode == "priority":
                await sender.send(target, b"urgent", priority=1)
                message = await receiver.recv(priority=1)
                assert message.payload == b"urgent"
            else:
                await sender.send(target, b"new", priority=0)
                message = await receiver.recv()  # (an old one: the queue stays N long)
            timings.append(time.perf_counter() - start)
        for peer in (receiver, *senders):
            await peer.aclose()
    return statistics.median(timings)


async def main(args: argparse.Namespace) -> None:
    modes = ("push", "held", "priority")
    results: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            results[mode].append(await one_round(mode, args.queued, args.iterations))
    base = statistics.median(results["push"])
    print(f"# priority receive with {args.queued:,} messages queued ({args.rounds} rounds)\n")
    print("| receive | send + receive (median) | vs push |")
    print("|---|---:|---:|")
    for mode in modes:
        value = statistics.median(results[mode])
        print(f"| {mode} | {value * 1e6:,.1f} us | {value / base:.2f}x |")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=2_000)
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, parse())
