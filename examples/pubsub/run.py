"""Runs the pubsub example: a publisher process and three subscriber processes, each with
one peer; every subscriber must see the same events in the same order.

    python examples/pubsub/run.py      (after `python3 dev.py demo` set up .venv)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

import capbus
from capbus.compiler import generate_file

HERE = Path(__file__).resolve().parent
SUBSCRIBERS = 3
EVENTS_PER_TOPIC = 200


async def main() -> int:
    generate_file(HERE / "pubsub.capnp", HERE / "pubsub_capnp.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    python = sys.executable
    async with capbus.open_kernel() as kernel, await kernel.connect() as launcher:
        inbox = await launcher.create_node()
        publisher_socket = await launcher.create_peer(handles=[inbox])
        outputs: list[str] = []
        async with trio.open_nursery() as nursery:
            command = [python, str(HERE / "publisher.py"), str(publisher_socket.fileno()), str(SUBSCRIBERS)]
            publisher = await nursery.start(
                lambda task_status: trio.run_process(
                    [*command, str(EVENTS_PER_TOPIC)],
                    pass_fds=[publisher_socket.fileno()],
                    env=env,
                    check=False,
                    task_status=task_status,
                )
            )
            publisher_socket.close()
            with trio.fail_after(30):
                message = await launcher.recv()
            if message.kind is not capbus.MessageKind.DATA:
                raise RuntimeError("the publisher exited without handing in its capability")
            (publisher_handle,) = message.handles

            async def subscriber(name: str) -> None:
                sock = await launcher.create_peer(handles=[publisher_handle])
                with sock, trio.fail_after(60):
                    done = await trio.run_process(
                        [python, str(HERE / "subscriber.py"), str(sock.fileno()), name],
                        pass_fds=[sock.fileno()],
                        env=env,
                        capture_stdout=True,
                    )
                outputs.append(done.stdout.decode().strip())

            async with trio.open_nursery() as subscribers:
                for i in range(SUBSCRIBERS):
                    subscribers.start_soon(subscriber, f"subscriber {i}")
            publisher.terminate()
    for line in sorted(outputs):
        print(line)
    orders = {line.rsplit(" ", 1)[1] for line in outputs}
    if len(orders) == 1 and len(outputs) == SUBSCRIBERS:
        print(f"all {SUBSCRIBERS} subscribers saw the same order of {2 * EVENTS_PER_TOPIC} events")
        return 0
    print("subscribers disagree on the order!")
    return 1


if __name__ == "__main__":
    sys.exit(trio.run(main))
