"""The fast way a plain call takes over TCP (capbus/rpc/twopartyflat.py, streamvat.py): flat
Call and Return, no Finish for a call awaited at once (rpc.capnp's noPromisePipelining and
noFinishNeeded), plain-function handlers run in the receive loop, a Return written without
a task and, when the socket does not take it whole, its rest by one; seen from a raw peer
speaking rpc.capnp by hand and from capbus clients."""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import capnp
import pytest
import trio

import capbus
from capbus.rpc.streamvat import StreamVat, open_stream_vat
from capbus.rpc.twoparty import FrameReader, decode, rpc

HERE = Path(__file__).parent
ECHO_CAPNP = HERE.parents[0] / "serving" / "echo.capnp"
echo: Any = capbus.load(ECHO_CAPNP)
raw_echo: Any = capnp.load(str(ECHO_CAPNP))  # (pycapnp's own, to build messages by hand)
TIMEOUT = 20

ORDER_SCHEMA = """
@0xc4d5e6f708192a3b;
interface Order {
  plain @0 (n :UInt32) -> ();
  waits @1 (n :UInt32) -> ();
  handsBack @2 (n :UInt32) -> (n :UInt32);
  seen @3 () -> (order :List(UInt32));
}
"""


class Echo(echo.Echo.Server):  # type: ignore[misc,name-defined]
    def echo(self, text: str) -> str:
        return text

    def pid(self) -> int:
        return 1

    async def call(self, ping: Any) -> int:
        return int((await ping.ping()).n)


@asynccontextmanager
async def served(bootstrap: Any) -> AsyncIterator[tuple[int, list[StreamVat]]]:
    """``bootstrap`` served on a loopback port: the port, and the service's vats."""
    vats: list[StreamVat] = []

    async def handle(stream: trio.SocketStream) -> None:
        async with open_stream_vat(stream, bootstrap) as vat:
            vats.append(vat)
            await vat.wait_closed()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        with trio.fail_after(TIMEOUT):
            yield listeners[0].socket.getsockname()[1], vats
        nursery.cancel_scope.cancel()


class RawPeer:
    """A TCP connection speaking framed rpc.capnp built with pycapnp's builders."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream, self.reader, self.received = stream, FrameReader(), list[Any]()

    async def send(self, message: Any) -> None:
        await self.stream.send_all(message.to_bytes())

    async def next(self) -> Any:
        while not self.received:
            data = await self.stream.receive_some(1 << 16)
            if not data:
                return None
            self.received += [decode(s, 1 << 24) for s in self.reader.feed(data)]
        return self.received.pop(0)

    async def bootstrap(self) -> int:
        """Asks for the bootstrap capability (question 0, then finished): its import id."""
        message = rpc.Message.new_message()
        message.init("bootstrap").questionId = 0
        await self.send(message)
        returned = (await self.next()).__getattr__("return")
        finish = rpc.Message.new_message()
        finish.init("finish").questionId = 0
        finish.finish.releaseResultCaps = False
        await self.send(finish)
        return int(returned.results.capTable[0].senderHosted)

    async def echo(self, question_id: int, text: str, export: int, *, no_pipelining: bool) -> Any:
        message = rpc.Message.new_message()
        call = message.init("call")
        call.questionId = question_id
        call.interfaceId = raw_echo.Echo.schema.node.id
        call.methodId = 0
        call.target.importedCap = export
        call.sendResultsTo.caller = None
        call.noPromisePipelining = no_pipelining
        params = call.init("params").content.as_struct(raw_echo.Echo.schema.methods["echo"].param_type)
        params.text = text
        await self.send(message)
        return await self.next()


async def raw_peer(port: int) -> RawPeer:
    return RawPeer(await trio.open_tcp_stream("127.0.0.1", port))


async def test_a_call_awaited_at_once_is_forgotten_as_it_returns() -> None:
    """A caller that promises no pipelining (noPromisePipelining) gets flat results with
    noFinishNeeded: it may ask with the same id at once, and a Finish it sends anyway for
    such an answer is ignored (rpc.capnp), not taken for an unknown question."""
    async with served(Echo()) as (port, vats):
        peer = await raw_peer(port)
        export = await peer.bootstrap()
        for _ in range(3):  # (the same question id each time, never finished)
            message = await peer.echo(1, "again", export, no_pipelining=True)
            returned = message.__getattr__("return")
            assert returned.noFinishNeeded and returned.answerId == 1
            assert returned.results.content.as_struct(
                raw_echo.Echo.schema.methods["echo"].result_type
            ).text == ("again")
        assert not vats[0].answers
        late = rpc.Message.new_message()
        late.init("finish").questionId = 1
        await peer.send(late)
        message = await peer.echo(2, "after", export, no_pipelining=True)
        assert message.which() == "return", message


async def test_without_the_promise_a_finish_is_still_needed() -> None:
    """A call that may be pipelined on keeps its answer until the caller's Finish: asking
    with its id again before is a protocol error (abort)."""
    async with served(Echo()) as (port, vats):
        peer = await raw_peer(port)
        export = await peer.bootstrap()
        message = await peer.echo(1, "kept", export, no_pipelining=False)
        assert not message.__getattr__("return").noFinishNeeded
        assert 1 in vats[0].answers
        message = await peer.echo(1, "twice", export, no_pipelining=False)
        assert message.which() == "abort" and "asked twice" in message.abort.reason


async def test_capbus_callers_leave_nothing_behind_a_returned_call() -> None:
    """Between capbus vats, a call awaited at once holds no question or answer once it
    returned (no Finish to wait for); one whose results are kept (send_call) holds its
    question until they are let go, and then none."""
    async with served(Echo()) as (port, vats):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with open_stream_vat(stream) as vat:
            remote = await vat.bootstrap(echo.Echo)
            for n in range(50):
                assert (await remote.echo(text=f"{n}")).text == f"{n}"
            assert not vat.questions
            assert not vats[0].answers
            promise = await remote.echo.send(text="kept")
            results = await promise
            assert results.text == "kept"
            del promise, results
            with trio.fail_after(TIMEOUT):
                while vat.questions or vats[0].answers:
                    await trio.sleep(0.01)


async def test_a_return_larger_than_the_socket_takes_arrives_whole_among_others() -> None:
    """A Return the socket does not take at once is written on by a task, and nothing
    written after it (other calls' Returns) gets into the middle of it."""
    big = "".join(chr(ord("a") + n % 26) for n in range(12 << 20))
    async with served(Echo()) as (port, _), trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with open_stream_vat(stream) as vat:
            remote = await vat.bootstrap(echo.Echo)
            small: list[str] = []

            async def smalls() -> None:
                for n in range(200):
                    small.append((await remote.echo(text=f"s{n}")).text)

            nursery.start_soon(smalls)
            assert (await remote.echo(text=big)).text == big
            with trio.fail_after(TIMEOUT):
                while len(small) < 200:
                    await trio.sleep(0.01)
            assert small == [f"s{n}" for n in range(200)]


@pytest.fixture(scope="module")
def order_schema(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("order") / "order.capnp"
    path.write_text(ORDER_SCHEMA)
    return capbus.load(path)


async def test_plain_and_async_handlers_start_in_the_order_the_calls_came(order_schema: Any) -> None:
    """E-order holds with plain handlers run in the receive loop: a plain handler's call that
    comes after an async one still waiting to start runs after it; a plain function handing
    back an awaitable is awaited (its results go back)."""
    started: list[int] = []

    class Order(order_schema.Order.Server):  # type: ignore[misc,name-defined]
        def plain(self, n: int) -> None:
            started.append(n)

        async def waits(self, n: int) -> None:
            started.append(n)
            await trio.sleep(0)

        def handsBack(self, n: int) -> Any:  # noqa: N802 - the schema's name
            started.append(n)

            async def later() -> int:
                await trio.sleep(0)
                return n * 2

            return later()

        def seen(self) -> list[int]:
            return list(started)

    async with served(Order()) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with open_stream_vat(stream) as vat:
            remote = await vat.bootstrap(order_schema.Order)
            promises = []
            for n in range(120):
                kind = ("plain", "waits", "handsBack")[n % 3]
                promises.append(await getattr(remote, kind).send(n=n))
            for n, promise in enumerate(promises):
                results = await promise
                if n % 3 == 2:
                    assert results.n == n * 2
            assert list((await remote.seen()).order) == list(range(120))


async def test_calls_gathered_into_one_write_each_get_their_own_results() -> None:
    """Calls made at once by many tasks go out gathered (streamvat._send_call): each still
    gets its own results, and a caller cancelled while it gathers the others' calls does
    not take them with it."""
    async with served(Echo()) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with open_stream_vat(stream) as vat:
            remote = await vat.bootstrap(echo.Echo)
            got: dict[int, str] = {}

            async def caller(n: int) -> None:
                for round_ in range(20):
                    got[n] = (await remote.echo(text=f"{n}.{round_}")).text

            async with trio.open_nursery() as nursery:
                for n in range(64):
                    nursery.start_soon(caller, n)
                with trio.CancelScope() as cancelled:  # (one caller, cancelled as it sends)
                    cancelled.cancel()
                    await remote.echo(text="never waited for")
            assert got == {n: f"{n}.19" for n in range(64)}
            assert (await remote.echo(text="after")).text == "after"


async def test_a_peer_that_reads_nothing_stops_being_read_not_buffered() -> None:
    """A peer that sends calls with large results and reads nothing: this side holds at
    most about OUTBOX_READING_LIMIT bytes for it and then stops reading (the peer's own
    writes wait), and serves other connections meanwhile."""
    big = "x" * 60_000
    async with served(Echo()) as (port, vats):
        peer = RawPeer(await trio.open_tcp_stream("127.0.0.1", port))
        export = await peer.bootstrap()
        message = rpc.Message.new_message()
        call = message.init("call")
        call.interfaceId = raw_echo.Echo.schema.node.id
        call.target.importedCap = export
        call.sendResultsTo.caller = None
        call.noPromisePipelining = True
        call.init("params").content.as_struct(raw_echo.Echo.schema.methods["echo"].param_type).text = big
        with trio.move_on_after(5):  # (until this side stops reading: the writes block)
            for question_id in range(1, 3000):
                call.questionId = question_id
                await peer.stream.send_all(message.to_bytes())
                message.clear_write_flag()
        vat = vats[0]
        # (past the reading limit, at most the results of what one read brought: a couple)
        held = vat._queued + vat._in_flight
        assert held <= vat._reading_limit + 4 * len(big), held
        assert vat.closed is None
        other = await trio.open_tcp_stream("127.0.0.1", port)
        async with open_stream_vat(other) as other_vat:
            remote = await other_vat.bootstrap(echo.Echo)
            assert (await remote.echo(text="served")).text == "served"
        await peer.stream.aclose()


async def test_an_abort_goes_out_after_what_was_queued_before_it() -> None:
    """A peer that breaks the protocol while a large Return to it is still being written
    gets that Return whole and then the Abort saying why (the connection is closed only
    once they are written, or a second has passed)."""
    big = "y" * (16 << 20)
    async with served(Echo()) as (port, _):
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (the Return waits on it)
        await sock.connect(("127.0.0.1", port))
        peer = RawPeer(trio.SocketStream(sock))
        export = await peer.bootstrap()
        message = rpc.Message.new_message()
        call = message.init("call")
        call.questionId = 1
        call.interfaceId = raw_echo.Echo.schema.node.id
        call.target.importedCap = export
        call.sendResultsTo.caller = None
        call.noPromisePipelining = True
        call.init("params").content.as_struct(raw_echo.Echo.schema.methods["echo"].param_type).text = big
        await peer.stream.send_all(message.to_bytes())
        first = await peer.stream.receive_some(1 << 16)  # (its Return is being written)
        assert not peer.reader.feed(first)
        garbage = b"\xff\xff\xff\xff" + bytes(60)  # (a segment table of 2**32 entries)
        await peer.stream.send_all(garbage)
        returned = await peer.next()
        assert returned is not None and returned.which() == "return"
        results_type = raw_echo.Echo.schema.methods["echo"].result_type
        assert returned.__getattr__("return").results.content.as_struct(results_type).text == big
        aborted = await peer.next()
        assert aborted is not None and aborted.which() == "abort", aborted
