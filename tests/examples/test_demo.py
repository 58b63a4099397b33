"""The demo (``python3 dev.py demo``: examples/demo.py) shows what capbus is for: typed
stubs compiled from a schema, a sandboxed child holding one capability, a call pipelined
on a promise, a capability passed back and called; and examples/peers.py, the layer
below."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, cwd: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [line.strip() for line in result.stdout.splitlines()]


def test_the_demo_shows_rpc_and_the_sandbox(tmp_path: Path) -> None:
    lines = _run("demo.py", tmp_path)
    said = [re.sub(r"\s*\|\s*", " | ", line, count=1) for line in lines]
    assert said[0].startswith("compile | notes.capnp -> notes_capnp.py")
    assert re.fullmatch(r"spawn \| worker \(pid \d+\) in a sandbox: 12 of 12 layers active", said[2])
    assert (
        "notebook | page('from the sandbox'): a new Page, sent back as a capability (a bus1 handle)" in said
    )
    pipelined = "page | 'from the sandbox'.write('written through a promise, before the page existed here')"
    assert pipelined in said
    assert "page | 'from the sandbox'.write('open /etc/passwd: denied (No such file or directory)')" in said
    assert any(
        s.startswith("notebook | called it back across the sandbox: read() -> ['a line the worker")
        for s in said
    )
    assert "worker | exited with status 0" in said


def test_the_peer_example_passes_a_handle_and_a_file(tmp_path: Path) -> None:
    lines = _run("peers.py", tmp_path)
    assert "printer: the file says b'a document only the printer may read\\n'" in lines
    assert lines[-2] == "client: send after destroy fails: NodeDestroyed (errno 113)"
