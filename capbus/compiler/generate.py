"""Generates a typed Python module from a .capnp schema.

For every interface: a client class (per method, ``await client.m(...)`` with keyword
parameters named and typed as in the schema, returning a typed results object, and
``client.m.send(...)`` for a typed promise to pipeline on, ``client.m.oneway(...)``) with a
nested ``Server`` base class to subclass; for every struct a wrapper with typed properties (and
``which()`` for unions); enums as ``Literal`` aliases. The module embeds its schema as
Cap'n Proto ``Node`` messages and loads them at import, so it needs no .capnp file at run
time. Output is deterministic: the same schema gives the same bytes.
"""

from __future__ import annotations

import keyword
import math
import os
import re
import textwrap
from collections.abc import Iterable
from typing import Any

import capnp

from ..rpc.annotations import ATTRIBUTE, read
from ..rpc.envelope import FD_STRUCT_ID, import_path
from ..rpc.interface import _names_by_id, const_value
from ..rpc.naming import python_name
from ..rpc.schemacheck import parse

STREAM_RESULT_ID = 0x995F9A3377C0B16E
_NOT_IN_UNION = 0xFFFF
_INTS = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


def _camel(name: str) -> str:
    return name[:1].upper() + name[1:]


class _Generator:
    def __init__(self, module: Any, source_name: str) -> None:
        self.module = module
        self.source_name = source_name
        self.file_id = module.schema.node.id
        self.source_path = str(module.schema.node.displayName)
        self.nodes: dict[int, bytes] = {}
        self.names: dict[int, str] = {}  # node id -> generated Python name (this file's nodes)
        self.structs: list[Any] = []  # struct schemas of this file, nested ones first
        self.interfaces: list[Any] = []
        self.enums: list[Any] = []
        self.nested: dict[int, list[tuple[str, int]]] = {}  # node id -> (name, id) of its nested types
        self.emitted: set[int] = set()
        self.lines: list[str] = []
        self._annotation_name = _names_by_id(module)
        self.imported: dict[str, str] = {}  # generated module of an imported file -> its alias here
        self.type_params: dict[int, list[str]] = {}  # a generic's node id -> its TypeVars here
        # The generics whose classes are being written (innermost last), and whether in a
        # class nested in the generic's own: those take the generic's inner TypeVars (a
        # nested class cannot bind its enclosing class's).
        self.active: list[tuple[int, bool]] = []
        self.constants: list[tuple[str, Any]] = []  # (name, const node) of this file

    # -- collecting ---------------------------------------------------------------------------

    def collect(self) -> None:
        self._walk_file(self.module.schema, [])

    def _walk_file(self, parsed: Any, path: list[str]) -> None:
        for nested in parsed.node.nestedNodes:
            child = parsed.get_nested(nested.name)
            node = child.node
            name = _module_level("_".join([*path, nested.name]))
            kind = node.which()
            struct = None
            if kind == "struct":
                struct = child.as_struct()
                self.names[node.id] = name
                self._add_struct(struct)
            elif kind == "interface":
                schema = child.as_interface()
                self.names[node.id] = name
                self.interfaces.append(schema)
                self._add_interface(schema)
            elif kind == "enum":
                self.names[node.id] = name
                self.enums.append(child.as_enum())
                self._add_node(node)
            elif kind == "const" and not path:
                self.constants.append((nested.name, node))
            if kind in ("struct", "interface") and node.isGeneric:
                self.type_params[node.id] = [f"_{name}_{p.name}" for p in node.parameters]
            if kind in ("struct", "interface", "enum"):
                self.nested.setdefault(parsed.node.id, []).append((nested.name, node.id))
            self._walk_file(child, [*path, nested.name])
            if struct is not None:
                self.structs.append(struct)  # after its nested types: it can name them

    def _add_node(self, node: Any) -> bool:
        if node.id in self.nodes:
            return False
        self.nodes[node.id] = node.as_builder().to_bytes()
        return True

    def _add_struct(self, schema: Any) -> None:
        if not self._add_node(schema.node):
            return
        for raw, parsed in zip(schema.node.struct.fields, schema.fields_list, strict=True):
            if raw.which() == "group":
                self._add_struct(parsed.schema)
            else:
                self._add_type(raw.slot.type, parsed)

    def _add_type(self, t: Any, parsed: Any) -> None:
        kind = t.which()
        if kind == "struct":
            self._add_struct(parsed.schema)
        elif kind == "interface":
            self._add_interface(parsed.schema)
        elif kind == "enum":
            self._add_node(parsed.schema.node)
        elif kind == "list":
            element = t.list.elementType
            if element.which() in ("struct", "interface", "enum"):
                inner = parsed.schema.elementType
                if element.which() == "struct":
                    self._add_struct(inner)
                elif element.which() == "interface":
                    self._add_interface(inner)
                else:
                    self._add_node(inner.node)

    def _add_interface(self, schema: Any) -> None:
        if not self._add_node(schema.node):
            return
        for parent in schema.superclasses:
            self._add_interface(parent)
        for method in schema.node.interface.methods:
            parsed = schema.methods[method.name]
            self._add_struct(parsed.param_type)
            self._add_struct(parsed.result_type)

    # -- types --------------------------------------------------------------------------------

    def read_type(self, t: Any, parsed: Any) -> str:
        """The Python type of a value read from a field of type ``t``."""
        kind = t.which()
        if kind == "void":
            return "None"
        if kind == "bool":
            return "bool"
        if kind in _INTS:
            return "int"
        if kind in ("float32", "float64"):
            return "float"
        if kind == "text":
            return "str"
        if kind == "data":
            return "bytes"
        if kind == "enum":
            return self.names.get(t.enum.typeId) or self._imported(parsed, "str")
        if kind == "struct":
            if t.struct.typeId == FD_STRUCT_ID:
                return "_fds.FileDescriptor"
            found = self.names.get(t.struct.typeId) or self._imported(parsed, "Any")
            return self._branded(found, t.struct.typeId, t.struct.brand)
        if kind == "interface":
            found = self.names.get(t.interface.typeId) or self._imported(parsed, "_client.Client")
            return self._branded(found, t.interface.typeId, t.interface.brand)
        if kind == "list":
            element = t.list.elementType
            inner = parsed.schema.elementType if element.which() in ("struct", "interface", "enum") else None
            return f"Sequence[{self.read_type(element, _Elem(inner))}]"
        if kind == "anyPointer" and t.anyPointer.which() == "parameter":
            # A generic's parameter: its TypeVar within the generic's own classes.
            scope, index = t.anyPointer.parameter.scopeId, t.anyPointer.parameter.parameterIndex
            for node_id, inner in reversed(self.active):
                if node_id == scope and scope in self.type_params:
                    return str(self.type_params[scope][int(index)]) + "_" * inner
        if kind == "anyPointer" and t.anyPointer.which() == "unconstrained":
            return _ANY_READ[str(t.anyPointer.unconstrained.which())]
        return "Any"

    def _branded(self, name: str, type_id: int, brand: Any) -> str:
        """``name`` of a generic type with the arguments ``brand`` binds (Any where it binds
        none; its own TypeVars where it inherits them, inside its own classes)."""
        variables = self.type_params.get(type_id)
        if variables is None or name in ("Any", "str", "_client.Client"):
            return name
        args = ["Any"] * len(variables)
        for scope in brand.scopes:
            if scope.scopeId != type_id:
                continue
            if scope.which() == "bind":
                for i, binding in enumerate(scope.bind):
                    if i < len(args) and binding.which() == "type":
                        try:
                            args[i] = self.read_type(binding.type, None)
                        except Exception:  # noqa: BLE001 - a binding this cannot name: Any
                            args[i] = "Any"
            else:
                for node_id, inner in reversed(self.active):
                    if node_id == type_id:
                        args = [v + "_" * inner for v in variables]
                        break
        return f"{name}[{', '.join(args)}]"

    def _generic_base(self, node_id: int, inner: bool = False) -> str:
        """``, Generic[...]`` for a generic's classes (or nothing)."""
        variables = self.type_params.get(node_id)
        return f", Generic[{', '.join(v + '_' * inner for v in variables)}]" if variables else ""

    def _arguments_of(self, node_id: int, inner: bool = False) -> str:
        """``[TypeVars...]`` to name a generic's own classes inside it (or nothing)."""
        variables = self.type_params.get(node_id)
        return f"[{', '.join(v + '_' * inner for v in variables)}]" if variables else ""

    def _imported(self, parsed: Any, fallback: str) -> str:
        """The name of a type declared in another schema file, in that file's generated
        module (``x.capnp`` -> ``x_capnp``, which must be generated too), imported here;
        ``fallback`` for a type that has no name there (a generic's brand, say)."""
        try:
            schema = parsed.schema
            node = schema.node
        except Exception:  # noqa: BLE001 - an unbound generic parameter: no schema
            return fallback
        if node.isGeneric or getattr(node, "scopeId", 0) == 0:
            return fallback
        file_name, _, path = str(node.displayName).partition(":")
        if not path or file_name == self.source_path:
            return fallback
        module = _module_name(file_name)
        if module == "schema_capnp" or file_name.lstrip("/").startswith(("capnp/", "capbus/")):
            return fallback  # (Cap'n Proto's and capbus's own schemas have no generated modules)
        alias = self.imported.setdefault(module, f"_{module}")
        return f"{alias}.{path.replace('.', '_')}"

    def write_type(self, t: Any, parsed: Any) -> str:
        """The Python type accepted when setting a field of type ``t``."""
        kind = t.which()
        if kind == "struct":
            if t.struct.typeId == FD_STRUCT_ID:
                return "int | _HasFileno"
            # The struct's own TypedDict (its Fields), where it has a generated class.
            found = self.names.get(t.struct.typeId) or self._imported(parsed, "")
            return f"{found}.Fields" if found else "Mapping[str, Any]"
        if kind == "anyPointer" and t.anyPointer.which() == "unconstrained":
            return _ANY_WRITE[str(t.anyPointer.unconstrained.which())]
        if kind == "anyPointer":
            variable = self.read_type(t, parsed)  # (a generic's parameter: a server object too)
            return variable if variable == "Any" else f"{variable} | _server.Server"
        if kind == "interface":
            client = self.read_type(t, parsed)
            # A server passed for it must implement that interface (not any server).
            base, bracket, args = client.partition("[")
            server = f"{base}.Server{bracket}{args}" if client != "_client.Client" else "_server.Server"
            return f"{client} | {server}"
        if kind == "list":
            element = t.list.elementType
            inner = parsed.schema.elementType if element.which() in ("struct", "interface", "enum") else None
            return f"Sequence[{self.write_type(element, _Elem(inner))}]"
        return self.read_type(t, parsed)

    # -- emitting -----------------------------------------------------------------------------

    def emit(self, text: str = "", indent: int = 0) -> None:
        for line in textwrap.dedent(text).splitlines() or [""]:
            self.lines.append(("    " * indent + line) if line else "")

    def render(self) -> str:
        self.emit(f'''\
            """Typed capbus stubs for {_escaped(self.source_name)}.

            Generated by `capbus compile` from {_escaped(self.source_name)}; do not edit (changes
            are lost when it is generated again).
            """

            from __future__ import annotations

            from collections.abc import Awaitable, Mapping, Sequence
            from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Protocol, TypeAlias, cast
            from typing import Generic, TypedDict, TypeVar

            from capbus.rpc import anypointer as _anypointer
            from capbus.rpc import client as _client
            from capbus.rpc import errors as _errors
            from capbus.rpc import fds as _fds
            from capbus.rpc import server as _server
            from capbus.rpc import stubs as _stubs


            class _HasFileno(Protocol):
                def fileno(self) -> int: ...

            ''')
        self.emit("_schema = _stubs.Schema(")
        self.emit("(", 1)
        for node_id in sorted(self.nodes):
            blob = self.nodes[node_id]
            chunks = [blob[i : i + 40] for i in range(0, len(blob), 40)]
            for chunk in chunks[:-1]:
                self.emit(repr(chunk), 2)
            self.emit(repr(chunks[-1]) + ",", 2)
        self.emit(")", 1)
        self.emit(")")
        imports_at = len(self.lines)
        for variables in self.type_params.values():
            for variable in variables:
                self.emit(f'{variable} = TypeVar("{variable}")')
                self.emit(f'{variable}_ = TypeVar("{variable}_")')
        self.emit("")
        self.emit(
            f"{ATTRIBUTE}: dict[str, object] = {read(self.module.schema.node, self._annotation_name)!r}"
        )
        for enum in self.enums:
            names = ", ".join(repr(e.name) for e in enum.node.enum.enumerants)
            self.emit("")
            self.emit(f"{self.names[enum.node.id]} = Literal[{names}]")
            self.emitted.add(enum.node.id)
        self._constants()
        for struct in self.structs:
            self.emit("")
            self.emit("")
            self._struct_class(self.names[struct.node.id], struct)
            self.emitted.add(struct.node.id)
        for interface in self._interface_order():
            self.emit("")
            self.emit("")
            self._interface_class(interface)
            self.emitted.add(interface.node.id)
        self.emit("")
        self.emit("")
        self._wrappers()
        if self.imported:
            # Types declared in imported files come from their generated modules (beside
            # this one, or in the same package).
            block = ["", "if TYPE_CHECKING:"]
            block += [f"    import {module} as {alias}" for module, alias in sorted(self.imported.items())]
            block += ["else:"]
            block += [
                f"    {alias} = _stubs.sibling(__name__, {module!r})"
                for module, alias in sorted(self.imported.items())
            ]
            self.lines[imports_at:imports_at] = block
        return "\n".join(self.lines).rstrip() + "\n"

    def _annotations(self, node: Any, indent: int) -> None:
        """``capnp_annotations`` of a type (capbus/rpc/annotations.py), when it has any."""
        found = read(node, self._annotation_name)
        if found:
            self.emit(f"{ATTRIBUTE}: ClassVar[dict[str, object]] = {_literal(found)}", indent)

    def _constants(self) -> None:
        """The file's constants, as typed module constants (structs and lists as the plain
        values a call takes them in)."""
        for name, node in self.constants:
            # (from its own node: the pycapnp module's attribute of a name like ``schema`` is
            # something else)
            value = const_value(self.module.schema.get_nested(name), name)
            kind = node.const.type.which()
            if kind == "void":
                continue
            value = _plain_constant(value)
            if kind == "enum":
                typ = self.names.get(node.const.type.enum.typeId, "str")
            elif kind == "struct":
                typ = "Mapping[str, Any]"
            elif kind == "list":
                typ = "Sequence[Any]"
            elif kind == "anyPointer":
                continue
            else:
                typ = _CONSTANT_TYPES.get(kind, "int")
            self.emit("")
            spelled = name + "_" if keyword.iskeyword(name) else _module_level(name)
            self.emit(f"{spelled}: Final[{typ}] = {_literal(value)}")

    def _interface_order(self) -> list[Any]:
        """Interfaces in an order Python can define them: every base before the interfaces
        that extend it, and where possible nested interfaces before the one they are nested
        in (which then names them)."""
        by_id = {i.node.id: i for i in self.interfaces}
        bases = {
            i.node.id: [parent.node.id for parent in i.superclasses if parent.node.id in by_id]
            for i in self.interfaces
        }

        def extends(node_id: int, ancestor: int) -> bool:
            return any(b == ancestor or extends(b, ancestor) for b in bases[node_id])

        order: list[Any] = []
        done: set[int] = set()

        def visit(node_id: int) -> None:
            if node_id in done:
                return
            done.add(node_id)
            for base in bases[node_id]:
                visit(base)
            for _, child in self.nested.get(node_id, []):
                if child in by_id and not extends(child, node_id):
                    visit(child)
            order.append(by_id[node_id])

        for interface in self.interfaces:
            visit(interface.node.id)
        return order

    def _nested_aliases(self, node_id: int, indent: int, taken: set[str]) -> None:
        """``Outer.Inner``: an alias in the outer class of each nested type already defined
        (the flat name ``Outer_Inner`` stays the definition)."""
        for short, child in self.nested.get(node_id, []):
            if child in self.emitted and child in self.names and short not in taken:
                self.emit("", indent - 1)
                self.emit(f"{short}: TypeAlias = {self.names[child]}", indent)

    def _struct_class(
        self, name: str, struct: Any, indent: int = 0, base: str = "_stubs.Struct", generic: int = 0
    ) -> None:
        """``generic``: the generic (struct or interface) whose TypeVars this class takes
        (its own if it is one; an enclosing interface's for its methods' results, as a
        class nested in it: its inner TypeVars)."""
        node = struct.node
        inner = bool(generic) and indent > 0
        generic = generic or (node.id if node.id in self.type_params else 0)
        if generic:
            self.active.append((generic, inner))
        try:
            self._struct_body(name, struct, indent, base, generic, inner)
        finally:
            if generic:
                self.active.pop()

    def _struct_body(self, name: str, struct: Any, indent: int, base: str, generic: int, inner: bool) -> None:
        node = struct.node
        self.emit(f"class {name}({base}{self._generic_base(generic, inner)}):", indent)
        self.emit(_doc(f"``{node.displayName}``."), indent + 1)
        self._annotations(node, indent + 1)
        if indent == 0 and not node.struct.isGroup:
            # Its schema, and a value of it to send in an AnyPointer or AnyStruct field.
            value = f"_anypointer.StructValue[{'Any' if generic else name}]"
            self.emit("", indent)
            self.emit(f"schema: ClassVar[Any] = _schema.struct({node.id:#x})", indent + 1)
            self.emit("", indent)
            self.emit("@classmethod", indent + 1)
            self.emit(f"def new_value(cls, fields: {name}.Fields) -> {value}:", indent + 1)
            self.emit(_doc(f"A ``{name}`` to send in an AnyPointer or AnyStruct field."), indent + 2)
            self.emit("return _anypointer.struct_value(cls, fields)", indent + 2)
        union = [f.name for f in node.struct.fields if f.discriminantValue != 0xFFFF]
        if union:
            literal = ", ".join(repr(n) for n in union)
            self.emit("", indent)
            self.emit(f"def which(self) -> Literal[{literal}]:", indent + 1)
            self.emit(f'return cast("Literal[{literal}]", self._view.which())', indent + 2)
        for raw, parsed in zip(node.struct.fields, struct.fields_list, strict=True):
            attr = python_name(raw.name)
            self.emit("", indent)
            self.emit("@property", indent + 1)
            if raw.which() == "group":
                # (the field's own spelling: a nested type Foo.Bar is Foo_Bar, a group bar Foo_bar)
                group_name = f"{name}_{raw.name}"
                self.names.setdefault(parsed.schema.node.id, group_name)
                self.emit(
                    f"def {attr}(self) -> {group_name}{self._arguments_of(generic, inner)}:", indent + 1
                )
                self.emit(f"return {group_name}(getattr(self._view, {attr!r}))", indent + 2)
                continue
            t = raw.slot.type
            annotation = self.read_type(t, parsed)
            self.emit(f"def {attr}(self) -> {annotation}:", indent + 1)
            self.emit(f"return {self._read_expression(t, parsed, raw.name)}", indent + 2)
        if indent == 0:
            self._fields_dict(struct, indent + 1)
            self._nested_aliases(node.id, indent + 1, {"which", "Fields"})
        for raw, parsed in zip(node.struct.fields, struct.fields_list, strict=True):
            if raw.which() == "group":
                self.emit("")
                self.emit("")
                self._struct_class(self.names[parsed.schema.node.id], parsed.schema, indent, generic=generic)

    def _fields_dict(self, struct: Any, indent: int) -> None:
        """``Fields``: the struct as the mapping a call takes it in, a TypedDict (every field
        optional, as in Cap'n Proto; a renamed field under both of its spellings)."""
        items = []
        for raw, parsed in zip(struct.node.struct.fields, struct.fields_list, strict=True):
            if raw.which() == "group":
                typ = f"{self.names.get(parsed.schema.node.id, 'Mapping[str, Any]')}.Fields"
                if typ == "Mapping[str, Any].Fields":
                    typ = "Mapping[str, Any]"
            else:
                typ = self.write_type(raw.slot.type, parsed)
            for variables in self.type_params.values():  # (a TypedDict cannot take a TypeVar)
                for variable in variables:
                    typ = re.sub(rf"\b{variable}_?\b", "Any", typ)
            for key in dict.fromkeys((raw.name, python_name(raw.name))):
                items.append(f"{key!r}: {typ!r}")
        self.emit("")
        self.emit(f'Fields = TypedDict("Fields", {{{", ".join(items)}}}, total=False)', indent)

    def _read_expression(self, t: Any, parsed: Any, field: str) -> str:
        value = f"getattr(self._view, {python_name(field)!r})"  # (the view reads either spelling)
        kind = t.which()
        if kind == "struct" and t.struct.typeId != FD_STRUCT_ID:
            wrapper = self.names.get(t.struct.typeId) or self._imported(parsed, "")
            if wrapper:
                return f"{wrapper}({value})"
        if kind == "list" and t.list.elementType.which() == "struct":
            element = t.list.elementType.struct.typeId
            wrapper = self.names.get(element) or self._imported(_Elem(parsed.schema.elementType), "")
            if wrapper and element != FD_STRUCT_ID:
                return f"[{wrapper}(v) for v in {value}]"
        if kind == "enum":
            return f'cast("{self.read_type(t, parsed)}", str({value}))'
        return f'cast("{self.read_type(t, parsed)}", {value})'

    def _bases(self, node: Any) -> list[str]:
        """The classes of the interfaces ``node`` extends (a generic one with the brand it
        extends: ``Shelf(V) extends(Box(V))`` makes Shelf[V] a Box[V]); "" for one without
        a class here."""
        return [
            self._branded(found, base.id, base.brand) if (found := self.names.get(base.id)) else ""
            for base in node.interface.superclasses
        ]

    def _interface_class(self, interface: Any) -> None:
        node = interface.node
        name = self.names[node.id]
        generic = node.id if node.id in self.type_params else 0
        if generic:
            self.active.append((generic, False))
        parents = self._bases(node)
        bases = ", ".join(p for p in parents if p) or "_stubs.TypedClient"
        self.emit("@_stubs.register")
        self.emit(f"class {name}({bases}{self._generic_base(generic)}):")
        self.emit(_doc(f"Client of ``{node.displayName}``; subclass ``{name}.Server`` to implement it."), 1)
        self._annotations(node, 1)
        self.emit("", 0)
        self.emit(f"interface = _schema.interface({node.id:#x})", 1)
        for method in node.interface.methods:
            parsed = interface.methods[method.name]
            self._client_method(name, method.name, parsed, self._arguments_of(generic))
        if generic:
            self.active.append((generic, True))  # (the classes nested in it)
        for method in node.interface.methods:
            parsed = interface.methods[method.name]
            self._method_classes(name, method.name, parsed, generic)
            results = parsed.result_type
            if results.node.id == STREAM_RESULT_ID:
                continue
            self.emit("")
            # Results that are a named struct type (``-> Where``) are that struct's class.
            named = self.names.get(results.node.id) or self._imported(_Elem(results), "")
            if named and not results.node.isGeneric and results.node.id not in self.type_params:
                self.emit(f"{_camel(method.name)}Results: TypeAlias = {named}", 1)
            else:
                self._struct_class(f"{_camel(method.name)}Results", results, 1, generic=generic)
        server_bases = (
            ", ".join(
                f"{p.partition('[')[0]}.Server{p.partition('[')[1]}{p.partition('[')[2]}"
                for p in self._bases(node)  # (with the inner TypeVars, as a nested class)
                if p
            )
            or "_stubs.TypedServer"
        )
        self.emit("")
        self.emit(f"class Server({server_bases}{self._generic_base(generic, True)}):", 1)
        self.emit(_doc(f"Base class of ``{node.displayName}`` servers: override the methods."), 2)
        self.emit("", 1)
        self.emit(f"interface = _schema.interface({node.id:#x})", 2)
        for method in node.interface.methods:
            self._server_method(name, method.name, interface.methods[method.name])
        for method in node.interface.methods:
            self._returned_dict(method.name, interface.methods[method.name])
        taken = {"Server", "interface"}
        for method in node.interface.methods:
            taken |= {
                f"{_camel(method.name)}{suffix}" for suffix in ("Method", "Promise", "Results", "Returned")
            }
        self._nested_aliases(node.id, 1, taken)
        if generic:
            del self.active[-2:]

    def _params(self, param_type: Any, *, write: bool) -> list[tuple[str, str, str, bool]]:
        """(schema name, Python name, type, whether it is a union member) per param."""
        out = []
        for raw, parsed in zip(param_type.node.struct.fields, param_type.fields_list, strict=True):
            in_union = raw.discriminantValue != _NOT_IN_UNION
            if raw.which() == "group":
                out.append(
                    (raw.name, python_name(raw.name), "Mapping[str, Any]" if write else "Any", in_union)
                )
                continue
            t = raw.slot.type
            typ = self.write_type(t, parsed) if write else self.read_type(t, parsed)
            out.append((raw.name, python_name(raw.name), typ, in_union))
        return out

    def _client_method(self, owner: str, name: str, parsed: Any, arguments: str = "") -> None:
        """``client.m``: a property whose value is called (``await client.m(...)``), sent
        (``await client.m.send(...)``: a typed promise to pipeline on) or sent one-way."""
        method_class = f"{owner}.{_camel(name)}Method"
        self.emit("")
        self.emit("@property", 1)
        self.emit(f"def {python_name(name)}(self) -> {method_class}{arguments}:", 1)
        self.emit(f"return {method_class}(self, {name!r})", 2)

    def _method_classes(self, owner: str, name: str, parsed: Any, generic: int = 0) -> None:
        params = self._params(parsed.param_type, write=True)
        streaming = parsed.result_type.node.id == STREAM_RESULT_ID
        camel = _camel(name)
        arguments = self._arguments_of(generic, True)
        made = f"{owner}.{camel}Results"  # (the class, called to wrap the results)
        results = "None" if streaming else f"{made}{arguments}"
        signature = "".join(f", {py}: {typ} | None = None" for _, py, typ, _ in params)
        star = ", *" if params else ""
        mapping = "{" + ", ".join(f"{schema!r}: {py}" for schema, py, _, _ in params) + "}"
        self.emit("")
        self.emit(f"class {camel}Method(_stubs.TypedMethod{self._generic_base(generic, True)}):", 1)
        self.emit(f'"""``{name}``: call it, ``send`` it (pipelining) or send it ``oneway``."""', 2)
        self.emit("", 1)
        self.emit(f"async def __call__(self{star}{signature}) -> {results}:", 2)
        if streaming:
            self.emit(f"await self._call({mapping})", 3)
        else:
            self.emit(f"return {made}(await self._call({mapping}))", 3)
            self.emit("", 1)
            self.emit(f"async def send(self{star}{signature}) -> {owner}.{camel}Promise{arguments}:", 2)
            self.emit(f"return {owner}.{camel}Promise(await self._send({mapping}), {made})", 3)
        self.emit("", 1)
        self.emit(f"async def oneway(self{star}{signature}) -> None:", 2)
        self.emit(f"await self._oneway({mapping})", 3)
        if streaming:
            return
        self.emit("")
        self.emit(f'class {camel}Promise(_stubs.TypedPromise["{results}"]):', 1)
        self.emit(
            f'"""The results of a sent ``{name}``: ``await`` it; its capabilities can be called '
            'before they arrive."""',
            2,
        )
        result_type = parsed.result_type
        for raw, field in zip(result_type.node.struct.fields, result_type.fields_list, strict=True):
            if raw.which() != "slot" or raw.slot.type.which() != "interface":
                continue
            typ = self.read_type(raw.slot.type, field)
            self.emit("", 1)
            self.emit("@property", 2)
            self.emit(f"def {python_name(raw.name)}(self) -> {typ}:", 2)
            self.emit(f'return cast("{typ}", self._pipelined({raw.name!r}))', 3)

    def _returned_dict(self, name: str, parsed: Any) -> None:
        """``MReturned``: the results a handler may return, as a TypedDict (every field
        optional, as results are; a renamed field under both of its spellings)."""
        results = parsed.result_type
        if results.node.id == STREAM_RESULT_ID or not results.node.struct.fields:
            return
        items = []
        for raw, field_schema in zip(results.node.struct.fields, results.fields_list, strict=True):
            typ = (
                "Mapping[str, Any]"
                if raw.which() == "group"
                else self.write_type(raw.slot.type, field_schema)
            )
            for variables in self.type_params.values():  # (a TypedDict cannot take a TypeVar)
                for variable in variables:
                    typ = re.sub(rf"\b{variable}_?\b", "Any", typ)
            for key in dict.fromkeys((raw.name, python_name(raw.name))):
                items.append(f"{key!r}: {typ!r}")  # (a string: classes defined later are named)
        camel = f"{_camel(name)}Returned"
        self.emit("")
        self.emit(f'{camel} = TypedDict("{camel}", {{{", ".join(items)}}}, total=False)', 1)

    def _server_method(self, owner: str, name: str, parsed: Any) -> None:
        params = self._params(parsed.param_type, write=False)
        results = parsed.result_type
        if results.node.id == STREAM_RESULT_ID or not results.node.struct.fields:
            returns = "None"
        else:
            # The results as a dict whose keys and values mypy checks (a TypedDict).
            returned = f"{owner}.{_camel(name)}Returned"
            if len(results.node.struct.fields) == 1:
                raw, field_schema = results.node.struct.fields[0], results.fields_list[0]
                single = "Any" if raw.which() == "group" else self.write_type(raw.slot.type, field_schema)
                returns = f"{returned} | {single}"
            else:
                returns = returned
        # A union's members are passed only when set: the one set is, the others are not.
        signature = "".join(f", {py}: {typ}{' | None = None' * union}" for _, py, typ, union in params)
        star = ", *" if params else ""
        # Override it with ``async def`` (a task per call) or plain ``def`` (run inline):
        # both fit this signature.
        self.emit("", 1)
        self.emit(f"def {python_name(name)}(self{star}{signature}) -> Awaitable[{returns}] | {returns}:", 2)
        self.emit(f'raise _errors.Unimplemented("{owner}.{name} is not implemented by this server")', 3)

    def _wrappers(self) -> None:
        """Struct params reach servers wrapped in their generated classes."""
        for interface in self.interfaces:
            name = self.names[interface.node.id]
            table: dict[str, dict[str, str]] = {}
            for method in interface.node.interface.methods:
                parsed = interface.methods[method.name]
                param_type = parsed.param_type
                for raw, field in zip(param_type.node.struct.fields, param_type.fields_list, strict=True):
                    t = raw.slot.type if raw.which() == "slot" else None
                    if t is None or t.which() != "struct" or t.struct.typeId == FD_STRUCT_ID:
                        continue
                    wrapper = self.names.get(t.struct.typeId) or self._imported(field, "")
                    if wrapper:
                        table.setdefault(method.name, {})[raw.name] = wrapper
            entries = ", ".join(
                f"{m!r}: {{{', '.join(f'{k!r}: {v}' for k, v in sorted(fields.items()))}}}"
                for m, fields in sorted(table.items())
            )
            self.emit(f"{name}.Server._param_wrappers = {{{entries}}}")


_ANY_READ = {
    "anyKind": "_client.Client | _anypointer.AnyPointer | None",
    "struct": "_anypointer.AnyStruct | None",
    "list": "_anypointer.AnyList | None",
    "capability": "_client.Client | None",
}
"""How a field of each kind of AnyPointer reads (capbus/rpc/anypointer.py)."""
_ANY_WRITE = {
    "anyKind": "_anypointer.Sendable",
    "struct": "_anypointer.SendableStruct",
    "list": "_anypointer.SendableList",
    "capability": "_client.Client | _server.Server",
}
"""... and what it takes."""


class _Elem:
    """Stands for a parsed field when only a list's element schema is known."""

    def __init__(self, schema: Any) -> None:
        self.schema = schema


def _escaped(text: str) -> str:
    """``text`` safe inside a generated string literal, whatever a file name holds: quotes,
    backslashes, newlines and other characters escaped (so it can never end the literal)."""
    return text.encode("unicode_escape").decode("ascii").replace('"', '\\"').replace("'", "\\'")


_MODULE_NAMES = frozenset(
    {
        "annotations",
        "TYPE_CHECKING",
        "Any",
        "ClassVar",
        "Final",
        "Literal",
        "Protocol",
        "TypeAlias",
        "TypedDict",
    }
    | {"cast", "Awaitable", "Mapping", "Sequence"}
)
"""What a generated module binds for itself at its top level (its imports)."""


def _module_level(name: str) -> str:
    """A schema name as the generated module binds it at its top level: with a trailing
    underscore if the module's own imports have it (a constant named ``cast``, a struct
    ``Mapping``), which no schema name can have."""
    return name + "_" if name in _MODULE_NAMES else name


def _plain_constant(value: Any) -> Any:
    """A constant as plain Python values: structs as dicts, lists as lists, enums as their
    names, all the way down."""
    kind = type(value).__name__
    if kind == "_DynamicEnum":
        return str(value)
    if hasattr(value, "to_dict"):
        return _plain_constant(value.to_dict())
    if isinstance(value, dict):
        return {k: _plain_constant(v) for k, v in value.items()}
    if kind.startswith("_DynamicList") or isinstance(value, list):
        return [_plain_constant(v) for v in value]
    return value


def _literal(value: object) -> str:
    """Python source for a constant's or annotation's value: repr, but a float that is not
    finite (a schema may say nan or inf) as an expression that makes it."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return repr(value)


def _doc(text: str) -> str:
    """A generated docstring of ``text`` (escaped)."""
    return f'"""{_escaped(text)}"""'


_CONSTANT_TYPES = {"bool": "bool", "text": "str", "data": "bytes", "float32": "float", "float64": "float"}


def _module_name(schema_file: str) -> str:
    """The generated module's name for a schema file (as ``capbus compile`` names it): an
    identifier (``base.v1.capnp`` -> ``base_v1_capnp``, ``2d.capnp`` -> ``_2d_capnp``)."""
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(schema_file))[0], flags=re.ASCII)
    return f"{'_' * stem[:1].isdigit()}{stem}_capnp"


def generate(schema_path: str | os.PathLike[str], imports: Iterable[str] = ()) -> str:
    """The typed module's source for a .capnp file."""
    capnp.remove_import_hook()
    path = os.fspath(schema_path)
    module = parse(path, [*imports, *import_path()])  # (checked, as capbus.load does)
    generator = _Generator(module, os.path.basename(path))
    generator.collect()
    return generator.render()


def generate_file(
    schema_path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    imports: Iterable[str] = (),
) -> str:
    """Writes the module (default: ``<schema stem>_capnp.py`` next to the schema; into
    ``output`` under that name if it is a directory); returns its path."""
    source = generate(schema_path, imports)
    name = _module_name(os.fspath(schema_path)) + ".py"
    if output is None:
        output = os.path.join(os.path.dirname(os.fspath(schema_path)), name)
    elif os.path.isdir(output):
        output = os.path.join(output, name)
    with open(output, "w") as out:
        out.write(source)
    return os.fspath(output)
