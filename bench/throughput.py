"""One-way throughput: 32-byte messages per second from a sender process to a receiver
process, through the capbus kernel and through a plain C epoll relay (the floor for any
broker).

    .venv/bin/python bench/throughput.py [--quick]

Systems, each driven by a sender process and a receiver process:

  relay        bench/relay.c (built here with gcc into bench/build/relay) forwards every
               datagram; sender and receiver are the raw drivers below;
  raw frames   the capbus kernel (embedded in this process, on its own thread), driven by
               the same raw drivers: the sender writes a pre-built SEND frame as fast as the
               socket takes it and drains the kernel's replies, the receiver counts MESSAGE
               frames. Nothing of the Peer API runs: this is the kernel's own cost. The
               kernel refuses a send when the receiver's queue is full (EDQUOT; the relay
               instead stops reading, which blocks the sender): the sender either pauses
               --backoff-ms after a refusal, or ignores refusals and keeps flooding;
  one-way      the same raw drivers with CAPBUS_SEND_FLAG_QUIET frames: the kernel answers
               only refusals, as a one-way message needs;
  Peer API     the kernel driven by Peer.send / Peer.recv, with 1 send in flight (each send
               waits for its reply) and with --window sends in flight (that many trio tasks),
               and by Peer.send_oneway from one task.

The receiver counts what arrives during --seconds after a --warmup from its first message.
Meanwhile this process samples the CPU time of the sender, the broker (the relay process or
the kernel's thread) and the receiver, which says where each message's time goes. Runs are
interleaved and the median is reported. Sends the kernel refused (EDQUOT: the receiver's
queue is full) are counted by the sender.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import trio
from _common import (
    FRAME_REPLY,
    PAYLOAD,
    RECV_SIZE,
    build_relay,
    cpu_ns,
    machine,
    note,
    process_cpu_clock,
    send_frame,
    table,
    thread_cpu_clock,
)

import capbus

System = Literal["relay", "frames", "flood", "oneway-frames", "peer", "pipelined", "oneway-peer"]
SYSTEMS: tuple[System, ...] = (
    "relay",
    "frames",
    "flood",
    "oneway-frames",
    "peer",
    "pipelined",
    "oneway-peer",
)
GOAL = 0.8
FIRST_MESSAGE_TIMEOUT = 20.0  # seconds a receiver waits for its first message
BURST = 64  # frames a raw sender writes between two looks at its replies
CHECK_EVERY = 256  # messages a receiver takes between two looks at the clock
_SEND_REPLY = struct.Struct("<i4x8xi")  # at offset 16: reply error, first destination's error


# -- the drivers (child processes) ---------------------------------------------------------------


def send_raw(fd: int, frame: bytes, seconds: float, backoff: float) -> dict[str, int]:
    """Writes ``frame`` as fast as the socket takes it for ``seconds``; drains (and checks)
    whatever comes back, which from the kernel is one reply per frame. After replies that
    refused a send (EDQUOT: the receiver's queue is full) it pauses ``backoff`` seconds,
    as a sender that means to be delivered must (0: keep flooding)."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLOUT)
    buffer = bytearray(RECV_SIZE)
    send, recv_into, unpack = sock.send, sock.recv_into, _SEND_REPLY.unpack_from
    sent = rejected = replies = 0
    deadline = time.monotonic() + seconds
    with sock:
        while time.monotonic() < deadline:
            blocked = False
            try:
                for _ in range(BURST):
                    send(frame)
                    sent += 1
            except BlockingIOError:
                blocked = True
            except OSError:
                break  # the other side is gone
            drained = 0
            refused = rejected
            try:
                while recv_into(buffer):
                    drained += 1
                    if buffer[4] == FRAME_REPLY:
                        error, first = unpack(buffer, 16)
                        rejected += bool(error or first)
            except BlockingIOError:
                pass
            replies += drained
            if backoff and rejected != refused:
                time.sleep(backoff)
            elif blocked and not drained:
                poller.poll(50)
    return {"sent": sent, "rejected": rejected, "replies": replies}


class Window:
    """The receiver's measuring window: it opens ``warmup`` after the first message and
    closes ``seconds`` later; the parent is told on stdout at both edges."""

    def __init__(self, warmup: float, seconds: float) -> None:
        self.warmup = warmup
        self.seconds = seconds
        self.opens: float | None = None
        self.closes = 0.0
        self.start: tuple[float, int] | None = None
        self.end: tuple[float, int] | None = None

    def check(self, count: int) -> bool:
        """Looks at the clock; True once the window has closed."""
        now = time.perf_counter()
        if self.opens is None:
            self.opens = now + self.warmup
            self.closes = self.opens + self.seconds
        elif self.start is None:
            if now >= self.opens:
                self.start = (now, count)
                print("start", flush=True)
        elif now >= self.closes:
            self.end = (now, count)
            print("end", flush=True)
            return True
        return False

    def result(self, total: int) -> dict[str, float]:
        if self.start is None or self.end is None:
            raise RuntimeError("the stream ended before the measuring window closed")
        return {"count": self.end[1] - self.start[1], "seconds": self.end[0] - self.start[0], "total": total}


def recv_raw(fd: int, warmup: float, seconds: float) -> dict[str, float]:
    """Counts datagrams: every one the receiver gets is a message (it never sends)."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    buffer = bytearray(RECV_SIZE)
    recv_into = sock.recv_into
    window = Window(warmup, seconds)
    count = 0
    idle_ms = int(FIRST_MESSAGE_TIMEOUT * 1000)
    with sock:
        while True:
            try:
                for _ in range(CHECK_EVERY):
                    if not recv_into(buffer):
                        raise EOFError("the sender side closed")
                    count += 1
            except BlockingIOError:
                if not poller.poll(idle_ms):
                    raise TimeoutError("no message for too long") from None
            if count and window.check(count):
                return window.result(count)


async def send_peer(fd: int, destination: int, seconds: float, window: int, backoff: float) -> dict[str, int]:
    """``window`` tasks each sending through one Peer until the time is up (a task whose
    send was refused for quota pauses ``backoff`` seconds)."""
    counts = {"sent": 0, "rejected": 0}
    deadline = trio.current_time() + seconds

    async def worker(peer: capbus.Peer) -> None:
        while trio.current_time() < deadline:
            try:
                await peer.send(destination, PAYLOAD)
                counts["sent"] += 1
            except capbus.QuotaExceeded:
                counts["rejected"] += 1
                await trio.sleep(backoff)
            except (capbus.NodeDestroyed, capbus.Disconnected):
                return

    async with capbus.Peer.from_socket(fd) as peer, trio.open_nursery() as nursery:
        for _ in range(window):
            nursery.start_soon(worker, peer)
    return counts


async def send_peer_oneway(fd: int, destination: int, seconds: float, backoff: float) -> dict[str, int]:
    """One task sending with ``Peer.send_oneway``; every BURST sends it looks for refusals
    (SEND_FAILED messages) and pauses ``backoff`` seconds after any."""
    counts = {"sent": 0, "rejected": 0}
    deadline = trio.current_time() + seconds
    async with capbus.Peer.from_socket(fd) as peer:
        while trio.current_time() < deadline:
            for _ in range(BURST):
                await peer.send_oneway(destination, PAYLOAD)
            counts["sent"] += BURST
            refused = 0
            while True:
                try:
                    message = peer.recv_nowait()
                except trio.WouldBlock:
                    break
                if message.kind is capbus.MessageKind.SEND_FAILED:
                    if not isinstance(message.error, capbus.QuotaExceeded):
                        return counts  # the receiver is gone
                    refused += 1
            counts["rejected"] += refused
            counts["sent"] -= refused
            if refused:
                await trio.sleep(backoff)
    return counts


async def recv_peer(fd: int, warmup: float, seconds: float) -> dict[str, float]:
    window = Window(warmup, seconds)
    count = 0
    async with capbus.Peer.from_socket(fd) as peer:
        with trio.fail_after(FIRST_MESSAGE_TIMEOUT + warmup + seconds):
            while True:
                for _ in range(CHECK_EVERY):
                    await peer.recv()
                    count += 1
                if window.check(count):
                    return window.result(count)


def child(args: argparse.Namespace) -> None:
    result: dict[str, int] | dict[str, float]
    if args.child == "send-raw":
        result = send_raw(args.fd, bytes.fromhex(args.frame), args.seconds, args.backoff_ms / 1000)
    elif args.child == "recv-raw":
        result = recv_raw(args.fd, args.warmup, args.seconds)
    elif args.child == "send-peer":
        result = trio.run(
            send_peer, args.fd, args.destination, args.seconds, args.window, args.backoff_ms / 1000
        )
    elif args.child == "send-peer-oneway":
        result = trio.run(send_peer_oneway, args.fd, args.destination, args.seconds, args.backoff_ms / 1000)
    else:
        result = trio.run(recv_peer, args.fd, args.warmup, args.seconds)
    print(json.dumps(result), flush=True)


# -- the parent ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    rate: float
    """Messages received per second in the window."""
    sent: int
    rejected: int
    cpu_us: dict[str, float | None]
    """CPU microseconds per received message in the window: sender, broker, receiver."""


class Lines:
    """Lines of a child's stdout."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise EOFError("a benchmark child exited early (see its error above)")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


async def spawn(role: list[str], sock: socket.socket, args: argparse.Namespace) -> trio.Process:
    command = [
        sys.executable,
        __file__,
        "--child",
        *role,
        "--fd",
        str(sock.fileno()),
        "--warmup",
        str(args.warmup),
        # The sender outlives the receiver's window: its first message starts the window.
        "--seconds",
        str(args.seconds if role[0].startswith("recv") else args.warmup + args.seconds + 1.0),
    ]
    process = await trio.lowlevel.open_process(command, pass_fds=(sock.fileno(),), stdout=subprocess.PIPE)
    sock.close()
    return process


async def drive(
    sender_role: list[str],
    sender_end: socket.socket,
    receiver_role: list[str],
    receiver_end: socket.socket,
    broker_clock: int | None,
    args: argparse.Namespace,
) -> Outcome:
    processes: list[trio.Process] = []
    try:
        receiver = await spawn(receiver_role, receiver_end, args)
        processes.append(receiver)
        sender = await spawn(sender_role, sender_end, args)
        processes.append(sender)
        assert receiver.stdout is not None and sender.stdout is not None
        clocks = {
            "sender": process_cpu_clock(sender.pid),
            "broker": broker_clock,
            "receiver": process_cpu_clock(receiver.pid),
        }
        marks: list[dict[str, int | None]] = []
        with trio.fail_after(FIRST_MESSAGE_TIMEOUT + 3 * (args.warmup + args.seconds) + 10):
            lines = Lines(receiver.stdout)
            for edge in ("start", "end"):
                if (line := await lines.next()) != edge:
                    raise RuntimeError(f"receiver said {line!r}, expected {edge!r}")
                marks.append({name: cpu_ns(clock) for name, clock in clocks.items()})
            received = json.loads(await lines.next())
            sent = json.loads(await Lines(sender.stdout).next())
            for process in processes:
                if await process.wait() != 0:
                    raise RuntimeError(f"benchmark child {process.args!r} failed")
    finally:
        sender_end.close()  # already closed unless spawning failed
        receiver_end.close()
        with trio.CancelScope(shield=True):
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    count = max(1, int(received["count"]))
    cpu: dict[str, float | None] = {}
    for name in clocks:
        before, after = marks[0][name], marks[1][name]
        cpu[name] = (after - before) / 1000 / count if before is not None and after is not None else None
    return Outcome(received["count"] / received["seconds"], sent["sent"], sent["rejected"], cpu)


async def run_system(kernel: capbus.Kernel, system: System, args: argparse.Namespace) -> Outcome:
    if system == "relay":
        sender_end, relay_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        receiver_end, relay_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = (relay_in.fileno(), relay_out.fileno())
        relay = await trio.lowlevel.open_process([str(build_relay()), *map(str, fds)], pass_fds=fds)
        relay_in.close()
        relay_out.close()
        try:
            # The same bytes the kernel gets (the relay does not look at them).
            frame = send_frame(0x9).hex()
            return await drive(
                ["send-raw", "--frame", frame],
                sender_end,
                ["recv-raw"],
                receiver_end,
                process_cpu_clock(relay.pid),
                args,
            )
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await relay.wait()
            if relay.returncode is None:
                relay.kill()
                await relay.wait()

    receiver = await kernel.connect()
    sender = await kernel.connect()
    node = await receiver.create_node()
    destination = (await receiver.transfer(node, sender)).id
    sender_end, receiver_end = sender.detach(), receiver.detach()
    broker_clock = thread_cpu_clock(kernel._thread) if kernel._thread else None
    backoff = ["--backoff-ms", str(0 if system == "flood" else args.backoff_ms)]
    if system in ("frames", "flood", "oneway-frames"):
        frame = send_frame(destination, oneway=system == "oneway-frames").hex()
        sender_role = ["send-raw", "--frame", frame, *backoff]
        return await drive(sender_role, sender_end, ["recv-raw"], receiver_end, broker_clock, args)
    if system == "oneway-peer":
        sender_role = ["send-peer-oneway", "--destination", str(destination), *backoff]
        return await drive(sender_role, sender_end, ["recv-peer"], receiver_end, broker_clock, args)
    window = 1 if system == "peer" else args.window
    sender_role = ["send-peer", "--destination", str(destination), "--window", str(window), *backoff]
    return await drive(sender_role, sender_end, ["recv-peer"], receiver_end, broker_clock, args)


def _cpu(outcomes: Sequence[Outcome], name: str) -> str:
    values = [o.cpu_us[name] for o in outcomes if o.cpu_us[name] is not None]
    return f"{statistics.median(v for v in values if v is not None):.2f}" if values else "n/a"


async def main(args: argparse.Namespace) -> None:
    build_relay()
    labels: dict[System, str] = {
        "relay": "C epoll relay (floor)",
        "frames": f"capbus kernel, raw frames (sender backs off {args.backoff_ms:g} ms on EDQUOT)",
        "flood": "capbus kernel, raw frames (sender ignores EDQUOT)",
        "oneway-frames": f"capbus kernel, raw one-way frames (backs off {args.backoff_ms:g} ms on EDQUOT)",
        "peer": "capbus kernel, Peer API, 1 in flight",
        "oneway-peer": "capbus kernel, Peer API send_oneway",
        "pipelined": f"capbus kernel, Peer API, {args.window} in flight",
    }
    systems: list[System] = ["relay", *(s for s in SYSTEMS if s != "relay" and s in args.systems)]
    outcomes: dict[System, list[Outcome]] = {s: [] for s in systems}
    async with capbus.open_kernel() as kernel:
        for run in range(args.runs):
            for system in systems:
                outcomes[system].append(await run_system(kernel, system, args))
            note(f"throughput: run {run + 1}/{args.runs} done")
    rates = {s: statistics.median(o.rate for o in outcomes[s]) for s in systems}
    rows = []
    for system in systems:
        sent = sum(o.sent for o in outcomes[system])
        rejected = sum(o.rejected for o in outcomes[system])
        rows.append(
            [
                labels[system],
                round(rates[system]),
                f"{rates[system] / rates['relay']:.2f}x",
                f"{100 * rejected / sent:.1f}%" if sent else "n/a",
                _cpu(outcomes[system], "sender"),
                _cpu(outcomes[system], "broker"),
                _cpu(outcomes[system], "receiver"),
            ]
        )
    print(
        f"# throughput: 32-byte messages, {args.seconds:g} s windows x {args.runs} runs "
        f"(median); {machine()}\n"
    )
    headers = [
        "system",
        "msgs/s",
        "/ relay",
        "sends refused",
        "sender us/msg",
        "broker us/msg",
        "receiver us/msg",
    ]
    print(table(headers, rows))
    print("\n(us/msg: CPU time per received message, sampled over the window)")
    for system in (s for s in ("frames", "oneway-frames", "pipelined", "oneway-peer") if s in systems):
        ratio = rates[system] / rates["relay"]
        verdict = "meets" if ratio >= GOAL else "misses"
        print(f"{labels[system]} / relay = {ratio:.2f} ({verdict} the goal of >= {GOAL})")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a run of about 10 seconds")
    parser.add_argument("--seconds", type=float, help="measuring window (default 3, quick 1)")
    parser.add_argument("--warmup", type=float, help="before the window (default 0.5, quick 0.3)")
    parser.add_argument("--runs", type=int, help="runs of each system (default 3, quick 1)")
    parser.add_argument(
        "--window", type=int, default=16, help="sends in flight for the pipelined Peer API run"
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=SYSTEMS,
        default=list(SYSTEMS),
        help="what to measure (the relay always runs: it is the baseline)",
    )
    parser.add_argument(
        "--backoff-ms", type=float, default=1.0, help="pause of a sender after a refused send (default 1)"
    )
    parser.add_argument(
        "--child",
        choices=["send-raw", "recv-raw", "send-peer", "send-peer-oneway", "recv-peer"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--frame", help=argparse.SUPPRESS)
    parser.add_argument("--destination", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (1.0 if args.quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 0.5)
    args.runs = args.runs or (1 if args.quick else 3)
    return args


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    if arguments.child:
        child(arguments)
    else:
        trio.run(main, arguments)
