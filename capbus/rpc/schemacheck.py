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

from .._resources import schema_directory

CHECK_TIMEOUT = 60
"""Seconds the compiler may take on one file (a schema cannot make it loop; a huge one is slow)."""


class SchemaError(Exception):
    """A schema the Cap'n Proto compiler refused: its message, one line per error
    (``/whole/path.capnp:LINE:COLUMN: error: ...``)."""


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
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
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
