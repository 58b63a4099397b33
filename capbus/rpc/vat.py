"""The vat: the RPC endpoint of one peer, on trio.

A vat turns the peer's messages into calls and returns (DESIGN.md section 3):

- **exports**: a :class:`Server` passed in a call gets one node, reused while it is held;
  a call arriving on that node runs the server's method in a task. When the kernel says no
  one else holds the node any more (NODE_RELEASED, confirmed by the holder count, since a
  send of ours may have given it out again meanwhile), the node is destroyed and the server
  dropped: distributed GC without leaks.
- **imports**: a handle received in a message becomes a :class:`Client`, one per handle
  (identity holds). Each receipt adds a kernel reference; the client owns them and they are
  released, in batches, when it is closed or collected.
- **questions**: a call waits for the return at the vat's reply node, whose handle travels
  with every call; (reply handle, question id) identifies the call at the callee. A
  destroyed node or a dead callee fails every pending and later call as Disconnected;
  cancelling a caller sends Finish, which cancels the handler.

Message encoding is in :mod:`capbus.rpc.protocol` (no IO); this module owns tables and IO.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import errors as bus
from ..peer import Handle, Message, MessageKind, Peer
from .capwire import CapWireError
from .client import Client, client_class
from .errors import Disconnected, Failed, Overloaded, RpcError, Unimplemented
from .interface import Interface, Method, interface_of
from .layout import FieldLayout
from .protocol import (
    REPLY,
    Encoded,
    as_kwargs,
    call_identity,
    decode,
    encode_call,
    encode_exception,
    encode_finish,
    encode_results,
    exception_of,
)
from .server import Server
from .structs import StructReader


@dataclass(eq=False)
class _Question:
    target: int
    method: Method
    done: trio.Event = field(default_factory=trio.Event)
    results: StructReader | None = None
    error: RpcError | None = None

    def fail(self, error: RpcError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


@dataclass(frozen=True, slots=True)
class VatStatistics:
    exports: int
    imports: int
    questions: int
    answers: int


def _rpc_error(error: bus.CapbusError) -> RpcError:
    """What a kernel refusal of a call means to the caller."""
    if isinstance(error, bus.QuotaExceeded):
        return Overloaded(f"the kernel refused the call: {error.strerror}")
    if isinstance(error, bus.NodeDestroyed | bus.NoSuchHandle | bus.Disconnected):
        return Disconnected(f"the object is gone: {error.strerror}")
    return Failed(f"the kernel refused the call: {error.strerror}")


MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class Vat:
    """See the module docstring. Make one with :func:`open_vat`."""

    def __init__(
        self, peer: Peer, nursery: trio.Nursery, *, max_message_bytes: int = MAX_MESSAGE_BYTES
    ) -> None:
        self.peer = peer
        self.max_message_bytes = max_message_bytes
        """Calls and returns larger than this are refused (with an exception to the caller)."""
        self._nursery = nursery
        self._reply = 0
        self._next_question = 1
        self._questions: dict[int, _Question] = {}
        self._answers: dict[tuple[int, int], trio.CancelScope] = {}
        self._exports: dict[int, Server] = {}
        self._export_nodes: dict[int, int] = {}  # id(server) -> node
        self._export_busy: dict[int, int] = {}  # node -> sends in progress that carry it
        self._imports: weakref.WeakValueDictionary[int, Client] = weakref.WeakValueDictionary()
        self._import_refs: dict[int, int] = {}
        self._broken: set[int] = set()
        self._releases: dict[int, int] = {}
        self._release_wanted = trio.Event()
        self._clients: dict[int, type[Client]] = {}
        self._locals: weakref.WeakValueDictionary[int, Client] = weakref.WeakValueDictionary()
        self._generic = client_class(Interface(0, "Capability", None))

    async def _start(self) -> None:
        self._reply = (await self.peer.create_node()).id
        self._nursery.start_soon(self._receive_loop)
        self._nursery.start_soon(self._release_loop)

    def statistics(self) -> VatStatistics:
        return VatStatistics(len(self._exports), len(self._imports), len(self._questions), len(self._answers))

    # -- capabilities in and out -------------------------------------------------------------

    async def export(self, server: Server) -> Handle:
        """The node of ``server`` (made on first use), e.g. to hand to another peer."""
        return Handle(self.peer, await self._export(server))

    async def _export(self, server: Server) -> int:
        node = self._export_nodes.get(id(server))
        if node is None:
            node = (await self.peer.create_node()).id
            self._exports[node] = server
            self._export_nodes[id(server)] = node
        return node

    def client(self, handle: Handle | int, interface: Any) -> Client:
        """A client for a handle this peer holds (from a seed or a transfer); the client
        takes over one reference. ``interface``: ``Foo`` from :func:`capbus.load`, its
        ``Client`` class, or an :class:`Interface`."""
        handle_id = handle.id if isinstance(handle, Handle) else handle
        if handle_id in self._exports:
            raise ValueError("that handle is one of this vat's own exports")
        return self._import(handle_id, 1, _interface(interface))

    def _import(self, handle_id: int, references: int, interface: Interface | None) -> Client:
        client = self._imports.get(handle_id)
        if client is None:
            cls = self._generic if interface is None else self._client_class(interface)
            client = cls(self, handle_id)
            self._imports[handle_id] = client
            weakref.finalize(client, self._client_gone, handle_id)
        elif interface is not None and client.interface.schema is None:
            client.__class__ = self._client_class(interface)  # learnt from the field's type
        self._import_refs[handle_id] = self._import_refs.get(handle_id, 0) + references
        return client

    def local(self, server: Server) -> Client:
        """A client for an object of this vat: calls run it with remote-call semantics
        (params and results go through the same encoding), and passing it in a call passes
        the object's node. One per server, so identity holds."""
        client = self._locals.get(id(server))
        if client is None:
            client = self._client_class(server.interface)(self, 0, server)
            self._locals[id(server)] = client
        return client

    def _client_class(self, interface: Interface) -> type[Client]:
        cls = self._clients.get(interface.id)
        if cls is None:
            cls = self._clients[interface.id] = client_class(interface)
        return cls

    def _client_gone(self, handle_id: int) -> None:
        references = self._import_refs.pop(handle_id, 0)
        if references:
            self._release_later(handle_id, references)

    async def drop(self, client: Client) -> None:
        """Releases a client's handle now."""
        if self._imports.get(client.handle) is client:
            del self._imports[client.handle]
            self._client_gone(client.handle)
        await trio.lowlevel.checkpoint()

    def _release_later(self, handle_id: int, count: int) -> None:
        self._releases[handle_id] = self._releases.get(handle_id, 0) + count
        try:
            self._release_wanted.set()
        except RuntimeError:  # collected after the vat's trio run ended
            pass

    async def _release_loop(self) -> None:
        while True:
            await self._release_wanted.wait()
            self._release_wanted = trio.Event()
            pending, self._releases = self._releases, {}
            for handle_id, count in pending.items():
                try:
                    await self.peer.release(handle_id, count)
                except bus.CapbusError:
                    pass  # already gone with its peer

    async def _handles_for(self, caps: list[object]) -> list[int]:
        handles = []
        for value in caps:
            if value is REPLY:
                handles.append(self._reply)
            elif isinstance(value, Client):
                if value.vat is not self:
                    raise ValueError(f"{value!r} belongs to another vat")
                if value.server is not None:
                    handles.append(await self._export(value.server))
                    continue
                if value.handle in self._broken:
                    raise Disconnected(f"{value!r} is gone")
                handles.append(value.handle)
            elif isinstance(value, Server):
                handles.append(await self._export(value))
            else:
                raise TypeError(f"not a capability: {value!r}")
        return handles

    def _incoming_caps(self, message: Message) -> list[object]:
        """The values of a received message's capability table: our own servers for our
        nodes, clients for everything else (typed when a field reads them)."""
        values: list[object] = []
        for handle in message.handles:
            if not handle.is_valid:
                values.append(None)
            elif handle.id in self._exports:
                values.append(self.local(self._exports[handle.id]))
                self._release_later(handle.id, 1)  # receiving our own node added a reference
            elif handle.id == self._reply:
                values.append(None)
                self._release_later(handle.id, 1)
            else:
                values.append(self._import(handle.id, 1, None))
        return values

    def _typed(self, value: object, f: FieldLayout) -> object:
        if isinstance(value, Client) and value.interface.schema is None and f.interface_schema is not None:
            value.__class__ = self._client_class(interface_of(f.interface_schema))
        return value

    # -- calls out ---------------------------------------------------------------------------

    async def call(self, client: Client, method: Method, params: Mapping[str, Any]) -> StructReader:
        """Calls ``method`` on the object behind ``client``; returns the results view."""
        if client.server is not None:
            return await self._call_local(client.server, method, params)
        question_id = self._next_question
        self._next_question += 1
        encoded = encode_call(question_id, method, params)
        question = _Question(client.handle, method)
        self._questions[question_id] = question
        try:
            await self._send(client.handle, encoded, oneway=False)
            await question.done.wait()
        except trio.Cancelled:
            if question_id in self._questions:
                self._nursery.start_soon(self._finish, client.handle, question_id)
            raise
        finally:
            self._questions.pop(question_id, None)
        if question.error is not None:
            raise question.error
        assert question.results is not None
        return question.results

    def _loopback(self, caps: list[object]) -> list[object]:
        """A local message's capability values as a receiver would see them."""
        return [
            None if value is REPLY else self.local(value) if isinstance(value, Server) else value
            for value in caps
        ]

    async def _call_local(self, server: Server, method: Method, params: Mapping[str, Any]) -> StructReader:
        await trio.lowlevel.checkpoint()
        call = encode_call(0, method, params, oneway=True)
        received = decode(call.payload, self._loopback(call.caps), self._typed).call
        kwargs = as_kwargs(received.any_struct("params", method.params), method.params_layout)
        try:
            results = await server.dispatch(method, kwargs)
        except RpcError:
            raise
        except Exception as error:
            raise Failed(f"{type(error).__name__}: {error}") from error
        encoded = encode_results(0, method, results)
        returned = getattr(decode(encoded.payload, self._loopback(encoded.caps), self._typed), "return")
        view: StructReader = returned.any_struct("results", method.results)
        return view

    async def call_oneway(self, client: Client, method: Method, params: Mapping[str, Any]) -> None:
        """Calls with no return; errors on the way are dropped (as for any one-way call)."""
        if client.server is not None:
            self._nursery.start_soon(self._call_local, client.server, method, params)
            await trio.lowlevel.checkpoint()
            return
        question_id = self._next_question
        self._next_question += 1
        await self._send(client.handle, encode_call(question_id, method, params, oneway=True), oneway=True)

    async def _finish(self, target: int, question_id: int) -> None:
        try:
            await self._send(target, encode_finish(question_id), oneway=True)
        except (RpcError, bus.CapbusError):
            pass

    async def _send(self, destination: int, encoded: Encoded, *, oneway: bool) -> None:
        handles = await self._handles_for(encoded.caps)
        busy = [h for h in handles if h in self._exports]
        for node in busy:
            self._export_busy[node] = self._export_busy.get(node, 0) + 1
        try:
            if oneway:
                await self.peer.send_oneway(destination, encoded.payload, handles=handles)
            else:
                await self.peer.send(destination, encoded.payload, handles=handles)
        except bus.CapbusError as error:
            if isinstance(error, bus.NodeDestroyed):
                self._broken.add(destination)
            raise _rpc_error(error) from error
        finally:
            for node in busy:
                self._export_busy[node] -= 1

    # -- messages in -------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            message = await self.peer.recv()
            message.close_fds()
            if message.kind is MessageKind.DATA:
                self._data(message)
            elif message.kind is MessageKind.NODE_DESTROYED:
                self._node_destroyed(message.destination.id)
            elif message.kind is MessageKind.NODE_RELEASED:
                self._nursery.start_soon(self._maybe_retire, message.destination.id)

    def _data(self, message: Message) -> None:
        destination = message.destination.id
        caps = self._incoming_caps(message)
        payload = message.payload_view
        try:
            if len(payload) > self.max_message_bytes:
                limit = self.max_message_bytes
                raise CapWireError(f"a message of {len(payload)} bytes, over this vat's limit of {limit}")
            envelope = decode(payload, caps, self._typed)
            which = envelope.which()
        except Exception as error:  # noqa: BLE001 - hostile or broken input, never fatal
            self._refuse(destination, payload, caps, f"malformed message: {error}")
            return
        if destination == self._reply and which == "return":
            self._returned(getattr(envelope, "return"))
        elif destination in self._exports and which == "call":
            self._called(self._exports[destination], envelope.call)
        elif destination in self._exports and which == "finish":
            finish = envelope.finish
            reply = finish.replyTo
            if isinstance(reply, Client):
                scope = self._answers.get((reply.handle, finish.questionId))
                if scope is not None:
                    scope.cancel()
        elif which == "call":
            self._refuse(destination, payload, caps, "no object behind this node", Disconnected)

    def _refuse(
        self,
        destination: int,
        payload: memoryview,
        caps: list[object],
        reason: str,
        kind: type[RpcError] = Failed,
    ) -> None:
        """Answers a call that cannot be served, if the caller can be made out at all."""
        identity = call_identity(payload)
        if identity is None:
            return  # not even the call's header is readable: no one to tell
        question_id, reply_index = identity
        if reply_index is None or reply_index >= len(caps):
            return
        reply = caps[reply_index]
        if isinstance(reply, Client) and reply.server is None:
            encoded = encode_exception(question_id, kind(reason))
            # The task holds the client: collected, it would release the handle first.
            self._nursery.start_soon(self._send_quietly, reply, encoded)

    async def _send_quietly(self, destination: Client, encoded: Encoded) -> None:
        try:
            await self._send(destination.handle, encoded, oneway=True)
        except (RpcError, bus.CapbusError):
            pass  # the caller is gone

    def _returned(self, returned: StructReader) -> None:
        question = self._questions.get(returned.questionId)
        if question is None:
            return  # a caller that stopped waiting (it sent Finish)
        which = returned.which()
        if which == "results":
            try:
                question.results = returned.any_struct("results", question.method.results)
            except Exception as error:  # noqa: BLE001 - the callee sent something malformed
                question.fail(Failed(f"malformed results: {error}"))
                return
            question.done.set()
        elif which == "exception":
            question.fail(exception_of(returned))
        else:
            question.fail(Failed("the call was canceled"))

    def _called(self, server: Server, call: StructReader) -> None:
        reply = call.replyTo
        question_id = call.questionId
        method = server.interface.by_key.get((call.interfaceId, call.methodId))
        self._nursery.start_soon(self._serve, server, call, method, reply, question_id)

    async def _serve(
        self, server: Server, call: StructReader, method: Method | None, reply: object, question_id: int
    ) -> None:
        key = (reply.handle, question_id) if isinstance(reply, Client) else None
        encoded: Encoded | None = None
        with trio.CancelScope() as scope:
            if key is not None:
                self._answers[key] = scope
            try:
                if method is None:
                    wanted = f"method {call.methodId} of interface {call.interfaceId:#x}"
                    raise Unimplemented(f"{server.interface.name} has no {wanted}")
                if call.target.which() != "node":
                    raise Unimplemented("promise pipelining is not implemented yet")
                params = as_kwargs(call.any_struct("params", method.params), method.params_layout)
                results = await server.dispatch(method, params)
                encoded = encode_results(question_id, method, results)
            except RpcError as error:
                encoded = encode_exception(question_id, error)
            except Exception as error:  # noqa: BLE001 - the caller gets it as Failed
                encoded = encode_exception(question_id, Failed(f"{type(error).__name__}: {error}"))
            finally:
                if key is not None:
                    self._answers.pop(key, None)
        if scope.cancelled_caught or key is None or encoded is None:
            return  # one-way, or the caller sent Finish: no return
        assert isinstance(reply, Client)
        await self._send_quietly(reply, encoded)

    def _node_destroyed(self, handle_id: int) -> None:
        self._broken.add(handle_id)
        for question in list(self._questions.values()):
            if question.target == handle_id:
                question.fail(Disconnected("the object's node was destroyed (or its peer went away)"))
        if handle_id in self._exports:
            server = self._exports.pop(handle_id)
            self._export_nodes.pop(id(server), None)

    async def _maybe_retire(self, node: int) -> None:
        """NODE_RELEASED: drop the export unless a send of ours gave it out again since."""
        if node not in self._exports or self._export_busy.get(node):
            return
        try:
            state = await self.peer.handle_state(node)
        except bus.CapbusError:
            return
        if state.holders or self._export_busy.get(node) or node not in self._exports:
            return
        server = self._exports.pop(node)
        self._export_nodes.pop(id(server), None)
        self._export_busy.pop(node, None)
        try:
            await self.peer.destroy(node, release=True)
        except bus.CapbusError:
            pass


def _interface(interface: Any) -> Interface:
    if isinstance(interface, Interface):
        return interface
    found = getattr(interface, "interface", None)
    if isinstance(found, Interface):
        return found
    raise TypeError(f"not an interface: {interface!r}")


@asynccontextmanager
async def open_vat(peer: Peer, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> AsyncIterator[Vat]:
    """Runs the RPC endpoint of ``peer`` for the duration of the block."""
    async with trio.open_nursery() as nursery:
        vat = Vat(peer, nursery, max_message_bytes=max_message_bytes)
        await vat._start()
        try:
            yield vat
        finally:
            nursery.cancel_scope.cancel()
