"""An argv target that lies about its sandbox: it claims every layer is active. The
trusted start-up code must refuse a strict sandbox before this ever runs."""

import json
import os
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).parent))

import capbus  # noqa: E402
from capbus.sandbox import LAYERS  # noqa: E402


async def main() -> None:
    os.environ["CAPBUS_SANDBOX_REPORT"] = json.dumps({layer: "active" for layer in LAYERS})
    async with capbus.bootstrap() as boot:
        await boot.offer(secret=boot.get("secret"))
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
