"""Server base classes: subclass ``Foo.Server`` and define its methods.

A handler gets the call's params as keyword arguments (capabilities as clients, structs as
views) and returns the results: a mapping of result fields, a single value when the method
has one result field, or None. Exceptions from :mod:`capbus.rpc.errors` reach the caller as
they are; anything else as :class:`~capbus.rpc.errors.Failed` with its message.

A handler is usually ``async def``: it runs in a task of its own, may await, and is
cancelled when its caller gives up. A handler defined with plain ``def`` runs inline in the
vat's receive loop, with no task: the quickest way to answer, for short work that never
blocks (nothing else of the vat runs meanwhile, and there is nothing to cancel).
"""

from __future__ import annotations

import inspect
import logging
import typing
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

from .errors import Failed, Unimplemented
from .interface import Interface, Method
from .naming import python_name

if typing.TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("capbus.rpc.server")
"""Where a handler's unexpected exception is logged, with its traceback (its caller gets it
as Failed, with only its type and message)."""

_IS_ASYNC: dict[object, bool] = {}
"""Handler function -> whether it is ``async def`` (inspect's answer takes microseconds, on
every call's path)."""
_VIEWS: dict[object, frozenset[str]] = {}
"""Handler function -> its params taken as memoryviews (Server._views)."""
_KEPT = 4096
T = TypeVar("T")


def _per_function(cache: dict[object, T], handler: Any, make: Callable[[Any], T]) -> T:
    """``make(function)`` for a handler's underlying function, worked out once per function
    (at most _KEPT kept: handlers assigned per instance would otherwise pile up)."""
    function = getattr(handler, "__func__", handler)
    known = cache.get(function)
    if known is None:
        if len(cache) >= _KEPT:
            cache.clear()
        known = cache[function] = make(function)
    return known


def _is_blob(field: Any) -> bool:
    """Whether a schema field (a pycapnp Field node) is a Data or Text slot."""
    return field.which() == "slot" and field.slot.type.which() in ("data", "text")


def _wants_view(function: object, name: str) -> bool:
    """Whether ``function`` annotates its parameter ``name`` with memoryview (alone or in
    a union; also as a string, under ``from __future__ import annotations``)."""
    try:
        annotation = inspect.get_annotations(function).get(name)  # type: ignore[arg-type]
    except TypeError:
        return False
    if isinstance(annotation, str):
        return "memoryview" in {part.strip() for part in annotation.split("|")}
    return annotation is memoryview or memoryview in typing.get_args(annotation)


class Server:
    """An object that can be exported: the vat gives it one node, reused while it is held."""

    interface: Interface

    def on_released(self) -> Awaitable[None] | None:
        """Called (``async def`` or plain) when no other peer holds this object's node any
        more: the last client let go, or its peer is gone. A subscription can stop itself
        here. Exported again later, it is called again at the next last release. Local
        clients (``vat.local``) do not count; a closing vat does not call it. Does nothing
        unless overridden; an exception is logged (``capbus.rpc.server``)."""
        return None

    def _handler(self, method: Method) -> Callable[..., Any]:
        """The bound method that implements ``method``; raises Unimplemented if none does."""
        handler = getattr(self, method.python_name, None)
        if handler is None:
            raise Unimplemented(f"{type(self).__name__} does not implement {method.python_name}")
        return handler  # type: ignore[no-any-return]

    def _runs_inline(self, method: Method) -> bool:
        """Whether ``method``'s handler is a plain function (see the module docstring)."""
        return self._inline_handler(method) is not None

    def _inline_handler(self, method: Method) -> Callable[..., Any] | None:
        """``method``'s handler if it is a plain function, else None (one lookup, for the
        receive loop's fast path). None too for an object that dispatches calls its own way
        (a Forwarder: an attribute named like a method is not its handler)."""
        if type(self)._dispatch is not Server._dispatch:
            return None
        handler = getattr(self, method.python_name, None)
        if handler is None:
            return None
        is_async = _per_function(_IS_ASYNC, handler, inspect.iscoroutinefunction)
        return None if is_async else handler

    def _views(self, method: Method) -> frozenset[str]:
        """The params of ``method`` its handler takes as memoryviews over the message (its
        Data and Text params annotated ``memoryview``, or a union with it such as
        ``bytes | memoryview``, which generated stubs' ``bytes`` allows): no copy of a
        large payload. Such a view holds the call's message (a large one: its mapped memfd)
        for as long as it is kept. By schema name."""
        handler = getattr(self, method.python_name, None)
        if handler is None:
            return frozenset()

        def views(function: Any) -> frozenset[str]:
            blobs = {name for name, f in method.params.fields.items() if _is_blob(f.proto)}
            return frozenset(n for n in blobs if _wants_view(function, python_name(n)))

        return _per_function(_VIEWS, handler, views)

    def _arguments(self, method: Method, params: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments a handler gets for a call's params, by their Python names
        (generated servers wrap struct params here too)."""
        return python_kwargs(method, params)

    def _results(self, method: Method, result: Any) -> Mapping[str, Any]:
        """A handler's return value as the mapping of result fields."""
        if result is None:
            return {}
        if isinstance(result, Mapping):
            spelled: dict[str, str] = method.python_results
            if spelled:  # (keys may be spelled as in Python: naming.py)
                result = {spelled.get(str(k), str(k)): v for k, v in result.items()}
            if method.single_struct and not all(k in method.results_layout.fields for k in result):
                # The value of the one result, a struct given as a mapping of its fields: a
                # mapping whose keys are all result names is the results themselves.
                return {method.result_names[0]: result}
            return cast("Mapping[str, Any]", result)
        if len(method.result_names) == 1:
            return {method.result_names[0]: result}
        if not method.result_names:
            raise TypeError(f"{method.python_name} has no results: return None, not {type(result).__name__}")
        names = ", ".join(method.result_names)
        raise TypeError(f"{method.python_name} must return a mapping of its results ({names})")

    async def _dispatch(self, method: Method, params: dict[str, Any]) -> Mapping[str, Any]:
        """Runs the handler of ``method`` (awaiting it if it is async) and returns its results."""
        result = self._handler(method)(**self._arguments(method, params))
        if inspect.isawaitable(result):
            result = await result
        return self._results(method, result)


class Forwarder(Server):
    """An object standing for a capability of another vat (a TCP connection's import passed
    on over the bus, a bus client passed over TCP): each call is made there, its results
    passed back. Kept while its holders hold it; going, it lets the capability go."""

    def __init__(self, target: Client) -> None:
        self.target = target
        self.interface = target.interface

    async def _dispatch(self, method: Method, params: dict[str, Any]) -> Mapping[str, Any]:
        results = await self.target.vat.call(self.target, method, params)
        return results.to_dict()

    def __repr__(self) -> str:
        return f"<forwarder to {self.target!r}>"


class Forwarders:
    """One Forwarder per client of another vat, while it is held (exported): the same
    client passed twice is the same object on this side."""

    def __init__(self) -> None:
        self._by_client: weakref.WeakValueDictionary[int, Forwarder] = weakref.WeakValueDictionary()

    def of(self, client: Client) -> Forwarder:
        forwarder = self._by_client.get(id(client))
        if forwarder is None or forwarder.target is not client:
            forwarder = self._by_client[id(client)] = Forwarder(client)
        return forwarder


def handler_failed(server: object, method: Method | None, error: Exception) -> Failed:
    """What a caller gets for an exception its handler raised that is not an RpcError (a
    bug, as far as the RPC layer can tell): logged here with its traceback first."""
    name, kind = type(server).__name__, type(error).__name__
    log.error("%s.%s raised %s", name, method.python_name if method else "?", kind, exc_info=error)
    return Failed(f"{type(error).__name__}: {error}")


def python_kwargs(method: Method, params: dict[str, Any]) -> dict[str, Any]:
    """Params by schema name as keyword arguments by Python name (naming.py)."""
    if not method.python_params:
        return params
    return {python_name(k): v for k, v in params.items()}


def server_class(interface: Interface) -> type[Server]:
    return type(f"{interface.name}Server", (Server,), {"interface": interface})
