"""The untrusted part: converts CSV to JSON lines. It runs in a strict sandbox and holds
two capabilities, an open input file (an fd) and an Output object of its parent; it
cannot open files, make sockets or see other processes. It tries, and reports."""

from __future__ import annotations

import csv
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import capbus

schema: Any = capbus.load(Path(__file__).with_name("converter.capnp"))


def attempt(what: str, action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as error:
        return f"{what}: denied ({os.strerror(error.errno or 0)})"
    return f"{what}: ALLOWED"


async def main(boot: capbus.Bootstrap) -> None:
    output = boot.get("output", schema.Output)
    records = 0
    with open(boot.fd("input").detach(), newline="") as source:
        for row in csv.DictReader(source):
            await output.write(line=json.dumps(row))
            records += 1
    await output.note(text=attempt("open /etc/passwd", lambda: open("/etc/passwd")))
    await output.note(text=attempt("open a TCP socket", lambda: socket.socket(socket.AF_INET)))
    await output.note(text=attempt("list /proc", lambda: os.listdir("/proc")))
    await output.close(records=records)
