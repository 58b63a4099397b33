"""Where capbus's own files are, found without importing anything heavy: the spawned
child asks before its sandbox is up, when an import of the RPC layer would load schemas
and keep handles on host directories open."""

from __future__ import annotations

import importlib.util
import os

PACKAGE = os.path.dirname(os.path.abspath(__file__))


def schema_directory() -> str:
    """The directory of ``capbus.schemas`` (pyproject maps the top-level ``schemas/`` to it).

    An editable install exposes that mapping only through the import hook its ``.pth`` file
    installs, and ``.pth`` files run only for site directories: an interpreter that imports
    capbus from a source checkout by path (``PYTHONPATH``, ``-S``) has no ``capbus.schemas``.
    The checkout's ``schemas/``, beside the package, is then the one that belongs to it."""
    spec = importlib.util.find_spec("capbus.schemas")
    if spec is not None and spec.submodule_search_locations:
        return str(list(spec.submodule_search_locations)[0])
    beside = os.path.join(os.path.dirname(PACKAGE), "schemas")
    if os.path.isfile(os.path.join(beside, "capbus", "rpc.capnp")):
        return beside
    raise RuntimeError(f"capbus.schemas is not installed (and {beside} holds no capbus schemas)")


def package_directories() -> list[str]:
    """The directories capbus's own code and schemas are read from, wherever they are
    installed (an editable install's are not on ``sys.path``)."""
    return [PACKAGE, schema_directory()]
