"""Attacks on the kernel from outside, second review (the linger, retry, fair-share and
charge-the-writer fixes), with real processes and real uids.

Each test reproduces one attack that works against the kernel as it is and fails until the
kernel is fixed; its docstring says the severity, the harm, how it is done and a suggested
fix. Every process of another uid is started through capbus.testing.as_user (other_uid.py),
so that the tests run from a checkout other uids cannot reach.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess

import trio

from .other_uid import daemon, needs_root, read_line, run_as, shared_directory

ATTACKER = 1001
BYSTANDER = 1002
ACCOMPLICE = 1003
TIMEOUT = 60


async def stop(process: trio.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    with trio.fail_after(TIMEOUT):
        await process.wait()


# A newcomer of its own uid: connects, asks who it is, prints "served" or why not.
_NEWCOMER = """
async def main(path):
    try:
        with trio.fail_after(20):
            peer = await capbus.connect_peer(path)
            await peer.info()
            await peer.aclose()
        print("served", flush=True)
    except (OSError, capbus.errors.CapbusError, trio.TooSlowError) as error:
        print(f"refused: {error!r}", flush=True)

trio.run(main, sys.argv[1])
"""


# -- a connection moved to its writer's uid is never checked against that uid's quotas -------

# Makes connections of its own uid, one at a time: each is taken by the kernel (a reply to
# PEER_QUERY), then handed over `channel` to the accomplice, which writes to it; goes on until
# the kernel refuses one. Prints how many it handed over.
_MAKER = """
from capbus import _wire

path, channel = sys.argv[1], socket.socket(fileno=int(sys.argv[2]))
made = 0
while made < 100000:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    try:
        sock.send(_wire.command(_wire.CMD_PEER_QUERY, 1))
        reply = sock.recv(4096)
    except (BrokenPipeError, ConnectionResetError):
        reply = b""
    if not reply:
        break  # refused: its uid's share of the kernel's fds is used up
    socket.send_fds(channel, [b"c"], [sock.fileno()])
    sock.close()
    if channel.recv(16) != b"k":
        break
    made += 1
print(made, flush=True)
sys.stdin.readline()
"""

# Takes the connections the maker hands over, writes one command to each (so that the kernel
# charges it to this uid) and keeps them all open.
_TAKER = """
from capbus import _wire

channel = socket.socket(fileno=int(sys.argv[1]))
kept = []
while True:
    message, fds, _, _ = socket.recv_fds(channel, 16, 1)
    if not message:
        break
    sock = socket.socket(fileno=fds[0])
    try:  # answered, or refused (a hang-up): either way the kernel has read it
        sock.send(_wire.command(_wire.CMD_PEER_QUERY, 2))
        sock.recv(4096)
    except (BrokenPipeError, ConnectionResetError):
        pass
    kept.append(sock)
    channel.send(b"k")
print(len(kept), flush=True)
sys.stdin.readline()
"""


async def test_two_uids_handing_connections_over_cannot_take_every_kernel_fd() -> None:
    """Severity high (any two uids that can reach the socket lock every other uid out of the
    daemon). A connection is charged to whichever uid writes to it, but the move
    (cb_peer_charge_to) checks nothing on the uid it moves to: neither peers_per_user nor
    its fair share of the kernel's held fds. So one uid makes connections and hands each to
    a process of a second uid, which writes one frame to it: the maker's share drops back to
    0 after every hand-over and its next connection always fits the fair-share rule (only
    its own share is compared), while the taker's share grows past every bound. The two
    take all of the kernel's fds but one: every other uid's connection is then refused
    (EDQUOT, 'its share of peers or of the kernel's fds is used up'). The same move with
    fds written into the moved peers' sockets takes the whole in-flight budget (fds to every
    other uid then wait for ever: below), and the taker's n_peers can pass peers_per_user.

    Fix: a move is a new charge for the uid moved to: check it (peers_per_user, the fair
    share of held fds and of fds in flight, user_handles, the backlog) as cb_peer_new and
    the sends would, and refuse the frame (EDQUOT, the connection stays charged to its
    former uid, or is disconnected) when it does not fit."""
    needs_root()
    with shared_directory() as where:
        async with daemon(where, fd_limit=512) as (path, kernel):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with ours, theirs:
                maker = await run_as(
                    ATTACKER, _MAKER, str(path), str(ours.fileno()), pass_fds=(ours.fileno(),)
                )
                taker = await run_as(ACCOMPLICE, _TAKER, str(theirs.fileno()), pass_fds=(theirs.fileno(),))
            try:
                with trio.fail_after(TIMEOUT):
                    made = int(await read_line(maker))
                    newcomer = await run_as(BYSTANDER, _NEWCOMER, str(path))
                    try:
                        verdict = await read_line(newcomer)
                    finally:
                        await stop(newcomer)
                assert verdict == "served", (
                    f"a third uid is locked out after {made} connections were made by uid {ATTACKER} "
                    f"and handed to uid {ACCOMPLICE}: {verdict}"
                )
            finally:
                await stop(maker)
                await stop(taker)


# -- handing a loaded connection to another uid makes that uid pay for what it holds ---------

# Makes `count` connections of its own uid, each holding as many nodes as one peer may have
# (handles_held), and hands them over `channel`. Prints how many handles it made.
_LOADER = """
from capbus import _wire

path, channel, count = sys.argv[1], socket.socket(fileno=int(sys.argv[2])), int(sys.argv[3])
made = 0
for _ in range(count):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    full = False
    while not full:
        for cookie in range(256):
            sock.send(_wire.command(_wire.CMD_NODE_CREATE, cookie + 1))
        for _ in range(256):
            reply = sock.recv(4096)
            error = _wire.REPLY.unpack_from(reply, _wire.FRAME.size)[0]
            if error == errno.EDQUOT:
                full = True
            else:
                assert error == 0, os.strerror(error)
                made += 1
    socket.send_fds(channel, [b"c"], [sock.fileno()])
    sock.close()
channel.close()
print(made, flush=True)
sys.stdin.readline()
"""

# The victim: a peer of its own, then one command on each connection it is given (a process
# using the connection its parent made for it); then whether its own peer can still make a
# node.
_USER = """
from capbus import _wire

async def main(path, channel):
    peer = await capbus.connect_peer(path)
    await peer.info()
    kept = []
    while True:
        message, fds, _, _ = socket.recv_fds(channel, 16, 1)
        if not message:
            break
        sock = socket.socket(fileno=fds[0])
        try:  # answered, or refused (a hang-up): either way the kernel has read it
            sock.send(_wire.command(_wire.CMD_PEER_QUERY, 1 << 40))
            while (data := sock.recv(4096)) and _wire.FRAME.unpack_from(data)[3] != 1 << 40:
                pass
        except (BrokenPipeError, ConnectionResetError):
            pass
        kept.append(sock)
    print(len(kept), flush=True)
    try:
        await peer.create_node()
        print("created", flush=True)
    except capbus.errors.CapbusError as error:
        print(f"refused: {error!r}", flush=True)
    await trio.wrap_file(sys.stdin).readline()

trio.run(main, sys.argv[1], socket.socket(fileno=int(sys.argv[2])))
"""


async def test_a_uid_given_connections_does_not_pay_for_the_handles_their_maker_made() -> None:
    """Severity medium (one uid disables another uid's peers, and sheds its own quota). When a
    connection moves to the uid that writes to it, everything its peer holds moves too
    (cb_peer_charge_to: its handles, its reply backlog, its fds in flight), unchecked. A
    parent that makes connections for children of another uid (capbus.spawn's way; the
    sandbox uid is often shared, e.g. 65534) fills each with 65,536 nodes (handles_held) and
    hands four of them over: as soon as the child writes its first frame, the child's uid
    holds 262,144 handles, its whole user_handles, and every peer of that uid is refused
    new nodes and every handle sent to it (EDQUOT) until the child disconnects them. The
    same with a 16 MiB reply backlog gates every peer of the receiving uid (user_backlog).
    Meanwhile the maker's uid is back at 0 handles and can do it again: with two uids of its
    own, an attacker piles up handles (kernel memory, ~150 B each) without bound.

    Fix: keep what a peer holds charged to the uid that made it (or check the move against
    the new uid's quotas and refuse it, keeping the charge where it was); only the
    connection's own cost should follow its writer."""
    needs_root()
    with shared_directory() as where:
        async with daemon(where, fd_limit=1024) as (path, kernel):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with ours, theirs:
                loader = await run_as(
                    ATTACKER, _LOADER, str(path), str(ours.fileno()), "4", pass_fds=(ours.fileno(),)
                )
                user = await run_as(
                    BYSTANDER, _USER, str(path), str(theirs.fileno()), pass_fds=(theirs.fileno(),)
                )
            try:
                with trio.fail_after(TIMEOUT):
                    made = int(await read_line(loader))
                    taken = int(await read_line(user))
                    verdict = await read_line(user)
                assert taken == 4
                assert verdict == "created", (
                    f"uid {BYSTANDER} wrote once to {taken} connections uid {ATTACKER} made with "
                    f"{made} handles, and now its own peer cannot make a node: {verdict}"
                )
            finally:
                await stop(loader)
                await stop(user)


# -- every retry round walks every lingering socket -----------------------------------------

# Leaves `count` sockets lingering in the kernel: raw peers, each with one fd written into its
# socket and never read, that ask to be disconnected and keep their end open. Prints how many
# lingered.
_LINGERER = """
from capbus import _wire

async def main(path, count):
    sender = await capbus.connect_peer(path)
    key = await sender._peer_key()
    null = os.open("/dev/null", os.O_RDONLY)
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        socks.append(sock)
    for sock in socks:
        sock.send(_wire.command(_wire.CMD_NODE_CREATE, 1))
    for sock in socks:
        node = struct.unpack_from("<Q", sock.recv(4096), 24)[0]
        sock.send(_wire.command(_wire.CMD_HANDLE_TRANSFER, 2, _wire.TRANSFER.pack(node, key)))
    ids = [struct.unpack_from("<Q", sock.recv(4096), 24)[0] for sock in socks]
    for start in range(0, len(ids), _wire.DESTINATIONS_MAX):
        await sender.send(ids[start : start + _wire.DESTINATIONS_MAX], b"", fds=[null])
    for sock in socks:
        select.select([sock], [], [])  # the message (and its fd) is in the socket: not read
        sock.send(_wire.command(_wire.CMD_DISCONNECT, 3))
    for sock in socks:
        poller = select.poll()
        poller.register(sock, select.POLLRDHUP)
        poller.poll()  # the kernel shut its end down: lingering
    print(len(socks), flush=True)
    await trio.wrap_file(sys.stdin).readline()

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""


def _largest_round(trace: str) -> tuple[int, int]:
    """The most SIOCOUTQ ioctls (strace: TIOCOUTQ) between two epoll_waits of one thread in an strace log, and
    how many epoll_waits returned."""
    largest, rounds, current = 0, 0, {}
    for line in trace.splitlines():
        tid = line.split()[0]
        if "epoll_wait(" in line or "epoll_wait resumed" in line:
            if "resumed" in line or "unfinished" not in line:
                rounds += 1
                largest = max(largest, current.get(tid, 0))
                current[tid] = 0
        elif "OUTQ" in line:  # SIOCOUTQ, which strace calls TIOCOUTQ (the same number)
            current[tid] = current.get(tid, 0) + 1
    return max([largest, *current.values()]), rounds


async def test_a_retry_round_does_not_walk_every_lingering_socket() -> None:
    """Severity medium (CPU and latency for every uid; scales with the fd limit). A
    disconnected peer's socket lingers until the fds in it are read, and the attacker, who
    holds the other end, never reads them: it lingers for ever. While anything lingers the
    loop runs a global retry round (every 128 ms when idle, every 1-2 ms as soon as anyone's
    messages move: retry_ms drops back to 1), and each round (cb_linger_reap) ioctls every
    lingering socket, unbatched, with the loop's lock held: the very O(all) walk the retry
    queues (retry.c: per-item backoff, at most 256 per round) were made to end for stalled
    peers and fd holders. One uid may have its fair share of the kernel's held fds lingering
    (one fd each in flight): ~230,000 sockets for a daemon with RLIMIT_NOFILE 524288, so
    ~230,000 system calls per round, a round per millisecond while others work; every other
    peer's request waits behind each round. Shown here with 1,000: one wakeup does 1,000
    SIOCOUTQ ioctls.

    Fix: put lingering sockets on a cb_retry_queue of their own (per-item backoff, at most
    RETRY_BATCH per round), as the fd holders are; the gated-peer walk in retry_others has
    the same shape."""
    needs_root()
    assert shutil.which("strace"), "this test counts the kernel's system calls with strace"
    count = 1000
    with shared_directory() as where:
        async with daemon(where, fd_limit=4096) as (path, kernel):
            attacker = await run_as(ATTACKER, _LINGERER, str(path), str(count))
            try:
                with trio.fail_after(TIMEOUT):
                    assert int(await read_line(attacker)) == count
                trace_path = where / "trace"
                tids = sorted(os.listdir(f"/proc/{kernel.pid}/task"))
                strace = await trio.lowlevel.open_process(
                    ["strace", "-qq", "-f", "-e", "trace=ioctl,epoll_wait", "-o", str(trace_path)]
                    + [arg for tid in tids for arg in ("-p", tid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    # Idle, the kernel still wakes up for a retry round every 128 ms at most:
                    # wait for a few of them.
                    with trio.fail_after(TIMEOUT):
                        while True:
                            text = trace_path.read_text() if trace_path.exists() else ""
                            largest, rounds = _largest_round(text)
                            if rounds >= 4:
                                break
                            await trio.sleep(0.05)
                finally:
                    strace.terminate()  # detaches from the kernel cleanly
                    with trio.fail_after(TIMEOUT):
                        await strace.wait()
                assert largest <= 256, (
                    f"one wakeup of the kernel did {largest} SIOCOUTQ ioctls ({count} sockets lingering)"
                )
            finally:
                await stop(attacker)


# -- the same hand-over takes the kernel's whole in-flight fd budget ------------------------

# Fills raw peers of its own uid with fds they never read (4 x 64 each, as many as one socket
# takes), handing each over `channel` to the accomplice (_TAKER) once its fds were sent.
_FILLER = """
from capbus import _wire

async def main(path, channel, count):
    sender = await capbus.connect_peer(path)
    key = await sender._peer_key()
    null = [os.open("/dev/null", os.O_RDONLY) for _ in range(64)]
    accepted = 0
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        sock.send(_wire.command(_wire.CMD_NODE_CREATE, 1))
        node = struct.unpack_from("<Q", sock.recv(4096), 24)[0]
        sock.send(_wire.command(_wire.CMD_HANDLE_TRANSFER, 2, _wire.TRANSFER.pack(node, key)))
        target = struct.unpack_from("<Q", sock.recv(4096), 24)[0]
        for _ in range(4):
            try:
                await sender.send(target, b"parked", fds=null)
            except capbus.errors.QuotaExceeded:
                break  # its share of held fds: the rest of the kernel's is someone else's
            accepted += 64
        # What did not fit is queued, and follows the connection to its new uid.
        socket.send_fds(channel, [b"c"], [sock.fileno()])
        if channel.recv(16) != b"k":
            break
    print(accepted, flush=True)
    await trio.wrap_file(sys.stdin).readline()

trio.run(main, sys.argv[1], socket.socket(fileno=int(sys.argv[2])), int(sys.argv[3]))
"""

# _TAKER, reading nothing of what is in the sockets it is given: it waits for the reply to
# its frame to be queued behind them (the bytes unread in the socket grow).
_QUIET_TAKER = """
import fcntl, termios
from capbus import _wire

def unread(sock):
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\\0" * 4))[0]

channel = socket.socket(fileno=int(sys.argv[1]))
kept = []
while True:
    message, fds, _, _ = socket.recv_fds(channel, 16, 1)
    if not message:
        break
    sock = socket.socket(fileno=fds[0])
    before = unread(sock)
    try:
        sock.send(_wire.command(_wire.CMD_PEER_QUERY, 2))
        while unread(sock) == before:
            time.sleep(0.001)  # the kernel answers within its next wakeup
    except (BrokenPipeError, ConnectionResetError):
        pass
    kept.append(sock)
    channel.send(b"k")
print(len(kept), flush=True)
sys.stdin.readline()
"""

# A uid's own fds through the kernel: 64 to itself; prints how many arrived within 10 s (far
# more than a delivery takes, on any machine) or "stalled".
_FDS_TO_SELF = """
async def main(path):
    peer = await capbus.connect_peer(path)
    inbox = await peer.create_node()
    await peer.send(inbox, b"fds", fds=[os.open("/dev/null", os.O_RDONLY) for _ in range(64)])
    with trio.move_on_after(10):
        message = await peer.recv()
        print(len(message.fds), flush=True)
        return
    print("stalled", flush=True)

trio.run(main, sys.argv[1])
"""


async def test_two_uids_handing_connections_over_cannot_take_every_fd_in_flight() -> None:
    """Severity high (every other uid's fd deliveries wait for ever). The move of a connection
    to its writer's uid carries the fds unread in its socket (fds_in_flight) to that uid,
    unchecked, as the previous test's move carries its socket. A uid fills a peer's socket
    with 256 fds it never reads and hands the connection to a process of a second uid, which
    writes one frame: its in-flight share is back to 0 and the next fds fit again. Six
    rounds take 832 of the kernel's 896 (RLIMIT_NOFILE 1024; one uid alone stops at about
    half), and the rest of what the attacker sent waits queued, held. A third uid's message
    of 64 fds then waits in its queue for ever (a retry every 128 ms finds no room): fds
    through the kernel no longer work for anyone else; the messages are accepted and never
    delivered.

    Fix: as for the socket: check a move against the new uid's fair share of fds in flight
    (and held), or leave the fds in flight charged to the uid whose peer they were written
    to until they are read."""
    needs_root()
    with shared_directory() as where:
        async with daemon(where, fd_limit=1024) as (path, kernel):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with ours, theirs:
                filler = await run_as(
                    ATTACKER, _FILLER, str(path), str(ours.fileno()), "6", pass_fds=(ours.fileno(),)
                )
                taker = await run_as(
                    ACCOMPLICE, _QUIET_TAKER, str(theirs.fileno()), pass_fds=(theirs.fileno(),)
                )
            try:
                with trio.fail_after(TIMEOUT):
                    accepted = int(await read_line(filler))
                    bystander = await run_as(BYSTANDER, _FDS_TO_SELF, str(path))
                    try:
                        arrived = await read_line(bystander)
                    finally:
                        await stop(bystander)
                assert arrived == "64", (
                    f"uid {BYSTANDER}'s 64 fds to itself did not arrive ({arrived}) once uid {ATTACKER} "
                    f"had sent {accepted} fds to 6 connections it handed to uid {ACCOMPLICE}"
                )
            finally:
                await stop(filler)
                await stop(taker)
