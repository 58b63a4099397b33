"""The pubsub example: three subscriber processes see the same order of events."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pubsub_example(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pubsub" / "run.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "all 3 subscribers saw the same order of 400 events"
    digests = {line.rsplit(" ", 1)[1] for line in lines[:-1]}
    assert len(lines) == 4 and len(digests) == 1
    assert all(": 400 events, order " in line for line in lines[:-1])
