"""What one hostile uid can make the kernel hold, at every bound at once (issue 9, F3).

An embedded kernel (default limits; the fd budget from this process's RLIMIT_NOFILE) listens
on a path. An attacker process running as another uid, with raw frames, takes all it can:
peers until the kernel refuses them, nodes until EDQUOT, replies it never reads until the
kernel stops reading its peers, payload queued to its own peers that never read until
EDQUOT, and fd-carrying messages until EDQUOT. Then this process (root, another uid)
checks that it is still served, and the table shows the kernel's own counts and this
process's resident memory, before and after. Needs root (the attacker runs as uid 1001).

    .venv/bin/python bench/uid_bound.py          # ~1 min
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import trio

import capbus
from capbus import _wire

ATTACKER = 1001


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


_ATTACK = f"""
import errno, os, socket, struct, sys
FRAME = struct.Struct({_wire.FRAME.format!r})
REPLY = struct.Struct({_wire.REPLY.format!r})
SEND = struct.Struct({_wire.SEND.format!r})
U64 = struct.Struct("<Q")
NODE_CREATE, SEND_CMD = {_wire.CMD_NODE_CREATE}, {_wire.CMD_SEND}
QUERY, REPLY_FRAME = {_wire.CMD_PEER_QUERY}, {_wire.FRAME_REPLY}
PAYLOAD_MAX = {_wire.PAYLOAD_MAX}
path = sys.argv[1]

def frame(kind, cookie, body=b""):
    return FRAME.pack(FRAME.size + len(body), kind, 0, cookie) + body

def reply(sock):
    while True:
        data = sock.recv(1 << 18)
        if not data:
            raise ConnectionError
        if FRAME.unpack_from(data)[1] == REPLY_FRAME:
            return REPLY.unpack_from(data, FRAME.size)[0], data[FRAME.size + REPLY.size:]

peers = []
while True:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    try:
        sock.send(frame(QUERY, 1))
        reply(sock)
    except (ConnectionError, OSError):
        sock.close()
        break
    peers.append(sock)
print("peers", len(peers), flush=True)

# Payload and fds first (the node flood below fills the uid's handles, transfers too):
# peer 0 sends to one node of each of 64 other peers, which never read.
peers[0].send(frame(QUERY, 2))
_, body = reply(peers[0])
key = body[:16]
targets = []
for sock in peers[1:65]:
    sock.send(frame(NODE_CREATE, 6))
    error, body = reply(sock)
    if error:
        break
    sock.send(frame({_wire.CMD_HANDLE_TRANSFER}, 3, struct.pack("<Q16s", U64.unpack_from(body)[0], key)))
    error, body = reply(sock)
    if not error:
        targets.append(U64.unpack_from(body)[0])

def send(destination, payload, fds=()):
    body = SEND.pack(1, 0, len(fds), len(payload), 0, 0) + U64.pack(destination) + payload
    data = frame(SEND_CMD, 4, body)
    if fds:
        rights = struct.pack(f"{{len(fds)}}i", *fds)
        peers[0].sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
    else:
        peers[0].send(data)
    error, body = reply(peers[0])
    if error:
        return error
    return struct.unpack_from("<II i", body)[2]

payload = b"x" * PAYLOAD_MAX
queued = 0
for target in targets:
    while send(target, payload) == 0:
        queued += 1
print("payload", queued * PAYLOAD_MAX, flush=True)

null = [os.open("/dev/null", os.O_RDONLY) for _ in range(64)]
fd_messages = 0
for target in targets:
    while send(target, b"fds", null) == 0:
        fd_messages += 1
print("fds", fd_messages * 64, flush=True)

nodes = []  # (peer index, node id)
full = False
while not full:
    for index, sock in enumerate(peers):
        for cookie in range(32):
            sock.send(frame(NODE_CREATE, cookie))
        for cookie in range(32):
            error, body = reply(sock)
            if error:
                full = True
            else:
                nodes.append((index, U64.unpack_from(body)[0]))
        if full:
            break
print("nodes", len(nodes) + 2 * len(targets), flush=True)

# Replies never read: each peer writes queries until its socket is full, twice over.
for sock in peers:
    sock.setblocking(False)
written = 0
for _ in range(2):
    for sock in peers:
        while True:
            try:
                sock.send(frame(QUERY, 5))
                written += 1
            except BlockingIOError:
                break
print("queries", written, flush=True)
sys.stdin.readline()
"""


async def main(args: argparse.Namespace) -> None:
    assert os.geteuid() == 0, "run as root: the attacker runs as another uid"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    where = Path(tempfile.mkdtemp(prefix="capbus-bound-"))
    where.chmod(0o777)
    path = where / "bus"
    rss_before = rss_bytes()
    async with capbus.open_kernel(listen=path, mode=0o666) as kernel:
        before = kernel.statistics()
        started = time.monotonic()
        attacker = await trio.lowlevel.open_process(
            [sys.executable, "-c", textwrap.dedent(_ATTACK), str(path)],
            user=ATTACKER,
            group=ATTACKER,
            extra_groups=[],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd="/",
        )
        assert attacker.stdout is not None and attacker.stdin is not None
        got: dict[str, int] = {}
        buffer = b""
        while "queries" not in got:
            chunk = await attacker.stdout.receive_some(4096)
            if not chunk:
                raise SystemExit(f"the attacker ended early: {got}")
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                name, value = line.decode().split()
                got[name] = int(value)
                print(f"attacker: {name} {int(value):,}", file=sys.stderr, flush=True)
        # Let the kernel read what it will of the queries, then look.
        await trio.sleep(args.settle)
        during = kernel.statistics()
        rss_during = rss_bytes()
        # Another uid is still served: a node, a message with an fd, its reply.
        peer = await kernel.connect()
        inbox = await peer.create_node()
        t0 = time.perf_counter()
        await peer.send(inbox, b"still served", fds=[0])
        message = await peer.recv()
        served_us = (time.perf_counter() - t0) * 1e6
        message.close_fds()
        await peer.aclose()
        await attacker.stdin.send_all(b"done\n")
        await attacker.wait()
        elapsed = time.monotonic() - started

    print(f"RLIMIT_NOFILE {soft}/{hard}; attack took {elapsed:.1f} s\n")
    print("| what one uid got | count | bound |")
    print("|---|---:|---|")
    print(f"| peers | {got['peers']:,} | fair share of {during.fds_held_max:,} held fds |")
    print(f"| nodes (owner handles) | {got['nodes']:,} | user_handles {capbus.Limits().user_handles:,} |")
    print(f"| payload bytes queued | {got['payload']:,} | user_bytes {capbus.Limits().user_bytes:,} |")
    print(f"| fds queued | {got['fds']:,} | fair share of held fds |")
    print(
        f"| queries written, replies never read | {got['queries']:,} "
        f"| user_backlog {capbus.Limits().user_backlog:,} B |"
    )
    print()
    print("| kernel | before | under attack |")
    print("|---|---:|---:|")
    for name in ("peers", "nodes", "handles", "queued_bytes", "fds_held", "fds_in_flight", "memory_bytes"):
        print(f"| {name} | {getattr(before, name):,} | {getattr(during, name):,} |")
    print(f"| process RSS | {rss_before:,} | {rss_during:,} |")
    print(f"\nanother uid still served: node, send with an fd, receive: {served_us:.0f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settle", type=float, default=1.0, help="seconds for the kernel to take the flood")
    trio.run(main, parser.parse_args())
