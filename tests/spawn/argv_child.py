"""A program started by capbus.spawn from an argv: it gets its capabilities with
capbus.bootstrap() and offers a prober."""

import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).parent))

from children import Prober  # noqa: E402

import capbus  # noqa: E402


async def main() -> None:
    async with capbus.bootstrap() as boot:
        await boot.offer(prober=Prober(boot))
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
