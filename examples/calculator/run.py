"""Runs the calculator example as two programs that meet at an address: the server serves a
calculator at ``unix:PATH`` (with a kernel of its own), the client connects there and holds
that one capability and nothing else. The same as, in two shells:

    .venv/bin/python examples/calculator/server.py unix:/tmp/calculator
    .venv/bin/python examples/calculator/client.py unix:/tmp/calculator

    python examples/calculator/run.py      (after `python3 dev.py demo` set up .venv)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from capbus.compiler import generate_file

HERE = Path(__file__).resolve().parent


async def main() -> int:
    # Typed stubs for the schema (deterministic, so regenerating is harmless).
    generate_file(HERE / "calculator.capnp", HERE / "calculator_capnp.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as directory:
        address = f"unix:{directory}/calculator"
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: trio.run_process(
                    [sys.executable, str(HERE / "server.py"), address],
                    stdout=subprocess.PIPE,
                    env=env,
                    check=False,
                    task_status=task_status,
                )
            )
            with trio.fail_after(30):  # its first line says it serves
                said = b""
                while not said.endswith(b"\n"):
                    chunk = await server.stdout.receive_some()
                    if not chunk:
                        raise RuntimeError("the calculator server exited before serving")
                    said += chunk
            print(said.decode().strip(), flush=True)
            with trio.fail_after(60):
                result = await trio.run_process(
                    [sys.executable, str(HERE / "client.py"), address], env=env, check=False
                )
            server.terminate()
    return result.returncode


if __name__ == "__main__":
    sys.exit(trio.run(main))
