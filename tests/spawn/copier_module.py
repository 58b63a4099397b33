"""A target given as a module alone: capbus.spawn runs its main()."""

from __future__ import annotations

import trio

import capbus


async def main(boot: capbus.Bootstrap) -> None:
    await boot.offer(sink=boot.get("sink"))  # hands back what it was given
    await trio.sleep_forever()
