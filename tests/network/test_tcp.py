"""Cap'n Proto's own RPC protocol over TCP (capbus/rpc/twoparty.py, streamvat.py), capbus to
capbus over real loopback sockets: bootstrap, calls, capabilities both ways (a callback
into the caller, an object coming home as itself), pipelining, exceptions, cancellation."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.addresses import TcpAddress
from capbus.compiler import generate_file
from capbus.rpc.errors import Failed
from capbus.rpc.streamvat import StreamVat, open_stream_vat
from capbus.rpc.vat import open_vat

HERE = Path(__file__).parent
CALCULATOR = HERE.parents[1] / "examples" / "calculator"
calc: Any = capbus.load(HERE.parents[1] / "examples" / "calculator" / "calculator.capnp")
echo: Any = capbus.load(HERE.parents[1] / "tests" / "serving" / "echo.capnp")
TIMEOUT = 10


class Ping(echo.Ping.Server):  # type: ignore[misc,name-defined]
    def __init__(self, n: int) -> None:
        self.n = n

    def ping(self) -> int:
        return self.n


class Echo(echo.Echo.Server):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        self.started = trio.Event()
        self.cancelled = False

    def echo(self, text: str) -> str:
        if text == "fail":
            raise ValueError("as asked")
        return text

    async def pid(self) -> int:
        self.started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled = True
            raise
        return 0

    async def call(self, ping: Any) -> int:
        return int((await ping.ping()).n)


@asynccontextmanager
async def connected(bootstrap: Any) -> AsyncIterator[StreamVat]:
    """A vat serving ``bootstrap`` on a loopback TCP port, and a vat connected to it."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, _server(bootstrap), 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with open_stream_vat(stream) as vat:
            with trio.fail_after(TIMEOUT):
                yield vat
        nursery.cancel_scope.cancel()


def _server(bootstrap: Any) -> Any:
    async def handle(stream: trio.SocketStream) -> None:
        async with open_stream_vat(stream, bootstrap) as vat:
            while vat.closed is None:
                await trio.sleep(0.01)

    return handle


async def test_calls_and_capabilities_both_ways() -> None:
    server = Echo()
    async with connected(server) as vat:
        remote = await vat.bootstrap(echo.Echo)
        assert (await remote.echo(text="hello")).text == "hello"
        assert (await remote.call(ping=Ping(7))).n == 7  # (a callback into this side)
        with pytest.raises(Failed, match="ValueError: as asked"):
            await remote.echo(text="fail")
        assert (await remote.echo(text="after")).text == "after"


async def test_a_cancelled_call_cancels_the_handler() -> None:
    server = Echo()
    async with connected(server) as vat:
        remote = await vat.bootstrap(echo.Echo)
        with trio.move_on_after(0.2):
            await remote.pid()
        with trio.fail_after(TIMEOUT):
            while not server.cancelled:
                await trio.sleep(0.01)
        assert (await remote.echo(text="still")).text == "still"


# -- with pycapnp, both ways -------------------------------------------------------------------


async def test_pycapnps_client_calls_a_capbus_calculator(monkeypatch: pytest.MonkeyPatch) -> None:
    """pycapnp's own client (asyncio, its C++ RPC) against the calculator example's server
    over TCP: pipelining, a capability of the server's coming home, a function defined by
    the client, a callback into the client, an exception."""
    monkeypatch.syspath_prepend(str(CALCULATOR))
    generate_file(CALCULATOR / "calculator.capnp", CALCULATOR / "calculator_capnp.py")
    from server import CalculatorServer  # (examples/calculator/server.py)

    async with capbus.serve(CalculatorServer(), "tcp:127.0.0.1:0") as service:
        await _pycapnps_calculator_client(service)


PYCAPNPS_CLIENT_SAYS = [
    "pipelined 123.0",
    "home 50.0",
    "defined 1234.0",
    "callback 1024.0",
    "exception an operator takes two parameters",
]


async def _pycapnps_calculator_client(service: capbus.Service) -> None:
    """Runs pycapnp_calculator_client.py against ``service``; checks what it says."""
    assert await _pycapnps("pycapnp_calculator_client.py", service) == PYCAPNPS_CLIENT_SAYS


async def _pycapnps(script: str, service: capbus.Service) -> list[str]:
    """What pycapnp client ``script`` (in this directory) says against ``service``."""
    assert isinstance(service.address, TcpAddress)
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, str(HERE / script), "127.0.0.1", str(service.address.port)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done.stdout.decode().splitlines()


async def test_a_capbus_client_calls_pycapnps_server() -> None:
    async with trio.open_nursery() as nursery:
        server: trio.Process = await nursery.start(
            lambda task_status: trio.run_process(
                [sys.executable, str(HERE / "pycapnp_echo_server.py")],
                stdout=subprocess.PIPE,
                check=False,
                task_status=task_status,
            )
        )
        try:
            with trio.fail_after(30):
                assert server.stdout is not None
                port = int((await server.stdout.receive_some()).decode().strip())
                async with capbus.connect(f"tcp:127.0.0.1:{port}", echo.Echo) as remote:
                    assert (await remote.echo(text="hello")).text == "hello"
                    assert (await remote.pid()).pid == server.pid
                    assert (await remote.call(ping=Ping(21))).n == 42  # (it calls back into us)
                    with pytest.raises(Failed, match="as asked"):
                        await remote.echo(text="fail")
                    promise = await remote.echo.send(text="pipelined")
                    assert (await promise).text == "pipelined"
        finally:
            server.kill()


# -- across the gateway: bus <-> TCP ---------------------------------------------------------


async def test_pycapnps_client_reaches_a_calculator_on_the_bus_through_a_gateway(
    calculator_server: tuple[capbus.Peer, capbus.Handle], kernel: capbus.Kernel
) -> None:
    """The calculator runs in a process of its own on the bus (tests/conftest.py); this
    process holds a capability to it and serves that capability over TCP. pycapnp's client
    then reaches it through here: every call is forwarded onto the bus, each capability in
    results (a Value, a Function) becomes an export on TCP, and the client's own function
    (a callback) and a Value coming home cross both ways."""
    peer, handle = calculator_server
    async with open_vat(peer) as vat:
        on_the_bus = vat.client(handle, calc.Calculator)
        async with capbus.serve(on_the_bus, "tcp:127.0.0.1:0") as service:
            await _pycapnps_calculator_client(service)


async def test_a_tcp_capability_passed_on_over_the_bus(kernel: capbus.Kernel) -> None:
    """A capability from a TCP client (its Ping) passed by the TCP service to an object on
    the bus, which calls it: the call goes back over the bus and TCP to the client."""
    bus_server, bus_client = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(bus_server) as far_vat, open_vat(bus_client) as near_vat:
            handle = await bus_server.transfer(await far_vat.export(Echo()), bus_client)
            far = near_vat.client(handle, echo.Echo)  # (an Echo on the bus, in another vat)
            async with capbus.serve(far, "tcp:127.0.0.1:0") as service:
                assert isinstance(service.address, TcpAddress)
                address = f"tcp:127.0.0.1:{service.address.port}"
                async with capbus.connect(address, echo.Echo) as remote:
                    with trio.fail_after(TIMEOUT):
                        assert (await remote.call(ping=Ping(5))).n == 5
                        assert (await remote.echo(text="across")).text == "across"
    finally:
        await bus_server.aclose()
        await bus_client.aclose()


async def test_pycapnps_embargo_on_a_capability_that_comes_home(monkeypatch: pytest.MonkeyPatch) -> None:
    """pycapnp's client pipelines a call on a capability of its own that the service returns:
    the call goes through the service and back (forwarded), C++ embargoes its promise
    (Disembargo senderLoopback) and this side echoes it once the call went on: the client's
    own object gets both calls, in order."""
    coverage: Any = capbus.load(HERE.parent / "rpc" / "coverage.capnp")

    class Cov(coverage.Cov.Server):  # type: ignore[misc,name-defined]
        def anyCap(self, cap: Any) -> Any:
            return cap

    echoed: list[int] = []  # (the embargoes this side echoed: C++ asked for one)
    echo = StreamVat._echo_disembargo

    async def counted(vat: StreamVat, answer: Any, transform: Any, embargo_id: int) -> None:
        echoed.append(embargo_id)
        await echo(vat, answer, transform, embargo_id)

    monkeypatch.setattr(StreamVat, "_echo_disembargo", counted)

    async with capbus.serve(Cov(), "tcp:127.0.0.1:0") as service:
        said = await _pycapnps("pycapnp_loopback_client.py", service)
    assert said == ["pipelined 1", "direct 2", "pinged 2"]
    assert len(echoed) == 1


async def test_a_client_let_go_is_released_once_and_its_export_goes() -> None:
    """aclose() of a capability received over TCP releases it on the other side (its export
    gone there), once, however often it is called."""
    server = Echo()
    async with trio.open_nursery() as nursery:
        vats: list[StreamVat] = []

        async def handle(stream: trio.SocketStream) -> None:
            async with open_stream_vat(stream, server) as vat:
                vats.append(vat)
                await vat.wait_closed()

        listen = functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        listeners = await nursery.start(listen)
        stream = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        async with open_stream_vat(stream) as vat:
            with trio.fail_after(TIMEOUT):
                remote = await vat.bootstrap(echo.Echo)
                promise = await remote.echo.send(text="x")
                assert (await promise).text == "x"
                assert len(vats[0].exports) == 1  # (the bootstrap object, held by us)
                await remote.aclose()
                await remote.aclose()  # (once only)
                while vats[0].exports:
                    await trio.sleep(0.01)
                assert vat.imports.get(remote.handle) is None
        nursery.cancel_scope.cancel()


async def test_a_call_not_sent_leaves_no_export_behind() -> None:
    """A call refused on the calling side (over the connection's size limit) after its
    capabilities were exported: their export references are taken back, nothing is held
    for a peer that never got them."""
    stored: Any = capbus.load(HERE.parent / "rpc" / "anypointer.capnp")
    async with trio.open_nursery() as nursery:
        listen = functools.partial(trio.serve_tcp, _server(Echo()), 0, host="127.0.0.1")
        listeners = await nursery.start(listen)
        stream = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        async with open_stream_vat(stream, max_message_bytes=4096) as vat:
            with trio.fail_after(TIMEOUT):
                remote = await vat.bootstrap(stored.Store)
                with pytest.raises(Failed, match="over this connection's limit of 4096"):
                    await remote.tag(name="x" * 10_000, ping=Ping(1))
                assert vat.exports == {}
                assert all(q.returned for q in vat.questions.values())  # (the bootstrap's, at most)
        nursery.cancel_scope.cancel()
