"""capbus wherever it is installed: imported by path from a source checkout, and from an
installation under a directory only its owner may enter, with children started as another
user."""

from __future__ import annotations

import os
import subprocess
import sys

import trio

import capbus

FIND_SCHEMAS = """
import capbus.bootstrapping  # loads capbus's schemas, as a spawned child does
from capbus import _resources
print(_resources.schema_directory())
"""


def test_capbus_imported_by_path_finds_its_schemas() -> None:
    """Without site (``-S``), an editable install's import hook (run by its ``.pth`` file) is
    not there: capbus comes from its directory on ``PYTHONPATH`` and must still find the
    schemas that pyproject ships as ``capbus.schemas``."""
    here = os.path.dirname(os.path.dirname(capbus.__file__))
    dependencies = os.path.dirname(os.path.dirname(trio.__file__))
    done = subprocess.run(
        [sys.executable, "-S", "-P", "-c", FIND_SCHEMAS],
        env={"PYTHONPATH": os.pathsep.join([here, dependencies])},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.path.isfile(os.path.join(done.stdout.strip(), "capbus", "spawn.capnp"))
