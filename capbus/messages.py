"""What a peer receives, as plain data: messages, their kinds, handles, senders' credentials.

No IO here (the peer, capbus/peer.py, reads them from its kernel connection): the RPC
engine (capbus/rpc/engine.py) takes these without importing the peer or trio.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import _wire
from .errors import CapbusError

if TYPE_CHECKING:
    from .peer import Peer


class MessageKind(enum.Enum):
    """What a received :class:`Message` is."""

    DATA = _wire.MSG_DATA
    """A message someone sent to one of our nodes."""
    NODE_DESTROYED = _wire.MSG_NODE_DESTROY
    """A node we hold a handle to (or own) was destroyed; ``destination`` is our handle."""
    NODE_RELEASED = _wire.MSG_NODE_RELEASE
    """The last handle any other peer held to our node ``destination`` is gone."""
    MONITOR = _wire.MSG_MONITOR
    """A copy of some traffic, for a peer granted the monitor capability."""
    DRAINED = _wire.MSG_DRAINED
    """After :meth:`Peer.begin_shutdown`: every message queued for this peer came before this
    one. :meth:`Peer.recv` raises :class:`~capbus.errors.ShutDown` for it."""
    UNDELIVERED = _wire.MSG_UNDELIVERED
    """A one-way send given a ``tag`` did not reach ``destination`` (our handle to its node):
    its receiver disconnected before the message was written to it. ``tag`` names the send,
    ``seq`` is the lost message's place in the global order."""
    SEND_FAILED = 0x100
    """A :meth:`Peer.send_oneway` did not reach ``destination`` (``error`` says why). Not from
    the kernel's queue: made by this peer from the kernel's answer, in the order it came."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who sent a message, as the kernel saw it at send time (it cannot be forged)."""

    uid: int
    gid: int
    pid: int
    process_id: int = 0
    """The sending process's pidfs inode: unique for the boot, never reused; 0 if unknown.
    :meth:`open_pidfd` uses it to get a pidfd that surely refers to the sender."""
    peer: int = 0
    """The sending peer's serial: unique for the kernel's life, and the same for every
    process that writes on that peer's connection (a forked child, say); 0 if unknown."""

    def open_pidfd(self) -> int:
        """A pidfd for the process that sent the message, checked against ``process_id``.

        Raises :class:`ProcessLookupError` if that process is gone (even if its pid now
        belongs to another process), so the fd can be trusted for signals and checks.
        """
        if not self.pid or not self.process_id:
            raise ProcessLookupError("the kernel could not identify the sending process")
        pidfd = os.pidfd_open(self.pid)
        if os.fstat(pidfd).st_ino != self.process_id:
            os.close(pidfd)
            raise ProcessLookupError(f"process {self.pid} is no longer the sender")
        return pidfd


class Handle:
    """A peer-local reference to a node: an id that means something only in its peer.

    Two handles are equal when they are the same id in the same peer; since the kernel gives
    a peer one id per node, equal handles mean the same node. Handles are plain values:
    dropping a Handle object does not release anything (use :meth:`Peer.release`).
    """

    __slots__ = ("peer", "id")

    def __init__(self, peer: Peer, id: int) -> None:
        self.peer = peer
        self.id = id

    @property
    def is_owner(self) -> bool:
        """True for the owner's handle to its own node."""
        return self.is_valid and not self.id & _wire.HANDLE_FLAG_REMOTE

    @property
    def is_valid(self) -> bool:
        """False for a handle whose node was already destroyed when it arrived."""
        return self.id != _wire.HANDLE_INVALID

    def __int__(self) -> int:
        return self.id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Handle) and other.peer is self.peer and other.id == self.id

    def __hash__(self) -> int:
        return hash((id(self.peer), self.id))

    def __repr__(self) -> str:
        if not self.is_valid:
            return "<Handle invalid>"
        return f"<Handle {self.id:#x}{' owner' if self.is_owner else ''}>"


HandleLike = Handle | int
"""A :class:`Handle` of this peer, or its raw integer id."""


@dataclass(eq=False, slots=True)
class Message:
    """One entry of a peer's queue: data or a notification.

    ``fds`` are file descriptors now owned by the receiver: keep them, or :meth:`close_fds`.
    """

    kind: MessageKind
    destination: Handle
    payload_view: memoryview
    handles: tuple[Handle, ...] = ()
    fds: list[int] = field(default_factory=list)
    priority: int = 0
    seq: int = 0
    sender: Credentials | None = None
    continues: bool = False
    """True when the next message belongs to the same transaction (same multicast or destroy)."""
    error: CapbusError | None = None
    """For SEND_FAILED and UNDELIVERED: why the one-way send did not reach ``destination``."""
    tag: int | None = None
    """For SEND_FAILED and UNDELIVERED: the ``tag`` the one-way send was given, if any."""
    whole_size: int | None = None
    """None when ``payload_view`` is the whole payload. Else the payload's size, and
    ``payload_view`` holds only its start (:data:`PAYLOAD_HEAD_BYTES`): a memfd payload
    larger than :attr:`Peer.max_mapped_bytes`, one this process had no address space left
    to map (a sandbox's RLIMIT_AS), or a sparse one (its sender left holes that reading
    would make this process allocate). Enough to tell its sender why it was not read."""
    unread: str = ""
    """With ``whole_size``: why the payload was not read whole."""
    draining: bool = False
    """For NODE_DESTROYED: its owner shut down gracefully (:meth:`Peer.begin_shutdown`), so
    what was sent to the node before still gets read, and perhaps answered. A second
    NODE_DESTROYED, without it, says when that owner is gone."""

    @property
    def payload(self) -> bytes:
        """The payload as bytes (``payload_view`` is the same without a copy)."""
        return bytes(self.payload_view)

    def close_fds(self) -> None:
        """Closes every fd still in ``fds``."""
        while self.fds:
            os.close(self.fds.pop())
