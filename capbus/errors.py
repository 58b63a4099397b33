"""Exceptions of the peer API, one per thing that can go wrong, each with bus1's errno.

Every error the kernel reports is a :class:`CapbusError` (an :class:`OSError`, so ``.errno``
holds the number the kernel sent). The subclass says what happened; the errno is the one
bus1 uses for it, so code written against bus1's documentation reads the same.
"""

from __future__ import annotations

import errno as _errno
import os


class CapbusError(OSError):
    """Base class: the kernel refused an operation. ``errno`` says why."""

    default_errno: int = _errno.EIO

    def __init__(self, message: str | None = None, *, code: int | None = None) -> None:
        number = self.default_errno if code is None else code
        super().__init__(number, message or os.strerror(number))


class NoSuchHandle(CapbusError):
    """The handle id is not one this peer holds (never was, or already released). ENXIO."""

    default_errno = _errno.ENXIO


class NodeDestroyed(CapbusError):
    """The node behind the handle was destroyed (or its owner disconnected). EHOSTUNREACH."""

    default_errno = _errno.EHOSTUNREACH


class QuotaExceeded(CapbusError):
    """A resource limit would be exceeded; the operation had no effect. EDQUOT."""

    default_errno = _errno.EDQUOT


class MessageTooLarge(CapbusError):
    """Payload, handles or fds over the per-message limit, or an oversized frame. EMSGSIZE."""

    default_errno = _errno.EMSGSIZE


class Disconnected(CapbusError):
    """The connection to the kernel is gone (the kernel stopped, or hung up on us). ESHUTDOWN."""

    default_errno = _errno.ESHUTDOWN


class InvalidArgument(CapbusError):
    """A field of the request is invalid (a count, a flag, a layout). EINVAL."""

    default_errno = _errno.EINVAL


class ShutDown(Disconnected):
    """This peer shut down (:meth:`Peer.begin_shutdown`) and has received everything that
    was queued for it: nothing more will come."""


class Undelivered(Disconnected):
    """The receiver disconnected before the message was written to it (an UNDELIVERED
    notice's ``error``): it never saw it, so sending it again elsewhere is safe."""


class NotOwner(CapbusError):
    """Only a node's owner may do this (destroy). EREMOTE."""

    default_errno = _errno.EREMOTE


class NotPermitted(CapbusError):
    """The kernel does not trust this peer for it (making a monitor node: root, the kernel's
    own uid, or a peer its embedder granted the monitor). EPERM."""

    default_errno = _errno.EPERM


class AlreadyDestroyed(CapbusError):
    """The node was already destroyed. ESTALE."""

    default_errno = _errno.ESTALE


class HandleBusy(CapbusError):
    """The owner's pinned reference to a live node cannot be released; destroy it first. EBUSY."""

    default_errno = _errno.EBUSY


class DuplicateId(CapbusError):
    """The same handle appears twice in a list that must be distinct. ENOTUNIQ."""

    default_errno = _errno.ENOTUNIQ


class NotSupported(CapbusError):
    """The kernel refuses this kind of object (unix sockets cannot be attached). EOPNOTSUPP."""

    default_errno = _errno.EOPNOTSUPP


class MalformedFrame(CapbusError):
    """The kernel could not parse a frame. EBADMSG."""

    default_errno = _errno.EBADMSG


class UnknownCommand(CapbusError):
    """The kernel does not know the command. ENOTTY, as for an unknown bus1 ioctl."""

    default_errno = _errno.ENOTTY


class NoSuchPeer(CapbusError):
    """A handle transfer named a peer the kernel does not know (or that is gone). ESRCH."""

    default_errno = _errno.ESRCH


class NoSeed(CapbusError):
    """This peer has no seed message. ENOENT."""

    default_errno = _errno.ENOENT


class BadFileDescriptor(CapbusError):
    """An attached fd is not what the operation needs (a memfd payload that is no memfd). EBADF."""

    default_errno = _errno.EBADF


class NotSealed(CapbusError):
    """A memfd payload is not sealed against writing, shrinking and growing. ETXTBSY, as in kdbus."""

    default_errno = _errno.ETXTBSY


class KernelOutOfFds(CapbusError):
    """The kernel process had no file descriptor left to take this frame's fds (its fd table is
    full: the program embedding it used them up). Nothing was done; trying later may work.
    EMFILE."""

    default_errno = _errno.EMFILE


class ReceiveReplaced(CapbusError):
    """A waiting receive of a peer that holds its messages was replaced by a newer one (or
    holding was turned off): it took nothing. ECANCELED."""

    default_errno = _errno.ECANCELED


_BY_ERRNO: dict[int, type[CapbusError]] = {
    cls.default_errno: cls
    for cls in (
        NoSuchHandle,
        NodeDestroyed,
        QuotaExceeded,
        MessageTooLarge,
        Disconnected,
        InvalidArgument,
        NotOwner,
        NotPermitted,
        AlreadyDestroyed,
        HandleBusy,
        DuplicateId,
        NotSupported,
        MalformedFrame,
        UnknownCommand,
        NoSuchPeer,
        NoSeed,
        BadFileDescriptor,
        NotSealed,
        KernelOutOfFds,
        ReceiveReplaced,
    )
}


def error_from_errno(number: int, context: str = "") -> CapbusError:
    """The exception for an errno the kernel sent, with a message naming the operation."""
    cls = _BY_ERRNO.get(number, CapbusError)
    text = os.strerror(number)
    return cls(f"{context}: {text}" if context else text, code=number)
