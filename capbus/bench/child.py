"""A contender's server, subscribers or client process: ``python -m capbus.bench.child NAME
serve|subscribe|measure CONFIG`` (CONFIG: JSON). A server or the subscribers print ``ready``
once they serve; a client prints one JSON line of results."""

from __future__ import annotations

import importlib
import json
import sys


def main(argv: list[str]) -> None:
    name, role, config = argv[0], argv[1], json.loads(argv[2])
    contender = importlib.import_module(f"capbus.bench.{name}")
    if role == "measure":
        print(json.dumps(contender.measure(config)), flush=True)
    else:
        getattr(contender, role)(config)


if __name__ == "__main__":
    main(sys.argv[1:])
