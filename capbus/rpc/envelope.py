"""The RPC envelope schema (schemas/capbus/rpc.capnp), loaded once through pycapnp."""

from __future__ import annotations

import os
from typing import Any

import capnp

from .._resources import schema_directory

capnp.remove_import_hook()  # capbus never wants pycapnp to hijack `import x_capnp`


def import_path() -> list[str]:
    """Directories every capbus schema load searches: capbus's own schemas ("/capbus/...")
    and Cap'n Proto's standard ones ("/capnp/stream.capnp", which ``-> stream`` needs),
    which pycapnp ships inside its package."""
    return [schema_directory(), os.path.dirname(os.path.dirname(capnp.__file__))]


def _load(name: str) -> Any:
    return capnp.load(os.path.join(schema_directory(), "capbus", name), imports=[schema_directory()])


rpc: Any = _load("rpc.capnp")
"""The loaded schema module: ``rpc.Envelope``, ``rpc.Call``, ``rpc.Return``, ..."""

fd: Any = _load("fd.capnp")
FD_STRUCT_ID: int = fd.Fd.schema.node.id
