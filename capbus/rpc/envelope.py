"""The RPC envelope schema (schemas/capbus/rpc.capnp), loaded once through pycapnp."""

from __future__ import annotations

from importlib import resources
from typing import Any

import capnp

capnp.remove_import_hook()  # capbus never wants pycapnp to hijack `import x_capnp`


def _load() -> Any:
    source = resources.files("capbus.schemas").joinpath("capbus/rpc.capnp")
    with resources.as_file(source) as path:
        return capnp.load(str(path), imports=[])


rpc: Any = _load()
"""The loaded schema module: ``rpc.Envelope``, ``rpc.Call``, ``rpc.Return``, ..."""
