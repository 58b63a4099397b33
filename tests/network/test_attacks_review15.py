"""Attack review 15: capbus's rpc.capnp over TCP (capbus/rpc/twoparty.py, streamvat.py and
the tcp: parts of capbus/serving.py) attacked from outside, as a hostile TCP peer would:
hand-built rpc.capnp messages (pycapnp's builder, framed here) written to a real socket
of a service started with capbus.serve, and a hostile server for capbus.connect.

Each test here FAILS on the code reviewed and passes once the finding is fixed; its
docstring says the attack, what happens now and what should happen."""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import capnp
import pytest
import trio

import capbus
from capbus.rpc import capwire, streamvat
from capbus.rpc.errors import RpcError
from capbus.rpc.twoparty import CALL_CONTENT, RETURN_CONTENT, frame, rpc

from .hostile_peer import Peer, bootstrap, kind_of_next, port_of, served_still

HERE = Path(__file__).parent
ECHO_CAPNP = HERE.parents[0] / "serving" / "echo.capnp"
sys.path.insert(0, str(ECHO_CAPNP.parent))
from echo_service import Echo, schema  # noqa: E402  (tests/serving/echo_service.py)

raw_echo: Any = capnp.load(str(ECHO_CAPNP))  # (pycapnp's own, to build params with)
ECHO_ID = raw_echo.Echo.schema.node.id
TIMEOUT = 20


# -- a hostile peer's tools ---------------------------------------------------------------------


def _message() -> Any:
    return rpc.Message.new_message()


def _call(question_id: int, method: str, export: int = 0) -> Any:
    message = _message()
    call = message.init("call")
    call.questionId = question_id
    call.interfaceId = ECHO_ID
    call.methodId = {"echo": 0, "pid": 1, "call": 2}[method]
    call.target.importedCap = export
    call.sendResultsTo.caller = None
    call.init("params").content.as_struct(raw_echo.Echo.schema.methods[method].param_type)
    return message


def echo_call(question_id: int, text: str) -> bytes:
    message = _call(question_id, "echo")
    message.call.params.content.as_struct(raw_echo.Echo.schema.methods["echo"].param_type).text = text
    return bytes(message.to_bytes())


def call_with_ping(question_id: int, ping_import: int) -> bytes:
    """Echo.call(ping=...) whose ping is this peer's own export ``ping_import`` (the service
    calls it back; this peer never answers)."""
    message = _call(question_id, "call")
    message.call.params.init("capTable", 1)[0].senderHosted = ping_import
    segments = capwire.patch_caps(list(message.to_segments()), [((*CALL_CONTENT, ("p", 0)), 0)])
    return frame([bytes(s) for s in segments])


def call_with_caps(question_id: int, count: int) -> bytes:
    """Echo.call(ping=...) whose capTable holds ``count`` senderHosted capabilities (ids 0..)."""
    message = _call(question_id, "call")
    table = message.call.params.init("capTable", count)
    for export, descriptor in enumerate(table):
        descriptor.senderHosted = export
    segments = capwire.patch_caps(list(message.to_segments()), [((*CALL_CONTENT, ("p", 0)), 0)])
    return frame([bytes(s) for s in segments])


def resolve(promise_id: int, export: int) -> bytes:
    message = _message()
    message.init("resolve").promiseId = promise_id
    message.resolve.cap.senderHosted = export
    return bytes(message.to_bytes())


# -- HIGH ---------------------------------------------------------------------------------------


class StuckEcho(Echo):
    """Echo whose call() counts handlers started and cancelled."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def call(self, ping: Any) -> int:
        self.started += 1
        try:
            return int((await ping.ping()).n)
        except trio.Cancelled:
            self.cancelled += 1
            raise


async def test_a_peer_gone_while_its_calls_fill_max_calls_is_noticed(vats: list[streamvat.StreamVat]) -> None:
    """Attack: fill a connection's ``max_calls`` with calls whose handlers wait on the peer
    (Echo.call(ping) calling back a capability of the peer's that never answers; or calls
    pipelined on such a call), send one call more, then close the socket.

    Now: the receive loop is parked in ``_calls.acquire()`` (not in receive_some), so the
    end of the stream is never read: the vat never closes, the handlers are never cancelled,
    the socket and its tasks stay forever. Each such connection leaks for the life of the
    service (repeated: file descriptors run out, then no one can connect). The same with the
    default max_calls=256 (257 calls); 4 here to keep it small.

    Should: a peer that goes is noticed whatever the vat is waiting for (keep reading for
    EOF/Abort/Finish while at the limit, and only hold back new calls): the vat closes and
    its handlers are cancelled."""
    server = StuckEcho()
    async with capbus.serve(server, "tcp:127.0.0.1:0", max_calls=4) as service:
        peer = await Peer.connect(port_of(service))
        await peer.stream.send_all(bootstrap(0) + b"".join(call_with_ping(q, 0) for q in range(1, 7)))
        with trio.fail_after(TIMEOUT):
            while server.started < 4:
                await trio.sleep(0.01)
        vat = vats[-1]
        await peer.stream.aclose()
        with trio.move_on_after(5):
            while vat.closed is None or server.cancelled < 4:
                await trio.sleep(0.01)
        closed = vat.closed
    assert closed is not None, "the peer closed its socket: the connection is still open"
    assert server.cancelled == 4, f"{4 - server.cancelled} handlers of a gone peer still ran"


async def test_resolves_from_a_peer_that_never_reads_are_not_queued_without_bound(
    vats: list[streamvat.StreamVat],
) -> None:
    """Attack: a peer that never reads (small receive buffer) sends Resolve messages
    (promiseId anything, cap senderHosted) as fast as it can, 200 000 of them (64 bytes
    each, 12.8 MB).

    Now: ``_on_resolve`` answers each with a Release through ``_post``, which only appends
    to ``StreamVat._pending``, with no await: the receive loop never blocks, and the queue
    grows by one entry (~300 bytes) per 64 bytes received: about 200 000 entries held here,
    hundreds of MB in a minute, until send_timeout (60 s of no progress: a peer reading a
    byte now and then keeps it going for ever).

    Should: what this side queues for a peer is bounded (the receive loop waits for the
    queue to drain, i.e. stops reading; or the connection is aborted)."""
    async with capbus.serve(Echo(), "tcp:127.0.0.1:0") as service:
        peer = await Peer.connect(port_of(service), receive_buffer=4096)
        batch = resolve(1, 2) * 2000
        with trio.move_on_after(5), contextlib.suppress(trio.BrokenResourceError):
            for _ in range(100):  # (until this side closes the connection, if it does)
                await peer.stream.send_all(batch)
        vat = vats[-1]
        queued, closed = len(vat._outbox), vat.closed
        await peer.stream.aclose()
        await served_still(port_of(service))
    assert closed is not None or queued <= 20_000, f"{queued} messages queued for a peer that reads none"


async def test_bootstraps_never_finished_do_not_grow_the_answers_without_bound(
    vats: list[streamvat.StreamVat],
) -> None:
    """Attack: Bootstrap 20 000 times with new question ids (48 bytes each), reading the
    Returns but never sending Finish.

    Now: every one is kept in ``StreamVat.answers`` (an _Answer with its cancel scope,
    event and lookup closure, ~1 KB each: ~20x what the peer sent) with no limit: 20 000
    answers held (and so on to 2**32 question ids). The same with calls never finished
    (their results held too).

    Should: a bound on the answers a peer may leave unfinished (say a few thousand, or an
    option): past it the connection is aborted (or this side stops reading). The test allows
    up to 16 384."""
    count = 20_000
    async with capbus.serve(Echo(), "tcp:127.0.0.1:0") as service:
        peer = await Peer.connect(port_of(service))
        counts: dict[str, int] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.drain, counts)
            with trio.move_on_after(60), contextlib.suppress(trio.BrokenResourceError):
                await peer.stream.send_all(b"".join(bootstrap(q) for q in range(count)))
                while counts.get("return", 0) < count and not counts.get("eof") and not counts.get("abort"):
                    await trio.sleep(0.05)
            held = len(vats[-1].answers)
            nursery.cancel_scope.cancel()
        await peer.stream.aclose()
    assert held <= 16_384, f"{held} unfinished answers held for one peer"


@asynccontextmanager
async def served_in_a_child() -> AsyncIterator[int]:
    """tests/serving's Echo served over TCP by a process of its own (review15_echo_server.py):
    its port."""
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            functools.partial(
                trio.run_process,
                [sys.executable, str(HERE / "review15_echo_server.py")],
                stdout=subprocess.PIPE,
                check=False,
                env={**os.environ, "PYTHONPATH": str(HERE.parents[1])},
            )
        )
        try:
            assert process.stdout is not None
            with trio.fail_after(TIMEOUT):
                yield int((await process.stdout.receive_some()).decode().strip())
        finally:
            process.kill()


async def test_one_call_with_a_huge_cap_table_does_not_stall_every_connection() -> None:
    """Attack: one Call (16 MB, under the 64 MiB limit) whose params' capTable holds a
    million senderHosted descriptors.

    Now: the receive loop reads every descriptor and makes an import client (and a
    weakref.finalize) for each without a checkpoint, then posts a Release for each: ~6-8 s
    here in which the whole service (trio is one thread) answers no other connection;
    24 MB took 12 s, a 64 MiB message some 30 s, and a peer can send them back to back.

    Should: a capTable is bounded (a limit far below the message size: a payload has as
    many capabilities as its pointers) or read in slices with checkpoints: another
    connection's calls are answered meanwhile (here: each within 2 s). (The service runs in
    a process of its own, so that this test's own timing is not stalled with it.)"""
    big = bootstrap(0) + call_with_caps(1, 1_000_000)
    async with served_in_a_child() as port:
        async with capbus.connect(f"tcp:127.0.0.1:{port}", schema.Echo) as other:
            peer = await Peer.connect(port)
            counts: dict[str, int] = {}
            worst = 0.0

            async def measure() -> None:
                nonlocal worst
                while True:
                    started = trio.current_time()
                    assert (await other.echo(text="other")).text == "other"
                    worst = max(worst, trio.current_time() - started)
                    await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer.drain, counts)
                nursery.start_soon(measure)
                await peer.stream.send_all(big)
                with trio.move_on_after(60):  # (until the call is read: its handler calls ping back)
                    while not (
                        counts.get("call") or counts.get("return", 0) > 1 or counts.keys() & {"eof", "abort"}
                    ):
                        await trio.sleep(0.01)
                    await trio.sleep(0.1)  # (and one more call of the other connection's)
                nursery.cancel_scope.cancel()
            await peer.stream.aclose()
    assert worst < 2, f"another connection's call waited {worst:.1f} s"


# -- MEDIUM -------------------------------------------------------------------------------------


async def test_a_message_of_an_unknown_kind_is_answered_unimplemented() -> None:
    """Attack (or a newer peer): a Message whose union discriminant is one rpc.capnp does
    not have yet (99), its pointer null.

    Now: ``message.which()`` throws, and the connection is aborted with a misleading reason
    ("malformed message: KjException: Attempted to call which on a non-union type"), though
    the message is well formed.

    Should: as rpc.capnp says (and as for the kinds it knows but does not take), the message
    is echoed back as ``unimplemented`` and the connection goes on."""
    async with capbus.serve(Echo(), "tcp:127.0.0.1:0") as service:
        peer = await Peer.connect(port_of(service))
        root = struct.pack("<iHH", 0, 1, 1)  # (a struct pointer: 1 data word, 1 pointer)
        unknown = root + struct.pack("<Q", 99) + struct.pack("<Q", 0)
        with trio.fail_after(TIMEOUT):
            await peer.stream.send_all(frame([unknown]) + bootstrap(0))
            kinds = [await kind_of_next(peer), await kind_of_next(peer)]
        await peer.stream.aclose()
    assert kinds == ["unimplemented", "return"]


async def test_a_call_with_results_sent_to_yourself_does_not_abort_the_connection() -> None:
    """Attack (or a C++ peer's tail call / a forwarded pipelined call): a Call whose
    ``sendResultsTo`` is ``yourself``, a level 1 feature.

    Now: the whole connection is aborted, with a misleading reason: "results sent elsewhere
    (three-party handoff is not supported)" (``yourself`` is two-party).

    Should: the call is answered (a Return with ``resultsSentElsewhere``, its results kept
    for a ``takeFromOtherQuestion``; or at least a Return with an exception, or the Call
    echoed as ``unimplemented``, which rpc.capnp says the caller takes as a failed
    question) and the connection goes on."""
    async with capbus.serve(Echo(), "tcp:127.0.0.1:0") as service:
        peer = await Peer.connect(port_of(service))
        tail = _call(1, "echo")
        tail.call.sendResultsTo.yourself = None
        with trio.fail_after(TIMEOUT):
            await peer.stream.send_all(bootstrap(0) + bytes(tail.to_bytes()) + echo_call(2, "after"))
            kinds = [await kind_of_next(peer) for _ in range(3)]
        await peer.stream.aclose()
    assert not any(k.startswith("abort") or k == "eof" for k in kinds), kinds


# -- LOW ----------------------------------------------------------------------------------------


async def test_a_disembargo_naming_nothing_of_this_sides_is_refused() -> None:
    """Attack: a Disembargo ``senderLoopback`` whose target is export 77, which this side
    never gave (nor any promise: this side exports none, so no senderLoopback can be due).

    Now: it is echoed as a ``receiverLoopback`` for import 77, unchecked (a peer learns
    nothing, but a protocol error is answered as if it were right, and a confused peer is
    not told).

    Should: as C++ does, a senderLoopback whose target is not one of this side's exports
    (resolved to point back at the sender) is a protocol error: Abort, naming it."""
    async with capbus.serve(Echo(), "tcp:127.0.0.1:0") as service:
        peer = await Peer.connect(port_of(service))
        message = _message()
        disembargo = message.init("disembargo")
        disembargo.target.importedCap = 77
        disembargo.context.senderLoopback = 5
        with trio.fail_after(TIMEOUT):
            await peer.stream.send_all(bootstrap(0) + bytes(message.to_bytes()))
            kinds = [await kind_of_next(peer), await kind_of_next(peer)]
        await peer.stream.aclose()
    assert kinds[0] == "return"
    assert kinds[1].startswith("abort") and "77" in kinds[1], kinds


# -- a hostile server, for capbus.connect -------------------------------------------------------


def _bootstrap_return(content_pointer: bytes | None) -> bytes:
    """A Return of the bootstrap question 0, its capTable one senderHosted 0; its content
    a capability pointer to it, or the raw pointer word given."""
    message = _message()
    returned = message.init("return")
    returned.answerId = 0
    returned.init("results").init("capTable", 1)[0].senderHosted = 0
    segments = [bytes(s) for s in message.to_segments()]
    if content_pointer is None:
        segments = [bytes(s) for s in capwire.patch_caps(segments, [(RETURN_CONTENT, 0)])]
    else:
        where = capwire.locate(segments, RETURN_CONTENT)
        assert where is not None
        patched = bytearray(segments[where[0]])
        patched[8 * where[1] : 8 * where[1] + 8] = content_pointer
        segments[where[0]] = bytes(patched)
    return frame(segments)


async def _hostile_server(nursery: trio.Nursery, replies: list[bytes]) -> int:
    """A TCP server that answers each message it reads with the next of ``replies``."""

    async def handle(stream: trio.SocketStream) -> None:
        for reply in replies:
            if not await stream.receive_some(1 << 16):
                return
            await stream.send_all(reply)
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def test_a_server_aborting_mid_session_raises_no_cancelled_out_of_connect() -> None:
    """Attack: a hostile (or just broken) server answers the bootstrap, then sends garbage
    (the client aborts the connection), while the program is inside ``async with
    capbus.connect(...)``.

    Now: the call in flight fails with Disconnected, but the vat's abort cancels the
    nursery that the connection's block runs inside: the program's next checkpoint raises
    ``trio.Cancelled``, which escapes ``async with capbus.connect(...)`` (no scope of the
    program's was cancelled; ``except Exception``/``except RpcError`` do not catch it: the
    program's task dies of a stray Cancelled).

    Should: the block ends with an RpcError (Disconnected, saying why) or the calls fail
    with it; never a trio.Cancelled the program did not ask for."""
    escaped: BaseException | None = None
    async with trio.open_nursery() as nursery:
        port = await _hostile_server(nursery, [_bootstrap_return(None), b"\xff" * 16])
        try:
            with trio.fail_after(TIMEOUT):
                async with capbus.connect(f"tcp:127.0.0.1:{port}", schema.Echo) as remote:
                    with pytest.raises(RpcError):
                        await remote.echo(text="x")
                    await trio.sleep(0)  # (a checkpoint of the program's own)
        except trio.Cancelled as error:
            escaped = error
        except RpcError:
            pass
        nursery.cancel_scope.cancel()
    assert escaped is None, f"trio.Cancelled escaped capbus.connect's block: {escaped!r}"


async def test_a_malformed_bootstrap_return_raises_no_cancelled_out_of_connect() -> None:
    """Attack: a hostile server answers the Bootstrap with a Return whose content pointer
    is a far pointer to a segment that does not exist.

    Now: the client aborts the connection (rightly), but ``capbus.connect(...)`` raises
    ``trio.Cancelled`` ("cancelled due to explicit from task StreamVat._run") instead of an
    error naming the address: the abort cancelled the vat's nursery while connect awaited
    the bootstrap inside it, and the AsyncExitStack's aclose() does not hand the
    Cancelled to the nursery that would absorb it.

    Should: a ServeError (or RpcError) saying the service at that address broke the
    protocol."""
    escaped: BaseException | None = None
    far_to_nowhere = struct.pack("<II", 2, 9)
    async with trio.open_nursery() as nursery:
        port = await _hostile_server(nursery, [_bootstrap_return(far_to_nowhere)])
        try:
            with trio.fail_after(TIMEOUT):
                async with capbus.connect(f"tcp:127.0.0.1:{port}", schema.Echo):
                    pass
        except trio.Cancelled as error:
            escaped = error
        except (RpcError, capbus.ServeError):
            pass
        nursery.cancel_scope.cancel()
    assert escaped is None, f"capbus.connect raised {escaped!r}"
