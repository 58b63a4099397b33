"""examples/capability_graph.py, the docs' picture: run as a user would, it draws what it
says it built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_example_draws_its_bus(tmp_path: Path) -> None:
    output = tmp_path / "bus.dot"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "capability_graph.py"), "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("4 peers, 6 nodes, 13 handles")
    dot = output.read_text()
    assert dot.count("subgraph cluster_peer") == 4
    assert dot.count("->") == 7  # (13 handles, 6 of them the owners' own)
    assert "destroyed" in dot and "hold" in dot
