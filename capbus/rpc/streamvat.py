"""One ``rpc.capnp`` connection over a byte stream (TCP, TLS, a unix stream), run with trio.

The other side is any Cap'n Proto implementation (C++, Rust, Go, pycapnp) or another capbus
program. The same clients, generated stubs and ``Foo.Server`` classes as on the bus work
here: a :class:`StreamVat` offers what they use of a vat (``call``, ``send_call``, ...).

The four tables of rpc.capnp, as this side keeps them:
- questions: our calls (and bootstraps) awaiting their Return; an id is free again once
  the Return came and our Finish went;
- answers: the peer's calls, while they run and (for pipelining) until its Finish;
- exports: our objects the peer holds, with how many times we sent each (its Releases
  count them down; at zero the object is dropped);
- imports: the peer's objects we hold, one client each, released (by the count we were
  sent them) when the client goes.

What this side never does: export promises (its results are final when sent, so it never
sends Resolve, and the peer never has to embargo anything of ours), three-party handoff
(level 1). A pipelined call whose capability turns out to be the caller's own is made
back on the caller (its results relayed). Capabilities that belong to another vat (a bus
client, another connection) are exported as forwarders: calls to them are made there, and
the forwarder goes when the peer releases it.

Bounds: a message over ``max_message_bytes`` or of too many segments aborts the
connection (before it is buffered); at most ``max_calls`` of the peer's calls run at once
(then this side stops reading: the peer's writes block); a peer that does not read what
this side writes for ``send_timeout`` seconds is disconnected.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import capnp
import trio

from . import twopartyflat
from .capwire import Segment
from .client import Client, ClientClasses, Promise
from .engine import Returned
from .errors import Disconnected, Failed, Overloaded, RpcError, Unimplemented
from .interface import Interface, Method
from .layout import FieldLayout
from .protocol import as_kwargs, malformed
from .server import Forwarder, Forwarders, Server, handler_failed
from .structs import StructReader
from .twoparty import (
    CALL_CONTENT,
    DEFAULT_MAX_MESSAGE_BYTES,
    NONE,
    RETURN_CONTENT,
    Descriptor,
    FrameError,
    FrameReader,
    content,
    decode,
    encode_abort,
    encode_bootstrap,
    encode_bootstrap_return,
    encode_call,
    encode_canceled,
    encode_disembargo_loopback,
    encode_exception,
    encode_release,
    encode_results,
    encode_results_elsewhere,
    encode_unimplemented,
    frame,
    read_descriptor,
    read_exception,
    read_transform,
)

log = logging.getLogger("capbus.rpc.streamvat")

MAX_CALLS = 256
MAX_ANSWERS = 8192
"""The peer's questions this side keeps at once (running, or returned and not finished):
past that the connection is aborted (each answer holds its results for pipelining)."""
MAX_PENDING = 4096
MAX_CAPABILITIES = 4096
"""Capabilities one message may carry (its capTable): past that it is refused whole."""
SEND_TIMEOUT = 60.0
_RECEIVE_BYTES = 1 << 16


class ProtocolError(Exception):
    """The peer broke the protocol: the connection is aborted with this reason."""


@dataclass(eq=False)
class _Question:
    done: tuple[trio.Event, list[Returned]]
    method: Method | None
    """None for a Bootstrap."""
    params: list[Descriptor] = field(default_factory=list)
    returned: bool = False
    finished: bool = False
    finish_sent: bool = False


@dataclass(eq=False)
class _Answer:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    lookup: Callable[[tuple[int, ...]], object] | None = None
    """Once returned with results: the capability at a transform of them (pipelining)."""
    error: RpcError | None = None
    results: list[Descriptor] = field(default_factory=list)
    returned: bool = False
    finished: bool = False
    kept_here: bool = False
    """The caller asked for the results to stay here (sendResultsTo.yourself): its Return
    says resultsSentElsewhere, and calls pipelined on it get them."""
    no_pipelining: bool = False
    """The caller promised no call pipelined on it (Call.noPromisePipelining): flat results
    go with noFinishNeeded, the answer forgotten as they go."""
    forwarded: _Count = field(default_factory=lambda: _Count())
    """Calls pipelined on it still on their way to where they go (a Disembargo waits)."""


class _Count:
    """How many of something are under way; wait until none is."""

    def __init__(self) -> None:
        self.count = 0
        self._drained = trio.Event()
        self._drained.set()

    def add(self) -> None:
        if not self.count:
            self._drained = trio.Event()
        self.count += 1

    def done(self) -> None:
        self.count -= 1
        if not self.count:
            self._drained.set()

    async def wait_drained(self) -> None:
        await self._drained.wait()


@dataclass(eq=False)
class _Export:
    server: Server
    references: int = 0


class _Promised(Server):
    """A capability in the results of one of the peer's calls that has not returned yet
    (a CapDescriptor receiverAnswer): calls to it wait for those results, then go to the
    capability there."""

    def __init__(self, vat: StreamVat, answer: _Answer, transform: tuple[int, ...]) -> None:
        self.interface = vat._generic
        self._answer, self._transform = answer, transform

    async def resolved(self) -> Client:
        await self._answer.done.wait()
        if self._answer.error is not None:
            raise self._answer.error
        assert self._answer.lookup is not None
        target = self._answer.lookup(self._transform)
        if not isinstance(target, Client):
            raise Failed(f"the promised capability (pointer fields {list(self._transform)}) is null")
        return target

    async def _dispatch(self, method: Method, params: dict[str, Any]) -> Mapping[str, Any]:
        target = await self.resolved()
        if target.server is not None:
            return await target.server._dispatch(method, params)
        return (await target.vat.call(target, method, params)).to_dict()


class StreamVat:
    """The RPC endpoint of one connection (see the module docstring): made by
    :func:`open_stream_vat`."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        nursery: trio.Nursery,
        bootstrap: Server | Client | None,
        *,
        max_message_bytes: int,
        max_calls: int,
        send_timeout: float,
    ) -> None:
        self._stream, self._nursery, self._bootstrap = stream, nursery, bootstrap
        self.engine = ClientClasses()  # (what clients and promises ask a vat for)
        self.max_message_bytes, self.send_timeout = max_message_bytes, send_timeout
        self._reader = FrameReader(max_message_bytes)
        self._send_lock = trio.Semaphore(1)
        """Held while a message is being written (a Semaphore, not a Lock: the rest of a
        message :meth:`_send_now` began is written by another task)."""
        self._raw: socket.socket | None = None
        """For a plain socket stream: the socket, to write without a task (_send_now)."""
        if isinstance(stream, trio.SocketStream):
            self._raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
        self._calls = trio.Semaphore(max_calls)
        self.max_calls = max_calls
        self._turn: trio.Event | None = None
        self.questions: dict[int, _Question] = {}
        self._free_questions: list[int] = []
        self.answers: dict[int, _Answer] = {}
        self.exports: dict[int, _Export] = {}
        self._export_of: dict[int, int] = {}
        self._free_exports: list[int] = []
        self.imports: weakref.WeakValueDictionary[int, Client] = weakref.WeakValueDictionary()
        self._import_references: dict[int, int] = {}
        self._locals: weakref.WeakValueDictionary[int, Client] = weakref.WeakValueDictionary()
        self._no_finish_needed: set[int] = set()
        """Answers returned with noFinishNeeded (:meth:`_finish_ignored`)."""
        self._forwarders = Forwarders()
        """The Forwarder exported for each client of another vat."""
        self._pending: list[tuple[bytes, Callable[[], None] | None]] = []
        self._pending_ready = trio.Event()
        self.closed: RpcError | None = None
        self._closed_event = trio.Event()
        self._scopes: set[trio.CancelScope] = set()
        """Those of this vat's own tasks: cancelled when the connection ends (never the
        code that uses the vat, which gets Disconnected from its calls instead)."""
        self._generic = Interface(0, "Capability", None)

    # -- what clients and promises use -------------------------------------------------------

    def local(self, server: Server) -> Client:
        client = self._locals.get(id(server))
        if client is None:
            client = self.engine.client_class(server.interface)(self, 0, server)
            self._locals[id(server)] = client
        return client

    async def bootstrap(self, interface: Any = None) -> Client:
        """The peer's bootstrap capability, as a client of ``interface`` (an Interface, a
        generated client class or a capbus.load type; None: of no known interface)."""
        question_id, question = self._question(None)
        await self._send(encode_bootstrap(question_id))
        returned = await self._await(question_id, question)
        value: object = returned.results
        if not isinstance(value, Client):
            raise Failed("the peer's bootstrap capability is null")
        if interface is not None:
            from .vat import _interface

            value.__class__ = self.engine.client_class(_interface(interface))
        return value

    async def call(self, client: Client, method: Method, params: Mapping[str, Any]) -> StructReader:
        if client.server is not None:
            return await self._call_local(client.server, method, params)
        asked = await self._question_for(client, method, params, no_pipelining=True)
        if isinstance(asked, Client):
            return await self.call(asked, method, params)
        question_id, question, framed = asked
        await self._send_bytes(framed, checkpoint=False)
        returned = await self._await(question_id, question)
        assert isinstance(returned.results, StructReader)
        return returned.results

    async def send_call(self, client: Client, method: Method, params: Mapping[str, Any]) -> Promise:
        if client.server is not None:
            results = await self._call_local(client.server, method, params)
            return Promise.resolved(self, client, method, results)
        asked = await self._question_for(client, method, params)
        if isinstance(asked, Client):
            return await self.send_call(asked, method, params)
        question_id, question, framed = asked
        promise = Promise(self, client, method, question_id, question.done)
        try:
            await self._send_bytes(framed)
        except BaseException:
            promise._finalizer.detach()
            raise
        return promise

    async def _question_for(
        self, client: Client, method: Method, params: Mapping[str, Any], *, no_pipelining: bool = False
    ) -> Client | tuple[int, _Question, bytes]:
        """A new question calling ``method`` on ``client``, and its Call (framed); or, for a
        client pipelined on a question that has returned, the capability it names."""
        target = self._target(client)
        if target is None:
            assert client.pipeline is not None
            return await self._resolved(*client.pipeline)
        question_id, question = self._question(method)
        described: list[Descriptor] = []
        try:
            framed = None
            if target.kind == "receiverHosted":
                framed = twopartyflat.encode_call(
                    question_id, target.id, method, params, no_pipelining=no_pipelining
                )
            if framed is None:
                segments, question.params = encode_call(
                    question_id, target, method, params, lambda value: self._described(value, described)
                )
                framed = frame(segments)
            self._check_size(framed)
        except BaseException:
            self._free_question(question_id)
            self._released(described)  # (never sent: the peer holds none of them)
            raise
        return question_id, question, framed

    async def call_oneway(self, client: Client, method: Method, params: Mapping[str, Any]) -> None:
        """rpc.capnp has no one-way call: a call whose results are not awaited (its Finish
        goes when they come)."""
        promise = await self.send_call(client, method, params)
        self._start(self._settle, promise)

    async def stream(self, client: Client, method: Method, params: Mapping[str, Any]) -> None:
        await self.call(client, method, params)

    async def drop(self, client: Client) -> None:
        if client.server is not None or client.pipeline is not None:
            return  # (an object of this side, or a promised one: no import of its own)
        if self.imports.get(client.handle) is not client:
            return  # (released already)
        del self.imports[client.handle]
        references = self._import_references.pop(client.handle, 0)
        if references and self.closed is None:
            await self._send(encode_release(client.handle, references))

    def _promise_gone(self, target: Client, question_id: int) -> None:
        question = self.questions.get(question_id)
        if question is not None:
            self._finish(question_id, question)

    @staticmethod
    async def _settle(promise: Promise) -> None:
        try:
            await promise
        except RpcError:
            pass

    # -- questions -------------------------------------------------------------------------------

    def _question(self, method: Method | None) -> tuple[int, _Question]:
        if self.closed is not None:
            raise self.closed
        question_id = self._free_questions.pop() if self._free_questions else len(self.questions)
        while question_id in self.questions:
            question_id += 1
        question = _Question((trio.Event(), []), method)
        self.questions[question_id] = question
        return question_id, question

    def _finish(self, question_id: int, question: _Question) -> None:
        """Sends Finish for a question (once): its id is free again once the Finish is out
        and the Return is in, so that the peer never sees the id reused before."""
        if question.finished:
            return
        question.finished = True

        def sent() -> None:
            question.finish_sent = True
            if question.returned:
                self._free_question(question_id)

        self._post(twopartyflat.encode_finish(question_id), sent)

    def _free_question(self, question_id: int) -> None:
        if self.questions.pop(question_id, None) is not None:
            self._free_questions.append(question_id)

    async def _await(self, question_id: int, question: _Question) -> Returned:
        try:
            await question.done[0].wait()
        except BaseException:
            if not question.returned:
                self._finish(question_id, question)  # (the callee cancels the call)
            raise
        returned = question.done[1][0]
        if returned.error is not None:
            raise returned.error
        return returned

    def _target(self, client: Client) -> Descriptor | None:
        """How a call to ``client`` names its target here (None: a pipelined client whose
        question has returned, or that is not this connection's)."""
        if client.pipeline is None:
            if client.vat is not self:
                raise Failed(f"{client!r} belongs to another vat")
            return Descriptor("receiverHosted", client.handle)
        promise, transform = client.pipeline
        question = self.questions.get(promise.question_id)
        if promise.vat is self and question is not None and not question.returned:
            return Descriptor("receiverAnswer", promise.question_id, transform)
        return None

    @staticmethod
    async def _resolved(promise: Promise, transform: tuple[int, ...]) -> Client:
        results = await promise
        target = results.capability_at(transform)
        if not isinstance(target, Client):
            raise Failed(f"the pipelined capability (pointer fields {list(transform)}) is null")
        return target

    async def _call_local(self, server: Server, method: Method, params: Mapping[str, Any]) -> StructReader:
        """A call of an object of this side: run, its results read back as a caller
        would read them (capabilities as clients)."""
        results = await server._dispatch(method, dict(params))
        segments, _, values = encode_results(0, method, results, lambda value: NONE)
        clients = [self._as_client(value) for value in values]
        return content(
            segments,
            decode(segments, self._words()).__getattr__("return").results.content,
            RETURN_CONTENT,
            method.results,
            clients,
            self._typed,
        )

    def _as_client(self, value: object) -> object:
        return self.local(value) if isinstance(value, Server) else value

    def _check_size(self, framed: bytes) -> None:
        size = len(framed) - 8  # (at least one segment's table entry: a message is never less)
        if size > self.max_message_bytes:
            raise Failed(
                f"the call is {size} bytes: over this connection's limit of {self.max_message_bytes}"
            )

    def _words(self) -> int:
        return self.max_message_bytes // 8 * 4

    # -- capabilities out --------------------------------------------------------------------

    def _described(self, value: object, made: list[Descriptor]) -> Descriptor:
        """:meth:`_describe`, noting each descriptor in ``made`` (to take back the export
        references of a message that is not sent after all)."""
        descriptor = self._describe(value)
        made.append(descriptor)
        return descriptor

    def _describe(self, value: object) -> Descriptor:
        """How capability ``value`` (a server, or a client) travels to the peer."""
        if isinstance(value, Client):
            if isinstance(value.server, Forwarder) and value.server.target.vat is self:
                value = value.server.target  # (one of ours, back from a trip over the bus)
            if value.server is not None:
                return self._export(value.server)
            if value.vat is self:
                target = self._target(value)
                if target is not None:
                    return target
                return self._describe(_answered(value))
            forwarder = self._forwarders.of(value)
            return self._export(forwarder)
        if isinstance(value, Server):
            return self._export(value)
        raise TypeError(f"not a capability: {value!r}")

    def _export(self, server: Server) -> Descriptor:
        export_id = self._export_of.get(id(server))
        if export_id is None:
            export_id = self._free_exports.pop() if self._free_exports else len(self.exports)
            while export_id in self.exports:
                export_id += 1
            self.exports[export_id] = _Export(server)
            self._export_of[id(server)] = export_id
        self.exports[export_id].references += 1
        return Descriptor("senderHosted", export_id)

    def _release_export(self, export_id: int, count: int) -> None:
        export = self.exports.get(export_id)
        if export is None or count > export.references:
            held = 0 if export is None else export.references
            raise ProtocolError(f"Release of export {export_id} by {count}: it holds {held}")
        export.references -= count
        if not export.references:
            del self.exports[export_id]
            self._export_of.pop(id(export.server), None)
            self._free_exports.append(export_id)

    def _released(self, descriptors: Sequence[Descriptor]) -> None:
        for descriptor in descriptors:
            if descriptor.kind == "senderHosted":
                self._release_export(descriptor.id, 1)

    # -- capabilities in ---------------------------------------------------------------------

    def _received(self, reader: Any) -> tuple[list[Descriptor], list[object]]:
        """A received payload's capTable: the descriptors, and the capability of each."""
        table = reader.capTable
        if len(table) > MAX_CAPABILITIES:
            raise ProtocolError(f"a message of {len(table)} capabilities (at most {MAX_CAPABILITIES})")
        descriptors = [read_descriptor(d) for d in table]
        return descriptors, [self._capability(d) for d in descriptors]

    def _capability(self, descriptor: Descriptor) -> object:
        if descriptor.kind in ("senderHosted", "senderPromise"):
            return self._import(descriptor.id)
        if descriptor.kind == "receiverHosted":
            export = self.exports.get(descriptor.id)
            if export is None:
                raise ProtocolError(f"a capability of export {descriptor.id}, which is not one")
            return self.local(export.server)
        if descriptor.kind == "receiverAnswer":
            answer = self.answers.get(descriptor.id)
            if answer is None:
                raise ProtocolError(f"a capability in answer {descriptor.id}, which is not one")
            if answer.lookup is None:  # (not returned yet: a promise of it)
                return self.local(_Promised(self, answer, descriptor.transform))
            return answer.lookup(descriptor.transform)
        return None

    def _import(self, import_id: int) -> Client:
        client = self.imports.get(import_id)
        if client is None:
            client = self.engine.client_class(self._generic)(self, import_id)
            self.imports[import_id] = client
            weakref.finalize(client, self._import_gone, import_id)
        self._import_references[import_id] = self._import_references.get(import_id, 0) + 1
        return client

    def _import_gone(self, import_id: int) -> None:
        if import_id in self.imports:
            return  # (a newer client of the same import)
        references = self._import_references.pop(import_id, 0)
        if references and self.closed is None:
            self._post(frame(encode_release(import_id, references)))

    def _typed(self, value: object, field: FieldLayout) -> object:
        """A client read from a field gets that field's interface."""
        if (
            isinstance(value, Client)
            and value.interface.schema is None
            and field.interface_schema is not None
        ):
            from .interface import interface_of

            value.__class__ = self.engine.client_class(interface_of(field.interface_schema))
        return value

    # -- sending ---------------------------------------------------------------------------------

    def _post(self, framed: bytes, sent: Callable[[], None] | None = None) -> None:
        """Sends later, from where no await is possible (a finalizer); ``sent`` is called
        once it is out. A peer that lets MAX_PENDING of these pile up reads nothing: it is
        disconnected (its messages would otherwise queue here without bound)."""
        if len(self._pending) >= MAX_PENDING:
            self._close(Disconnected(f"the peer read nothing of {MAX_PENDING} messages due to it"))
            return
        self._pending.append((framed, sent))
        self._pending_ready.set()

    async def _send(self, segments: Sequence[Segment]) -> None:
        await self._send_bytes(frame(segments))

    def _send_now(self, data: bytes) -> bool:
        """Writes ``data`` without waiting, if nothing else is being written: what the
        socket does not take at once is written by a task, before anything after it.
        False if it could not start (a stream other than a plain socket, or one busy)."""
        raw = self._raw
        if raw is None or self.closed is not None or not self._send_lock.value:
            return False
        try:
            sent = raw.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._close(Disconnected(f"the connection broke: {error}"))
            return True
        if sent < len(data):
            self._send_lock.acquire_nowait()
            self._start(self._send_rest, memoryview(data)[sent:])
        return True

    async def _send_rest(self, rest: memoryview) -> None:
        try:
            with trio.move_on_after(self.send_timeout) as waited:
                await self._stream.send_all(rest)
            if waited.cancelled_caught:
                self._close(Disconnected(f"the peer read nothing for {self.send_timeout:g} s"))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            self._close(Disconnected(f"the connection broke: {error}"))
        finally:
            self._send_lock.release()

    async def _send_bytes(self, data: bytes, *, checkpoint: bool = True) -> None:
        """Writes one or more framed messages (``checkpoint``: False where the caller's next
        step waits anyway, for its Return)."""
        if self.closed is not None:
            raise self.closed
        if self._send_now(data):
            if self.closed is not None:
                raise self.closed
            if checkpoint:
                await trio.lowlevel.checkpoint()
            return
        async with self._send_lock:
            with trio.move_on_after(self.send_timeout) as waited:
                await self._stream.send_all(data)
        if waited.cancelled_caught:
            self._close(Disconnected(f"the peer read nothing for {self.send_timeout:g} s"))
            raise self.closed  # type: ignore[misc]

    async def _send_pending(self) -> None:
        while True:
            await self._pending_ready.wait()
            self._pending_ready = trio.Event()
            pending, self._pending = self._pending, []
            try:  # (all that waits, in one write)
                await self._send_bytes(b"".join(framed for framed, _ in pending))
            except (RpcError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            for _, sent in pending:
                if sent is not None:
                    sent()

    # -- receiving -------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        try:
            while True:
                try:
                    data = await self._stream.receive_some(_RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                    self._close(Disconnected(f"the connection broke: {error}"))
                    return
                if not data:
                    self._close(Disconnected("the peer closed the connection"))
                    return
                for segments in self._reader.feed(data):
                    await self._receive(segments)
                    await trio.lowlevel.checkpoint()  # (other connections run between messages)
        except (FrameError, ProtocolError) as error:
            await self._abort(str(error))
        except (capnp.KjException, ValueError) as error:
            await self._abort(str(malformed(error)))

    async def _abort(self, reason: str) -> None:
        log.warning("aborting a connection: %s", reason)
        with trio.move_on_after(1):
            try:
                await self._send(encode_abort(reason))
            except (RpcError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        self._close(Disconnected(f"aborted: {reason}"))

    def _close(self, error: RpcError) -> None:
        if self.closed is not None:
            return
        self.closed = error
        # Handlers of the peer's calls first: cancelled where they wait (on a call back to
        # the peer, say), before those calls fail with ``error`` for anyone else waiting.
        for answer in self.answers.values():
            answer.scope.cancel()
        for scope in list(self._scopes):
            scope.cancel()
        for question in self.questions.values():
            if not question.returned:
                question.returned = True
                question.done[1].append(Returned(0, error=error))
                question.done[0].set()
        self._closed_event.set()

    async def wait_closed(self) -> None:
        """Returns once the connection has ended (``closed`` says why)."""
        await self._closed_event.wait()

    def _start(self, function: Callable[..., Any], *args: Any) -> None:
        """Runs ``function(*args)`` as one of this vat's own tasks (see ``_scopes``)."""

        async def guarded() -> None:
            if self.closed is not None:
                return
            scope = trio.CancelScope()
            self._scopes.add(scope)
            try:
                with scope:
                    await function(*args)
            finally:
                self._scopes.discard(scope)

        self._nursery.start_soon(guarded)

    async def _receive(self, segments: list[Segment]) -> None:
        hot = twopartyflat.read(segments)
        if isinstance(hot, twopartyflat.HotCall):
            await self._on_hot_call(segments, hot)
            return
        if isinstance(hot, twopartyflat.HotReturn):
            question = self.questions.get(hot.answer_id)
            if question is not None and question.method is not None:  # (a Bootstrap's: below)
                self._on_return(segments, hot)
                return
        elif isinstance(hot, twopartyflat.HotFinish):
            self._on_finish(hot.question_id, hot.release_result_caps)
            return
        message = decode(segments, self._words())
        try:
            kind = message.which()
        except capnp.KjException:  # (a kind rpc.capnp has added since: not ours to take)
            await self._send(encode_unimplemented(message))
            return
        if kind == "call":
            await self._on_call(segments, message.call)
        elif kind == "return":
            self._on_return(segments, message.__getattr__("return"))
        elif kind == "finish":
            self._on_finish(int(message.finish.questionId), bool(message.finish.releaseResultCaps))
        elif kind == "release":
            self._release_export(int(message.release.id), int(message.release.referenceCount))
        elif kind == "bootstrap":
            await self._on_bootstrap(int(message.bootstrap.questionId))
        elif kind == "abort":
            self._close(Disconnected(f"the peer aborted: {message.abort.reason}"))
        elif kind == "resolve":
            self._on_resolve(message.resolve)
        elif kind == "disembargo":
            await self._on_disembargo(message)
        elif kind == "unimplemented":
            self._on_unimplemented(message.unimplemented)
        else:
            await self._send(encode_unimplemented(message))

    def _new_answer(self, question_id: int) -> _Answer:
        if question_id in self.answers:
            raise ProtocolError(f"question {question_id} asked twice")
        self._no_finish_needed.discard(question_id)
        if len(self.answers) >= MAX_ANSWERS:
            raise ProtocolError(f"more than {MAX_ANSWERS} questions unfinished (the peer sends no Finish)")
        answer = self.answers[question_id] = _Answer()
        return answer

    async def _on_bootstrap(self, question_id: int) -> None:
        answer = self._new_answer(question_id)
        if self._bootstrap is None:
            answer.error = Failed("nothing is served here")
            await self._send(encode_exception(question_id, answer.error))
        else:
            descriptor = self._describe(self._bootstrap)
            answer.results = [descriptor]
            bootstrap = self._as_client(self._bootstrap)
            answer.lookup = lambda transform: bootstrap if not transform else None
            await self._send(encode_bootstrap_return(question_id, descriptor))
        answer.returned = True
        answer.done.set()

    async def _on_call(self, segments: list[Segment], call: Any) -> None:
        question_id = int(call.questionId)
        if question_id in self.answers:
            raise ProtocolError(f"question {question_id} asked twice")
        results_to = call.sendResultsTo.which()
        if results_to not in ("caller", "yourself"):
            raise ProtocolError(f"results sent to {results_to} (three-party handoff is not supported)")
        target = call.target
        where: Any
        if target.which() == "importedCap":
            where = self._exported(int(target.importedCap))
        else:
            promised = target.promisedAnswer
            base = self.answers.get(int(promised.questionId))
            if base is None:
                raise ProtocolError(f"a call pipelined on question {promised.questionId}, which is not one")
            where = (base, read_transform(promised))
        _, caps = self._received(call.params)
        payload = call.params

        def params(schema: Any) -> StructReader:
            return content(segments, payload.content, CALL_CONTENT, schema, caps, self._typed)

        key = (int(call.interfaceId), int(call.methodId))
        await self._take_call(
            question_id,
            where,
            key,
            params,
            kept_here=results_to == "yourself",
            no_pipelining=bool(call.noPromisePipelining),
        )

    async def _on_hot_call(self, segments: list[Segment], call: twopartyflat.HotCall) -> None:
        """A Call of the plain shape twopartyflat.py reads: no capabilities, to an export."""
        if call.question_id in self.answers:
            raise ProtocolError(f"question {call.question_id} asked twice")
        where = self._exported(call.import_id)

        def general(schema: Any) -> Callable[[], StructReader]:
            def read() -> StructReader:
                payload = decode(segments, self._words()).call.params
                return content(segments, payload.content, CALL_CONTENT, schema, [], self._typed)

            return read

        def params(schema: Any) -> StructReader:
            return call.params.read(schema, general(schema))

        key = (call.interface_id, call.method_id)
        await self._take_call(
            call.question_id, where, key, params, kept_here=False, no_pipelining=call.no_pipelining
        )

    def _exported(self, export_id: int) -> Client:
        export = self.exports.get(export_id)
        if export is None:
            raise ProtocolError(f"a call to export {export_id}, which is not one")
        return self.local(export.server)

    async def _take_call(
        self,
        question_id: int,
        where: Any,
        key: tuple[int, int],
        params: Callable[[Any], StructReader],
        *,
        kept_here: bool,
        no_pipelining: bool,
    ) -> None:
        """Starts serving one of the peer's calls (``where``: the capability called, or the
        answer and transform it is pipelined on; ``params`` reads them as a struct of the
        schema given), or refuses it at once past ``max_calls``."""
        answer = self._new_answer(question_id)
        answer.kept_here, answer.no_pipelining = kept_here, no_pipelining and not kept_here
        try:
            self._calls.acquire_nowait()
        except trio.WouldBlock:
            # (refused at once, never waited for: this side keeps reading, so it sees the
            # peer go; the peer that never reads these is stopped by the send timeout)
            answer.error = Overloaded(f"more than {self.max_calls} calls of this connection at once")
            answer.returned = True
            answer.done.set()
            await self._send(encode_exception(question_id, answer.error))
            return
        if self._turn is not None and self._turn.is_set():
            self._turn = None  # (every call before has started)
        if self._serve_inline(question_id, answer, where, key, params):
            return
        before, self._turn = self._turn, trio.Event()
        self._start(self._serve, question_id, answer, where, key, params, before, self._turn)

    async def _serve(
        self,
        question_id: int,
        answer: _Answer,
        where: Any,
        key: tuple[int, int],
        params_of: Callable[[Any], StructReader],
        before: trio.Event | None,
        mine: trio.Event,
    ) -> None:
        """Runs one of the peer's calls and sends its Return. Handlers start in the order
        the calls came (E-order): each waits for the one before to have started."""
        forwarding: _Answer | None = None
        encoded: bytes | None = None
        try:
            with answer.scope:
                try:
                    if before is not None:
                        await before.wait()
                    if isinstance(where, tuple):  # pipelined: the capability once the results exist
                        base, transform = where
                        mine.set()
                        base.forwarded.add()
                        forwarding = base
                        await base.done.wait()
                        if base.error is not None:
                            raise base.error
                        assert base.lookup is not None
                        where = base.lookup(transform)
                        if not isinstance(where, Client):
                            raise Failed(
                                f"the pipelined capability (pointer fields {list(transform)}) is null"
                            )
                    if isinstance(where.server, _Promised):
                        mine.set()
                        where = await where.server.resolved()
                    method = where.interface.by_key.get(key) if where.server is not None else None
                    if where.server is not None and method is None:
                        raise Unimplemented(
                            f"{where.interface.name} has no method {key[1]} of interface {key[0]:#x}"
                        )
                    if method is None:
                        method = _method_of(where, key)
                    try:
                        params = as_kwargs(params_of(method.params), method.params_layout)
                    except (capnp.KjException, ValueError) as error:
                        raise malformed(error) from error
                    mine.set()
                    if where.server is not None:
                        if forwarding is not None:
                            forwarding.forwarded.done()
                            forwarding = None
                        results = await where.server._dispatch(method, params)
                    else:  # (the caller's own capability, or another vat's: the call is made there)
                        call = where.vat.send_call(where, method, params)
                        if forwarding is not None:  # (sent on before a Disembargo echo goes)
                            promise = await call
                            forwarding.forwarded.done()
                            forwarding = None
                            results = (await promise).to_dict()
                        else:
                            results = (await (await call)).to_dict()
                    encoded = self._results(question_id, answer, method, results)
                except RpcError as error:
                    encoded = self._failed(question_id, answer, error)
                except Exception as error:  # noqa: BLE001 - the caller gets it as Failed
                    failed = handler_failed(getattr(where, "server", None), None, error)
                    encoded = self._failed(question_id, answer, failed)
                finally:
                    mine.set()
            await self._send_return(question_id, answer, encoded)
        except (RpcError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if forwarding is not None:
                forwarding.forwarded.done()
            self._calls.release()

    def _results(
        self, question_id: int, answer: _Answer, method: Method, results: Mapping[str, Any]
    ) -> bytes:
        """The framed Return of a call's results (flat when they are: twopartyflat.py), the
        answer made ready for calls pipelined on them."""
        no_finish_needed = answer.no_pipelining
        flat = twopartyflat.encode_results(question_id, method, results, no_finish_needed=no_finish_needed)
        if flat is not None:
            answer.lookup = _no_capabilities
            if answer.no_pipelining and not answer.finished:
                answer.finished = True  # (forgotten once sent: no Finish comes)
                self._finish_ignored(question_id)
            return flat
        described: list[Descriptor] = []
        try:
            segments, answer.results, values = encode_results(
                question_id, method, results, lambda value: self._described(value, described)
            )
        except BaseException:
            self._released(described)  # (the results are not sent: an exception is)
            raise
        answer.lookup = self._lookup(segments, method, values)
        return frame(segments)

    @staticmethod
    def _failed(question_id: int, answer: _Answer, error: RpcError) -> bytes:
        """The framed Return of a call that failed with ``error``."""
        answer.error = error
        return frame(encode_exception(question_id, error))

    async def _send_return(self, question_id: int, answer: _Answer, encoded: bytes | None) -> None:
        """Sends an answer's Return (canceled, if its caller's Finish cancelled the handler)."""
        if answer.scope.cancelled_caught or encoded is None:
            answer.error = Failed("canceled by its caller")
            encoded = frame(encode_canceled(question_id))
        encoded = self._settle_answer(question_id, answer, encoded)
        if self.closed is None:
            await self._send_bytes(encoded)

    def _settle_answer(self, question_id: int, answer: _Answer, encoded: bytes) -> bytes:
        """Marks an answer returned (what waits on it goes on) and gives the Return to send."""
        answer.returned = True
        answer.done.set()
        if answer.kept_here and answer.error is None:
            encoded = frame(encode_results_elsewhere(question_id))
        if answer.finished:  # (before the send: the caller may ask with its id again at once)
            self.answers.pop(question_id, None)
        return encoded

    def _serve_inline(
        self,
        question_id: int,
        answer: _Answer,
        where: Any,
        key: tuple[int, int],
        params_of: Callable[[Any], StructReader],
    ) -> bool:
        """Runs a call to a plain-function handler (server.py) right here in the receive
        loop and writes its Return at once if the socket takes it: no task, no scheduler
        round. Only for an object of this side called directly, when no earlier call waits
        to start (E-order); returns whether the call was taken (its call slot, taken by the
        caller, is given back when its Return is made)."""
        if not isinstance(where, Client) or where.server is None or self._turn is not None:
            return False
        server = where.server
        method = where.interface.by_key.get(key)
        handler = None if method is None else server._inline_handler(method)
        if method is None or handler is None:
            return False
        try:
            try:
                params = as_kwargs(params_of(method.params), method.params_layout)
            except (capnp.KjException, ValueError) as error:
                raise malformed(error) from error
            result = handler(**server._arguments(method, params))
            if result is not None and inspect.isawaitable(result):  # (a def handing one back)
                self._start(self._serve_awaitable, question_id, answer, server, method, result)
                return True
            encoded = self._results(question_id, answer, method, server._results(method, result))
        except RpcError as error:
            encoded = self._failed(question_id, answer, error)
        except Exception as error:  # noqa: BLE001 - the caller gets it as Failed
            encoded = self._failed(question_id, answer, handler_failed(server, method, error))
        self._calls.release()
        encoded = self._settle_answer(question_id, answer, encoded)
        if self.closed is None and not self._send_now(encoded):
            self._start(self._send_quietly, encoded)
        return True

    async def _serve_awaitable(
        self, question_id: int, answer: _Answer, server: Server, method: Method, pending: Any
    ) -> None:
        """The rest of an inline call whose plain-function handler handed back an awaitable."""
        encoded: bytes | None = None
        try:
            with answer.scope:
                try:
                    result = await pending
                    encoded = self._results(question_id, answer, method, server._results(method, result))
                except RpcError as error:
                    encoded = self._failed(question_id, answer, error)
                except Exception as error:  # noqa: BLE001 - the caller gets it as Failed
                    encoded = self._failed(question_id, answer, handler_failed(server, method, error))
            await self._send_return(question_id, answer, encoded)
        except (RpcError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._calls.release()

    async def _send_quietly(self, encoded: bytes) -> None:
        try:
            await self._send_bytes(encoded)
        except (RpcError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _lookup(
        self, segments: list[Segment], method: Method, values: list[object]
    ) -> Callable[[tuple[int, ...]], object]:
        clients = [self._as_client(v) for v in values]

        def lookup(transform: tuple[int, ...]) -> object:
            reader = decode(segments, self._words()).__getattr__("return").results.content
            results = content(segments, reader, RETURN_CONTENT, method.results, clients, self._typed)
            return results.capability_at(transform)

        return lookup

    def _on_return(self, segments: list[Segment], returned: Any) -> None:
        """A Return, as pycapnp reads it or (``twopartyflat.HotReturn``) as read plain."""
        hot = returned if isinstance(returned, twopartyflat.HotReturn) else None
        question_id = hot.answer_id if hot is not None else int(returned.answerId)
        question = self.questions.get(question_id)
        if question is None or question.returned:
            raise ProtocolError(f"a Return for question {question_id}, which is not awaiting one")
        question.returned = True
        if hot.release_param_caps if hot is not None else returned.releaseParamCaps:
            self._released(question.params)
        if hot is not None:
            assert question.method is not None  # (a Bootstrap's Return is read by pycapnp)
            schema = question.method.results

            def general() -> StructReader:
                payload = decode(segments, self._words()).__getattr__("return").results
                return content(segments, payload.content, RETURN_CONTENT, schema, [], self._typed)

            answer = Returned(question_id, results=hot.results.read(schema, general))
        else:
            answer = self._returned(segments, question_id, question, returned)
        question.done[1].append(answer)
        question.done[0].set()
        no_finish_needed = hot.no_finish_needed if hot is not None else returned.noFinishNeeded
        if no_finish_needed and not question.finished:
            question.finished = question.finish_sent = True  # (the callee forgot it already)
        if question.finish_sent:
            self._free_question(question_id)
        else:
            self._finish(question_id, question)

    def _returned(
        self, segments: list[Segment], question_id: int, question: _Question, returned: Any
    ) -> Returned:
        kind = returned.which()
        if kind == "results":
            _, caps = self._received(returned.results)
            if question.method is None:  # a Bootstrap's: the content is the capability
                from . import capwire

                index = capwire.read_cap(segments, RETURN_CONTENT)
                value: Any = caps[index] if index is not None and index < len(caps) else None
                return Returned(question_id, results=value)
            reader = returned.results.content
            view = content(segments, reader, RETURN_CONTENT, question.method.results, caps, self._typed)
            return Returned(question_id, results=view)
        if kind == "exception":
            return Returned(question_id, error=read_exception(returned.exception))
        if kind == "canceled":
            return Returned(question_id, error=Failed("the call was canceled"))
        return Returned(question_id, error=Unimplemented(f"a Return of kind {kind}"))

    def _finish_ignored(self, question_id: int) -> None:
        """Notes an answer returned with noFinishNeeded: a Finish the caller may still send
        for it is ignored (rpc.capnp), until the id is asked again. Bounded as the answers
        are (past that, such a late Finish aborts as any unknown one does)."""
        if len(self._no_finish_needed) >= MAX_ANSWERS:
            self._no_finish_needed.pop()
        self._no_finish_needed.add(question_id)

    def _on_finish(self, question_id: int, release_result_caps: bool) -> None:
        answer = self.answers.get(question_id)
        if question_id in self._no_finish_needed and (answer is None or answer.finished):
            self._no_finish_needed.discard(question_id)
            return
        if answer is None or answer.finished:
            raise ProtocolError(f"a Finish for question {question_id}, which is not one")
        answer.finished = True
        if release_result_caps:
            self._released(answer.results)
            answer.results = []
        if answer.returned:
            del self.answers[question_id]
        else:
            answer.scope.cancel()

    def _on_resolve(self, resolve: Any) -> None:
        """This side holds on to the promise it was sent and keeps calling through it (the
        peer forwards); a capability it is resolved to is released at once."""
        if resolve.which() == "cap":
            descriptor = read_descriptor(resolve.cap)
            if descriptor.kind in ("senderHosted", "senderPromise"):
                self._post(frame(encode_release(descriptor.id, 1)))

    async def _on_disembargo(self, message: Any) -> None:
        context = message.disembargo.context
        if context.which() != "senderLoopback":
            raise ProtocolError(f"a Disembargo of kind {context.which()} (this side sends no senderLoopback)")
        target = message.disembargo.target
        if target.which() == "promisedAnswer":
            answer = self.answers.get(int(target.promisedAnswer.questionId))
            if answer is None:
                raise ProtocolError(
                    f"a Disembargo for answer {target.promisedAnswer.questionId}, which is not one"
                )
            transform = read_transform(target.promisedAnswer)
        else:
            export = self.exports.get(int(target.importedCap))
            if export is None or not isinstance(export.server, _Promised):
                raise ProtocolError(
                    f"a Disembargo for export {target.importedCap}, which is no promise of this side"
                )
            answer, transform = export.server._answer, export.server._transform
        # Echoed once the promise has resolved and the calls pipelined on it (waiting for it
        # here) have gone on to the sender: then, in this connection's order, the echo.
        self._start(self._echo_disembargo, answer, transform, int(context.senderLoopback))

    async def _echo_disembargo(self, answer: _Answer, transform: tuple[int, ...], embargo_id: int) -> None:
        await answer.done.wait()
        await answer.forwarded.wait_drained()
        resolved = answer.lookup(transform) if answer.lookup is not None else None
        if not isinstance(resolved, Client) or resolved.vat is not self or resolved.server is not None:
            await self._abort("a Disembargo for a promise that does not resolve back to its sender")
            return
        try:
            await self._send(
                encode_disembargo_loopback(Descriptor("receiverHosted", resolved.handle), embargo_id)
            )
        except (RpcError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _on_unimplemented(self, echoed: Any) -> None:
        if echoed.which() == "call":
            question = self.questions.get(int(echoed.call.questionId))
            if question is not None and not question.returned:
                question.returned = True
                question.done[1].append(Returned(0, error=Unimplemented("the peer does not take this call")))
                question.done[0].set()
                self._free_question(int(echoed.call.questionId))
        else:
            log.warning("the peer does not implement a %s message", echoed.which())

    async def _run(self) -> None:
        self._start(self._send_pending)
        await self._receive_loop()


def _no_capabilities(transform: tuple[int, ...]) -> object:
    """What a pipelined call finds in flat results (twopartyflat.py): no capability."""
    return None


def _answered(client: Client) -> object:
    """The capability a pipelined client names, its question having returned."""
    assert client.pipeline is not None
    promise, transform = client.pipeline
    done = promise._done
    returned = done[1][0] if done is not None and done[1] else None
    if returned is None or returned.results is None:
        raise Failed(f"{client!r}: its call failed, so it names no capability")
    target = returned.results.capability_at(transform)
    if target is None:
        raise Failed(f"the pipelined capability (pointer fields {list(transform)}) is null")
    return target


def _method_of(client: Client, key: tuple[int, int]) -> Method:
    """The method a call names, for a call this side passes on: from the capability's
    interface, or (a capability of no known interface, a ``Capability`` param) any interface
    with that id this process knows."""
    from .interface import known_interface

    method = client.interface.by_key.get(key)
    if method is None:
        interface = known_interface(key[0])
        method = None if interface is None else interface.by_key.get(key)
    if method is None:
        raise Unimplemented(f"method {key[1]} of interface {key[0]:#x} is not known here")
    return method


@asynccontextmanager
async def open_stream_vat(
    stream: trio.abc.Stream,
    bootstrap: Server | Client | None = None,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_calls: int = MAX_CALLS,
    send_timeout: float = SEND_TIMEOUT,
) -> AsyncIterator[StreamVat]:
    """Runs rpc.capnp over ``stream`` for the duration of the block (serving ``bootstrap``
    to the peer, if given: a server object, or a client of another vat, which the peer then
    reaches through this one); closes the stream at the end."""
    async with trio.open_nursery() as nursery:
        vat = StreamVat(
            stream,
            nursery,
            bootstrap,
            max_message_bytes=max_message_bytes,
            max_calls=max_calls,
            send_timeout=send_timeout,
        )
        vat._start(vat._run)
        try:
            yield vat
        finally:
            vat._close(Disconnected("the connection was closed"))
            if vat._raw is not None:
                vat._raw.close()
            with trio.CancelScope(shield=True):
                await stream.aclose()


async def serve_stream(stream: trio.abc.Stream, bootstrap: Server | Client, **options: Any) -> None:
    """Serves ``bootstrap`` on one connection until the peer goes."""
    async with open_stream_vat(stream, bootstrap, **options) as vat:
        await vat.wait_closed()
