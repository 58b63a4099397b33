"""Sealed memfds: how large payloads and Data segments travel without copies.

A payload or a Data value over the inline limit travels as a memfd sealed against writing,
shrinking and growing, so that a receiver can map it read-only and trust that what it
reads does not change under it. This module makes them (:func:`sealed_payload`,
:func:`seal`), finds the memfd a view already is (:func:`memfd_of`) and maps received ones
(:func:`map_sealed`), refusing what a hostile sender could use against the receiver.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import sys
import weakref
from collections.abc import Callable, Sequence

from . import _wire
from .errors import MessageTooLarge

_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# A large mapping is faulted in at once (one call, not one fault per page).
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _map(memfd: int, size: int) -> memoryview:
    """A received payload's memfd, mapped read-only (a write through the view's underlying
    object is refused); unmapped when the last view of it is deallocated (never earlier:
    cyclic garbage and atexit handlers may still read one). Not populated: pages are
    faulted in as a reader touches them. Before Python 3.13 the mapping keeps an fd of the
    file open for as long as it lives (MAPPING_HOLDS_FD: a vat counts it); from 3.13 on,
    trackfd=False drops it."""
    if MAPPING_HOLDS_FD:
        return memoryview(mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ))
    return memoryview(mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ, trackfd=False))  # type: ignore[call-arg]


MAPPING_HOLDS_FD = sys.version_info < (3, 13)
"""Whether a mapped payload keeps an fd of this process open (CPython's mmap before 3.13)."""


def _head(memfd: int, size: int) -> memoryview:
    """The first ``size`` bytes of a payload's memfd, read (not mapped: reading a hole of a
    sparse memfd allocates nothing, and the copy holds no fd)."""
    return memoryview(os.pread(memfd, size, 0))


def _sparse(memfd: int, size: int) -> bool:
    """Whether a memfd has a hole before its end: a reader would allocate those pages
    (charged to it, not to the sender that made the holes), so it is not read whole.
    (Not st_blocks: blocks allocated past the end count there too.)"""
    try:
        return os.lseek(memfd, 0, os.SEEK_HOLE) < size
    except OSError:
        return True


class SealedMapping(mmap.mmap):
    """A read-only mapping of a sealed memfd payload this process built
    (:func:`sealed_payload`), which keeps the memfd open: a payload that is a view of the
    whole of one is sent as that memfd (a duplicate of it), without a copy, however many
    times it is sent."""

    memfd: int

    def __new__(cls, memfd: int, size: int, flags: int, prot: int) -> SealedMapping:
        mapping = super().__new__(cls, memfd, size, flags, prot)
        mapping.memfd = os.dup(memfd)
        weakref.finalize(mapping, os.close, mapping.memfd)
        return mapping


def sealed_payload(size: int, fill: Callable[[memoryview], None]) -> memoryview:
    """A payload of ``size`` bytes that ``fill`` writes straight into a new memfd (given a
    writable view of it), sealed and mapped read-only: sending it (it is over
    PAYLOAD_MAX, or should be) copies nothing more, where bytes would be copied into a
    memfd at each send."""
    if size > _wire.MEMFD_MAX:
        raise MessageTooLarge(f"payload of {size} bytes is over the {_wire.MEMFD_MAX} byte limit")
    fd = os.memfd_create("capbus-payload", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        # Every page faulted in (and so written, zeroed): a receiver refuses a memfd with
        # holes, and a fill may well skip the zeros (fallocate's pages still count as holes).
        flags = mmap.MAP_SHARED | _POPULATE
        with mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE) as writable:
            with memoryview(writable) as view:
                fill(view)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)  # (no writable mapping is left)
        return memoryview(SealedMapping(fd, size, mmap.MAP_SHARED, mmap.PROT_READ))
    finally:
        os.close(fd)


def sealed_copy(parts: Sequence[bytes | bytearray | memoryview], size: int) -> memoryview:
    """:func:`sealed_payload` of the pieces ``parts`` (``size`` bytes in all), written with
    ``writev``: the kernel allocates each page as it copies into it, where a mapping is
    faulted in (and zeroed) first and then copied into: about half the time for 64 MiB."""
    if size > _wire.MEMFD_MAX:
        raise MessageTooLarge(f"payload of {size} bytes is over the {_wire.MEMFD_MAX} byte limit")
    fd = os.memfd_create("capbus-payload", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        views = [memoryview(part).cast("B") for part in parts]
        written = 0
        while views:
            done = os.writev(fd, views[:_IOV_MAX])
            written += done
            while views and done >= views[0].nbytes:
                done -= views.pop(0).nbytes
            if views and done:
                views[0] = views[0][done:]
        if written != size:
            raise ValueError(f"the parts hold {written} bytes, not {size}")
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        return memoryview(SealedMapping(fd, size, mmap.MAP_SHARED, mmap.PROT_READ))
    finally:
        os.close(fd)


_IOV_MAX = os.sysconf("SC_IOV_MAX")


def _sealed_memfd(payload: bytes | bytearray | memoryview) -> int:
    """A memfd holding ``payload``, sealed so that no receiver can see it change: a new one,
    or a duplicate of the one a view of a whole SealedMapping already is."""
    if isinstance(payload, memoryview) and isinstance(payload.obj, SealedMapping):
        whole = payload.obj
        if payload.c_contiguous and payload.nbytes == len(whole):  # (so all of it, from 0)
            return os.dup(whole.memfd)
    if len(payload) > _wire.MEMFD_MAX:
        raise MessageTooLarge(f"payload of {len(payload)} bytes is over the {_wire.MEMFD_MAX} byte limit")
    fd = os.memfd_create("capbus-payload", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(payload).cast("B")
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def memfd_of(view: memoryview) -> int | None:
    """The memfd a view is all of (a view of a whole :class:`SealedMapping`), which can be
    sent as it is; None for anything else (that would be copied)."""
    whole = view.obj
    if isinstance(whole, SealedMapping) and view.c_contiguous and view.nbytes == len(whole):
        return whole.memfd
    return None


def seal(memfd: int) -> memoryview:
    """A memfd the caller wrote (made with ``os.memfd_create(name, os.MFD_ALLOW_SEALING)``),
    sealed against writing, shrinking and growing and mapped read-only: the view can be
    sent (as a payload, or as a Data value) any number of times without a copy. ``memfd``
    stays the caller's to close. Raises OSError (EBUSY) while a writable mapping of it
    exists, (EPERM) if it was made without MFD_ALLOW_SEALING or is sealed already against
    adding seals; and ValueError if it has holes (a receiver refuses those)."""
    size = os.fstat(memfd).st_size
    if size > _wire.MEMFD_MAX:
        raise MessageTooLarge(f"memfd of {size} bytes is over the {_wire.MEMFD_MAX} byte limit")
    if size and _sparse(memfd, size):
        raise ValueError("the memfd has holes (pages never written): a receiver would refuse it")
    missing = _SEALS & ~fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
    if missing:
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, missing)
    return memoryview(SealedMapping(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ))


_RECEIVER_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


class Unmappable(ValueError):
    """A received memfd that is not mapped: why, for its sender."""


_TMPFS_MAGIC = 0x01021994
_STATFS_BYTES = 256  # (struct statfs is 120 bytes on x86-64 and arm64; f_type comes first)


def on_shmem(fd: int) -> bool:
    """Whether ``fd`` is a file on shmem (tmpfs), as an ordinary memfd is: not hugetlbfs,
    whose memfds report no holes (lseek(SEEK_HOLE) there finds none)."""
    buffer = ctypes.create_string_buffer(_STATFS_BYTES)
    if _libc.fstatfs(fd, buffer) != 0:
        return False
    return ctypes.c_long.from_buffer(buffer).value == _TMPFS_MAGIC


# fstatfs through ctypes: the standard library has statvfs, which does not give the type.
_libc = ctypes.CDLL(None, use_errno=True)


def map_sealed(fd: int, size: int) -> memoryview:
    """A received fd that must be a sealed memfd of exactly ``size`` bytes (a Cap'n Proto
    segment: whole words), mapped read-only. The fd stays the caller's to close. Raises
    Unmappable when it is not a memfd, not sealed against writing, shrinking and growing
    (its sender could change or truncate it under the reader), of another size, not on
    shmem (a hugetlbfs memfd reports no holes), sparse (its holes would be this process's
    memory to fill), or this process cannot map it."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise Unmappable("an attached segment is not a memfd") from None
    if seals & _RECEIVER_SEALS != _RECEIVER_SEALS:
        raise Unmappable("an attached segment's memfd is not sealed against write, shrink and grow")
    actual = os.fstat(fd).st_size
    if actual != size:  # (a segment is whole words; a mapping cannot pad past the file's end)
        raise Unmappable(f"an attached segment's memfd holds {actual} bytes, not the segment's {size}")
    if not on_shmem(fd):
        raise Unmappable(
            "an attached segment's memfd is not on shmem (huge pages?): its holes cannot be"
            " checked, and would be this process's memory to fill"
        )
    if _sparse(fd, actual):
        raise Unmappable("an attached segment's memfd has holes that reading would make this process fill")
    try:
        return _map(fd, size)
    except OSError as error:
        raise Unmappable(f"this process could not map an attached segment ({error.strerror})") from None
