"""Where capbus's own schemas are: the package ``capbus.schemas`` (the top-level ``schemas/``
directory, which pyproject.toml installs under that name).

An interpreter that imports capbus straight from a checkout (PYTHONPATH, or another Python for
a spawned child) and not through the install cannot import ``capbus.schemas``: an editable
install maps it with an import hook that only the venv's own interpreter runs. Then the
directory named here (or the checkout's own ``schemas/`` beside the package) becomes
``capbus.schemas``. Standard library only: spawned children call this before anything else.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def schema_directory(fallback: str | None = None) -> str:
    """The directory of ``capbus.schemas``, registering ``fallback`` (or the checkout's
    ``schemas/``) under that name when this interpreter cannot import it."""
    spec = importlib.util.find_spec("capbus.schemas")
    if spec is not None and spec.submodule_search_locations:
        return str(list(spec.submodule_search_locations)[0])
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "schemas")
    for directory in (fallback, beside):
        init = os.path.join(directory or "", "__init__.py")
        if directory and os.path.isfile(init):
            found = importlib.util.spec_from_file_location(
                "capbus.schemas", init, submodule_search_locations=[directory]
            )
            assert found is not None and found.loader is not None
            module = importlib.util.module_from_spec(found)
            sys.modules["capbus.schemas"] = module
            found.loader.exec_module(module)
            return directory
    raise RuntimeError("capbus.schemas is not installed")
