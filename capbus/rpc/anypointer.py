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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import capnp

from .capwire import Path
from .errors import kj_reason
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


class _Received:
    """A received pointer of a type its reader names. What each ``as_*`` read is kept: a
    message's reads are charged to one traversal budget, and a value read again (a server
    that keeps it) must read the same, however often."""

    __slots__ = ("_reader", "_table", "_path", "_name", "_read")

    def __init__(self, reader: Any, table: CapTableReader, path: Path, name: str) -> None:
        self._reader, self._table, self._path, self._name = reader, table, path, name
        self._read: dict[Any, Any] = {}

    @property
    def pycapnp(self) -> Any:
        """pycapnp's reader of the pointer (its capabilities cannot be read through it)."""
        return self._reader

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name}>"

    def _kept(self, key: Any, read: Callable[[], Any]) -> Any:
        found = self._read.get(key, _MISSING)
        if found is _MISSING:
            found = self._read[key] = read()
        return found

    def _struct(self, type_: Any) -> Any:
        from .structs import StructReader

        schema = struct_schema(type_)

        def read() -> Any:
            try:
                reader = self._reader.as_struct(schema)
            except capnp.KjException as error:
                raise ValueError(f"{self._name} is not a struct: {kj_reason(error)}") from None
            view = StructReader(reader, layout_of(schema), self._table, self._path)
            return type_(view) if _is_generated(type_) else view

        return self._kept(("struct", id(schema)), read)

    def _list(self, element: Any) -> Sequence[Any]:
        schema = _list_schema(element)

        def read() -> Sequence[Any]:
            try:
                reader = self._reader.as_list(schema)
            except capnp.KjException as error:
                raise ValueError(
                    f"{self._name} is not a list of {type_name(element)}: {kj_reason(error)}"
                ) from None
            return ListView(reader, element, self._table, self._path)

        key = element if isinstance(element, str) else id(struct_schema(element))
        return self._kept(("list", key), read)  # type: ignore[no-any-return]


_MISSING = object()


def type_name(element: Any) -> str:
    """An element type as the schema names it (``Int32``, ``Point``)."""
    if isinstance(element, str):
        return element
    try:
        return str(struct_schema(element).node.displayName).rpartition(":")[2]
    except (TypeError, AttributeError):
        return repr(element)


class ListView(Sequence[Any]):
    """A received list, read element by element as it is indexed (a list of structs makes
    a view per element only when one is asked for): memory in proportion to the message."""

    __slots__ = ("_reader", "_element", "_table", "_path", "_layout")

    def __init__(self, reader: Any, element: Any, table: CapTableReader, path: Path) -> None:
        self._reader, self._element, self._table, self._path = reader, element, table, path
        self._layout = None if isinstance(element, str) else layout_of(struct_schema(element))

    def __len__(self) -> int:
        return len(self._reader)

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("list index out of range")
        try:
            value = self._reader[index]
        except capnp.KjException as error:
            raise ValueError(
                f"element {index} of a list of {type_name(self._element)}: {kj_reason(error)}"
            ) from None
        if self._layout is None:
            return value
        from .structs import StructReader

        view = StructReader(value, self._layout, self._table, (*self._path, ("e", index)))
        return self._element(view) if _is_generated(self._element) else view

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __add__(self, other: Sequence[Any]) -> list[Any]:
        return [*self, *other]

    def __radd__(self, other: Sequence[Any]) -> list[Any]:
        return [*other, *self]

    def __repr__(self) -> str:
        return f"<list of {len(self)} {type_name(self._element)}>"


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
    def as_list(self, element: type[S]) -> Sequence[S]: ...
    @overload
    def as_list(self, element: Any) -> Sequence[Any]: ...
    def as_list(self, element: Any) -> Sequence[Any]:
        """The value as a list of ``element``: a struct type (instances of a generated
        class, else StructReaders) or a :data:`PRIMITIVES` name (Python values). A
        sequence read as it is indexed (``list(...)`` for a list of its own)."""
        return self._list(element)


class AnyPointer(AnyStruct, AnyList):
    """A received ``AnyPointer`` value that is not a capability: a struct, a list, Text or
    Data, as its reader knows."""

    __slots__ = ()

    def as_text(self) -> str:
        def read() -> str:
            try:
                return str(self._reader.as_text())
            except capnp.KjException as error:
                raise ValueError(f"{self._name} is not Text: {kj_reason(error)}") from None
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{self._name} is not Text: not UTF-8 ({error.reason} at {error.start})"
                ) from None

        return self._kept("text", read)  # type: ignore[no-any-return]

    def as_data(self) -> bytes:
        def read() -> bytes:
            try:
                return bytes(self._reader.as_list(capnp._ListSchema(capnp.types.UInt8)))
            except capnp.KjException as error:
                raise ValueError(f"{self._name} is not Data: {kj_reason(error)}") from None

        return self._kept("data", read)  # type: ignore[no-any-return]


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
    """Sets AnyPointer-kind field ``f`` of ``builder`` to ``value``: anything but a
    capability (which StructBuilder sets itself where the field's kind takes one)."""
    from .protocol import fill
    from .structs import StructReader, is_capability
    from .stubs import Struct

    constraint = f.any_kind
    where = described(builder.layout_name, f.name)
    refused = WrongKind(
        f"{where}: {_WHAT[constraint]} takes {_TAKES[constraint]}, not {type(value).__name__}"
    )
    if constraint == "capability" or is_capability(value):
        raise refused
    if isinstance(value, Struct):
        value = value._view
    if isinstance(value, StructReader):
        if constraint not in ("", "struct"):
            raise refused
        if not value.holds_capabilities():
            # Copied as it is: fields its reader's schema does not name (a newer version's)
            # go on too. (A message without capability pointers: nothing to re-attach.)
            _copy(builder, f.name, value.pycapnp, where)
            return
        value = StructValue(value.pycapnp.schema, value.to_dict())  # (its capabilities too)
    kind = type(value).__name__
    if isinstance(value, StructValue) and constraint in ("", "struct"):
        fill(builder.any_struct(f.name, value.schema), layout_of(value.schema), value.fields)
    elif isinstance(value, ListValue) and constraint in ("", "list"):
        _write_list(builder, f, value)
    elif isinstance(value, _Received):
        if constraint and not _holds(value, constraint):
            raise refused
        _copy(builder, f.name, value.pycapnp, where)
    elif constraint == "" and isinstance(value, bytes | bytearray | memoryview):
        _write_list(builder, f, ListValue("UInt8", bytes(value)))  # (Data is a List(UInt8))
    elif constraint == "" and isinstance(value, str):
        builder.set_raw(f.name, value)
    elif kind == "_DynamicStructBuilder" and constraint in ("", "struct"):
        builder.set_raw(f.name, value)  # (built here: nothing in it to throw on a copy)
    elif kind == "_DynamicListBuilder" and constraint in ("", "list"):
        builder.set_raw(f.name, value)
    elif kind == "_DynamicStructReader" and constraint in ("", "struct"):
        # A reader may be of a received message: never copied by pycapnp, whose copy of a
        # capability or of a pointer of the wrong kind throws past Python (an abort).
        fill(builder.any_struct(f.name, value.schema), layout_of(value.schema), plain_reader(value, where))
    elif kind == "_DynamicListReader" and constraint in ("", "list"):
        items = plain_reader(value, where)
        _write_list(builder, f, ListValue(_element_of(items, where), items))
    else:
        raise refused


def plain_reader(value: Any, where: str) -> Any:
    """A pycapnp reader's value as plain Python (a struct as the dict of its fields, a list
    as a list), read element by element: what pycapnp finds wrong in it raises here (as
    WrongKind), never inside a copy."""
    try:
        if type(value).__name__ == "_DynamicStructReader":
            return value.to_dict()
        return [plain_reader(v, where) if type(v).__name__.startswith("_Dynamic") else v for v in value]
    except capnp.KjException as error:
        raise WrongKind(f"{where}: this value cannot be sent on: {kj_reason(error)}") from None


def _element_of(items: Sequence[Any], where: str) -> str:
    """The element type of a list pycapnp read, by its elements' Python type."""
    kinds = {type(item) for item in items}
    for python, element in (
        (str, "Text"),
        (bytes, "Data"),
        (bool, "Bool"),
        (int, "Int64"),
        (float, "Float64"),
    ):
        if kinds <= {python}:
            return element
    names = ", ".join(sorted(k.__name__ for k in kinds))
    raise WrongKind(f"{where}: a list of {names}: send capbus.list_value(T, items)")


_BYTES = capnp._ListSchema(capnp.types.UInt8)
_BITS = capnp._ListSchema(capnp.types.Bool)
_POINTERS = capnp._ListSchema(capnp.types.Text)


def _holds(value: _Received, constraint: str) -> bool:
    """Whether a received value is of the kind ``constraint`` names (a struct, a list: of
    bytes, bits, pointers or structs, whichever it is)."""
    from .envelope import rpc

    if constraint == "struct":
        probes: tuple[Callable[[], object], ...] = (lambda: value.pycapnp.as_struct(rpc.Finish.schema),)
    else:
        probes = tuple(
            (lambda schema=schema: value.pycapnp.as_list(schema))  # type: ignore[misc]
            for schema in (_BYTES, _BITS, _POINTERS, capnp._ListSchema(rpc.Finish.schema))
        )
    for probe in probes:
        try:
            probe()
        except capnp.KjException:
            continue
        return True
    return False


def _copy(builder: StructBuilder, name: str, reader: Any, where: str) -> None:
    """A copy of a received value into an AnyPointer field, as it is (pycapnp's copy of an
    AnyPointer raises, rather than aborts, on what it cannot copy)."""
    try:
        builder.set_raw(name, reader)
    except capnp.KjException as error:
        raise WrongKind(
            f"{where}: this value cannot be passed on as it is ({kj_reason(error)});"
            " read it with as_struct or as_list first"
        ) from None


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
