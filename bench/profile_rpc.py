"""Where an echo call's time goes, client and server side (issue 10): both run under cProfile
in their own processes (the kernel embedded in this one), and each side's own time is summed
by layer, per call.

    .venv/bin/python bench/profile_rpc.py [--calls N] [--handlers def|async] [--top K]

cProfile adds a fixed cost to every Python function call, so the Python layers read high
against the syscalls; the proportions between layers are what this is for.
"""

from __future__ import annotations

import argparse
import collections
import pstats
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rpc  # noqa: E402  (the benchmark's client and server, by path like the other scripts)

WARM_UP = 200
LAYERS = (
    ("trio/", "trio: scheduler and socket wrappers"),
    ("capbus/peer.py", "capbus.peer: the Peer API"),
    ("capbus/_wire.py", "capbus._wire: frame codec"),
    ("capbus/rpc/vat.py", "capbus.rpc.vat: the trio IO driver"),
    ("capbus/rpc/engine.py", "capbus.rpc.engine: questions and answers"),
    ("capbus/rpc/callers.py", "capbus.rpc.callers: per-caller turns"),
    ("capbus/rpc/protocol.py", "capbus.rpc.protocol: the envelope"),
    ("capbus/rpc/capwire.py", "capbus.rpc.capwire: capability pointers, tree check"),
    ("capbus/rpc/header.py", "capbus.rpc.header: the fast call header"),
    ("capbus/rpc/structs.py", "capbus.rpc.structs: params and results"),
    ("capbus/rpc/client.py", "capbus.rpc.client and stubs"),
    ("capbus/rpc/stubs.py", "capbus.rpc.client and stubs"),
    ("capbus/rpc/server.py", "capbus.rpc.server: dispatch"),
    ("capnp", "pycapnp"),
    ("bench/", "the benchmark's own loop"),
)


def layer(function: tuple[str, int, str]) -> str:
    filename, _, name = function
    if filename == "~":
        if "poll" in name:
            return "(epoll_wait: idle, waiting for the other side)"
        if any(word in name for word in ("sendmsg", "recvmsg", "recv_into")):
            return "socket syscalls"
        return "C builtins"
    for key, label in LAYERS:
        if key in filename:
            return label
    return "other Python"


def by_layer(profile: Path, calls: int) -> list[tuple[str, float]]:
    totals: collections.Counter[str] = collections.Counter()
    stats = pstats.Stats(str(profile)).stats  # type: ignore[attr-defined]
    for function, (_, _, own, _, _) in stats.items():
        totals[layer(function)] += own
    return [(name, seconds / calls * 1e6) for name, seconds in totals.most_common()]


async def profile(calls: int, handlers: str, where: Path) -> None:
    def command(role: str, out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "cProfile", "-o", str(out), rpc.__file__, "--child", role, *extra]

    import capbus

    async with capbus.open_kernel() as kernel, await kernel.connect() as launcher:
        inbox = await launcher.create_node()
        with await launcher.create_peer(handles=[inbox]) as server_socket:
            fd = str(server_socket.fileno())
            server = await trio.lowlevel.open_process(
                command("capbus-server", where / "server.prof", "--fd", fd, "--handlers", handlers),
                pass_fds=[server_socket.fileno()],
            )
        (handle,) = (await launcher.recv()).handles
        with await launcher.create_peer(handles=[handle]) as client_socket:
            fd = str(client_socket.fileno())
            with trio.fail_after(600):
                await trio.run_process(
                    command("capbus-client", where / "client.prof", "--fd", fd, "--mode", "rtt")
                    + ["--iterations", str(calls)],
                    pass_fds=[client_socket.fileno()],
                    capture_stdout=True,
                )
        server.send_signal(2)  # SIGINT: cProfile writes its file on the way out
        with trio.fail_after(60):
            await server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--handlers", choices=("def", "async"), default="def")
    parser.add_argument("--top", type=int, default=25, help="also list the top functions of each side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        where = Path(directory)
        trio.run(profile, args.calls, args.handlers, where)
        calls = args.calls + WARM_UP
        for side in ("client", "server"):
            print(f"\n## {side}: own time per call, by layer (us, under cProfile)\n")
            print("| us | layer |\n|---:|---|")
            for name, us in by_layer(where / f"{side}.prof", calls):
                if us >= 0.05:
                    print(f"| {us:.1f} | {name} |")
            if args.top:
                print(f"\n<details><summary>{side}: top {args.top} functions by own time</summary>\n\n```")
                pstats.Stats(str(where / f"{side}.prof"), stream=sys.stdout).sort_stats(
                    "tottime"
                ).print_stats(args.top)
                print("```\n</details>")


if __name__ == "__main__":
    main()
