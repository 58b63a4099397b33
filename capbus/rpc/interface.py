"""Interfaces and methods as the RPC layer sees them, read from pycapnp schemas.

An :class:`Interface` knows its methods (its own and inherited, each keyed by the id of the
interface that declares it and its ordinal there, which is what a call carries), their
param and result structs and layouts. :func:`load` gives ``capbus.load("x.capnp")``: a
module-like object whose interfaces have ``Client`` and ``Server`` classes, for use without
generated stubs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import capnp

from .annotations import ATTRIBUTE, read
from .layout import FieldKind, StructLayout, layout_of, schema_key
from .naming import python_name, renamed

STREAM_RESULT_ID = 0x995F9A3377C0B16E  # stream.capnp StreamResult: the results of `-> stream`


@dataclass(frozen=True, eq=False)
class Method:
    name: str
    interface_id: int
    ordinal: int
    params: Any  # pycapnp struct schema
    results: Any
    params_layout: StructLayout
    results_layout: StructLayout
    param_names: tuple[str, ...]
    result_names: tuple[str, ...]
    streaming: bool
    python_name: str = ""
    """The method's name in Python (naming.py): a client's attribute, a server's method."""
    python_params: dict[str, str] = field(default_factory=dict)
    """Python spelling -> schema name of the params naming.py renames (usually none)."""
    python_results: dict[str, str] = field(default_factory=dict)
    """The same for the results."""
    single_struct: bool = False
    """Exactly one result, a struct or a group: a handler may return its fields' mapping."""


@dataclass(eq=False)
class Interface:
    id: int
    name: str
    schema: Any
    methods: dict[str, Method] = field(default_factory=dict)
    by_key: dict[tuple[int, int], Method] = field(default_factory=dict)
    superclasses: tuple[Interface, ...] = ()

    def implements(self, interface_id: int) -> bool:
        return interface_id == self.id or any(s.implements(interface_id) for s in self.superclasses)


_interfaces_by_object: dict[int, tuple[Any, Interface]] = {}
_interfaces: dict[Any, Interface] = {}
"""By node id; a generic interface's by (node id, brand): Box(Ping) and Box(Pong) differ."""


def interface_of(schema: Any) -> Interface:
    """The :class:`Interface` of a pycapnp interface schema (``Foo.schema``), cached by id."""
    known = _interfaces_by_object.get(id(schema))
    if known is not None and known[0] is schema:
        return known[1]
    node = schema.node
    key = schema_key(schema)
    cached = _interfaces.get(key)
    if cached is not None:
        _interfaces_by_object[id(schema)] = (schema, cached)
        return cached
    supers = tuple(interface_of(s) for s in schema.superclasses)
    interface = Interface(node.id, node.displayName.split(":")[-1], schema, superclasses=supers)
    _interfaces[key] = interface
    _interfaces_by_object[id(schema)] = (schema, interface)  # (the schema kept: its id stays its own)
    for parent in supers:  # inherited first, so that an override by name wins
        interface.methods.update(parent.methods)
        interface.by_key.update(parent.by_key)
    for ordinal, raw in enumerate(node.interface.methods):  # listed by ordinal
        parsed = schema.methods[raw.name]
        params, results = parsed.param_type, parsed.result_type
        method = Method(
            raw.name,
            node.id,
            ordinal,
            params,
            results,
            layout_of(params),
            layout_of(results),
            param_names := tuple(f.name for f in params.node.struct.fields),
            result_names := tuple(f.name for f in results.node.struct.fields),
            results.node.id == STREAM_RESULT_ID,
            python_name(raw.name),
            renamed(param_names),
            renamed(result_names),
            _single_struct(layout_of(results)),
        )
        interface.methods[raw.name] = method
        interface.by_key[(node.id, ordinal)] = method
    return interface


def _single_struct(results: StructLayout) -> bool:
    fields = list(results.fields.values())
    return len(fields) == 1 and fields[0].kind in (FieldKind.STRUCT, FieldKind.GROUP)


class SchemaModule:
    """What :func:`load` returns: the schema's types (nested ones as attributes of their
    scope), interfaces with Client and Server, constants (by the naming rule: a constant
    ``schema`` is ``schema_``), annotations (``capnp_annotations``)."""

    def __init__(self, module: Any) -> None:
        self.pycapnp = module
        """The pycapnp module (its structs build and read plain messages)."""
        name_of = _names_by_id(module)
        setattr(self, ATTRIBUTE, read(module.schema.node, name_of))
        _fill(self, module, module.schema, name_of)


def const_value(parsed: Any, name: str) -> Any:
    """A constant's value (``parsed``: its parsed schema); a SchemaError for Text that is not
    UTF-8, which the compiler lets through and pycapnp cannot read."""
    try:
        return parsed.as_const_value()
    except UnicodeDecodeError:
        from .schemacheck import SchemaError

        where = str(parsed.node.displayName).rpartition(":")[0]
        raise SchemaError(f"{where}: constant {name}: its Text is not UTF-8") from None


def _fill(target: object, scope: Any, parsed: Any, name_of: Callable[[int], str]) -> None:
    """Sets on ``target`` the types and constants declared in ``parsed`` (a pycapnp parsed
    schema: a file, or a type with nested declarations), ``scope`` being pycapnp's object
    for it; recursively for nested declarations."""
    from .client import client_class
    from .server import server_class

    for nested in parsed.node.nestedNodes:
        name = str(nested.name)
        child = parsed.get_nested(name)
        kind = child.node.which()
        if kind == "const":
            value = const_value(child, name)
            setattr(
                target, python_name(name), str(value) if type(value).__name__ == "_DynamicEnum" else value
            )
            continue
        if kind not in ("struct", "interface", "enum"):
            continue  # (an annotation declaration)
        value = getattr(scope, name)
        found = read(child.node, name_of)
        if kind == "interface":
            interface = interface_of(value.schema)
            made: Any = type(name, (), {"Client": client_class(interface), "Server": server_class(interface)})
            made.interface = interface
            setattr(made, ATTRIBUTE, found)
            _fill(made, value, child, name_of)
            setattr(target, name, made)
            continue
        try:
            setattr(value, ATTRIBUTE, found)
            _fill(value, value, child, name_of)  # (nested interfaces with capbus's classes)
        except (AttributeError, TypeError):
            pass  # (a pycapnp type that takes no attributes: its nested types as pycapnp has them)
        setattr(target, name, value)


def _names_by_id(module: Any) -> Callable[[int], str]:
    """Annotation id -> name, for the annotations declared at the top of this file or of
    any file pycapnp has loaded (those this one imports among them)."""
    import capnp

    names: dict[int, str] = {}
    parser = getattr(capnp.lib.capnp, "_global_schema_parser", None)
    files = [module, *getattr(parser, "modules_by_id", {}).values()]
    for loaded in files:
        node = getattr(getattr(loaded, "schema", None), "node", None)
        if node is None or node.which() != "file":
            continue
        for nested in node.nestedNodes:
            names.setdefault(int(nested.id), str(nested.name))

    def name_of(annotation_id: int) -> str:
        return names.get(annotation_id, f"@{annotation_id:#x}")

    return name_of


def known_interface(interface_id: int) -> Interface | None:
    """An interface with id ``interface_id`` that this process knows (a generated module's,
    or one ``capbus.load`` loaded), or None. (Of a generic, one brand of it.)"""
    from .stubs import registered

    cls = registered(interface_id)
    if cls is not None:
        return cls.interface
    for interface in list(_interfaces.values()):
        if interface.id == interface_id:
            return interface
    return None


def load(path: str | os.PathLike[str], imports: list[str] | None = None) -> SchemaModule:
    """Loads a ``.capnp`` file for use without generated stubs: ``mod.Foo.Client`` and
    ``mod.Foo.Server`` for each interface, the other types as pycapnp gives them. Raises
    SchemaError (capbus.rpc.schemacheck) with the compiler's message for a schema it
    refuses, FileNotFoundError for a missing file."""
    from .envelope import import_path
    from .schemacheck import is_own_schema, parse

    directories = [*(imports or []), *import_path()]
    if is_own_schema(path):  # (capbus's own are known good, and loaded in sandboxed children)
        capnp.remove_import_hook()
        return SchemaModule(capnp.load(os.path.realpath(path), imports=directories))
    return SchemaModule(parse(path, directories))
