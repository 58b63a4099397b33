"""tests/serving/echo_service.py's Echo served at tcp:127.0.0.1:0 in a process of its own
(attack review 15): ``python review15_echo_server.py``; prints the port, then serves."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

import capbus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from echo_service import Echo  # noqa: E402


async def main() -> None:
    async with capbus.serve(Echo(), "tcp:127.0.0.1:0") as service:
        print(service.address.port, flush=True)  # type: ignore[union-attr]
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
