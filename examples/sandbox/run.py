"""Runs the sandbox example: converts people.csv with an untrusted converter that holds only
an input fd and an Output capability.

    python examples/sandbox/run.py [file.csv]     (after `python3 dev.py demo` set up .venv)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import trio

import capbus
from capbus.rpc.vat import open_vat

HERE = Path(__file__).resolve().parent
schema: Any = capbus.load(HERE / "converter.capnp")


class Output(schema.Output.Server):  # type: ignore[misc,name-defined]
    """What the converter may do to this process: hand it lines and notes."""

    def __init__(self) -> None:
        self.closed = trio.Event()
        self.records = 0

    def write(self, line: str) -> None:
        print(line)

    def note(self, text: str) -> None:
        print(f"converter: {text}")

    def close(self, records: int) -> None:
        self.records = records
        self.closed.set()


async def main(csv_path: Path) -> int:
    output = Output()
    async with capbus.open_kernel() as kernel, await kernel.connect() as peer, open_vat(peer) as vat:
        with open(csv_path, "rb") as source:
            capabilities = {"input": source, "output": output}
            async with capbus.spawn(vat, "converter:main", code=[HERE], capabilities=capabilities) as child:
                report = child.sandbox_report
                active = [layer for layer, state in report.items() if state.startswith("active")]
                print(f"sandbox: {len(active)} of {len(report)} layers active: {', '.join(active)}")
                with trio.fail_after(30):
                    status = await child.wait()  # it exits when done (or fails)
        if not output.closed.is_set():
            print(f"the converter {child.describe_exit()} before it finished", file=sys.stderr)
            return 1
        print(f"converted {output.records} records; the converter {child.describe_exit()}")
    return status


if __name__ == "__main__":
    sys.exit(trio.run(main, Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "people.csv"))
