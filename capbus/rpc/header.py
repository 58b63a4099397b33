"""The envelope's header, written and read by hand: the fast path of every plain call.

Most envelopes are a Call to a node or a Return with results. capbus writes those as a
message of two parts: segment 0 holds only the header (the root pointer, the Envelope, the
Call or Return struct, packed here with :mod:`struct`), and the params or results struct is
a message of its own, built by pycapnp, that becomes segments 1 and up. The header's
AnyPointer reaches it with a far pointer to segment 1, word 0, where the body's own root
pointer serves as the landing pad. That is a valid Cap'n Proto message which any reader
decodes, and it saves most of the cost of building and reading the envelope through
pycapnp, which dominated a small call.

:func:`read` recognises exactly that shape (every pointer word must have the one value this
module writes) and returns None for anything else, which then goes the general way
(protocol.decode through pycapnp); so a hostile message gains nothing by imitating it.
Offsets come from the envelope schema, checked at import.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .capwire import CAPABILITY, Segment
from .envelope import rpc

_STRUCT_POINTER_SHIFT_DATA, _STRUCT_POINTER_SHIFT_POINTERS = 32, 48
_FAR_TO_SEGMENT_1 = 2 | (1 << 32)
"""A far pointer (single landing pad) to segment 1, word 0."""


def _struct_pointer(offset: int, data_words: int, pointer_words: int) -> int:
    return (
        (offset << 2)
        | (data_words << _STRUCT_POINTER_SHIFT_DATA)
        | (pointer_words << _STRUCT_POINTER_SHIFT_POINTERS)
    )


def _shape(schema: object) -> tuple[int, int]:
    node = schema.node.struct  # type: ignore[attr-defined]
    return node.dataWordCount, node.pointerCount


def _slots(schema: object) -> dict[str, int]:
    return {f.name: f.slot.offset for f in schema.node.struct.fields if f.which() == "slot"}  # type: ignore[attr-defined]


_ENVELOPE_DATA, _ENVELOPE_POINTERS = _shape(rpc.Envelope.schema)
_CALL_DATA, _CALL_POINTERS = _shape(rpc.Call.schema)
_RETURN_DATA, _RETURN_POINTERS = _shape(rpc.Return.schema)
_CALL_SLOTS = _slots(rpc.Call.schema)
_RETURN_SLOTS = _slots(rpc.Return.schema)
_TARGET = rpc.Call.schema.fields["target"].schema.node.struct
_ENVELOPE_WHICH = {f.name: f.discriminantValue for f in rpc.Envelope.schema.node.struct.fields}
_RETURN_WHICH = {f.name: f.discriminantValue for f in rpc.Return.schema.node.struct.fields}

# The layout this module writes, checked against the schema (a change to rpc.capnp that
# moves these fails loudly here rather than writing wrong bytes).
assert (_ENVELOPE_DATA, _ENVELOPE_POINTERS) == (1, 1)
assert rpc.Envelope.schema.node.struct.discriminantOffset == 0
assert (_CALL_DATA, _CALL_POINTERS) == (3, 3)
assert _CALL_SLOTS == {
    "questionId": 0,
    "interfaceId": 1,
    "methodId": 8,
    "replyTo": 0,
    "params": 2,
    "keepResults": 160,
}
assert _TARGET.discriminantOffset == 9
assert {f.name: (f.discriminantValue, f.slot.offset) for f in _TARGET.fields} == {
    "node": (0, 0),
    "promisedAnswer": (1, 1),
}
assert (_RETURN_DATA, _RETURN_POINTERS) == (2, 1)
assert rpc.Return.schema.node.struct.discriminantOffset == 4
assert _RETURN_SLOTS["results"] == 0

_ROOT = _struct_pointer(0, _ENVELOPE_DATA, _ENVELOPE_POINTERS)
_TO_CALL = _struct_pointer(0, _CALL_DATA, _CALL_POINTERS)
_TO_RETURN = _struct_pointer(0, _RETURN_DATA, _RETURN_POINTERS)
_ENVELOPE_CALL = _ENVELOPE_WHICH["call"]
_ENVELOPE_RETURN = _ENVELOPE_WHICH["return"]
_RETURN_RESULTS = _RETURN_WHICH["results"]
_KEEP_RESULTS_BIT = 1 << 32  # bit 160 of the data section: word 2, bit 32

# Call header: root, Envelope (data, pointer), Call (3 data words, 3 pointers).
_CALL_HEADER = struct.Struct("<9Q")
# Return header: root, Envelope (data, pointer), Return (2 data words, 1 pointer).
_RETURN_HEADER = struct.Struct("<6Q")
CALL_HEADER_BYTES = _CALL_HEADER.size
RETURN_HEADER_BYTES = _RETURN_HEADER.size


def call(
    question_id: int, interface_id: int, method_id: int, reply_index: int | None, keep_results: bool
) -> bytes:
    """Segment 0 of a call to a node whose params struct is the root of segment 1;
    ``reply_index``: the reply capability's index in the message's table, None if one-way."""
    word2 = method_id | (_KEEP_RESULTS_BIT if keep_results else 0)  # target: node (0)
    reply = 0 if reply_index is None else CAPABILITY | (reply_index << 32)
    return _CALL_HEADER.pack(
        _ROOT, _ENVELOPE_CALL, _TO_CALL, question_id, interface_id, word2, reply, 0, _FAR_TO_SEGMENT_1
    )


def return_(question_id: int) -> bytes:
    """Segment 0 of a return whose results struct is the root of segment 1."""
    return _RETURN_HEADER.pack(
        _ROOT, _ENVELOPE_RETURN, _TO_RETURN, question_id, _RETURN_RESULTS, _FAR_TO_SEGMENT_1
    )


@dataclass(slots=True, frozen=True)
class CallHeader:
    question_id: int
    interface_id: int
    method_id: int
    reply_index: int | None
    keep_results: bool


def read(segments: Sequence[Segment]) -> CallHeader | int | None:
    """A call header (:class:`CallHeader`) or a return's question id, when the message has
    exactly the shape :func:`call` or :func:`return_` writes and a body in segment 1 on;
    None otherwise (decode it the general way)."""
    if len(segments) < 2:
        return None
    head = segments[0]
    size = len(head)
    if size == CALL_HEADER_BYTES:
        return _call_header(_CALL_HEADER.unpack(head))
    if size == RETURN_HEADER_BYTES:
        return _return_header(_RETURN_HEADER.unpack(head))
    return None


def read_framed(payload: Segment) -> tuple[CallHeader | int, memoryview] | None:
    """:func:`read` of a whole framed message of exactly two segments, and its body (segment
    1) as a view; None for any other message. One unpack for the segment table and the
    header together: this runs on every call and return."""
    view = memoryview(payload)
    size = view.nbytes
    if size < _RETURN_FRAME.size or view.format != "B":
        return None
    count, head_words, body_words = TWO_SEGMENTS.unpack_from(view)
    parsed: CallHeader | int | None
    if count != 1:
        return None
    if head_words == CALL_HEADER_BYTES // 8 and size >= _CALL_FRAME.size:
        start = _CALL_FRAME.size
        parsed = _call_header(_CALL_FRAME.unpack_from(view)[3:])
    elif head_words == RETURN_HEADER_BYTES // 8:
        start = _RETURN_FRAME.size
        parsed = _return_header(_RETURN_FRAME.unpack_from(view)[3:])
    else:
        return None
    if parsed is None or start + body_words * 8 != size:
        return None
    return parsed, view[start:]


def _call_header(words: Sequence[int]) -> CallHeader | None:
    root, which, to, question_id, interface_id, word2, reply, promised, params = words
    if (
        root != _ROOT
        or which != _ENVELOPE_CALL
        or to != _TO_CALL
        or promised
        or params != _FAR_TO_SEGMENT_1
        or word2 & ~(0xFFFF | _KEEP_RESULTS_BIT)  # a pipelined target, or unknown bits
    ):
        return None
    if reply == 0:
        reply_index = None
    elif reply & 0xFFFFFFFF == CAPABILITY:
        reply_index = reply >> 32
    else:
        return None
    return CallHeader(question_id, interface_id, word2 & 0xFFFF, reply_index, bool(word2 & _KEEP_RESULTS_BIT))


def _return_header(words: Sequence[int]) -> int | None:
    root, which, to, question_id, discriminant, results = words
    if (
        root != _ROOT
        or which != _ENVELOPE_RETURN
        or to != _TO_RETURN
        or discriminant != _RETURN_RESULTS
        or results != _FAR_TO_SEGMENT_1
    ):
        return None
    return int(question_id)


TWO_SEGMENTS = struct.Struct("<III4x")
"""The segment table of a header plus a one-segment body: count - 1, and the two sizes in
words (padded to a whole word)."""

_CALL_FRAME = struct.Struct("<III4x9Q")  # the segment table of two, then a call header
_RETURN_FRAME = struct.Struct("<III4x6Q")  # ... then a return header
