"""Raw-frame fuzzing of a running kernel by real processes: hostile peers write generated and
mutated frames (commands with random fields, lying sizes, truncated, oversized, fds of every
kind attached) while an honest pair of peers keeps working. The honest pair must get every
reply and message in order, the kernel must survive (the sanitizer run of the suite runs this
against the ASan+UBSan build), and once the attackers are gone its counters must be back where
they were. CAPBUS_FUZZ_SEED and CAPBUS_FUZZ_FRAMES pick another seed and more frames."""

from __future__ import annotations

import os
import sys

import trio

import capbus
from capbus import _wire
from capbus.testing import wait_for_statistics

SEED = int(os.environ.get("CAPBUS_FUZZ_SEED", "20261205"))
FRAMES = int(os.environ.get("CAPBUS_FUZZ_FRAMES", "3000"))
ATTACKERS = 3
PEERS_EACH = 16  # an attacker cut off for malformed frames goes on with its next peer
TIMEOUT = 120

_ATTACKER = f"""
import fcntl, os, random, socket, struct, sys
FRAME = struct.Struct({_wire.FRAME.format!r})
SEND = struct.Struct({_wire.SEND.format!r})
COMMANDS = {[getattr(_wire, n) for n in dir(_wire) if n.startswith("CMD_")]!r}
CMD_SEND, CMD_NODE_CREATE = {_wire.CMD_SEND}, {_wire.CMD_NODE_CREATE}
FRAME_MAX, FDS_MAX = {_wire.FRAME_MAX}, {_wire.FDS_MAX}
spare = [socket.socket(fileno=int(fd)) for fd in sys.argv[1].split(",")]
sock = spare.pop()
rng = random.Random(int(sys.argv[2]))
frames = int(sys.argv[3])
handles = [rng.randrange(1 << 20) << 3 | 1 for _ in range(4)]  # forged, and learned below

def some_fds():
    kind = rng.randrange(7)
    fds = []
    for _ in range(rng.choice((0, 0, 1, 2, 8, FDS_MAX, FDS_MAX + 4))):
        if kind == 0:
            fds.append(os.open("/dev/null", os.O_RDONLY))
        elif kind == 1:
            r, w = os.pipe(); os.close(w); fds.append(r)
        elif kind in (2, 3):
            m = os.memfd_create("x", os.MFD_ALLOW_SEALING)
            os.write(m, b"payload" * rng.randrange(1, 50))
            if kind == 2:
                seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                fcntl.fcntl(m, fcntl.F_ADD_SEALS, seals)
            fds.append(m)
        elif kind == 4:
            a, b = socket.socketpair(); b.close(); fds.append(a.detach())
        elif kind == 5:
            fds.append(os.dup(sock.fileno()))
        else:
            fds.append(os.eventfd(0))
    return fds

def frame():
    command = rng.choice(COMMANDS + [0, 0x80, 0xFFFF])
    if command == CMD_SEND and rng.random() < 0.7:
        dests = [rng.choice(handles) for _ in range(rng.choice((1, 1, 2, 5)))]
        attached = [rng.choice(handles) for _ in range(rng.choice((0, 0, 1, 3)))]
        payload = rng.randbytes(rng.choice((0, 8, 100, 4096)))
        flags = rng.choice((0, 0, 1, 2, 3, 4))
        body = SEND.pack(len(dests), len(attached), 0, len(payload), rng.randrange(-5, 5), flags)
        body += struct.pack(f"<{{len(dests) + len(attached)}}Q", *dests, *attached) + payload
    else:
        body = rng.randbytes(rng.choice((0, 0, 8, 16, 24, 32, 64)))
        if body and rng.random() < 0.5:
            body = struct.pack("<Q", rng.choice(handles)) + body[8:]
    data = bytearray(FRAME.pack(FRAME.size + len(body), command, 0, rng.randrange(1 << 32)) + body)
    r = rng.random()
    # Unparseable frames are rarer: past 16 of them the kernel cuts a peer off.
    if r < 0.03 and data:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif r < 0.04:
        data = data[: rng.randrange(len(data) + 1)]
    elif r < 0.045:
        data += bytes(FRAME_MAX)
    elif r < 0.1:
        data[FRAME.size - 2 : FRAME.size] = struct.pack("<H", rng.randrange(1, 65536))  # cookie garbage
    return bytes(data)

def drain():
    while True:
        try:
            data = sock.recv(FRAME_MAX + 1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            return
        if not data:
            raise ConnectionResetError  # cut off (that is allowed): on to the next peer
        if len(data) >= FRAME.size + 8:  # learn real handle ids from NODE_CREATE replies
            size, kind, flags, cookie = FRAME.unpack_from(data)
            error, command = struct.unpack_from("<iI", data, FRAME.size)
            if command == CMD_NODE_CREATE and error == 0 and len(data) >= FRAME.size + 16:
                handles[rng.randrange(len(handles))] = struct.unpack_from("<Q", data, FRAME.size + 8)[0]

cut_off = 0
for index in range(frames):
    fds = some_fds()
    try:
        if fds:
            rights = struct.pack(f"{{len(fds)}}i", *fds)
            sock.sendmsg([frame()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        else:
            sock.send(frame())
        if index % 16 == 0:
            drain()
    except (BrokenPipeError, ConnectionResetError):
        cut_off += 1
        if not spare:
            break
        sock = spare.pop()
    except OSError:
        pass  # too many fds for Linux itself, or a frame too large for the socket
    finally:
        for fd in fds:
            os.close(fd)
print(index + 1, cut_off)
"""


async def test_hostile_frames_hurt_no_one(
    kernel: capbus.Kernel, new_peer: capbus.testing.PeerFactory
) -> None:
    sender, receiver = await new_peer(), await new_peer()
    inbox = await receiver.create_node()
    to_inbox = await receiver.transfer(inbox, sender)
    baseline = kernel.statistics()
    sent = received = 0

    async def honest(stop: trio.Event) -> None:
        nonlocal sent, received
        while not stop.is_set():
            node = await sender.create_node()
            await sender.send(to_inbox, sent.to_bytes(8, "little") + b"honest", handles=[node])
            sent += 1
            message = await receiver.recv()
            assert message.kind is capbus.MessageKind.DATA
            assert int.from_bytes(message.payload[:8], "little") == received, "lost or reordered"
            received += 1
            await receiver.release(message.handles[0])
            await sender.destroy(node, release=True)
            while True:  # the destroy and release notifications
                try:
                    receiver.recv_nowait()
                except trio.WouldBlock:
                    break

    with trio.fail_after(TIMEOUT):
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(honest, stop)
            sockets = [[kernel.socket_for_child() for _ in range(PEERS_EACH)] for _ in range(ATTACKERS)]
            written = []

            async def attack(index: int) -> None:
                fds = [s.fileno() for s in sockets[index]]
                done = await trio.run_process(
                    [
                        sys.executable,
                        "-c",
                        _ATTACKER,
                        ",".join(map(str, fds)),
                        str(SEED + index),
                        str(FRAMES),
                    ],
                    pass_fds=fds,
                    cwd="/",
                    capture_stdout=True,
                )
                written.append(tuple(map(int, done.stdout.split())))

            async with trio.open_nursery() as attackers:
                for index in range(ATTACKERS):
                    attackers.start_soon(attack, index)
            for group in sockets:
                for sock in group:
                    sock.close()
            stop.set()
    assert sent == received and sent > 0
    frames, cut_off = sum(w[0] for w in written), sum(w[1] for w in written)
    print(f"raw frames: seed {SEED}: {frames} frames, {cut_off} peers cut off; honest round trips: {sent}")
    assert frames >= ATTACKERS * FRAMES // 2, (
        f"only {frames} frames written: the attackers were cut off early"
    )
    with trio.fail_after(TIMEOUT):
        await wait_for_statistics(
            kernel,
            lambda s: (
                (s.peers, s.queued_messages, s.queued_fds, s.fds_in_flight, s.peers_stalled)
                == (baseline.peers, 0, 0, 0, 0)
                and s.fds_held == baseline.fds_held
            ),
        )
    stats = kernel.statistics()
    assert stats.violations > 0, "the attackers never got a frame refused: the fuzzer is not fuzzing"
