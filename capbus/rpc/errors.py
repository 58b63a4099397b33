"""RPC exceptions, with Cap'n Proto's four types (rpc.capnp Exception.Type).

A server's exception reaches the caller as the same type with the server's message; any
other exception a handler raises becomes :class:`Failed`. A destroyed node or a dead peer
is :class:`Disconnected` on every pending and later call.
"""

from __future__ import annotations


class RpcError(Exception):
    """Base class; ``kind`` is the capnp type name."""

    kind = "failed"

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class Failed(RpcError):
    """The call failed (the server raised, or something broke that retrying will not fix)."""

    kind = "failed"


class Overloaded(RpcError):
    """The server or the kernel lacked resources (quota); retrying later may succeed."""

    kind = "overloaded"


class Disconnected(RpcError):
    """The object is gone: its node was destroyed or its peer went away."""

    kind = "disconnected"


class Unimplemented(RpcError):
    """The server does not implement this interface or method."""

    kind = "unimplemented"


BY_KIND: dict[str, type[RpcError]] = {
    cls.kind: cls for cls in (Failed, Overloaded, Disconnected, Unimplemented)
}


def from_kernel(error: Exception) -> RpcError:
    """What the kernel's refusal of a call (a :class:`capbus.CapbusError`) means to the
    caller: quota is Overloaded, a gone node or handle Disconnected, the rest Failed."""
    from .. import errors as bus

    reason = getattr(error, "strerror", None) or str(error)
    if isinstance(error, bus.QuotaExceeded):
        return Overloaded(f"the kernel refused the call: {reason}")
    if isinstance(error, bus.NodeDestroyed | bus.NoSuchHandle | bus.Disconnected):
        return Disconnected(f"the object is gone: {reason}")
    return Failed(f"the kernel refused the call: {reason}")


def kj_message(error: Exception) -> str:
    """A pycapnp (libcapnp) exception's message without the C++ stack dump after it."""
    return str(error).split("; stack:", 1)[0].split("\nstack:", 1)[0].strip()


def kj_reason(error: Exception) -> str:
    """Just why libcapnp refused (its message past the ``file:line: failed:`` prefix)."""
    return kj_message(error).rpartition(" failed: ")[2]
