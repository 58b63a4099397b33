"""The child bench/spawn.py starts: offers a Bench object (bench/rpc_bench.capnp)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

import capbus

schema: Any = capbus.load(Path(__file__).with_name("rpc_bench.capnp"))


class Bench(schema.Bench.Server):  # type: ignore[misc,name-defined]
    def echo(self, text: str) -> str:
        return text


async def main(boot: capbus.Bootstrap) -> None:
    await boot.offer(bench=Bench())
    await trio.sleep_forever()
