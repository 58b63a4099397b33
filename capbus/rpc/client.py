"""Client objects: a capability held by a vat, whose methods are async calls.

A client wraps one handle of its vat's peer; the vat keeps one client per handle, so the
same object received twice is the same client (identity holds across calls). Calls go
through :meth:`Vat.call`; dropping or closing the client releases the handle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .interface import Interface, Method

if TYPE_CHECKING:
    from .server import Server
    from .vat import Vat


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
        for name in kwargs:
            if name in params:
                raise TypeError(f"{self.method.name}() got {name!r} twice")
        params.update(kwargs)
        return params

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await self.client.vat.call(self.client, self.method, self._params(args, kwargs))

    async def oneway(self, *args: Any, **kwargs: Any) -> None:
        await self.client.vat.call_oneway(self.client, self.method, self._params(args, kwargs))


class Client:
    """A reference to an object behind a node (see module docstring)."""

    interface: Interface

    def __init__(self, vat: Vat, handle: int, server: Server | None = None) -> None:
        self.vat = vat
        self.handle = handle
        self.server = server
        """The object itself when it lives in this vat (calls then run it directly, with the
        same semantics as a remote call); None for a remote object."""

    def __getattr__(self, name: str) -> BoundMethod:
        method = self.interface.methods.get(name)
        if method is None:
            raise AttributeError(f"{self.interface.name} has no method {name!r}")
        return BoundMethod(self, method)

    def __repr__(self) -> str:
        where = "local" if self.server is not None else f"{self.handle:#x}"
        return f"<{self.interface.name} client {where}>"

    async def aclose(self) -> None:
        """Gives up this capability now (instead of when the client is collected)."""
        await self.vat.drop(self)


def client_class(interface: Interface) -> type[Client]:
    return type(f"{interface.name}Client", (Client,), {"interface": interface})
