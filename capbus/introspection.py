"""``capbus status``: what a kernel holds right now, like ``busctl status``: its peers (uid,
pid, nodes, handles, queue depth and quota use, traffic), the use of each uid against the
kernel's limits, and the kernel's totals. The data is a :class:`~capbus.snapshot.Snapshot`
(one instant of the global order); this module fetches it from a kernel at a path and
turns it into text or JSON.

Trust is the monitor's: the kernel answers only a peer holding a handle to a live monitor
node, which only root and the kernel's own uid can make (docs/peer-api.md "Monitoring").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Awaitable, Callable
from enum import IntFlag
from typing import TextIO, TypeVar

from .errors import CapbusError, NotPermitted
from .peer import connect
from .snapshot import PeerStatus, Snapshot

T = TypeVar("T")


async def take_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """A snapshot of the kernel at ``path``, without the peer that took it. Raises
    :class:`~capbus.errors.NotPermitted` for a user the kernel does not trust to watch."""
    async with await connect(path) as peer:
        monitor = await peer.create_monitor()
        return (await peer.snapshot(monitor)).others()


def process_name(pid: int) -> str:
    """The command name of ``pid`` as this process sees it ("" if it cannot): for people
    only, since the kernel's pid namespace may not be ours and pids are reused. Any process
    may name itself anything (its /proc/self/comm): what is not printable is shown as "?",
    so that a name cannot write to the operator's terminal, nor break an SVG."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as comm:
            name = comm.read().strip()
    except OSError:
        return ""
    return printable(name)


def printable(text: str) -> str:
    """``text`` with what is not printable (escapes, newlines) shown as "?"."""
    return "".join(c if c.isprintable() else "?" for c in text)


def size(n: int) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 16 MiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            if unit == "B":
                return f"{n} B"
            return f"{value:.1f} {unit}".replace(".0 ", " ")
        value /= 1024
    raise AssertionError("unreachable")


def flag_names(flags: IntFlag) -> list[str]:
    return [
        member.name.lower().replace("_", "-") for member in type(flags) if member in flags and member.name
    ]


def _peer_row(peer: PeerStatus, snapshot: Snapshot) -> list[str]:
    limits = snapshot.limits
    return [
        str(peer.serial),
        str(peer.uid),
        str(peer.pid),
        process_name(peer.pid) or "-",
        str(peer.nodes),
        str(peer.handles),
        str(peer.queued),
        f"{peer.queued_messages}/{limits.peer_messages}",
        f"{size(peer.queued_bytes)}/{size(limits.peer_bytes)}",
        f"{peer.sent_messages} ({size(peer.sent_bytes)})",
        f"{peer.received_messages} ({size(peer.received_bytes)})",
        ",".join(flag_names(peer.flags)) or "-",
    ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def status_text(snapshot: Snapshot, where: str) -> str:
    """What ``capbus status`` prints."""
    limits = snapshot.limits
    handles = len(snapshot.handles)
    lines = [
        f"kernel {printable(where)}: seq {snapshot.seq}, {len(snapshot.peers)} peers, "
        f"{len(snapshot.nodes)} nodes, {handles} handles, {size(snapshot.memory_bytes)} of kernel memory",
        f"messages: {snapshot.messages_sent} queued, {snapshot.messages_written} written; "
        f"{snapshot.violations} malformed frames, {snapshot.peers_doomed} peers cut off, "
        f"{snapshot.connections_refused} connections refused",
        f"fds: {snapshot.fds_held} of {snapshot.fds_held_max} held, "
        f"{snapshot.fds_in_flight} of {snapshot.fds_in_flight_max} in flight",
        "",
    ]
    peers = sorted(snapshot.peers.values(), key=lambda p: p.serial)
    lines += _table(
        [
            "PEER",
            "UID",
            "PID",
            "PROCESS",
            "NODES",
            "HANDLES",
            "QUEUED",
            "QUOTA",
            "BYTES",
            "SENT",
            "RECEIVED",
            "FLAGS",
        ],
        [_peer_row(peer, snapshot) for peer in peers],
    )
    lines.append("")
    users = sorted(snapshot.users.values(), key=lambda u: u.uid)
    lines += _table(
        ["UID", "PEERS", "QUEUED BYTES", "HANDLES", "FDS HELD", "FDS IN FLIGHT", "BACKLOG"],
        [
            [
                str(user.uid),
                f"{user.peers}/{limits.peers_per_user}",
                f"{size(user.queued_bytes)}/{size(limits.user_bytes)}",
                f"{user.handles}/{limits.user_handles}",
                str(user.fds_held),
                str(user.fds_in_flight),
                f"{size(user.backlog_bytes)}/{size(limits.user_backlog)}",
            ]
            for user in users
        ],
    )
    return "\n".join(lines) + "\n"


def status_fields(snapshot: Snapshot) -> dict[str, object]:
    """The ``--json`` form: the snapshot as plain data, flags as lists of names, and each
    peer's process name as this process sees it."""

    def plain(value: object) -> object:
        if isinstance(value, IntFlag):
            return flag_names(value)
        if isinstance(value, dict):
            return [plain(v) for v in value.values()]
        if isinstance(value, list):
            return [plain(v) for v in value]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, PeerStatus):
                fields["process"] = process_name(value.pid)
            return fields
        return value

    fields = plain(snapshot)
    assert isinstance(fields, dict)
    return fields


DEFAULT_TIMEOUT = 10.0


def run_tool(
    name: str,
    path: str,
    action: Callable[[], Awaitable[T]],
    err: TextIO = sys.stderr,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> T | None:
    """Runs a tool's trio ``action`` against the kernel at ``path`` within ``timeout``
    seconds (None: no bound); says what went wrong on ``err`` (None then): not trusted, not
    reachable, gone, or not answering."""
    import trio

    async def bounded() -> T:
        with trio.fail_after(math.inf if timeout is None else timeout):
            return await action()

    try:
        return trio.run(bounded)
    except trio.TooSlowError:
        print(f"capbus {name}: the kernel at {path} did not answer within {timeout:g} s", file=err)
    except NotPermitted:
        print(
            f"capbus {name}: the kernel at {path} does not trust this user to watch it "
            "(root or the kernel's own uid may)",
            file=err,
        )
    except (CapbusError, OSError) as error:
        print(f"capbus {name}: {path}: {error}", file=err)
    return None


def run(path: str, as_json: bool, out: TextIO = sys.stdout, timeout: float = DEFAULT_TIMEOUT) -> int:
    """``capbus status``: exit status 1 with the reason when not allowed or not reachable."""
    snapshot = run_tool("status", path, lambda: take_snapshot(path), timeout=timeout)
    if snapshot is None:
        return 1
    if as_json:
        print(json.dumps({"kernel": path, **status_fields(snapshot)}, indent=1), file=out)
    else:
        out.write(status_text(snapshot, path))
    return 0
