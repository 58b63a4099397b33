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
peer's connection attached, or ``capbus error: WHY`` without; the program writes back
``taken`` once it has the peer's seed, and both close. Nothing else is read there.

Accounting: on a kernel of the service's process, each peer is charged to the connecting
program's user (SO_PEERCRED), so one user's programs cannot use up the service's quotas;
a kernel daemon charges it to the service's user, and MAX_PENDING_PER_USER bounds how many
peers one user's programs may pin there by never taking them.
"""

from __future__ import annotations

import array
import errno
import functools
import logging
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Generator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import trio

from .addresses import Address, TcpAddress, UnixAddress, parse
from .errors import CapbusError
from .peer import Message, Peer, _parse_fds
from .peer import connect as connect_peer
from .socketfile import PathInUse, SocketPath

if TYPE_CHECKING:
    from .kernel import Kernel
    from .rpc.client import Client, DynamicClient
    from .rpc.server import Server
    from .rpc.vat import Vat

ClientT = TypeVar("ClientT", bound="Client")
log = logging.getLogger("capbus.serving")

SEED = b"capbus.serve "
"""A served peer's seed payload starts so; the served interface's id (decimal) follows."""
GREETING = b"capbus 1"
"""What a service writes, with the peer's connection attached, to each program that connects."""
REFUSAL = b"capbus error: "
TAKEN = b"taken"
"""What a connecting program writes back once it has taken its peer."""
HANDSHAKE_SECONDS = 10.0
"""How long a service gives one connection's handshake (making its peer, writing it), and a
connecting program the service's answer."""
MAX_PENDING_PER_USER = 32
"""Programs of one user a service hands a peer at once (until each has taken its peer, or
gone): past that, that user's connections are refused as busy (a connecting program tries
again within its timeout), and other users' are not."""
BUSY = "busy: "


class ServeError(Exception):
    """A service could not start, or a program could not reach one, at an address (the
    message says which and why)."""


@dataclass
class Service:
    """A running :func:`serve`: where, and what it runs on."""

    address: Address
    """Where it serves (for ``tcp:HOST:0``, with the port the system chose)."""
    vat: Vat | None
    """The vat serving the object over the bus (to export more objects, or read its
    statistics); None for ``tcp:`` (each connection has a vat of its own)."""
    peer: Peer | None
    kernel: Kernel | None
    """The kernel in this process the service runs on (None on a kernel daemon, or tcp:)."""
    connections: int = 0
    """Programs handed a peer (unix:) or connected (tcp:) so far."""
    seed: bytes = b""
    """The payload of each program's seed: ``capbus.serve`` and the served interface's id,
    so that a client that names no interface still gets its class."""


@asynccontextmanager
async def serve(
    obj: Server | Client,
    address: str | Address,
    *,
    kernel: Kernel | str | os.PathLike[str] | None = None,
    mode: int = 0o600,
    tls: ssl.SSLContext | None = None,
    **vat_options: Any,
) -> AsyncIterator[Service]:
    """Serves ``obj`` as the bootstrap capability at ``address`` for the duration of the
    block: a server object, or a client of another vat (a gateway: a bus object served over
    TCP, a TCP service's object served over the bus). ``unix:PATH``: a socket at PATH with
    file ``mode`` (who may connect); a socket left there by a killed service is replaced,
    a path a live one serves is refused. ``tcp:HOST:PORT``: Cap'n Proto's RPC protocol;
    ``tls:HOST:PORT``: the same over TLS, with ``tls`` a server context holding the
    certificate and key (``ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)`` and
    ``load_cert_chain``).
    ``kernel``: a :class:`~capbus.Kernel` to use, a kernel daemon's socket path, or None for
    a kernel embedded in this process for the service's lifetime. ``vat_options`` go to
    :func:`~capbus.rpc.vat.open_vat` (its limits)."""
    where = parse(address)
    if isinstance(where, TcpAddress):
        async with _serve_tcp(obj, where, tls, **vat_options) as service:
            yield service
        return
    if tls is not None:
        raise ServeError(f"{where}: a TLS context given for a unix: address (tls:HOST:PORT serves TLS)")
    from .kernel import Kernel, open_kernel
    from .rpc.vat import open_vat

    listener = _listen(where.path, mode)  # (first: a path in use is said before anything starts)
    try:
        async with AsyncExitStack() as stack:
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
            node = await vat.export(_server_of(obj), keep=True)  # (programs come and go; it stays)
            interface_id = obj.interface.id if getattr(obj, "interface", None) is not None else 0
            service = Service(where, vat, peer, own, seed=SEED + str(interface_id).encode())
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_accept, listener.socket, service, node)
                    try:
                        yield service
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                listener.close()  # (before the vat and kernel: no one waits on a service going)
    except BaseExceptionGroup as group:
        # What the block raised (or what stopped the service) comes out as itself, not
        # wrapped by the nurseries the service runs in.
        single = _single(group)
        if single is None:
            raise
        raise single from None
    finally:
        listener.close()
        listener.release()


@asynccontextmanager
async def _serve_tcp(
    obj: Server | Client, where: TcpAddress, tls: ssl.SSLContext | None, **options: Any
) -> AsyncIterator[Service]:
    """Serves ``obj`` to every connection at ``where``, each with its own rpc.capnp vat
    (capbus/rpc/streamvat.py): the standard protocol, for any Cap'n Proto peer; over TLS
    (the standard library's, through trio.SSLStream) for ``tls:``."""
    from .rpc.streamvat import serve_stream

    if where.tls and tls is None:
        raise ServeError(f"{where}: serving TLS takes a server context with its certificate (tls=...)")
    if tls is not None and not where.tls:
        raise ServeError(f"{where}: a TLS context given for a tcp: address (tls:HOST:PORT serves TLS)")
    service = Service(where, None, None, None)

    async def handle(stream: trio.SocketStream) -> None:
        service.connections += 1
        served: trio.abc.Stream = stream
        try:
            if tls is not None:
                served = trio.SSLStream(stream, tls, server_side=True)
                with trio.fail_after(HANDSHAKE_SECONDS):
                    await served.do_handshake()
            await serve_stream(served, obj, **options)
        except Exception as error:  # noqa: BLE001 - one connection's end never stops the rest
            log.info("a connection to %s ended: %s", where, error)

    try:
        async with trio.open_nursery() as nursery:
            try:
                listeners = await nursery.start(
                    functools.partial(trio.serve_tcp, handle, where.port, host=where.host)
                )
            except OSError as error:
                raise ServeError(f"cannot serve at {where}: {error.strerror or error}") from None
            port = listeners[0].socket.getsockname()[1]
            service.address = TcpAddress(where.host, port, tls=where.tls)
            try:
                yield service
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        single = _single(group)
        if single is None:
            raise
        raise single from None


def _why(error: BaseException) -> str:
    """What a failed TCP or TLS connect says (trio wraps a TLS failure in BrokenResourceError)."""
    cause = error.__cause__ if isinstance(error, trio.BrokenResourceError) else error
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS: the service's certificate is not trusted ({cause.verify_message})"
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {cause.reason or cause}"
    return str(getattr(cause, "strerror", None) or cause or error)


def _server_of(obj: Server | Client) -> Server:
    """What a bus service exports for ``obj``: the object, or for a client (of another
    vat: a TCP connection's, another peer's) a Forwarder to it."""
    from .rpc.client import Client
    from .rpc.server import Forwarder

    if isinstance(obj, Client):
        return obj.server if obj.server is not None else Forwarder(obj)
    return obj


def _single(group: BaseExceptionGroup[Any]) -> BaseException | None:
    """The one exception a group (of groups) holds, or None if it holds several."""
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup):
        if len(found.exceptions) != 1:
            return None
        found = found.exceptions[0]
    return found


@dataclass
class _Listener:
    socket: trio.socket.SocketType
    path: SocketPath

    def close(self) -> None:
        self.socket.close()

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
    pending: dict[int, int] = {}
    async with trio.open_nursery() as nursery:
        while True:
            try:
                connection, _ = await listener.accept()
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await trio.sleep(0.1)  # (out of fds: let handshakes in flight end first)
                    continue
                raise
            uid = _uid_of(connection)
            if pending.get(uid, 0) >= MAX_PENDING_PER_USER:
                # (each program being handed a peer holds one charged to this service's
                # user until it takes it or goes: one user cannot pin more than these)
                unfinished = f"{BUSY}user {uid} has {MAX_PENDING_PER_USER} connections unfinished"
                nursery.start_soon(_refuse, connection, unfinished)
                continue
            pending[uid] = pending.get(uid, 0) + 1
            nursery.start_soon(_hand_over, connection, service, node, pending, uid)


def _uid_of(connection: trio.socket.SocketType) -> int:
    """The connecting program's uid, as the kernel attests it (SO_PEERCRED)."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", credentials)[1])


async def _refuse(connection: trio.socket.SocketType, reason: str) -> None:
    with connection, trio.move_on_after(HANDSHAKE_SECONDS):
        await _send_quietly(connection, REFUSAL + reason.encode())


async def _hand_over(
    connection: trio.socket.SocketType, service: Service, node: Any, pending: dict[int, int], uid: int
) -> None:
    """Makes the connecting program's peer, its seed holding ``node``, writes it, and waits
    until the program has taken it (it says so, or closes): until then the peer counts
    against what the program's user may hold unfinished (MAX_PENDING_PER_USER)."""
    try:
        with connection:
            await _hand_over_now(connection, service, node)
    finally:
        pending[uid] -= 1
        if not pending[uid]:
            del pending[uid]


async def _hand_over_now(connection: trio.socket.SocketType, service: Service, node: Any) -> None:
    with trio.move_on_after(HANDSHAKE_SECONDS) as making:
        try:
            made = await _peer_for(connection, service, node)
        except CapbusError as error:
            await _send_quietly(connection, REFUSAL + str(error).encode()[:512])
            return
    if making.cancelled_caught:
        return
    with made:
        fds = array.array("i", [made.fileno()])
        try:
            with trio.move_on_after(HANDSHAKE_SECONDS):
                await connection.sendmsg([GREETING], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError:
            return  # (the program left before its peer came: the peer ends with `made`)
    service.connections += 1
    try:
        await connection.recv(len(TAKEN))  # (its word that it took the peer, or its end)
    except OSError:
        pass


async def _peer_for(connection: trio.socket.SocketType, service: Service, node: Any) -> socket.socket:
    """The connection of a new peer for the program at the other end of ``connection``,
    its seed holding ``node``. On a kernel of this process, the peer is charged to that
    program's user (SO_PEERCRED); on a kernel daemon, which makes it at the service's
    request, to the service's (MAX_PENDING_PER_USER bounds what one user pins then)."""
    assert service.peer is not None
    if service.kernel is None:
        return await service.peer.create_peer(service.seed, handles=[node])
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", credentials)
    made = Peer(service.kernel.socket_charged_to(uid, gid, pid))
    try:
        handle = await service.peer.transfer(node, made)
        await made.set_seed(service.seed, handles=[handle])
    except BaseException:
        await made.aclose()
        raise
    return made.detach()


async def _send_quietly(connection: trio.socket.SocketType, data: bytes) -> None:
    try:
        await connection.send(data)
    except OSError:
        pass


@overload
def connect(
    address: str | Address,
    interface: type[ClientT],
    *,
    timeout: float = ...,
    tls: ssl.SSLContext | None = ...,
    **vat_options: Any,
) -> Connection[ClientT]: ...
@overload
def connect(
    address: str | Address,
    interface: Any = None,
    *,
    timeout: float = ...,
    tls: ssl.SSLContext | None = ...,
    **vat_options: Any,
) -> Connection[DynamicClient]: ...
def connect(
    address: str | Address,
    interface: Any = None,
    *,
    timeout: float = HANDSHAKE_SECONDS,
    tls: ssl.SSLContext | None = None,
    **vat_options: Any,
) -> Connection[Any]:
    """A client of the bootstrap object served at ``address``, for the duration of an
    ``async with`` block: ``async with capbus.connect("unix:/run/calc", calc_capnp.Calculator)
    as calculator:``. ``interface``: a generated client class (the client is typed as it),
    ``Foo`` from ``capbus.load``, or None (an untyped client). ``timeout``: seconds to
    wait for the service to hand over the capability (ServeError after). ``vat_options`` go
    to :func:`~capbus.rpc.vat.open_vat` (or, for tcp:, to the connection's vat). ``tls``:
    for ``tls:HOST:PORT``, the context that verifies the service's certificate (default: the
    system's trusted authorities, ``ssl.create_default_context()``). (A new peer on a kernel
    daemon, without RPC, is :func:`capbus.connect_peer`.)"""
    return Connection(parse(address), interface, vat_options, timeout, tls)


class Connection(Generic[ClientT]):
    """What :func:`connect` returns: ``async with`` it for the client."""

    def __init__(
        self,
        address: Address,
        interface: Any,
        vat_options: dict[str, Any],
        timeout: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address, self._interface, self._vat_options = address, interface, vat_options
        self._timeout, self._tls = timeout, tls
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
            return await self._connect_tcp(self.address)
        from .rpc.vat import open_vat

        stack = AsyncExitStack()
        try:
            try:
                with trio.fail_after(self._timeout):
                    peer, stream = await _peer_at(self.address)
                    stack.push_async_callback(peer.aclose)
                    seed = await _seed_of(self.address, peer)
            except trio.TooSlowError:
                raise ServeError(
                    f"{self.address}: the service did not answer in {self._timeout:g} s"
                ) from None
            with stream:
                await _send_quietly(stream, TAKEN)  # (the service may stop counting it as unfinished)
            interface = _interface_for(self.address, self._interface, seed.payload)
            vat = await stack.enter_async_context(open_vat(peer, **self._vat_options))
            client = vat.client(seed.handles[0], interface)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return client  # type: ignore[return-value]

    async def _connect_tcp(self, address: TcpAddress) -> ClientT:
        from .rpc.streamvat import open_stream_vat

        if self._tls is not None and not address.tls:
            raise ServeError(f"{address}: a TLS context given for a tcp: address (tls:HOST:PORT is TLS)")
        stack = AsyncExitStack()
        try:
            try:
                with trio.fail_after(self._timeout):
                    stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
                    if address.tls:
                        context = self._tls or ssl.create_default_context()
                        stream = trio.SSLStream(stream, context, server_hostname=address.host)
                        await stream.do_handshake()
            except trio.TooSlowError:
                raise ServeError(f"{address}: no connection in {self._timeout:g} s") from None
            except (OSError, trio.BrokenResourceError) as error:
                raise ServeError(f"cannot connect to {address}: {_why(error)}") from None
            vat = await stack.enter_async_context(open_stream_vat(stream, **self._vat_options))
            try:
                with trio.fail_after(self._timeout):
                    client = await vat.bootstrap(self._interface)
            except trio.TooSlowError:
                raise ServeError(f"{address}: the service did not answer in {self._timeout:g} s") from None
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return client  # type: ignore[return-value]

    async def __aexit__(self, *exc_info: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            # (what the block raised goes through the connection's nurseries, as it would
            # out of a nested ``async with``)
            await stack.__aexit__(*exc_info)


def _interface_for(address: Address, wanted: Any, seed: bytes) -> Any:
    """The interface to give the bootstrap client: ``wanted`` (checked against what the
    service says it serves, where this process knows that interface: it may extend
    ``wanted`` in ways only the service knows), else the served one if this process knows
    it, else an interface of no methods."""
    from .rpc.interface import Interface, known_interface
    from .rpc.vat import _interface

    said = seed[len(SEED) :]
    if not seed.startswith(SEED) or not said.isdigit() or len(said) > 20:  # (an id is a UInt64)
        raise ServeError(f"{address}: not a capbus service (its peer's seed says {seed[:40]!r})")
    served_id = int(said)
    served = known_interface(served_id) if served_id else None
    if wanted is None:
        return served if served is not None else Interface(served_id, "Capability", None)
    interface = _interface(wanted)
    if served is not None and not served.implements(interface.id):
        raise ServeError(f"{address} serves a {served.name}, not a {interface.name}")
    return wanted


async def _seed_of(address: Address, peer: Peer) -> Message:
    """The seed of a handed-over peer: one handle, the served object."""
    try:
        seed = await peer.take_seed()
    except CapbusError as error:  # (NoSeed, Disconnected: not a peer a service made)
        raise ServeError(
            f"{address}: the service handed over a peer without its seed ({error.strerror})"
        ) from None
    if len(seed.handles) != 1:
        raise ServeError(f"{address}: the service handed over {len(seed.handles)} handles, not 1")
    return seed


async def _peer_at(address: UnixAddress) -> tuple[Peer, trio.socket.SocketType]:
    """The peer a service at ``address`` hands over (see the module docstring), and the
    connection it came on (to say it was taken). Bounded by the caller's timeout; a
    service too busy for this user (BUSY) is asked again until then."""
    while True:
        stream = await _connected(address)
        try:
            try:
                data, ancillary, _, _ = await stream.recvmsg(
                    1024, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC
                )
            except OSError as error:
                raise ServeError(f"{address}: the service went before answering ({error.strerror})") from None
            fds = _parse_fds(ancillary)
            if data == GREETING and len(fds) == 1:
                return _peer_of(address, fds[0]), stream
            for fd in fds:
                os.close(fd)
            if not data.startswith(REFUSAL):
                if not data:
                    raise ServeError(f"{address}: the service went before answering")
                raise ServeError(f"{address}: not a capbus service (it said {data[:40]!r})")
            reason = data[len(REFUSAL) :].decode(errors="replace")
            if not reason.startswith(BUSY):
                raise ServeError(f"{address}: the service refused: {reason!r}")
        except BaseException:
            stream.close()
            raise
        stream.close()
        await trio.sleep(0.05)  # (busy: its other programs of this user take their peers)


def _peer_of(address: Address, fd: int) -> Peer:
    """The handed-over connection as a Peer; ServeError (and the fd closed, once) if it is
    not a capbus peer's connection."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        raise ServeError(f"{address}: the service handed over something that is not a socket") from None
    try:
        return Peer(sock)
    except ValueError:
        sock.close()
        raise ServeError(f"{address}: the service handed over a socket that is not a capbus peer's") from None
    except BaseException:
        sock.close()
        raise


async def _connected(address: UnixAddress) -> trio.socket.SocketType:
    """A stream connection to ``address``. A connect that finds the backlog full (EAGAIN:
    a non-blocking connect to a unix socket then leaves the socket unconnected) is tried
    again, within the caller's timeout."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        while True:
            try:
                sock.connect(address.path)
                return trio.socket.from_stdlib_socket(sock)
            except BlockingIOError:
                await trio.sleep(0.01)
            except OSError as error:
                hints = {
                    errno.ENOENT: "nothing is served there (start the service first)",
                    errno.ECONNREFUSED: "nothing accepts there (a service that is gone left the file)",
                    errno.EACCES: "this user may not connect (the socket's file mode says who may)",
                    errno.EPROTOTYPE: "a kernel daemon listens there, not a service (capbus.connect_peer)",
                }
                hint = hints.get(error.errno or 0, str(error))
                raise ServeError(f"cannot connect to {address}: {hint}") from None
    except BaseException:
        sock.close()
        raise
