"""Large Data values as Cap'n Proto segments of their own, attached as sealed memfds.

A Data value that its sender already holds in a sealed memfd (a view of a whole
:class:`capbus.memfd.SealedMapping`, made with :func:`capbus.memfd.sealed_payload` or
:func:`capbus.memfd.seal`) is not copied into the message: the message gets one more
segment, and over the bus that segment is the memfd itself, attached to the bus1 message
as a file descriptor. Cap'n Proto allows it as it is: a double-far pointer reaches a list
that fills a whole segment with no landing pad inside it (the pad, two words, lies in a
segment of pads that the message carries inline). The receiver maps the memfd read-only,
after checking its seals and size (:func:`capbus.memfd.map_sealed`), and reads the value
as a view of the mapping: the bytes are never copied, by the sender or the receiver.

The shape, for the fast two-part envelope of header.py:

- segment 0: the envelope's header, segment 1: the body (params or results);
- segment 2: the landing pads, two words for each attached segment;
- segments 3 and up: the attached segments, in the order of the pads.

The message's segment table names every segment; the bus1 payload holds the table and the
segments up to where it ends (0-2 here); the segments the payload does not hold are the
message's last file descriptors, one each, in order. That rule is the whole of it on the
receiving side, whatever the envelope: a receiver maps them and reads the message as any
other (:func:`take_attached`). Over a byte stream every segment is written in line.

The body is read as a message of its own (header.py); with attached segments, that message
is the body, an empty segment in place of segment 1, then segments 2 and up: the same
segment numbers as in the whole envelope, so the body's far pointers mean the same thing
read either way (and one into its own segment's old number lands in the empty one: out of
bounds, not somewhere unchecked).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from .. import _wire
from ..memfd import MAPPING_HOLDS_FD, Unmappable, map_sealed, memfd_of
from .capwire import CapWireError, Segment, segment_table

PADS_SEGMENT = 2
FIRST_ATTACHED = 3

ATTACHED_MIN = _wire.PAYLOAD_MAX
"""A sealed Data value of at least this many bytes travels as a segment of its own; a
smaller one is copied in line (mapping a memfd costs more than copying that much)."""

_BYTE_LIST = 2
_EMPTY = memoryview(b"")


ATTACHED_MAX = _wire.FDS_MAX - 1
"""Values one message attaches at most (one fd each; the kernel takes FDS_MAX fds per
message, one of them the payload's memfd when the rest is large): past them, sealed
values are copied in line."""


def attachable(view: memoryview) -> int | None:
    """The memfd a Data value can travel in as a segment of its own, or None (copied in
    line): a whole sealed memfd of at least ATTACHED_MIN bytes, a whole number of words (a
    segment is; a mapping cannot reach past its file's end to pad one)."""
    if view.nbytes < ATTACHED_MIN or view.nbytes % 8:
        return None
    return memfd_of(view)


class NotMapped(Unmappable):
    """Attached segments over what the receiving peer maps (Peer.max_mapped_bytes): the
    message is refused as Overloaded, as a payload memfd over it is."""


def double_far(k: int) -> int:
    """The pointer that reaches attached segment ``k``'s value: a double-far pointer to its
    landing pad in the pads segment."""
    return 2 | (1 << 2) | ((2 * k) << 3) | (PADS_SEGMENT << 32)


def landing_pads(values: Sequence[memoryview]) -> bytes:
    """The pads segment: for each attached value, a far pointer to its segment's first
    word, then the tag that says what lies there (a list of its bytes)."""
    words = []
    for k, value in enumerate(values):
        words.append(2 | ((FIRST_ATTACHED + k) << 32))
        words.append(1 | (_BYTE_LIST << 32) | (value.nbytes << 35))
    return struct.pack(f"<{len(words)}Q", *words)


def segment_words(value: memoryview) -> int:
    return (value.nbytes + 7) // 8


def attached_sizes(payload: Segment, segments_max: int = 512) -> list[int]:
    """The sizes in bytes of the segments a framed payload names but does not hold (the
    attached ones), in order; [] for a message whose segments are all in line. Raises
    CapWireError for a table the payload cannot even hold, and for an attached segment of
    no words (nothing would need attaching)."""
    view = memoryview(payload).cast("B")
    sizes, offset = segment_table(view, segments_max)
    left = len(view) - offset
    for i, words in enumerate(sizes):
        if words * 8 > left:
            rest = [w * 8 for w in sizes[i:]]
            if left:
                raise CapWireError("the payload ends inside a segment")
            if 0 in rest:
                raise CapWireError("an attached segment of no words")
            return rest
        left -= words * 8
    return []


def take_attached(
    payload: Segment, fds: list[int], max_bytes: int, max_mapped: int | None = None
) -> list[memoryview]:
    """The attached segments of a received message, mapped (see the module docstring): the
    last file descriptors of ``fds``, as many as the payload's segment table names segments
    it does not hold, are taken out of ``fds`` and closed. [] when there are none. Raises
    CapWireError (a malformed table, fewer fds than attached segments, more than
    ``max_bytes`` in all), NotMapped (more than ``max_mapped``) or Unmappable (an fd that is
    not a sealed memfd of its segment's size): the message is refused, and every fd it
    brought is still in ``fds``."""
    sizes = attached_sizes(payload)
    if not sizes:
        return []
    if len(sizes) > len(fds):
        raise CapWireError(f"{len(sizes)} attached segments, but the message brought {len(fds)} fds")
    total = len(memoryview(payload).cast("B")) + sum(sizes)
    if total > max_bytes:
        raise CapWireError(
            f"a message of {total} bytes with its attached segments, over the limit of {max_bytes}"
        )
    if max_mapped is not None and sum(sizes) > max_mapped:
        raise NotMapped(
            f"a message of {total} bytes was not read here: its attached segments are over the"
            f" {max_mapped} bytes this peer maps"
        )
    taken = fds[len(fds) - len(sizes) :]
    views = [map_sealed(fd, size) for fd, size in zip(taken, sizes, strict=True)]
    del fds[len(fds) - len(sizes) :]
    for fd in taken:
        os.close(fd)
    return views


def body_alone(segments: Sequence[Segment]) -> list[Segment]:
    """The body of a fast-shape envelope with attached segments, as the message it is read
    as (see the module docstring)."""
    return [segments[1], _EMPTY, *segments[2:]]


def held_fds(attached: Sequence[memoryview]) -> int:
    """The fds of this process that mapped attached segments hold (CPython's mappings, before
    3.13)."""
    return len(attached) if MAPPING_HOLDS_FD else 0


__all__ = [
    "ATTACHED_MAX",
    "ATTACHED_MIN",
    "NotMapped",
    "FIRST_ATTACHED",
    "PADS_SEGMENT",
    "Unmappable",
    "attachable",
    "attached_sizes",
    "body_alone",
    "double_far",
    "held_fds",
    "landing_pads",
    "segment_words",
    "take_attached",
]
