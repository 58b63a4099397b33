"""``capbus monitor``: watch a kernel daemon's traffic, one line per event, like
``busctl monitor``. The daemon trusts the caller to make a monitor node (root, or its own
uid); the monitor attaches through it and prints each record as it comes."""

from __future__ import annotations

import json
import os
import sys
from typing import TextIO

from .messages import MessageKind
from .peer import MonitorRecord, connect, decode_monitor_record

PREVIEW_BYTES = 48


def record_fields(record: MonitorRecord) -> dict[str, object]:
    """A record as plain data (the ``--json`` form)."""
    return {
        "seq": record.seq,
        "event": record.event.name,
        "uid": record.uid,
        "pid": record.pid,
        "destinations": record.n_destinations,
        "handles": record.n_handles,
        "fds": record.n_fds,
        "payload_size": record.payload_size,
        "payload_head": record.payload.hex(),
        "dropped": record.dropped,
    }


def record_line(record: MonitorRecord) -> str:
    """A record as one line for people."""
    head = record.payload[:PREVIEW_BYTES]
    preview = repr(head)[2:-1] + ("…" if record.payload_size > len(head) else "")
    what = "send" if record.event is MessageKind.DATA else "destroy"
    parts = [
        f"#{record.seq:<8}",
        f"{what:<7}",
        f"uid {record.uid:<6} pid {record.pid:<7}",
        f"-> {record.n_destinations} dest",
    ]
    if record.event is MessageKind.DATA:
        parts.append(f"{record.payload_size} B, {record.n_handles} handles, {record.n_fds} fds")
        parts.append(f"'{preview}'")
    if record.dropped:
        parts.append(f"({record.dropped} records lost so far)")
    return "  ".join(parts)


async def watch(path: str | os.PathLike[str], *, as_json: bool = False, out: TextIO = sys.stdout) -> None:
    """Prints every record of the daemon at ``path`` until cancelled."""
    async with await connect(path) as peer:
        monitor = await peer.create_monitor()
        await peer.attach_monitor(monitor)
        print(
            json.dumps({"monitoring": str(path)}) if as_json else f"monitoring {path}", file=out, flush=True
        )
        while True:
            message = await peer.recv()
            if message.kind is not MessageKind.MONITOR:
                continue
            record = decode_monitor_record(message)
            print(json.dumps(record_fields(record)) if as_json else record_line(record), file=out, flush=True)


def run(path: str, as_json: bool) -> int:
    """``capbus monitor``: exit status 1 with the reason when not allowed or not reachable."""
    from .introspection import run_tool

    async def watched() -> bool:
        await watch(path, as_json=as_json)
        return True

    try:
        return 0 if run_tool("monitor", path, watched, timeout=None) else 1
    except KeyboardInterrupt:
        return 0
