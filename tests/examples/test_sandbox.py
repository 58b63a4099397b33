"""The sandbox example: the converter does its job through its two capabilities, and
nothing else it tries gets through."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sandbox_example(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sandbox" / "run.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sandbox: 11 of 11 layers active: fds, rlimits, user_namespace")
    assert [json.loads(line)["name"] for line in lines[1:4]] == [
        "Ada Lovelace",
        "Grace Hopper",
        "Barbara Liskov",
    ]
    assert lines[4:7] == [
        "converter: open /etc/passwd: denied (No such file or directory)",
        "converter: open a TCP socket: denied (Address family not supported by protocol)",
        "converter: list /proc: denied (No such file or directory)",
    ]
    assert lines[7] == "converted 3 records; the converter exited with status 0"
