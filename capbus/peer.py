"""Peer: one connection to the capbus kernel, as a trio object.

A :class:`Peer` owns nodes, holds handles, sends messages to handles and receives from its
one queue. It knows nothing of Cap'n Proto. Every method that talks to the kernel is async,
is a trio checkpoint, and raises a :mod:`capbus.errors` exception named for what the kernel
reported.

IO model: the kernel pushes messages and replies down one SEQPACKET socket. There is no
reader task: whichever task is waiting (for a message in :meth:`Peer.recv`, or for the reply
to its own command) reads the socket and files what it finds, so the common round trip
costs no task switch. A peer that never calls ``recv`` is not read, which lets the kernel's
quotas push back on whoever floods it.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, overload

import trio

from . import _wire
from .errors import (
    CapbusError,
    Disconnected,
    InvalidArgument,
    MessageTooLarge,
    ReceiveReplaced,
    ShutDown,
    Undelivered,
    error_from_errno,
)
from .memfd import _head, _map, _sealed_memfd, _sparse, on_shmem
from .messages import Credentials as Credentials  # (re-exported: the peer API's)
from .messages import Handle as Handle
from .messages import HandleLike as HandleLike
from .messages import Message as Message
from .messages import MessageKind as MessageKind
from .snapshot import Snapshot, read_memfd

_ANC_SPACE = socket.CMSG_SPACE(4 * _wire.FDS_MAX)
# Plain ints: arithmetic on the socket module's IntFlag members costs microseconds per frame.
_TRUNCATED = int(socket.MSG_TRUNC) | int(socket.MSG_CTRUNC)
# One-way cookies: bit 63 marks one-way; bit 62 marks a caller's tag in bits 0..60.
_TAGGED = 1 << 62
_TAG_MASK = (1 << 61) - 1
_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)

UNSOLICITED_KEPT = 64
"""Errors a Peer keeps in ``unsolicited_errors``."""

PAYLOAD_HEAD_BYTES = 64 * 1024
"""What is mapped of a memfd payload that is not mapped whole (:attr:`Message.whole_size`):
its start, where a message's header is, so that its sender can be told why."""


_KINDS = {kind.value: kind for kind in MessageKind}
_DRAINED = MessageKind.DRAINED
_UNDELIVERED = MessageKind.UNDELIVERED
_FRAME_MESSAGE_SIZE: Final = _wire.MESSAGE_FRAME_HEAD.size
_FRAME_MESSAGE_UNPACK: Final = _wire.MESSAGE_FRAME_HEAD.unpack_from
_MEMFD: Final = _wire.MSG_FLAG_MEMFD


@dataclass(frozen=True, slots=True)
class HandleState:
    """What the kernel counts for one of our handles."""

    references: int
    owner: bool
    destroyed: bool
    holders: int = 0
    """For the owner's handle: how many other peers hold a handle to the node."""


@dataclass(frozen=True, slots=True)
class PeerInfo:
    uid: int
    gid: int
    pid: int
    wire_version: int
    payload_max: int
    handles_max: int
    fds_max: int
    destinations_max: int


@dataclass(frozen=True, slots=True)
class MonitorRecord:
    """What a monitor saw: one send or destroy (see kernel/src/monitor.c)."""

    event: MessageKind
    seq: int
    uid: int
    pid: int
    n_destinations: int
    n_handles: int
    n_fds: int
    payload_size: int
    payload: bytes
    """The observed payload, cut short to the kernel's monitor copy limit."""
    dropped: int
    """Records this monitor lost so far because it did not keep up."""


def decode_monitor_record(message: Message) -> MonitorRecord:
    """Parses a MONITOR message's payload."""
    if message.kind is not MessageKind.MONITOR:
        raise ValueError(f"not a monitor message: {message.kind}")
    view = message.payload_view
    event, n_dest, payload_size, seq, uid, pid, n_handles, n_fds, dropped = _wire.MONITOR_RECORD.unpack_from(
        view
    )
    return MonitorRecord(
        MessageKind(event),
        seq,
        uid,
        pid,
        n_dest,
        n_handles,
        n_fds,
        payload_size,
        bytes(view[_wire.MONITOR_RECORD.size :]),
        dropped,
    )


_thread_state = threading.local()


def _receive_buffer() -> bytearray:
    """This thread's frame buffer. Allocating FRAME_MAX bytes per frame would cost an
    mmap/munmap pair each time (it is above malloc's mmap threshold), and one per Peer would
    cost 144 KiB per idle peer; a frame is copied out of it before anything else can run on
    the thread, so all peers of a thread share one."""
    buffer: bytearray | None = getattr(_thread_state, "buffer", None)
    if buffer is None:
        buffer = _thread_state.buffer = bytearray(_wire.FRAME_MAX + 1)
    return buffer


def _parse_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    return fds


def _fd_number(fd: int | socket.socket | object) -> int:
    if isinstance(fd, int):
        return fd
    fileno = getattr(fd, "fileno", None)
    if fileno is None:
        raise TypeError(f"not a file descriptor: {fd!r}")
    number = fileno()
    assert isinstance(number, int)
    return number


class Peer:
    """One connection to the capbus kernel.

    Make one with ``await kernel.connect()`` (embedded kernel), ``await capbus.connect(path)``
    (daemon) or :meth:`Peer.from_socket` (a socket handed down by a parent). Use it as an
    async context manager, or call :meth:`aclose`: closing disconnects, which destroys the
    peer's nodes and releases its handles (docs/design.md 2.1, rule 10).
    """

    def __init__(self, sock: socket.socket) -> None:
        if sock.type != socket.SOCK_SEQPACKET or sock.family != socket.AF_UNIX:
            raise ValueError("a capbus peer needs an AF_UNIX SOCK_SEQPACKET socket")
        sock.setblocking(False)
        self._sock = sock
        self._next_cookie = 1
        self._replies: dict[int, _wire.Reply] = {}
        self._abandoned: set[int] = set()
        self._inbox: deque[Message] = deque()
        self._reading = False
        self._progress: trio.Event | None = None  # exists while a task waits for the reader
        self._write_lock = trio.Lock()
        self._flags = 0  # (CAPBUS_PEER_FLAG_*, as last set)
        self._recv_lock = trio.Lock()  # (one RECV at a time: each would replace the other)
        self._snapshot_lock = trio.Lock()
        self._closed = False
        self._drained = False  # (shut down, and the DRAINED mark received)
        self._keeps = False  # (shut down keeping nodes: DRAINED is a message, not the end)
        self._broken: CapbusError | None = None
        self._key: bytes | None = None
        # Messages mostly come from a few senders: share their Credentials objects.
        self._senders: dict[tuple[int, int, int, int, int], Credentials] = {}
        self.max_mapped_bytes: int | None = None
        """A memfd payload larger than this is not mapped whole (only its start: see
        :attr:`Message.whole_size`); None: any (up to the kernel's 1 GiB). A reader that
        refuses messages over a size sets it, so that it never maps what it refuses."""
        self.unsolicited_errors: list[CapbusError] = []
        """Errors the kernel sent for frames it could not attribute to a command, and why a
        message that arrived was dropped unread (a payload this process could not map):
        the last :data:`UNSOLICITED_KEPT` (a reader that never looks would otherwise keep
        one per message a sender makes unreadable); ``unsolicited_dropped`` counts the rest."""
        self.unsolicited_dropped = 0

    @classmethod
    def from_socket(cls, sock: socket.socket | int) -> Peer:
        """A peer over an existing kernel connection (a socket object or an fd number)."""
        if isinstance(sock, int):
            sock = socket.socket(fileno=sock)
        return cls(sock)

    async def __aenter__(self) -> Peer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- IO ----------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this peer was closed")
        if self._broken is not None:
            raise Disconnected(str(self._broken))

    def _read_frame(self) -> None:
        """Reads one frame and files it; raises BlockingIOError when there is none."""
        rx = _receive_buffer()
        size, ancdata, flags, _ = self._sock.recvmsg_into([rx], _ANC_SPACE, _CMSG_CLOEXEC)
        fds = _parse_fds(ancdata) if ancdata else []
        if not size and not fds:
            self._broken = Disconnected("the kernel closed the connection")
            return
        if flags & _TRUNCATED:
            for fd in fds:
                os.close(fd)
            if flags & socket.MSG_TRUNC or not self._lose_fds(bytes(rx[:size])):
                self._broken = Disconnected("the kernel sent a frame larger than the wire format allows")
            return
        if not fds and size >= _FRAME_MESSAGE_SIZE:
            # The common case (an inline payload, no fds) without the general decode.
            header = _FRAME_MESSAGE_UNPACK(rx)
            if header[0] == size and header[1] == _wire.FRAME_MESSAGE and not header[5] & _MEMFD:
                inline = self._inline_message(rx, size, header)
                self._inbox.append(inline if inline.kind is not _UNDELIVERED else self._undelivered(inline))
                return
        # The buffer is reused for the next frame, so what is kept is copied out once.
        event = _wire.decode(bytes(rx[:size]), fds)
        if type(event) is _wire.Incoming:
            try:
                message = self._wrap(event)
            except (OSError, ValueError) as error:  # (ValueError: mmap's, for a size it refuses)
                # A payload this process cannot map (its address space is full: a sandbox's
                # RLIMIT_AS). That message is lost, not the connection: every later one
                # (and every caller of a vat on this peer) would be lost with it.
                for fd in event.fds:
                    os.close(fd)
                reason = "a message's payload could not be mapped"
                code = error.errno if isinstance(error, OSError) and error.errno else errno.ENOMEM
                self._unsolicited(error_from_errno(code, reason))
                return
            self._inbox.append(message if message.kind is not _UNDELIVERED else self._undelivered(message))
            return
        assert type(event) is _wire.Reply
        cookie = event.cookie
        if cookie & _wire.ONEWAY_COOKIE:
            self._oneway_failed(event)
        elif cookie in self._abandoned:
            self._abandoned.discard(cookie)
            for fd in event.fds:
                os.close(fd)
        elif cookie == 0:
            self._unsolicited(error_from_errno(event.error, "unparseable frame"))
        else:
            self._replies[cookie] = event

    def _undelivered(self, notice: Message) -> Message:
        """An UNDELIVERED notice as its sender's terms: the tag of the send, the lost
        message's seq, and why."""
        cookie, seq = _wire.UNDELIVERED.unpack_from(notice.payload_view)
        return Message(
            _UNDELIVERED,
            notice.destination,
            memoryview(b""),
            seq=seq,
            error=Undelivered("its receiver disconnected before it was written to it"),
            tag=cookie & _TAG_MASK if cookie & _TAGGED else None,
        )

    def _arrived(self, message: Message) -> Message:
        """What a receive returns: ``message``, unless it is the DRAINED mark that ends a
        shutdown."""
        if message.kind is _DRAINED and not self._keeps:
            self._drained = True
            raise self._shut_down()
        return message

    @staticmethod
    def _shut_down() -> ShutDown:
        return ShutDown("this peer shut down and has received all that was queued for it")

    def _sender(self, key: tuple[int, int, int, int, int]) -> Credentials:
        """The Credentials of (uid, gid, pid, process id, sending peer), one object per
        sender while it keeps sending (a few dozen kept: a message's metadata is cheap)."""
        sender = self._senders.get(key)
        if sender is None:
            if len(self._senders) > 64:
                self._senders.clear()
            sender = self._senders[key] = Credentials(*key)
        return sender

    def _inline_message(self, rx: bytearray, size: int, header: tuple[int, ...]) -> Message:
        """A message frame with its payload inline and no fds (header: MESSAGE_FRAME_HEAD unpacked)."""
        kind, flags, priority, destination, seq, uid, gid, pid, n_handles = header[4:13]
        offset = _FRAME_MESSAGE_SIZE + 8 * n_handles
        if header[14] != size - offset:
            raise _wire.ProtocolError("message size does not match its header")
        handles: tuple[Handle, ...] = ()
        if n_handles:
            ids = struct.unpack_from(f"<{n_handles}Q", rx, _FRAME_MESSAGE_SIZE)
            handles = tuple([Handle(self, i) for i in ids])
        sender = None if uid == _wire.NO_CREDENTIAL else self._sender((uid, gid, pid, header[15], header[16]))
        # The buffer is reused for the next frame: the payload is copied out, once.
        return Message(
            _KINDS[kind],
            Handle(self, destination),
            memoryview(memoryview(rx)[offset:size].tobytes()),
            handles,
            [],
            priority,
            seq,
            sender,
            bool(flags & _wire.MSG_FLAG_CONTINUE),
            draining=bool(flags & _wire.MSG_FLAG_DRAINING),
        )

    def _unsolicited(self, error: CapbusError) -> None:
        self.unsolicited_errors.append(error)
        if len(self.unsolicited_errors) > UNSOLICITED_KEPT:
            del self.unsolicited_errors[0]
            self.unsolicited_dropped += 1

    def _lose_fds(self, frame: bytes) -> bool:
        """A message frame whose fds were cut short (MSG_CTRUNC: this process had no fd slot
        left for them, its RLIMIT_NOFILE reached) is filed without them: a vat then answers
        a call whose Fd fields name them Failed, so its sender hears of it. One whose payload
        was in a memfd is lost (said so in unsolicited_errors). False for any other frame
        (a reply to a command of ours): the connection is then given up, as before."""
        try:
            event = _wire.decode(frame, [])
        except _wire.ProtocolError:  # a memfd payload, lost with the fds
            reason = "a message came without its fds (no fd slot left)"
            self._unsolicited(error_from_errno(errno.EMFILE, reason))
            return True
        if type(event) is not _wire.Incoming:
            return False
        self._inbox.append(self._wrap(event))
        return True

    def _oneway_failed(self, reply: _wire.Reply) -> None:
        """Files the failures of a one-way send as SEND_FAILED messages."""
        if reply.error:  # refused as a whole: nothing was sent anywhere
            failures = [(_wire.HANDLE_INVALID, reply.error)]
        else:
            failures = _wire.send_failures(reply.body)
        tag = reply.cookie & _TAG_MASK if reply.cookie & _TAGGED else None
        for destination, code in failures:
            self._inbox.append(
                Message(
                    kind=MessageKind.SEND_FAILED,
                    destination=Handle(self, destination),
                    payload_view=memoryview(b""),
                    error=error_from_errno(code, "send_oneway"),
                    tag=tag,
                )
            )

    def _wrap(self, event: _wire.Incoming) -> Message:
        payload = event.payload
        whole_size = None
        unread = ""
        if event.flags & _wire.MSG_FLAG_MEMFD:
            # A large payload: map the sealed memfd instead of copying it.
            memfd = event.fds.pop(0)
            size = event.payload_size
            try:
                if size <= PAYLOAD_HEAD_BYTES:  # (the kernel takes an empty memfd too)
                    payload = _head(memfd, size) if size else memoryview(b"")
                elif _sparse(memfd, size) or not on_shmem(memfd):
                    unread = "its sender left holes in it that reading would make this process fill"
                elif self.max_mapped_bytes is not None and size > self.max_mapped_bytes:
                    unread = f"it is over the {self.max_mapped_bytes} bytes this peer maps"
                else:
                    try:
                        payload = _map(memfd, size)
                    except OSError as error:
                        unread = f"this process could not map it ({error.strerror})"
                if unread:  # only its start, read (an OSError now: lost)
                    whole_size = size
                    payload = _head(memfd, PAYLOAD_HEAD_BYTES)
            finally:
                os.close(memfd)
        sender = None
        if event.uid != _wire.NO_CREDENTIAL:
            sender = self._sender((event.uid, event.gid, event.pid, event.process_id, event.sending_peer))
        handles = tuple([Handle(self, i) for i in event.handles]) if event.handles else ()
        return Message(
            _KINDS[event.kind],
            Handle(self, event.destination),
            payload,
            handles,
            event.fds,
            event.priority,
            event.seq,
            sender,
            bool(event.flags & _wire.MSG_FLAG_CONTINUE),
            whole_size=whole_size,
            unread=unread,
            draining=bool(event.flags & _wire.MSG_FLAG_DRAINING),
        )

    async def _advance(self) -> bool:
        """Moves the connection forward by one step: files one frame if one has arrived, else
        waits until one may have (or until the task that waits for the socket saw one).
        Returns whether it waited. Reading never awaits, so it needs no lock; only the wait
        for readability is one task's at a time (trio allows one waiter per fd)."""
        self._check_usable()
        if self._reading:
            if self._progress is None:
                self._progress = trio.Event()
            await self._progress.wait()
            return True
        try:
            self._read_frame()
            return False
        except BlockingIOError:
            pass
        except OSError as error:
            self._broken = Disconnected(f"connection to the kernel failed: {error}")
            return False
        self._reading = True
        try:
            await trio.lowlevel.wait_readable(self._sock)
        finally:
            self._reading = False
            if self._progress is not None:
                self._progress.set()
                self._progress = None
        return True

    def _write_nowait(self, buffers: Sequence[bytes | bytearray | memoryview], fds: Sequence[int]) -> bool:
        """Writes one frame if the socket takes it now; False if it is full."""
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self._sock.sendmsg(buffers, ancdata)
            return True
        except BlockingIOError:
            return False
        except OSError as error:
            if error.errno in (errno.EBADF, errno.EINVAL) and fds and self._sock.fileno() >= 0:
                # One of the fds to attach is not open, or too many (the socket is fine):
                # that send fails, nothing was written, the connection is as good as before.
                raise InvalidArgument(f"the file descriptors to send were refused: {error}") from error
            if error.errno == errno.EMSGSIZE:  # a frame larger than the socket takes: not written
                raise MessageTooLarge(f"a frame too large to write: {error}") from error
            self._broken = Disconnected(f"connection to the kernel failed: {error}")
            raise self._broken from error

    async def _write(self, frame: Sequence[bytes | bytearray | memoryview], fds: Sequence[int]) -> bool:
        """Writes one frame, waiting while the socket is full; returns whether it waited."""
        waited = False
        while not self._write_nowait(frame, fds):
            waited = True
            async with self._write_lock:
                self._check_usable()
                await trio.lowlevel.wait_writable(self._sock)
        return waited

    async def _call(
        self,
        kind: int,
        body: bytes = b"",
        *,
        frame: Sequence[bytes | bytearray | memoryview] | None = None,
        cookie: int = 0,
        fds: Sequence[int] = (),
        what: str = "",
    ) -> _wire.Reply:
        """Sends one command and returns its successful reply (or raises its error).
        ``frame`` is a prebuilt frame carrying ``cookie`` (from :meth:`_new_cookie`)."""
        self._check_usable()
        if frame is None:
            cookie = self._new_cookie()
            frame = [_wire.command(kind, cookie, body)]
        waited = await self._write(frame, fds)
        replies = self._replies
        try:
            while cookie not in replies:
                waited = await self._advance() or waited
            if not waited:
                await trio.lowlevel.checkpoint()
        except BaseException:
            if cookie in replies:
                for fd in replies.pop(cookie).fds:
                    os.close(fd)
            else:
                self._abandoned.add(cookie)
            raise
        reply = replies.pop(cookie)
        if reply.error:
            for fd in reply.fds:
                os.close(fd)
            raise error_from_errno(reply.error, what or _COMMAND_NAMES.get(kind, "command"))
        return reply

    def _new_cookie(self) -> int:
        cookie = self._next_cookie
        self._next_cookie = cookie + 1
        return cookie

    def _id(self, handle: HandleLike) -> int:
        if isinstance(handle, Handle):
            if handle.peer is not self:
                raise InvalidArgument("this handle belongs to another peer; transfer it first")
            return handle.id
        if isinstance(handle, bool) or not isinstance(handle, int):
            raise TypeError(f"expected a Handle or an int id, got {type(handle).__name__}")
        return handle & 0xFFFFFFFFFFFFFFFF if handle >= 0 else _wire.HANDLE_INVALID

    # -- the object model --------------------------------------------------------------------

    async def create_node(self) -> Handle:
        """Creates a node owned by this peer and returns the owner's handle to it."""
        reply = await self._call(_wire.CMD_NODE_CREATE)
        return Handle(self, _wire.U64.unpack_from(reply.body)[0])

    async def release(self, handle: HandleLike, count: int = 1) -> None:
        """Drops ``count`` references to a handle (each receipt of a handle adds one), all or
        none: more than this peer holds is :class:`~capbus.errors.InvalidArgument`. The
        owner's last reference to a live node is pinned (:class:`~capbus.errors.HandleBusy`):
        destroy the node first."""
        if count == 1:
            body = _wire.U64.pack(self._id(handle))
        else:
            if not 0 < count <= 0xFFFFFFFF:
                raise InvalidArgument(f"cannot release {count} references")
            body = _wire.RELEASE.pack(self._id(handle), count, 0)
        await self._call(_wire.CMD_HANDLE_RELEASE, body)

    async def destroy(self, *handles: HandleLike, release: bool = False) -> None:
        """Destroys nodes this peer owns, all in one transaction: every holder gets one
        NODE_DESTROYED, ordered after everything sent to the nodes before. With ``release``
        the owner's pinned references go too."""
        ids = [self._id(h) for h in handles]
        body = _wire.DESTROY.pack(len(ids), _wire.DESTROY_FLAG_RELEASE if release else 0)
        body += struct.pack(f"<{len(ids)}Q", *ids)
        await self._call(_wire.CMD_NODES_DESTROY, body)

    async def handle_state(self, handle: HandleLike) -> HandleState:
        """The kernel's count of this peer's references to a handle, and the node's state."""
        reply = await self._call(_wire.CMD_HANDLE_QUERY, _wire.U64.pack(self._id(handle)))
        references, flags, holders, _ = _wire.HANDLE_STATE.unpack_from(reply.body)
        return HandleState(
            references,
            bool(flags & _wire.HANDLE_STATE_OWNER),
            bool(flags & _wire.HANDLE_STATE_DESTROYED),
            holders,
        )

    async def want_metadata(self, enabled: bool = True) -> None:
        """Asks the kernel to attach each sender's credentials (:attr:`Message.sender`) to the
        data messages this peer receives from now on. Off by default: metadata is the
        receiver's to ask for (docs/design.md 2.1 rules 9 and 14)."""
        await self._set_flag(_wire.PEER_FLAG_WANT_METADATA, enabled)

    async def hold_messages(self, enabled: bool = True) -> None:
        """Keeps the messages and notifications sent to this peer queued in the kernel (charged
        as ever, so a peer that receives slowly pushes back on its senders) until it receives
        them: each :meth:`recv` then takes one from there, and ``recv(priority=P)`` lets the
        kernel choose the most urgent one at or above P (kdbus's priority receive). Messages
        already written to this peer before stay first. Disabled again, what is held is
        written in order. See docs/peer-api.md "Priority"."""
        await self._set_flag(_wire.PEER_FLAG_HOLD, enabled)

    @property
    def holds_messages(self) -> bool:
        return bool(self._flags & _wire.PEER_FLAG_HOLD)

    async def _set_flag(self, flag: int, enabled: bool) -> None:
        # Taken as set when written: the kernel carries out a peer's commands in order, so a
        # receive of another task that goes after this one already finds it so.
        before, self._flags = self._flags, self._flags | flag if enabled else self._flags & ~flag
        try:
            await self._call(_wire.CMD_PEER_SET_FLAGS, _wire.U64.pack(self._flags))
        except CapbusError:  # (refused: as before; a cancelled call was most likely written)
            self._flags = before
            raise

    async def create_monitor(self) -> Handle:
        """A new monitor node owned by this peer: whoever holds a handle to it may watch all
        traffic (:meth:`attach_monitor`), and destroying it stops every one of them. Only
        for a peer the kernel trusts for it (root, the kernel's own uid, or one its embedder
        granted the monitor); others get :class:`~capbus.errors.NotPermitted`. See
        docs/peer-api.md "Monitoring"."""
        reply = await self._call(_wire.CMD_MONITOR_CREATE)
        return Handle(self, _wire.U64.unpack_from(reply.body)[0])

    async def attach_monitor(self, monitor: HandleLike) -> None:
        """Makes this peer receive a MONITOR record (:class:`MessageKind.MONITOR`) of every
        send and destroy on the bus, through a handle to a live monitor node, until that
        node is destroyed or this peer goes."""
        await self._call(_wire.CMD_MONITOR_ATTACH, _wire.U64.pack(self._id(monitor)))

    async def snapshot(self, monitor: HandleLike) -> Snapshot:
        """The kernel's whole object model at one instant of the global order (peers, nodes,
        handles, queues, quotas, traffic): what ``capbus status`` prints and ``capbus graph``
        draws. It takes the monitor's trust: ``monitor`` is a handle to a live monitor node
        (:meth:`create_monitor`, or one handed over by its owner). See docs/peer-api.md
        "Introspection"."""
        # One at a time: the kernel refuses (EBUSY) a second one in the same turn of its loop,
        # which tasks of one peer asking at once would be.
        async with self._snapshot_lock:
            reply = await self._call(_wire.CMD_SNAPSHOT, _wire.U64.pack(self._id(monitor)))
        fds = list(reply.fds)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise _wire.ProtocolError("a snapshot reply without its memfd")
        return read_memfd(fds[0])

    async def info(self) -> PeerInfo:
        """What the kernel knows about this peer, and its limits."""
        reply = await self._call(_wire.CMD_PEER_QUERY)
        key, *fields = _wire.QUERY.unpack_from(reply.body)
        self._key = key
        return PeerInfo(*fields)

    async def _peer_key(self) -> bytes:
        if self._key is None:
            await self.info()
        assert self._key is not None
        return self._key

    async def transfer(self, handle: HandleLike, other: Peer) -> Handle:
        """Gives ``other`` (a peer this process also holds) a handle to the same node, with no
        message: how a process bootstraps peers it holds. Returns the handle in ``other``."""
        key = await other._peer_key()
        reply = await self._call(_wire.CMD_HANDLE_TRANSFER, _wire.TRANSFER.pack(self._id(handle), key))
        return Handle(other, _wire.U64.unpack_from(reply.body)[0])

    # -- messages ----------------------------------------------------------------------------

    @overload
    async def send(
        self,
        destinations: HandleLike,
        payload: bytes | bytearray | memoryview = b"",
        *,
        handles: Iterable[HandleLike] = (),
        fds: Iterable[int | socket.socket] = (),
        priority: int = 0,
    ) -> None: ...

    @overload
    async def send(
        self,
        destinations: Sequence[HandleLike],
        payload: bytes | bytearray | memoryview = b"",
        *,
        handles: Iterable[HandleLike] = (),
        fds: Iterable[int | socket.socket] = (),
        priority: int = 0,
    ) -> tuple[CapbusError | None, ...]: ...

    async def send(
        self,
        destinations: HandleLike | Sequence[HandleLike],
        payload: bytes | bytearray | memoryview = b"",
        *,
        handles: Iterable[HandleLike] = (),
        fds: Iterable[int | socket.socket] = (),
        priority: int = 0,
    ) -> tuple[CapbusError | None, ...] | None:
        """Sends ``payload`` with ``handles`` and ``fds`` attached to one or many nodes.

        Payloads over ``PAYLOAD_MAX`` (128 KiB) travel as a sealed memfd that receivers map
        without a copy (up to 1 GiB). Each destination gets the whole message or nothing.
        Given one handle, failure raises;
        given a sequence, the result has one entry per destination: ``None`` where the message
        was queued, the exception where it was not (destroyed node, quota, ...). Errors about
        the message itself (too large, an attached handle we do not hold) always raise. The
        fds are duplicated into each receiver; the caller keeps its own.
        """
        return await self._send(destinations, payload, handles, fds, priority, 0)

    async def send_oneway(
        self,
        destinations: HandleLike | Sequence[HandleLike],
        payload: bytes | bytearray | memoryview = b"",
        *,
        handles: Iterable[HandleLike] = (),
        fds: Iterable[int | socket.socket] = (),
        priority: int = 0,
        tag: int | None = None,
    ) -> None:
        """Sends without waiting for the kernel's answer (as a one-way call would).

        The kernel answers only if the message did not reach some destination; each such
        failure then arrives through :meth:`recv` as a ``SEND_FAILED`` message naming the
        destination, the error, and the ``tag`` given here (an int below 2**61: the caller's
        own name for this send, e.g. an RPC question id). Half the frames of :meth:`send`,
        and no wait: for events and calls. Errors this peer can see itself (a handle of
        another peer, a payload over 1 GiB) still raise at once.
        """
        await self._send(destinations, payload, handles, fds, priority, _wire.SEND_FLAG_QUIET, tag)

    def send_oneway_nowait(
        self,
        destinations: HandleLike | Sequence[HandleLike],
        payload: bytes | bytearray | memoryview = b"",
        *,
        handles: Iterable[HandleLike] = (),
        fds: Iterable[int | socket.socket] = (),
        priority: int = 0,
        tag: int | None = None,
    ) -> None:
        """:meth:`send_oneway` if the socket takes the frame now, without a checkpoint; raises
        :class:`trio.WouldBlock` (and sends nothing) if it is full or another task is
        waiting to write. For code that must not yield, e.g. answering a call inline."""
        if self._write_lock.locked():
            raise trio.WouldBlock
        cookie, frame, fd_numbers, memfd = self._send_frame(
            destinations, payload, handles, fds, priority, _wire.SEND_FLAG_QUIET, tag
        )
        try:
            if not self._write_nowait(frame, fd_numbers):
                raise trio.WouldBlock
        finally:
            if memfd >= 0:
                os.close(memfd)

    def send_ids_nowait(
        self,
        destination: int,
        payload: bytes | bytearray | memoryview,
        handle_ids: Sequence[int],
        tag: int | None = None,
    ) -> bool:
        """:meth:`send_oneway_nowait` for raw ids of this peer's handles and no fds, in
        fewer steps (an RPC vat's every call and return); False (nothing sent) where that
        raises WouldBlock."""
        if len(payload) > _wire.PAYLOAD_MAX or len(handle_ids) > 1 or self._write_lock.locked():
            try:
                self.send_oneway_nowait(destination, payload, handles=handle_ids, tag=tag)
            except trio.WouldBlock:
                return False
            return True
        self._check_usable()
        if isinstance(payload, memoryview) and payload.format != "B":
            payload = payload.cast("B")
        flags = _wire.SEND_FLAG_QUIET
        if tag is None:
            cookie = self._new_cookie() | _wire.ONEWAY_COOKIE
        elif 0 <= tag <= _TAG_MASK:
            cookie = _wire.ONEWAY_COOKIE | _TAGGED | tag
            flags |= _wire.SEND_FLAG_TRACK
        else:
            raise InvalidArgument(f"a tag must be an int from 0 to {_TAG_MASK}")
        frame = _wire.send_frame(cookie, (destination,), handle_ids, 0, payload, 0, flags)
        return self._write_nowait(frame, ())

    def _send_frame(
        self,
        destinations: HandleLike | Sequence[HandleLike],
        payload: bytes | bytearray | memoryview,
        handles: Iterable[HandleLike],
        fds: Iterable[int | socket.socket],
        priority: int,
        flags: int,
        tag: int | None,
    ) -> tuple[int, list[bytes | bytearray | memoryview], list[int], int]:
        """A SEND frame: (its cookie, its buffers, the fds to attach, and the sealed memfd
        carrying a large payload, or -1: the caller closes it once the frame is written)."""
        self._check_usable()
        if isinstance(destinations, Handle | int):
            targets = [self._id(destinations)]
        else:
            targets = [self._id(d) for d in destinations]
        attached = [self._id(h) for h in handles]
        fd_numbers = [_fd_number(fd) for fd in fds]
        if isinstance(payload, memoryview) and payload.format != "B":
            payload = payload.cast("B")  # (sized in bytes, not items)
        # Refused here, before anything is written: a frame the socket cannot take fails the
        # write (EMSGSIZE), which must not be taken for a broken connection.
        large = len(payload) > _wire.PAYLOAD_MAX
        if len(fd_numbers) > _wire.FDS_MAX - large:
            limit = _wire.FDS_MAX - large
            why = " (a large payload's memfd is one more)" if large else ""
            raise MessageTooLarge(f"{len(fd_numbers)} file descriptors, over {limit} per message{why}")
        if len(targets) > _wire.DESTINATIONS_MAX:
            raise MessageTooLarge(f"{len(targets)} destinations, over {_wire.DESTINATIONS_MAX} per send")
        if len(attached) > _wire.HANDLES_MAX:
            raise MessageTooLarge(f"{len(attached)} handles, over {_wire.HANDLES_MAX} per message")
        oneway = flags & _wire.SEND_FLAG_QUIET
        if oneway and tag is not None:
            if not 0 <= tag <= _TAG_MASK:
                raise InvalidArgument(f"a tag must be an int from 0 to {_TAG_MASK}")
            cookie = _wire.ONEWAY_COOKIE | _TAGGED | tag
            flags |= _wire.SEND_FLAG_TRACK  # (told by an UNDELIVERED notice if it is lost)
        else:
            cookie = self._new_cookie() | (_wire.ONEWAY_COOKIE if oneway else 0)
        memfd = -1
        if len(payload) > _wire.PAYLOAD_MAX:
            memfd = _sealed_memfd(payload)
            fd_numbers.insert(0, memfd)
            payload = b""
            flags |= _wire.SEND_FLAG_MEMFD
        try:
            frame = _wire.send_frame(cookie, targets, attached, len(fd_numbers), payload, priority, flags)
        except BaseException:
            if memfd >= 0:
                os.close(memfd)
            raise
        return cookie, frame, fd_numbers, memfd

    async def _send(
        self,
        destinations: HandleLike | Sequence[HandleLike],
        payload: bytes | bytearray | memoryview,
        handles: Iterable[HandleLike],
        fds: Iterable[int | socket.socket],
        priority: int,
        flags: int,
        tag: int | None = None,
        checkpoint: bool = True,
    ) -> tuple[CapbusError | None, ...] | None:
        """Writes one SEND frame with ``flags``; unless it is one-way (QUIET), waits for the
        kernel's answer and returns (multicast) or raises (unicast) its results. A one-way
        send whose frame the socket took at once skips the final checkpoint when
        ``checkpoint`` is false (for callers that checkpoint anyway)."""
        cookie, frame, fd_numbers, memfd = self._send_frame(
            destinations, payload, handles, fds, priority, flags, tag
        )
        try:
            if flags & _wire.SEND_FLAG_QUIET:
                waited = await self._write(frame, fd_numbers)
                if checkpoint and not waited:
                    await trio.lowlevel.checkpoint()
                return None
            reply = await self._call(_wire.CMD_SEND, frame=frame, cookie=cookie, fds=fd_numbers, what="send")
        finally:
            if memfd >= 0:
                os.close(memfd)
        n_dest, _delivered = _wire.SEND_RESULT.unpack_from(reply.body)
        codes = struct.unpack_from(f"<{n_dest}i", reply.body, _wire.SEND_RESULT.size)
        results = tuple(error_from_errno(code, "send") if code else None for code in codes)
        if isinstance(destinations, Handle | int):
            if results[0] is not None:
                raise results[0]
            return None
        return results

    async def recv(self, *, priority: int | None = None) -> Message:
        """The next message or notification, in the global order.

        With ``priority`` (on a peer that :meth:`hold_messages`), the most urgent message at
        or above that priority instead, as the kernel chooses among all it holds for this
        peer (ties: the oldest; notifications count as priority 0); waits for one if there
        is none. See docs/peer-api.md "Priority".
        """
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
            raise TypeError(f"priority is an int (at least this urgent), not {priority!r}")
        if self._drained:
            raise self._shut_down()
        if self._flags & _wire.PEER_FLAG_HOLD:
            return self._arrived(await self._take(priority))
        if priority is not None:
            raise InvalidArgument(
                "recv(priority=...) chooses among the messages the kernel holds: call "
                "hold_messages() on this peer first"
            )
        inbox = self._inbox
        waited = False
        while True:
            if self._flags & _wire.PEER_FLAG_HOLD and not inbox:  # (held since it began)
                return self._arrived(await self._take(None))
            if not inbox:
                waited = await self._advance() or waited
            elif waited:
                break
            else:
                await trio.lowlevel.checkpoint()
                waited = True  # (and look again: another task may have taken the message)
        return self._arrived(inbox.popleft())

    async def _take(self, priority: int | None) -> Message:
        """recv on a peer that holds its messages: one CAPBUS_CMD_RECV at a time; the kernel
        writes the message it takes before its reply. A message written for a receive that
        was cancelled is in the inbox: returned first, as are any written before holding.
        Nothing is taken out of the inbox before the last checkpoint: a receive cancelled
        at any point leaves every message there."""
        async with self._recv_lock:
            while True:
                if self._best_in_inbox(priority) is not None:
                    await trio.lowlevel.checkpoint()
                    best = self._best_in_inbox(priority)  # (another task may have taken it)
                    if best is not None:
                        message = self._inbox[best]
                        del self._inbox[best]
                        return message
                    continue
                if not self._flags & _wire.PEER_FLAG_HOLD:  # (holding stopped meanwhile)
                    if priority is not None:
                        raise InvalidArgument("this peer stopped holding its messages: no priority receive")
                    return await self.recv()
                flags = 0 if priority is None else _wire.RECV_FLAG_PRIORITY
                body = _wire.RECV.pack(0 if priority is None else priority, flags)
                try:
                    await self._call(_wire.CMD_RECV, body)
                except ReceiveReplaced:
                    continue  # (replaced by another process's receive on this peer, or holding
                    # was turned off: looked at again)
                # (none in the inbox after the reply: the note it took was withdrawn, its
                # handle released first; ask again)

    def _best_in_inbox(self, priority: int | None) -> int | None:
        """Where in the inbox the message a receive takes is (the oldest, or the most
        urgent at or above ``priority``), or None."""
        inbox = self._inbox
        if not inbox:
            return None
        if priority is None:
            return 0
        best = max(range(len(inbox)), key=lambda i: (inbox[i].priority, -i))
        return best if inbox[best].priority >= priority else None

    def recv_nowait(self) -> Message:
        """The next message if one has arrived, else raises :class:`trio.WouldBlock`.
        While another task waits for the socket (a ``recv`` or a command waiting), only
        messages already read are returned: reading the socket under that task would leave
        it waiting for what was read (a command's reply, say). On a peer that holds its
        messages, only those already written to it (taking one from the kernel is a command:
        :meth:`recv`)."""
        self._check_usable()
        if self._drained:
            raise self._shut_down()
        while not self._inbox:
            if self._reading:
                raise trio.WouldBlock
            try:
                self._read_frame()
            except BlockingIOError:
                raise trio.WouldBlock from None
            except OSError as error:  # (as recv: the connection is broken, said once)
                self._broken = Disconnected(f"connection to the kernel failed: {error}")
            self._check_usable()
        return self._arrived(self._inbox.popleft())

    # -- graceful disconnect -------------------------------------------------------------------

    async def begin_shutdown(self, *, keep: Iterable[HandleLike] = ()) -> None:
        """Stops anyone reaching this peer, keeping what they already sent: the kernel
        destroys every node it owns in one transaction (their holders are told, in order;
        later sends to them fail). :meth:`recv` then returns what was queued for it, and
        after the last of it raises :class:`~capbus.errors.ShutDown`. Sending still works
        (to answer what is read), and making nodes (an answer's new object), though what
        comes to those after the end is not received. For a peer whose receive loop runs in
        another task; else :meth:`shutdown` does it all. See docs/peer-api.md "Graceful
        disconnect".

        ``keep``: nodes of its own that stay until it disconnects (where answers to its own
        calls arrive, say). Then :meth:`recv` goes on after what was queued: it returns a
        :attr:`MessageKind.DRAINED` message to say that nothing more comes to any other
        node, and later messages to those kept."""
        kept = [self._id(h) for h in keep]
        # Said before the command: its DRAINED may be read (by another task) before its reply.
        before, self._keeps = self._keeps, bool(kept)
        try:
            await self._call(_wire.CMD_SHUTDOWN, struct.pack(f"<{len(kept)}Q", *kept))
        except BaseException:
            self._keeps = before
            raise

    async def shutdown(self) -> list[Message]:
        """A graceful disconnect: :meth:`begin_shutdown`, then receives everything that was
        queued for this peer, then closes it. Returns what it received, in order (messages
        and notifications), so that nothing accepted for this peer is lost unread."""
        await self.begin_shutdown()
        remaining: list[Message] = []
        while True:
            try:
                remaining.append(await self.recv())
            except ShutDown:
                break
        await self.aclose()
        return remaining

    # -- bootstrap ---------------------------------------------------------------------------

    async def create_peer(self, payload: bytes = b"", *, handles: Iterable[HandleLike] = ()) -> socket.socket:
        """Creates a new peer whose seed message carries ``payload`` and ``handles`` (given
        from ours), and returns its connection, e.g. to hand to a child process, which reads
        the seed with :meth:`take_seed`. The new peer belongs to this peer's user."""
        ids = [self._id(h) for h in handles]
        reply = await self._call(_wire.CMD_PEER_CREATE, _wire.seed_body(ids, payload))
        if len(reply.fds) != 1:
            for fd in reply.fds:
                os.close(fd)
            raise Disconnected("the kernel did not pass the new peer's socket")
        return socket.socket(fileno=reply.fds[0])

    async def set_seed(self, payload: bytes = b"", *, handles: Iterable[HandleLike] = ()) -> None:
        """Replaces this peer's seed message; the seed holds one reference to each handle."""
        ids = [self._id(h) for h in handles]
        await self._call(_wire.CMD_SEED_SET, _wire.seed_body(ids, payload))

    async def take_seed(self) -> Message:
        """Takes this peer's seed (its handle references pass to the caller)."""
        reply = await self._call(_wire.CMD_SEED_TAKE)
        message = self._wrap(_wire.decode_message(reply.body, []))
        return message

    # -- lifetime ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Disconnects: the kernel destroys our nodes and releases our handles. Idempotent."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
            for message in self._inbox:
                message.close_fds()
            self._inbox.clear()
            for reply in self._replies.values():
                for fd in reply.fds:
                    os.close(fd)
            self._replies.clear()
        await trio.lowlevel.checkpoint()

    def detach(self) -> socket.socket:
        """Gives up this Peer object without disconnecting: returns the socket (to hand to
        a child, say). Nothing may be pending."""
        if self._replies or self._inbox or self._reading:
            raise trio.BusyResourceError("cannot detach a peer with pending traffic")
        self._closed = True
        return self._sock


_COMMAND_NAMES = {
    _wire.CMD_NODE_CREATE: "create_node",
    _wire.CMD_HANDLE_RELEASE: "release",
    _wire.CMD_NODES_DESTROY: "destroy",
    _wire.CMD_HANDLE_TRANSFER: "transfer",
    _wire.CMD_SEND: "send",
    _wire.CMD_PEER_QUERY: "info",
    _wire.CMD_PEER_CREATE: "create_peer",
    _wire.CMD_SEED_TAKE: "take_seed",
    _wire.CMD_SEED_SET: "set_seed",
    _wire.CMD_HANDLE_QUERY: "handle_state",
    _wire.CMD_PEER_SET_FLAGS: "set_flags",
    _wire.CMD_RECV: "recv",
    _wire.CMD_MONITOR_CREATE: "create_monitor",
    _wire.CMD_MONITOR_ATTACH: "attach_monitor",
}


async def connect(path: str | os.PathLike[str]) -> Peer:
    """Connects to a kernel daemon (``capbus kernel --listen PATH``) as a new peer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    # A blocking connect on a thread: a non-blocking connect to a unix socket whose backlog
    # is full fails with EAGAIN and leaves the socket unconnected but writable, which an
    # event loop takes for success (the first write then fails ENOTCONN). Cancellable: the
    # thread is then left to finish, and closes the socket itself (not closed under it).
    state = {"abandoned": False, "done": False}
    lock = threading.Lock()

    def connect_or_close() -> None:
        try:
            sock.connect(os.fspath(path))
        finally:
            with lock:
                state["done"] = True
                if state["abandoned"]:
                    sock.close()

    try:
        await trio.to_thread.run_sync(connect_or_close, abandon_on_cancel=True)
    except trio.Cancelled:
        with lock:
            state["abandoned"] = True
            if state["done"]:
                sock.close()
        raise
    except OSError as error:
        sock.close()
        # (socket errors name no path: say which, and what it usually means)
        hint = {
            errno.ENOENT: "no kernel listens there (start one: capbus kernel --listen PATH)",
            errno.ECONNREFUSED: "nothing accepts there (a kernel that is gone left the file)",
            errno.EACCES: "this user may not connect (the socket's file mode says who may)",
        }.get(error.errno or 0, error.strerror or "")
        raise type(error)(
            error.errno, f"cannot connect to {os.fspath(path)}: {hint}", os.fspath(path)
        ) from None
    except BaseException:
        sock.close()
        raise
    return Peer(sock)
