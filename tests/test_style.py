"""The code stays ruff and mypy clean: checked here, so that CI gates it like any test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON_PATHS = ["capbus", "tests", "examples", "bench", "dev.py", "kernel/build.py"]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    result = run("ruff", "check", "--no-cache", *PYTHON_PATHS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_is_formatted() -> None:
    result = run("ruff", "format", "--check", "--no-cache", *PYTHON_PATHS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean(tmp_path: Path) -> None:
    result = run("mypy", "--cache-dir", str(tmp_path / "cache"), "capbus")
    assert result.returncode == 0, result.stdout + result.stderr
