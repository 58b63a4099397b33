"""Writing a flat params or results struct straight into its segment, without pycapnp.

A struct whose fields are all numbers, bools, enums, Text or Data (no union, group, list,
struct, capability or AnyPointer) is most of what RPC methods take and return, and building
it through a pycapnp message cost more than anything else in encoding a small call (a
message, a builder, a setattr per field, ``to_segments``). Such a struct is laid out here
once per schema (:func:`flat_codec`) and then written with :mod:`struct` into one segment:
its root pointer, data section, pointer section and the Text and Data blobs after them, as
libcapnp lays a freshly built message out. Anything else, and any value this does not take
exactly as pycapnp would (a bool that is not a bool, an int out of range, an unknown enum
name), goes the general way, which also gives the error.

Written by hand rather than with a library: pycapnp is the Cap'n Proto library here, and
its builder is what this avoids; the layout rules used are the encoding spec's
(https://capnproto.org/encoding.html: struct and list pointers, XOR with defaults).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

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

    __slots__ = ("data_words", "pointer_words", "_data", "_pointers", "_root")

    def __init__(self, schema: Any) -> None:
        node = schema.node
        structure = node.struct
        if structure.discriminantCount or node.isGeneric:
            raise _NotFlat
        self.data_words = structure.dataWordCount
        self.pointer_words = structure.pointerCount
        self._data: dict[str, Writer] = {}
        self._pointers: dict[str, tuple[int, bool]] = {}  # name -> (slot, is Text)
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
        self._root = struct.pack("<Q", (self.data_words << 32) | (self.pointer_words << 48))

    def encode(self, values: Mapping[str, Any]) -> bytes | None:
        """The struct as one segment (its root pointer first); None if a value must go the
        general way (unknown field, or not exactly what this writes)."""
        data = bytearray(self.data_words * _WORD)
        blobs: list[tuple[int, bytes, int]] = []  # (slot, bytes, element count)
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
                    blob = value.encode()
                    if b"\0" in blob:
                        return None  # (pycapnp's to say what it does with a NUL)
                    blobs.append((slot, blob, len(blob) + 1))
                elif isinstance(value, bytes | bytearray | memoryview):
                    blob = bytes(value)
                    blobs.append((slot, blob, len(blob)))
                else:
                    return None
        except (TypeError, ValueError, OverflowError, KeyError, struct.error):
            return None
        pointers = bytearray(self.pointer_words * _WORD)
        # Blobs follow the struct in slot order of their setting, each padded to words.
        offset_words = self.data_words + self.pointer_words  # from the struct's start
        parts = [self._root, bytes(data), b"", b""]
        tail: list[bytes] = []
        for slot, blob, count in blobs:
            # A list pointer's offset counts words from the end of the pointer itself.
            end_of_pointer = self.data_words + slot + 1
            pointer = 1 | ((offset_words - end_of_pointer) << 2) | (_BYTE_LIST << 32) | (count << 35)
            struct.pack_into("<Q", pointers, slot * _WORD, pointer)
            size = (count + _WORD - 1) // _WORD * _WORD
            tail.append(blob)
            tail.append(bytes(size - len(blob)))
            offset_words += size // _WORD
        parts[2] = bytes(pointers)
        parts[3] = b"".join(tail)
        return b"".join(parts)


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
