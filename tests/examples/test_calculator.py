"""The calculator example runs across processes and prints the right results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_calculator_example(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "calculator" / "run.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "123 = 123.0",
        "45 (pipelined) = 45.0",
        "123 + 45 = 168.0",
        "f(12, 34) = 1234.0",
        "2 ** 10 (called back) = 1024.0",
    ]
