"""The vat: the RPC endpoint of one peer, running the sans-IO :mod:`engine` on trio.

The vat does the IO the engine asks for and keeps what only trio can: a task per call being
served (with its cancel scope, for Finish), an event per question a caller waits on, the
receive loop, and a task that releases handles in batches. What it does (docs/design.md
section 3):

- a :class:`Server` passed in a call gets one node, reused while held, and is dropped
  (its node destroyed) once no other peer holds it: distributed GC without leaks;
- a handle received becomes one :class:`Client` per handle (identity holds), which owns
  the kernel references and releases them when closed or collected;
- a call waits for its return at the vat's reply node; a destroyed node or a dead callee
  fails pending and later calls as Disconnected; cancelling the caller sends Finish, which
  cancels the handler; a malformed, hostile or oversized call gets a precise exception.
"""

from __future__ import annotations

import collections
import contextvars
import inspect
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import trio

from .. import _wire
from .. import errors as bus
from ..peer import Handle, Message, MessageKind, Peer
from .callers import CallerCalls, QueueBounds, UserCalls
from .client import Client, DynamicClient, Promise
from .engine import (
    UID_SHARE,
    CallArrived,
    Caller,
    Engine,
    Event,
    FinishArrived,
    MayRetire,
    Returned,
    Send,
    uid_of,
)
from .errors import Disconnected, Failed, Overloaded, RpcError, Unimplemented, from_kernel
from .fds import duplicates
from .flat import flat_codec
from .interface import Interface, Method
from .protocol import (
    REPLY,
    Body,
    Encoded,
    ReceivedCall,
    ReceivedReturn,
    as_kwargs,
    decode,
    encode_call,
    encode_exception,
    encode_finish,
    encode_results,
    malformed,
    params_of,
)
from .server import Forwarder, Forwarders, Server, handler_failed, log
from .structs import StructReader

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
ClientT = TypeVar("ClientT", bound=Client)


STREAM_WINDOW = 256 * 1024


@dataclass(eq=False)
class _Stream:
    """Flow control of ``-> stream`` calls on one capability: bytes sent but not yet
    acknowledged, and the first error (which fails the next call)."""

    in_flight: int = 0
    most_in_flight: int = 0
    error: RpcError | None = None
    changed: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


_Queued = tuple[CallArrived, trio.CancelScope]
"""A call taken in and its cancel scope."""


@dataclass(eq=False, slots=True)
class _Resend:
    """What a promise's pipelined call needs to be sent again if it is redirected (the
    promise it was pipelined on is ``promise.base``: not held here, so that dropping the
    link lets it go)."""

    promise: weakref.ref[Promise]
    transform: tuple[int, ...]
    method: Method
    params: Mapping[str, Any]
    fds: dict[int, int]
    """The fd numbers the params name -> copies of the files they named when first sent."""

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _copied_out(method: Method) -> bool:
    """Whether a call's params are read out as copies (a flat struct: numbers, text, data),
    holding nothing of the message once read."""
    codec = flat_codec(method.params)
    return codec is not None and codec.reader_class is not None


def _answered(question_id: int, error: RpcError) -> tuple[trio.Event, list[Returned]]:
    """A question's answer, here already: ``error``."""
    event = trio.Event()
    event.set()
    return event, [Returned(question_id, error=error)]


class _Redirected(Exception):
    """The callee redirected a pipelined call (rpc.capnp's Return.redirect)."""


@dataclass(eq=False)
class _Charge:
    """Whom the objects a return makes nodes for are counted against (max_exports_per_caller),
    and how many of them Vat._bounded reserved for it that have no node yet."""

    caller: Caller
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class VatStatistics:
    exports: int
    imports: int
    questions: int
    answers: int
    queued: int = 0
    """Calls received whose handler has not started yet (of all callers)."""
    spare_nodes: int = 0
    """Retired nodes kept for the next objects exported (SPARE_NODES), held by no one
    else: the kernel counts them (and their owner handles) among this peer's."""


class Vat:
    """See the module docstring. Make one with :func:`open_vat`."""

    def __init__(
        self,
        peer: Peer,
        nursery: trio.Nursery,
        engine: Engine,
        *,
        max_concurrent_calls: int,
        max_queued_calls: int = 4096,
        max_exports_per_caller: int = 4096,
        max_calls_per_caller: int = 256,
        max_queued_capabilities_per_caller: int = 256,
        max_queued_bytes_per_caller: int | None = None,
    ) -> None:
        uid_share = engine.uid_share
        self.peer = peer
        self.engine = engine
        self._concurrency = trio.Semaphore(max_concurrent_calls)
        """Handlers running at once, at most: further calls wait their turn (in order)."""
        self._max_calls_per_caller = max_calls_per_caller
        """Handlers of one caller running at once, at most (callers.py)."""
        self._callers: dict[Caller, CallerCalls] = {}
        self._users: dict[object, UserCalls] = {}  # uid -> its callers' calls
        self._max_calls_per_uid = min(
            max_calls_per_caller * uid_share, max(max_concurrent_calls // 2, max_calls_per_caller)
        )
        """Handlers of all callers of one uid running at once: at most half the vat's (unless
        one caller may take more), so that a uid with many connections leaves others some."""
        # Capabilities (handles of this peer) one caller's waiting calls may carry, and bytes
        # of their messages: held in memory, or mapped (a memfd payload) against this
        # process's address space (a sandbox's RLIMIT_AS).
        if max_queued_bytes_per_caller is None:
            max_queued_bytes_per_caller = 2 * engine.max_message_bytes
        self._queue_bounds = QueueBounds(
            max_queued_calls, max_queued_bytes_per_caller, max_queued_capabilities_per_caller, uid_share
        )
        self.max_send_bytes = engine.max_message_bytes
        """Messages larger than this are not sent (open_vat's max_send_bytes)."""
        self.max_exports_per_caller = max_exports_per_caller
        """Objects of this vat one caller (engine.Caller) may hold from its returns: past it,
        a return that would hand out another fails with Overloaded, so that a caller that
        keeps everything cannot use up this peer's nodes (the kernel's nodes_owned)."""
        # Calls of one caller received whose handler has not started (CallerCalls.queued):
        # past max_queued_calls, its new calls are answered Overloaded at once. The vat reads
        # every message as it comes (a return it waits for may be behind them), so without
        # this a peer that floods it with calls would make it hold them all.
        self.stream_window = STREAM_WINDOW
        """Bytes of ``-> stream`` calls one capability may have unacknowledged."""
        self._streams: dict[int, _Stream] = {}  # client handle -> its stream
        # (server, reply) -> stream calls waiting, with their cancel scopes
        self._stream_queues: dict[tuple[int, int], collections.deque[_Queued]] = {}
        engine.vat = self
        self._nursery = nursery
        self._waiting: dict[int, tuple[trio.Event, list[Returned]]] = {}
        self._resends: dict[int, _Resend] = {}  # question -> its promise's pipelined call
        self._resending: dict[int, trio.CancelScope] = {}  # question -> its _resend task
        self._serving: dict[tuple[int, int], trio.CancelScope] = {}
        self._open_work = 0
        """Calls served and returns being sent in tasks of their own: what a graceful
        shutdown waits for."""
        self._work_done: trio.Event | None = None
        self._drained = trio.Event()
        """Set once the peer, shut down, has received all that was queued for it."""
        self._shut_down = False  # (its block's end then disconnects its peer)
        self._running = True  # (False once its block ended: _stopped)
        self._release_wanted = trio.Event()
        self._caller_reading = False
        """A caller reads the peer's messages (see _await_return); the receive loop waits."""
        self._loop_receiving: trio.CancelScope | None = None
        self._loop_parked: trio.Event | None = None
        self._reader: tuple[trio.CancelScope, trio.Event] | None = None
        self._loop_context = contextvars.copy_context()  # (the receive loop's, once it runs)
        self._took_in = False  # a call was queued for a task (ends a batch: _deliver_ready)
        self._unstarted = 0  # calls queued for tasks of their own that have not run yet
        self._spare_nodes: list[int] = []
        """Retired nodes, for objects exported next (_export)."""
        self._forwarders = Forwarders()
        """The Forwarder exported for each client of another kind of vat (_forwarded)."""
        """The reading caller's scope and the event of the return it waits for."""

    def statistics(self) -> VatStatistics:
        e = self.engine
        queued = sum(calls.queued for calls in self._callers.values())
        return VatStatistics(
            len(e.exports),
            len(e.imports),
            len(e.questions),
            len(e.answers),
            queued,
            len(self._spare_nodes),
        )

    def start_soon(self, function: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Runs ``function(*args)`` in a task that lives as long as the vat at most (for work
        tied to the vat's capabilities, such as watching a spawned child)."""
        self._nursery.start_soon(function, *args)

    def _wake_releaser(self) -> None:
        try:
            self._release_wanted.set()
        except RuntimeError:  # a client collected after the vat's trio run ended
            pass

    # -- capabilities -------------------------------------------------------------------------

    async def export(self, server: Server, *, keep: bool = False) -> Handle:
        """The node of ``server`` (made on first use), e.g. to hand to another peer. The node
        and the object go when the last peer holding it lets go; with ``keep``, not while
        this vat runs (a service's bootstrap object, handed to programs that come and go)."""
        node = await self._export(server)
        if keep:
            self.engine.kept.add(node)
        return Handle(self.peer, node)

    async def _export(self, server: Server, charge: _Charge | None = None) -> int:
        """The node of ``server`` for the caller a return hands it to (``charge``), made if
        it has none: each caller holds a node of its own, so that the kernel's release
        notification tells which one let go, and charges (max_exports_per_caller) follow
        who holds an object, not who was first given it."""
        holder = None if charge is None else charge.caller
        node = self.engine.export_node(server, holder)
        if node is None:
            node = self._spare_nodes.pop() if self._spare_nodes else (await self.peer.create_node()).id
            made = self.engine.export_node(server, holder)
            if made is not None:  # by another task, while this one waited for the kernel
                self._spare_nodes.append(node)
                return made
            self.engine.exported(server, node, holder)
            if charge is not None:
                self.engine.charge(node, charge.caller, reserved=charge.reserved > 0)
                charge.reserved = max(charge.reserved - 1, 0)
        return node

    def client(self, handle: Handle | int, interface: Any) -> DynamicClient:
        """A client for a handle this peer holds (from a seed or a transfer); the client
        takes over one reference. ``interface``: ``Foo`` from :func:`capbus.load`, its
        ``Client`` class, or an :class:`Interface`."""
        handle_id = handle.id if isinstance(handle, Handle) else handle
        if handle_id in self.engine.exports:
            raise ValueError("that handle is one of this vat's own exports")
        return cast(DynamicClient, self.engine.import_(handle_id, 1, _interface(interface)))

    def typed_client(self, handle: Handle | int, cls: type[ClientT]) -> ClientT:
        """:meth:`client` for a generated client class, typed as that class."""
        client = self.client(handle, cls)
        assert isinstance(client, cls)
        return client

    def local(self, server: Server) -> DynamicClient:
        """A client for an object of this vat: calls run it with remote-call semantics, and
        passing it in a call passes the object's node. One per server (identity holds)."""
        return cast(DynamicClient, self.engine.local(server))

    async def drop(self, client: Client) -> None:
        """Releases a client's handle now."""
        self.engine.drop(client)
        await trio.lowlevel.checkpoint()

    async def _handles_for(
        self, caps: list[object], destination: int = 0, charge: _Charge | None = None
    ) -> list[int]:
        holder = None if charge is None else charge.caller
        caps = [self._forwarded(value) for value in caps]
        handles = self._handles_now(caps, destination, holder)
        if handles is None:
            made = []
            try:
                for value in caps:  # make the missing nodes, then look again
                    server = value.server if isinstance(value, Client) else value
                    if isinstance(server, Server):
                        new = self.engine.export_node(server, holder) is None
                        node = await self._export(server, charge)
                        if new:
                            made.append(node)
                handles = self._handles_now(caps, destination, holder)
            except BaseException:
                # The message will not be sent: no one will ever hold the nodes made for it,
                # so no release notification will retire them. Retire them now.
                for node in made:
                    self._nursery.start_soon(self._retire, node)
                raise
            assert handles is not None
        return handles

    def _handles_now(
        self, caps: list[object], destination: int = 0, holder: Caller = None
    ) -> list[int] | None:
        """The handles to attach for a message's capabilities (our objects' nodes for
        ``holder``); None if an object in them has no node yet (making one takes a kernel
        round trip)."""
        handles = []
        for value in caps:
            value = self._forwarded(value)
            if value is REPLY:  # the reply node of this callee (see Engine.reply_for)
                handles.append(self.engine.reply_for(destination) or self.engine.reply_node)
                continue
            if isinstance(value, Client):
                if value.pipeline is not None:
                    raise ValueError(f"{value!r} cannot be passed before its results arrive: await them")
                if value.server is None:
                    if value.handle in self.engine.broken:
                        raise Disconnected(f"{value!r} is gone")
                    handles.append(value.handle)
                    continue
                value = value.server
            if not isinstance(value, Server):
                raise TypeError(f"not a capability: {value!r}")
            node = self.engine.export_node(value, holder)
            if node is None:
                return None
            handles.append(node)
        return handles

    def _forwarded(self, value: object) -> object:
        """``value``, or for a client of another kind of vat (a TCP connection's) the
        Forwarder that stands for it here (one per client, while it is held: the same
        client passed twice is the same object). Clients of another bus vat are refused:
        they have handles of their own peer."""
        if (
            isinstance(value, Client)
            and isinstance(value.server, Forwarder)
            and value.server.target.vat is self
        ):
            return value.server.target  # (one of ours, back from a trip over TCP)
        if not isinstance(value, Client) or value.vat is self:
            return value
        if isinstance(value.vat, Vat):
            raise ValueError(f"{value!r} belongs to another vat")
        forwarder = self._forwarders.of(value)
        return forwarder

    # -- calls out ----------------------------------------------------------------------------

    async def call(self, client: Client, method: Method, params: Mapping[str, Any]) -> StructReader:
        """Calls ``method`` on the object behind ``client``; returns the results view."""
        if client.server is not None:
            return await self._call_local(client.server, method, params)
        if client.pipeline is not None:
            return await self.call_pipelined(*client.pipeline, method, params)
        await self._drain_stream(client)
        return await self._ask(client, method, lambda question_id: encode_call(question_id, method, params))

    async def stream(self, client: Client, method: Method, params: Mapping[str, Any]) -> None:
        """A ``-> stream`` call: returns once it fits the window of unacknowledged bytes;
        calls are delivered and run in order. An error fails the next call on ``client``."""
        if client.server is not None or client.pipeline is not None:
            await self.call(client, method, params)  # no window to keep before the results
            return
        state = self._streams.setdefault(client.handle, _Stream())
        await self._reply_node(client.handle)
        question_id, done = self._question(client, method)
        encoded = encode_call(question_id, method, params)
        size = len(encoded.payload)
        try:
            while state.error is None and state.in_flight and state.in_flight + size > self.stream_window:
                await state.changed.wait()
            if state.error is not None:
                raise state.error
            await self._send(client.handle, encoded, oneway=False)
        except BaseException:
            self._waiting.pop(question_id, None)
            self.engine.forget(question_id)
            raise
        state.in_flight += size
        state.most_in_flight = max(state.most_in_flight, state.in_flight)
        self._nursery.start_soon(self._acknowledged, state, question_id, done, size)

    async def _acknowledged(
        self, state: _Stream, question_id: int, done: tuple[trio.Event, list[Returned]], size: int
    ) -> None:
        try:
            await done[0].wait()
        finally:
            self._waiting.pop(question_id, None)
        returned = done[1][0]
        if returned.error is not None and state.error is None:
            state.error = returned.error
        state.in_flight -= size
        state.notify()

    async def _drain_stream(self, client: Client) -> None:
        """Before a regular call: every stream call acknowledged. A stream that failed stays
        failed (as in Cap'n Proto): its error fails every later call on the capability."""
        state = self._streams.get(client.handle)
        if state is None:
            return
        while state.in_flight and state.error is None:
            await state.changed.wait()
        if state.error is not None:
            raise state.error

    async def call_pipelined(
        self, promise: Promise, transform: tuple[int, ...], method: Method, params: Mapping[str, Any]
    ) -> StructReader:
        """Calls ``method`` on the capability at ``transform`` in ``promise``'s results."""
        latest = promise._latest()
        if latest._done is not None:  # (None: answered here, by a local object)
            pipeline = (latest.question_id, transform)
            try:
                return await self._ask(
                    latest.client,
                    method,
                    lambda question_id: encode_call(question_id, method, params, pipeline=pipeline),
                    pipelined=True,
                )
            except _Redirected:
                pass
        return await self.call(await self._retarget(promise, transform), method, params)

    async def _retarget(self, base: Promise, transform: tuple[int, ...]) -> Client:
        """Where a call pipelined on ``base`` at ``transform`` goes after a redirect: the
        capability itself from base's results, or (if base's own call was redirected and
        is not answered yet) the same pipelined capability where that call went."""
        routed = await base._routed()
        if not routed._answered:
            return self.engine.generic(self, routed.client.handle, pipeline=(routed, transform))
        results = await routed
        try:
            target = results.capability_at(transform)
        except Exception as error:  # noqa: BLE001 - the callee's results, read as the callee wrote them
            raise malformed(error) from error
        if not isinstance(target, Client):
            raise Failed(f"the pipelined capability (pointer fields {list(transform)}) is null")
        return target

    async def _ask(
        self, target: Client, method: Method, encode: Callable[[int], Encoded], pipelined: bool = False
    ) -> StructReader:
        """Sends the call ``encode`` makes for a new question and waits for its answer; a
        caller that gives up (cancelled) sends Finish. A pipelined call may be redirected
        (raises _Redirected)."""
        if self.engine.reply_for(target.handle) is None:
            await self._reply_node(target.handle)
        question_id, done = self._question(target, method, pipelined)
        try:
            # One-way at the kernel: a refusal comes back as SEND_FAILED tagged with the
            # question, which the engine turns into this question's answer.
            call = encode(question_id)
            await self._send(target.handle, call, oneway=True, tag=question_id, checkpoint=False)
            await self._await_return(done[0])  # the checkpoint
        except BaseException:
            if self.engine.forget(question_id) and self._running:
                self._nursery.start_soon(self._finish, target, question_id)
            raise
        finally:
            self._waiting.pop(question_id, None)
        returned = done[1][0]
        if returned.error is not None:
            raise returned.error
        if returned.results is None:
            raise _Redirected
        return returned.results

    async def _reply_node(self, target: int) -> None:
        """Makes the reply node for calls to ``target`` if it has none yet."""
        if self.engine.reply_for(target) is None:
            node = (await self.peer.create_node()).id
            if self.engine.reply_for(target) is None:  # (another task may have made one meanwhile)
                for spare in self.engine.add_reply(target, node):
                    self._nursery.start_soon(self._destroy_reply, spare)
            else:
                self._nursery.start_soon(self._destroy_reply, node)

    async def _destroy_reply(self, node: int) -> None:
        try:
            await self.peer.destroy(node, release=True)
        except bus.CapbusError:
            pass

    def _question(
        self, target: Client, method: Method, pipelined: bool = False
    ) -> tuple[int, tuple[trio.Event, list[Returned]]]:
        question_id = self.engine.ask(target.handle, method, pipelined)
        done: tuple[trio.Event, list[Returned]] = (trio.Event(), [])
        self._waiting[question_id] = done
        return question_id, done

    async def send_call(
        self,
        client: Client,
        method: Method,
        params: Mapping[str, Any],
        *,
        fds: Mapping[int, int] | None = None,
    ) -> Promise:
        """Sends a call and returns at once: ``await`` the promise for the results, or call
        methods on capabilities in those results before they arrive (promise pipelining).
        (``fds``: file descriptors to send instead of those the params name, by number.)"""
        if client.server is not None:
            results = await self._call_local(client.server, method, params, fds)
            return Promise.resolved(self, client, method, results)
        pipeline = None
        base = None
        if client.pipeline is not None:
            base, transform = client.pipeline
            base = base._latest()
            if base._done is None:  # answered here, by a local object
                return await self.send_call(await self._retarget(base, transform), method, params, fds=fds)
            pipeline, client = (base.question_id, transform), base.client
        await self._reply_node(client.handle)
        question_id, done = self._question(client, method, pipeline is not None)
        promise = Promise(self, client, method, question_id, done)
        promise.base = base  # keeps the call it is pipelined on open while it is wanted
        try:
            call = encode_call(question_id, method, params, keep_results=True, pipeline=pipeline)
            named = call.field_fds  # the numbers the params name (then attached segments')
            if fds:
                call.fds = [*(fds.get(fd, fd) for fd in named), *call.fds[len(named) :]]
            if base is not None:
                # Kept in case it is redirected and must be sent again (registered before
                # the send: the redirect may come in the same read as the send's answer):
                # the params, and copies of the files they name, by the params' numbers (the
                # caller may close its own once this returns: the numbers then name others).
                resend = _Resend(weakref.ref(promise), transform, method, params, {})
                self._resends[question_id] = resend
                for number, real in zip(named, call.fds[: len(named)], strict=True):
                    resend.fds[number] = os.dup(real)
            await self._send(client.handle, call, oneway=False)
        except BaseException:
            promise._finalizer.detach()  # (never sent: nothing to Finish)
            self._waiting.pop(question_id, None)
            unsent = self._resends.pop(question_id, None)
            if unsent is not None:
                unsent.close()
            self.engine.forget(question_id)
            raise
        return promise

    async def _resend(self, promise: weakref.ref[Promise], resend: _Resend, question_id: int) -> None:
        """Sends a promise's redirected pipelined call again, to the capability itself. Holds
        the promise weakly: dropped, it cancels this (Vat._promise_gone), and its base goes
        too (its Finish sent), even if the callee never answers the base."""
        with trio.CancelScope() as scope:
            self._resending[question_id] = scope
            try:
                await self._send_again(promise, resend)
            finally:
                del self._resending[question_id]
                resend.close()

    async def _send_again(self, ref: weakref.ref[Promise], resend: _Resend) -> None:
        promise = ref()
        if promise is None:
            return
        base, question_id = promise.base, promise.question_id
        del promise
        error: RpcError
        try:
            if base is None:
                raise Failed("the call it was pipelined on was dropped (its promise)")
            target = await self._retarget(base, resend.transform)
            del base
            successor = await self.send_call(target, resend.method, resend.params, fds=resend.fds)
        except RpcError as failure:
            error = failure
        except trio.Cancelled:
            promise = ref()
            if promise is not None:  # (the vat closes)
                promise._fail(_answered(question_id, Disconnected("the vat closed")))
            raise
        except Exception as failure:  # noqa: BLE001 - the call's own params, say: its caller hears
            error = Failed(f"{type(failure).__name__}: {failure}")
        else:
            promise = ref()
            if promise is not None:  # (else the successor goes too, with its Finish)
                promise._adopt(successor)
            return
        promise = ref()
        if promise is not None:
            promise._fail(_answered(question_id, error))

    def _promise_gone(self, target: Client, question_id: int, done: Any = None) -> None:
        """A promise was collected: the callee may drop the results it kept for it."""
        self._waiting.pop(question_id, None)
        resend = self._resends.pop(question_id, None)
        if resend is not None:
            resend.close()
        resending = self._resending.get(question_id)
        if resending is not None:
            resending.cancel()
        self.engine.forget(question_id)  # open or answered: the callee may let go either way
        try:
            self._nursery.start_soon(self._finish, target, question_id)
        except (RuntimeError, AttributeError):
            # The vat is closed, or its trio run is over (collected at interpreter exit:
            # trio then fails with AttributeError).
            pass

    async def multicast(
        self, clients: Sequence[Client], method: Method, params: Mapping[str, Any]
    ) -> tuple[RpcError | None, ...]:
        """One one-way call to every client's object, in one kernel send: every receiver gets
        the same call, and all multicasts are in the same order everywhere (docs/design.md 2.1
        rule 8). Returns, per client, None or why the call could not be delivered (the node
        is gone, the receiver's quota is full); local objects run in a task."""
        if any(c.pipeline is not None for c in clients):
            raise ValueError("a promised capability cannot take a multicast: await its promise first")
        encoded = encode_call(self.engine.oneway_id(), method, params, oneway=True)
        remote = [c for c in clients if c.server is None]
        for client in clients:
            if client.server is not None:
                self._nursery.start_soon(self._call_local, client.server, method, params)
        outcome: dict[int, RpcError | None] = {}
        if remote:
            self._check_size(encoded)
            handles = await self._handles_for(encoded.caps)
            self.engine.sending(handles, True)
            try:
                targets = [c.handle for c in remote]
                results = await self.peer.send(targets, encoded.payload, handles=handles, fds=encoded.fds)
            except bus.CapbusError as error:
                raise from_kernel(error) from error
            finally:
                self.engine.sending(handles, False)
            for client, refused in zip(remote, results, strict=True):
                outcome[id(client)] = None if refused is None else from_kernel(refused)
                if isinstance(refused, bus.NodeDestroyed):
                    self.engine.broken.add(client.handle)
        await trio.lowlevel.checkpoint()
        return tuple(outcome.get(id(c)) for c in clients)

    async def multicast_oneway(
        self, clients: Sequence[Client], method: Method, params: Mapping[str, Any]
    ) -> None:
        """:meth:`multicast` without waiting for the kernel's word on each receiver: returns
        as soon as the send is written, so a publisher can send event after event; like any
        one-way call, a receiver that cannot take it (gone, quota full) is not reported."""
        if any(c.pipeline is not None for c in clients):
            raise ValueError("a promised capability cannot take a multicast: await its promise first")
        encoded = encode_call(self.engine.oneway_id(), method, params, oneway=True)
        remote = [c.handle for c in clients if c.server is None]
        for client in clients:
            if client.server is not None:
                self._nursery.start_soon(self._call_local, client.server, method, params)
        if not remote:
            await trio.lowlevel.checkpoint()
            return
        self._check_size(encoded)
        handles = await self._handles_for(encoded.caps)
        self.engine.sending(handles, True)
        try:
            await self.peer._send(remote, encoded.payload, handles, encoded.fds, 0, _wire.SEND_FLAG_QUIET)
        except bus.CapbusError as error:
            raise from_kernel(error) from error
        finally:
            self.engine.sending(handles, False)

    async def call_oneway(self, client: Client, method: Method, params: Mapping[str, Any]) -> None:
        """Calls with no return; errors on the way are dropped (as for any one-way call)."""
        if client.server is not None:
            self._nursery.start_soon(self._call_local, client.server, method, params)
            await trio.lowlevel.checkpoint()
            return
        if client.pipeline is not None:
            # A pipelined call names its answer through the caller's reply node, which a
            # one-way call lacks: send it two-way, and keep the promise until it is answered
            # (dropping it sooner would send Finish, which may cancel the call).
            self._nursery.start_soon(self._settle, await self.send_call(client, method, params))
            return
        encoded = encode_call(self.engine.oneway_id(), method, params, oneway=True)
        await self._send(client.handle, encoded, oneway=True)

    @staticmethod
    async def _settle(promise: Promise) -> None:
        try:
            await promise
        except RpcError:
            pass  # as for any one-way call

    async def _call_local(
        self, server: Server, method: Method, params: Mapping[str, Any], fds: Mapping[int, int] | None = None
    ) -> StructReader:
        await trio.lowlevel.checkpoint()
        call = encode_call(0, method, params, oneway=True)
        numbers = [fds.get(fd, fd) for fd in call.field_fds] if fds else call.field_fds
        caps = self.engine.loopback(call.caps)
        received = decode(call.payload, caps, self.engine.typed, duplicates(numbers), call.attached)
        assert isinstance(received, ReceivedCall)
        kwargs = as_kwargs(received.params(method.params), method.params_layout)
        try:
            results = await server._dispatch(method, kwargs)
        except RpcError:
            raise
        except Exception as error:
            raise handler_failed(server, method, error) from error
        encoded = encode_results(0, method, results)
        loopback = self.engine.loopback(encoded.caps)
        returned = decode(
            encoded.payload, loopback, self.engine.typed, duplicates(encoded.field_fds), encoded.attached
        )
        assert isinstance(returned, ReceivedReturn) and returned.body is not None
        return returned.body.struct(method.results)

    async def _finish(self, target: Client, question_id: int) -> None:
        try:
            await self._send(target.handle, encode_finish(question_id), oneway=True)
        except (RpcError, bus.CapbusError):
            pass

    async def _send(
        self,
        destination: int,
        encoded: Encoded,
        *,
        oneway: bool,
        tag: int | None = None,
        checkpoint: bool = True,
        charge: _Charge | None = None,
    ) -> None:
        self._check_size(encoded)
        handles = await self._handles_for(encoded.caps, destination, charge)
        self.engine.sending(handles, True)
        try:
            if oneway:
                if encoded.fds or not self.peer.send_ids_nowait(destination, encoded.payload, handles, tag):
                    flags = _wire.SEND_FLAG_QUIET
                    await self.peer._send(
                        destination, encoded.payload, handles, encoded.fds, 0, flags, tag, checkpoint
                    )
                elif checkpoint:
                    await trio.lowlevel.checkpoint()
            else:
                await self.peer.send(destination, encoded.payload, handles=handles, fds=encoded.fds)
        except bus.CapbusError as error:
            if isinstance(error, bus.NodeDestroyed):
                self.engine.broken.add(destination)
            # Objects this message would have handed out may now be held by no one (one made
            # for it never got the release notification that retires it).
            for node in handles:
                if node in self.engine.exports:
                    self._nursery.start_soon(self._retire, node)
            raise from_kernel(error) from error
        finally:
            self.engine.sending(handles, False)

    def _check_size(self, encoded: Encoded) -> None:
        """Raises Failed for a message over max_send_bytes (attached segments counted)."""
        size = len(encoded.payload)
        if size > self.max_send_bytes or encoded.attached:
            size += sum(view.nbytes for view in encoded.attached)
            if size > self.max_send_bytes:
                raise Failed(
                    f"a message of {size} bytes is over this vat's max_send_bytes of {self.max_send_bytes}"
                    " (open_vat(max_send_bytes=...); its receiver's max_message_bytes must take it too)"
                )

    async def _send_quietly(self, send: Send) -> None:
        destination = send.destination.handle if isinstance(send.destination, Client) else send.destination
        try:
            # Returns and refusals come at the end of a task that already checkpointed.
            await self._send(destination, send.encoded, oneway=send.oneway, checkpoint=False)
        except (RpcError, bus.CapbusError):
            pass  # the receiver is gone

    # -- what arrives -------------------------------------------------------------------------

    async def _start(self) -> None:
        self._nursery.start_soon(self._receive_loop)
        self._nursery.start_soon(self._release_loop)
        await trio.lowlevel.checkpoint()

    async def _receive_loop(self) -> None:
        # What arrives is handled in this task's context even when a caller reads it
        # (_await_return): a call from anyone must not run with, or set, the variables
        # of whichever caller happens to wait.
        self._loop_context = trio.lowlevel.current_task().context
        while True:
            if self._caller_reading:  # a caller reads the socket until its return is in
                parked = self._loop_parked = trio.Event()
                await parked.wait()
                continue
            # A caller that takes the socket cancels this scope (Peer.recv is cancel-safe:
            # nothing read is lost); one scope for every message until then.
            with trio.CancelScope() as scope:
                self._loop_receiving = scope
                try:
                    while True:
                        # In a function of its own, so that nothing of the message outlives
                        # it: a last event kept by the loop would keep its reply client (and
                        # the kernel references that client owns) alive until the next one.
                        self._deliver(await self.peer.recv())
                        self._deliver_ready()
                except bus.ShutDown:  # (shut down keeping no node: DRAINED ended it)
                    self._drained.set()
                    return
                finally:
                    self._loop_receiving = None

    def _deliver_ready(self, done: trio.Event | None = None) -> None:
        """Handles what has arrived already, without a checkpoint per message (one pass of
        the scheduler each: a burst of one-way calls or returns paid one per message), up
        to RECEIVE_BATCH messages so that other tasks still run; until ``done`` is set."""
        for _ in range(RECEIVE_BATCH):
            # A call queued for a task of its own ends the batch: tasks started in one
            # step start in any order, and the calls of different callers must start in
            # the order they arrived (each subscriber of a multicast sees one order).
            if self._took_in or (done is not None and done.is_set()):
                break
            try:
                message = self.peer.recv_nowait()
            except trio.WouldBlock:
                break
            self._deliver(message)
            del message
        self._took_in = False

    async def _await_return(self, done: trio.Event) -> None:
        """Waits until ``done`` (a question's return has been handled), reading the socket
        itself if no other caller does: the return then wakes no other task first. That
        saves a pass of trio's scheduler (a task woken to wake this one) on every call's
        critical path. The receive loop gives the socket up meanwhile (a caller takes it
        from the loop's wait at once: cancelling a wait for readability frees the fd's
        waiter slot synchronously) and takes it back when the caller is done."""
        if self._caller_reading or done.is_set():
            await done.wait()
            return
        self._caller_reading = True
        receiving = self._loop_receiving
        if receiving is not None:
            receiving.cancel()
        try:
            # The return may reach another task first (the loop, if a message it had read
            # before it gave up the socket was this one): _handle then cancels this scope.
            with trio.CancelScope() as scope:
                reader = (scope, done)
                while True:
                    self._reader = reader
                    message = await self.peer.recv()  # (a checkpoint, waited or not)
                    self._reader = None  # (its own return needs no cancel: it looks next)
                    self._loop_context.run(self._deliver, message)
                    del message  # (as in the loop: nothing of it kept while waiting)
                    self._loop_context.run(self._deliver_ready, done)
                    if done.is_set():
                        return
        except bus.CapbusError:
            pass  # the peer broke: the loop meets the same error and ends the vat
        finally:
            self._reader = None
            self._caller_reading = False
            parked = self._loop_parked
            if parked is not None:
                self._loop_parked = None
                parked.set()
        await done.wait()

    def _start_work(self, function: Callable[..., Awaitable[object]], *args: object) -> None:
        """Starts serving a call, or sending a return, in a task of its own, counted until
        it is done (shutdown waits for it)."""
        self._nursery.start_soon(self._counted, function, *args)
        self._open_work += 1  # (after: a refused start_soon leaves nothing to count)

    async def _counted(self, function: Callable[..., Awaitable[object]], *args: object) -> None:
        try:
            await function(*args)
        finally:
            self._open_work -= 1
            if not self._open_work and self._work_done is not None:
                self._work_done.set()

    async def shutdown(self, grace: float = 10.0) -> None:
        """Closes this vat gracefully: nobody can call its objects any more (its peer's
        nodes are destroyed: callers see them go), every call already queued for it is
        served and answered, and calls being served may finish (and get answers to the calls
        they make), all within ``grace`` seconds. Returns then; the end of the vat's block
        stops what still runs and disconnects its peer. See docs/rpc-reference.md."""
        if self._shut_down:  # (a second: it waits as the first does)
            with trio.move_on_after(grace):
                await self._drained.wait()
                await self._work_finished()
            return
        self._shut_down = True
        with trio.move_on_after(grace):
            try:
                # Its reply nodes stay: the calls its handlers make still get their answers.
                try:
                    await self.peer.begin_shutdown(keep=sorted(self.engine.reply_nodes))
                except (bus.AlreadyDestroyed, bus.NoSuchHandle):
                    await self.peer.begin_shutdown()  # (one went meanwhile: keep none)
            except bus.CapbusError:
                pass  # (the peer is broken or shut down already: nothing more will come)
            else:
                await self._drained.wait()
            await self._work_finished()

    async def _work_finished(self) -> None:
        while self._open_work:
            if self._work_done is None or self._work_done.is_set():
                self._work_done = trio.Event()
            await self._work_done.wait()

    def _stopped(self) -> None:
        """The vat's tasks are over (its block ended): its calls still waiting fail, rather
        than wait for answers nothing will read."""
        self._running = False
        gone = Disconnected("the vat closed")
        for question_id, (event, answer) in list(self._waiting.items()):
            if not event.is_set():
                answer.append(Returned(question_id, error=gone))
                event.set()
        if self._reader is not None:
            self._reader[0].cancel()

    def _deliver(self, message: Message) -> None:
        if message.kind is MessageKind.DRAINED:
            self._drained.set()  # (shutdown: every call queued for it has come)
            return
        for event in self.engine.receive(message):
            self._handle(event)

    def _settled(self, events: list[Event]) -> None:
        """Handles what Engine.completed says follows a served call: never inline (a call
        released by it may complete inline, release the next, and so on: a chain of
        thousands would recurse as deep)."""
        for event in events:
            self._handle(event, inline=False)

    def _handle(self, event: Event, inline: bool = True) -> None:
        if isinstance(event, Returned):
            resend = self._resends.pop(event.question_id, None) if self._resends else None
            if resend is not None:
                promise = resend.promise() if event.redirect else None
                if promise is not None:  # (set before its waiters wake: they wait for the resend)
                    promise._rerouted = trio.Event()
                    self._nursery.start_soon(self._resend, resend.promise, resend, event.question_id)
                else:
                    resend.close()
            waiting = self._waiting.get(event.question_id)
            if waiting is not None:
                waiting[1].append(event)
                waiting[0].set()
                reader = self._reader
                if reader is not None and reader[1] is waiting[0]:
                    reader[0].cancel()  # (a no-op when the reader itself handled it)
        elif isinstance(event, CallArrived):
            streaming = event.method is not None and event.method.streaming and event.reply is not None
            if streaming or not inline or not self._serve_inline(event):
                self._take_in(event, streaming)
        elif isinstance(event, FinishArrived):
            scope = self._serving.get(event.key)
            if scope is not None:
                scope.cancel()
        elif isinstance(event, MayRetire):
            self._nursery.start_soon(self._retire, event.node)
        else:
            self._nursery.start_soon(self._send_quietly, event)

    def _take_in(
        self, arrived: CallArrived, streaming: bool = False, started: Awaitable[Any] | None = None
    ) -> None:
        """Queues a call to start in its caller's turn (``started``: what a plain-function
        handler already returned), or answers Overloaded if that caller has
        ``max_queued_calls`` waiting already."""
        calls = self._caller_calls(arrived.caller)
        # Each capability is a handle this peer holds while the call waits, and the kernel
        # bounds a peer's handles (handles_held): past it this vat could make no node and
        # take no new caller's call. Its message is held too, or mapped (a memfd payload):
        # past the address space, the mapping fails in Peer.recv and the peer is broken.
        overloaded = calls.overloaded(arrived.size, arrived.handles, arrived.fds, self._queue_bounds)
        if overloaded is not None:
            self._refuse_overloaded(arrived, overloaded)
            if not calls.calls:
                self._forget_caller(arrived.caller)
            if inspect.iscoroutine(started):
                started.close()  # never to be awaited: no warning
            return
        calls.enqueue(arrived.size, arrived.handles, arrived.fds)
        # Its cancel scope, from now on: a Finish (or the caller's reply node destroyed)
        # before its task starts, or while it waits for its turn, cancels it too.
        scope = trio.CancelScope()
        if arrived.reply is not None:
            key = (arrived.reply.handle, arrived.question_id)
            earlier = self._serving.get(key)
            if earlier is not None:  # (its question id reused: the engine let it go already)
                earlier.cancel()
            self._serving[key] = scope
        self._took_in = True
        if streaming:
            self._queue_stream_call(arrived, scope)
        else:
            self._start_work(self._serve, arrived, scope, calls.ticket(), started)
            self._unstarted += 1  # (after: a refused start_soon leaves nothing to count)

    def _caller_calls(self, caller: Caller) -> CallerCalls:
        calls = self._callers.get(caller)
        if calls is None:
            uid = uid_of(caller)
            user = self._users.get(uid)
            if user is None:
                user = self._users[uid] = UserCalls(trio.Semaphore(self._max_calls_per_uid))
            user.callers += 1
            calls = self._callers[caller] = CallerCalls(trio.Semaphore(self._max_calls_per_caller), user)
        return calls

    def _forget_caller(self, caller: Caller) -> None:
        """A caller with no calls left (its uid's too, if it was the last one)."""
        user = self._callers.pop(caller).user
        user.callers -= 1
        if not user.callers:
            del self._users[uid_of(caller)]

    async def _take_slot(self, calls: CallerCalls) -> None:
        """One of the caller's handler slots, one of its uid's, then one of the vat's (when
        uncontended: no scheduler round)."""
        taken: list[trio.Semaphore] = []
        try:
            for slots in (calls.slots, calls.user.slots, self._concurrency):
                try:
                    slots.acquire_nowait()
                except trio.WouldBlock:
                    await slots.acquire()
                taken.append(slots)
        except BaseException:
            for slots in taken:
                slots.release()
            raise

    def _give_slot(self, calls: CallerCalls) -> None:
        self._concurrency.release()
        calls.user.slots.release()
        calls.slots.release()

    def _serve_inline(self, arrived: CallArrived) -> bool:
        """Runs a plain-function handler (server.py) right here, in the receive loop, and
        sends its return without a task when the socket takes it: no scheduler round on the
        way. Only when no earlier call still waits to start (E-order) and a concurrency slot
        is free; returns whether the call was taken care of."""
        method, server, question_id = arrived.method, arrived.server, arrived.question_id
        calls = self._callers.get(arrived.caller)
        if method is None or (calls is not None and not calls.idle) or self._unstarted:
            # (a call that came earlier, of any caller, whose task has not run yet: this one
            # must not start before it, so it takes a task too)
            return False
        handler = server._inline_handler(method)
        if handler is None:
            return False
        try:
            self._concurrency.acquire_nowait()
        except trio.WouldBlock:
            return False
        try:
            params = params_of(arrived.call, method, server._views(method))
            result = handler(**server._arguments(method, params))
            if result is not None and inspect.isawaitable(result):  # (a def handing one back)
                self._take_in(arrived, started=result)
                return True
            if arrived.reply is None:
                return True  # one-way: no return to encode
            encoded = encode_results(question_id, method, server._results(method, result))
        except RpcError as error:
            encoded = encode_exception(question_id, error)
        except Exception as error:  # noqa: BLE001 - the caller gets it as Failed
            encoded = encode_exception(question_id, handler_failed(server, method, error))
        finally:
            self._concurrency.release()
        reply = arrived.reply
        if reply is None:
            return True  # one-way: no return
        encoded, charge = self._bounded(arrived.caller, question_id, encoded)
        key = (reply.handle, question_id)
        self._settled(self.engine.completed(key, encoded, arrived.answer))
        if not self._send_now(reply.handle, encoded):
            # (arrived goes along: the files its message brought, which the results may
            # name, stay open until the return is written)
            self._start_work(self._send_return, reply, question_id, encoded, charge, arrived)
        return True

    def _refuse_overloaded(self, arrived: CallArrived, overloaded: str) -> None:
        """Answers a call that would queue past the bounds with Overloaded (a one-way call
        is dropped, as it would be by a full kernel queue)."""
        reply = arrived.reply
        if reply is None:
            return
        question_id = arrived.question_id
        error = Overloaded(f"{overloaded}; try again later")
        encoded = encode_exception(question_id, error)
        self._settled(self.engine.completed((reply.handle, question_id), encoded, arrived.answer))
        self._start_work(self._send_return, reply, question_id, encoded, _Charge(arrived.caller))

    def _send_now(self, destination: int, encoded: Encoded) -> bool:
        """Sends a one-way message if that needs no wait (its objects all have nodes, the
        socket has room); False if it was not sent. A gone receiver counts as sent."""
        if len(encoded.payload) > self.max_send_bytes or encoded.attached:
            return False  # (_send says whether it may go)
        try:
            handles = self._handles_now(encoded.caps, destination)
        except RpcError:
            return False  # let the task that sends it report that
        if handles is None or any(node in self.engine.exports for node in handles):
            return False  # objects of ours go out with an acknowledged send (_send_return)
        self.engine.sending(handles, True)
        try:
            if encoded.fds:
                self.peer.send_oneway_nowait(destination, encoded.payload, handles=handles, fds=encoded.fds)
            elif not self.peer.send_ids_nowait(destination, encoded.payload, handles):
                return False
        except trio.WouldBlock:
            return False
        except bus.CapbusError:
            pass  # the receiver is gone
        finally:
            self.engine.sending(handles, False)
        return True

    async def _send_return(
        self, reply: Client, question_id: int, encoded: Encoded, charge: _Charge, keep: object = None
    ) -> None:
        """Sends a return; results that cannot be sent (a capability in them is gone) reach
        the caller as that error instead: a caller always gets an answer. A return that
        hands out objects of this vat waits for the kernel's answer, so that a refused one
        (its caller gone) lets them be retired."""
        hands_out = any(isinstance(v, Server) or (isinstance(v, Client) and v.server) for v in encoded.caps)
        try:
            await self._send(reply.handle, encoded, oneway=not hands_out, checkpoint=False, charge=charge)
        except RpcError as error:
            if isinstance(error, Disconnected) and reply.handle in self.engine.broken:
                return  # the caller is gone
            await self._send_quietly(Send(reply, encode_exception(question_id, error)))
        except bus.CapbusError as error:
            # Not the send (_send makes its errors RpcErrors): making a node for an object
            # the results hand out (this peer is out of nodes or handles). The caller must
            # hear of it: every later call that hands out an object would hang otherwise.
            failed = Overloaded(f"the results could not be sent: {error.strerror}")
            await self._send_quietly(Send(reply, encode_exception(question_id, failed)))
        finally:
            self.engine.unreserve(charge.caller, charge.reserved)  # objects that got no node
            charge.reserved = 0

    def _bounded(self, caller: Caller, question_id: int, encoded: Encoded) -> tuple[Encoded, _Charge]:
        """The return itself, or Overloaded if it would hand its caller more new objects
        than ``max_exports_per_caller`` allows, or its uid more than ``uid_share`` times
        that (decided before anything is done with it);
        and what to charge the objects it hands out to. The new objects are counted at once
        (reserved), although their nodes are made later: returns that complete together
        must not all pass the bound on the count before any of them."""
        if not encoded.caps:  # (most returns: nothing handed out, nothing to count)
            return encoded, _Charge(caller)
        new = self._new_exports(encoded.caps, caller)
        held, bound = self.engine.exports_held, self.max_exports_per_caller
        if not new or held.fits(caller, new, bound):
            self.engine.reserve(caller, new)
            return encoded, _Charge(caller, new)
        if held[caller] + new > bound:
            who, count = "this caller holds", held[caller]
        else:
            who, count = "this caller's uid holds (over all its connections)", held.of_uid(caller)
            bound *= held.uid_share
        error = Overloaded(
            f"{who} {count} objects of this vat and may hold {bound}: release some (drop their"
            " clients) to be given more"
        )
        return encode_exception(question_id, error), _Charge(caller)

    def _new_exports(self, caps: list[object], holder: Caller) -> int:
        """How many objects in ``caps`` have no node for ``holder`` yet."""
        servers = {id(v.server if isinstance(v, Client) else v): v for v in caps}
        return sum(
            1
            for value in servers.values()
            if isinstance(server := value.server if isinstance(value, Client) else value, Server)
            and self.engine.export_node(server, holder) is None
        )

    async def _serve(
        self,
        arrived: CallArrived,
        scope: trio.CancelScope,
        ticket: int | None = None,
        started: Awaitable[Any] | None = None,
    ) -> None:
        """Runs a call's handler in this task, within ``scope`` (``started``: what a
        plain-function handler already returned, to await) and sends its return."""
        self._unstarted -= 1  # (its first step: later calls may run inline again)
        reply, question_id, method = arrived.reply, arrived.question_id, arrived.method
        key = None if reply is None else (reply.handle, question_id)
        encoded: Encoded | None = None
        calls = self._callers[arrived.caller]
        queued = True  # counted in calls.queued until the handler starts
        with scope:
            try:
                await trio.lowlevel.checkpoint_if_cancelled()  # (finished before it started)
                if ticket is not None:
                    await calls.wait_turn(ticket)
                if method is None:
                    call = arrived.call
                    wanted = f"method {call.method_id} of interface {call.interface_id:#x}"
                    raise Unimplemented(f"{arrived.server.interface.name} has no {wanted}")
                views = arrived.server._views(method)
                params = params_of(arrived.call, method, views) if started is None else {}
                held = arrived.fds  # what its message holds while the handler runs
                if _copied_out(method) and not views:
                    # Its params are copies: the message (a mapped payload, for a large
                    # one, holding memory and before Python 3.13 an fd) need not live as
                    # long as the handler runs.
                    arrived.call.body = Body()
                    held = 0
                await self._take_slot(calls)
                calls.dequeue(arrived.size, arrived.handles, arrived.fds, held)
                queued = False
                try:
                    # The next call may start once this handler has begun: it runs until its
                    # first checkpoint before any other task does.
                    calls.pass_turn(ticket)
                    ticket = None
                    if started is None:
                        results = await arrived.server._dispatch(method, params)
                    else:
                        results = arrived.server._results(method, await started)
                finally:
                    self._give_slot(calls)
                    calls.release(held)
                encoded = encode_results(question_id, method, results)
            except RpcError as error:
                encoded = encode_exception(question_id, error)
            except Exception as error:  # noqa: BLE001 - the caller gets it as Failed
                encoded = encode_exception(question_id, handler_failed(arrived.server, method, error))
            finally:
                if queued:
                    calls.dequeue(arrived.size, arrived.handles, arrived.fds)
                calls.pass_turn(ticket)  # not reached the handler: let the others go on
                calls.calls -= 1
                if not calls.calls:
                    self._forget_caller(arrived.caller)
                if key is not None and self._serving.get(key) is scope:
                    del self._serving[key]
                if inspect.iscoroutine(started):
                    started.close()  # never awaited (cancelled first): no warning; else a no-op
        await self._answer(reply, key, encoded, scope.cancel_called, arrived)

    def _queue_stream_call(self, arrived: CallArrived, scope: trio.CancelScope) -> None:
        """Stream calls of one caller to one object run one at a time, in arrival order."""
        assert arrived.reply is not None
        key = (id(arrived.server), arrived.reply.handle)
        queue = self._stream_queues.get(key)
        if queue is None:
            self._stream_queues[key] = queue = collections.deque()
            self._start_work(self._run_stream, key)
        queue.append((arrived, scope))

    async def _run_stream(self, key: tuple[int, int]) -> None:
        queue = self._stream_queues[key]
        try:
            while queue:
                await self._serve(*queue[0])
                queue.popleft()
        finally:
            del self._stream_queues[key]

    async def _answer(
        self,
        reply: Client | None,
        key: tuple[int, int] | None,
        encoded: Encoded | None,
        cancelled: bool,
        arrived: CallArrived,
    ) -> None:
        """Sends a served call's return and runs the pipelined calls that waited for it."""
        if key is None or reply is None:
            return  # one-way: no return
        if cancelled or encoded is None:
            # The caller sent Finish: it wants no return. Calls pipelined on this one (a
            # promise derived from it may still be awaited) fail with the reason.
            canceled = encode_exception(key[1], Failed("the call they were pipelined on was canceled"))
            self._settled(self.engine.completed(key, canceled, arrived.answer))
            self.engine.cancelled(key, arrived.answer)
            return
        encoded, charge = self._bounded(arrived.caller, key[1], encoded)
        self._settled(self.engine.completed(key, encoded, arrived.answer))
        await self._send_return(reply, key[1], encoded, charge)

    async def _retire(self, node: int) -> None:
        sends = self.engine.sends_of(node)
        if sends is None:
            return  # a send carries it: its receiver's release, or its failure, asks again
        try:
            state = await self.peer.handle_state(node)
            server = self.engine.retire(node, state.holders, sends)
            if server is not None:
                self._nursery.start_soon(_tell_released, server)
                if len(self._spare_nodes) < SPARE_NODES:
                    # Held by no one else, and nothing can arrive for it any more (every
                    # send through a handle to it came before the last release did): as
                    # good as a new node, for the next object exported.
                    self._spare_nodes.append(node)
                else:
                    await self.peer.destroy(node, release=True)
        except bus.CapbusError:
            pass

    async def _release_loop(self) -> None:
        while True:
            await self._release_wanted.wait()
            self._release_wanted = trio.Event()
            for handle, count in self.engine.take_releases().items():
                try:
                    await self.peer.release(handle, count)
                except bus.CapbusError:
                    pass  # already gone with its peer
            for node in self.engine.take_spare_replies():
                await self._destroy_reply(node)


async def _tell_released(server: Server) -> None:
    """Runs a server's :meth:`Server.on_released` hook (its exception logged, not raised:
    the vat goes on)."""
    try:
        result = server.on_released()
        if inspect.isawaitable(result):
            await result
    except Exception:  # noqa: BLE001 - the server's own bug: logged, as a handler's
        log.exception("%s.on_released raised", type(server).__name__)


def _interface(interface: Any) -> Interface:
    if isinstance(interface, Interface):
        return interface
    found = getattr(interface, "interface", None)
    if isinstance(found, Interface):
        return found
    raise TypeError(f"not an interface: {interface!r}")


MAX_CONCURRENT_CALLS = 1024
RECEIVE_BATCH = 32
"""Messages a vat handles in a row, once they have arrived, before it lets other tasks run."""
SPARE_NODES = 16
"""Retired nodes a vat keeps for the next objects it exports (1/4096 of the kernel's default
nodes_owned): passing a new object in each call then costs no kernel round trip to make its
node, nor one to destroy the last one's."""
MAX_QUEUED_CALLS = 4096
MAX_EXPORTS_PER_CALLER = 4096  # a sixteenth of the kernel's default nodes_owned
MAX_CALLS_PER_CALLER = 256  # a quarter of MAX_CONCURRENT_CALLS
MAX_QUEUED_CAPABILITIES_PER_CALLER = 256  # a 256th of the kernel's default handles_held


@asynccontextmanager
async def open_vat(
    peer: Peer,
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    max_concurrent_calls: int = MAX_CONCURRENT_CALLS,
    max_queued_calls: int = MAX_QUEUED_CALLS,
    max_exports_per_caller: int = MAX_EXPORTS_PER_CALLER,
    max_calls_per_caller: int = MAX_CALLS_PER_CALLER,
    max_queued_capabilities_per_caller: int = MAX_QUEUED_CAPABILITIES_PER_CALLER,
    max_queued_bytes_per_caller: int | None = None,
    uid_share: int = UID_SHARE,
    max_send_bytes: int | None = None,
) -> AsyncIterator[Vat]:
    """Runs the RPC endpoint of ``peer`` for the duration of the block. A caller is a
    peer connection, as the kernel attests it (engine.caller_of: the vat asks its peer for
    senders' credentials). At most ``max_concurrent_calls`` handlers run at once, and at most
    ``max_calls_per_caller`` of one caller; up to ``max_queued_calls`` more calls of one
    caller wait, in arrival order, carrying at most ``max_queued_capabilities_per_caller``
    capabilities (handles this peer then holds) besides their reply capabilities and
    ``max_queued_bytes_per_caller`` bytes (default: twice ``max_message_bytes``); its calls
    past that are answered Overloaded at once; as many pipelined calls of one caller may
    wait for their answer. One caller may hold at most ``max_exports_per_caller`` objects
    that returns handed it; past that, such returns fail with Overloaded.

    A uid can connect many peers, each a caller: all callers of one uid together may take
    ``uid_share`` times each of those per-caller bounds, and run at most half the vat's
    handlers (or ``max_calls_per_caller``, if that is more).

    A message this vat would send over ``max_send_bytes`` (default: ``max_message_bytes``,
    what a vat with the same limits takes) is not sent: a call raises Failed saying so on
    the caller's side, results become that Failed for their caller."""
    reply_node = (await peer.create_node()).id
    if peer.max_mapped_bytes is None or peer.max_mapped_bytes > max_message_bytes:
        peer.max_mapped_bytes = max_message_bytes  # what the engine would refuse, not mapped
    await peer.want_metadata()  # callers are told apart by their kernel-attested sender
    made: Vat | None = None
    try:
        async with trio.open_nursery() as nursery:
            vat: Vat | None = None

            def wake() -> None:
                if vat is not None:
                    vat._wake_releaser()

            engine = Engine(
                reply_node,
                max_message_bytes=max_message_bytes,
                on_release=wake,
                max_waiting=max_queued_calls,
                max_waiting_bytes=max_queued_bytes_per_caller,
                max_waiting_capabilities=max_queued_capabilities_per_caller,
                uid_share=uid_share,
            )
            engine.max_mapped_bytes = lambda: peer.max_mapped_bytes
            limits = {
                "max_concurrent_calls": max_concurrent_calls,
                "max_queued_calls": max_queued_calls,
                "max_exports_per_caller": max_exports_per_caller,
                "max_calls_per_caller": max_calls_per_caller,
                "max_queued_capabilities_per_caller": max_queued_capabilities_per_caller,
            }
            vat = Vat(
                peer, nursery, engine, **limits, max_queued_bytes_per_caller=max_queued_bytes_per_caller
            )
            vat.max_send_bytes = max_message_bytes if max_send_bytes is None else max_send_bytes
            await vat._start()
            made = vat
            try:
                yield vat
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if made is not None:
            made._stopped()
            if made._shut_down:
                with trio.CancelScope(shield=True):  # (shut down: its peer goes with it)
                    await peer.aclose()
