"""capbus: an embedded kernel in the runner, the server and the client each a peer of it in
their own process, calls through capbus.rpc with dynamic stubs and plain ``def`` handlers
(run inline in the server's receive loop)."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..memfd import sealed_payload
from .processes import Offer, Spawn, Tally, free_tcp_port, stamp_trio, subscribers_process, subscribers_wanted
from .workloads import (
    DATA_SIZES,
    PAYLOAD,
    data_rate,
    in_flight_trio,
    oneway_rate,
    round_trips,
    run_plan,
    stream_rate,
)

LABEL = "capbus"
PACKAGES: dict[str, str] = {}
PROGRAMS: dict[str, str] = {}
UNSUPPORTED: dict[str, str] = {}
_LARGEST = 128 << 20
"""The server takes calls this large (the 64 MiB data call and its envelope)."""


def _schema() -> Any:
    import capbus
    from capbus._resources import schema_directory

    return capbus.load(os.path.join(schema_directory(), "capbus", "bench.capnp"))


@asynccontextmanager
async def sitting(spawn_server: Spawn, plan: dict[str, int]) -> AsyncIterator[Offer]:
    import capbus

    async with capbus.open_kernel() as kernel, await kernel.connect() as launcher:
        inbox = await launcher.create_node()
        # (the network workloads: the server also serves over TCP and at a unix: address)
        directory = tempfile.TemporaryDirectory(prefix="capbus-bench-")
        net = {"tcp_port": free_tcp_port(), "unix": os.path.join(directory.name, "bench")}
        with await launcher.create_peer(handles=[inbox]) as server_socket:
            await spawn_server({"fd": server_socket.fileno(), **net}, [server_socket.fileno()])
        with trio.fail_after(60):
            (handle,) = (await launcher.recv()).handles
        # The multicast workloads' subscribers: a peer each, in one process; each sends its
        # object's handle (and its index) to the launcher, which hands them all to the client
        # when it asks (a seed holds at most 256 handles: the Bench's and the inbox's here).
        wanted = subscribers_wanted(plan)
        sockets = [await launcher.create_peer(handles=[inbox]) for _ in range(wanted)]
        fds = [s.fileno() for s in sockets]
        try:
            async with subscribers_process(spawn_server, plan, {"fds": fds}, fds) as pipe:
                for sock in sockets:
                    sock.close()
                subscribers = [handle] * wanted
                with trio.fail_after(60):
                    for _ in range(wanted):
                        message = await launcher.recv()
                        subscribers[int(message.payload)] = message.handles[0]

                async def hand_out() -> None:
                    with trio.fail_after(60):
                        (client_node,) = (await launcher.recv()).handles
                        await launcher.send(client_node, b"subscribers", handles=subscribers)

                seed = [handle, inbox] if wanted else [handle]
                async with trio.open_nursery() as nursery:
                    if wanted:
                        nursery.start_soon(hand_out)
                    with await launcher.create_peer(handles=seed) as client_socket:
                        fd = client_socket.fileno()
                        yield {"fd": fd, "pipe": pipe, **net}, [fd] if pipe is None else [fd, pipe]
                    nursery.cancel_scope.cancel()
        finally:
            for sock in sockets:
                sock.close()
            directory.cleanup()


def serve(config: dict[str, Any]) -> None:
    import capbus
    from capbus.rpc.vat import open_vat

    schema = _schema()

    class Bench(schema.Bench.Server):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.calls = 0
            self.streamed = 0

        def echo(self, text: str) -> str:
            return text

        def ping(self) -> None:
            self.calls += 1

        def take(self, cap: Any) -> None:
            self.calls += 1

        def received(self) -> int:
            return self.calls

        def data(self, data: bytes | memoryview) -> int:
            return len(data)  # (a view of the call's mapped memfd: no copy)

        def sink(self, data: bytes | memoryview) -> None:
            self.streamed += len(data)

    async def main() -> None:
        try:
            async with (
                capbus.Peer.from_socket(config["fd"]) as peer,
                open_vat(peer, max_message_bytes=_LARGEST) as vat,
            ):
                (launcher,) = (await peer.take_seed()).handles
                await peer.send(launcher, b"bench", handles=[await vat.export(Bench())])
                async with (
                    capbus.serve(Bench(), f"tcp:127.0.0.1:{config['tcp_port']}"),
                    capbus.serve(Bench(), f"unix:{config['unix']}"),
                ):
                    print("ready", flush=True)
                    await trio.sleep_forever()
        except capbus.Disconnected:
            pass

    trio.run(main)


def subscribe(config: dict[str, Any]) -> None:
    """The subscribers process: one peer and vat per subscriber, each exporting a listener."""
    from contextlib import AsyncExitStack

    import capbus
    from capbus.rpc.vat import open_vat

    schema = _schema()
    tally = Tally(config["plan"], config["pipe"])

    class Listener(schema.Subscriber.Server):  # type: ignore[misc,name-defined]
        def event(self, seq: int) -> None:
            tally.delivered()

    async def main() -> None:
        try:
            async with AsyncExitStack() as stack:
                for index, fd in enumerate(config["fds"]):
                    peer = await stack.enter_async_context(capbus.Peer.from_socket(fd))
                    vat = await stack.enter_async_context(open_vat(peer))
                    (launcher,) = (await peer.take_seed()).handles
                    await peer.send(launcher, str(index).encode(), handles=[await vat.export(Listener())])
                print("ready", flush=True)
                await trio.sleep_forever()
        except capbus.Disconnected:
            pass

    trio.run(main)


def measure(config: dict[str, Any]) -> dict[str, Any]:
    import capbus
    from capbus.rpc.vat import open_vat

    schema = _schema()

    class Local(schema.Bench.Server):  # type: ignore[misc,name-defined]
        pass

    async def main() -> dict[str, Any]:
        async with capbus.Peer.from_socket(config["fd"]) as peer:
            handle, *inbox = (await peer.take_seed()).handles
            subscriber_handles: tuple[capbus.Handle, ...] = ()
            if inbox:  # the multicast workloads' subscribers, from the launcher
                node = await peer.create_node()
                await peer.send(inbox[0], b"subscribers?", handles=[node])
                with trio.fail_after(60):
                    subscriber_handles = (await peer.recv()).handles
                await peer.destroy(node)
            async with open_vat(peer) as vat:
                bench = vat.client(handle, schema.Bench)
                subscribers = [vat.client(h, schema.Subscriber) for h in subscriber_handles]
                event = schema.Subscriber.interface.methods["event"]

                async def publish(n: int, seq: int) -> None:
                    # One send for all n subscribers, without waiting for the kernel's word on
                    # each (a lost event shows as a batch the subscribers never complete).
                    await vat.multicast_oneway(subscribers[:n], event, {"seq": seq})

                for _ in range(200):
                    await bench.echo(PAYLOAD)

                async def received() -> int:
                    return int((await bench.received()).calls)

                async def carry(size: int, n: int) -> dict[str, float]:
                    data = bytes(size)
                    return data_rate(size, await round_trips(lambda: bench.data(data=data), n))

                async def carry_sealed(n: int) -> dict[str, float]:
                    size = DATA_SIZES["data64M"]
                    data = sealed_payload(size, lambda view: view.__setitem__(slice(None), bytes(size)))
                    return data_rate(size, await round_trips(lambda: bench.data(data=data), n))

                async def connect_once() -> None:
                    async with capbus.connect(f"unix:{config['unix']}", schema.Bench) as reached:
                        await reached.echo(PAYLOAD)

                async def plan(tcp: Any) -> dict[str, Any]:
                    return await run_plan(
                        config["plan"],
                        {
                            "tcp_echo32": lambda n: round_trips(lambda: tcp.echo(PAYLOAD), n),
                            "tcp_inflight64": lambda n: in_flight_trio(tcp.ping, n),
                            "connect": lambda n: round_trips(connect_once, n),
                            "echo32": lambda n: round_trips(lambda: bench.echo(PAYLOAD), n),
                            "oneway": lambda n: oneway_rate(bench.ping.oneway, received, n),
                            "inflight64": lambda n: in_flight_trio(bench.ping, n),
                            # A new object each call: exported, passed, released and collected.
                            "cap": lambda n: round_trips(lambda: bench.take(cap=Local()), n),
                            "ping": lambda n: round_trips(bench.ping, n),
                            **{name: functools.partial(carry, size) for name, size in DATA_SIZES.items()},
                            "data64Msealed": carry_sealed,
                            "stream1G": lambda n: stream_rate(
                                lambda chunk: bench.sink(data=chunk), received, n
                            ),
                        },
                        publish,
                        functools.partial(stamp_trio, config["pipe"]),
                    )

                tcp_address = f"tcp:127.0.0.1:{config['tcp_port']}"
                async with capbus.connect(tcp_address, schema.Bench) as tcp:
                    for _ in range(200):
                        await tcp.echo(PAYLOAD)
                    return await plan(tcp)

    result: dict[str, Any] = trio.run(main)
    return result
