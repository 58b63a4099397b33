"""What tests of generated modules share: compiling a schema with ``capbus compile`` (a real
process) and importing the module it wrote."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType


def compile_and_import(schema: Path, tmp_path: Path) -> tuple[ModuleType, str]:
    """The generated module of ``schema`` (written into ``tmp_path``), and its source."""
    output = tmp_path / f"{schema.stem}_capnp.py"
    command = [sys.executable, "-m", "capbus", "compile", str(schema), "-o", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    spec = importlib.util.spec_from_file_location(output.stem, output)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, output.read_text()


def mypy_strict(tmp_path: Path, name: str, source: str) -> subprocess.CompletedProcess[str]:
    """``source`` written to ``tmp_path/name`` and checked by mypy --strict there (beside the
    generated modules it imports)."""
    (tmp_path / name).write_text(source)
    command = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), name]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)


def mypy_verdicts(tmp_path: Path, user: str, wrong: str, errors: int) -> str:
    """mypy --strict passes ``user`` and finds exactly ``errors`` errors in ``wrong`` (both
    sources beside the generated modules): returns what it said of ``wrong``."""
    checked = mypy_strict(tmp_path, "user.py", user)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    refused = mypy_strict(tmp_path, "wrong.py", wrong)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stdout.count("error:") == errors, refused.stdout
    return refused.stdout
