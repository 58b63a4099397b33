"""Attacks on the RPC layer after flat bodies (flat.py: FlatCodec, FlatReader), the
worklist settling of pipelined calls and fd copies in _Resend (fourth review). Each test
reproduces one with real kernel peers where a peer is involved (a bare peer writing frames
and envelopes by hand plays the hostile side) and fails until it is fixed; its docstring
says the severity, the harm and a suggested fix.
"""

from __future__ import annotations

import gc
import os
import select
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc import protocol
from capbus.rpc.errors import RpcError
from capbus.rpc.flat import flat_codec
from capbus.rpc.vat import Vat, open_vat

from .hostile import (
    ECHO,
    NEW_COUNTER,
    SAME,
    TIMEOUT,
    assert_a_chain_is_served,
    assert_no_file_stolen,
    close_all,
    next_return,
    open_fds,
    until,
    until_taken_or_refused,
)
from .processes import reporting_process
from .services import FactoryServer, next_call, schema


async def test_a_second_redirect_resends_a_pipelined_call_with_the_callers_reused_fd_number(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    """HIGH. The third review's fix keeps copies of a pipelined call's fds in _Resend
    (param fd number -> copy) and Vat._send_again resends with ``fds=resend.fds``. But
    send_call, for a call pipelined on a promise, makes the new _Resend *after* remapping
    ``call.fds`` to the copies: ``copies = {fd: os.dup(...) for fd in call.fds}`` is keyed
    by the copy numbers of the previous _Resend, not by the numbers the params name (and
    looks the copy numbers up in the old mapping as if they were param numbers). When the
    call it is pipelined on was itself redirected and its resend is not answered yet,
    Vat._retarget sends the resent call pipelined on that resend (a generic pipelined
    client), so a hostile callee S redirects twice: the second resend finds no copy for
    the params' fd number, and sends whatever file the caller's process now has under
    that number (the old _Resend's copies are closed by then). Here the caller pipelines
    hub.hub().sink().fill(sink=pipe) and closes its pipe end, a secret file takes the
    number; S answers hub() with a hub of its own, redirects sink() (resent to that hub)
    and fill() (resent pipelined on the resent sink()), redirects that too and answers
    sink(): the fourth send of fill() carries the secret. The same happens for
    send_call(..., fds={param: real}) on a promise: the copies are keyed by the real
    numbers, and one redirect sends the param number's file. Fix: key the copies by the
    params' own fd numbers (compute them before remapping call.fds: ``{param:
    os.dup(fds.get(param, param)) for param in encoded_param_fds}``)."""
    review4: Any = capbus.load(Path(__file__).with_name("review4.capnp"))
    fill = review4.Sink.interface.methods["fill"]
    hub_method = review4.Hub.interface.methods["hub"]
    sink_method = review4.Hub.interface.methods["sink"]
    secret_path = tmp_path / "secret"
    secret_path.write_bytes(b"the caller's secret")
    attacker, caller_peer = await kernel.connect(), await kernel.connect()
    read_end, write_end = os.pipe()
    stolen: list[int] = []

    async def reply_to(
        message: capbus.Message, call: protocol.ReceivedCall, encoded: Any, handles: Any = ()
    ) -> None:
        assert isinstance(call.reply, int)
        await attacker.send(message.handles[call.reply], encoded.payload, handles=list(handles))

    try:
        async with open_vat(caller_peer) as caller_vat:
            hub_node, own_hub, own_sink = [await attacker.create_node() for _ in range(3)]
            hub = caller_vat.client(await attacker.transfer(hub_node, caller_peer), review4.Hub)
            with trio.fail_after(TIMEOUT):
                base = await hub.hub.send()  # q1
                sink = await base.hub.sink.send()  # q2, pipelined on q1
                promise = await sink.sink.fill.send(sink=write_end, data=b"for the pipe")  # q3, on q2
                os.close(write_end)  # sent (a duplicate went with the message): done with it
                secret = os.open(secret_path, os.O_RDONLY | os.O_CLOEXEC)  # reuses the number
                if secret != write_end:  # (not the lowest free number here: make it so)
                    os.dup2(secret, write_end)
                    os.close(secret)
                m1, q1 = await next_call(attacker)
                m2, q2 = await next_call(attacker)
                m3, q3 = await next_call(attacker)
                for fd in m3.fds:  # the pipe, as the caller meant
                    os.close(fd)
                # q1 answered with a hub of S's own; q2 redirected: sent again to that hub (q4).
                await reply_to(
                    m1, q1, protocol.encode_results(q1.question_id, hub_method, {"hub": "own"}), [own_hub]
                )
                await reply_to(m2, q2, protocol.encode_redirect(q2.question_id))
                m4, q4 = await next_call(attacker)
                assert m4.destination == own_hub
                # q3 redirected: sent again pipelined on q4 (not answered yet), as q5.
                await reply_to(m3, q3, protocol.encode_redirect(q3.question_id))
                m5, q5 = await next_call(attacker)
                assert q5.promised is not None and q5.promised[0] == q4.question_id
                for fd in m5.fds:  # still the pipe (the first _Resend's copy)
                    os.close(fd)
                # q5 redirected too (once the caller's vat keeps it for a resend: a redirect
                # that comes sooner fails the call instead), and q4 answered: the call goes to
                # S's sink itself (q6).
                await until(lambda: q5.question_id in caller_vat._resends)
                await reply_to(m5, q5, protocol.encode_redirect(q5.question_id))
                await reply_to(
                    m4, q4, protocol.encode_results(q4.question_id, sink_method, {"sink": "own"}), [own_sink]
                )
                m6, q6 = await next_call(attacker)
                assert m6.destination == own_sink
                stolen = list(m6.fds)
                await reply_to(m6, q6, protocol.encode_results(q6.question_id, fill, {}))
                with trio.move_on_after(2):  # (it may never answer: the secret is the harm)
                    await promise
            assert_no_file_stolen(stolen, read_end, "the twice-redirected call")
    finally:
        close_all([read_end, write_end, *stolen])
        for peer in (attacker, caller_peer):
            await peer.aclose()


class HeldFactory(FactoryServer):
    """``same`` answers once the test sets the event it appended to ``held`` (one per call)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[trio.Event] = []

    async def same(self, cap: Any) -> Any:
        event = trio.Event()
        self.held.append(event)
        await event.wait()
        return cap


@asynccontextmanager
async def held_server(
    kernel: capbus.Kernel, **options: int
) -> AsyncIterator[tuple[capbus.Peer, Vat, HeldFactory, capbus.Handle]]:
    server_peer = await kernel.connect()
    try:
        async with open_vat(server_peer, **options) as server_vat:
            server = HeldFactory()
            node = await server_vat.export(server)
            yield server_peer, server_vat, server, node
            for event in server.held:
                event.set()
    finally:
        await server_peer.aclose()


async def test_pipelined_calls_released_by_their_base_queue_without_their_bytes_or_capabilities(
    kernel: capbus.Kernel,
) -> None:
    """MEDIUM. A pipelined call that waited for its base answer becomes a CallArrived in
    Engine._pipelined when Engine.completed settles it; only Engine._dispatch fills in a
    CallArrived's ``size`` and ``handles``, for the events of the message it decodes, so
    one made later by completed() keeps size=0 and handles=(). Vat._take_in then queues it
    with CallerCalls.overloaded/enqueue charging no bytes and no capabilities: while it
    waits for a handler slot, its whole message (up to max_message_bytes, in memory or
    mapped) and every handle it brought are held outside max_queued_bytes_per_caller and
    max_queued_capabilities_per_caller (and the uid's shares of them). A caller with one
    handler slot busy parks one pipelined call per base answer (the waiting bound lets one
    in at a time: it is freed when the call settles), so its queue grows to
    max_queued_calls (4096) calls of up to 64 MiB each (or 4096 * 64 handles: the
    kernel's handles_held of the server's peer). Here max_calls_per_caller=1,
    max_queued_bytes_per_caller=16 KiB: six 40 KiB pipelined calls sit in one caller's
    queue, charged 0 bytes. Fix: keep size and handles on _Waiting (they are known in
    _dispatch: set them on the _Waiting, or have _call take them) and put them on the
    CallArrived that _pipelined makes (and refuse it Overloaded if the queue is full)."""
    bound, rounds = 16 * 1024, 6
    options = {
        "max_message_bytes": 64 * 1024,
        "max_queued_bytes_per_caller": bound,
        "max_calls_per_caller": 1,
    }
    attacker = await kernel.connect()
    try:
        async with held_server(kernel, **options) as (server_peer, server_vat, server, node):
            target = await server_peer.transfer(node, attacker)
            reply = await attacker.create_node()
            engine = server_vat.engine
            with trio.fail_after(TIMEOUT):
                for question in range(1, rounds + 2):  # one runs (one handler slot), the rest queue
                    base = protocol.encode_call(question, SAME, {"cap": "own"}, keep_results=True)
                    await attacker.send(target, base.payload, handles=[reply, target])
                await until(lambda: len(server.held) == 1)
                size = 0
                for question in range(1, rounds + 1):
                    parked = protocol.encode_call(
                        100 + question, ECHO, {"text": "x" * 40 * 1024}, pipeline=(question, [0])
                    )
                    size = len(parked.payload)
                    await attacker.send(target, parked.payload, handles=[reply])
                    await until(lambda: engine.waiting_calls == 1)
                    server.held[question - 1].set()  # its base answers: it is taken in, to queue
                    # Its next base runs (taken from the queue), and the pipelined call is queued.
                    await until(lambda q=question: len(server.held) == q + 1 and not engine.waiting_calls)  # type: ignore[misc]
                # (every base has run: what is queued now is pipelined calls; fixed, those past
                # the bound were answered Overloaded instead)
                queued = sum(c.queued for c in server_vat._callers.values())
                counted = sum(c.queued_bytes for c in server_vat._callers.values())
                held = queued * size
                assert held <= bound, (
                    f"one caller's queue holds {queued} pipelined calls of {size} bytes each,"
                    f" {held} bytes, past max_queued_bytes_per_caller={bound}; the queue counts"
                    f" {counted} bytes"
                )
    finally:
        await attacker.aclose()


class InlineCounter(schema.Counter.Server):  # type: ignore[misc]
    """A counter whose handlers are plain functions (run inline in the receive loop)."""

    def increment(self, by: int) -> int:
        return by

    def spawn(self) -> InlineCounter:
        return self


class InlineCounterFactory(FactoryServer):  # type: ignore[misc]
    async def newCounter(self) -> InlineCounter:
        await self.gate.wait()
        return InlineCounter()


async def test_a_chain_of_pipelined_calls_on_plain_function_handlers_crashes_the_vat(
    kernel: capbus.Kernel,
) -> None:
    """HIGH. A plain-function handler runs inline (Vat._serve_inline), and it settles the
    calls pipelined on its answer right there: engine.completed -> _settle -> CallArrived ->
    Vat._handle -> _serve_inline -> engine.completed -> ... The engine's worklist (the third
    review's fix) keeps the engine flat, but the vat recurses once per link of a chain of
    pipelined calls whose targets have plain-function handlers: a caller pipelines 2000
    spawn() calls, each on the previous one's result, on a base that answers later; when it
    does, the vat's task recurses 2000 deep, RecursionError escapes Vat._answer and the
    vat's nursery dies: every object of the vat is gone for every caller. Any server with a
    plain-function handler that returns a capability (the documented quick way) is open to
    this. Fix: do not run a call inline from within engine.completed's events (queue the
    CallArrived events that completed returns and serve them from a loop, or take them in
    as tasks: _take_in instead of _serve_inline when already inside one)."""
    base = protocol.encode_call(1, NEW_COUNTER, {}, keep_results=True)
    cause = "a chain of pipelined calls on plain-function handlers"
    await assert_a_chain_is_served(kernel, InlineCounterFactory(), base, False, cause)


REVIEW4: Any = capbus.load(Path(__file__).with_name("review4.capnp"))


class NamedServer(REVIEW4.Named.Server):  # type: ignore[misc]
    def __init__(self) -> None:
        self.got: list[object] = []

    async def put(self, of: Any, name: str) -> Any:
        self.got.append(of)
        return {"of": of if isinstance(of, int) else -1, "name": name}


async def test_a_flat_field_named_of_reads_as_the_readers_classmethod(kernel: capbus.Kernel) -> None:
    """LOW. FlatReader defines a classmethod ``of`` (its constructor), and _reader_class
    gives no property to a field named like an attribute of FlatReader, so a flat params or
    results struct with a field ``of`` (a legal, ordinary Cap'n Proto name) reads as that
    bound method instead of the field's value, where pycapnp (the general reader) reads
    the number: the handler here gets ``<bound method FlatReader.of>`` for ``of=7``, and
    any results with such a field read wrong for every caller. A hostile sender gains
    nothing, but every honest call of such a method is broken, silently (no error, a
    method object where an int was promised). Fix: name the constructor so that no field
    can clash (a leading underscore: ``_of``, as capnp names cannot have one), or give
    FlatReader no struct-visible names beyond StructReader's."""
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            server = NamedServer()
            node = await server_vat.export(server)
            named = client_vat.client(await server_peer.transfer(node, client_peer), REVIEW4.Named)
            with trio.fail_after(TIMEOUT):
                results = await named.put(of=7, name="seven")
            assert server.got == [7], f"the handler got {server.got!r} for of=7"
            assert results.of == 7, f"the caller read {results.of!r} for of=7"
    finally:
        await server_peer.aclose()
        await client_peer.aclose()


@pytest.mark.parametrize("value", [True, 1.0, 1 + 0j])
def test_the_flat_writer_takes_an_enum_value_pycapnp_refuses(value: object) -> None:
    """LOW. FlatCodec's enum writer looks the value up in a dict of enumerant names and
    numbers, and a dict lookup takes anything equal to a number: ``True``, ``1.0``,
    ``1+0j`` all write enumerant 1, where pycapnp (the general way, which the module
    docstring says the flat writer defers to for anything it does not take exactly as
    pycapnp would) refuses them with KjException. A caller's wrong value (a bool where a
    Shade was meant) is sent silently as another enumerant instead of failing. Fix: in
    write_enum, take only ``type(value) is str`` or ``type(value) is int`` (else TypeError:
    the general way)."""
    codec = flat_codec(REVIEW4.Painted.schema)
    assert codec is not None
    message = REVIEW4.Painted.new_message()
    with pytest.raises(Exception):  # noqa: B017, PT011 - pycapnp refuses it (KjException)
        message.shade = value
    encoded = codec.encode({"shade": value, "depth": 3})
    read = None if encoded is None else str(REVIEW4.Painted.from_segments([encoded]).shade)
    assert encoded is None, f"the flat writer wrote {value!r} as enumerant {read!r}"


class StoreServer(REVIEW4.Store.Server):  # type: ignore[misc]
    def __init__(self) -> None:
        self.running = 0
        self.release = trio.Event()

    async def put(self, file: Any) -> None:
        self.running += 1
        with file:
            await self.release.wait()


async def test_queued_calls_to_a_method_that_takes_fds_make_the_vat_hold_unbounded_fds(
    kernel: capbus.Kernel,
) -> None:
    """MEDIUM. The third review bounded the fds of *waiting pipelined* calls
    (max_waiting_fds); calls queued for a handler slot have no such bound. Engine._dispatch
    closes a call's fds at once only when its method cannot take any; for a method with an
    Fd field every fd the message brought (CAPBUS_FDS_MAX, 64, whatever the params name:
    the extra ones too) stays open in the server's process while the call waits in its
    caller's queue, and CallerCalls.overloaded counts calls, bytes and capabilities, not
    fds: max_queued_calls (4096) * 64 = 262144 fds per caller, uid_share times that per
    uid. A caller whose calls take a while (its handler slots busy: a slow handler, or its
    own calls that wait on it) exhausts the server process's RLIMIT_NOFILE: then memfd
    payloads (any call over 128 KiB, from anyone) are lost, fd-carrying calls arrive
    without fds, and the server can open no file. Here max_calls_per_caller=1 and one
    caller queues 40 calls of 64 fds each behind its first: the server holds 2560 fds.
    Fix: close at dispatch the fds the params do not name (only the Fd fields' indices
    are needed), and count a queued call's fds in CallerCalls/UserCalls with a bound of
    their own (like max_queued_capabilities_per_caller), or refuse fds past the kernel's
    own per-peer bound."""
    calls, per_call, bound = 40, 64, 256
    attacker = await kernel.connect()
    server_peer = await kernel.connect()
    read_end, write_end = os.pipe()
    store = StoreServer()
    try:
        async with open_vat(server_peer, max_calls_per_caller=1) as server_vat:
            node = await server_vat.export(store)
            target = await server_peer.transfer(node, attacker)
            reply = await attacker.create_node()
            put = REVIEW4.Store.interface.methods["put"]
            with trio.fail_after(TIMEOUT):
                first = protocol.encode_call(1, put, {"file": read_end})
                await attacker.send(target, first.payload, handles=[reply], fds=first.fds)
                await until(lambda: store.running == 1)
                before = open_fds()
                for question in range(2, calls + 2):
                    queued = protocol.encode_call(question, put, {"file": read_end})
                    await attacker.send(target, queued.payload, handles=[reply], fds=[read_end] * per_call)
                # (fixed: the calls past the bound are answered Overloaded)
                await until_taken_or_refused(
                    attacker, lambda: sum(c.queued for c in server_vat._callers.values()), calls
                )
                held = open_fds() - before
                store.release.set()
            assert held <= bound, (
                f"one caller's {calls} queued calls make the server's process hold {held} fds"
            )
    finally:
        os.close(read_end)
        os.close(write_end)
        await attacker.aclose()
        await server_peer.aclose()


async def test_waiting_pipelined_calls_hold_capabilities_past_the_queue_bound(kernel: capbus.Kernel) -> None:
    """MEDIUM. Calls queued for a handler slot may bring at most
    max_queued_capabilities_per_caller capabilities (handles this peer then holds: the
    kernel's handles_held, 65536 by default, bounds them for the whole peer, and past it
    the vat can take no capability from anyone). A pipelined call that waits for its base
    answer holds its message's capabilities just as long (its ReceivedCall's cap table:
    imported clients), but Engine._start_waiting counts only calls, bytes and fds: each of
    a caller's max_queued_calls (4096) waiting calls may bring CAPBUS_HANDLES_MAX (256)
    handles, in ~100 bytes of payload (handles travel beside it), on a base that never
    answers. A uid's connections (each owning up to 65536 nodes) so fill the server peer's
    handles_held. Here max_queued_capabilities_per_caller=16, and one caller parks 40
    pipelined calls of 16 handles each: the vat holds 640 imported capabilities for them.
    Fix: count a waiting call's distinct handles (Engine._brought, known in _dispatch) in
    a Tally bounded like the queue's capabilities (per caller and per uid), and release
    them with _unwait."""
    calls, per_call, bound = 40, 16, 16
    attacker = await kernel.connect()
    try:
        async with held_server(kernel, max_queued_capabilities_per_caller=bound) as (
            server_peer,
            server_vat,
            server,
            node,
        ):
            target = await server_peer.transfer(node, attacker)
            reply = await attacker.create_node()
            nodes = [await attacker.create_node() for _ in range(calls * per_call)]
            engine = server_vat.engine
            with trio.fail_after(TIMEOUT):
                base = protocol.encode_call(1, SAME, {"cap": "own"}, keep_results=True)  # held: no answer
                await attacker.send(target, base.payload, handles=[reply, target])
                await until(lambda: len(server.held) == 1)
                before = len(engine.imports)
                for question in range(2, calls + 2):
                    parked = protocol.encode_call(question, ECHO, {"text": "x"}, pipeline=(1, [0]))
                    brought = nodes[(question - 2) * per_call : (question - 1) * per_call]
                    await attacker.send(target, parked.payload, handles=[reply, *brought])
                # (fixed: the calls past the bound are answered Overloaded)
                await until_taken_or_refused(attacker, lambda: engine.waiting_calls, calls)
                held = len(engine.imports) - before
            share = engine.uid_share
            assert held <= bound * share, (
                f"one caller's {calls} waiting pipelined calls make the vat hold {held} capabilities"
                f" (queued calls may hold {bound}, its uid's {bound * share})"
            )
    finally:
        await attacker.aclose()


class RelayServer(REVIEW4.Relay.Server):  # type: ignore[misc]
    """Hands a file back with a capability to itself: a plain-function handler (inline)."""

    def relay(self, file: Any) -> Any:
        return {"file": file, "relay": self}


async def test_an_inline_handler_returning_a_received_fd_breaks_the_server_peer(
    kernel: capbus.Kernel,
) -> None:
    """HIGH. Vat._serve_inline encodes a plain-function handler's results (an Fd field
    becomes the fd's number in Encoded.fds) and, when the return cannot go out at once
    (_send_now: it hands out an object of this vat, needs a node, or the socket is full),
    leaves it to a _send_return task. A received fd is a FileDescriptor owned by the call's
    message; the inline path drops the call (params, table, CallArrived) when it returns,
    so the fd is closed before the task sends its number. The kernel socket's sendmsg then
    fails with EBADF, which Peer takes for a broken connection: the server's peer is dead,
    every object of the vat is gone for every caller, after one call of any caller. (Had
    the receive loop taken another message with an fd first, that message's file, maybe
    another caller's, would get the number and be sent to this caller instead.) Here a
    handler that hands back the file it was given, with a capability to itself, is called
    once by a bare peer: an honest caller's call then fails with Disconnected. Fix: keep
    the received fds alive until the deferred return is sent (hand the call, or its fds,
    to the _send_return task), or let Encoded own duplicates of the result fds it names;
    and in Peer, fail only that send (not the connection) when sendmsg refuses its fds."""
    relay = REVIEW4.Relay.interface.methods["relay"]
    server_peer, attacker, honest = await kernel.connect(), await kernel.connect(), await kernel.connect()
    read_end, write_end = os.pipe()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(honest) as honest_vat:
            node = await server_vat.export(RelayServer())
            target = await server_peer.transfer(node, attacker)
            client = honest_vat.client(await server_peer.transfer(node, honest), REVIEW4.Relay)
            reply = await attacker.create_node()
            with trio.fail_after(TIMEOUT):
                call = protocol.encode_call(1, relay, {"file": read_end})
                await attacker.send(target, call.payload, handles=[reply], fds=call.fds)
                async with trio.open_nursery() as nursery:  # its return, or the server's peer broken

                    async def answered() -> None:
                        await next_return(attacker)
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(answered)
                    await until(lambda: server_peer._broken is not None)
                    nursery.cancel_scope.cancel()
                assert server_peer._broken is None, (
                    f"after one call, the server's peer is broken for everyone: {server_peer._broken}"
                )
                results = await client.relay(file=write_end)
                results.file.close()
    finally:
        os.close(read_end)
        os.close(write_end)
        for peer in (server_peer, attacker, honest):
            await peer.aclose()


REDIRECTING_CALLEE = """
import gc
import os

review4 = capbus.load({schema!r})
SINK = review4.Hub.interface.methods["sink"]
FILL = review4.Sink.interface.methods["fill"]


async def next_call(peer):
    while True:
        message = await peer.recv()
        if message.kind is capbus.MessageKind.DATA:
            call = protocol.decode(message.payload_view, list(range(len(message.handles))))
            if isinstance(call, protocol.ReceivedCall):
                return message, call


async def attack(peer, report, *handles):
    hub = await peer.create_node()
    await report("hub", [hub])
    base_message, base = await next_call(peer)
    message, pipelined = await next_call(peer)  # on a Sink that is not ours: redirected at once
    await peer.send(message.handles[pipelined.reply], protocol.encode_redirect(pipelined.question_id).payload)
    fd = os.open({fifo!r}, os.O_WRONLY)
    os.write(fd, b"sent")
    os.close(fd)
    sink = await peer.create_node()
    results = protocol.encode_results(base.question_id, SINK, {{"sink": "own"}})
    await peer.send(base_message.handles[base.reply], results.payload, handles=[sink])
    message, resent = await next_call(peer)  # the call again, at the sink itself
    answer = protocol.encode_results(resent.question_id, FILL, {{}})
    await peer.send(message.handles[resent.reply], answer.payload)
"""


class _HoldWhileSendIsAcknowledged(trio.abc.Instrument):
    """Once a task step wrote a new pipelined call (a new command cookie, a pipelined
    question asked since this was made), blocks this process until the callee says it
    answered it: the caller's socket then holds the kernel's acknowledgement and the
    callee's redirect together, as on a loaded machine (a bound of 10 s keeps a broken run
    from hanging)."""

    def __init__(self, vat: Vat, fifo: int) -> None:
        self.vat, self.fifo, self.done = vat, fifo, False
        self.cookie, self.known = vat.peer._next_cookie, set(vat.engine.questions)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.cookie = self.vat.peer._next_cookie

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.done or self.vat.peer._next_cookie == self.cookie:
            return
        questions = self.vat.engine.questions
        if any(q.pipelined and i not in self.known for i, q in questions.items()):
            self.done = True
            select.select([self.fifo], [], [], 10)


async def test_a_redirect_that_comes_before_the_send_is_acknowledged_fails_the_pipelined_call(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    """MEDIUM. Vat.send_call keeps a pipelined call for a resend (_resends[question]) only
    after ``await self._send(...)`` returns, i.e. after the kernel acknowledged the send.
    The vat's receive loop reads the socket meanwhile: if the callee's redirect is there
    behind the acknowledgement (a callee that redirects at once: any pipelined call on a
    capability that is not its own object, by an honest callee too; the caller's process
    merely busy for a moment), Vat._handle finds no _Resend for it, files the redirect as
    the question's answer, and the promise fails with "the callee redirected this call, and
    it could not be sent again": a legitimate pipelined call fails depending on timing
    (and its fd copies stay until the promise is collected). Here the caller's process is
    held (a trio Instrument, blocking until the callee says it sent its redirect) right
    after it wrote the pipelined call. Fix: register the _Resend (with the params and fd
    copies) before the send, under the question id from _question, and drop it if the send
    fails."""
    review4_path = str(Path(__file__).with_name("review4.capnp"))
    fifo_path = tmp_path / "redirected"
    os.mkfifo(fifo_path)
    fifo = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK)
    attack = REDIRECTING_CALLEE.format(schema=review4_path, fifo=str(fifo_path))
    caller_peer, holder = await kernel.connect(), await kernel.connect()
    read_end, write_end = os.pipe()
    try:
        async with open_vat(caller_peer) as caller_vat:
            async with reporting_process(kernel, tmp_path, attack, holder, []) as message:
                hub_handle = message.handles[0]
                hub = caller_vat.client(await hub_handle.peer.transfer(hub_handle, caller_peer), REVIEW4.Hub)
                with trio.fail_after(TIMEOUT):
                    base = await hub.sink.send()
                    instrument = _HoldWhileSendIsAcknowledged(caller_vat, fifo)
                    trio.lowlevel.add_instrument(instrument)
                    try:
                        promise = await base.sink.fill.send(sink=write_end, data=b"x")
                    finally:
                        trio.lowlevel.remove_instrument(instrument)
                    assert instrument.done
                    try:
                        await promise
                    except RpcError as error:
                        pytest.fail(f"a pipelined call the callee redirected failed: {error!r}")
    finally:
        for fd in (fifo, read_end, write_end):
            os.close(fd)
        for peer in (caller_peer, holder):
            await peer.aclose()


class PairServer(REVIEW4.Pair.Server):  # type: ignore[misc]
    async def pair(self, a: Any, b: Any) -> None:
        a.close()
        b.close()


class PairHubServer(REVIEW4.PairHub.Server):  # type: ignore[misc]
    async def get(self) -> PairServer:
        return PairServer()


def _fds_of(inode: int) -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.stat(f"/proc/self/fd/{name}").st_ino == inode:
                count += 1
        except OSError:
            pass
    return count


async def test_a_pipelined_send_call_with_two_params_mapped_to_one_fd_leaks_a_copy(
    kernel: capbus.Kernel,
) -> None:
    """LOW. Vat.send_call(..., fds={param: real}) on a promise keeps copies of the fds for a
    resend: ``{fd: os.dup(...) for fd in call.fds}`` over the fd numbers *after* they were
    mapped. Two params mapped to one file (``fds={1000: w, 1001: w}``) give one key twice:
    the first copy is overwritten in the dict and never closed (not by _Resend.close, not
    when the promise goes): one fd leaked per such call, for the life of the process. (The
    same keying by mapped numbers is what makes a resend send the wrong file: see the
    first test.) Fix: key the copies by the params' own numbers (taken before mapping):
    ``{param: os.dup(fds.get(param, param)) for param in param_fds}``."""
    pair = REVIEW4.Pair.interface.methods["pair"]
    server_peer, caller_peer = await kernel.connect(), await kernel.connect()
    read_end, write_end = os.pipe()
    inode = os.fstat(write_end).st_ino
    try:
        async with open_vat(server_peer) as server_vat, open_vat(caller_peer) as caller_vat:
            node = await server_vat.export(PairHubServer())
            hub = caller_vat.client(await server_peer.transfer(node, caller_peer), REVIEW4.PairHub)
            with trio.fail_after(TIMEOUT):
                base = await hub.get.send()
                promise = await caller_vat.send_call(
                    base.pair, pair, {"a": 1000, "b": 1001}, fds={1000: write_end, 1001: write_end}
                )
                await promise
                await base
                del promise, base
                gc.collect()
                await until(lambda: not caller_vat._resends)
            leaked = _fds_of(inode) - 2  # (the pipe's two ends: one inode)
            assert leaked == 0, f"{leaked} copy of the caller's fd is left open after the call"
    finally:
        os.close(read_end)
        os.close(write_end)
        await server_peer.aclose()
        await caller_peer.aclose()
