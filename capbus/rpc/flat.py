"""Writing and reading a flat params or results struct in its segment, without pycapnp.

A struct whose fields are all numbers, bools, enums, Text or Data (no union, group, list,
struct, capability or AnyPointer) is most of what RPC methods take and return, and building
it through a pycapnp message cost more than anything else in encoding a small call (a
message, a builder, a setattr per field, ``to_segments``). Such a struct is laid out here
once per schema (:func:`flat_codec`) and then written with :mod:`struct` into one segment:
its root pointer, data section, pointer section and the Text and Data blobs after them, as
libcapnp lays a freshly built message out. Anything else, and any value this does not take
exactly as pycapnp would (a bool that is not a bool, an int out of range, an unknown enum
name), goes the general way, which also gives the error.

Reading is the same in reverse (:class:`FlatReader`, a StructReader): a received body that
has the plain shape (a struct root pointer, Text and Data as byte lists) is read with
:mod:`struct`; any other shape a hostile or unusual writer may use (a far pointer, a list
of another element size) is read through pycapnp, which then says what is wrong with it.
Structs with enum fields are written but not read here (pycapnp's enum values are what a
reader gets). The vat checks every body first (capwire.check_segment: a tree within the
segment); the reader checks bounds again anyway.

Written by hand rather than with a library: pycapnp is the Cap'n Proto library here, and
its builder is what this avoids; the layout rules used are the encoding spec's
(https://capnproto.org/encoding.html: struct and list pointers, XOR with defaults).
"""

from __future__ import annotations

import codecs
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from .capwire import Segment
from .naming import renamed
from .segments import ATTACHED_MAX, attachable, double_far
from .structs import StructReader

_NUMBER_FORMATS = {
    "int8": "b",
    "int16": "h",
    "int32": "i",
    "int64": "q",
    "uint8": "B",
    "uint16": "H",
    "uint32": "I",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}
_UNSIGNED = {"int8": "B", "int16": "H", "int32": "I", "int64": "Q"}
_WORD = 8
_WORD_STRUCT = struct.Struct("<Q")
_UINT16 = struct.Struct("<H")
_BYTE_LIST = 2  # a list pointer's element size code for bytes


class _NotFlat(Exception):
    pass


Writer = Callable[[bytearray, int, object], None]
"""Writes one field's value into a struct's data section (at the given byte offset of the
section's start); raises (TypeError, ValueError, OverflowError, KeyError, struct.error) for
a value that must go the general way."""


class FlatCodec:
    """The layout of one flat struct type, and its encoder (:meth:`encode`)."""

    __slots__ = ("data_words", "pointer_words", "_data", "_pointers", "_root", "reader_class")

    def __init__(self, schema: Any) -> None:
        node = schema.node
        structure = node.struct
        if structure.discriminantCount or node.isGeneric:
            raise _NotFlat
        self.data_words = structure.dataWordCount
        self.pointer_words = structure.pointerCount
        self._data: dict[str, Writer] = {}
        self._pointers: dict[str, tuple[int, bool]] = {}  # name -> (slot, is Text)
        readers: dict[str, FieldReader] | None = {}
        spans: dict[str, tuple[BlobSpan, bool]] = {}  # name -> (where its bytes are, is Text)
        for field in structure.fields:
            if field.which() != "slot":
                raise _NotFlat
            slot = field.slot
            kind = slot.type.which()
            if kind in ("text", "data"):
                self._pointers[field.name] = (slot.offset, kind == "text")
            else:
                enumerants = schema.fields[field.name].schema.enumerants if kind == "enum" else {}
                self._data[field.name] = _writer(kind, slot.offset, slot.defaultValue, enumerants)
            if kind in ("text", "data"):
                spans[field.name] = (_blob_span(slot.offset, kind == "text"), kind == "text")
            reader = _reader(kind, slot.offset, slot.defaultValue)
            if reader is None:
                readers = None
            elif readers is not None:
                readers[field.name] = reader
        self.reader_class = None if readers is None else _reader_class(node.displayName, readers, spans)
        """The FlatReader class of this struct (None: it is read through pycapnp)."""
        self._root = struct.pack("<Q", (self.data_words << 32) | (self.pointer_words << 48))

    def encode(self, values: Mapping[str, Any]) -> bytes | None:
        """The struct as one segment (its root pointer first); None if a value must go the
        general way (unknown field, or not exactly what this writes)."""
        parts = self.parts(values)
        return None if parts is None else b"".join(parts)

    def parts(
        self, values: Mapping[str, Any], attached: list[memoryview] | None = None
    ) -> list[bytes | memoryview] | None:
        """:meth:`encode`'s segment as the pieces to write one after the other (a large Data
        value is one of them, as given: a caller can write them straight where they go).
        ``attached``: a Data value already in a sealed memfd is not among them but appended
        there, reached by a double-far pointer (segments.py; the caller adds the pads)."""
        data = bytearray(self.data_words * _WORD)
        blobs: list[tuple[int, bytes | memoryview, int]] = []  # (slot, bytes, element count)
        far: list[tuple[int, int]] = []  # (slot, pointer) of the attached values
        try:
            for name, value in values.items():
                writer = self._data.get(name)
                if writer is not None:
                    writer(data, 0, value)
                    continue
                pointer = self._pointers.get(name)
                if pointer is None:
                    return None
                slot, is_text = pointer
                if is_text:
                    if type(value) is not str:
                        return None
                    blob: bytes | memoryview = value.encode()
                    if b"\0" in blob:
                        return None  # (pycapnp's to say what it does with a NUL)
                    blobs.append((slot, blob, len(blob) + 1))
                elif type(value) is bytes:
                    blobs.append((slot, value, len(value)))
                elif isinstance(value, bytearray | memoryview):
                    view = memoryview(value)
                    if not view.c_contiguous:
                        return None
                    # (not copied: for a large value, the copy that counts is into the memfd)
                    view = view.cast("B") if view.format != "B" else view
                    if attached is not None and len(attached) < ATTACHED_MAX and attachable(view) is not None:
                        far.append((slot, double_far(len(attached))))
                        attached.append(view)
                        continue
                    blobs.append((slot, view.toreadonly(), view.nbytes))
                else:
                    return None
        except (TypeError, ValueError, OverflowError, KeyError, struct.error):
            return None
        pointers = bytearray(self.pointer_words * _WORD)
        # Blobs follow the struct in slot order of their setting, each padded to words.
        offset_words = self.data_words + self.pointer_words  # from the struct's start
        parts: list[bytes | memoryview] = [self._root, bytes(data), b""]
        for slot, blob, count in blobs:
            # A list pointer's offset counts words from the end of the pointer itself.
            end_of_pointer = self.data_words + slot + 1
            pointer = 1 | ((offset_words - end_of_pointer) << 2) | (_BYTE_LIST << 32) | (count << 35)
            struct.pack_into("<Q", pointers, slot * _WORD, pointer)
            size = (count + _WORD - 1) // _WORD * _WORD
            parts.append(blob)
            parts.append(bytes(size - len(blob)))  # (a Text's NUL, and the padding)
            offset_words += size // _WORD
        for slot, far_pointer in far:
            struct.pack_into("<Q", pointers, slot * _WORD, far_pointer)
        parts[2] = bytes(pointers)
        return parts


def _writer(kind: str, offset: int, default: Any, enumerants: Mapping[str, int]) -> Writer:
    if kind == "void":
        return _ignore
    if kind == "bool":
        byte, bit = divmod(offset, 8)
        flip = bool(default.bool)

        def write_bool(data: bytearray, base: int, value: object) -> None:
            if type(value) is not bool:
                raise TypeError
            if value is not flip:
                data[base + byte] |= 1 << bit

        return write_bool
    if kind == "enum":
        numbers: dict[object, int] = {n: n for n in enumerants.values()}
        numbers.update(enumerants.items())
        position = offset * 2
        default_number = default.enum

        def write_enum(data: bytearray, base: int, value: object) -> None:
            if type(value) is not str and type(value) is not int:
                raise TypeError  # (True or 1.0 would find 1 in numbers: pycapnp refuses them)
            _UINT16.pack_into(data, base + position, numbers[value] ^ default_number)  # KeyError: general way

        return write_enum
    format_ = _NUMBER_FORMATS.get(kind)
    if format_ is None:
        raise _NotFlat
    size = struct.calcsize(format_)
    position = offset * size
    packer = struct.Struct("<" + format_)
    default_value = getattr(default, kind)
    if kind.startswith("float"):
        default_bits = int.from_bytes(packer.pack(default_value), "little")
        if not default_bits:

            def write_float(data: bytearray, base: int, value: object) -> None:
                if type(value) is not float and type(value) is not int:
                    raise TypeError
                packer.pack_into(data, base + position, value)

            return write_float
        raise _NotFlat  # (a float default: rare, general way)
    unsigned = struct.Struct("<" + _UNSIGNED.get(kind, format_))
    mask = (1 << (8 * size)) - 1
    default_bits = default_value & mask

    def write_int(data: bytearray, base: int, value: object) -> None:
        if type(value) is not int:
            raise TypeError
        packer.pack(value)  # the range check, as the field's own type
        unsigned.pack_into(data, base + position, (value & mask) ^ default_bits)

    return write_int


BlobSpan = Callable[["FlatReader"], "tuple[memoryview, int, int] | None"]
"""Where a Text or Data field's bytes are in a received flat struct: (segment, start,
count), without Text's NUL; None for a null pointer; :data:`NOT_HERE` for a shape it does
not read (a single far pointer, a list of something else, Text without its NUL)."""

NOT_HERE: Final = (memoryview(b""), -1, -1)
_FAR_DOUBLE = 6  # a far pointer's low three bits when its landing pad is double (segments.py)


def _blob_span(offset: int, text: bool) -> BlobSpan:
    def span(view: FlatReader) -> tuple[memoryview, int, int] | None:
        if offset >= view._pointer_count:
            return None
        at = view._pointer_start + offset * _WORD
        segment = view._segment
        word = _WORD_STRUCT.unpack_from(segment, at)[0]
        if not word:
            return None
        if word & 7 == _FAR_DOUBLE:
            return _attached_span(view, word, text)
        if word & 3 != 1 or (word >> 32) & 7 != _BYTE_LIST:
            return NOT_HERE  # a far pointer, a list of something else: pycapnp says
        offset_words = (word >> 2) & 0x3FFFFFFF
        if offset_words & 0x20000000:
            offset_words -= 0x40000000
        start = at + _WORD + offset_words * _WORD
        count = word >> 35
        if start < 0 or start + count > len(segment):
            return NOT_HERE
        if text:
            if not count or segment[start + count - 1]:
                return NOT_HERE  # Text must end with its NUL
            count -= 1
        return segment, start, count

    return span


def _attached_span(view: FlatReader, word: int, text: bool) -> tuple[memoryview, int, int]:
    """A byte list reached by a double-far pointer (how an attached segment's value is, in
    segments.py): the pad's far pointer and tag read and bounds-checked here; any other
    shape is NOT_HERE."""
    segments = view._segments
    pad_segment, pad = word >> 32, ((word & 0xFFFFFFFF) >> 3) * _WORD
    if pad_segment >= len(segments):
        return NOT_HERE
    pads = memoryview(segments[pad_segment]).cast("B")
    if pad + 2 * _WORD > len(pads):
        return NOT_HERE
    far, tag = struct.unpack_from("<QQ", pads, pad)
    target = far >> 32
    if far & 7 != 2 or tag & 0xFFFFFFFF != 1 or (tag >> 32) & 7 != _BYTE_LIST or target >= len(segments):
        return NOT_HERE  # (a tag's offset must be 0: its list starts at the far pointer's word)
    segment = memoryview(segments[target]).cast("B")
    start, count = ((far & 0xFFFFFFFF) >> 3) * _WORD, tag >> 35
    if start + count > len(segment):
        return NOT_HERE
    if text:
        if not count or segment[start + count - 1]:
            return NOT_HERE
        count -= 1
    return segment, start, count


FieldReader = Callable[["FlatReader"], object]
"""Reads one field of a received flat struct; returns :data:`GENERAL` for a shape it does
not read (pycapnp reads it then)."""

GENERAL = object()


def _reader(kind: str, offset: int, default: Any) -> FieldReader | None:
    """How to read a field of ``kind`` (None: not here, e.g. an enum)."""
    if kind == "void":
        return lambda view: None
    if kind == "bool":
        byte, bit = divmod(offset, 8)
        flip = bool(default.bool)

        def read_bool(view: FlatReader) -> object:
            if byte >= view._data_bytes:
                return flip
            return bool(view._segment[view._data_start + byte] >> bit & 1) is not flip

        return read_bool
    if kind in ("text", "data"):
        fallback = default.text if kind == "text" else default.data
        span = _blob_span(offset, kind == "text")

        def read_blob(view: FlatReader) -> object:
            where = span(view)
            if where is None:
                return fallback
            if where is NOT_HERE:
                return GENERAL
            segment, start, count = where
            if kind == "data":
                return bytes(segment[start : start + count])
            try:
                return str(segment[start : start + count], "utf-8")
            except UnicodeDecodeError:
                return GENERAL

        return read_blob
    format_ = _NUMBER_FORMATS.get(kind)
    if format_ is None:
        return None
    packer = struct.Struct("<" + format_)
    size = packer.size
    position = offset * size
    default_value = getattr(default, kind)
    if kind.startswith("float"):
        if int.from_bytes(packer.pack(default_value), "little"):
            return None

        def read_float(view: FlatReader) -> object:
            if position + size > view._data_bytes:
                return 0.0
            return packer.unpack_from(view._segment, view._data_start + position)[0]

        return read_float
    unsigned = struct.Struct("<" + _UNSIGNED.get(kind, format_))
    bits = 8 * size
    default_bits = default_value & ((1 << bits) - 1)
    sign = 1 << (bits - 1) if kind in _UNSIGNED else 0

    def read_int(view: FlatReader) -> object:
        if position + size > view._data_bytes:
            return default_value
        raw: int = unsigned.unpack_from(view._segment, view._data_start + position)[0] ^ default_bits
        return raw - (raw & sign) * 2 if sign else raw

    return read_int


class FlatReader(StructReader):
    """A received flat struct, read field by field with :mod:`struct` (see the module
    docstring); anything else (a shape it does not read, ``pycapnp``, ``which()``) through
    the pycapnp reader ``general`` makes on first need."""

    __slots__ = (
        "_segment",
        "_segments",
        "_data_start",
        "_data_bytes",
        "_pointer_start",
        "_pointer_count",
        "_general",
        "_made",
    )
    _segment: memoryview
    _segments: Sequence[Segment]
    _data_start: int
    _data_bytes: int
    _pointer_start: int
    _pointer_count: int
    _general: Callable[[], StructReader]
    _made: bool
    _spans: dict[str, BlobSpan] = {}  # (the subclass's, by field name)
    _texts: frozenset[str] = frozenset()  # (the subclass's Text fields)

    @classmethod
    def _of(
        cls, segments: Sequence[Segment], general: Callable[[], StructReader], at: int = 0
    ) -> StructReader:
        """A reader of the struct the root pointer of ``segments`` (a message) points to
        (``at``: the byte of the first segment that pointer is at, for a struct inside a
        message): a FlatReader if that is a plain struct pointer forward into the first
        segment (or null: every field its default), else ``general()``, which also raises
        what is wrong with it, as any reading would. Values in other segments are read
        through double-far pointers only (segments.py), as the vat's tree check has seen
        them; every offset counts from the segment's start, as Cap'n Proto's do."""
        segment = memoryview(segments[0])
        word = _WORD_STRUCT.unpack_from(segment, at)[0] if len(segment) >= at + _WORD else 0
        offset = (word >> 2) & 0x3FFFFFFF
        data_words, pointer_words = (word >> 32) & 0xFFFF, word >> 48
        start = at + _WORD + offset * _WORD
        end = start + (data_words + pointer_words) * _WORD
        if word and (word & 3 or offset & 0x20000000 or end > len(segment)):
            return general()
        view = cls.__new__(cls)
        view._segment, view._segments, view._general, view._made = segment, segments, general, False
        view._blobs = None
        view._data_start, view._data_bytes = start, data_words * _WORD
        view._pointer_start, view._pointer_count = start + data_words * _WORD, pointer_words
        return view

    def _pycapnp_view(self) -> None:
        """Makes this reader a plain StructReader (its slots filled by the general way)."""
        if not self._made:
            general = self._general()
            self._reader, self._layout = general._reader, general._layout
            self._table, self._path = general._table, general._path
            self._made = True

    @property
    def pycapnp(self) -> Any:
        self._pycapnp_view()
        return self._reader

    def which(self) -> str:
        self._pycapnp_view()
        return StructReader.which(self)

    def to_dict(self) -> dict[str, Any]:
        self._pycapnp_view()  # (its layout: not a hot path)
        return StructReader.to_dict(self)

    def __repr__(self) -> str:
        self._pycapnp_view()
        return StructReader.__repr__(self)

    def any_struct(self, name: str, schema: Any) -> StructReader:
        self._pycapnp_view()
        return StructReader.any_struct(self, name, schema)

    def capability_at(self, transform: Sequence[int]) -> object | None:
        self._pycapnp_view()
        return StructReader.capability_at(self, transform)

    def view(self, name: str) -> memoryview:
        span = self._spans.get(name)
        where = None if span is None else span(self)
        if where is None or where is NOT_HERE:  # (null, or not read here: StructReader's)
            return StructReader.view(self, name)
        segment, start, count = where
        view = segment[start : start + count].toreadonly()
        if name in self._texts:
            try:
                codecs.utf_8_decode(view, "strict", True)  # (Text is UTF-8, as str reads it)
            except UnicodeDecodeError:
                return StructReader.view(self, name)  # (which says what is wrong with it)
        return view

    def __getattr__(self, name: str) -> Any:  # (not a field read here)
        self._pycapnp_view()
        return StructReader.__getattr__(self, name)


def _reader_class(
    name: str, readers: dict[str, FieldReader], spans: dict[str, tuple[BlobSpan, bool]]
) -> type[FlatReader]:
    """A FlatReader subclass with a property per field: read without the failed lookup
    that reaching ``__getattr__`` costs. A field named like an attribute of the reader
    itself (``which``, ``pycapnp``) is shadowed by it, as on any StructReader."""
    fields = {n: _field_property(n, r) for n, r in readers.items() if not hasattr(FlatReader, n)}
    fields.update({spelled: _field_property(n, readers[n]) for spelled, n in renamed(readers).items()})
    texts = frozenset(name for name, (_, text) in spans.items() if text)
    namespace = {
        "__slots__": (),
        "_spans": {n: span for n, (span, _) in spans.items()},
        "_texts": texts,
        **fields,
    }
    return type(f"Flat{name.rpartition(':')[2]}Reader", (FlatReader,), namespace)


def _field_property(name: str, reader: FieldReader) -> property:
    def read(view: FlatReader) -> Any:
        value = reader(view)
        if value is GENERAL:  # a shape not read here: pycapnp reads it (and says what is wrong)
            view._pycapnp_view()
            return StructReader.__getattr__(view, name)
        return value

    return property(read)


def _ignore(data: bytearray, base: int, value: object) -> None:
    if value is not None:
        raise TypeError


_codecs: dict[int, tuple[Any, FlatCodec | None]] = {}


def flat_codec(schema: Any) -> FlatCodec | None:
    """The codec of a struct schema if it is flat (see the module docstring), else None.
    Looked up by the schema object (``schema.node`` makes a new reader each time)."""
    known = _codecs.get(id(schema))
    if known is not None and known[0] is schema:
        return known[1]
    try:
        codec: FlatCodec | None = FlatCodec(schema)
    except _NotFlat:
        codec = None
    _codecs[id(schema)] = (schema, codec)  # (the schema kept: its id stays its own)
    return codec
