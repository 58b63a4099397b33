"""Encoding and decoding RPC envelopes: no IO, no tables, just messages.

Every function here turns Python values into a framed Cap'n Proto envelope plus the list of
capability values its pointers index (the caller turns those into bus1 handles), or a
received payload plus its capability values back into views. The capability values are
opaque here: the vat passes clients, servers and the :data:`REPLY` marker for its own reply
node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import capnp

from . import capwire
from .capwire import CapWireError, Segment
from .envelope import rpc
from .errors import BY_KIND, Failed, RpcError
from .interface import Method
from .layout import FieldKind, FieldLayout, StructLayout, layout_of
from .structs import CapTableReader, StructBuilder, StructReader

ENVELOPE = layout_of(rpc.Envelope.schema)


class _Reply:
    def __repr__(self) -> str:
        return "REPLY"


REPLY = _Reply()
"""Stands, in a call's capability table, for the caller's own reply node."""


@dataclass(slots=True)
class Encoded:
    """A framed envelope, the capability values its pointers index, and the file
    descriptors its Fd fields index (the caller's: they are duplicated on the way)."""

    payload: bytes
    caps: list[object]
    fds: list[int] = field(default_factory=list)


def _encoded(view: StructBuilder) -> Encoded:
    segments, caps = view.finish()
    return Encoded(_framed(segments), caps, view.table.fds)


def _framed(segments: Sequence[Segment]) -> bytes:
    return capwire.frame_header(segments) + b"".join(bytes(s) for s in segments)


def fill(view: StructBuilder, layout: StructLayout, values: Mapping[str, Any]) -> None:
    """Sets ``values`` (field name -> value) on a struct view: capabilities as capability
    values, structs and groups as mappings, lists of structs as sequences of mappings."""
    for name, value in values.items():
        f = layout.fields.get(name)
        if f is None:
            raise TypeError(f"{layout.name} has no field {name!r}")
        if f.kind in (FieldKind.STRUCT, FieldKind.GROUP) and isinstance(value, Mapping):
            assert f.nested is not None
            fill(view.init(name), f.nested, value)
        elif f.kind is FieldKind.STRUCT_LIST and not hasattr(value, "schema"):
            assert f.nested is not None
            items = list(value)
            elements = view.init(name, len(items))
            for element, item in zip(elements, items, strict=True):
                fill(element, f.nested, item)
        else:
            setattr(view, name, value)


def encode_call(
    question_id: int,
    method: Method,
    params: Mapping[str, Any],
    *,
    oneway: bool = False,
    pipeline: tuple[int, Sequence[int]] | None = None,
    keep_results: bool = False,
) -> Encoded:
    """A call of ``method`` with ``params``; the reply capability is :data:`REPLY` unless
    ``oneway``. ``pipeline`` = (question id, pointer-field steps) targets a capability in the
    results of an earlier call instead of the destination node."""
    message = rpc.Envelope.new_message()
    envelope = StructBuilder.root(message, ENVELOPE)
    call = envelope.init("call")
    call.questionId = question_id
    call.interfaceId = method.interface_id
    call.methodId = method.ordinal
    if not oneway:
        call.replyTo = REPLY
    call.keepResults = keep_results
    if pipeline is not None:
        promised = call.pycapnp.target.init("promisedAnswer")
        promised.questionId = pipeline[0]
        promised.init("transform", len(pipeline[1]))
        for i, step in enumerate(pipeline[1]):
            promised.transform[i] = step
    fill(call.any_struct("params", method.params), method.params_layout, params)
    return _encoded(envelope)


def encode_results(question_id: int, method: Method, results: Mapping[str, Any]) -> Encoded:
    message = rpc.Envelope.new_message()
    envelope = StructBuilder.root(message, ENVELOPE)
    returned = envelope.init("return")
    returned.questionId = question_id
    fill(returned.any_struct("results", method.results), method.results_layout, results)
    return _encoded(envelope)


def encode_exception(question_id: int, error: RpcError) -> Encoded:
    message = rpc.Envelope.new_message()
    returned = message.init("return")
    returned.questionId = question_id
    exception = returned.init("exception")
    exception.reason = error.reason
    exception.type = error.kind
    return Encoded(_framed(message.to_segments()), [])


def encode_finish(question_id: int) -> Encoded:
    message = rpc.Envelope.new_message()
    envelope = StructBuilder.root(message, ENVELOPE)
    finish = envelope.init("finish")
    finish.questionId = question_id
    finish.replyTo = REPLY
    return _encoded(envelope)


def decode(
    payload: Segment,
    caps: Sequence[object],
    resolve: Callable[[object, FieldLayout], object] | None = None,
    fds: Sequence[object] = (),
) -> StructReader:
    """A received envelope, its capability pointers resolved to ``caps`` when read (a pointer
    past them raises CapWireError then); ``resolve`` as in CapTableReader; ``fds`` the
    message's file descriptors for its Fd fields."""
    table = CapTableReader.direct(capwire.unframe(payload), caps, resolve, fds)
    return StructReader(rpc.Envelope.from_segments(table.segments), ENVELOPE, table)


_CALL_SLOT = ENVELOPE.fields["call"].slot
_CALL = layout_of(rpc.Call.schema)
_CALL_REPLY_SLOT = _CALL.fields["replyTo"].slot
_CALL_DISCRIMINANT = ENVELOPE.fields["call"].discriminant


def call_identity(payload: Segment) -> tuple[int, int | None] | None:
    """(question id, index of the reply capability or None) of a call whose envelope is
    otherwise unreadable (its params malformed, say), read straight from the segments so
    that the caller can still be told why; None if even that cannot be read."""
    try:
        segments = capwire.unframe(payload)
        offset = ENVELOPE.discriminant_offset  # in 16-bit units
        root = capwire.read_struct_word(segments, (), offset // 4)
        discriminant = None if root is None else (root >> (16 * (offset % 4))) & 0xFFFF
        if discriminant != _CALL_DISCRIMINANT:
            return None
        question_id = capwire.read_struct_word(segments, (("p", _CALL_SLOT),), 0)
        if question_id is None:
            return None
        reply = capwire.read_cap(segments, (("p", _CALL_SLOT), ("p", _CALL_REPLY_SLOT)))
        return question_id, reply
    except CapWireError:
        return None


_RETURN = ENVELOPE.fields["return"].slot
_RESULTS = layout_of(rpc.Return.schema).fields["results"].slot


def results_capability(returned: Encoded, transform: Sequence[int]) -> object | None:
    """The capability at ``transform`` (pointer-field steps from the results struct) in an
    encoded return, for a call pipelined on it; None if that pointer is null."""
    path: capwire.Path = (("p", _RETURN), ("p", _RESULTS), *(("p", step) for step in transform))
    index = capwire.read_cap(capwire.unframe(returned.payload), path)
    return None if index is None else returned.caps[index]


def exception_of(returned: StructReader) -> RpcError:
    exception = returned.pycapnp.exception
    kind = BY_KIND.get(str(exception.type), Failed)
    return kind(str(exception.reason))


def malformed(error: Exception) -> Failed:
    """A clean Failed for what pycapnp or capwire found wrong in a received message (pycapnp's
    messages carry a C++ stack dump after the first line)."""
    reason = str(error).split("; stack:", 1)[0].split("\nstack:", 1)[0].strip()
    return Failed(f"malformed message: {type(error).__name__}: {reason}")


def params_of(call: StructReader, method: Method) -> dict[str, Any]:
    """A call's params as keyword arguments, every field read now: a malformed pointer
    becomes a Failed (for the caller) here, not a crash inside the handler."""
    try:
        return as_kwargs(call.any_struct("params", method.params), method.params_layout)
    except (CapWireError, capnp.KjException, ValueError) as error:
        raise malformed(error) from error


def as_kwargs(view: StructReader, layout: StructLayout) -> dict[str, Any]:
    """A struct's fields as keyword arguments (for a union, only the member that is set)."""
    active = view.which() if layout.has_union else None
    return {
        name: getattr(view, name)
        for name, f in layout.fields.items()
        if f.discriminant is None or name == active
    }
