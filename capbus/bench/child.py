"""A contender's server or client process: ``python -m capbus.bench.child NAME serve|measure
CONFIG`` (CONFIG: JSON). A server prints ``ready`` once it serves; a client prints one JSON
line of results."""

from __future__ import annotations

import importlib
import json
import sys


def main(argv: list[str]) -> None:
    name, role, config = argv[0], argv[1], json.loads(argv[2])
    contender = importlib.import_module(f"capbus.bench.{name}")
    if role == "serve":
        contender.serve(config)
    else:
        print(json.dumps(contender.measure(config)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
