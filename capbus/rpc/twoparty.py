"""Cap'n Proto's own RPC protocol (``rpc.capnp``, two-party, level 1) as bytes and messages,
without IO.

This is the protocol C++, Rust, Go and pycapnp speak over a byte stream; capbus speaks it
over TCP (capbus/rpc/streamengine.py keeps a connection's tables; streamvat.py drives it
with trio). Here: the standard stream framing
with limits (:class:`FrameReader`, :func:`frame`), and each message as built and read:
calls and returns whose payloads hold capabilities (a Payload's ``capTable`` of
CapDescriptors; the pointers in its content index it, as in a capbus envelope), through
the same struct views as the bus (structs.py). Nothing here keeps tables or decides
anything: :mod:`capbus.rpc.streamengine` does. The hot Call, Return and Finish are also
written and read without pycapnp (twopartyflat.py); these are the general way.

Written on the spec (https://capnproto.org/encoding.html "Serialization over a stream",
and rpc.capnp itself, shipped with pycapnp) rather than through pycapnp's RPC, which
cannot run under trio and could not carry capbus's capabilities (docs/design.md 3).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import capnp

from .capwire import Path, Segment
from .errors import BY_KIND, RpcError
from .interface import Method
from .layout import layout_of
from .protocol import _module, fill
from .structs import CapTableReader, StructBuilder, StructReader

_RPC_SCHEMA = os.path.join(os.path.dirname(capnp.__file__), "rpc.capnp")
rpc: Any = capnp.load(_RPC_SCHEMA, imports=[os.path.dirname(os.path.dirname(capnp.__file__))])
"""Cap'n Proto's rpc.capnp, as pycapnp ships it."""

MESSAGE = layout_of(rpc.Message.schema)
_CALL_SLOT = MESSAGE.fields["call"].slot
_RETURN_SLOT = MESSAGE.fields["return"].slot
_PARAMS_SLOT = layout_of(rpc.Call.schema).fields["params"].slot
_RESULTS_SLOT = layout_of(rpc.Return.schema).fields["results"].slot
_CONTENT_SLOT = layout_of(rpc.Payload.schema).fields["content"].slot
CALL_CONTENT: Path = (("p", _CALL_SLOT), ("p", _PARAMS_SLOT), ("p", _CONTENT_SLOT))
"""Where a Call's params struct is, from the message root (for capwire)."""
RETURN_CONTENT: Path = (("p", _RETURN_SLOT), ("p", _RESULTS_SLOT), ("p", _CONTENT_SLOT))

MAX_SEGMENTS = 512
"""Segments one message may have (C++'s default limit too)."""
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


class FrameError(Exception):
    """The byte stream is not framed Cap'n Proto messages within the limits."""


class FrameReader:
    """Cuts a byte stream into messages (lists of segments): feed it bytes, take messages.
    Refuses a segment table of more than ``max_segments`` entries and a message larger than
    ``max_bytes`` before reading it (a peer cannot make this buffer more than that)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_segments: int = MAX_SEGMENTS) -> None:
        self.max_bytes, self.max_segments = max_bytes, max_segments
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> list[list[Segment]]:
        self._buffer += data
        out: list[list[Segment]] = []
        while True:
            message = self._next()
            if message is None:
                return out
            out.append(message)

    @property
    def pending(self) -> int:
        """Bytes held of a message not complete yet."""
        return len(self._buffer)

    def _next(self) -> list[Segment] | None:
        buffer = self._buffer
        if len(buffer) < 4:
            return None
        count = struct.unpack_from("<I", buffer)[0] + 1
        if count > self.max_segments:
            raise FrameError(f"a message of {count} segments (at most {self.max_segments})")
        table = 4 + 4 * count
        table += table % 8  # (padded to a word)
        if len(buffer) < table:
            return None
        sizes = struct.unpack_from(f"<{count}I", buffer, 4)
        total = table + 8 * sum(sizes)
        if total - table > self.max_bytes:
            raise FrameError(f"a message of {total - table} bytes (at most {self.max_bytes})")
        if len(buffer) < total:
            return None
        segments: list[Segment] = []
        offset = table
        for size in sizes:
            segments.append(bytes(buffer[offset : offset + 8 * size]))
            offset += 8 * size
        del buffer[:total]
        return segments


def frame(segments: Sequence[Segment]) -> bytes:
    """One message, framed for a stream."""
    count = len(segments)
    header = struct.pack(f"<{count + 1}I", count - 1, *(len(s) // 8 for s in segments))
    if len(header) % 8:
        header += b"\0" * 4
    return b"".join([header, *(bytes(s) for s in segments)])


# -- capability descriptors ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Descriptor:
    """How a capability travels in a payload's capTable, from the sender's side: ``kind``
    is rpc.capnp's CapDescriptor member (senderHosted, senderPromise, receiverHosted,
    receiverAnswer, none); ``id`` the export, import or question id; ``transform`` the
    pointer steps of a receiverAnswer."""

    kind: str
    id: int = 0
    transform: tuple[int, ...] = ()


NONE = Descriptor("none")


def _write_descriptor(builder: Any, descriptor: Descriptor) -> None:
    if descriptor.kind == "receiverAnswer":
        answer = builder.init("receiverAnswer")
        answer.questionId = descriptor.id
        _write_transform(answer, descriptor.transform)
    elif descriptor.kind == "none":
        builder.none = None
    else:
        setattr(builder, descriptor.kind, descriptor.id)


def _write_transform(promised: Any, transform: Sequence[int]) -> None:
    ops = promised.init("transform", len(transform))
    for op, step in zip(ops, transform, strict=True):
        op.getPointerField = step


def read_descriptor(reader: Any) -> Descriptor:
    """A received CapDescriptor (ValueError for thirdPartyHosted, which level 1 lacks)."""
    kind = str(reader.which())
    if kind == "none":
        return NONE
    if kind == "receiverAnswer":
        answer = reader.receiverAnswer
        return Descriptor(kind, int(answer.questionId), read_transform(answer))
    if kind in ("senderHosted", "senderPromise", "receiverHosted"):
        return Descriptor(kind, int(getattr(reader, kind)))
    raise ValueError(f"a {kind} capability (three-party handoff is not supported)")


def read_transform(promised: Any) -> tuple[int, ...]:
    steps: list[int] = []
    for op in promised.transform:
        if op.which() == "getPointerField":
            steps.append(int(op.getPointerField))
        # (noop: nothing to follow)
    return tuple(steps)


# -- messages ------------------------------------------------------------------------------------


def _new() -> tuple[Any, StructBuilder]:
    message = rpc.Message.new_message()
    return message, StructBuilder.root(message, MESSAGE)


def _payload(
    payload: StructBuilder,
    schema: Any,
    layout: Any,
    values: Mapping[str, Any],
    describe: Callable[[object], Descriptor],
) -> list[Descriptor]:
    """Fills a Payload: its content as a struct of ``schema``, its capTable with what
    ``describe`` says of each capability the content holds. Returns the descriptors (the
    capabilities themselves, by the same index: ``payload.table.values``)."""
    fill(payload.any_struct("content", schema), layout, values)
    descriptors = [describe(value) for value in payload.table.values]
    table = payload.pycapnp.init("capTable", len(descriptors))
    for builder, descriptor in zip(table, descriptors, strict=True):
        _write_descriptor(builder, descriptor)
    return descriptors


def encode_bootstrap(question_id: int) -> list[Segment]:
    message, _ = _new()
    message.init("bootstrap").questionId = question_id
    return list(message.to_segments())


def encode_call(
    question_id: int,
    target: Descriptor,
    method: Method,
    params: Mapping[str, Any],
    describe: Callable[[object], Descriptor],
) -> tuple[list[Segment], list[Descriptor]]:
    """A Call of ``method`` on ``target`` (receiverHosted: an import; receiverAnswer: a
    question's results). Returns the segments and the params' descriptors."""
    message, root = _new()
    call = root.init("call")
    call.questionId = question_id
    call.interfaceId = method.interface_id
    call.methodId = method.ordinal
    raw_target = call.pycapnp.init("target")
    if target.kind == "receiverAnswer":
        promised = raw_target.init("promisedAnswer")
        promised.questionId = target.id
        _write_transform(promised, target.transform)
    else:
        raw_target.importedCap = target.id
    call.pycapnp.init("sendResultsTo").caller = None
    descriptors = _payload(call.init("params"), method.params, method.params_layout, params, describe)
    return _finished(root, message), descriptors


def encode_results(
    answer_id: int, method: Method, results: Mapping[str, Any], describe: Callable[[object], Descriptor]
) -> tuple[list[Segment], list[Descriptor], list[object]]:
    """A Return of ``results``: the segments, the descriptors and the capabilities by index."""
    message, root = _new()
    returned = root.init("return")
    returned.answerId = answer_id
    returned.releaseParamCaps = False  # (each param capability is released when its client goes)
    payload = returned.init("results")
    descriptors = _payload(payload, method.results, method.results_layout, results, describe)
    return _finished(root, message), descriptors, list(payload.table.values)


def encode_bootstrap_return(answer_id: int, descriptor: Descriptor) -> list[Segment]:
    """The Return of a Bootstrap: a payload whose content is the capability itself."""
    message, returned = _return(answer_id)
    payload = returned.init("results")  # (its content null here: the capability pointer goes there)
    _write_descriptor(payload.init("capTable", 1)[0], descriptor)
    segments = list(message.to_segments())
    from . import capwire

    return capwire.patch_caps(segments, [(RETURN_CONTENT, 0)])


def _return(answer_id: int) -> tuple[Any, Any]:
    """A new message holding a Return for ``answer_id`` (params' capabilities released one
    by one, as their clients go): the message and its Return, to fill."""
    message, _ = _new()
    returned = message.init("return")
    returned.answerId = answer_id
    returned.releaseParamCaps = False
    return message, returned


def encode_results_elsewhere(answer_id: int) -> list[Segment]:
    """The Return of a call whose caller asked for the results to stay here."""
    message, returned = _return(answer_id)
    returned.resultsSentElsewhere = None
    return list(message.to_segments())


def encode_exception(answer_id: int, error: RpcError) -> list[Segment]:
    message, returned = _return(answer_id)
    _write_exception(returned.init("exception"), error)
    return list(message.to_segments())


def encode_canceled(answer_id: int) -> list[Segment]:
    message, returned = _return(answer_id)
    returned.canceled = None
    return list(message.to_segments())


def _write_exception(builder: Any, error: RpcError) -> None:
    builder.reason = str(error) or type(error).__name__
    builder.type = error.kind


def read_exception(reader: Any) -> RpcError:
    kind = str(reader.type)
    return BY_KIND.get(kind, BY_KIND["failed"])(str(reader.reason))


def encode_finish(question_id: int) -> list[Segment]:
    message, _ = _new()
    finish = message.init("finish")
    finish.questionId = question_id
    finish.releaseResultCaps = False  # (each result capability is released when its client goes)
    return list(message.to_segments())


def encode_release(import_id: int, count: int) -> list[Segment]:
    message, _ = _new()
    release = message.init("release")
    release.id = import_id
    release.referenceCount = count
    return list(message.to_segments())


def encode_abort(reason: str) -> list[Segment]:
    message, _ = _new()
    abort = message.init("abort")
    abort.reason = reason
    abort.type = "failed"
    return list(message.to_segments())


def encode_unimplemented(received: Any) -> list[Segment]:
    """Unimplemented, echoing a received message we do not handle."""
    message, _ = _new()
    message.unimplemented = received
    return list(message.to_segments())


def encode_disembargo_loopback(target: Descriptor, embargo_id: int) -> list[Segment]:
    """The Disembargo echoing a senderLoopback: ``receiverLoopback`` with its id, and as the
    target the capability the promise resolved to (an export of the sender's: an import
    here, ``target.id``)."""
    message, _ = _new()
    disembargo = message.init("disembargo")
    raw_target = disembargo.init("target")
    raw_target.importedCap = target.id
    disembargo.init("context").receiverLoopback = embargo_id
    return list(message.to_segments())


def _finished(root: StructBuilder, message: Any) -> list[Segment]:
    segments, _ = root.finish(message)
    return segments


def decode(segments: Sequence[Segment], traversal_words: int) -> Any:
    """The pycapnp reader of a received message (its capabilities are read through
    :func:`content`, never through pycapnp)."""
    return _module(rpc.Message.schema).from_segments(list(segments), traversal_words)


def content(
    segments: Sequence[Segment],
    reader: Any,
    path: Path,
    schema: Any,
    values: Sequence[object],
    resolve: Callable[[object, Any], object] | None,
) -> StructReader:
    """The payload content at ``path`` read as a struct of ``schema``, its capability
    pointers resolving to ``values`` (by capTable index)."""
    table = CapTableReader.direct(segments, values, resolve)
    return StructReader(reader.as_struct(schema), layout_of(schema), table, path)
