"""The embedded kernel: the C kernel (capbus._kernel) on a thread of this process.

``async with capbus.open_kernel() as kernel`` starts it; ``await kernel.connect()`` makes a
peer; :meth:`Kernel.socket_for_child` hands out a raw peer connection for another process.
The kernel thread runs C only (cffi drops the GIL for the call), so it never competes with
Python code for the interpreter.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields

import trio

from ._kernel import ffi, lib
from .errors import CapbusError, error_from_errno
from .peer import Peer
from .snapshot import Snapshot
from .socketfile import PathInUse, SocketPath


@dataclass(frozen=True, slots=True)
class Limits:
    """Quotas of a kernel (docs/design.md 2.1 rule 11; defaults in uapi.h, docs/wire-format.md)."""

    peer_bytes: int = lib.CAPBUS_DEFAULT_PEER_BYTES
    peer_messages: int = lib.CAPBUS_DEFAULT_PEER_MESSAGES
    peer_handles: int = lib.CAPBUS_DEFAULT_PEER_HANDLES
    peer_fds: int = lib.CAPBUS_DEFAULT_PEER_FDS
    handles_held: int = lib.CAPBUS_DEFAULT_HANDLES_HELD
    nodes_owned: int = lib.CAPBUS_DEFAULT_NODES_OWNED
    user_bytes: int = lib.CAPBUS_DEFAULT_USER_BYTES
    peers_per_user: int = lib.CAPBUS_DEFAULT_PEERS_PER_USER
    user_handles: int = lib.CAPBUS_DEFAULT_USER_HANDLES
    user_backlog: int = lib.CAPBUS_DEFAULT_USER_BACKLOG
    kernel_fds: int = 0
    """File descriptors the kernel may use in all; 0: the process's RLIMIT_NOFILE when the
    kernel starts (docs/wire-format.md "File descriptors")."""


@dataclass(frozen=True, slots=True)
class KernelStatistics:
    """A snapshot of the kernel's counters."""

    peers: int
    nodes: int
    handles: int
    queued_messages: int
    queued_bytes: int
    queued_fds: int
    seq: int
    messages_sent: int
    messages_written: int
    violations: int
    peers_doomed: int
    memory_bytes: int
    fds_held: int
    fds_held_max: int
    fds_in_flight: int
    fds_in_flight_max: int
    peers_stalled: int
    delivery_retries: int
    connections_refused: int
    peers_gated: int
    peers_half_closed: int
    wakeups: int
    sockets_lingering: int
    seed_bytes: int


def _check(result: int, what: str) -> None:
    if result < 0:
        raise error_from_errno(-result, what)


class Kernel:
    """A running capbus kernel owned by this process (see :func:`open_kernel`)."""

    def __init__(self, limits: Limits | None = None) -> None:
        c_limits = ffi.new("struct capbus_limits *")
        for f in fields(Limits):
            setattr(c_limits, f.name, getattr(limits or Limits(), f.name))
        out = ffi.new("struct cb_kernel **")
        _check(lib.capbus_kernel_new(c_limits, out), "starting the kernel")
        self._kernel = out[0]
        self._thread: threading.Thread | None = None
        self._result: int | None = None
        self.path: str | None = None
        self._socket_path: SocketPath | None = None

    def listen(self, path: str | os.PathLike[str], mode: int = 0o600) -> None:
        """Also accepts peers on a unix socket path; its file ``mode`` is the access control.

        The path is claimed first (capbus/socketfile.py): a socket a killed kernel left there
        is replaced, a path another live kernel or service serves is refused (PathInUse).
        At :meth:`aclose` the socket file is removed, but never through the path again: in a
        directory another user can write, the path (or a directory on it) may by then lead
        elsewhere."""
        where = os.fspath(path)
        if self._socket_path is not None:
            raise CapbusError(
                f"listening on {where}: this kernel listens on {self.path} already", code=errno.EBUSY
            )
        claim = SocketPath(where)
        try:
            claim.claim()
        except PathInUse as error:
            raise CapbusError(error.strerror, code=error.errno or errno.EADDRINUSE) from None
        try:
            _check(lib.capbus_kernel_listen(self._kernel, where.encode(), mode), f"listening on {where}")
            claim.adopt()
        except BaseException:
            claim.release()
            raise
        self.path, self._socket_path = where, claim

    def _remove_socket_file(self) -> None:
        if self._socket_path is not None:
            self._socket_path.release()
            self._socket_path = None

    def log_to(self, fd: int) -> None:
        """Where the kernel writes a line when something needs its operator's attention
        (connections refused for lack of fds, ...); -1 for nowhere (the default). The caller
        keeps ``fd`` open while the kernel runs."""
        lib.capbus_kernel_set_log_fd(self._kernel, fd)

    def start(self) -> None:
        def run() -> None:
            self._result = lib.capbus_kernel_run(self._kernel)

        self._thread = threading.Thread(target=run, name="capbus-kernel", daemon=True)
        self._thread.start()

    def socket_for_child(self) -> socket.socket:
        """A new peer's connection, for another process (pass it with ``pass_fds``). The peer
        is charged to this process's user until a send says otherwise (each message carries
        its real sender's credentials)."""
        return self._adopted(-1, -1, -1)

    def socket_charged_to(self, uid: int, gid: int, pid: int) -> socket.socket:
        """A new peer's connection, as :meth:`socket_for_child`, charged to ``uid`` (and
        ``gid``, ``pid``) for its life: a service hands it to a program of that user (its
        credentials as the kernel attests them, SO_PEERCRED), whose use of it then counts
        against that user's quotas, not the service's."""
        return self._adopted(uid, gid, pid)

    def _adopted(self, uid: int, gid: int, pid: int) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            _check(lib.capbus_kernel_adopt(self._kernel, ours.fileno(), uid, gid, pid), "adopting a peer")
        except CapbusError:
            ours.detach()  # adopt closed it
            theirs.close()
            raise
        ours.detach()
        return theirs

    async def connect(self) -> Peer:
        """A new peer in this process."""
        await trio.lowlevel.checkpoint()
        return Peer(self.socket_for_child())

    async def grant_monitor(self, peer: Peer) -> None:
        """Gives ``peer`` the monitor capability: it then receives a MONITOR copy of every
        send and destroy (docs/design.md 2.1 rule 16). Only the kernel's owner can do this."""
        key = await peer._peer_key()
        _check(lib.capbus_kernel_grant_monitor(self._kernel, key), "granting the monitor")

    async def snapshot(self) -> Snapshot:
        """The whole object model at one instant (:meth:`Peer.snapshot`), as seen from
        outside: the peer this asks through, and its monitor node, are left out."""
        async with await self.connect() as peer:
            await self.grant_monitor(peer)
            monitor = await peer.create_monitor()
            return (await peer.snapshot(monitor)).others()

    def statistics(self) -> KernelStatistics:
        stats = ffi.new("struct capbus_stats *")
        lib.capbus_kernel_stats(self._kernel, stats)
        return KernelStatistics(**{f.name: getattr(stats, f.name) for f in fields(KernelStatistics)})

    async def aclose(self) -> None:
        """Stops the kernel: every peer sees its connection end. Idempotent."""
        if self._kernel is None:
            return
        lib.capbus_kernel_stop(self._kernel)
        if self._thread is not None:
            await trio.to_thread.run_sync(self._thread.join)
        lib.capbus_kernel_free(self._kernel)
        self._kernel = None
        self._remove_socket_file()


@asynccontextmanager
async def open_kernel(
    *, limits: Limits | None = None, listen: str | os.PathLike[str] | None = None, mode: int = 0o600
) -> AsyncIterator[Kernel]:
    """Runs a kernel on a thread of this process for the duration of the block."""
    kernel = Kernel(limits)
    try:
        if listen is not None:
            kernel.listen(listen, mode)
        kernel.start()
        yield kernel
    finally:
        with trio.CancelScope(shield=True):
            await kernel.aclose()
