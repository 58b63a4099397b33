"""The calculator example runs as two programs that meet at an address (unix: through its
launcher; tcp: started one after the other, as from two shells), and prints the right
results."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from capbus.compiler import generate_file

CALCULATOR = Path(__file__).resolve().parents[2] / "examples" / "calculator"
RESULTS = [
    "123 = 123.0",
    "45 (pipelined) = 45.0",
    "123 + 45 = 168.0",
    "f(12, 34) = 1234.0",
    "2 ** 10 (called back) = 1024.0",
]


def test_calculator_example(run_example: Callable[[str], list[str]]) -> None:
    said = run_example("calculator")
    assert said[0].startswith("serving a calculator at unix:/") and said[0].endswith("/calculator")
    assert said[1:] == RESULTS


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_server_and_client_started_as_two_programs(tmp_path: Path, kind: str) -> None:
    """``server.py ADDRESS`` in one shell, ``client.py ADDRESS`` in another: the same code
    over the bus (unix:) and over Cap'n Proto's RPC protocol (tcp:)."""
    generate_file(CALCULATOR / "calculator.capnp", CALCULATOR / "calculator_capnp.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CALCULATOR), os.environ.get("PYTHONPATH", "")])}
    address = "tcp:127.0.0.1:0" if kind == "tcp" else f"unix:{tmp_path}/calculator"
    server = subprocess.Popen(
        [sys.executable, str(CALCULATOR / "server.py"), address],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert server.stdout is not None
        first = server.stdout.readline().strip()  # "serving a calculator at ADDRESS"
        assert first.startswith(f"serving a calculator at {kind}:"), first
        where = first.rpartition(" at ")[2]
        client = subprocess.run(
            [sys.executable, str(CALCULATOR / "client.py"), where],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.splitlines() == RESULTS
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0  # (a clean stop on SIGTERM)
