"""Values of ``AnyPointer``, ``AnyStruct`` and ``AnyList`` fields, both ways.

Cap'n Proto leaves what such a pointer holds to the programs that use it, so neither side
can know its type from the schema. A received one reads as an :class:`AnyPointer` (an
:class:`AnyStruct` or :class:`AnyList` for the constrained kinds) that the reader turns into
what it knows the value to be: ``value.as_struct(Point)`` gives a ``Point`` (a generated
struct class, a ``capbus.load`` struct or a pycapnp schema), ``value.as_list(Point)`` or
``value.as_list("Int32")`` a list; capabilities inside resolve as in any struct. To send
one, say what it is: ``Point.new_value({...})`` or :func:`struct_value` for a struct,
:func:`list_value` for a list (also ``capbus.struct_value`` and ``capbus.list_value``), or
pass a received struct on as it is (re-sent by its fields, capabilities too) or a received
value (copied; one holding a capability must be read with ``as_struct`` first, since where
its capabilities are is known only from its type). A field that holds a capability reads
as a client and takes a client or a server; a null pointer reads as None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import capnp

from .capwire import Path
from .layout import FieldLayout, described, layout_of

if TYPE_CHECKING:
    from typing import TypeAlias

    from .client import Client
    from .server import Server
    from .structs import CapTableReader, StructBuilder, StructReader
    from .stubs import Struct

S = TypeVar("S", bound="Struct")

PRIMITIVES = frozenset(
    ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64")
    + ("Float32", "Float64", "Text", "Data")
)
"""The element type names :meth:`AnyList.as_list` and :func:`list_value` take, as the
schema language spells them."""


def struct_schema(type_: Any) -> Any:
    """The pycapnp struct schema of a generated struct class, a ``capbus.load`` (pycapnp)
    struct type or a pycapnp struct schema itself."""
    schema = getattr(type_, "schema", type_)
    node = getattr(schema, "node", None)
    if node is None or node.which() != "struct":
        raise TypeError(f"not a struct type: {type_!r}")
    return schema


def _list_schema(element: Any) -> Any:
    """pycapnp's list schema of ``element`` (a struct type or a :data:`PRIMITIVES` name)."""
    if isinstance(element, str):
        if element not in PRIMITIVES:
            raise ValueError(
                f"unknown list element type {element!r} (one of {', '.join(sorted(PRIMITIVES))})"
            )
        return capnp._ListSchema(getattr(capnp.types, element))
    return capnp._ListSchema(struct_schema(element))


@dataclass(frozen=True, slots=True)
class StructValue(Generic[S]):
    """A struct of type ``schema`` to send in an AnyPointer or AnyStruct field: its fields
    as a call takes them (capabilities, nested structs and lists included)."""

    schema: Any
    fields: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ListValue:
    """A list to send in an AnyPointer or AnyList field: ``element`` is a struct type (then
    ``items`` are mappings of fields) or a :data:`PRIMITIVES` name."""

    element: Any
    items: Sequence[Any]


if TYPE_CHECKING:  # (what generated modules' signatures name)
    SendableStruct: TypeAlias = "StructValue[Any] | Struct | StructReader | AnyStruct"
    """What an AnyStruct field takes: a struct value, or a struct received (passed on)."""
    SendableList: TypeAlias = "ListValue | AnyList"
    Sendable: TypeAlias = "SendableStruct | SendableList | AnyPointer | Client | Server | str | bytes"
    """What an AnyPointer field takes."""


@overload
def struct_value(type_: type[S], fields: Mapping[str, Any]) -> StructValue[S]: ...


@overload
def struct_value(type_: Any, fields: Mapping[str, Any]) -> StructValue[Any]: ...
def struct_value(type_: Any, fields: Mapping[str, Any]) -> StructValue[Any]:
    """A struct of ``type_`` with ``fields``, to send in an AnyPointer or AnyStruct field."""
    return StructValue(struct_schema(type_), dict(fields))


def list_value(element: Any, items: Sequence[Any]) -> ListValue:
    """A list of ``element`` (a struct type or a :data:`PRIMITIVES` name such as ``"Int32"``)
    to send in an AnyPointer or AnyList field."""
    _list_schema(element)  # (refused here, where the caller can see why)
    return ListValue(element, list(items))


class WrongKind(TypeError):
    """A value an AnyPointer-kind field cannot hold (a list for an AnyStruct, say)."""


def _reason(error: Exception) -> str:
    return str(error).split("; stack:", 1)[0].split("\nstack:", 1)[0].strip().rpartition(" failed: ")[2]


class _Received:
    """A received pointer of a type its reader names."""

    __slots__ = ("_reader", "_table", "_path", "_name")

    def __init__(self, reader: Any, table: CapTableReader, path: Path, name: str) -> None:
        self._reader, self._table, self._path, self._name = reader, table, path, name

    @property
    def pycapnp(self) -> Any:
        """pycapnp's reader of the pointer (its capabilities cannot be read through it)."""
        return self._reader

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name}>"

    def _struct(self, type_: Any) -> Any:
        from .structs import StructReader

        schema = struct_schema(type_)
        try:
            reader = self._reader.as_struct(schema)
        except capnp.KjException as error:
            raise ValueError(f"{self._name} is not a struct: {_reason(error)}") from None
        view = StructReader(reader, layout_of(schema), self._table, self._path)
        return type_(view) if _is_generated(type_) else view

    def _list(self, element: Any) -> list[Any]:
        from .structs import StructReader

        try:
            reader = self._reader.as_list(_list_schema(element))
        except capnp.KjException as error:
            raise ValueError(f"{self._name} is not a list of {element}: {_reason(error)}") from None
        if isinstance(element, str):
            return list(reader)
        layout = layout_of(struct_schema(element))
        views = [StructReader(e, layout, self._table, (*self._path, ("e", i))) for i, e in enumerate(reader)]
        return [element(v) for v in views] if _is_generated(element) else views


def _is_generated(type_: Any) -> bool:
    from .stubs import Struct

    return isinstance(type_, type) and issubclass(type_, Struct)


class AnyStruct(_Received):
    """A received ``AnyStruct`` (or ``AnyPointer``) value: read it as the struct it is."""

    __slots__ = ()

    @overload
    def as_struct(self, type_: type[S]) -> S: ...
    @overload
    def as_struct(self, type_: Any) -> StructReader: ...
    def as_struct(self, type_: Any) -> Any:
        """The value as a struct of ``type_``: an instance of a generated struct class, else
        a StructReader (``capbus.load``'s struct types, pycapnp schemas)."""
        return self._struct(type_)


class AnyList(_Received):
    """A received ``AnyList`` (or ``AnyPointer``) value: read it as the list it is."""

    __slots__ = ()

    @overload
    def as_list(self, element: type[S]) -> list[S]: ...
    @overload
    def as_list(self, element: Any) -> list[Any]: ...
    def as_list(self, element: Any) -> list[Any]:
        """The value as a list of ``element``: a struct type (instances of a generated
        class, else StructReaders) or a :data:`PRIMITIVES` name (Python values)."""
        return self._list(element)


class AnyPointer(AnyStruct, AnyList):
    """A received ``AnyPointer`` value that is not a capability: a struct, a list, Text or
    Data, as its reader knows."""

    __slots__ = ()

    def as_text(self) -> str:
        try:
            return str(self._reader.as_text())
        except capnp.KjException as error:
            raise ValueError(f"{self._name} is not Text: {_reason(error)}") from None

    def as_data(self) -> bytes:
        try:
            return bytes(self._reader.as_list(capnp._ListSchema(capnp.types.UInt8)))
        except capnp.KjException as error:
            raise ValueError(f"{self._name} is not Data: {_reason(error)}") from None


_READERS: dict[str, type[_Received]] = {"struct": AnyStruct, "list": AnyList}


def read(reader: Any, table: CapTableReader, path: Path, name: str, constraint: str) -> _Received:
    """The received value of an AnyPointer-kind field that does not hold a capability."""
    return _READERS.get(constraint, AnyPointer)(reader, table, path, name)


_WHAT = {"struct": "an AnyStruct", "list": "an AnyList", "capability": "a Capability", "": "an AnyPointer"}
_TAKES = {
    "struct": "a struct (T.new_value(fields), capbus.struct_value or a received struct)",
    "list": "a list (capbus.list_value)",
    "capability": "a client or a server",
    "": "a struct, a list, Text, Data or a capability",
}


def write(builder: StructBuilder, f: FieldLayout, value: Any) -> None:
    """Sets AnyPointer-kind field ``f`` of ``builder`` to ``value`` (not a capability)."""
    from .protocol import fill
    from .structs import StructReader
    from .stubs import Struct

    constraint = f.any_kind
    where = described(builder.layout_name, f.name)
    if isinstance(value, Struct):
        value = value._view
    if isinstance(value, StructReader):  # (re-sent by its fields: its capabilities too)
        value = StructValue(value.pycapnp.schema, value.to_dict())
    if isinstance(value, StructValue) and constraint in ("", "struct"):
        fill(builder.any_struct(f.name, value.schema), layout_of(value.schema), value.fields)
    elif isinstance(value, ListValue) and constraint in ("", "list"):
        _write_list(builder, f, value)
    elif isinstance(value, _Received) and (constraint == "" or isinstance(value, _READERS[constraint])):
        try:
            builder.set_raw(f.name, value.pycapnp)
        except capnp.KjException as error:
            raise WrongKind(
                f"{where}: this {type(value).__name__} cannot be passed on as it is ({_reason(error)});"
                " read it with as_struct or as_list first"
            ) from None
    elif constraint == "" and isinstance(value, bytes | bytearray | memoryview):
        _write_list(builder, f, ListValue("UInt8", bytes(value)))  # (Data is a List(UInt8))
    elif _is_pycapnp(value, constraint):
        builder.set_raw(f.name, value)
    else:
        raise WrongKind(
            f"{where}: {_WHAT[constraint]} takes {_TAKES[constraint]}, not {type(value).__name__}"
        )


def _is_pycapnp(value: Any, constraint: str) -> bool:
    """A value pycapnp builds itself (no capabilities): its struct and list readers and
    builders, and for an unconstrained AnyPointer Text."""
    kind = type(value).__name__
    if kind.startswith("_DynamicStruct"):
        return constraint in ("", "struct")
    if kind.startswith("_DynamicList"):
        return constraint in ("", "list")
    return constraint == "" and isinstance(value, str)


def _write_list(builder: StructBuilder, f: FieldLayout, value: ListValue) -> None:
    from .protocol import fill
    from .structs import StructBuilder as _Builder

    items = list(value.items)
    raw = builder.init_any_list(f.name, _list_schema(value.element), len(items))
    if isinstance(value.element, str):
        for i, item in enumerate(items):
            raw[i] = item
        return
    schema = struct_schema(value.element)
    layout = layout_of(schema)
    for i, (element, item) in enumerate(zip(raw, items, strict=True)):
        fill(
            _Builder.within(element, layout, builder, (*builder.path, ("p", f.slot), ("e", i))), layout, item
        )
