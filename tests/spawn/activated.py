"""The child of the activation tests (test_activation.py): a Worker that remembers the order
of its calls, and one that crashes before it offers anything."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

import capbus

schema: Any = capbus.load(Path(__file__).with_name("activated.capnp"))


class Worker(schema.Worker.Server):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        self.order: list[int] = []
        self.retired = trio.Event()

    async def work(self, n: int) -> dict[str, Any]:
        self.order.append(n)
        return {"n": n, "pid": os.getpid(), "order": list(self.order)}

    async def retire(self) -> None:
        self.retired.set()


async def serve(boot: capbus.Bootstrap) -> None:
    worker = Worker()
    await boot.offer(worker=worker)
    await worker.retired.wait()  # (then exits: its answer to retire may be lost with it)


async def crash_on_start(boot: capbus.Bootstrap) -> None:
    raise RuntimeError("no configuration to start with")
