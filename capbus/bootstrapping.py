"""The child's side of capbus.spawn: its capabilities, by name, and a way to hand back its own.

A Python target started by :func:`capbus.spawn` is called with a :class:`Bootstrap`; a
program started from an argv gets the same with ``async with capbus.bootstrap() as boot``.
Either way the child's sandbox is already up: the capabilities here are all it holds.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast, overload

from ._child import FD_VARIABLE, REPORT_VARIABLE
from ._resources import schema_directory
from .peer import Peer
from .rpc.client import Client, DynamicClient
from .rpc.fds import FileDescriptor
from .rpc.interface import Interface, load
from .rpc.server import Server
from .rpc.vat import Vat, open_vat

SPAWN: Any = load(os.path.join(schema_directory(), "capbus", "spawn.capnp"))
"""schemas/capbus/spawn.capnp: Launcher, Entry, Anything."""
ANYTHING_ID: int = SPAWN.Anything.interface.id

ClientT = TypeVar("ClientT", bound=Client)


def entries(capabilities: Mapping[str, object]) -> list[dict[str, Any]]:
    """Named capabilities (clients, servers, file descriptors) as spawn.capnp Entry values."""
    out: list[dict[str, Any]] = []
    for name, value in capabilities.items():
        if isinstance(value, Client | Server):
            out.append({"name": name, "interfaceId": value.interface.id, "capability": value})
        elif isinstance(value, int) or hasattr(value, "fileno"):
            out.append({"name": name, "fd": value})
        else:
            raise TypeError(f"{name}: not a capability or a file descriptor: {value!r}")
    return out


def named(received: Any) -> dict[str, DynamicClient | FileDescriptor]:
    """Entry views as name -> client (of the entry's interface when its class is known
    here) or file descriptor."""
    out: dict[str, DynamicClient | FileDescriptor] = {}
    for entry in received:
        if entry.which() == "fd":
            out[entry.name] = entry.fd
            continue
        client = entry.capability
        if not isinstance(client, Client):
            raise ValueError(f"entry {entry.name!r} holds no capability")
        _retype(client, entry.interfaceId)
        out[entry.name] = cast(DynamicClient, client)
    return out


def _retype(client: Client, interface_id: int) -> None:
    from .rpc.stubs import registered

    if client.interface.id not in (0, ANYTHING_ID) or client.server is not None:
        return  # it already has its real class (an object of this vat, say)
    cls = registered(interface_id)
    if cls is not None:
        client.__class__ = cls


def _as(client: Client, interface: Any) -> Client:
    """``client`` with the class of ``interface`` (generated class, capbus.load type, or
    Interface), checked against what the client is known to implement."""
    from .rpc.vat import _interface

    wanted: Interface = _interface(interface)
    current = client.interface
    if current.id not in (0, ANYTHING_ID) and not current.implements(wanted.id):
        raise TypeError(f"{client!r} is a {current.name}, not a {wanted.name}")
    if current.id != wanted.id:
        client.__class__ = client.vat.engine.client_class(wanted)
    return client


class Bootstrap:
    """What a spawned child starts with."""

    def __init__(
        self,
        peer: Peer,
        vat: Vat,
        launcher: DynamicClient,
        capabilities: dict[str, DynamicClient | FileDescriptor],
        sandbox_report: dict[str, str],
    ) -> None:
        self.peer = peer
        self.vat = vat
        self.capabilities = capabilities
        """name -> client or :class:`FileDescriptor`, as the parent passed them."""
        self.sandbox_report = sandbox_report
        """layer -> "active ...", "off" or "unavailable: ..." (capbus.sandbox)."""
        self._launcher = launcher

    @overload
    def get(self, name: str) -> DynamicClient | FileDescriptor: ...

    @overload
    def get(self, name: str, interface: type[ClientT]) -> ClientT: ...

    @overload
    def get(self, name: str, interface: Any) -> Any: ...

    def get(self, name: str, interface: Any = None) -> Any:
        """The capability ``name``; with ``interface`` (a generated client class, a
        ``capbus.load`` interface), as a client of that interface."""
        try:
            value = self.capabilities[name]
        except KeyError:
            given = ", ".join(sorted(self.capabilities)) or "none"
            raise KeyError(f"no capability {name!r} was passed (given: {given})") from None
        if interface is None:
            return value
        if not isinstance(value, Client):
            raise TypeError(f"{name!r} is a file descriptor, not a capability")
        return _as(value, interface)

    def fd(self, name: str) -> FileDescriptor:
        """The file descriptor passed as ``name``."""
        value = self.get(name)
        if not isinstance(value, FileDescriptor):
            raise TypeError(f"{name!r} is a capability, not a file descriptor")
        return value

    async def offer(self, **capabilities: Server | Client | int) -> None:
        """Hands capabilities to the parent, which gets them with ``child.capability(name)``."""
        await self._launcher.offer(capabilities=entries(capabilities))


@asynccontextmanager
async def connect(fd: int, report: Mapping[str, str]) -> AsyncIterator[Bootstrap]:
    """The child's RPC endpoint on its kernel connection ``fd``: takes the seed, sends the
    sandbox report to the parent's launcher and receives the capabilities."""
    async with Peer.from_socket(fd) as peer, open_vat(peer) as vat:
        seed = await peer.take_seed()
        if len(seed.handles) != 1:
            raise RuntimeError(f"a spawned child's seed holds one handle, not {len(seed.handles)}")
        launcher = vat.client(seed.handles[0], SPAWN.Launcher)
        started = await launcher.start(report=json.dumps(dict(report)))
        yield Bootstrap(peer, vat, launcher, named(started.capabilities), dict(report))


@asynccontextmanager
async def bootstrap() -> AsyncIterator[Bootstrap]:
    """In a program capbus.spawn started from an argv: its capabilities (the connection and
    the sandbox report come in the environment the spawn set up)."""
    fd = os.environ.get(FD_VARIABLE)
    if fd is None:
        raise RuntimeError(f"not started by capbus.spawn (no {FD_VARIABLE} in the environment)")
    report = json.loads(os.environ.get(REPORT_VARIABLE, "{}"))
    async with connect(int(fd), report) as boot:
        yield boot


__all__ = ["FD_VARIABLE", "REPORT_VARIABLE", "Bootstrap", "bootstrap", "connect"]
