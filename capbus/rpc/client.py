"""Client objects: a capability held by a vat, whose methods are async calls.

A client wraps one handle of its vat's peer; the vat keeps one client per handle, so the
same object received twice is the same client (identity holds across calls). Calls go
through :meth:`Vat.call`; dropping or closing the client releases the handle.
"""

from __future__ import annotations

import weakref
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from .errors import Failed
from .interface import Interface, Method, interface_of
from .layout import FieldKind, FieldLayout, StructLayout

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Protocol

    from .server import Server
    from .structs import StructReader

    class Vat(Protocol):
        """What clients and promises use of the vat that holds them: a bus vat
        (capbus.rpc.vat.Vat) or a connection's (capbus.rpc.streamvat.StreamVat)."""

        engine: Any

        async def call(self, client: Client, method: Method, params: Mapping[str, Any]) -> StructReader: ...
        async def send_call(self, client: Client, method: Method, params: Mapping[str, Any]) -> Promise: ...
        async def call_oneway(self, client: Client, method: Method, params: Mapping[str, Any]) -> None: ...
        async def stream(self, client: Client, method: Method, params: Mapping[str, Any]) -> None: ...
        async def drop(self, client: Client) -> None: ...
        def _promise_gone(self, target: Client, question_id: int, done: Any = None) -> None: ...


class BoundMethod:
    """``client.method``: awaitable call, or ``.oneway(...)`` for a call with no return."""

    __slots__ = ("client", "method")

    def __init__(self, client: Client, method: Method) -> None:
        self.client, self.method = client, method

    def _params(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        names = self.method.param_names
        if len(args) > len(names):
            raise TypeError(f"{self.method.name}() takes {len(names)} arguments, {len(args)} given")
        params = dict(zip(names, args, strict=False))
        spelled = self.method.python_params
        for name, value in kwargs.items():
            name = spelled.get(name, name)  # (a Python spelling: naming.py)
            if name in params:
                raise TypeError(f"{self.method.name}() got {name!r} twice")
            params[name] = value
        return params

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        params = self._params(args, kwargs)
        if self.method.streaming:
            return await self.client.vat.stream(self.client, self.method, params)
        return await self.client.vat.call(self.client, self.method, params)

    async def oneway(self, *args: Any, **kwargs: Any) -> None:
        await self.client.vat.call_oneway(self.client, self.method, self._params(args, kwargs))

    async def send(self, *args: Any, **kwargs: Any) -> Promise:
        """Sends the call and returns a :class:`Promise` without waiting for the results."""
        return await self.client.vat.send_call(self.client, self.method, self._params(args, kwargs))


class Client:
    """A reference to an object behind a node (see module docstring)."""

    interface: Interface

    def __init__(
        self,
        vat: Vat,
        handle: int,
        server: Server | None = None,
        pipeline: tuple[Promise, tuple[int, ...]] | None = None,
    ) -> None:
        self.vat = vat
        self.handle = handle
        self.server = server
        """The object itself when it lives in this vat (calls then run it directly, with the
        same semantics as a remote call); None for a remote object."""
        self.pipeline = pipeline
        """For a capability in results that have not arrived (promise pipelining): the
        promise and the pointer fields that lead to it; calls then go to the promise's
        callee, which runs them once the results exist. None for any other client."""

    if not TYPE_CHECKING:  # (so that mypy flags a typed client's unknown method: DynamicClient)

        def __getattr__(self, name: str) -> BoundMethod:
            return self._method_named(name)

    def _method_named(self, name: str) -> BoundMethod:
        """Method ``name`` (as Python spells it) of this client's interface, bound to it."""
        method = self.interface.methods.get(name)
        if method is not None and method.python_name != name:
            method = None  # (a schema name Python spells otherwise: naming.py)
        elif method is None and name.endswith("_"):
            method = self.interface.methods.get(name[:-1])
            if method is not None and method.python_name != name:
                method = None
        if method is None:
            hint = ""
            if name.startswith("__"):
                pass  # Python probing for protocols (copy, pickle...): keep the plain error
            elif not self.interface.methods:  # a capability whose interface is unknown here
                hint = (
                    f" (this client's interface, {self.interface.name}, is unknown here: name it, e.g."
                    " vat.client(handle, Interface), boot.get(name, Interface) or"
                    " child.capability(name, Interface))"
                )
            raise AttributeError(f"{self.interface.name} has no method {name!r}{hint}")
        return BoundMethod(self, method)

    def __repr__(self) -> str:
        if self.pipeline is not None:
            where = f"promised by question {self.pipeline[0].question_id}"
        else:
            where = "local" if self.server is not None else f"{self.handle:#x}"
        return f"<{self.interface.name} client {where}>"

    async def aclose(self) -> None:
        """Gives up this capability now (instead of when the client is collected)."""
        await self.vat.drop(self)


if TYPE_CHECKING:

    class DynamicClient(Client):
        """A client whose methods are looked up by name when called (``capbus.load``'s, or
        one given an :class:`Interface`): to mypy, any attribute is a method. Generated
        client classes are not: calling a method their interface lacks fails mypy."""

        def __getattr__(self, name: str) -> BoundMethod: ...

else:
    DynamicClient = Client


class Promise:
    """The results of a call that was sent (``await client.method.send(...)``).

    ``await promise`` gives the results. Before they arrive, ``promise.field`` names a
    capability in them (``promise.a.b`` through struct fields) and its methods can be
    called already: the call goes to the callee, which runs it once the results exist, so
    a chain of calls costs one round trip (promise pipelining). When the promise is
    collected the callee is told it may drop the results it kept.
    """

    def __init__(
        self, vat: Vat, client: Client, method: Method, question_id: int, done: tuple[Any, list[Any]] | None
    ) -> None:
        self.vat, self.client, self.method, self.question_id = vat, client, method, question_id
        self.base: Promise | None = None
        """For a call sent on a promised capability: the promise it is pipelined on, kept
        alive (dropping it would tell the callee to let that call go)."""
        self._done = done
        self._results: Any = None
        self._rerouted: Any = None
        """After a redirect (rpc.capnp's Return.redirect): set once the call was sent again
        to the capability itself (``_successor``), or that failed (``_done`` then says why)."""
        self._successor: Promise | None = None
        self._canceled = False
        # (``done`` tells this question from a later one given the same id)
        self._finalizer = weakref.finalize(self, vat._promise_gone, client, question_id, done)
        if done is None:
            self._finalizer.detach()  # (a local call's: nothing to tell anyone)

    @classmethod
    def resolved(cls, vat: Vat, client: Client, method: Method, results: Any) -> Promise:
        """A promise of a local call, already answered."""
        promise = cls(vat, client, method, 0, None)
        promise._results = results
        return promise

    def cancel(self) -> None:
        """Gives the call up (its callee's handler is cancelled: rpc.capnp's Finish), unless
        it has been answered; awaiting the promise then raises Failed. Also what a cancelled
        ``await promise`` does, however long the promise object itself lives on."""
        if self._finalizer.alive and not self._answered:
            self._canceled = True
            self._finalizer()

    async def _wait(self) -> Any:
        try:
            return await self._wait_for_results()
        except BaseException:  # (cancelled, or given up some other way: the call goes too)
            self.cancel()
            raise

    async def _wait_for_results(self) -> Any:
        if self._canceled:
            raise Failed("the call was canceled by its caller (a cancelled await of its promise)")
        promise = self
        while promise._done is not None and promise._results is None:
            event, box = promise._done
            await event.wait()
            returned = box[0]
            if returned.redirect:
                if promise._rerouted is None:
                    raise Failed("the callee redirected this call, and it could not be sent again")
                await promise._rerouted.wait()
                promise = promise._successor or promise  # (none: _done now holds the failure)
                continue
            if returned.error is not None:
                raise returned.error
            promise._results = returned.results
        self._results = promise._results
        return self._results

    def _latest(self) -> Promise:
        """This promise, or the one its call was sent again as after a redirect (and so on):
        where calls pipelined on it go now."""
        promise = self
        while promise._successor is not None:
            promise = promise._successor
        return promise

    @property
    def _answered(self) -> bool:
        """Its results or failure are here (not just a redirect)."""
        done = self._done
        return done is None or (done[0].is_set() and not done[1][0].redirect)

    async def _routed(self) -> Promise:
        """Once a call pipelined on this promise was redirected: this promise once answered,
        or the one its own call was sent again as after a redirect of its own (once that is
        sent, and answered if it already is: else calls can be pipelined on it there)."""
        promise = self
        while not promise._answered:
            event, box = promise._done  # type: ignore[misc]
            if promise is not self and not event.is_set():
                return promise  # pending where it was sent again
            await event.wait()
            if box[0].redirect:
                if promise._rerouted is None:
                    break  # (awaiting it fails)
                await promise._rerouted.wait()
                promise = promise._successor or promise
        return promise

    def _adopt(self, successor: Promise) -> None:
        """Its call, redirected, was sent again as ``successor``."""
        self._successor = successor
        self._rerouted.set()

    def _fail(self, done: tuple[Any, list[Any]]) -> None:
        """Its call, redirected, could not be sent again: ``done`` is set, with why."""
        self._done = done
        self._rerouted.set()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._wait().__await__()

    def __getattr__(self, name: str) -> Any:
        return pipeline_field(self, (), self.method.results_layout, name)


def pipeline_field(promise: Promise, transform: tuple[int, ...], layout: StructLayout, name: str) -> Any:
    """What ``promise`` names at result field ``name`` (its schema or Python spelling) under
    the pointer fields ``transform``: a pipelined client, or a promised struct."""
    f = layout.fields.get(name) or layout.fields.get(layout.python_names.get(name, ""))
    if f is None:
        raise AttributeError(f"{layout.name} has no field {name!r}")
    if f.kind is FieldKind.STRUCT:
        assert f.nested is not None
        return _PipelinedStruct(promise, (*transform, f.slot), f.nested)
    if f.kind is FieldKind.CAPABILITY:
        if promise._done is None:  # a local call: the results are here already
            return getattr(promise._results, name) if not transform else None
        cls = promise.vat.engine.client_class(interface_of(f.interface_schema))
        return cls(promise.vat, promise.client.handle, pipeline=(promise, (*transform, f.slot)))
    raise AttributeError(f"{name} is not a capability or struct: only those can be pipelined on")


class _PipelinedStruct:
    def __init__(self, promise: Promise, transform: tuple[int, ...], layout: StructLayout) -> None:
        self._promise, self._transform, self._layout = promise, transform, layout

    def __getattr__(self, name: str) -> Any:
        return pipeline_field(self._promise, self._transform, self._layout, name)


def client_class(interface: Interface) -> type[Client]:
    return type(f"{interface.name}Client", (Client,), {"interface": interface})


class ClientClasses:
    """The class of clients of each interface a vat meets: the generated one if a stub
    module registered it, else a dynamic one (made once per interface)."""

    def __init__(self) -> None:
        self._classes: dict[int, type[Client]] = {}

    def client_class(self, interface: Interface) -> type[Client]:
        cls = self._classes.get(id(interface))
        if cls is None:
            from .stubs import registered

            generated = registered(interface.id)
            if generated is not None and generated.interface is not interface:
                # A brand of a generic interface (Box(Ping)): the generated class, with the
                # brand's methods (whose layouts know what the parameters are bound to).
                generated = type(generated.__name__, (generated,), {"interface": interface})
            cls = self._classes[id(interface)] = generated or client_class(interface)
        return cls

    def typed(self, value: object, field: FieldLayout) -> object:
        """Gives a client read from a field that field's interface (a capability arrives
        as a client of no known interface until a field of a struct names one)."""
        if (
            isinstance(value, Client)
            and value.interface.schema is None
            and field.interface_schema is not None
        ):
            value.__class__ = self.client_class(interface_of(field.interface_schema))
        return value

    def local_client(
        self, vat: Any, server: Server, made: weakref.WeakValueDictionary[int, Client]
    ) -> Client:
        """The client of ``vat`` for its own object ``server``: one while it is held (kept in
        ``made``, by the object's id), so that the same object passed twice is one client."""
        client = made.get(id(server))
        if client is None:
            client = made[id(server)] = self.client_class(server.interface)(vat, 0, server)
        return client
