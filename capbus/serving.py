"""Serving an object at an address, and reaching it: :func:`serve` and :func:`connect`.

Cap'n Proto's programs meet through a bootstrap capability at an address (C++
``EzRpcServer(bootstrap, address)`` / ``EzRpcClient(address).getMain<T>()``); capbus's do the
same. ``unix:PATH`` meets over the bus: the service listens on PATH, a stream socket whose
file mode decides who may connect, and hands each program that connects (with SCM_RIGHTS)
the connection of a kernel peer made for it, whose seed holds a handle to the served
object's node. From then on that program is a peer like any other: its calls go through
the kernel, the listening socket is done with it, and it holds that one capability and
nothing else. The service's kernel is its own (embedded, the default), one it runs, or a
kernel daemon (``kernel="PATH"``); either makes the peer (``Peer.create_peer``).

On the listening socket a service writes one message per connection: ``capbus 1`` with the
peer's connection attached, or ``capbus error: WHY`` without; then it closes. Nothing else
is read or written there, so there is nothing there to attack but the accept itself.

Accounting: the kernel charges each such peer to the service's user (the user whose
process asked for it), so ``Limits.peers_per_user`` and the per-user quotas of the
service's kernel bound what the programs connecting to it may take together.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from collections.abc import AsyncIterator, Generator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import trio

from .addresses import Address, TcpAddress, UnixAddress, parse
from .errors import CapbusError
from .peer import Peer, _parse_fds
from .peer import connect as connect_peer
from .socketfile import PathInUse, SocketPath

if TYPE_CHECKING:
    from .kernel import Kernel
    from .rpc.client import Client, DynamicClient
    from .rpc.server import Server
    from .rpc.vat import Vat

ClientT = TypeVar("ClientT", bound="Client")

SEED = b"capbus.serve "
"""A served peer's seed payload starts so; the served interface's id (decimal) follows."""
GREETING = b"capbus 1"
"""What a service writes, with the peer's connection attached, to each program that connects."""
REFUSAL = b"capbus error: "
HANDSHAKE_SECONDS = 10.0
"""How long a service gives one connection's handshake (making its peer, writing it), and a
connecting program the service's answer."""
MAX_HANDSHAKES = 64
"""Connections a service answers at once; more wait in the listen backlog."""


class ServeError(Exception):
    """A service could not start, or a program could not reach one, at an address (the
    message says which and why)."""


@dataclass
class Service:
    """A running :func:`serve`: where, and what it runs on."""

    address: Address
    vat: Vat
    """The vat serving the object (to export more objects, or read its statistics)."""
    peer: Peer
    kernel: Kernel | None
    """The kernel in this process the service runs on (None on a kernel daemon)."""
    connections: int = 0
    """Programs handed a peer so far."""
    seed: bytes = b""
    """The payload of each program's seed: ``capbus.serve`` and the served interface's id,
    so that a client that names no interface still gets its class."""


@asynccontextmanager
async def serve(
    obj: Server,
    address: str | Address,
    *,
    kernel: Kernel | str | os.PathLike[str] | None = None,
    mode: int = 0o600,
    **vat_options: Any,
) -> AsyncIterator[Service]:
    """Serves ``obj`` as the bootstrap capability at ``address`` for the duration of the
    block. ``unix:PATH``: a socket at PATH with file ``mode`` (who may connect); a socket
    left there by a killed service is replaced, a path a live one serves is refused.
    ``kernel``: a :class:`~capbus.Kernel` to use, a kernel daemon's socket path, or None for
    a kernel embedded in this process for the service's lifetime. ``vat_options`` go to
    :func:`~capbus.rpc.vat.open_vat` (its limits)."""
    where = parse(address)
    if isinstance(where, TcpAddress):
        raise ServeError(f"{where}: serving over TCP is not built yet (unix:PATH serves over the bus)")
    from .kernel import Kernel, open_kernel
    from .rpc.vat import open_vat

    async with AsyncExitStack() as stack:
        listener = _listen(where.path, mode)  # (first: a path in use is said before anything starts)
        stack.callback(listener.release)
        stack.callback(listener.socket.close)
        own: Kernel | None = None
        if kernel is None:
            own = await stack.enter_async_context(open_kernel())
            peer = await own.connect()
        elif isinstance(kernel, Kernel):
            own, peer = kernel, await kernel.connect()
        else:
            peer = await connect_peer(kernel)
        await stack.enter_async_context(peer)
        vat = await stack.enter_async_context(open_vat(peer, **vat_options))
        node = await vat.export(obj, keep=True)  # (programs come and go; it stays)
        interface_id = obj.interface.id if getattr(obj, "interface", None) is not None else 0
        service = Service(where, vat, peer, own, seed=SEED + str(interface_id).encode())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_accept, listener.socket, service, node)
            try:
                yield service
            finally:
                nursery.cancel_scope.cancel()


@dataclass
class _Listener:
    socket: trio.socket.SocketType
    path: SocketPath

    def release(self) -> None:
        self.path.release()


def _listen(path: str, mode: int) -> _Listener:
    """A stream socket listening at ``path`` with file ``mode`` from the instant it exists."""
    from ._kernel import lib

    claim = SocketPath(path)
    try:
        claim.claim()
    except PathInUse as error:
        raise ServeError(f"cannot serve: {error.strerror}") from None
    except OSError as error:
        raise ServeError(f"cannot serve at unix:{path}: {error.strerror or error}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        result = lib.capbus_bind_unix(sock.fileno(), path.encode(), mode)
        if result < 0:
            raise ServeError(f"cannot serve at unix:{path}: {os.strerror(-result)}")
        claim.adopt()
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        claim.release()
        raise
    return _Listener(trio.socket.from_stdlib_socket(sock), claim)


async def _accept(listener: trio.socket.SocketType, service: Service, node: Any) -> None:
    limit = trio.CapacityLimiter(MAX_HANDSHAKES)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                connection, _ = await listener.accept()
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await trio.sleep(0.1)  # (out of fds: let handshakes in flight end first)
                    continue
                raise
            await limit.acquire_on_behalf_of(connection)
            nursery.start_soon(_hand_over, connection, service, node, limit)


async def _hand_over(
    connection: trio.socket.SocketType, service: Service, node: Any, limit: trio.CapacityLimiter
) -> None:
    """Makes the connecting program's peer, its seed holding ``node``, and writes it."""
    try:
        with connection, trio.move_on_after(HANDSHAKE_SECONDS):
            try:
                made = await service.peer.create_peer(service.seed, handles=[node])
            except CapbusError as error:
                await _send_quietly(connection, REFUSAL + str(error).encode()[:512])
                return
            with made:
                fds = array.array("i", [made.fileno()])
                try:
                    await connection.sendmsg([GREETING], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                except OSError:
                    return  # (the program left before its peer came: the peer ends with `made`)
            service.connections += 1
    finally:
        limit.release_on_behalf_of(connection)


async def _send_quietly(connection: trio.socket.SocketType, data: bytes) -> None:
    try:
        await connection.send(data)
    except OSError:
        pass


@overload
def connect(
    address: str | Address, interface: type[ClientT], *, timeout: float = ..., **vat_options: Any
) -> Connection[ClientT]: ...
@overload
def connect(
    address: str | Address, interface: Any = None, *, timeout: float = ..., **vat_options: Any
) -> Connection[DynamicClient]: ...
def connect(
    address: str | Address, interface: Any = None, *, timeout: float = HANDSHAKE_SECONDS, **vat_options: Any
) -> Connection[Any]:
    """A client of the bootstrap object served at ``address``, for the duration of an
    ``async with`` block: ``async with capbus.connect("unix:/run/calc", calc_capnp.Calculator)
    as calculator:``. ``interface``: a generated client class (the client is typed as it),
    ``Foo`` from ``capbus.load``, or None (an untyped client). ``timeout``: seconds to
    wait for the service to hand over the capability (ServeError after). ``vat_options`` go
    to :func:`~capbus.rpc.vat.open_vat`. (A new peer on a kernel daemon, without RPC, is
    :func:`capbus.connect_peer`.)"""
    return Connection(parse(address), interface, vat_options, timeout)


class Connection(Generic[ClientT]):
    """What :func:`connect` returns: ``async with`` it for the client."""

    def __init__(self, address: Address, interface: Any, vat_options: dict[str, Any], timeout: float) -> None:
        self.address, self._interface, self._vat_options = address, interface, vat_options
        self._timeout = timeout
        self._stack: AsyncExitStack | None = None

    def __await__(self) -> Generator[Any, None, Any]:
        raise TypeError(
            "capbus.connect(address, Interface) is used with `async with` (it gives a client);"
            " a peer on a kernel daemon is `await capbus.connect_peer(PATH)`"
        )

    async def __aenter__(self) -> ClientT:
        if self._stack is not None:
            raise RuntimeError("this connection is open already")
        if isinstance(self.address, TcpAddress):
            raise ServeError(f"{self.address}: reaching a service over TCP is not built yet")
        from .rpc.vat import open_vat

        stack = AsyncExitStack()
        try:
            peer = await stack.enter_async_context(await _peer_at(self.address, self._timeout))
            vat = await stack.enter_async_context(open_vat(peer, **self._vat_options))
            seed = await peer.take_seed()
            if len(seed.handles) != 1:
                raise ServeError(
                    f"{self.address}: the service handed over {len(seed.handles)} handles, not 1"
                )
            client = vat.client(seed.handles[0], _interface_for(self.address, self._interface, seed.payload))
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return client  # type: ignore[return-value]

    async def __aexit__(self, *exc_info: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()


def _interface_for(address: Address, wanted: Any, seed: bytes) -> Any:
    """The interface to give the bootstrap client: ``wanted`` (checked against what the
    service says it serves, where this process knows that interface: it may extend
    ``wanted`` in ways only the service knows), else the served one if this process knows
    it, else an interface of no methods."""
    from .rpc.interface import Interface, known_interface
    from .rpc.vat import _interface

    served_id = int(seed[len(SEED) :]) if seed.startswith(SEED) and seed[len(SEED) :].isdigit() else 0
    served = known_interface(served_id) if served_id else None
    if wanted is None:
        return served if served is not None else Interface(served_id, "Capability", None)
    interface = _interface(wanted)
    if served is not None and not served.implements(interface.id):
        raise ServeError(f"{address} serves a {served.name}, not a {interface.name}")
    return wanted


async def _peer_at(address: UnixAddress, timeout: float) -> Peer:
    """The peer a service at ``address`` hands over (see the module docstring)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            # (a blocking connect on a thread, as capbus.connect_peer does: a non-blocking
            # one to a full backlog looks connected and is not)
            await trio.to_thread.run_sync(sock.connect, address.path)
        except OSError as error:
            hint = {
                errno.ENOENT: "nothing is served there (start the service first)",
                errno.ECONNREFUSED: "nothing accepts there (a service that is gone left the file)",
                errno.EACCES: "this user may not connect (the socket's file mode says who may)",
            }.get(error.errno or 0, error.strerror or "")
            raise ServeError(f"cannot connect to {address}: {hint}") from None
        stream = trio.socket.from_stdlib_socket(sock)
        with trio.fail_after(timeout):
            data, ancillary, _, _ = await stream.recvmsg(1024, socket.CMSG_SPACE(4 * 4))
        fds = _parse_fds(ancillary)
        if data != GREETING or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            if data.startswith(REFUSAL):
                reason = data[len(REFUSAL) :].decode(errors="replace")
                raise ServeError(f"{address}: the service refused: {reason}")
            raise ServeError(f"{address}: not a capbus service (it said {data[:40]!r})")
        try:
            return Peer(socket.socket(fileno=fds[0]))
        except BaseException:
            os.close(fds[0])
            raise
    except trio.TooSlowError:
        raise ServeError(f"{address}: the service did not answer in {timeout:g} s") from None
    finally:
        sock.close()
