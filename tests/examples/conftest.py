from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_example(tmp_path: Path) -> Callable[[str], list[str]]:
    """Runs examples/NAME/run.py as a user would (from outside the source tree); returns
    its output lines, after checking it succeeded."""

    def run(name: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, str(ROOT / "examples" / name / "run.py")],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.splitlines()

    return run
