"""How cost grows: round trip latency and kernel memory with many peers and many handles.

    .venv/bin/python bench/scale.py [--quick]

One embedded kernel goes through these states, and in each the in-process Peer API round
trip between two peers A and B (as in rtt.py) and the kernel's memory are measured:

  2 peers        A and B alone: the baseline of every ratio;
  N peers        A, B and idle peers (default 1,000 then 10,000), each holding a node of its
                 own and a handle to A's node (it was created by A with create_peer, and its
                 seed holds that handle). Idle peers are bare sockets, not Peer objects;
  H handles      the idle peers gone, 100 "holders" (A and B among them) each own 10,000
                 nodes and hold handles to the 10,000 nodes of the next holder in a ring
                 (default H = 1,000,000 held handles, plus as many owner handles). The handles
                 travel 256 to a message (CAPBUS_HANDLES_MAX), so building them costs one
                 NODE_CREATE per node and one SEND per 256 handles.

Memory is the kernel's own count (statistics().memory_bytes: peers, nodes, handles, their
maps and queues) and, as a cross-check, what malloc says the process holds (glibc
mallinfo2), which adds malloc's per-allocation overhead.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass

import trio
from _common import (
    RECV_SIZE,
    Latency,
    PeerPair,
    frame_type,
    heap_bytes,
    machine,
    note,
    pinned,
    raise_nofile,
    reply_error,
    table,
)

import capbus
from capbus import _wire

HANDLES_PER_MESSAGE = _wire.HANDLES_MAX
LATENCY_GOAL = 1.2
BYTES_GOAL = 128
SETTLE_TIMEOUT = 60.0
FDS_PER_MESSAGE = 250  # under the kernel's SCM_MAX_FD (253)


@dataclass(slots=True)
class State:
    label: str
    peers: int
    handles: int
    latency: Latency
    memory: int
    heap: int | None


async def settle(kernel: capbus.Kernel, peers: int) -> capbus.KernelStatistics:
    """Waits until the kernel has ``peers`` peers and nothing queued (its thread settles
    disconnects and deliveries a moment after the sockets say so)."""
    with trio.fail_after(SETTLE_TIMEOUT):
        while True:
            stats = kernel.statistics()
            if stats.peers == peers and stats.queued_messages == 0:
                return stats
            await trio.sleep(0.005)


async def measure(kernel: capbus.Kernel, pair: PeerPair, label: str, args: argparse.Namespace) -> State:
    assert kernel._thread is not None
    with pinned(args.pin, kernel._thread):
        await pair.round_trips(args.warmup * 5, 0)  # settles the threads on their CPU
        runs = [Latency.of(await pair.round_trips(args.iterations, args.warmup)) for _ in range(args.runs)]
    stats = kernel.statistics()
    state = State(label, stats.peers, stats.handles, Latency.combine(runs), stats.memory_bytes, heap_bytes())
    note(f"scale: {label}: {state.latency.median_us:.1f} us, {state.memory:,} bytes")
    return state


# -- idle peers -----------------------------------------------------------------------------------


class FdKeeper:
    """A child process that keeps the idle peers' connections open, so that this process
    (which also holds the embedded kernel's end of every connection) needs one fd per peer,
    not two. Closing the keeper disconnects them all."""

    def __init__(self, process: trio.Process, control: socket.socket) -> None:
        self.process = process
        self.control = control

    @classmethod
    async def start(cls, avoid: int | None) -> FdKeeper:
        """Starts the keeper, off CPU ``avoid`` if given, and waits until it is ready (its
        start-up would disturb a measurement)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [sys.executable, __file__, "--keep-fds", str(theirs.fileno())]
        process = await trio.lowlevel.open_process(command, pass_fds=(theirs.fileno(),))
        theirs.close()
        keeper = cls(process, ours)
        others = os.sched_getaffinity(0) - {avoid}
        if avoid is not None and others:
            os.sched_setaffinity(process.pid, others)  # off the measured CPU
        try:
            with trio.fail_after(SETTLE_TIMEOUT):
                await trio.lowlevel.wait_readable(ours)
            if ours.recv(16) != b"ready":
                raise RuntimeError("the fd keeper did not start")
        except BaseException:
            await keeper.aclose()
            raise
        return keeper

    def give(self, socks: list[socket.socket]) -> None:
        """Hands the sockets over (and closes ours)."""
        for start in range(0, len(socks), FDS_PER_MESSAGE):
            batch = socks[start : start + FDS_PER_MESSAGE]
            socket.send_fds(self.control, [b"k"], [s.fileno() for s in batch])
            for sock in batch:
                sock.close()

    async def aclose(self) -> None:
        self.control.close()
        with trio.move_on_after(SETTLE_TIMEOUT):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


def keep_fds(fd: int) -> None:
    """The keeper's side: collects fds until the control socket closes."""
    raise_nofile(1 << 20)
    kept: list[int] = []
    with socket.socket(fileno=fd) as control:
        control.send(b"ready")
        while True:
            message, fds, _, _ = socket.recv_fds(control, 16, FDS_PER_MESSAGE)
            kept.extend(fds)
            if not message and not fds:
                break
    for number in kept:
        os.close(number)


async def add_idle_peers(hub: capbus.Peer, hub_node: capbus.Handle, n: int, keeper: FdKeeper) -> None:
    """Adds ``n`` idle peers: each is created by ``hub`` with a handle to ``hub_node`` in its
    seed, then creates a node of its own (one raw NODE_CREATE; no Peer object), then goes
    to the keeper."""
    command = _wire.command(_wire.CMD_NODE_CREATE, 1)
    buffer = bytearray(RECV_SIZE)
    made: list[socket.socket] = []
    try:
        for _ in range(n):
            raw = await hub.create_peer(handles=[hub_node])
            made.append(raw)
            sock = trio.socket.from_stdlib_socket(raw)
            await sock.send(command)
            with trio.fail_after(SETTLE_TIMEOUT):
                await sock.recv_into(buffer)
            if frame_type(buffer) != _wire.FRAME_REPLY or reply_error(buffer):
                raise RuntimeError("an idle peer could not create its node")
            if len(made) == FDS_PER_MESSAGE:
                keeper.give(made)
                made.clear()
        keeper.give(made)
        made.clear()
    finally:
        for raw in made:
            raw.close()


# -- a million handles ------------------------------------------------------------------------------


async def fill_handles(holders: list[capbus.Peer], per_holder: int) -> float:
    """Each holder creates ``per_holder`` nodes and sends handles to all of them to the next
    holder in the ring; returns when every message has been received. Seconds taken."""
    n = len(holders)
    inboxes = [await h.create_node() for h in holders]
    # to_next[i]: holder i's handle to holder i+1's inbox.
    to_next = [await holders[(i + 1) % n].transfer(inboxes[(i + 1) % n], holders[i]) for i in range(n)]
    started = time.perf_counter()
    nodes: list[list[capbus.Handle]] = [[] for _ in holders]

    async def create(i: int) -> None:
        made = nodes[i]
        for _ in range(per_holder):
            made.append(await holders[i].create_node())

    # One task per holder: with every holder at it, the kernel always has commands waiting,
    # and more tasks per peer only add trio scheduling (Python is the bottleneck here).
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(create, i)
    created = time.perf_counter()
    note(f"scale: {n * per_holder:,} nodes created in {created - started:.1f} s")

    received = [0] * n

    async def send(i: int) -> None:
        mine = nodes[i]
        for start in range(0, len(mine), HANDLES_PER_MESSAGE):
            await holders[i].send(to_next[i], b"", handles=mine[start : start + HANDLES_PER_MESSAGE])
        mine.clear()

    async def receive(i: int) -> None:
        while received[i] < per_holder:
            message = await holders[i].recv()
            if message.kind is capbus.MessageKind.DATA:
                received[i] += len(message.handles)

    with trio.fail_after(max(SETTLE_TIMEOUT, per_holder * n / 5000)):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(send, i)
                nursery.start_soon(receive, i)
    done = time.perf_counter()
    note(f"scale: {n * per_holder:,} handles sent in {done - created:.1f} s")
    return done - started


# -- main -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Fill:
    """The handle-filled state: kernel counters before and after, and the time it took."""

    before: capbus.KernelStatistics
    after: capbus.KernelStatistics
    heap_before: int | None
    seconds: float
    held: int


async def main(args: argparse.Namespace) -> None:
    # Each peer is two fds here (both ends are in this process), and the kernel gives one uid
    # at most half of the fds it may hold (docs/wire-format.md "File descriptors").
    fd_limit = raise_nofile(4 * max(args.peers) + 4096)
    if fd_limit < 4 * max(args.peers) + 4096:
        most = (fd_limit - 4096) // 4
        note(f"scale: RLIMIT_NOFILE is {fd_limit}: measuring up to {most:,} peers only")
        args.peers = [p for p in args.peers if p <= most] or [2]
    per_holder = args.handles // args.holders
    limits = capbus.Limits(
        peers_per_user=max(*args.peers, args.holders) + 256,
        handles_held=2 * per_holder + 256,
        nodes_owned=per_holder + 256,
        user_handles=2 * args.handles + 4 * max(*args.peers, args.holders) + 4096,
        peer_handles=4 * per_holder + 4096,  # a holder may have all its handles queued at once
    )
    states: list[State] = []
    async with capbus.open_kernel(limits=limits) as kernel:
        pair = await PeerPair.connect(kernel)
        keeper = await FdKeeper.start(args.pin)
        try:
            await settle(kernel, 2)
            states.append(await measure(kernel, pair, "2 peers", args))
            for count in args.peers[1:]:
                # The idle peers hold handles to B's node, which A gives them.
                await add_idle_peers(pair.a, pair.b_in_a, count - kernel.statistics().peers, keeper)
                await settle(kernel, count)
                states.append(await measure(kernel, pair, f"{count:,} peers", args))
        finally:
            await keeper.aclose()
        await settle(kernel, 2)
        states.append(await measure(kernel, pair, "2 peers again (noise check)", args))

        others = [await kernel.connect() for _ in range(args.holders - 2)]
        before, heap_before = kernel.statistics(), heap_bytes()
        seconds = await fill_handles([pair.a, pair.b, *others], per_holder)
        after = await settle(kernel, args.holders)
        label = f"{args.holders} peers, {per_holder * args.holders:,} handles held"
        states.append(await measure(kernel, pair, label, args))
        for peer in others:
            await peer.aclose()
        await pair.aclose()
    report(args, states, Fill(before, after, heap_before, seconds, per_holder * args.holders))


def report(args: argparse.Namespace, states: list[State], fill: Fill) -> None:
    base = states[0]
    where = f"A, B and the kernel thread on CPU {args.pin}" if args.pin is not None else "not pinned"
    print(
        f"# scale: in-process Peer API round trips, {args.iterations} x {args.runs} runs per state, "
        f"{where}; {machine()}\n"
    )
    headers = ["state", "peers", "handles", "rtt median us", "rtt p99 us", "vs 2 peers", "kernel bytes"]
    rows = [
        [
            s.label,
            s.peers,
            s.handles,
            s.latency.median_us,
            s.latency.p99_us,
            f"{s.latency.median_us / base.latency.median_us:.2f}x",
            s.memory,
        ]
        for s in states
    ]
    print(
        table(
            [*headers, "malloc bytes"],
            [[*r, "n/a" if s.heap is None else s.heap] for r, s in zip(rows, states, strict=True)],
        )
    )

    derived: list[list[object]] = []
    idle = [s for s in states if s.peers > base.peers and "handles held" not in s.label]
    if idle:
        top = idle[-1]
        extra = top.peers - base.peers
        derived.append(
            ["kernel bytes per idle peer (with its node and handle)", *_per(top, base, extra, extra)]
        )
    loaded = states[-1]
    new_handles = fill.after.handles - fill.before.handles
    memory = fill.after.memory_bytes - fill.before.memory_bytes
    heap = None if loaded.heap is None or fill.heap_before is None else loaded.heap - fill.heap_before
    derived.append(
        [
            "bytes per handle (owners' and holders' handles alike)",
            memory / new_handles,
            _ratio(heap, new_handles),
        ]
    )
    derived.append(
        [
            "bytes per held handle (with its node and owner's handle)",
            memory / fill.held,
            _ratio(heap, fill.held),
        ]
    )
    print()
    print(table(["derived", "kernel count", "malloc"], derived))
    nodes = fill.after.nodes - fill.before.nodes
    print(
        f"\nbuilt {fill.held:,} held handles ({new_handles:,} handles in all, {nodes:,} nodes) "
        f"in {fill.seconds:.1f} s: {fill.held / fill.seconds:,.0f} held handles/s"
    )
    worst = max(s.latency.median_us for s in states if "again" not in s.label) / base.latency.median_us
    verdict = _verdict(worst <= LATENCY_GOAL)
    print(f"worst latency = {worst:.2f}x the 2-peer figure ({verdict} <= {LATENCY_GOAL}x)")
    per_handle = memory / new_handles
    verdict = _verdict(per_handle <= BYTES_GOAL)
    print(f"kernel memory = {per_handle:.0f} bytes per handle ({verdict} <= {BYTES_GOAL})")


def _per(top: State, base: State, n_memory: int, n_heap: int) -> list[object]:
    heap = None if top.heap is None or base.heap is None else top.heap - base.heap
    return [(top.memory - base.memory) / n_memory, _ratio(heap, n_heap)]


def _ratio(total: int | None, n: int) -> float | str:
    return "n/a" if total is None else total / n


def _verdict(ok: bool) -> str:
    return "meets the goal of" if ok else "misses the goal of"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a run of about 10 seconds")
    parser.add_argument(
        "--peers", type=int, nargs="+", help="peer counts (default 1000 10000, quick 100 1000)"
    )
    parser.add_argument(
        "--handles", type=int, help="handles held in the last state (default 1,000,000, quick 100,000)"
    )
    parser.add_argument("--holders", type=int, default=100, help="peers holding them (default 100)")
    parser.add_argument("--iterations", type=int, help="round trips per run (default 2000, quick 500)")
    parser.add_argument("--warmup", type=int, help="untimed round trips first (default 200, quick 100)")
    parser.add_argument("--runs", type=int, help="runs per state (default 5, quick 1)")
    parser.add_argument(
        "--pin",
        type=int,
        default=0,
        metavar="CPU",
        help="while measuring, run this process and its kernel thread on this one CPU (default 0), "
        "which takes the machine's cross-CPU wakeup noise out of the ratios; -1: do not pin",
    )
    parser.add_argument("--keep-fds", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.peers = sorted({2, *(args.peers or ([100, 1000] if args.quick else [1000, 10000]))})
    args.handles = args.handles or (100_000 if args.quick else 1_000_000)
    args.iterations = args.iterations or (500 if args.quick else 2000)
    args.warmup = args.warmup if args.warmup is not None else (100 if args.quick else 200)
    args.runs = args.runs or (1 if args.quick else 5)
    args.pin = None if args.pin < 0 else args.pin
    if args.holders < 2 or args.handles < args.holders:
        parser.error("need at least 2 holders and a handle per holder")
    return args


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    if arguments.keep_fds is not None:
        keep_fds(arguments.keep_fds)
    else:
        trio.run(main, arguments)
