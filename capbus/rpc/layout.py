"""Where capabilities sit in a struct type, read once from its pycapnp schema.

A :class:`StructLayout` lists a struct's fields with what the capability codec needs: the
pointer slot of each pointer field, whether it is an interface, a list of interfaces, a
struct or list of structs (which may hold capabilities further down), a group, and the
union discriminant that selects it. Layouts are cached by node id, so recursive types
(a struct that contains a list of itself) are built once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .envelope import FD_STRUCT_ID
from .naming import renamed

NOT_IN_UNION = 0xFFFF


class FieldKind(Enum):
    PLAIN = "plain"  # data, text, enums, lists of plain values: pycapnp handles them
    CAPABILITY = "capability"  # an interface-typed pointer
    CAPABILITY_LIST = "capability_list"  # List(Interface)
    STRUCT = "struct"
    STRUCT_LIST = "struct_list"
    GROUP = "group"  # shares the enclosing struct's data and pointer sections
    ANY_POINTER = "any_pointer"
    FD = "fd"  # a capbus/fd.capnp Fd: an index into the message's file descriptors


@dataclass(eq=False)
class FieldLayout:
    name: str
    kind: FieldKind
    slot: int = -1
    """Pointer slot index (pointer fields only)."""
    discriminant: int | None = None
    """The union discriminant value that selects this field, if it is a union member."""
    interface_id: int = 0
    """For capabilities and lists of them: the interface's id."""
    interface_schema: Any = None
    """... and its pycapnp schema."""
    nested: StructLayout | None = None
    """For structs, lists of structs and groups."""
    enum: bool = False
    """An enum field: read as its enumerant's name (a str), as it is written."""
    any_kind: str = ""
    """For an AnyPointer-kind field, what the schema lets it hold: "struct" (AnyStruct),
    "list" (AnyList), "capability" (Capability) or "" (anything)."""


@dataclass(eq=False)
class StructLayout:
    node_id: int
    name: str
    discriminant_offset: int
    """In 16-bit units within the data section (meaningful when ``has_union``)."""
    has_union: bool
    fields: dict[str, FieldLayout] = field(default_factory=dict)
    may_hold_caps: bool = False
    may_hold_fds: bool = False
    """An Fd field somewhere in it (or an AnyPointer, which may be one)."""
    python_names: dict[str, str] = field(default_factory=dict)
    """Python spelling -> schema name of the fields naming.py renames (usually none)."""


_layouts: dict[Any, StructLayout] = {}
"""By schema_key: node id and shape, and a generic struct's brand (Box(Ping)'s value is a Ping)."""
_layouts_by_object: dict[int, tuple[Any, StructLayout]] = {}


def layout_of(schema: Any) -> StructLayout:
    """The layout of a pycapnp struct schema (``Foo.schema``, a method's ``param_type``...).
    Looked up by the schema object first: ``schema.node`` makes a new reader each time."""
    known = _layouts_by_object.get(id(schema))
    if known is not None and known[0] is schema:
        return known[1]
    node = schema.node
    key = schema_key(schema)
    cached = _layouts.get(key)
    if cached is not None:
        _layouts_by_object[id(schema)] = (schema, cached)
        return cached
    struct_node = node.struct
    layout = StructLayout(
        node.id,
        node.displayName,
        struct_node.discriminantOffset,
        struct_node.discriminantCount > 0,
    )
    _layouts[key] = layout  # before the fields: recursive types refer back to it
    for raw, parsed in zip(struct_node.fields, schema.fields_list, strict=True):
        discriminant = None if raw.discriminantValue == NOT_IN_UNION else raw.discriminantValue
        if raw.which() == "group":
            nested = layout_of(parsed.schema)
            layout.fields[raw.name] = FieldLayout(
                raw.name, FieldKind.GROUP, discriminant=discriminant, nested=nested
            )
            continue
        layout.fields[raw.name] = _slot_field(raw, parsed, discriminant)
    layout.python_names.update(renamed(layout.fields))
    _settle_caps()
    return layout


def _bound(raw: Any, parsed: Any) -> Any:
    """The schema a generic's parameter field is bound to in this brand (None: unbound,
    or not a parameter: read as AnyPointer)."""
    if raw.which() != "slot" or raw.slot.type.which() != "anyPointer":
        return None
    if raw.slot.type.anyPointer.which() != "parameter":
        return None
    try:
        bound = parsed.schema
    except Exception:  # noqa: BLE001 - unbound (AnyPointer): pycapnp raises
        return None
    return bound if hasattr(bound, "node") else None


def brand_of(schema: Any, depth: int = 0) -> tuple[Any, ...]:
    """What a generic struct's (or interface's) parameters are bound to in ``schema``: for
    each parameter field, the id of the type it resolves to and, if that type is generic
    too, its own brand (Box(Box(Ping)) is not Box(Box(Pong))); None where unbound."""
    if depth > _BRAND_DEPTH:
        raise ValueError(f"{schema.node.displayName}: generic brands nested over {_BRAND_DEPTH} deep")
    if schema.node.which() == "interface":
        out: list[Any] = []
        for method in schema.node.interface.methods:
            parsed = schema.methods[method.name]
            out.extend(brand_of(parsed.param_type, depth + 1))
            out.extend(brand_of(parsed.result_type, depth + 1))
        return tuple(out)
    out = []
    for raw, parsed in zip(schema.node.struct.fields, schema.fields_list, strict=True):
        if raw.which() != "slot" or raw.slot.type.which() != "anyPointer":
            continue
        bound = _bound(raw, parsed)
        if bound is None:
            out.append(None)
        elif bound.node.isGeneric:
            out.append((int(bound.node.id), brand_of(bound, depth + 1)))
        else:
            out.append(int(bound.node.id))
    return tuple(out)


_BRAND_DEPTH = 64


def schema_key(schema: Any) -> Any:
    """What a layout or an interface is cached by: the node's id, its shape (two versions of
    one schema, same ids, are two things: a generated module made from one, the other
    loaded) and, for a generic, its brand."""
    node = schema.node
    key = (node.id, _shape(node))
    return (*key, brand_of(schema)) if node.isGeneric else key


def _shape(node: Any) -> bytes:
    """A digest of a schema node, less the file path it was read from."""
    builder = node.as_builder()
    builder.displayName = builder.displayName.rpartition(":")[2]
    builder.displayNamePrefixLength = 0
    return hashlib.blake2b(builder.to_bytes(), digest_size=16).digest()


def _slot_field(raw: Any, parsed: Any, discriminant: int | None) -> FieldLayout:
    kind = raw.slot.type.which()
    slot = raw.slot.offset
    if kind == "interface":
        return FieldLayout(
            raw.name, FieldKind.CAPABILITY, slot, discriminant, raw.slot.type.interface.typeId, parsed.schema
        )
    if kind == "struct":
        if raw.slot.type.struct.typeId == FD_STRUCT_ID:
            return FieldLayout(raw.name, FieldKind.FD, slot, discriminant)
        return FieldLayout(raw.name, FieldKind.STRUCT, slot, discriminant, nested=layout_of(parsed.schema))
    if kind == "anyPointer":
        bound = _bound(raw, parsed)  # a generic's parameter, as this brand binds it
        if bound is not None and bound.node.which() == "interface":
            return FieldLayout(raw.name, FieldKind.CAPABILITY, slot, discriminant, bound.node.id, bound)
        if bound is not None and bound.node.which() == "struct" and bound.node.id != FD_STRUCT_ID:
            return FieldLayout(raw.name, FieldKind.STRUCT, slot, discriminant, nested=layout_of(bound))
        kind_of = raw.slot.type.anyPointer
        constrained = kind_of.which() == "unconstrained" and kind_of.unconstrained.which() != "anyKind"
        any_kind = str(kind_of.unconstrained.which()) if constrained else ""
        return FieldLayout(raw.name, FieldKind.ANY_POINTER, slot, discriminant, any_kind=any_kind)
    if kind == "list":
        element = raw.slot.type.list.elementType
        if element.which() == "interface":
            return FieldLayout(
                raw.name,
                FieldKind.CAPABILITY_LIST,
                slot,
                discriminant,
                element.interface.typeId,
                parsed.schema.elementType,
            )
        if element.which() == "struct":
            nested = layout_of(parsed.schema.elementType)
            return FieldLayout(raw.name, FieldKind.STRUCT_LIST, slot, discriminant, nested=nested)
    return FieldLayout(
        raw.name, FieldKind.PLAIN, slot if kind in _POINTER_KINDS else -1, discriminant, enum=kind == "enum"
    )


_POINTER_KINDS = {"text", "data", "list"}


def _settle_caps() -> None:
    """Recomputes ``may_hold_caps`` and ``may_hold_fds`` for every layout until nothing
    changes (recursive types need the fixed point)."""
    changed = True
    while changed:
        changed = False
        for layout in _layouts.values():
            if not layout.may_hold_caps and any(
                f.kind in (FieldKind.CAPABILITY, FieldKind.CAPABILITY_LIST, FieldKind.ANY_POINTER)
                or (f.nested is not None and f.nested.may_hold_caps)
                for f in layout.fields.values()
            ):
                layout.may_hold_caps = changed = True
            if not layout.may_hold_fds and any(
                f.kind in (FieldKind.FD, FieldKind.ANY_POINTER)
                or (f.nested is not None and f.nested.may_hold_fds)
                for f in layout.fields.values()
            ):
                layout.may_hold_fds = changed = True


def described(struct_name: str, name: str) -> str:
    """How an error names field ``name`` of struct ``struct_name`` (a display name): a call's
    param or result by its method, any other struct's field by the struct."""
    struct_name = struct_name.rpartition(":")[2]
    base, _, role = struct_name.partition("$")
    return {"Params": f"param {name!r} of {base}", "Results": f"result {name!r} of {base}"}.get(
        role, f"field {name!r} of {struct_name}"
    )
