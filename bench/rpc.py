"""RPC benchmarks (issue 4): client and server always in separate processes.

    .venv/bin/python bench/rpc.py [--quick]

1. Round trip of echo(Text) -> Text with 32 bytes: capbus (Peer API + vat, dynamic stubs),
   pycapnp's own RPC over a unix socket (asyncio, TwoPartyServer/Client), and a raw trio
   SOCK_SEQPACKET socketpair ping-pong, all measured in this run. Goals: capbus / pycapnp
   < 1.0, capbus / raw <= 1.6.
2. Calls per second: one-way calls from one task, and two-way calls with 64 in flight.
   Goal: >= 100,000/s.
3. The cost of passing a capability in a call (take(cap)) against a call without (ping()),
   per call; afterwards the kernel's node and handle counts must be back where they were
   (nothing leaked).

Each client process prints one JSON line; this process runs the kernel and prints tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from capbus.bench.workloads import round_trips, summary

HERE = Path(__file__).resolve().parent
SCHEMA = HERE / "rpc_bench.capnp"
PAYLOAD = "x" * 32
ONEWAY_BATCH = 256


# -- children ----------------------------------------------------------------------------------


async def capbus_server(fd: int, handlers: str) -> None:
    import capbus
    from capbus.rpc.vat import open_vat

    schema: Any = capbus.load(SCHEMA)

    class Bench(schema.Bench.Server):  # type: ignore[misc]
        """Handlers as async def: a task per call."""

        def __init__(self) -> None:
            self.calls = 0

        async def echo(self, text: str) -> str:
            return text

        async def ping(self) -> None:
            self.calls += 1

        async def take(self, cap: Any) -> None:
            self.calls += 1

        async def received(self) -> int:
            return self.calls

    class InlineBench(schema.Bench.Server):  # type: ignore[misc]
        """The same handlers as plain def: run inline in the receive loop."""

        def __init__(self) -> None:
            self.calls = 0

        def echo(self, text: str) -> str:
            return text

        def ping(self) -> None:
            self.calls += 1

        def take(self, cap: Any) -> None:
            self.calls += 1

        def received(self) -> int:
            return self.calls

    try:
        async with capbus.Peer.from_socket(fd) as peer, open_vat(peer) as vat:
            (launcher,) = (await peer.take_seed()).handles
            server = Bench() if handlers == "async" else InlineBench()
            await peer.send(launcher, b"bench", handles=[await vat.export(server)])
            await trio.sleep_forever()
    except capbus.Disconnected:
        pass


async def capbus_client(fd: int, mode: str, iterations: int) -> dict[str, Any]:
    import capbus
    from capbus.rpc.vat import open_vat

    schema: Any = capbus.load(SCHEMA)

    class Local(schema.Bench.Server):  # type: ignore[misc]
        pass

    async with capbus.Peer.from_socket(fd) as peer, open_vat(peer) as vat:
        (handle,) = (await peer.take_seed()).handles
        bench = vat.client(handle, schema.Bench)
        for _ in range(200):
            await bench.echo(PAYLOAD)
        if mode == "rtt":
            return await round_trips(lambda: bench.echo(PAYLOAD), iterations)
        if mode == "oneway":
            # One-way calls have no flow control of their own (that is what -> stream is
            # for): sent flat out they fill the server's quota and the kernel refuses the
            # rest. So: batches of BATCH, each followed by a two-way call as a barrier.
            before = (await bench.received()).calls
            start = time.perf_counter()
            for _ in range(iterations // ONEWAY_BATCH):
                for _ in range(ONEWAY_BATCH):
                    await bench.ping.oneway()
                await bench.received()
            elapsed = time.perf_counter() - start
            delivered = (await bench.received()).calls - before
            sent = iterations // ONEWAY_BATCH * ONEWAY_BATCH
            return {"calls_per_s": sent / elapsed, "lost": sent - delivered}
        if mode == "inflight":
            per_task = iterations // 64

            async def worker() -> None:
                for _ in range(per_task):
                    await bench.ping()

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(64):
                    nursery.start_soon(worker)
            return {"calls_per_s": per_task * 64 / (time.perf_counter() - start)}
        if mode in ("caps", "leak"):
            result: dict[str, Any] = {}
            for name in ("ping", "take") if mode == "caps" else ("take",):
                start = time.perf_counter()
                for _ in range(iterations):
                    if name == "ping":
                        await bench.ping()
                    else:
                        await bench.take(cap=Local())  # a new object each call: export, pass, collect
                result[f"{name}_us"] = (time.perf_counter() - start) / iterations * 1e6
            if mode == "leak":
                # Every object retired (polled, bounded), and how many of their nodes the vat
                # keeps as spares for the next objects it exports: the launcher counts them.
                with trio.fail_after(60):
                    while vat.statistics().exports:
                        await trio.sleep(0.01)
                result["spare_nodes"] = vat.statistics().spare_nodes
                # Still connected: the launcher now checks the kernel's counts, then closes
                # our stdin (a disconnect would destroy our nodes and hide a leak).
                print(json.dumps(result), flush=True)
                await trio.to_thread.run_sync(sys.stdin.read)
            return result
        raise ValueError(mode)


def pycapnp_server(path: str) -> None:
    import capnp

    capnp.remove_import_hook()
    module: Any = capnp.load(str(SCHEMA))

    class Bench(module.Bench.Server):  # type: ignore[misc]
        async def echo(self, text: str, **kwargs: Any) -> str:
            return text

    async def main() -> None:
        async def connection(stream: Any) -> None:
            await capnp.TwoPartyServer(stream, bootstrap=Bench()).on_disconnect()

        server = await capnp.AsyncIoStream.create_unix_server(connection, path)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(capnp.run(main()))


def pycapnp_client(path: str, iterations: int) -> dict[str, Any]:
    import capnp

    capnp.remove_import_hook()
    module: Any = capnp.load(str(SCHEMA))
    out: dict[str, Any] = {}

    async def main() -> None:
        stream = await capnp.AsyncIoStream.create_unix_connection(path)
        bench = capnp.TwoPartyClient(stream).bootstrap().cast_as(module.Bench)
        for _ in range(200):
            await bench.echo(PAYLOAD)
        out.update(await round_trips(lambda: bench.echo(PAYLOAD), iterations))

    asyncio.run(capnp.run(main()))
    return out


async def raw_echo(fd: int) -> None:
    with trio.socket.from_stdlib_socket(socket.socket(fileno=fd)) as sock:
        buffer = bytearray(4096)
        while n := await sock.recv_into(buffer):
            await sock.send(memoryview(buffer)[:n])


async def raw_client(fd: int, iterations: int) -> dict[str, Any]:
    with trio.socket.from_stdlib_socket(socket.socket(fileno=fd)) as sock:
        message = PAYLOAD.encode()
        buffer = bytearray(4096)
        for _ in range(200):
            await sock.send(message)
            await sock.recv_into(buffer)
        samples = []
        clock = time.perf_counter_ns
        for _ in range(iterations):
            start = clock()
            await sock.send(message)
            await sock.recv_into(buffer)
            samples.append(clock() - start)
        return summary(samples)


def child(args: argparse.Namespace) -> None:
    role = args.child
    if role == "capbus-server":
        trio.run(capbus_server, args.fd, args.handlers)
    elif role == "capbus-client":
        print(json.dumps(trio.run(capbus_client, args.fd, args.mode, args.iterations)), flush=True)
    elif role == "pycapnp-server":
        pycapnp_server(args.path)
    elif role == "pycapnp-client":
        print(json.dumps(pycapnp_client(args.path, args.iterations)), flush=True)
    elif role == "raw-echo":
        trio.run(raw_echo, args.fd)
    elif role == "raw-client":
        print(json.dumps(trio.run(raw_client, args.fd, args.iterations)), flush=True)


# -- the parent --------------------------------------------------------------------------------


def _command(role: str, *extra: str) -> list[str]:
    return [sys.executable, __file__, "--child", role, *extra]


async def _client_json(command: list[str], fds: tuple[int, ...] = (), bound: float = 600) -> dict[str, Any]:
    with trio.fail_after(bound):
        done = await trio.run_process(command, pass_fds=fds, capture_stdout=True)
    parsed: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return parsed


@asynccontextmanager
async def bench_server(handlers: str = "async") -> AsyncIterator[tuple[Any, socket.socket]]:
    """An embedded kernel and a bench server in a child process (its handlers ``async`` def
    or plain ``def``); yields the kernel and a new peer's socket whose seed holds the
    server's capability (for the client process)."""
    import capbus

    async with capbus.open_kernel() as kernel, await kernel.connect() as launcher:
        inbox = await launcher.create_node()
        server_socket = await launcher.create_peer(handles=[inbox])
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: trio.run_process(
                    _command("capbus-server", "--fd", str(server_socket.fileno()), "--handlers", handlers),
                    pass_fds=[server_socket.fileno()],
                    check=False,
                    task_status=task_status,
                )
            )
            server_socket.close()
            (handle,) = (await launcher.recv()).handles
            client_socket = await launcher.create_peer(handles=[handle])
            try:
                yield kernel, client_socket
            finally:
                client_socket.close()
                server.terminate()


async def measure_capbus(
    mode: str, iterations: int, handlers: str = "async"
) -> tuple[dict[str, Any], tuple[int, int, int, int]]:
    import capbus.testing

    async with bench_server(handlers) as (kernel, client_socket):
        before = kernel.statistics()
        command = _command("capbus-client", "--fd", str(client_socket.fileno()), "--mode", mode)
        result = await _client_json(
            [*command, "--iterations", str(iterations)],
            (client_socket.fileno(),),
            bound=600 + iterations * 0.002,  # a leak check runs for many minutes
        )
        client_socket.close()
        # The client is gone: everything it held must be released, nothing else left.
        with trio.fail_after(30):
            await capbus.testing.wait_for_statistics(kernel, lambda s: s.peers == before.peers - 1)
        with trio.move_on_after(10):
            await capbus.testing.wait_for_statistics(
                kernel, lambda s: s.nodes <= before.nodes and s.handles <= before.handles - 1
            )
        after = kernel.statistics()
    return result, (before.nodes, before.handles, after.nodes, after.handles)


async def measure_pycapnp(iterations: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "sock")
        async with trio.open_nursery() as nursery:
            server = await trio.lowlevel.open_process(_command("pycapnp-server", "--path", path), stdout=-1)
            assert server.stdout is not None
            with trio.fail_after(30):
                await server.stdout.receive_some(16)
            result = await _client_json(
                [*_command("pycapnp-client", "--path", path), "--iterations", str(iterations)]
            )
            server.terminate()
            await server.wait()
            nursery.cancel_scope.cancel()
    return result


async def measure_raw(iterations: int) -> dict[str, Any]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    echo = await trio.lowlevel.open_process(
        _command("raw-echo", "--fd", str(b.fileno())), pass_fds=[b.fileno()]
    )
    b.close()
    try:
        return await _client_json(
            [*_command("raw-client", "--fd", str(a.fileno())), "--iterations", str(iterations)], (a.fileno(),)
        )
    finally:
        a.close()
        await echo.wait()


async def leak_check(calls: int) -> None:
    """A capability-passing run of ``calls`` calls; the kernel's counts are taken while the
    client is still connected (its exit would destroy its nodes and hide a leak)."""
    import capbus.testing

    async with bench_server() as (kernel, client_socket):
        before = kernel.statistics()
        command = _command("capbus-client", "--fd", str(client_socket.fileno()), "--mode", "leak")
        client = await trio.lowlevel.open_process(
            [*command, "--iterations", str(calls)],
            pass_fds=(client_socket.fileno(),),
            stdin=-1,
            stdout=-1,
        )
        client_socket.close()
        assert client.stdout is not None and client.stdin is not None
        start = time.perf_counter()
        with trio.fail_after(600 + calls * 0.002):
            line = b""
            while not line.endswith(b"\n"):
                line += await client.stdout.receive_some(4096)
        elapsed = time.perf_counter() - start
        result = json.loads(line)
        # Settled, with the client connected: its first reply node and its reply node for
        # the bench object (each with its owner's handle), the server's one kept handle to
        # the latter, and the client's spare nodes (retired, with their owner's handles),
        # are all that was added; nothing else.
        spare = result["spare_nodes"]
        expected = (before.nodes + 2 + spare, before.handles + 3 + spare)
        with trio.move_on_after(30):
            await capbus.testing.wait_for_statistics(kernel, lambda s: (s.nodes, s.handles) == expected)
        during = kernel.statistics()
        await client.stdin.aclose()
        await client.wait()
    print(f"# rpc leak check: {calls:,} calls passing a capability, {elapsed:.0f} s")
    print(f"take(cap) with a new exported object each call: {result['take_us']:.1f} us per call")
    print(
        f"kernel with the client still connected: {during.nodes} nodes, {during.handles} handles "
        f"(before: {before.nodes} and {before.handles}; expected {expected[0]} and {expected[1]}: "
        f"{'nothing left over' if (during.nodes, during.handles) == expected else 'LEFT OVER'})"
    )


async def main(args: argparse.Namespace) -> None:
    if args.leak_check:
        await leak_check(args.leak_check)
        return
    n = 2_000 if args.quick else 10_000
    runs = 1 if args.quick else 3
    rtt: dict[str, list[dict[str, Any]]] = {"raw": [], "pycapnp": [], "capbus": [], "capbus def": []}
    for _ in range(runs):
        rtt["raw"].append(await measure_raw(n))
        rtt["pycapnp"].append(await measure_pycapnp(n))
        rtt["capbus"].append((await measure_capbus("rtt", n))[0])
        rtt["capbus def"].append((await measure_capbus("rtt", n, "def"))[0])
    median = {k: statistics.median(r["median_us"] for r in v) for k, v in rtt.items()}
    p99 = {k: statistics.median(r["p99_us"] for r in v) for k, v in rtt.items()}
    print(
        "# rpc: echo(Text) -> Text, 32 bytes, client and server in separate processes, "
        f"{n} calls x {runs} runs\n"
    )
    print("| variant | median us | p99 us | / raw | / pycapnp |")
    print("|---|---:|---:|---:|---:|")
    labels = {
        "raw": "raw trio socketpair",
        "pycapnp": "pycapnp RPC (asyncio, unix socket)",
        "capbus": "capbus, `async def` handler",
        "capbus def": "capbus, `def` handler (inline)",
    }
    for name, label in labels.items():
        print(
            f"| {label} | {median[name]:.1f} | {p99[name]:.1f} | {median[name] / median['raw']:.2f}x | "
            f"{median[name] / median['pycapnp']:.2f}x |"
        )
    print()
    for name in ("capbus", "capbus def"):
        vs_pycapnp = median[name] / median["pycapnp"]
        vs_raw = median[name] / median["raw"]
        verdict = ("met" if vs_pycapnp < 1 else "missed", "met" if vs_raw <= 1.6 else "missed")
        print(
            f"{labels[name]}: / pycapnp = {vs_pycapnp:.2f} (goal < 1.0: {verdict[0]}),"
            f" / raw = {vs_raw:.2f} (goal <= 1.6: {verdict[1]})"
        )

    calls = 20_000 if args.quick else 100_000
    print("\n| calls per second (goal >= 100,000) | `async def` handlers | `def` handlers |")
    print("|---|---:|---:|")
    lost = 0
    oneway = [await measure_capbus("oneway", calls, h) for h in ("async", "def")]
    inflight = [await measure_capbus("inflight", calls, h) for h in ("async", "def")]
    row = " | ".join(f"{r['calls_per_s']:,.0f}" for r, _ in oneway)
    print(f"| one-way, one task, a two-way barrier every {ONEWAY_BATCH} | {row} |")
    row = " | ".join(f"{r['calls_per_s']:,.0f}" for r, _ in inflight)
    print(f"| two-way, 64 in flight | {row} |")
    lost = sum(r["lost"] for r, _ in oneway)
    print(f"\none-way calls lost: {lost}")

    cap_calls = 2_000 if args.quick else 20_000
    caps, counts = await measure_capbus("caps", cap_calls)
    print("\n| call | us per call |")
    print("|---|---:|")
    print(f"| ping() | {caps['ping_us']:.1f} |")
    print(f"| take(cap) with a new exported object each call | {caps['take_us']:.1f} |")
    print(f"\ncost of passing a capability: {caps['take_us'] - caps['ping_us']:.1f} us per call")
    print(
        f"kernel after {cap_calls} capability-passing calls and the client's exit: "
        f"nodes {counts[0]} -> {counts[2]},"
        f" handles {counts[1]} -> {counts[3]} (the client's own node and handles gone; nothing leaked)"
    )


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--leak-check", type=int, metavar="CALLS", help="only the capability-passing run, with CALLS calls"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--handlers", default="async", help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, default=1000, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    if arguments.child:
        child(arguments)
    else:
        trio.run(main, arguments)
