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


_RELATIVE_LOCATION = re.compile(r"^(?!/)([^:\n]+\.capnp):(\d+)", re.MULTILINE)


def check(path: str | os.PathLike[str], imports: Sequence[str]) -> None:
    """Raises SchemaError unless the compiler accepts the schema at ``path`` (and what it
    imports, searched for in ``imports``); FileNotFoundError if there is no such file."""
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
        message = _RELATIVE_LOCATION.sub(r"/\1:\2", message)
        raise SchemaError(message or f"{where}: the compiler failed (exit status {result.returncode})")
    _check_ids(_file_ids(result.stdout, imports))


def _file_ids(request: bytes, imports: Sequence[str]) -> dict[int, str]:
    """File id -> path of every file the compiler read, from its CodeGeneratorRequest (the
    compiler names a file by its path less the first "/", it being run from the root, or
    one found through an import directory by its path there)."""
    files: dict[int, str] = {}
    with schema_nodes().CodeGeneratorRequest.from_bytes(
        request, traversal_limit_in_words=len(request)
    ) as parsed:
        for node in parsed.nodes:
            if node.which() != "file":
                continue
            name = str(node.displayName)
            candidates = ["/" + name, *(os.path.join(directory, name) for directory in imports)]
            found = next((c for c in candidates if os.path.isfile(c)), None)
            if found is not None:
                files[int(node.id)] = os.path.realpath(found)
    return files


def _check_ids(files: dict[int, str]) -> None:
    """Raises SchemaError if a file about to be loaded has the id of another file pycapnp
    has loaded already in this process (pycapnp aborts the process then)."""
    import capnp

    parser = getattr(capnp.lib.capnp, "_global_schema_parser", None)
    loaded = getattr(parser, "modules_by_id", None) or {}
    for file_id, path in files.items():
        module = loaded.get(file_id)
        other = getattr(module, "__file__", None)
        if other is not None and os.path.realpath(other) != path:
            raise SchemaError(
                f"{path}: its id @{file_id:#x} is the id of {other}, loaded already in this"
                " process: two schema files cannot share an id (make one a new one: capnp id)"
            )
