"""Encoding and decoding RPC envelopes: no IO, no tables, just messages.

Every function here turns Python values into a framed Cap'n Proto envelope plus the list of
capability values its pointers index (the caller turns those into bus1 handles), or a
received payload plus its capability values back into views. The capability values are
opaque here: the vat passes clients, servers and the :data:`REPLY` marker for its own reply
node.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import capnp

from .._wire import PAYLOAD_MAX
from ..memfd import sealed_copy
from . import capwire, header, segments
from .anypointer import StructValue, WrongKind
from .capwire import CapWireError, Segment, traversal_budget
from .envelope import rpc
from .errors import BY_KIND, Failed, RpcError, kj_message, kj_reason
from .flat import flat_codec
from .interface import Method
from .layout import FieldKind, FieldLayout, StructLayout, described, layout_of
from .structs import CapTableBuilder, CapTableReader, StructBuilder, StructReader

ENVELOPE = layout_of(rpc.Envelope.schema)
_REPLY_FIELD = layout_of(rpc.Call.schema).fields["replyTo"]
_modules: dict[int, Any] = {}
_modules_by_object: dict[int, tuple[Any, Any]] = {}


def _module(schema: Any) -> Any:
    """pycapnp's message factory for a struct schema (a method's params or results struct
    has no module of its own). Looked up by the schema object first: ``schema.node`` makes
    a new reader on every access, which cost ~2 us on every call."""
    known = _modules_by_object.get(id(schema))
    if known is not None and known[0] is schema:
        return known[1]
    node = schema.node
    module = _modules.get(node.id)
    if module is None:
        module = _modules[node.id] = capnp.lib.capnp._StructModule(schema, node.displayName)
    _modules_by_object[id(schema)] = (schema, module)  # (the schema kept: its id stays its own)
    return module


class _Reply:
    def __repr__(self) -> str:
        return "REPLY"


REPLY = _Reply()
"""Stands, in a call's capability table, for the caller's own reply node."""


@dataclass(slots=True)
class Encoded:
    """A framed envelope, the capability values its pointers index, and the file
    descriptors its Fd fields index (the caller's: they are duplicated on the way)."""

    payload: bytes | memoryview
    """The framed envelope: bytes, or for a large one a view of the sealed memfd it is in."""
    caps: list[object]
    fds: list[int] = field(default_factory=list)
    failure: RpcError | None = None
    """For a Return of an exception, that exception: what the vat keeps for calls pipelined
    on it, without reading its own return back (decode would check it as hostile input)."""
    attached: list[memoryview] = field(default_factory=list)
    """Data values that travel as segments of their own (segments.py): their memfds are the
    last of ``fds``, and the views keep them open until the message is sent."""

    @property
    def field_fds(self) -> list[int]:
        """The fds the message's Fd fields index (``fds`` without the attached segments')."""
        return self.fds[: len(self.fds) - len(self.attached)] if self.attached else self.fds


def _encoded(view: StructBuilder) -> Encoded:
    segments, caps = view.finish()
    return Encoded(_framed(segments), caps, view.table.fds)


def _framed(segments: Sequence[Segment]) -> bytes | memoryview:
    return _payload([capwire.frame_header(segments), *segments])


def _payload(parts: Sequence[Segment], size: int = -1) -> bytes | memoryview:
    """The pieces of a message, joined: in memory if small, else straight into the sealed
    memfd the Peer API sends a large payload in (one copy of each piece, where joining them
    and then writing the whole into a memfd at send took two)."""
    if size < 0:  # (known, when the caller has it: this runs on every call)
        size = sum(part.nbytes if isinstance(part, memoryview) else len(part) for part in parts)
    if size <= PAYLOAD_MAX:
        return b"".join(parts)
    return sealed_copy(parts, size)


def _split(
    head: bytes, schema: Any, layout: StructLayout, values: Mapping[str, Any], table: CapTableBuilder
) -> Encoded | None:
    """The header segment ``head`` (header.py) followed by a body struct of ``schema`` filled
    with ``values``; None if the body took more than one segment (encode it the general
    way then). A flat body (flat.py) is written without pycapnp."""
    codec = flat_codec(schema)
    if codec is not None:
        attached: list[memoryview] = []
        parts = codec.parts(values, attached)
        if parts is not None:
            body_bytes = sum(len(part) for part in parts)
            if attached:
                return _with_attached(head, parts, body_bytes, attached, table)
            table_bytes = header.TWO_SEGMENTS.pack(1, len(head) // 8, body_bytes // 8)
            size = len(table_bytes) + len(head) + body_bytes
            return Encoded(_payload([table_bytes, head, *parts], size), table.values, table.fds)
    words = _first_segment_words(values)
    module = _module(schema)
    message = module.new_message() if words is None else module.new_message(num_first_segment_words=words)
    body = StructBuilder.root(message, layout, table)
    fill(body, layout, values)
    segments, caps = body.finish()
    if len(segments) != 1:
        return None
    (segment,) = segments
    size = len(memoryview(segment).cast("B")) // 8
    table_bytes = header.TWO_SEGMENTS.pack(1, len(head) // 8, size)
    return Encoded(_payload([table_bytes, head, segment]), caps, table.fds)


def _with_attached(
    head: bytes,
    parts: list[bytes | memoryview],
    body_bytes: int,
    attached: list[memoryview],
    table: CapTableBuilder,
) -> Encoded:
    """The fast shape with Data values in segments of their own (segments.py): the payload
    holds the header, the body and the pads; the values' memfds follow the Fd fields' fds."""
    pads = segments.landing_pads(attached)
    words = [len(head) // 8, body_bytes // 8, len(pads) // 8, *map(segments.segment_words, attached)]
    table_bytes = struct.pack(f"<{len(words) + 1}I", len(words) - 1, *words)
    table_bytes += b"\0" * (len(table_bytes) % 8)
    memfds = []
    for view in attached:
        memfd = segments.attachable(view)
        assert memfd is not None  # (the codec attached only these)
        memfds.append(memfd)
    payload = _payload([table_bytes, head, *parts, pads])
    return Encoded(payload, table.values, [*table.fds, *memfds], attached=attached)


_DEFAULT_FIRST_SEGMENT_WORDS = 1024  # (libcapnp's SUGGESTED_FIRST_SEGMENT_WORDS)


def _first_segment_words(values: Mapping[str, Any]) -> int | None:
    """A first segment that holds the body's large Data and Text values (None: the default
    size will do): a body that spills into a second segment cannot take the fast shape, and
    was then encoded a second time the general way (twice the copies of a large call)."""
    words = 0
    for value in values.values():
        if isinstance(value, bytes | bytearray | memoryview):
            words += memoryview(value).nbytes // 8 + 1
        elif isinstance(value, str) and len(value) > 1024:
            words += len(value.encode()) // 8 + 1
    return None if words < _DEFAULT_FIRST_SEGMENT_WORDS else words + 256


def fill(view: StructBuilder, layout: StructLayout, values: Mapping[str, Any]) -> None:
    """Sets ``values`` (field name -> value) on a struct view: capabilities as capability
    values, structs and groups as mappings (or structs received: re-sent by their fields,
    capabilities too), lists of structs as sequences of those."""
    if not isinstance(values, Mapping):
        values = _fields_of(values)
    for name, value in values.items():
        f = layout.fields.get(name)
        if f is None and name in layout.python_names:  # (spelled as in Python: naming.py)
            name = layout.python_names[name]
            f = layout.fields[name]
        if f is None:
            raise TypeError(f"{layout.name} has no field {name!r}")
        if f.kind in (FieldKind.STRUCT, FieldKind.GROUP) and _is_struct(value):
            assert f.nested is not None
            if isinstance(value, StructValue) and value.schema.node.id != f.nested.node_id:
                taken = f.nested.name.rpartition(":")[2]
                given = str(value.schema.node.displayName).rpartition(":")[2]
                raise TypeError(f"{described(layout.name, name)}: takes a {taken}, not a {given}")
            fill(view.init(name), f.nested, value)
        elif f.kind is FieldKind.STRUCT_LIST and not hasattr(value, "schema"):
            assert f.nested is not None
            items = list(value)
            elements = view.init(name, len(items))
            for element, item in zip(elements, items, strict=True):
                fill(element, f.nested, item)
        else:
            try:
                setattr(view, name, value)
            except WrongKind:
                raise
            except (capnp.KjException, OverflowError, ValueError, TypeError) as error:
                raise _bad_value(view, layout, name, value, error) from None


def _is_struct(value: Any) -> bool:
    """A struct's value as fill takes it: a mapping, or a struct received (a view, or a
    generated class's instance over one)."""
    view = getattr(value, "_view", value)
    return isinstance(value, Mapping | StructValue) or isinstance(view, StructReader)


def _fields_of(value: Any) -> Mapping[str, Any]:
    """The fields of a struct value (see _is_struct)."""
    if isinstance(value, StructValue):
        return value.fields
    view = getattr(value, "_view", value)
    if not isinstance(view, StructReader):
        raise TypeError(f"a struct takes a mapping of its fields or a struct, not {type(value).__name__}")
    return view.to_dict()


_INT_RANGES = {
    kind: (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if kind.startswith("int") else (0, (1 << bits) - 1)
    for kind, bits in (
        ("int8", 8),
        ("int16", 16),
        ("int32", 32),
        ("int64", 64),
        ("uint8", 8),
        ("uint16", 16),
        ("uint32", 32),
        ("uint64", 64),
    )
}


_PYTHON_TYPES: dict[str, tuple[type | tuple[type, ...], str, bool]] = {
    **{kind: (int, "an int", False) for kind in _INT_RANGES},
    "float32": ((int, float), "a float", False),
    "float64": ((int, float), "a float", False),
    "bool": (bool, "a bool", True),
    "text": (str, "a str", False),
    "data": ((bytes, bytearray, memoryview), "bytes", False),
}
"""Schema type -> (what Python types it takes, said how, whether that is bool)."""


def _bad_value(
    view: StructBuilder, layout: StructLayout, name: str, value: Any, error: Exception
) -> Exception:
    """What a caller gets for a value pycapnp refused: which field of what, and why (an
    integer's range), rather than pycapnp's own error."""
    where = described(layout.name, name)
    try:
        kind = view.pycapnp.schema.fields[name].proto.slot.type.which()
    except (AttributeError, KeyError, capnp.KjException):
        kind = ""
    type_name = kind.replace("uint", "UInt").replace("int", "Int") if kind in _INT_RANGES else kind
    type_name = type_name[:1].upper() + type_name[1:] if kind else "its type"
    expected = _PYTHON_TYPES.get(kind)
    if expected is not None and (
        not isinstance(value, expected[0]) or isinstance(value, bool) is not expected[2]
    ):
        return TypeError(f"{where}: a {type_name} takes {expected[1]}, not {type(value).__name__}")
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        return ValueError(f"{where}: {value} is out of range for a {type_name} ({low}..{high})")
    reason = kj_reason(error)
    return ValueError(f"{where}: {value!r} does not fit {type_name}: {reason}")


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
    if pipeline is None:
        table = CapTableBuilder()
        reply_index = None if oneway else table.index_of(REPLY)
        head = header.call(question_id, method.interface_id, method.ordinal, reply_index, keep_results)
        encoded = _split(head, method.params, method.params_layout, params, table)
        if encoded is not None:
            return encoded
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
    encoded = _split(
        header.return_(question_id), method.results, method.results_layout, results, CapTableBuilder()
    )
    if encoded is not None:
        return encoded
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
    return Encoded(_framed(message.to_segments()), [], failure=error)


def encode_redirect(question_id: int) -> Encoded:
    """The return of a pipelined call whose capability is not this vat's (rpc.capnp)."""
    message = rpc.Envelope.new_message()
    returned = message.init("return")
    returned.questionId = question_id
    returned.redirect = None
    return Encoded(_framed(message.to_segments()), [])


def encode_finish(question_id: int) -> Encoded:
    message = rpc.Envelope.new_message()
    envelope = StructBuilder.root(message, ENVELOPE)
    finish = envelope.init("finish")
    finish.questionId = question_id
    finish.replyTo = REPLY
    return _encoded(envelope)


class Body:
    """Where a call's params or a return's results lie; :meth:`struct` reads them."""

    __slots__ = ("_segments", "_table", "_parent", "_field")

    def __init__(
        self,
        segments: Sequence[Segment] = (),
        table: CapTableReader | None = None,
        parent: StructReader | None = None,
        field: str = "",
    ) -> None:
        self._segments, self._table, self._parent, self._field = segments, table, parent, field

    def struct(self, schema: Any) -> StructReader:
        """The body read as a struct of ``schema`` (a pycapnp struct schema)."""
        if self._parent is not None:
            return self._parent.any_struct(self._field, schema)
        codec = flat_codec(schema)
        if codec is not None and codec.reader_class is not None:
            return codec.reader_class._of(self._segments, lambda: self._general(schema))
        return self._general(schema)

    def _general(self, schema: Any) -> StructReader:
        assert self._table is not None
        # The tree check bounded this message's walk already (capwire.traversal_budget); the
        # same budget here lets a vat read what its max_message_bytes let in.
        reader = _module(schema).from_segments(self._segments, traversal_budget(self._segments))
        return StructReader(reader, layout_of(schema), self._table)


@dataclass(slots=True, eq=False)
class ReceivedCall:
    question_id: int
    interface_id: int
    method_id: int
    keep_results: bool
    reply: object | None
    """The caller's reply capability (as resolved by decode); None for a one-way call."""
    promised: tuple[int, list[int]] | None
    """Pipelined: (question id, pointer-field steps) of the capability in an earlier answer."""
    body: Body

    def params(self, schema: Any) -> StructReader:
        return self.body.struct(schema)


@dataclass(slots=True, eq=False)
class ReceivedReturn:
    question_id: int
    body: Body | None
    """The results; None when the call failed (``error``) or was canceled."""
    error: RpcError | None = None
    redirect: bool = False
    """The callee did not make this pipelined call: the caller makes it (rpc.capnp)."""


@dataclass(slots=True, eq=False)
class ReceivedFinish:
    question_id: int
    reply: object | None


Received = ReceivedCall | ReceivedReturn | ReceivedFinish


def decode(
    payload: Segment,
    caps: Sequence[object],
    resolve: Callable[[object, FieldLayout], object] | None = None,
    fds: Sequence[object] = (),
    attached: Sequence[memoryview] = (),
) -> Received | None:
    """A received envelope; None for a kind this version does not know. Its capability
    pointers resolve to ``caps`` when read (a pointer past them raises CapWireError then);
    ``resolve`` as in CapTableReader; ``fds`` the message's file descriptors for its Fd
    fields; ``attached`` the segments the payload does not hold (segments.take_attached).
    The shape header.py writes is read by hand; anything else through pycapnp."""
    if attached:
        return _decode_attached(payload, caps, resolve, fds, attached)
    # A tree within its size, before any reader looks: readers then follow each pointer at
    # most once per read, so a small message cannot make a handler walk a huge tree. The
    # check must see what the reader will: the fast shape's body is read alone (a far
    # pointer in it lands in itself, not in the header), so it is checked alone; header.read
    # has checked every pointer word of the header itself.
    framed = header.read_framed(payload)
    if framed is not None:  # a single-segment body: its pointers need no renumbering
        fast, body = framed
        capwire.check_segment(body)
        return _fast(fast, [body], caps, resolve, fds)
    capwire.check_tree(payload)
    return _decode_general(capwire.unframe(payload), caps, resolve, fds)


def _fast(
    fast: header.CallHeader | int,
    body_segments: list[Segment],
    caps: Sequence[object],
    resolve: Callable[[object, FieldLayout], object] | None,
    fds: Sequence[object],
) -> ReceivedCall | ReceivedReturn:
    table = CapTableReader.direct(body_segments, caps, resolve, fds)
    if isinstance(fast, int):
        return ReceivedReturn(fast, Body(body_segments, table))
    reply = None if fast.reply_index is None else table.value(fast.reply_index, _REPLY_FIELD)
    return ReceivedCall(
        fast.question_id,
        fast.interface_id,
        fast.method_id,
        fast.keep_results,
        reply,
        None,
        Body(body_segments, table),
    )


def _decode_attached(
    payload: Segment,
    caps: Sequence[object],
    resolve: Callable[[object, FieldLayout], object] | None,
    fds: Sequence[object],
    attached: Sequence[memoryview],
) -> Received | None:
    """decode() of a message with attached segments: the fast shape's body read alone as
    segments.py lays it out, anything else the general way; the check sees each as its
    reader will."""
    inline = capwire.unframe(payload, partial=True)[: -len(attached)]  # (then cuts, empty)
    whole: list[Segment] = [*inline, *attached]
    fast = header.read(whole)
    if fast is not None:
        body_segments = segments.body_alone(whole)
        capwire.check_segments(body_segments)
        return _fast(fast, body_segments, caps, resolve, fds)
    capwire.check_segments(whole)
    return _decode_general(whole, caps, resolve, fds)


def _decode_general(
    segments: Sequence[Segment],
    caps: Sequence[object],
    resolve: Callable[[object, FieldLayout], object] | None,
    fds: Sequence[object],
) -> Received | None:
    table = CapTableReader.direct(segments, caps, resolve, fds)
    envelope = StructReader(
        rpc.Envelope.from_segments(table.segments, traversal_budget(table.segments)), ENVELOPE, table
    )
    which = envelope.which()
    if which == "call":
        call = envelope.call
        raw = call.pycapnp
        promised = None
        if raw.target.which() == "promisedAnswer":
            answer = raw.target.promisedAnswer
            steps = len(answer.transform)
            if steps > capwire.NESTING_LIMIT:  # (checked before it becomes a Python list)
                limit = capwire.NESTING_LIMIT
                raise CapWireError(
                    f"a pipeline transform of {steps} steps, over the nesting limit of {limit}"
                )
            promised = (answer.questionId, [int(step) for step in answer.transform])
        return ReceivedCall(
            raw.questionId,
            raw.interfaceId,
            raw.methodId,
            raw.keepResults,
            call.replyTo,
            promised,
            Body(parent=call, field="params"),
        )
    if which == "return":
        returned = getattr(envelope, "return")
        kind = returned.which()
        if kind == "results":
            return ReceivedReturn(returned.questionId, Body(parent=returned, field="results"))
        if kind == "exception":
            return ReceivedReturn(returned.questionId, None, exception_of(returned))
        if kind == "redirect":
            return ReceivedReturn(returned.questionId, None, redirect=True)
        return ReceivedReturn(returned.questionId, None, Failed("the call was canceled"))
    if which == "finish":
        finish = envelope.finish
        return ReceivedFinish(finish.questionId, finish.replyTo)
    return None


_CALL_SLOT = ENVELOPE.fields["call"].slot
_CALL = layout_of(rpc.Call.schema)
_CALL_REPLY_SLOT = _CALL.fields["replyTo"].slot
_CALL_DISCRIMINANT = ENVELOPE.fields["call"].discriminant


def call_identity(payload: Segment) -> tuple[int, int | None] | None:
    """(question id, index of the reply capability or None) of a call whose envelope is
    otherwise unreadable (its params malformed, say, or only its start here: segments it
    names but does not hold are read as empty), read straight from the segments so that the
    caller can still be told why; None if even that cannot be read."""
    try:
        segments = capwire.unframe(payload, partial=True)
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
_RETURN_DISCRIMINANT = ENVELOPE.fields["return"].discriminant


def return_identity(payload: Segment) -> int | None:
    """The question id of a return whose envelope is otherwise unreadable (read as
    :func:`call_identity` reads a call), so that its caller can be told; None if even that
    cannot be read."""
    try:
        segments = capwire.unframe(payload, partial=True)
        offset = ENVELOPE.discriminant_offset
        root = capwire.read_struct_word(segments, (), offset // 4)
        discriminant = None if root is None else (root >> (16 * (offset % 4))) & 0xFFFF
        if discriminant != _RETURN_DISCRIMINANT:
            return None
        return capwire.read_struct_word(segments, (("p", _RETURN),), 0)
    except CapWireError:
        return None


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
    reason = kj_message(error)
    return Failed(f"malformed message: {type(error).__name__}: {reason}")


def params_of(call: ReceivedCall, method: Method, views: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A call's params as keyword arguments, every field read now: a malformed pointer
    becomes a Failed (for the caller) here, not a crash inside the handler. The Data and
    Text fields named in ``views`` are read as memoryviews (StructReader.view)."""
    try:
        return as_kwargs(call.params(method.params), method.params_layout, views)
    except (CapWireError, capnp.KjException, ValueError) as error:
        raise malformed(error) from error


def as_kwargs(
    view: StructReader, layout: StructLayout, views: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """A struct's fields as keyword arguments (for a union, only the member that is set;
    the Data and Text fields named in ``views`` as memoryviews)."""
    active = view.which() if layout.has_union else None
    return {
        name: view.view(name) if name in views else getattr(view, name)
        for name, f in layout.fields.items()
        if f.discriminant is None or name == active
    }
