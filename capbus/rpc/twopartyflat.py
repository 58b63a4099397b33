"""rpc.capnp's hot messages (Call, Return, Finish) written and read with :mod:`struct`.

Most calls over a connection name an imported capability, carry a flat params struct
(flat.py: numbers, bools, enums, Text, Data) and no capability, and return the same kind of
results. Building each of those three messages through pycapnp (a message, builders, a
setattr per field, ``to_segments``) and reading it back the same way cost more than the rest
of a call; here they are one ``struct.pack`` each way, laid out as libcapnp lays out a freshly
built message (root pointer, Message, Call or Return, its target and Payload, then the
content struct from flat.py).

Reading takes a message apart only if it has that plain shape: one segment, every pointer
on the way a near struct pointer within the segment, no capability table, the kinds this
module reads (a Call to an imported capability with results to the caller, a Return of
results, a Finish). Anything else, from any writer (a far pointer, a promisedAnswer
target, an exception, capabilities), is ``None`` here and read through pycapnp, which also
says what is wrong with a malformed one (twoparty.py). Every offset is bounds-checked
against the segment; what is read of the content is flat.py's FlatReader, which checks
again.

Written by hand rather than through a library for the reason flat.py gives: pycapnp is the
Cap'n Proto library here, and its builders and readers are what this avoids. The layouts are
rpc.capnp's (checked against pycapnp's own schema at import: :func:`_check_layouts`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .capwire import Segment
from .flat import flat_codec
from .interface import Method
from .structs import StructReader

_WORD = 8
_WORDS = struct.Struct("<Q")
_TWO_WORDS = struct.Struct("<QQ")

# Message: a union (its discriminant the first 16 bits of its one data word), one pointer.
_MESSAGE_CALL, _MESSAGE_RETURN, _MESSAGE_FINISH = 2, 3, 4


def _struct_pointer(offset: int, data_words: int, pointer_words: int) -> int:
    return ((offset & 0x3FFFFFFF) << 2) | (data_words << 32) | (pointer_words << 48)


_ROOT_TO_MESSAGE = _struct_pointer(0, 1, 1)
_TO_CALL = _struct_pointer(0, 3, 3)  # (from the Message's pointer: the Call follows it)
_CALL_TO_TARGET = _struct_pointer(2, 1, 1)  # (past the Call's other two pointers)
_CALL_TO_PAYLOAD = _struct_pointer(3, 0, 2)  # (past the target's two words)
_TO_RETURN = _struct_pointer(0, 2, 1)
_RETURN_TO_PAYLOAD = _struct_pointer(0, 0, 2)
_TO_FINISH = _struct_pointer(0, 1, 0)
_NO_TABLE = bytes(_WORD)  # a Payload's null capTable: no capabilities
_RELEASE_PARAM_CAPS_NOT = 1 << 32
"""Return.releaseParamCaps (bit 32, default true) stored as false: capbus releases each
param capability when its client goes, never all at once."""
_NO_FINISH_NEEDED = 1 << 33
"""Return.noFinishNeeded: results without capabilities to a caller that will not pipeline
on them; the callee forgot the answer as it sent it."""
_NO_PROMISE_PIPELINING = 1 << 1
"""Call.noPromisePipelining (bit 129: bit 1 of the Call's third data word)."""
_RELEASE_RESULT_CAPS_NOT = 1 << 32
"""Finish.releaseResultCaps likewise."""


def _frame(words: int) -> bytes:
    """The stream framing of a one-segment message of ``words`` words."""
    return struct.pack("<II", 0, words)


def _content_pointer(parts: list[bytes | memoryview]) -> bytes:
    """flat.py's root pointer (offset 0: the struct right after it) made the Payload's
    content pointer, whose struct starts one word later (past the capTable pointer)."""
    root = _WORDS.unpack(parts[0])[0]
    return _WORDS.pack(root | (1 << 2))


def encode_call(
    question_id: int,
    import_id: int,
    method: Method,
    params: Mapping[str, Any],
    *,
    no_pipelining: bool = False,
) -> bytes | None:
    """A framed Call of ``method`` on import ``import_id`` with ``params`` (results to the
    caller, no capabilities); None if the params are not flat (twoparty.encode_call then).
    ``no_pipelining``: the caller promises no call pipelined on the results (so the callee
    may answer flat results with noFinishNeeded: no Finish goes)."""
    codec = flat_codec(method.params)
    if codec is None:
        return None
    parts = codec.parts(params)
    if parts is None:
        return None
    header = struct.pack(
        "<QQQIHHQQQQQIIQ",
        _ROOT_TO_MESSAGE,
        _MESSAGE_CALL,
        _TO_CALL,
        question_id,
        method.ordinal,
        0,  # sendResultsTo: caller
        method.interface_id,
        _NO_PROMISE_PIPELINING if no_pipelining else 0,
        _CALL_TO_TARGET,
        _CALL_TO_PAYLOAD,
        0,  # (sendResultsTo.thirdParty)
        import_id,
        0,  # MessageTarget: importedCap
        0,  # (promisedAnswer)
    )
    return _framed(header, parts)


def encode_results(
    answer_id: int, method: Method, results: Mapping[str, Any], *, no_finish_needed: bool = False
) -> bytes | None:
    """A framed Return of flat ``results``; None if they are not flat. ``no_finish_needed``:
    the callee has forgotten the answer already (the caller sends no Finish)."""
    codec = flat_codec(method.results)
    if codec is None:
        return None
    parts = codec.parts(results)
    if parts is None:
        return None
    header = struct.pack(
        "<QQQIIQQ",
        _ROOT_TO_MESSAGE,
        _MESSAGE_RETURN,
        _TO_RETURN,
        answer_id,
        (_RELEASE_PARAM_CAPS_NOT | (_NO_FINISH_NEEDED if no_finish_needed else 0)) >> 32,
        0,  # the union: results
        _RETURN_TO_PAYLOAD,
    )
    return _framed(header, parts)


def _framed(header: bytes, parts: list[bytes | memoryview]) -> bytes:
    """A framed one-segment message: ``header`` (the words up to the Payload), the Payload
    (its content pointer, no capTable), then the content struct and its blobs."""
    pieces = [header, _content_pointer(parts), _NO_TABLE, *parts[1:]]
    size = sum(len(p) for p in pieces)
    return b"".join([_frame(size // _WORD), *pieces])


def encode_finish(question_id: int) -> bytes:
    """A framed Finish (result capabilities released one by one, as their clients go)."""
    return _frame(4) + struct.pack(
        "<QQQQ", _ROOT_TO_MESSAGE, _MESSAGE_FINISH, _TO_FINISH, question_id | _RELEASE_RESULT_CAPS_NOT
    )


# -- reading --------------------------------------------------------------------------------


class _NotPlain(Exception):
    """Not of the shape read here: pycapnp reads it."""


def _struct_at(segment: memoryview, at: int) -> tuple[int, int, int, int]:
    """The struct a near pointer at byte ``at`` points to: (data start, data bytes, pointer
    start, pointer count), all within the segment; a null pointer is an empty struct."""
    word = _WORDS.unpack_from(segment, at)[0]
    if not word:
        return at, 0, at, 0
    if word & 3:
        raise _NotPlain  # (a list, far or other pointer where a struct should be)
    offset = (word >> 2) & 0x3FFFFFFF
    if offset & 0x20000000:
        offset -= 0x40000000
    data_words, pointer_words = (word >> 32) & 0xFFFF, word >> 48
    start = at + _WORD + offset * _WORD
    end = start + (data_words + pointer_words) * _WORD
    if start < 0 or end > len(segment):
        raise _NotPlain
    return start, data_words * _WORD, start + data_words * _WORD, pointer_words


def _word(segment: memoryview, start: int, size: int, at: int) -> int:
    """The data word at byte ``at`` of a data section (0 past its end: a default)."""
    return _WORDS.unpack_from(segment, start + at)[0] if at + _WORD <= size else 0


@dataclass(frozen=True, slots=True)
class FlatContent:
    """A payload's content (a struct pointer at ``at`` in ``segment``) with no capability
    table: read as a flat struct where it is one."""

    segment: memoryview
    at: int

    def read(self, schema: Any, general: Callable[[], StructReader]) -> StructReader:
        """The content as a struct of ``schema``: a FlatReader if that struct is flat, else
        ``general()`` (pycapnp's reading of the whole message)."""
        codec = flat_codec(schema)
        if codec is None or codec.reader_class is None:
            return general()
        return codec.reader_class._of([self.segment], general, self.at)


@dataclass(frozen=True, slots=True)
class HotCall:
    question_id: int
    interface_id: int
    method_id: int
    import_id: int
    no_pipelining: bool
    params: FlatContent


@dataclass(frozen=True, slots=True)
class HotReturn:
    answer_id: int
    release_param_caps: bool
    no_finish_needed: bool
    results: FlatContent


@dataclass(frozen=True, slots=True)
class HotFinish:
    question_id: int
    release_result_caps: bool


_CALL_HEAD = struct.pack("<QQQ", _ROOT_TO_MESSAGE, _MESSAGE_CALL, _TO_CALL)
_CALL_POINTERS = struct.pack("<QQQ", _CALL_TO_TARGET, _CALL_TO_PAYLOAD, 0)
_RETURN_HEAD = struct.pack("<QQQ", _ROOT_TO_MESSAGE, _MESSAGE_RETURN, _TO_RETURN)
_THREE_WORDS = struct.Struct("<QQQ")
_FOUR_WORDS = struct.Struct("<QQQQ")


def _as_written(segment: memoryview) -> HotCall | HotReturn | None:
    """A Call or Return laid out word for word as :func:`encode_call` and
    :func:`encode_results` write them (and libcapnp builds them): read at fixed offsets,
    no pointer followed. None for any other layout (:func:`read` then walks it)."""
    head = segment[:24]
    if head == _CALL_HEAD:
        if len(segment) < 13 * _WORD or segment[48:72] != _CALL_POINTERS:
            return None
        first, interface_id, hints = _THREE_WORDS.unpack_from(segment, 24)
        target, promised, _, table = _FOUR_WORDS.unpack_from(segment, 72)
        if first >> 48 or (target >> 32) & 0xFFFF or promised or table:
            return None
        no_pipelining = bool(hints & _NO_PROMISE_PIPELINING)
        method_id, import_id = (first >> 32) & 0xFFFF, target & 0xFFFFFFFF
        params = FlatContent(segment, 11 * _WORD)
        return HotCall(first & 0xFFFFFFFF, interface_id, method_id, import_id, no_pipelining, params)
    if head == _RETURN_HEAD:
        if len(segment) < 8 * _WORD:
            return None
        first, _, to_payload = _THREE_WORDS.unpack_from(segment, 24)
        if first >> 48 or to_payload != _RETURN_TO_PAYLOAD or _WORDS.unpack_from(segment, 56)[0]:
            return None
        release = not (first >> 32) & 1
        return HotReturn(
            first & 0xFFFFFFFF, release, bool(first & _NO_FINISH_NEEDED), FlatContent(segment, 48)
        )
    return None


def read(segments: Sequence[Segment]) -> HotCall | HotReturn | HotFinish | None:
    """The message if it is one of the plain shapes read here (module docstring), else None."""
    if len(segments) != 1:
        return None
    segment = memoryview(segments[0])
    if len(segment) < 2 * _WORD:
        return None
    written = _as_written(segment)
    if written is not None:
        return written
    try:
        start, size, pointers, count = _struct_at(segment, 0)
        if not count:
            return None
        kind = _word(segment, start, size, 0) & 0xFFFF
        if kind == _MESSAGE_CALL:
            return _call(segment, pointers)
        if kind == _MESSAGE_RETURN:
            return _return(segment, pointers)
        if kind == _MESSAGE_FINISH:
            start, size, _, _ = _struct_at(segment, pointers)
            first = _word(segment, start, size, 0)
            return HotFinish(first & 0xFFFFFFFF, not (first >> 32) & 1)
    except _NotPlain:
        return None
    return None


def _call(segment: memoryview, at: int) -> HotCall | None:
    start, size, pointers, count = _struct_at(segment, at)
    if count < 2:
        return None
    first = _word(segment, start, size, 0)
    if (first >> 48) & 0xFFFF:
        return None  # results not to the caller
    interface_id = _word(segment, start, size, 8)
    hints = _word(segment, start, size, 16)
    t_start, t_size, _, _ = _struct_at(segment, pointers)
    target = _word(segment, t_start, t_size, 0)
    if (target >> 32) & 0xFFFF:
        return None  # a promisedAnswer
    content = _payload(segment, pointers + _WORD)
    if content is None:
        return None
    method_id = (first >> 32) & 0xFFFF
    no_pipelining = bool(hints & _NO_PROMISE_PIPELINING)
    return HotCall(first & 0xFFFFFFFF, interface_id, method_id, target & 0xFFFFFFFF, no_pipelining, content)


def _return(segment: memoryview, at: int) -> HotReturn | None:
    start, size, pointers, count = _struct_at(segment, at)
    first = _word(segment, start, size, 0)
    if (first >> 48) & 0xFFFF or not count:
        return None  # not results (an exception, canceled, ...)
    content = _payload(segment, pointers)
    if content is None:
        return None
    return HotReturn(first & 0xFFFFFFFF, not (first >> 32) & 1, bool(first & _NO_FINISH_NEEDED), content)


def _payload(segment: memoryview, at: int) -> FlatContent | None:
    """A Payload's content, if it carries no capability table (an empty one counts as none)."""
    _, _, pointers, count = _struct_at(segment, at)
    if count < 1:
        return None
    if count >= 2:
        table = _WORDS.unpack_from(segment, pointers + _WORD)[0]
        if table and (table & 3 != 1 or table >> 35):
            return None  # capabilities (or not a list): pycapnp's
    return FlatContent(segment, pointers)


def _check_layouts() -> None:
    """The offsets above against rpc.capnp as pycapnp ships it (a newer rpc.capnp that moved
    a field would otherwise be misread in silence)."""
    from .twoparty import rpc

    def slots(schema: Any) -> dict[str, tuple[str, int]]:
        return {
            f.name: (str(f.slot.type.which()), int(f.slot.offset))
            for f in schema.node.struct.fields
            if f.which() == "slot"
        }

    def shape(schema: Any) -> tuple[int, int, int]:
        node = schema.node.struct
        return node.dataWordCount, node.pointerCount, node.discriminantOffset

    expected = {
        rpc.Message: ((1, 1, 0), {"call": ("struct", 0), "return": ("struct", 0), "finish": ("struct", 0)}),
        rpc.Call: (
            (3, 3, 0),
            {
                "questionId": ("uint32", 0),
                "target": ("struct", 0),
                "interfaceId": ("uint64", 1),
                "methodId": ("uint16", 2),
                "params": ("struct", 1),
                "noPromisePipelining": ("bool", 129),
            },
        ),
        rpc.MessageTarget: ((1, 1, 2), {"importedCap": ("uint32", 0)}),
        rpc.Payload: ((0, 2, 0), {"content": ("anyPointer", 0), "capTable": ("list", 1)}),
        rpc.Return: (
            (2, 1, 3),
            {
                "answerId": ("uint32", 0),
                "releaseParamCaps": ("bool", 32),
                "noFinishNeeded": ("bool", 33),
                "results": ("struct", 0),
            },
        ),
        rpc.Finish: ((1, 0, 0), {"questionId": ("uint32", 0), "releaseResultCaps": ("bool", 32)}),
    }
    for kind, (sizes, fields) in expected.items():
        found = slots(kind.schema)
        if shape(kind.schema)[:2] != sizes[:2] or any(found.get(n) != f for n, f in fields.items()):
            raise ImportError(
                f"rpc.capnp's {kind.schema.node.displayName} is not laid out as {__name__} reads it"
            )
    results_to = rpc.Call.schema.fields["sendResultsTo"].schema.node.struct.discriminantOffset
    if (shape(rpc.MessageTarget.schema)[2], shape(rpc.Return.schema)[2], results_to) != (2, 3, 3):
        raise ImportError(f"rpc.capnp's unions are not where {__name__} reads them")


_check_layouts()
