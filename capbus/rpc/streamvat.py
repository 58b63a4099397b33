"""One ``rpc.capnp`` connection over a byte stream (TCP, TLS, a unix stream), run with trio.

The other side is any Cap'n Proto implementation (C++, Rust, Go, pycapnp) or another capbus
program. The same clients, generated stubs and ``Foo.Server`` classes as on the bus work
here: a :class:`StreamVat` offers what they use of a vat (``call``, ``send_call``, ...).

This is the IO driver: the tables and every decision about them are the sans-IO
:class:`~capbus.rpc.streamengine.StreamEngine`'s; here are the byte stream, the tasks and
the waits. Each received message goes to the engine, and what it says happens: a call is
served (a plain-function handler right in the receive loop when no earlier call waits to
start, else in a task of its own; handlers start in the order the calls came), a Return
wakes its caller, a Finish cancels its handler, a Disembargo is echoed once its promise
has resolved. A pipelined call whose capability turns out to be the caller's own is made
back on the caller (its results relayed).

Bounds: a message over ``max_message_bytes`` or of too many segments aborts the
connection (before it is buffered); at most ``max_calls`` of the peer's calls run at once
(past that each is answered Overloaded at once: this side keeps reading); writes are
flow-controlled (see "sending": OUTBOX_HIGH, OUTBOX_READING_LIMIT, MAX_POSTED); a peer that
does not read what this side writes for ``send_timeout`` seconds is disconnected.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import capnp
import trio

from .capwire import Segment
from .client import Client, Promise
from .engine import Returned
from .errors import Disconnected, Failed, Overloaded, RpcError, Unimplemented
from .interface import Method
from .protocol import as_kwargs, malformed
from .server import Server, handler_failed
from .streamengine import (
    Aborted,
    Answer,
    CallArrived,
    DisembargoAsked,
    Event,
    FinishArrived,
    PromisedServer,
    ProtocolError,
    Question,
    ReturnArrived,
    Send,
    StreamEngine,
)
from .structs import StructReader
from .twoparty import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Descriptor,
    FrameError,
    FrameReader,
    encode_abort,
    encode_bootstrap,
    encode_canceled,
    encode_disembargo_loopback,
    encode_exception,
    frame,
)

log = logging.getLogger("capbus.rpc.streamvat")

MAX_CALLS = 256
OUTBOX_HIGH = 1 << 19
"""Bytes queued to write past which a sender waits until the peer has read some."""
OUTBOX_READING_LIMIT = 64 << 20
"""Bytes queued or being written past which the receive loop reads no more (the peer's
writes wait too): what a peer that reads nothing can make this side hold. Far above what
two vats calling each other hard have under way (each keeps reading: no deadlock)."""
MAX_POSTED = 4096
"""Messages posted (Finish, Release) and not yet written past which the peer is taken to
read nothing and is disconnected."""
CORKED_BYTES = 1 << 16
"""Bytes queued while corked past which they are written anyway."""
SEND_TIMEOUT = 60.0
_RECEIVE_BYTES = 1 << 16


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


class _Serving:
    """What this driver keeps of one of the peer's questions (Answer.driver). Made as it is
    needed: most calls are served at once, and nothing ever waits on or cancels them."""

    __slots__ = ("_scope", "_done", "_returned", "_forwarded")

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None
        self._done: trio.Event | None = None
        self._returned = False
        self._forwarded: _Count | None = None

    @property
    def scope(self) -> trio.CancelScope:
        """The handler's cancel scope (a Finish, or the connection's end, cancels it)."""
        if self._scope is None:
            self._scope = trio.CancelScope()
        return self._scope

    def cancel(self) -> None:
        self.scope.cancel()

    def returned(self) -> None:
        """The answer has returned: what waits on it goes on."""
        self._returned = True
        if self._done is not None:
            self._done.set()

    async def wait_returned(self) -> None:
        """Waits until the answer has returned (pipelined calls and Disembargoes wait)."""
        if self._returned:
            await trio.lowlevel.checkpoint()
            return
        if self._done is None:
            self._done = trio.Event()
        await self._done.wait()

    @property
    def forwarded(self) -> _Count:
        """Calls pipelined on it still on their way to where they go (a Disembargo waits)."""
        if self._forwarded is None:
            self._forwarded = _Count()
        return self._forwarded


def _serving(answer: Answer) -> _Serving:
    serving: _Serving = answer.driver
    return serving


class _Promised(PromisedServer):
    """Calls to a capability in an answer of this side not yet returned wait for it, then
    go to the capability there."""

    async def resolved(self) -> Client:
        answer = self.answer
        await _serving(answer).wait_returned()
        if answer.error is not None:
            raise answer.error
        assert answer.lookup is not None
        target = answer.lookup(self.transform)
        if not isinstance(target, Client):
            raise Failed(f"the promised capability (pointer fields {list(self.transform)}) is null")
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
        self._stream, self._nursery = stream, nursery
        self.engine = StreamEngine(
            self,
            bootstrap,
            max_message_bytes=max_message_bytes,
            post=self._post,
            promised=lambda answer, transform: _Promised(self.engine.generic, answer, transform),
            answer_state=_Serving,
        )
        self.max_message_bytes, self.send_timeout = max_message_bytes, send_timeout
        self._reading_limit = max(OUTBOX_READING_LIMIT, 2 * max_message_bytes)
        self._reader = FrameReader(max_message_bytes)
        self._outbox: list[bytes] = []
        """What is queued to write, in order (see "sending")."""
        self._posted: list[bytes] = []
        """What was posted since the last write began (see "sending")."""
        self._posts_queued = 0  # (posted messages not yet taken by a write)
        self._queued = 0
        self._in_flight = 0  # (bytes the writer is writing)
        self._writing = False
        self._corked = 0
        self._writer_wake = trio.Event()
        self._room = trio.Event()
        self._written = trio.Event()
        """Set when the writer finds nothing queued (:meth:`_wait_written`)."""
        self._raw: socket.socket | None = None
        """For a plain socket stream: the socket, to write without a task (_write)."""
        if isinstance(stream, trio.SocketStream):
            self._raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
        self._calls = trio.Semaphore(max_calls)
        self.max_calls = max_calls
        self._turn: trio.Event | None = None
        """Set once the last call served in a task has started (E-order: the next waits)."""
        self._started_task = False
        """A call was handed to a task since the receive loop's last checkpoint."""
        self.closed: RpcError | None = None
        self._closed_event = trio.Event()
        self._scopes: set[trio.CancelScope] = set()
        """Those of this vat's own tasks: cancelled when the connection ends (never the
        code that uses the vat, which gets Disconnected from its calls instead)."""

    # (the engine's tables, as tests and tools read them)
    questions = property(lambda self: self.engine.questions)
    answers = property(lambda self: self.engine.answers)
    exports = property(lambda self: self.engine.exports)
    imports = property(lambda self: self.engine.imports)

    # -- what clients and promises use -------------------------------------------------------

    def local(self, server: Server) -> Client:
        return self.engine.local(server)

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
        try:
            await self._send_call(framed)
        except BaseException:
            if not question.returned:  # (sent, or about to be: the callee lets it go)
                self.engine.finish(question_id, question)
            raise
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
        if self.closed is not None:
            self.engine.free_question(question_id)
            raise self.closed
        promise = Promise(self, client, method, question_id, question.done)
        # Queued now, without a wait: from here on the promise is what lets the call go (its
        # Finish goes when it is collected, even if this caller is cancelled right here).
        await self._send_bytes(framed)
        return promise

    async def _question_for(
        self, client: Client, method: Method, params: Mapping[str, Any], *, no_pipelining: bool = False
    ) -> Client | tuple[int, Question, bytes]:
        """A new question calling ``method`` on ``client``, and its Call (framed); or, for a
        client pipelined on a question that has returned, the capability it names."""
        target = self.engine.target(client)
        if target is None:
            assert client.pipeline is not None
            return await self._resolved(*client.pipeline)
        if self.closed is not None:
            raise self.closed
        done: tuple[trio.Event, list[Returned]] = (trio.Event(), [])
        return self.engine.call(client, target, method, params, done, no_pipelining=no_pipelining)

    async def call_oneway(self, client: Client, method: Method, params: Mapping[str, Any]) -> None:
        """rpc.capnp has no one-way call: a call whose results are not awaited (its Finish
        goes when they come)."""
        promise = await self.send_call(client, method, params)
        self._start(self._settle, promise)

    async def stream(self, client: Client, method: Method, params: Mapping[str, Any]) -> None:
        await self.call(client, method, params)

    async def drop(self, client: Client) -> None:
        release = self.engine.drop(client)
        if release is not None and self.closed is None:
            await self._send_bytes(release)

    def _promise_gone(self, target: Client, question_id: int, done: Any = None) -> None:
        question = self.engine.questions.get(question_id)
        if question is not None and question.done is done:  # (not a later question's id)
            self.engine.finish(question_id, question)

    @staticmethod
    async def _settle(promise: Promise) -> None:
        try:
            await promise
        except RpcError:
            pass

    # -- questions -------------------------------------------------------------------------------

    def _question(self, method: Method | None) -> tuple[int, Question]:
        if self.closed is not None:
            raise self.closed
        done: tuple[trio.Event, list[Returned]] = (trio.Event(), [])
        return self.engine.question(method, done)

    async def _await(self, question_id: int, question: Question) -> Returned:
        try:
            await question.done[0].wait()
        except BaseException:
            if not question.returned:
                self.engine.finish(question_id, question)  # (the callee cancels the call)
            raise
        returned: Returned = question.done[1][0]
        if returned.error is not None:
            raise returned.error
        return returned

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
        return self.engine.read_back(method, results)

    # -- sending ---------------------------------------------------------------------------------
    #
    # Every message goes into one queue, in order, and out of it in order: written at once
    # when nothing is queued before it and the socket takes it (a plain socket, without a
    # task), else by the writer task. While the receive loop handles what one read brought,
    # or a Call gathers others (_send_call), nothing is written: it all goes out in one
    # write at the end. Messages posted from where nothing can wait (finalizers: a Finish
    # for a collected promise, a Release) wait apart until the next write begins: a
    # finalizer may run in the middle of one, and must not land inside it.
    #
    # Flow control: a sender waits while more than OUTBOX_HIGH bytes are queued (the peer
    # reads too little); the receive loop never does below OUTBOX_READING_LIMIT, so two
    # vats calling each other hard never both stop reading (each would wait for the other).

    def _post(self, framed: bytes, sent: Callable[[], None] | None = None) -> None:
        """Sends from where no await is possible (a finalizer, the engine); ``sent`` is
        called once it is queued: before anything queued after this returns. A peer that
        reads nothing while MAX_POSTED of these pile up is disconnected."""
        if self.closed is not None:
            return
        self._posted.append(framed)
        if sent is not None:
            sent()
        if len(self._posted) + self._posts_queued > MAX_POSTED:
            self._close(Disconnected(f"the peer read nothing of {MAX_POSTED} messages due to it"))
            return
        self._wake_writer()

    def _take_posted(self) -> None:
        """Moves what was posted into the queue (before a write: after all queued so far)."""
        if self._posted:
            posted, self._posted = self._posted, []
            self._outbox.extend(posted)
            self._queued += sum(len(p) for p in posted)
            self._posts_queued += len(posted)

    def _write(self, data: bytes) -> None:
        """Queues ``data`` and writes what it can at once (see above); nothing on a closed
        connection (``closed`` says why)."""
        if self.closed is not None:
            return
        self._take_posted()
        if self._corked or self._outbox or self._writing or self._raw is None:
            self._outbox.append(data)
            self._queued += len(data)
            if not self._corked or self._queued > CORKED_BYTES:
                self._wake_writer()
            return
        try:
            sent = self._raw.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._close(Disconnected(f"the connection broke: {error}"))
            return
        if sent < len(data):
            rest = memoryview(data)[sent:].tobytes()  # (a finalizer run here posts apart)
            self._outbox.insert(0, rest)  # (first: ahead of anything queued meanwhile)
            self._queued += len(rest)
            self._wake_writer()

    def _uncork(self) -> None:
        """Ends a stretch of queueing without writing: what was queued goes now."""
        self._corked -= 1
        self._take_posted()
        if self._corked or not self._outbox or self._writing or self.closed is not None:
            if self._outbox and not self._corked:
                self._wake_writer()
            return
        pending, self._outbox = self._outbox, []
        self._queued = self._posts_queued = 0
        self._write(b"".join(pending))

    def _wake_writer(self) -> None:
        self._writer_wake.set()

    async def _writer(self) -> None:
        """Writes what is queued and could not be written at once."""
        while True:
            self._take_posted()
            while not self._outbox or (self._corked and self._queued <= CORKED_BYTES):
                self._room.set()
                if not self._outbox:
                    self._written.set()
                await self._writer_wake.wait()
                self._writer_wake = trio.Event()
                self._take_posted()
            pending, self._outbox = self._outbox, []
            self._in_flight = sum(len(p) for p in pending)
            self._queued -= self._in_flight
            self._posts_queued = 0
            self._writing = True
            try:
                with trio.move_on_after(self.send_timeout) as waited:
                    await self._stream.send_all(b"".join(pending))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                self._close(Disconnected(f"the connection broke: {error}"))
                return
            finally:
                self._writing = False
                self._in_flight = 0
            if waited.cancelled_caught:
                self._close(Disconnected(f"the peer read nothing for {self.send_timeout:g} s"))
                return
            if self._queued < OUTBOX_HIGH:
                self._room.set()

    async def _send(self, segments: Sequence[Segment]) -> None:
        await self._send_bytes(frame(segments))

    async def _send_bytes(self, data: bytes, *, checkpoint: bool = True) -> None:
        """Writes one or more framed messages: queued in order, and waits while more than
        OUTBOX_HIGH bytes are (``checkpoint``: False where the caller's next step waits
        anyway, for its Return)."""
        if self.closed is not None:
            raise self.closed
        self._write(data)
        if self._queued > OUTBOX_HIGH:
            await self._wait_for_room()
        elif checkpoint:
            await trio.lowlevel.checkpoint()
        if self.closed is not None:
            raise self.closed

    async def _wait_written(self) -> None:
        """Waits until everything queued has been written."""
        while (self._outbox or self._writing) and self.closed is None:
            if self._written.is_set():
                self._written = trio.Event()
            self._wake_writer()
            await self._written.wait()

    async def _wait_for_room(self) -> None:
        """Waits until fewer than OUTBOX_HIGH bytes are queued (or the connection ended)."""
        if self._room.is_set():
            self._room = trio.Event()
        await self._room.wait()

    async def _send_call(self, framed: bytes) -> None:
        """Writes a Call whose caller then waits for its Return. With other calls under way
        (tasks each making one), the first such Call gathers the rest: it lets every task
        that is ready run, then all they sent meanwhile goes in one write (one system call
        instead of one a task)."""
        if self._corked or self._raw is None or len(self.engine.questions) <= 1:
            await self._send_bytes(framed, checkpoint=False)
            return
        self._write(framed)  # (queued: a write may be under way)
        self._corked += 1
        try:
            with trio.CancelScope(shield=True):  # (what is gathered is others' too)
                await trio.lowlevel.checkpoint()
        finally:
            self._uncork()

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
                # What one read brought is handled in one pass, its answers written in one
                # write; then other tasks and connections run.
                self._corked += 1
                try:
                    for segments in self._reader.feed(data):
                        for event in self.engine.receive(segments):
                            self._handle(event)
                        if self._started_task:  # (let it start, and earlier ones finish:
                            self._started_task = False  # a burst of calls for tasks is
                            await trio.lowlevel.checkpoint()  # not refused past max_calls)
                finally:
                    self._uncork()
                if self._queued + self._in_flight > self._reading_limit:  # (it reads nothing)
                    await self._wait_for_room()
                else:
                    await trio.lowlevel.checkpoint()
        except (FrameError, ProtocolError) as error:
            await self._abort(str(error))
        except (capnp.KjException, ValueError) as error:
            await self._abort(str(malformed(error)))

    def _handle(self, event: Event) -> None:
        """Does what one of the engine's events says (never waits: see "sending")."""
        if isinstance(event, CallArrived):
            self._take_call(event)
        elif isinstance(event, ReturnArrived):
            done = event.question.done
            done[1].append(event.returned)
            done[0].set()
        elif isinstance(event, Send):  # (queued, never waited for here: see "sending")
            self._write(event.framed)
            if event.answered is not None:
                _serving(event.answered).returned()
        elif isinstance(event, FinishArrived):
            _serving(event.answer).cancel()
        elif isinstance(event, DisembargoAsked):
            # Echoed once the promise has resolved and the calls pipelined on it (waiting
            # for it here) have gone on to the sender: then, in this connection's order.
            self._start(self._echo_disembargo, event.answer, event.transform, event.embargo_id)
        elif isinstance(event, Aborted):
            self._close(Disconnected(f"the peer aborted: {event.reason}"))

    async def _abort(self, reason: str) -> None:
        log.warning("aborting a connection: %s", reason)
        with trio.move_on_after(1):  # (the Abort, and what was queued before it, written)
            try:
                await self._send(encode_abort(reason))
                await self._wait_written()
            except (RpcError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        self._close(Disconnected(f"aborted: {reason}"))

    def _close(self, error: RpcError) -> None:
        if self.closed is not None:
            return
        self.closed = error
        self.engine.closed = True
        # Handlers of the peer's calls first: cancelled where they wait (on a call back to
        # the peer, say), before those calls fail with ``error`` for anyone else waiting.
        for answer in self.engine.answers.values():
            _serving(answer).cancel()
        for scope in list(self._scopes):
            scope.cancel()
        for question in self.engine.fail_questions(error):
            question.done[1].append(Returned(0, error=error))
            question.done[0].set()
        self._room.set()  # (senders waiting for the peer to read: it never will)
        self._written.set()
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

    # -- serving the peer's calls ----------------------------------------------------------------

    def _take_call(self, arrived: CallArrived) -> None:
        """Starts serving one of the peer's calls, or refuses it at once past ``max_calls``."""
        question_id, answer = arrived.question_id, arrived.answer
        try:
            self._calls.acquire_nowait()
        except trio.WouldBlock:
            # (refused at once, never waited for: this side keeps reading, so it sees the
            # peer go; the peer that never reads these is stopped by the send timeout)
            answer.error = Overloaded(f"more than {self.max_calls} calls of this connection at once")
            answer.returned = True
            _serving(answer).returned()
            self._write(frame(encode_exception(question_id, answer.error)))
            return
        if self._turn is not None and self._turn.is_set():
            self._turn = None  # (every call before has started)
        if self._serve_inline(arrived):
            return
        before, self._turn = self._turn, trio.Event()
        self._start(self._serve, arrived, before, self._turn)
        self._started_task = True

    async def _serve(self, arrived: CallArrived, before: trio.Event | None, mine: trio.Event) -> None:
        """Runs one of the peer's calls and sends its Return. Handlers start in the order
        the calls came (E-order): each waits for the one before to have started."""
        question_id, answer, key = arrived.question_id, arrived.answer, arrived.key
        where: Any = arrived.where
        forwarding: _Count | None = None
        encoded: bytes | None = None
        try:
            with _serving(answer).scope:
                try:
                    if before is not None:
                        await before.wait()
                    if isinstance(where, tuple):  # pipelined: the capability once the results exist
                        base, transform = where
                        mine.set()
                        forwarding = _serving(base).forwarded
                        forwarding.add()
                        await _serving(base).wait_returned()
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
                        params = as_kwargs(arrived.params(method.params), method.params_layout)
                    except (capnp.KjException, ValueError) as error:
                        raise malformed(error) from error
                    mine.set()
                    if where.server is not None:
                        if forwarding is not None:
                            forwarding.done()
                            forwarding = None
                        results = await where.server._dispatch(method, params)
                    else:  # (the caller's own capability, or another vat's: the call is made there)
                        call = where.vat.send_call(where, method, params)
                        if forwarding is not None:  # (sent on before a Disembargo echo goes)
                            promise = await call
                            forwarding.done()
                            forwarding = None
                            results = (await promise).to_dict()
                        else:
                            results = (await (await call)).to_dict()
                    encoded = self.engine.results(question_id, answer, method, results)
                except RpcError as error:
                    encoded = self.engine.failed(question_id, answer, error)
                except Exception as error:  # noqa: BLE001 - the caller gets it as Failed
                    failed = handler_failed(getattr(where, "server", None), None, error)
                    encoded = self.engine.failed(question_id, answer, failed)
                finally:
                    mine.set()
            encoded = self._return_of(question_id, answer, encoded)
        finally:
            if forwarding is not None:
                forwarding.done()
            self._calls.release()  # (the handler is done: its slot is free before the write)
        await self._send_quietly(encoded)

    def _return_of(self, question_id: int, answer: Answer, encoded: bytes | None) -> bytes:
        """The Return to send for an answer whose handler is done (canceled, if its
        caller's Finish cancelled it); what waits on the answer goes on."""
        if _serving(answer).scope.cancelled_caught or encoded is None:
            answer.error = Failed("canceled by its caller")
            encoded = frame(encode_canceled(question_id))
        encoded = self.engine.settle(question_id, answer, encoded)
        _serving(answer).returned()
        return encoded

    async def _send_quietly(self, encoded: bytes) -> None:
        """Writes a Return (nothing if the connection is gone: its caller is too)."""
        if self.closed is None:
            try:
                await self._send_bytes(encoded)
            except (RpcError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _serve_inline(self, arrived: CallArrived) -> bool:
        """Runs a call to a plain-function handler (server.py) right here in the receive
        loop and writes its Return at once if the socket takes it: no task, no scheduler
        round. Only for an object of this side called directly, when no earlier call waits
        to start (E-order); returns whether the call was taken (its call slot, taken by the
        caller, is given back when its Return is made)."""
        question_id, answer, where, key = arrived.question_id, arrived.answer, arrived.where, arrived.key
        if not isinstance(where, Client) or where.server is None or self._turn is not None:
            return False
        server = where.server
        method = where.interface.by_key.get(key)
        handler = None if method is None else server._inline_handler(method)
        if method is None or handler is None:
            return False
        try:
            try:
                params = as_kwargs(arrived.params(method.params), method.params_layout)
            except (capnp.KjException, ValueError) as error:
                raise malformed(error) from error
            result = handler(**server._arguments(method, params))
            if result is not None and inspect.isawaitable(result):  # (a def handing one back)
                self._start(self._serve_awaitable, question_id, answer, server, method, result)
                return True
            encoded = self.engine.results(question_id, answer, method, server._results(method, result))
        except RpcError as error:
            encoded = self.engine.failed(question_id, answer, error)
        except Exception as error:  # noqa: BLE001 - the caller gets it as Failed
            encoded = self.engine.failed(question_id, answer, handler_failed(server, method, error))
        self._calls.release()
        encoded = self.engine.settle(question_id, answer, encoded)
        _serving(answer).returned()
        if self.closed is None:
            self._write(encoded)
        return True

    async def _serve_awaitable(
        self, question_id: int, answer: Answer, server: Server, method: Method, pending: Any
    ) -> None:
        """The rest of an inline call whose plain-function handler handed back an awaitable."""
        encoded: bytes | None = None
        engine = self.engine
        try:
            with _serving(answer).scope:
                try:
                    result = await pending
                    encoded = engine.results(question_id, answer, method, server._results(method, result))
                except RpcError as error:
                    encoded = engine.failed(question_id, answer, error)
                except Exception as error:  # noqa: BLE001 - the caller gets it as Failed
                    encoded = engine.failed(question_id, answer, handler_failed(server, method, error))
            encoded = self._return_of(question_id, answer, encoded)
        finally:
            self._calls.release()
        await self._send_quietly(encoded)

    async def _echo_disembargo(self, answer: Answer, transform: tuple[int, ...], embargo_id: int) -> None:
        await _serving(answer).wait_returned()
        await _serving(answer).forwarded.wait_drained()
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

    async def _run(self) -> None:
        self._start(self._writer)
        await self._receive_loop()


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
