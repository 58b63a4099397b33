"""A ``.capnp`` file checked by the official Cap'n Proto compiler before pycapnp loads it.

pycapnp's parser reports a schema error by throwing a C++ exception where none may pass,
which aborts the whole process (``terminate called after throwing an instance of
'kj::ExceptionImpl'``, exit 134) with the file's path cut short. So every user schema is
first compiled by ``capnp compile`` (the ``capnp`` binary of the ``capnproto`` package, a
capbus dependency) in a child process: about 5 ms for a typical file; its message (whole
path, line, columns) becomes a :class:`SchemaError`; only a schema it accepts reaches
pycapnp. The child gets the same import directories as pycapnp (no standard ones of its
own), so both resolve imports alike.

A generated module never parses a schema (it embeds the compiled nodes), and capbus's own
schemas are not checked again, so a sandboxed child that cannot run programs still
imports and loads them.
"""

from __future__ import annotations

import errno
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Sequence
from typing import Any

from .._resources import schema_directory

CHECK_TIMEOUT = 60
"""Seconds the compiler may take on one file (a schema cannot make it loop; a huge one is slow)."""


class SchemaError(Exception):
    """A schema the Cap'n Proto compiler refused: its message, one line per error
    (``/whole/path.capnp:LINE:COLUMN: error: ...``)."""


_schema_module: Any = None


def schema_nodes() -> Any:
    """Cap'n Proto's own schema.capnp, loaded (Node, CodeGeneratorRequest...)."""
    global _schema_module
    if _schema_module is None:
        import capnp

        from .envelope import import_path

        capnp.remove_import_hook()
        schema_file = os.path.join(os.path.dirname(capnp.__file__), "schema.capnp")
        _schema_module = capnp.load(schema_file, imports=import_path())
    return _schema_module


def is_own_schema(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is one of capbus's own schemas (checked when capbus was built; loaded
    in sandboxed children, which may not run programs)."""
    own = os.path.realpath(schema_directory())
    return os.path.realpath(os.fspath(path)).startswith(own + os.sep)


@functools.cache
def compiler() -> str | None:
    """The ``capnp`` binary: the capnproto package's (wherever it is installed: the package
    records it), else one beside this Python's scripts, else on PATH."""
    try:
        files = importlib.metadata.distribution("capnproto").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == "capnp" and file.parent.name == "bin":
            where = os.path.normpath(str(file.locate()))
            if os.access(where, os.X_OK):
                return where
    beside = os.path.join(sysconfig.get_path("scripts"), "capnp")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("capnp")


_RELATIVE_LOCATION = re.compile(r"^(?!/)([^\n]*?\.capnp):(\d+):", re.MULTILINE)


def check(path: str | os.PathLike[str], imports: Sequence[str]) -> dict[int, str]:
    """Raises SchemaError unless the compiler accepts the schema at ``path`` (and what it
    imports, searched for in ``imports``); FileNotFoundError if there is no such file.
    Returns the id of every node the compiler read (files, and every type it used) -> the
    real path of the file that declares it."""
    where = os.path.abspath(os.fspath(path))
    if not os.path.isfile(where):
        raise FileNotFoundError(errno.ENOENT, "no such schema file", where)
    binary = compiler()
    if binary is None:
        raise SchemaError(
            f"{where}: cannot be checked: the Cap'n Proto compiler (capnp, from the capnproto"
            " package that capbus depends on) is not installed"
        )
    command = [binary, "compile", "--no-standard-import"]
    command += [f"-I{os.path.abspath(directory)}" for directory in imports]
    command += ["-o-", where]
    # Run from the root: the compiler names a file relative to its working directory when
    # it is under it, so every name it prints is then the whole path less its first "/".
    try:
        result = subprocess.run(
            command,
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=CHECK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SchemaError(f"{where}: the compiler took over {CHECK_TIMEOUT} s") from None
    except OSError as error:
        raise SchemaError(f"{where}: cannot be checked: running {binary} failed: {error}") from None
    if result.returncode:
        message = result.stderr.decode("utf-8", "replace").strip()
        message = _RELATIVE_LOCATION.sub(r"/\1:\2:", message)
        raise SchemaError(message or f"{where}: the compiler failed (exit status {result.returncode})")
    return _file_ids(result.stdout, imports)


def _file_ids(request: bytes, imports: Sequence[str]) -> dict[int, str]:
    """Node id -> real path of its file, for every file the compiler read and every node it
    reported, from its CodeGeneratorRequest (the compiler names a file by its path less the
    first "/", it being run from the root, or one found through an import directory by its
    path there)."""
    files: dict[int, str] = {}
    scopes: dict[int, int] = {}  # node id -> the node it is declared in
    with schema_nodes().CodeGeneratorRequest.from_bytes(
        request, traversal_limit_in_words=len(request)
    ) as parsed:
        for node in parsed.nodes:
            if node.which() != "file":
                scopes[int(node.id)] = int(node.scopeId)
                continue
            name = _text(node, "displayName")
            candidates = ["/" + name, *(os.path.join(directory, name) for directory in imports)]
            found = next((c for c in candidates if os.path.isfile(c)), None)
            if found is not None:
                files[int(node.id)] = os.path.realpath(found)
        for requested in parsed.requestedFiles:  # (its imports, used or not)
            requested_name = _text(requested, "filename")
            here = os.path.dirname("/" + requested_name)
            files.setdefault(int(requested.id), os.path.realpath("/" + requested_name))
            for imported in requested.imports:
                name = _text(imported, "name")
                if name.startswith("/"):
                    candidates = [os.path.join(directory, name[1:]) for directory in imports]
                else:
                    candidates = [os.path.join(here, name)]
                found = next((c for c in candidates if os.path.isfile(c)), None)
                if found is not None:
                    files.setdefault(int(imported.id), os.path.realpath(found))
    nodes = dict(files)
    for node_id in scopes:
        scope, depth = node_id, 0
        while scope in scopes and depth < len(scopes):
            scope, depth = scopes[scope], depth + 1
        if scope in files:
            nodes[node_id] = files[scope]
    return nodes


def _text(reader: Any, field: str) -> str:
    """A Text field of the compiler's request (a file name): a SchemaError if it is not
    UTF-8, which pycapnp cannot read either."""
    try:
        return str(getattr(reader, field))
    except UnicodeDecodeError as error:
        raise SchemaError(
            f"a schema file name that is not UTF-8 ({error.object!r}): rename the file"
        ) from None


_accepted: dict[int, str] = {}
"""Node id -> real path of the file that declares it, for every node a checked schema
brought in (imports included): what pycapnp's parser holds once it is loaded."""
_parsed_with: dict[str, frozenset[str]] = {}
"""Real path of every file pycapnp parsed -> the import directories it was parsed under."""
_modules: dict[str, Any] = {}
"""Real path of a file loaded -> its pycapnp module."""
_directories: list[str] = []
"""Every import directory a load named so far, in order: every load gets them all, so
that pycapnp (which names a file by its path in the first import directory holding it)
names each file the same way every time."""


def parse(path: str | os.PathLike[str], imports: Sequence[str]) -> Any:
    """``capnp.load`` of a user schema (its pycapnp module), guarded: checked by the
    compiler first (SchemaError), and never handed to pycapnp in a way that makes its parser
    abort the process. pycapnp knows a file by the import directory it was found through,
    and aborts on a second file with an id it has ("Duplicate ID"): so a file is parsed once
    (the same real path gives the module it gave before, symlinks and other import
    directories included), every load is given every import directory named so far, and a
    file whose ids another file declared, or one pycapnp would now find under another name,
    is a SchemaError."""
    import capnp

    for directory in imports:
        if os.path.abspath(directory) not in _directories:
            _directories.append(os.path.abspath(directory))
    real = os.path.realpath(os.fspath(path))
    known = _modules.get(real)
    if known is not None:
        return known
    own = _own_ids()
    nodes = check(path, _directories)
    directories = frozenset(_directories)
    for node_id, file in nodes.items():
        other = _accepted.get(node_id) or own.get(node_id)
        if other is not None and other != file:
            raise SchemaError(
                f"{file}: the id @{node_id:#x} is declared in {other} too: two schema files cannot"
                " share an id (give one a new one: capnp id), nor load a copy of capbus's own"
            )
        before = _parsed_with.get(file)
        if before is not None and any(
            file.startswith(d.rstrip(os.sep) + os.sep) for d in directories - before
        ):
            raise SchemaError(
                f"{file}: loaded before without an import directory that holds it, which this"
                " load names: pycapnp would take it for a second file. Name the same import"
                " directories from the first load on (capbus.load(..., imports=[...]))"
            )
    capnp.remove_import_hook()
    try:
        module = capnp.load(real, imports=list(_directories))
    except UnicodeDecodeError:  # (pycapnp reads every constant: the compiler allows any bytes)
        raise SchemaError(f"{real}: a Text constant in it is not UTF-8, which pycapnp cannot read") from None
    _accepted.update(nodes)
    for file in set(nodes.values()):
        _parsed_with.setdefault(file, directories)
    _modules[real] = module
    return module


@functools.cache
def _own_ids() -> dict[int, str]:
    """The file ids of capbus's own schemas (a user file with one would make pycapnp abort
    when capbus loads its own later): read from their id lines."""
    own: dict[int, str] = {}
    for directory, _, names in os.walk(schema_directory()):
        for name in names:
            if name.endswith(".capnp"):
                file = os.path.realpath(os.path.join(directory, name))
                with open(file, encoding="utf-8", errors="replace") as text:
                    found = re.search(r"^\s*@(0x[0-9a-fA-F]+)\s*;", text.read(), re.MULTILINE)
                if found:
                    own[int(found.group(1), 16)] = file
    return own
