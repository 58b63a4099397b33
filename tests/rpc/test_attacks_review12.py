"""Attacks on the schema-handling side (twelfth review): ``capbus.load`` and its compiler
check (capbus/rpc/schemacheck.py), ``capbus compile`` and the modules it generates
(capbus/compiler/generate.py), constants, imported types, generic brands (layout.py,
interface.py). Whatever may abort or import a broken module runs in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import trio

import capbus
from capbus.rpc.vat import open_vat

TIMEOUT = 10
CHILD_TIMEOUT = 120


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``code`` run by a fresh interpreter in ``cwd`` (the test's PYTHONPATH, if any, kept)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )


def _compile(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "capbus", "compile", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )


def _no_abort(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != -6 and result.returncode != 134, result.stderr
    assert "terminate called" not in result.stderr, result.stderr


# -- the compiler check: what still aborts the process ------------------------------------------


def test_loading_one_schema_through_a_symlink_and_its_real_path_does_not_abort(tmp_path: Path) -> None:
    """HIGH. Attack: ``capbus.load("real.capnp")`` then ``capbus.load("link.capnp")``, link
    being a symlink to the same file (two packages that vendor one schema through a symlink,
    a ``/usr/share`` path and a venv path to it...). ``_check_ids`` compares
    ``os.path.realpath`` of both and, seeing one file, lets it through; but pycapnp's parser
    keys files by the path it was given (it does not resolve symlinks), reads a second file
    with the same id and throws ``Duplicate ID`` where no exception may pass: the process
    aborts (``terminate called``, exit 134). Suggested fix: when the id is already loaded
    from the same real file, return that module (cache ``SchemaModule`` by file id / real
    path) instead of calling ``capnp.load`` again; or load through the real path always."""
    (tmp_path / "real.capnp").write_text("@0xe51c0a2b3d4f6001;\ninterface I { f @0 () -> (); }\n")
    (tmp_path / "link.capnp").symlink_to(tmp_path / "real.capnp")
    result = _python(
        """
        import capbus
        a = capbus.load("real.capnp")
        try:
            b = capbus.load("link.capnp")
        except capbus.SchemaError as error:
            print("refused:", error)
        else:
            print("loaded", b.I.interface.id == a.I.interface.id)
        """,
        tmp_path,
    )
    _no_abort(result)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(("loaded True", "refused:")), result.stdout


def test_a_file_with_the_id_of_a_file_loaded_only_as_an_import_is_refused_not_an_abort(
    tmp_path: Path,
) -> None:
    """HIGH. Attack: ``capbus.load("a.capnp")``, which imports ``t.capnp`` (id X), then
    ``capbus.load("other.capnp")``, a different file that also declares id X (a copied and
    edited schema, a new version of t.capnp elsewhere; or a file with the id of
    ``/capnp/stream.capnp`` after a streaming schema was loaded). ``_check_ids`` looks only in
    pycapnp's ``modules_by_id``, which holds the files passed to ``capnp.load`` itself, not
    the files they imported; so X is not found, the check passes, and pycapnp's parser
    aborts the process (``Duplicate ID``, exit 134) -- exactly the abort the check exists to
    prevent. Suggested fix: keep capbus's own record of every file id the compiler reported
    for each accepted load (``_file_ids`` has them all, imports included) with its real path,
    and refuse a new file whose id is recorded for another path."""
    (tmp_path / "t.capnp").write_text("@0xe51c0a2b3d4f6002;\nstruct T { a @0 :Int32; }\n")
    (tmp_path / "a.capnp").write_text(
        '@0xe51c0a2b3d4f6003;\nusing import "t.capnp".T;\nstruct U { t @0 :T; }\n'
    )
    (tmp_path / "other.capnp").write_text("@0xe51c0a2b3d4f6002;\nstruct Other { b @0 :Text; }\n")
    result = _python(
        """
        import capbus
        capbus.load("a.capnp")
        try:
            capbus.load("other.capnp")
        except capbus.SchemaError as error:
            print("refused:", error)
        """,
        tmp_path,
    )
    _no_abort(result)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused:") and "0xe51c0a2b3d4f6002" in result.stdout, result.stdout


def test_loading_one_schema_twice_with_different_import_directories_does_not_abort(
    tmp_path: Path,
) -> None:
    """HIGH. Attack: the same file loaded twice in one process, once as
    ``capbus.load("schemas/t.capnp")`` and once as ``capbus.load("schemas/t.capnp",
    imports=["schemas"])`` -- an import directory that holds the file (or any ancestor of
    it: ``/tmp``), as is usual for a schema directory (two libraries that use one schema,
    one passing its schema directory). The compiler accepts it and ``_check_ids`` sees the
    same real path, so it passes; but pycapnp's parser then names the file by its path
    within that import directory, takes it for another file, finds its id taken and throws
    ``Duplicate ID`` where no exception may pass: the process aborts (exit 134). (An import
    directory elsewhere, or the same list twice, is fine.)
    Suggested fix: keep one SchemaModule per real path (return it again: a file's meaning
    cannot change with the import path unless its imports resolve elsewhere, and then a
    SchemaError says so), or always parse a given file with the import list it was first
    loaded with."""
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "t.capnp").write_text("@0xe51c0a2b3d4f6016;\ninterface I { f @0 () -> (); }\n")
    result = _python(
        """
        import capbus
        first = capbus.load("schemas/t.capnp")
        try:
            second = capbus.load("schemas/t.capnp", imports=["schemas"])
        except capbus.SchemaError as error:
            print("refused:", error)
        else:
            print("loaded", second.I.interface.id == first.I.interface.id)
        """,
        tmp_path,
    )
    _no_abort(result)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(("loaded True", "refused:")), result.stdout


def test_a_file_imported_through_an_import_directory_and_loaded_by_path_does_not_abort(
    tmp_path: Path,
) -> None:
    """HIGH. Attack: the usual layout of a schema tree: ``app.capnp`` says ``using import
    "/lib/types.capnp".T;`` and is loaded with ``imports=[root]``; elsewhere in the process
    ``capbus.load(root / "lib/types.capnp")`` loads the imported file itself (either order).
    The compiler is happy both times and ``_check_ids`` does not object (the first time the
    file is only an import, which it does not record; and its real path is the same anyway),
    but pycapnp's parser knows the file once as ``lib/types.capnp`` under the import
    directory and once by its path: two files with one id, ``Duplicate ID``, the process
    aborts (exit 134). Suggested fix: load a file that was (or will be) reached through an
    import directory the same way pycapnp reached it (when one of the import directories
    holds ``path``, load it through that directory: ``capnp.load`` with the same display
    name and import list); or give pycapnp each file only once: keep capbus's own map of
    real path -> loaded module for every file in the compiler's CodeGeneratorRequest and
    hand out the module already loaded."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "types.capnp").write_text("@0xe51c0a2b3d4f6017;\nstruct T { a @0 :Int32; }\n")
    (tmp_path / "app.capnp").write_text(
        '@0xe51c0a2b3d4f6018;\nusing import "/lib/types.capnp".T;\nstruct U { t @0 :T; }\n'
    )
    for order in ("app first", "types first"):
        result = _python(
            f"""
            import capbus
            def app(): capbus.load("app.capnp", imports=["."])
            def types(): capbus.load("lib/types.capnp")
            first, second = (app, types) if {order!r} == "app first" else (types, app)
            first()
            try:
                second()
            except capbus.SchemaError as error:
                print("refused:", error)
            else:
                print("loaded")
            """,
            tmp_path,
        )
        _no_abort(result)
        assert result.returncode == 0 and result.stdout.startswith(("loaded", "refused:")), result.stdout


def test_a_struct_id_already_loaded_from_another_file_is_refused_not_an_abort(tmp_path: Path) -> None:
    """HIGH. Attack: two files with different file ids whose declarations share an id:
    ``struct T @0x... {}`` in one and ``struct Other @0x... {}`` (the same explicit id:
    a struct copied with its pinned id into a new file, or the next version of a schema
    under a new file id that keeps its pinned type ids). ``_check_ids`` compares only file
    nodes, so the second ``capbus.load`` passes the check and pycapnp aborts the process on
    the shared node id (``Duplicate ID``, exit 134). Suggested fix: check every node id of
    the CodeGeneratorRequest (not just files) against the node ids already loaded (capbus's
    own record of them, since pycapnp's ``modules_by_id`` has only some), refusing with a
    SchemaError that names both declarations."""
    (tmp_path / "a.capnp").write_text("@0xe51c0a2b3d4f601d;\nstruct T @0xe51c0a2b3d4f601e { a @0 :Int32; }\n")
    (tmp_path / "b.capnp").write_text(
        "@0xe51c0a2b3d4f601f;\nstruct Other @0xe51c0a2b3d4f601e { b @0 :Text; }\n"
    )
    result = _python(
        """
        import capbus
        capbus.load("a.capnp")
        try:
            capbus.load("b.capnp")
        except capbus.SchemaError as error:
            print("refused:", error)
        """,
        tmp_path,
    )
    _no_abort(result)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused:") and "0xe51c0a2b3d4f601e" in result.stdout, result.stdout


# -- generated modules: constants ---------------------------------------------------------------


def _generate(schema: Path, cwd: Path) -> Path:
    output = cwd / f"{schema.stem.replace('-', '_')}_capnp.py"
    result = _compile(str(schema), "-o", str(output), cwd=cwd)
    assert result.returncode == 0, result.stderr
    return output


def test_nan_and_inf_constants_give_a_module_that_imports(tmp_path: Path) -> None:
    """MEDIUM. Attack: a schema with ``const big :Float64 = inf;`` or ``= nan`` (both valid
    Cap'n Proto, common for limits and sentinels), or a struct constant with such a field.
    ``_constants`` writes ``repr(value)``: ``big: Final[float] = inf``, a NameError when the
    generated module is imported (``capbus compile`` reported success). Suggested fix: emit
    ``float("inf")`` / ``float("-inf")`` / ``float("nan")`` (a helper that writes any constant
    value as a Python literal, recursing into dicts and lists, and refusing what it cannot
    write), and check the module with ``compile()`` before writing it."""
    schema = tmp_path / "floats.capnp"
    schema.write_text(
        "@0xe51c0a2b3d4f6004;\n"
        "const big :Float64 = inf;\n"
        "const small :Float32 = -inf;\n"
        "const unknown :Float64 = nan;\n"
        "struct S { f @0 :Float64; }\n"
        "const s :S = (f = inf);\n"
    )
    _generate(schema, tmp_path)
    result = _python(
        """
        import math, floats_capnp as m
        assert m.big == math.inf and m.small == -math.inf and math.isnan(m.unknown)
        assert m.s == {"f": math.inf}, m.s
        print("ok")
        """,
        tmp_path,
    )
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def test_list_of_list_and_list_of_enum_constants_give_a_module_that_imports(tmp_path: Path) -> None:
    """MEDIUM. Attack: ``const grid :List(List(Int32)) = [[1, 2], [3]];`` or ``const
    order :List(Color) = [red, blue];``. ``_constants`` converts only a list's struct
    elements (``to_dict``); an inner list or an enum element stays a pycapnp object whose
    repr is ``<capnp list reader [1, 2]>`` / ``<red enum>``, written into the module as is:
    a SyntaxError when it is imported, while ``capbus compile`` exits 0. Suggested fix:
    convert constant values recursively (lists to lists, structs to dicts, enums to their
    names, as ``capbus.load`` and enum fields do) and check the generated source with
    ``compile()`` before writing it."""
    schema = tmp_path / "lists.capnp"
    schema.write_text(
        "@0xe51c0a2b3d4f6005;\n"
        "enum Color { red @0; blue @1; }\n"
        "struct P { x @0 :Int32; }\n"
        "const grid :List(List(Int32)) = [[1, 2], [3]];\n"
        "const order :List(Color) = [red, blue];\n"
        "const rows :List(List(P)) = [[(x = 1)], []];\n"
    )
    _generate(schema, tmp_path)
    result = _python(
        """
        import lists_capnp as m
        assert m.grid == [[1, 2], [3]], m.grid
        assert m.order == ["red", "blue"], m.order
        assert m.rows == [[{"x": 1}], []], m.rows
        print("ok")
        """,
        tmp_path,
    )
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def test_a_constant_named_cast_does_not_break_the_generated_module(tmp_path: Path) -> None:
    """MEDIUM. Attack: a constant whose name is one the generated module uses for itself:
    ``const cast :Int32 = 5;`` (lowercase, so a legal constant name; ``cast`` is a plain
    word in a schema). The module does ``from typing import ... cast`` and every struct
    property's body is ``return cast("int", ...)``; the constant, emitted at module level
    after that import, rebinds ``cast`` to 5, and reading any field of any struct raises
    ``TypeError: 'int' object is not callable``. Same for the other names the module imports
    and uses at run time: ``enum Literal { a @0; }`` followed by another enum makes the next
    alias ``Literal['a'][...]``, a TypeError when the module is imported. Suggested fix: the
    generated code refers to its helpers only through underscore names (``import typing as
    _typing``; ``_typing.cast``), which no schema name can take (Cap'n Proto names have no
    underscores), or the naming rule renames schema names that the module uses."""
    schema = tmp_path / "shadow.capnp"
    schema.write_text("@0xe51c0a2b3d4f6006;\nconst cast :Int32 = 5;\nstruct P { x @0 :Int32; }\n")
    _generate(schema, tmp_path)
    result = _python(
        """
        import capbus, shadow_capnp as m
        view = capbus.load("shadow.capnp").pycapnp.P.new_message(x=3).as_reader()
        assert m.P(view).x == 3
        assert m.cast_ == 5  # (the naming rule: a name the module binds itself gets the "_")
        print("ok")
        """,
        tmp_path,
    )
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr
    schema = tmp_path / "literal.capnp"
    schema.write_text("@0xe51c0a2b3d4f6013;\nenum Literal { a @0; }\nenum Color { red @0; }\n")
    _generate(schema, tmp_path)
    result = _python("import literal_capnp; print('ok')", tmp_path)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


# -- generated modules: names ------------------------------------------------------------------


def test_a_group_and_a_nested_struct_of_the_same_name_get_different_classes(tmp_path: Path) -> None:
    """MEDIUM. Attack: ``struct Foo { bar :group { a @0 :Int32; } struct Bar { b @0 :Text; }
    c @1 :Bar; }`` -- a group ``bar`` and a nested struct ``Bar`` (legal: a field and a type
    live in different namespaces). The generator names the nested struct ``Foo_Bar`` and the
    group's class ``Foo_`` + ``Bar``: the same name, so the group's class, defined second,
    replaces the struct's. ``Foo(view).c`` (typed ``Foo_Bar``, the nested struct) is then
    wrapped in the group's class: ``.c.b`` raises AttributeError, ``.c.a`` reads the wrong
    thing. Suggested fix: give group classes names no type can have (e.g. ``Foo_bar_`` or a
    name checked against ``self.names`` values and made unique), and check once for
    duplicate generated names."""
    schema = tmp_path / "groups.capnp"
    schema.write_text(
        "@0xe51c0a2b3d4f6007;\n"
        "struct Foo {\n"
        "  bar :group { a @0 :Int32; }\n"
        "  struct Bar { b @0 :Text; }\n"
        "  c @1 :Bar;\n"
        "}\n"
    )
    _generate(schema, tmp_path)
    result = _python(
        """
        import capbus, groups_capnp as m
        pycapnp = capbus.load("groups.capnp").pycapnp
        foo = m.Foo(pycapnp.Foo.new_message(bar={"a": 7}, c={"b": "hi"}).as_reader())
        assert foo.bar.a == 7
        assert foo.c.b == "hi"
        print("ok")
        """,
        tmp_path,
    )
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def test_a_schema_importing_a_file_with_dots_in_its_name_gives_a_module_that_imports(
    tmp_path: Path,
) -> None:
    """MEDIUM. Attack: ``user.capnp`` imports ``base.v1.capnp`` (versioned file names are
    common; likewise ``2d.capnp``, ``my types.capnp``). ``_module_name`` makes
    ``base.v1_capnp`` and the generated ``if TYPE_CHECKING:`` block says ``import
    base.v1_capnp as _base.v1_capnp``: a SyntaxError, so ``user_capnp`` cannot be imported
    at all (and ``capbus compile`` exits 0). Suggested fix: make the module name an
    identifier (every character that is not ``[A-Za-z0-9_]`` to ``_``, a leading digit
    prefixed), the same rule for the file ``capbus compile`` writes and for the name
    ``sibling`` looks up; the alias from it, never from the raw name."""
    (tmp_path / "base.v1.capnp").write_text("@0xe51c0a2b3d4f6008;\nstruct T { a @0 :Int32; }\n")
    (tmp_path / "user.capnp").write_text(
        '@0xe51c0a2b3d4f6009;\nusing import "base.v1.capnp".T;\nstruct U { t @0 :T; }\n'
    )
    result = _compile("base.v1.capnp", "user.capnp", "-o", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = _python(
        """
        import capbus, user_capnp as m
        view = capbus.load("user.capnp").pycapnp.U.new_message(t={"a": 4}).as_reader()
        assert m.U(view).t.a == 4
        print("ok")
        """,
        tmp_path,
    )
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def test_a_schema_file_name_with_quotes_gives_a_module_that_imports(tmp_path: Path) -> None:
    """LOW. Attack: a schema file whose name holds ``\"\"\"`` or a backslash (``a\"\"\"b.capnp``,
    ``x\\N.capnp``). The name is pasted unescaped into the generated module's docstring and
    into every class docstring (``\"\"\"``{displayName}``.\"\"\"``): the docstring ends early and
    the rest of the name is Python source (a SyntaxError here; with care, text of the
    attacker's choosing lands in the module as code), or ``\\N`` is a malformed escape. The
    module does not import, and ``capbus compile`` exits 0. Suggested fix: write every
    schema-derived text into the module only through ``repr()`` (docstrings included:
    ``'__doc__ = ' + repr(...)``, or escape backslashes and quotes), and ``compile()`` the
    generated source before writing it."""
    for stem in ('a"""b', "x\\N"):
        directory = tmp_path / stem.replace('"', "q").replace("\\", "s")
        directory.mkdir()
        schema = directory / f"{stem}.capnp"
        schema.write_text("@0xe51c0a2b3d4f600a;\nstruct P { x @0 :Int32; }\n")
        output = directory / "quoted_capnp.py"
        result = _compile(str(schema), "-o", str(output), cwd=directory)
        assert result.returncode == 0, result.stderr
        compile(output.read_text(), str(output), "exec")  # (a SyntaxError now)


def test_a_deeply_nested_type_gives_a_module_that_imports_or_a_clear_error(tmp_path: Path) -> None:
    """LOW. Attack: a field of type ``List(List(...(Int32)...))`` 100 levels deep, which the
    compiler and ``capbus.load`` accept. ``capbus compile`` writes a module (exit 0) whose
    import fails with ``KjException: Message is too deeply-nested``: ``stubs.Schema`` reads
    each embedded node with ``Node.from_bytes`` and pycapnp's default nesting limit of 64.
    Suggested fix: read the embedded nodes with a nesting limit that fits any node the
    compiler accepted (``from_bytes(blob, nesting_limit=...)``), or refuse the schema at
    compile time with a SchemaError naming the field."""
    nested = "Int32"
    for _ in range(100):
        nested = f"List({nested})"
    schema = tmp_path / "deep.capnp"
    schema.write_text(f"@0xe51c0a2b3d4f600b;\nstruct D {{ x @0 :{nested}; }}\n")
    result = _compile(str(schema), "-o", str(tmp_path / "deep_capnp.py"), cwd=tmp_path)
    _no_abort(result)
    if result.returncode:  # a clear error is fine too
        assert "deep.capnp" in result.stderr and "Traceback" not in result.stderr, result.stderr
        return
    imported = _python("import deep_capnp; print('ok')", tmp_path)
    assert imported.returncode == 0 and imported.stdout == "ok\n", imported.stderr


# -- interfaces shared between loads and generated modules --------------------------------------


def test_a_generated_module_is_not_given_another_versions_interface(tmp_path: Path) -> None:
    """MEDIUM. Attack (version skew): a process ``capbus.load``s v1 of a schema (one method)
    and imports a generated module made from v2 of it (same file id, so the same interface
    and struct ids, with a method and a field added): say a library ships generated stubs
    and the application loads the schema file it has. ``interface_of`` and ``layout_of``
    cache by node id, so the generated module's ``Svc.interface`` is v1's: its ``new``
    method is missing (``client.new`` raises KeyError, a v2 server's ``new`` is never
    reachable) and v2 struct layouts are v1's. No error says so. Suggested fix: key the
    caches by the schema object's identity or by (loader, node id) rather than the bare id,
    or refuse (SchemaError) a node whose id is cached with a different shape."""
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    (tmp_path / "v1" / "svc.capnp").write_text(
        "@0xe51c0a2b3d4f600c;\ninterface Svc { old @0 () -> (n :Int32); }\n"
    )
    (tmp_path / "v2" / "svc.capnp").write_text(
        "@0xe51c0a2b3d4f600c;\ninterface Svc { old @0 () -> (n :Int32); new @1 (x :Text) -> (y :Text); }\n"
    )
    result = _compile(str(tmp_path / "v2" / "svc.capnp"), "-o", str(tmp_path / "svc2_capnp.py"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = _python(
        """
        import capbus
        v1 = capbus.load("v1/svc.capnp")
        try:
            import svc2_capnp as v2
        except capbus.SchemaError as error:
            print("refused:", error)
        else:
            print(sorted(v2.Svc.interface.methods))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(("['new', 'old']", "refused:")), result.stdout


# -- generic brands ----------------------------------------------------------------------------

_BRANDS = """\
@0xe51c0a2b3d4f600d;
interface Ping { ping @0 () -> (n :UInt32); }
interface Pong { pong @0 () -> (s :Text); }
interface Box(V) { get @0 () -> (value :V); }
interface Svc {
  pings @0 () -> (bb :Box(Box(Ping)));
  pongs @1 () -> (bb :Box(Box(Pong)));
}
"""


async def test_a_box_of_a_box_of_pong_holds_a_pong_not_a_ping(kernel: capbus.Kernel, tmp_path: Path) -> None:
    """MEDIUM. Attack: nested generics, ``Box(Box(Ping))`` and ``Box(Box(Pong))`` in one
    schema. ``brand_of`` describes a brand by the node ids its parameter fields resolve to,
    and for both outer boxes that is Box's own (generic) node id: the two brands get the
    same cache key in ``interface_of`` / ``layout_of``, so ``Box(Box(Pong))`` is given the
    Interface (and layouts) of ``Box(Box(Ping))``. A client of ``pongs().bb.get().value``
    is a Box(Ping) once a ``Box(Box(Ping))`` was typed first (whichever brand
    ``interface_of`` meets first wins): its ``get`` gives a Ping client for what is a Pong
    (a received capability is typed by the field it is read from), and ``.pong()`` is not
    there (AttributeError) although the schema says it is; pipelined calls are typed the
    same wrong way. Suggested fix: describe a brand recursively (the bound type's id and
    its own brand), or key the caches by the brand itself (pycapnp's ``schema.node`` plus
    the brand's scopes / the schema object)."""
    (tmp_path / "brands.capnp").write_text(_BRANDS)
    module: Any = capbus.load(tmp_path / "brands.capnp")

    class Ping(module.Ping.Server):  # type: ignore[misc,name-defined]
        def ping(self) -> int:
            return 1

    class Pong(module.Pong.Server):  # type: ignore[misc,name-defined]
        def pong(self) -> str:
            return "pong"

    class Box(module.Box.Server):  # type: ignore[misc,name-defined]
        def __init__(self, value: Any) -> None:
            self.value = value

        def get(self) -> Any:
            return self.value

    class Svc(module.Svc.Server):  # type: ignore[misc,name-defined]
        def pings(self) -> Any:
            return Box(Box(Ping()))

        def pongs(self) -> Any:
            return Box(Box(Pong()))

    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            handle = await server_peer.transfer(await server_vat.export(Svc()), client_peer)
            svc = client_vat.client(handle, module.Svc)
            with trio.fail_after(TIMEOUT):
                # First a box of a box of Ping (which types Box(Box(...)) for the process)...
                outer = (await svc.pings()).bb
                inner = (await outer.get()).value
                assert (await (await inner.get()).value.ping()).n == 1
                # ... then a box of a box of Pong.
                outer = (await svc.pongs()).bb
                inner = (await outer.get()).value
                leaf = (await inner.get()).value
                assert "pong" in leaf.interface.methods, leaf.interface.name
                assert (await leaf.pong()).s == "pong"
    finally:
        await server_peer.aclose()
        await client_peer.aclose()


# -- the naming rule ----------------------------------------------------------------------------

_SHADOWED = """\
@0xe51c0a2b3d4f600e;
struct Doc { schema @0 :Text; view @1 :Text; which @2 :Text; pycapnp @3 :Text; }
interface Svc { get @0 () -> (schema :Text, doc :Doc); }
"""


def _spelled(struct: Any, name: str) -> Any:
    """Field ``name`` as the naming rule may spell it (``name_``), else as it is."""
    try:
        value = getattr(struct, name + "_")
    except AttributeError:
        value = getattr(struct, name)
    # (not the value itself: pycapnp's schema has a strict ==, a reader's repr may recurse)
    return value if isinstance(value, str) else f"<{type(value).__name__}>"


async def test_fields_named_schema_or_view_read_as_the_fields(kernel: capbus.Kernel, tmp_path: Path) -> None:
    """MEDIUM. Attack: a struct field or result named ``schema`` or ``view`` (ordinary
    words: ``struct Doc { schema @0 :Text; view @1 :Text; }``). The naming rule
    (naming.RESERVED) does not rename them, but both are taken: ``schema`` by every pycapnp
    reader (``StructReader._raw`` reads ``getattr(reader, "schema")``, pycapnp's struct
    schema) and ``view`` / ``pycapnp`` by capbus's own ``StructReader`` (its methods win over
    ``__getattr__``). So ``results.schema`` is ``<schema for ...$Results>``, ``doc.view`` is
    a bound method, and ``to_dict()`` is wrong too: it reads every field with
    ``getattr(self, schema_name)``, so a field named ``which`` (which the rule does rename)
    comes out as the bound method ``StructReader.which``. Generated wrappers read through the
    same view and inherit all of it. No error anywhere: the caller just gets wrong values.
    Suggested fix: add ``schema``, ``view``, ``pycapnp`` (and the other reader/builder
    attributes: ``init``, ``copy``, ``write``, ``adopt``, ``disown``, ``toDict``'s kin) to
    RESERVED, read fields by ``reader._get(name)`` always, and have ``to_dict`` read by
    field (not by ``getattr(self, name)``)."""
    (tmp_path / "shadowed.capnp").write_text(_SHADOWED)
    module: Any = capbus.load(tmp_path / "shadowed.capnp")
    doc = {"schema": "s", "view": "v", "which": "w", "pycapnp": "p"}

    class Svc(module.Svc.Server):  # type: ignore[misc,name-defined]
        def get(self) -> Any:
            return {"schema": "top", "doc": doc}

    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            handle = await server_peer.transfer(await server_vat.export(Svc()), client_peer)
            svc = client_vat.client(handle, module.Svc)
            with trio.fail_after(TIMEOUT):
                results = await svc.get()
                top = _spelled(results, "schema")
                got = results.doc
                fields = {k: _spelled(got, k) for k in doc}
                plain = {
                    k: v if isinstance(v, str) else f"<{type(v).__name__}>" for k, v in got.to_dict().items()
                }
                del results, got  # (pytest must not repr them: see the next test)
                assert top == "top", top
                assert fields == doc, fields
                assert plain == doc, plain
    finally:
        await server_peer.aclose()
        await client_peer.aclose()


_REPR_CHILD = """
import trio, capbus
from capbus.rpc.vat import open_vat

module = capbus.load("shadowed.capnp")


class Svc(module.Svc.Server):
    def get(self):
        return {"schema": "top", "doc": {"schema": "s", "view": "v", "which": "w", "pycapnp": "p"}}


async def main():
    async with capbus.open_kernel() as kernel:
        server_peer, client_peer = await kernel.connect(), await kernel.connect()
        try:
            async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
                handle = await server_peer.transfer(await server_vat.export(Svc()), client_peer)
                svc = client_vat.client(handle, module.Svc)
                with trio.fail_after(10):
                    results = await svc.get()
                    text = repr(results.doc)
                    print("repr", len(text) < 1000, flush=True)
        finally:
            await server_peer.aclose()
            await client_peer.aclose()


trio.run(main)
"""


def test_the_repr_of_a_received_struct_with_such_fields_neither_aborts_nor_hangs(tmp_path: Path) -> None:
    """HIGH. Attack: the same struct (fields ``schema``, ``view``, ``which``, ``pycapnp``),
    received, and then simply printed or logged: ``repr(results.doc)``. ``describe`` calls
    ``to_dict``, which reads ``which`` and ``view`` as StructReader's bound methods; the repr
    of a bound method is the repr of its struct, which calls ``describe`` again: a recursion
    that branches twice per level (exponential), re-reading the message each time until its
    traversal limit throws inside pycapnp where no exception may pass: ``terminate called
    ... Exceeded message traversal limit``, exit 134. With only ``view`` and ``which`` it
    does not abort but runs for minutes (a hang). One ``print(results)`` in user code kills
    or freezes the process; a peer that sends such results can make any vat that logs
    them do so. Suggested fix: the naming fix of the previous test (``to_dict`` reads the
    fields, never ``getattr(self, name)``), and ``describe`` that never recurses into a
    repr of a StructReader (a recursion guard, as ``reprlib.recursive_repr``)."""
    (tmp_path / "shadowed.capnp").write_text(_SHADOWED)
    try:
        result = subprocess.run(
            [sys.executable, "-c", _REPR_CHILD], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("repr() of a received struct ran for over 60 s") from None
    _no_abort(result)
    assert result.returncode == 0 and result.stdout == "repr True\n", result.stderr[-2000:]


def test_a_copy_of_capbus_spawn_schema_does_not_make_spawning_abort_later(tmp_path: Path) -> None:
    """MEDIUM. Attack: a user schema with the id of one of capbus's own schemas that capbus
    loads lazily: here a copy of ``schemas/capbus/spawn.capnp`` (to extend it, say; or a
    schema that takes that id on purpose), loaded with ``capbus.load`` before anything has
    spawned. The check compares ids only with files already loaded, and spawn.capnp is
    loaded only when ``capbus.bootstrapping`` is first imported (``capbus.spawn``) -- and
    that load skips the check (``is_own_schema``). So the user's load passes, and the
    process aborts later, at its first spawn, far from the cause (``Duplicate ID
    @0x8dab9d53c356621d``, exit 134). (A copy of rpc.capnp is refused correctly: it is loaded
    at import.) Suggested fix: refuse any user file whose id is one of capbus's own schemas'
    ids (known at build time, or read from the own schemas' ``@0x...`` lines) whether or
    not they are loaded yet; or load all own schemas when the first user schema is loaded."""
    from capbus._resources import schema_directory

    (tmp_path / "spawn.capnp").write_bytes((Path(schema_directory()) / "capbus" / "spawn.capnp").read_bytes())
    result = _python(
        """
        import capbus
        try:
            capbus.load("spawn.capnp")
        except capbus.SchemaError as error:
            print("refused:", error)
        import capbus.bootstrapping
        print("spawning works")
        """,
        tmp_path,
    )
    _no_abort(result)
    assert result.returncode == 0 and result.stdout.endswith("spawning works\n"), result.stdout


def test_constants_named_schema_or_pycapnp_keep_their_values(tmp_path: Path) -> None:
    """MEDIUM. Attack: ``const schema :Text = "v2";`` or ``const pycapnp :Int32 = 3;`` through
    ``capbus.load``. ``SchemaModule`` skips every name ``schema`` (pycapnp's module attribute
    of that name is the file's schema... and pycapnp's constant of that name), so the
    constant is missing (AttributeError); and it copies a constant ``pycapnp`` over its own
    ``pycapnp`` attribute, so ``mod.pycapnp`` (documented as the pycapnp module, to build
    plain messages) becomes 3. ``capbus compile`` is worse: ``_constants`` reads the value
    with ``getattr(pycapnp_module, "schema")``, which is pycapnp's file schema, and writes
    ``schema: Final[str] = <capnp.lib.capnp._ParsedSchema object at 0x...>``: a module that
    does not import (exit status 0). Suggested fix: read a constant's value from its own
    node (``node.const.value`` / the parsed schema's ``get_nested(name).as_const_value()``),
    never by attribute of the pycapnp module; spell such constants by the naming rule in
    SchemaModule (``schema_``, ``pycapnp_``; add both to RESERVED)."""
    schema = tmp_path / "consts.capnp"
    schema.write_text(
        '@0xe51c0a2b3d4f6014;\nconst schema :Text = "v2";\n'
        "const pycapnp :Int32 = 3;\nstruct P { x @0 :Int32; }\n"
    )
    result = _python(
        """
        import capbus
        m = capbus.load("consts.capnp")
        print(type(m.pycapnp).__name__ != "int", getattr(m, "schema_", getattr(m, "schema", None)))
        print(getattr(m, "pycapnp_", None))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "True v2\n3\n", result.stdout
    _generate(schema, tmp_path)
    result = _python("import consts_capnp as m; print(m.schema, m.pycapnp)", tmp_path)
    assert result.returncode == 0 and result.stdout == "v2 3\n", result.stderr


def test_a_schema_path_that_is_not_utf8_gives_a_clear_answer(tmp_path: Path) -> None:
    """LOW. Attack: a schema whose file name is not UTF-8 (``bad\\xff.capnp``: any byte string
    is a Linux file name; Python passes it as a surrogate-escaped str). The compiler accepts
    it, then ``_file_ids`` reads each file node's ``displayName`` with pycapnp, which decodes
    Text as strict UTF-8: ``capbus.load`` raises a bare UnicodeDecodeError from pycapnp's
    internals, and ``capbus compile`` dies with that traceback instead of a message.
    Suggested fix: read ``displayName`` as bytes (``node.as_builder()`` / ``_get`` with a raw
    Text read, or ``displayName`` via ``schema_nodes`` with ``.decode(errors=
    "surrogateescape")``), and turn any remaining failure into a SchemaError naming the
    file (or refuse such names up front with a SchemaError)."""
    name = os.fsencode(tmp_path) + b"/bad\xff.capnp"
    with open(name, "wb") as out:
        out.write(b"@0xe51c0a2b3d4f6015;\nstruct P { x @0 :Int32; }\n")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import capbus, sys\n"
            "try:\n"
            "    print(capbus.load(sys.argv[1]).P is not None)\n"
            "except capbus.SchemaError as error:\n"
            "    print('refused', 'bad' in str(error))\n",
            name,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    _no_abort(result)
    assert result.returncode == 0 and result.stdout in ("True\n", "refused True\n"), result.stderr[-1500:]
    compiled = subprocess.run(
        [sys.executable, "-m", "capbus", "compile", name, "-o", str(tmp_path / "bad_capnp.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    _no_abort(compiled)
    assert "Traceback" not in compiled.stderr, compiled.stderr[-1500:]


def test_a_generated_module_using_capbus_own_types_imports(tmp_path: Path) -> None:
    """LOW. Attack: a schema that uses one of capbus's own types other than Fd, say
    ``using Spawn = import "/capbus/spawn.capnp";`` and a result of type ``Spawn.Entry``
    (capbus's named-capability entry: a natural thing to pass on). ``capbus.load`` takes it;
    ``capbus compile`` exits 0, but ``_imported`` treats ``capbus/spawn.capnp`` like a user
    file and the module imports ``_stubs.sibling(__name__, "spawn_capnp")``, a module that
    exists nowhere: importing the generated module fails with ModuleNotFoundError.
    Suggested fix: treat capbus's own schema files like Cap'n Proto's (``capbus/``: the
    untyped fallback), or ship generated modules for them and map the files to those."""
    schema = tmp_path / "uses_spawn.capnp"
    schema.write_text(
        "@0xe51c0a2b3d4f6019;\n"
        'using Spawn = import "/capbus/spawn.capnp";\n'
        "interface Svc { get @0 () -> (e :Spawn.Entry); }\n"
    )
    _generate(schema, tmp_path)
    result = _python("import uses_spawn_capnp; print('ok')", tmp_path)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr[-1500:]


def test_capbus_load_gives_nested_interfaces_client_and_server_classes(tmp_path: Path) -> None:
    """MEDIUM. Attack: nested declarations, as schemas often have them: ``interface Outer {
    interface Inner {...}; enum Mode {...}; get @0 () -> (i :Inner); }`` and ``struct Holder
    { interface Callback {...}; cb @0 :Callback; }``. ``SchemaModule`` wraps only top-level
    interfaces: ``mod.Outer`` is a bare class with Client and Server, so ``mod.Outer.Inner``
    and ``mod.Outer.Mode`` do not exist at all (no way to implement Inner with capbus.load);
    and ``mod.Holder.Callback`` is pycapnp's interface module, whose ``Server`` is pycapnp's
    own server base, not capbus's: a class derived from it cannot be exported by a vat.
    Suggested fix: build the SchemaModule tree recursively: every interface (nested ones
    too) a class with Client and Server and its nested types as attributes, structs'
    nested interfaces likewise."""
    from capbus.rpc.server import Server

    (tmp_path / "nested.capnp").write_text(
        "@0xe51c0a2b3d4f601a;\n"
        "interface Outer {\n"
        "  interface Inner { f @0 () -> (n :Int32); }\n"
        "  enum Mode { a @0; b @1; }\n"
        "  get @0 () -> (i :Inner);\n"
        "}\n"
        "struct Holder { interface Callback { g @0 (); } cb @0 :Callback; }\n"
    )
    module: Any = capbus.load(tmp_path / "nested.capnp")
    inner = getattr(module.Outer, "Inner", None)
    assert inner is not None and issubclass(inner.Server, Server), inner
    assert getattr(module.Outer, "Mode", None) is not None
    assert issubclass(module.Holder.Callback.Server, Server), module.Holder.Callback.Server


def test_a_text_constant_that_is_not_utf8_gives_a_clear_answer(tmp_path: Path) -> None:
    """LOW. Attack: ``const t :Text = "a\\xffb";`` -- the compiler accepts Text literals
    with any bytes. ``SchemaModule`` reads every constant while loading and pycapnp decodes
    Text strictly, so ``capbus.load`` raises a bare UnicodeDecodeError from pycapnp (the
    whole schema is unusable, interfaces included, with no word of which constant), and
    ``capbus compile`` dies with that traceback. Suggested fix: read constants defensively
    (a Text constant that is not UTF-8 as a SchemaError naming the constant and its file,
    or as bytes / surrogate-escaped str), in SchemaModule and in ``_constants`` alike."""
    schema = tmp_path / "badtext.capnp"
    schema.write_text('@0xe51c0a2b3d4f601b;\nconst t :Text = "a\\xffb";\ninterface Svc { f @0 () -> (); }\n')
    result = _python(
        """
        import capbus
        try:
            m = capbus.load("badtext.capnp")
        except capbus.SchemaError as error:
            print("refused", "badtext.capnp" in str(error))
        else:
            print("loaded", m.Svc.Server is not None)
        """,
        tmp_path,
    )
    answers = ("loaded True\n", "refused True\n")
    assert result.returncode == 0 and result.stdout in answers, result.stderr[-1500:]
    compiled = _compile(str(schema), cwd=tmp_path)
    assert "Traceback" not in compiled.stderr, compiled.stderr[-1500:]


def test_a_schema_error_names_the_whole_path_when_the_path_has_a_colon(tmp_path: Path) -> None:
    """LOW. Attack: a schema under a directory whose name has a colon (``/srv/app:v2/``,
    ``/run/user:1000/``...) with an error in it. The compiler, run from ``/``, names the file
    ``srv/app:v2/x.capnp`` and ``_RELATIVE_LOCATION`` (``[^:\\n]+\\.capnp``) cannot match a
    name with a colon, so the SchemaError reads ``srv/app:v2/x.capnp:2:20-24: error: ...``:
    a relative path, wrong from anywhere but ``/``, against the promise of whole paths.
    Suggested fix: replace the compiler's relative names by matching the known names (the
    file's and its import directories' paths less their first "/") rather than a pattern,
    or pass the compiler the file relative to ``/`` and map its names back exactly."""
    directory = tmp_path / "app:v2"
    directory.mkdir()
    schema = directory / "x.capnp"
    schema.write_text("@0xe51c0a2b3d4f601c;\nstruct Foo { a @0 :Nope; }\n")
    result = _python(
        f"""
        import capbus
        try:
            capbus.load({str(schema)!r})
        except capbus.SchemaError as error:
            print(error)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{schema}:2:"), result.stdout
