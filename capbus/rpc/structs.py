"""Struct views that carry capabilities: pycapnp for everything else, capwire for these.

:class:`StructBuilder` wraps a pycapnp builder. Setting an interface-typed field (or a
List(Interface)) records the capability in a :class:`CapTableBuilder` and a patch for its
pointer slot instead of touching pycapnp, which cannot hold capabilities outside its own RPC;
:meth:`StructBuilder.finish` serializes and applies the patches. :class:`StructReader` wraps
a pycapnp reader over a stripped message (:func:`capwire.strip_caps`) and resolves an
interface field by its path to the capability the message's table holds at that index.

Capability values are opaque here (the RPC layer passes its client objects); the same value
set twice gets one index, which Cap'n Proto allows.
"""

from __future__ import annotations

import reprlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import capnp

from . import capwire
from .capwire import CapWireError, Location, Path, Segment
from .layout import FieldKind, FieldLayout, StructLayout, layout_of
from .naming import RESERVED

_SHADOWING = RESERVED
"""Field names a pycapnp reader's attribute of its own may shadow (``which``...)."""
_KEPT_BLOB_BYTES = 4096
"""Text and Data values larger than this are kept once read (StructReader._blobs)."""
_DATA_KINDS = (FieldKind.PLAIN, FieldKind.ANY_POINTER)


class CapTableBuilder:
    """The capabilities of one outgoing message, by index in first-use order, and the file
    descriptors it carries (``fds``, by index too)."""

    def __init__(self) -> None:
        self.values: list[object] = []
        self._indices: dict[int, int] = {}
        self.fds: list[int] = []

    def fd_index(self, fd: Any) -> int:
        number = fd if isinstance(fd, int) else fd.fileno()
        if not isinstance(number, int) or number < 0:
            raise TypeError(f"not a file descriptor: {fd!r}")
        if number in self.fds:
            return self.fds.index(number)
        self.fds.append(number)
        return len(self.fds) - 1

    def index_of(self, value: object) -> int:
        index = self._indices.get(id(value))
        if index is None:
            index = self._indices[id(value)] = len(self.values)
            self.values.append(value)
        return index


class _Patches:
    """What a builder tree recorded: capability patches and union discriminants to write."""

    def __init__(self, table: CapTableBuilder) -> None:
        self.table = table
        self.caps: dict[Path, int] = {}  # the last value set for a slot wins, as in pycapnp
        self.discriminants: list[tuple[Path, int, int]] = []


class StructBuilder:
    """A pycapnp struct builder whose capability fields are set with capability values."""

    __slots__ = ("_builder", "_layout", "_patches", "_path")
    _builder: Any
    _layout: StructLayout
    _patches: _Patches
    _path: Path

    def __init__(self, builder: Any, layout: StructLayout, patches: _Patches, path: Path) -> None:
        object.__setattr__(self, "_builder", builder)
        object.__setattr__(self, "_layout", layout)
        object.__setattr__(self, "_patches", patches)
        object.__setattr__(self, "_path", path)

    @classmethod
    def root(cls, builder: Any, layout: StructLayout, table: CapTableBuilder | None = None) -> StructBuilder:
        """A view of a message's root struct (or of a struct inside an AnyPointer at ``path``)."""
        return cls(builder, layout, _Patches(table or CapTableBuilder()), ())

    @classmethod
    def within(cls, builder: Any, layout: StructLayout, parent: StructBuilder, path: Path) -> StructBuilder:
        """A view of a struct reached at ``path`` from the root of ``parent``'s message."""
        return cls(builder, layout, parent._patches, path)

    @property
    def table(self) -> CapTableBuilder:
        return self._patches.table

    @property
    def pycapnp(self) -> Any:
        """The underlying pycapnp builder (set plain fields on it directly if you like)."""
        return self._builder

    def _field(self, name: str) -> FieldLayout | None:
        return self._layout.fields.get(name)

    def __getattr__(self, name: str) -> Any:
        f = self._field(name)
        if f is None or f.kind in _DATA_KINDS or f.kind is FieldKind.CAPABILITY:
            return getattr(self._builder, name)
        if f.kind is FieldKind.CAPABILITY_LIST:
            return _CapListBuilder(self, f)
        assert f.nested is not None
        value = getattr(self._builder, name)
        if f.kind is FieldKind.GROUP:
            return StructBuilder(value, f.nested, self._patches, self._path)
        if f.kind is FieldKind.STRUCT:
            return StructBuilder(value, f.nested, self._patches, (*self._path, ("p", f.slot)))
        return _StructListBuilder(value, f.nested, self._patches, (*self._path, ("p", f.slot)))

    def __setattr__(self, name: str, value: Any) -> None:
        f = self._field(name)
        if f is not None and f.kind is FieldKind.FD:
            if value is not None:
                self._builder.init(name).index = self._patches.table.fd_index(value)
            return
        kind = None if f is None else f.kind
        if kind is FieldKind.ANY_POINTER:
            assert f is not None
            if value is None:
                if f.discriminant is not None:  # (a null member of a union: still the one set)
                    self._patches.discriminants.append(
                        (self._path, self._layout.discriminant_offset, f.discriminant)
                    )
                return
            if not is_capability(value) or f.any_kind in ("struct", "list"):
                from . import anypointer  # (it builds on these views)

                anypointer.write(self, f, value)
                return
            kind = FieldKind.CAPABILITY  # (an AnyPointer, Capability or generic field)
        if f is None or kind not in (FieldKind.CAPABILITY, FieldKind.CAPABILITY_LIST):
            if type(value).__name__ in _PYCAPNP_READERS:
                # A reader (of a received message, maybe): never copied by pycapnp, whose copy
                # of a pointer of the wrong kind throws past Python (an abort); read here.
                from .anypointer import plain_reader
                from .layout import described

                value = plain_reader(value, described(self._layout.name, name))
            setattr(self._builder, name, value)
            return
        slot_path: Path = (*self._path, ("p", f.slot))
        caps = self._patches.caps
        if kind is FieldKind.CAPABILITY:
            caps.pop(slot_path, None)
            if value is not None:
                caps[slot_path] = self._patches.table.index_of(value)
        else:
            values = list(value)
            self._builder.init(name, len(values))
            for stale in [p for p in caps if p[: len(slot_path)] == slot_path]:
                del caps[stale]  # the list was replaced: its old elements are gone
            for i, element in enumerate(values):
                if element is not None:
                    caps[(*slot_path, ("e", i))] = self._patches.table.index_of(element)
        if f.discriminant is not None:
            self._patches.discriminants.append((self._path, self._layout.discriminant_offset, f.discriminant))

    def init(self, name: str, size: int | None = None) -> Any:
        """pycapnp's ``init``, returning views for struct and struct-list fields."""
        f = self._field(name)
        value = self._builder.init(name) if size is None else self._builder.init(name, size)
        if f is None or f.nested is None:
            return value
        if f.kind is FieldKind.STRUCT_LIST:
            return _StructListBuilder(value, f.nested, self._patches, (*self._path, ("p", f.slot)))
        path = self._path if f.kind is FieldKind.GROUP else (*self._path, ("p", f.slot))
        return StructBuilder(value, f.nested, self._patches, path)

    def any_struct(self, name: str, schema: Any) -> StructBuilder:
        """The AnyPointer field ``name`` initialized as a struct of ``schema`` (a call's
        params, a return's results), as a view in the same message."""
        f = self._field(name)
        if f is None or f.kind is not FieldKind.ANY_POINTER:
            raise TypeError(f"{name} is not an AnyPointer field")
        if f.discriminant is not None and self._builder.which() != name:
            # (pycapnp gets no union member that is not set: set it to an empty struct first)
            self._builder._set(name, capnp.lib.capnp._StructModule(schema, "").new_message())
        builder = getattr(self._builder, name).as_struct(schema)
        return StructBuilder(builder, layout_of(schema), self._patches, (*self._path, ("p", f.slot)))

    def init_any_list(self, name: str, schema: Any, size: int) -> Any:
        """The AnyPointer field ``name`` initialized as a list (``schema``: pycapnp's list
        schema) of ``size`` elements: pycapnp's list builder."""
        if self._field(name) is not None and self._layout.fields[name].discriminant is not None:
            self._builder._set(name, "")  # (pycapnp gets no union member that is not set)
        return getattr(self._builder, name).init_as_list(schema, size)

    def set_raw(self, name: str, value: Any) -> None:
        """Sets field ``name`` through pycapnp as it is (a value without capabilities)."""
        self._builder._set(name, value)

    @property
    def layout_name(self) -> str:
        """The struct's display name (its schema's)."""
        return self._layout.name

    @property
    def path(self) -> Path:
        """Where this struct is, from its message's root."""
        return self._path

    def finish(self, message: Any | None = None) -> tuple[list[Segment], list[object]]:
        """Serializes the message this view belongs to (``message``: its root builder, when
        this view is not the root) and returns its segments and its capabilities by index."""
        segments: list[Segment] = list((message or self._builder).to_segments())
        if self._patches.caps:
            segments = capwire.patch_caps(segments, self._patches.caps.items())
        for path, offset, value in self._patches.discriminants:
            segments = capwire.set_discriminant(segments, path, offset, value)
        return segments, self._patches.table.values


_PYCAPNP_READERS = frozenset(("_DynamicListReader", "_DynamicStructReader"))


def is_capability(value: object) -> bool:
    """Whether ``value`` is a capability value (a client, or a server to export)."""
    from .client import Client
    from .server import Server

    return isinstance(value, Client | Server)


class _CapListBuilder:
    """An existing List(Interface) of a builder (``init`` it first): set elements to
    capability values."""

    __slots__ = ("_owner", "_field", "_list")

    def __init__(self, owner: StructBuilder, field: FieldLayout) -> None:
        self._owner, self._field = owner, field
        self._list = getattr(owner._builder, field.name)

    def __len__(self) -> int:
        return len(self._list)

    def __setitem__(self, index: int, value: object) -> None:
        if not 0 <= index < len(self._list):
            raise IndexError(index)
        owner = self._owner
        path: Path = (*owner._path, ("p", self._field.slot), ("e", index))
        owner._patches.caps.pop(path, None)
        if value is not None:
            owner._patches.caps[path] = owner._patches.table.index_of(value)


class _StructListBuilder:
    __slots__ = ("_list", "_layout", "_patches", "_path")

    def __init__(self, builder: Any, layout: StructLayout, patches: _Patches, path: Path) -> None:
        self._list, self._layout, self._patches, self._path = builder, layout, patches, path

    def __len__(self) -> int:
        return len(self._list)

    def __getitem__(self, index: int) -> StructBuilder:
        if not 0 <= index < len(self._list):
            raise IndexError(index)
        return StructBuilder(self._list[index], self._layout, self._patches, (*self._path, ("e", index)))

    def __iter__(self) -> Iterator[StructBuilder]:
        return (self[i] for i in range(len(self)))


class CapTableReader:
    """The capabilities attached to one received message, and where its pointers were."""

    def __init__(
        self,
        segments: Sequence[Segment],
        locations: dict[Location, int],
        values: Sequence[object],
        resolve: Callable[[object, FieldLayout], object] | None = None,
        fds: Sequence[object] = (),
        *,
        direct: bool = False,
    ):
        self.segments = segments
        self.locations = locations
        self._direct = direct
        self.values = values
        self.resolve = resolve
        self.fds = fds
        self._holds: bool | None = None
        """The message's file descriptors (FileDescriptor objects), by index."""
        """Called with each capability value a field yields and that field's layout (the
        RPC layer uses it to give a client the field's interface)."""
        for index in locations.values():
            self._check(index)

    @classmethod
    def strip(
        cls,
        segments: Sequence[Segment],
        values: Sequence[object],
        resolve: Callable[[object, FieldLayout], object] | None = None,
        fds: Sequence[object] = (),
    ) -> CapTableReader:
        """Strips a received message's capability pointers (:func:`capwire.strip_caps`):
        a full walk that validates every pointer and index up front, and leaves pycapnp a
        message without capabilities (safe for ``str()`` and copies)."""
        clean, locations = capwire.strip_caps(segments)
        return cls(clean, locations, values, resolve, fds)

    @classmethod
    def direct(
        cls,
        segments: Sequence[Segment],
        values: Sequence[object],
        resolve: Callable[[object, FieldLayout], object] | None = None,
        fds: Sequence[object] = (),
    ) -> CapTableReader:
        """Reads capability pointers straight from the segments, checking each index when a
        field is read: no walk of the whole message. pycapnp only raises (never aborts) on
        reading a capability pointer, and views read interface fields here, never through
        pycapnp; what must not be done with such a message is a pycapnp copy (``as_builder``,
        ``copy``, pickling), which the views never do."""
        return cls(segments, {}, values, resolve, fds, direct=True)

    def holds_capabilities(self) -> bool:
        """Whether the message holds a capability pointer anywhere (or may: a pointer that
        does not check out counts as one)."""
        if self._holds is None:
            try:
                self._holds = bool(capwire.scan_caps(self.segments))
            except CapWireError:
                self._holds = True
        return self._holds

    def fd(self, index: int) -> object:
        if index >= len(self.fds):
            raise CapWireError(f"file descriptor index {index} past the {len(self.fds)} attached")
        return self.fds[index]

    def _check(self, index: int) -> None:
        if index >= len(self.values):
            raise CapWireError(f"capability index {index} past the {len(self.values)} attached")

    def value(self, index: int | None, field: FieldLayout) -> object | None:
        """The capability value at ``index`` (checked), resolved for ``field``."""
        if index is None:
            return None
        self._check(index)
        value = self.values[index]
        return value if self.resolve is None or value is None else self.resolve(value, field)

    def capability(self, path: Path, field: FieldLayout) -> object | None:
        if self._direct:
            return self.value(capwire.read_cap(self.segments, path), field)
        return self.value(capwire.lookup_cap(self.segments, self.locations, path), field)

    def any_capability(self, path: Path) -> tuple[bool, object | None]:
        """(whether the AnyPointer slot at ``path`` holds a capability, its value if so)."""
        if self._direct:
            if not capwire.is_cap(self.segments, path):
                return False, None
        elif capwire.lookup_cap(self.segments, self.locations, path) is None:
            return False, None
        return True, self.capability(path, _ANY_CAPABILITY)

    def capabilities(self, path: Path, field: FieldLayout) -> list[object | None] | None:
        if self._direct:
            indices = capwire.read_cap_list(self.segments, path)
        else:
            indices = capwire.lookup_cap_list(self.segments, self.locations, path)
        if indices is None:
            return None
        return [self.value(i, field) for i in indices]


_ANY_CAPABILITY = FieldLayout("capability", FieldKind.CAPABILITY)
"""A capability field of no known interface."""


class StructReader:
    """A pycapnp struct reader (over stripped segments) whose capability fields resolve."""

    __slots__ = ("_reader", "_layout", "_table", "_path", "_blobs")
    _reader: Any
    _layout: StructLayout
    _table: CapTableReader
    _path: Path
    _blobs: dict[str, Any] | None
    """Large Text and Data values read already: pycapnp charges every read of a field to
    the message's one traversal budget, so a large one could be read only a few times."""

    def __init__(self, reader: Any, layout: StructLayout, table: CapTableReader, path: Path = ()) -> None:
        self._reader, self._layout, self._table, self._path = reader, layout, table, path
        self._blobs = None

    @property
    def pycapnp(self) -> Any:
        return self._reader

    def which(self) -> str:
        return str(self._reader.which())

    def holds_capabilities(self) -> bool:
        """Whether the message this struct is in holds capabilities (then passing the struct
        on re-sends it by its fields; else it is copied as it is)."""
        return self._table.holds_capabilities()

    def capability_at(self, transform: Sequence[int]) -> object | None:
        """The capability that pointer-field steps ``transform`` lead to from this struct
        (as a pipelined call names it); None if that pointer is null."""
        return self._table.capability((*self._path, *(("p", step) for step in transform)), _ANY_CAPABILITY)

    def any_struct(self, name: str, schema: Any) -> StructReader:
        """The AnyPointer field ``name`` read as a struct of ``schema``."""
        f = self._layout.fields.get(name)
        if f is None or f.kind is not FieldKind.ANY_POINTER:
            raise TypeError(f"{name} is not an AnyPointer field")
        reader = getattr(self._reader, name).as_struct(schema)
        return StructReader(reader, layout_of(schema), self._table, (*self._path, ("p", f.slot)))

    def to_dict(self) -> dict[str, Any]:
        """The struct's fields by schema name (of a union, the member set), read now:
        structs and groups as dicts, lists as lists, enums as their names, capabilities as
        clients; the shape a call takes its params in."""
        fields = self._layout.fields
        active = self.which() if self._layout.has_union else None
        return {
            name: _plain(self._read(name, f))
            for name, f in fields.items()
            if f.discriminant is None or name == active
        }

    def __repr__(self) -> str:
        return f"<{self._layout.name.rpartition(':')[2]} {describe(self)}>"

    def view(self, name: str) -> memoryview:
        """The Data or Text field ``name`` (Text as UTF-8, without its NUL) as a read-only
        memoryview. Over the received message itself, without a copy, where the field is
        read by hand (a flat struct: flat.py; a large message is then a view of its mapped
        memfd, which lives as long as the view); else over a copy, as the field reads."""
        value = getattr(self, name)
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"{name} is not a Data or Text field")
        return memoryview(value).toreadonly()

    def _raw(self, name: str) -> Any:
        """pycapnp's value of field ``name`` (``_get`` for a field named like a reader's own
        attribute, such as ``which``: still the field)."""
        return self._reader._get(name) if name in _SHADOWING else getattr(self._reader, name)

    def __getattr__(self, name: str) -> Any:
        f = self._layout.fields.get(name)
        if f is None:
            schema_name = self._layout.python_names.get(name)
            if schema_name is None:
                return getattr(self._reader, name)
            name, f = schema_name, self._layout.fields[schema_name]  # (as Python spells it: naming.py)
        return self._read(name, f)

    def _read(self, name: str, f: FieldLayout) -> Any:
        """Field ``name`` (its layout ``f``) read: what attribute access gives for it, even
        where the reader has an attribute of that name itself (``view``, ``which``)."""
        if f.discriminant is not None and self._reader.which() != name:
            raise AttributeError(f"{name} is not the union member set (it is {self._reader.which()})")
        if f.kind is FieldKind.ANY_POINTER:
            # An AnyPointer or Capability field (or a generic's parameter) may hold a
            # capability: a client then, of the interface a field names later (Engine.typed).
            path: Path = (*self._path, ("p", f.slot))
            held, capability = self._table.any_capability(path)
            if held:
                if f.any_kind in ("struct", "list"):
                    raise CapWireError(f"{name}: an Any{f.any_kind.title()} field holds a capability")
                return capability
            if not self._reader._has(name):
                return None
            if f.any_kind == "capability":
                raise CapWireError(f"{name}: a Capability field holds something other than a capability")
            raw = self._raw(name)
            if type(raw).__name__ != "_DynamicObjectReader":
                return raw  # (a generic's parameter its brand binds to Text, Data or a List)
            from . import anypointer  # (it builds on these views)

            return anypointer.read(raw, self._table, path, name, f.any_kind)
        if f.kind in _DATA_KINDS:
            if f.enum:
                return str(self._raw(name))
            blobs = self._blobs
            if blobs is not None and name in blobs:
                return blobs[name]
            value = self._raw(name)
            if isinstance(value, str | bytes) and len(value) > _KEPT_BLOB_BYTES:
                if blobs is None:
                    blobs = self._blobs = {}
                blobs[name] = value  # (immutable: the same value every time)
            return value
        if f.kind is FieldKind.FD:
            return self._table.fd(self._raw(name).index) if self._reader._has(name) else None
        if f.kind is FieldKind.CAPABILITY:
            return self._table.capability((*self._path, ("p", f.slot)), f)
        if f.kind is FieldKind.CAPABILITY_LIST:
            return self._table.capabilities((*self._path, ("p", f.slot)), f)
        assert f.nested is not None
        value = self._raw(name)
        if f.kind is FieldKind.GROUP:
            return StructReader(value, f.nested, self._table, self._path)
        if f.kind is FieldKind.STRUCT:
            return StructReader(value, f.nested, self._table, (*self._path, ("p", f.slot)))
        base: Path = (*self._path, ("p", f.slot))
        return [
            StructReader(element, f.nested, self._table, (*base, ("e", i))) for i, element in enumerate(value)
        ]


def _plain(value: Any) -> Any:
    """A field's value as :meth:`StructReader.to_dict` gives it."""
    if isinstance(value, StructReader):
        return value.to_dict()
    if isinstance(value, str | bytes | int | float | bool) or value is None:
        return value
    if isinstance(value, list):
        return [_plain(element) for element in value]
    kind = type(value).__name__
    if kind == "_DynamicEnum":
        return str(value)
    if kind.startswith("_DynamicList"):
        return [_plain(element) for element in value]
    return value  # (a client, an FileDescriptor, an AnyPointer reader)


_REPR = reprlib.Repr()
_REPR.maxdict = _REPR.maxlist = 12
_REPR.maxstring = _REPR.maxother = 64
_REPR.maxlevel = 3


_describing = threading.local()


def describe(struct: StructReader) -> str:
    """A struct's fields for a repr: shortened, and never an exception (a hostile message's
    field may not read), nor a walk of more than the repr shows (a repr within one is "...")."""
    if getattr(_describing, "active", False):
        return "{...}"
    _describing.active = True
    try:
        return _REPR.repr(struct.to_dict())
    except Exception as error:  # noqa: BLE001 - a repr must not raise
        return f"(unreadable: {type(error).__name__}: {error})"
    finally:
        _describing.active = False
