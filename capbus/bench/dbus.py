"""D-Bus: a private dbus-broker (Debian's package) started by the runner, with dbus-fast
clients (the fastest Python D-Bus library) on both sides, low-level messages (no proxies).

dbus-broker is normally started by dbus-broker-launch, which needs systemd; here the runner
is its controller itself, as dbus-broker's own tests do: a socketpair, AddListener with a
listening socket and an allow-all policy, over the controller's D-Bus protocol."""

from __future__ import annotations

import array
import functools
import os
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from .processes import Offer, Spawn, Tally, stamp_asyncio, subscribers_process
from .workloads import (
    DATA_SIZES,
    NETWORK,
    PAYLOAD,
    SUBSCRIBERS,
    data_rate,
    in_flight_asyncio,
    oneway_rate,
    round_trips,
    run_plan,
    subscriptions,
)

LABEL = "D-Bus (dbus-broker, dbus-fast)"
PACKAGES = {"dbus_fast": "dbus-fast"}
PROGRAMS = {"dbus-broker": "dbus-broker"}
UNSUPPORTED = {
    "data64Msealed": "not measured: capbus's Data that travels as the caller's sealed memfd; see data64M",
    "stream1G": "D-Bus has no streaming calls",
    "cap": "D-Bus has no capabilities",
    "ping": "D-Bus has no capabilities",
    **dict.fromkeys(NETWORK, "D-Bus is not Cap'n Proto's RPC protocol"),
}
NAME = "org.capbus.Bench"
PATH = "/org/capbus/Bench"

# The broker's policy (its controller API, as of dbus-broker 33): allow everything.
_BATCH = "bta(btbs)a(btssssuutt)a(btssssuutt)"
_POLICY = f"(a(u({_BATCH}))a(buu({_BATCH}))a(ss)bs)"
_ANY_TRANSFER = [True, 1, "", "", "", "", 0, 0, 0, 2**64 - 1]
_ALLOW_ALL = [True, 1, [[True, 1, True, ""]], [_ANY_TRANSFER], [_ANY_TRANSFER]]


def _start_broker(path: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """A dbus-broker listening on ``path``; the controller socket keeps it alive."""
    from dbus_fast import Message, Variant

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(256)
    listener.setblocking(False)  # the broker accepts on it as it is
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    broker = subprocess.Popen(
        ["dbus-broker", "--controller", str(theirs.fileno()), "--machine-id", "0" * 32, "--max-fds", "4096"],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    theirs.close()
    with listener:
        ours.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
        assert ours.recv(256).startswith(b"OK"), "dbus-broker refused its controller"
        ours.sendall(b"NEGOTIATE_UNIX_FD\r\nBEGIN\r\n")
        add = Message(
            path="/org/bus1/DBus/Broker",
            interface="org.bus1.DBus.Broker",
            member="AddListener",
            signature="ohv",
            body=[
                "/org/bus1/DBus/Listener/0",
                0,
                Variant(_POLICY, [[[0xFFFFFFFF, _ALLOW_ALL]], [], [], False, "session"]),
            ],
            unix_fds=[listener.fileno()],
            serial=1,
        )
        fds = array.array("i", [listener.fileno()])
        ours.sendmsg([add._marshall(negotiate_unix_fd=True)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        ours.settimeout(30)
        agreed = b"AGREE_UNIX_FD\r\n"
        data = b""
        while agreed not in data or len(data.split(agreed, 1)[1]) < 16:
            chunk = ours.recv(4096)
            if not chunk:
                raise RuntimeError("dbus-broker exited while being set up")
            data += chunk
        # The reply's header: its second byte is the message type (2: a method return).
        reply = data.split(agreed, 1)[1]
        if reply[1] != 2:
            raise RuntimeError(f"dbus-broker refused the listener: {reply[:200]!r}")
    return broker, ours


@asynccontextmanager
async def sitting(spawn_server: Spawn, plan: dict[str, int]) -> AsyncIterator[Offer]:
    with tempfile.TemporaryDirectory(prefix="capbus-bench-") as directory:
        path = os.path.join(directory, "bus")
        broker, controller = await trio.to_thread.run_sync(_start_broker, path)
        address = {"address": f"unix:path={path}"}
        try:
            await spawn_server(address, [])
            async with subscribers_process(spawn_server, plan, address, []) as pipe:
                yield {**address, "pipe": pipe}, [] if pipe is None else [pipe]
        finally:
            controller.close()
            broker.terminate()
            await trio.to_thread.run_sync(broker.wait)


def serve(config: dict[str, Any]) -> None:
    import asyncio

    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    async def main() -> None:
        bus = await MessageBus(bus_address=config["address"]).connect()
        calls = 0

        def handler(message: Message) -> bool:
            nonlocal calls
            if message.message_type is not MessageType.METHOD_CALL or message.path != PATH:
                return False
            member = message.member
            if member == "Echo":
                bus.send(Message.new_method_return(message, "s", message.body))
            elif member == "Ping":
                calls += 1
                if not message.flags & 1:  # NO_REPLY_EXPECTED
                    bus.send(Message.new_method_return(message))
            elif member == "Received":
                bus.send(Message.new_method_return(message, "t", [calls]))
            elif member == "Data":
                bus.send(Message.new_method_return(message, "t", [len(message.body[0])]))
            else:
                return False
            return True

        bus.add_message_handler(handler)
        await bus.request_name(NAME)
        print("ready", flush=True)
        await bus.wait_for_disconnect()  # type: ignore[no-untyped-call,unused-ignore]

    asyncio.run(main())


def subscribe(config: dict[str, Any]) -> None:
    """The subscribers process: a bus connection per subscriber, each with a match rule for
    the signal of every multicast width that reaches it ("E16": subscribers 0 to 15)."""
    import asyncio

    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    tally = Tally(config["plan"], config["pipe"])

    def handler(message: Message) -> None:
        if message.message_type is MessageType.SIGNAL and message.interface == NAME:
            tally.delivered()

    async def subscriber(index: int) -> MessageBus:
        bus = await MessageBus(bus_address=config["address"]).connect()
        bus.add_message_handler(handler)
        for n in subscriptions(index):
            reply = await bus.call(
                Message(
                    destination="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus",
                    member="AddMatch",
                    signature="s",
                    body=[f"type='signal',interface='{NAME}',member='E{n}'"],
                )
            )
            assert reply is not None and reply.error_name is None, reply and reply.body
        return bus

    async def main() -> None:
        async with asyncio.timeout(60):
            buses = await asyncio.gather(*(subscriber(i) for i in range(SUBSCRIBERS)))
        print("ready", flush=True)
        await asyncio.gather(*(bus.wait_for_disconnect() for bus in buses))  # type: ignore[no-untyped-call,unused-ignore]

    asyncio.run(main())


def measure(config: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    from dbus_fast import Message, MessageFlag
    from dbus_fast.aio import MessageBus

    out: dict[str, Any] = {}

    async def main() -> None:
        bus = await MessageBus(bus_address=config["address"]).connect()

        def message(member: str, signature: str = "", body: list[Any] | None = None, **extra: Any) -> Message:
            return Message(
                destination=NAME,
                path=PATH,
                interface=NAME,
                member=member,
                signature=signature,
                body=body or [],
                **extra,
            )

        async def call(member: str, signature: str = "", body: list[Any] | None = None) -> Any:
            reply = await bus.call(message(member, signature, body))
            assert reply is not None and reply.error_name is None, reply and reply.body
            return reply.body

        async def oneway() -> None:
            await bus.send(message("Ping", flags=MessageFlag.NO_REPLY_EXPECTED))

        async def received() -> int:
            return int((await call("Received"))[0])

        async def carry(size: int, n: int) -> dict[str, float]:
            data = bytes(size)
            return data_rate(size, await round_trips(lambda: call("Data", "ay", [data]), n))

        async def publish(n: int, seq: int) -> None:
            # One signal; the broker sends it to every connection whose match rule takes it.
            await bus.send(Message.new_signal(PATH, NAME, f"E{n}", "t", [seq]))

        for _ in range(200):
            await call("Echo", "s", [PAYLOAD])
        out.update(
            await run_plan(
                config["plan"],
                {
                    "echo32": lambda n: round_trips(lambda: call("Echo", "s", [PAYLOAD]), n),
                    "oneway": lambda n: oneway_rate(oneway, received, n),
                    "inflight64": lambda n: in_flight_asyncio(lambda: call("Ping"), n),
                    **{name: functools.partial(carry, size) for name, size in DATA_SIZES.items()},
                },
                publish,
                functools.partial(stamp_asyncio, config["pipe"]),
            )
        )
        bus.disconnect()

    asyncio.run(main())
    return out
