"""Runs the calculator example: an embedded kernel, the server and the client each in their
own process, each holding one peer and only the capabilities it was handed.

    python examples/calculator/run.py      (after `python3 dev.py demo` set up .venv)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

import capbus
from capbus.compiler import generate_file

HERE = Path(__file__).resolve().parent


async def main() -> int:
    # Typed stubs for the schema (deterministic, so regenerating is harmless).
    generate_file(HERE / "calculator.capnp", HERE / "calculator_capnp.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    async with capbus.open_kernel() as kernel, await kernel.connect() as launcher:
        inbox = await launcher.create_node()
        # The server's peer starts with one capability: where to hand in its calculator.
        server_socket = await launcher.create_peer(handles=[inbox])
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: trio.run_process(
                    [sys.executable, str(HERE / "server.py"), str(server_socket.fileno())],
                    pass_fds=[server_socket.fileno()],
                    env=env,
                    check=False,
                    task_status=task_status,
                )
            )
            server_socket.close()
            with trio.fail_after(30):
                message = await launcher.recv()
                if message.kind is not capbus.MessageKind.DATA:  # the server died before
                    raise RuntimeError("the calculator server exited without handing in its calculator")
                calculator = message.handles[0]
            # The client's peer starts with the calculator, and nothing else.
            client_socket = await launcher.create_peer(handles=[calculator])
            with trio.fail_after(60):
                result = await trio.run_process(
                    [sys.executable, str(HERE / "client.py"), str(client_socket.fileno())],
                    pass_fds=[client_socket.fileno()],
                    env=env,
                    check=False,
                )
            client_socket.close()
            server.terminate()
    return result.returncode


if __name__ == "__main__":
    sys.exit(trio.run(main))
