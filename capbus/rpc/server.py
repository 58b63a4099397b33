"""Server base classes: subclass ``Foo.Server`` and define its methods as ``async def``.

A handler gets the call's params as keyword arguments (capabilities as clients, structs as
views) and returns the results: a mapping of result fields, a single value when the method
has one result field, or None. Exceptions from :mod:`capbus.rpc.errors` reach the caller as
they are; anything else as :class:`~capbus.rpc.errors.Failed` with its message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import Unimplemented
from .interface import Interface, Method


class Server:
    """An object that can be exported: the vat gives it one node, reused while it is held."""

    interface: Interface

    async def dispatch(self, method: Method, params: dict[str, Any]) -> Mapping[str, Any]:
        handler = getattr(self, method.name, None)
        if handler is None:
            raise Unimplemented(f"{type(self).__name__} does not implement {method.name}")
        result = await handler(**params)
        if result is None:
            return {}
        if isinstance(result, Mapping):
            return result
        if len(method.result_names) == 1:
            return {method.result_names[0]: result}
        raise TypeError(f"{method.name} must return a mapping of {', '.join(method.result_names)}")


def server_class(interface: Interface) -> type[Server]:
    return type(f"{interface.name}Server", (Server,), {"interface": interface})
