"""Attacks on the kernel from outside, with real processes and real uids (review of the fd
budgets, the reply backlog, half-close and the listen socket).

Each test reproduces one attack that works against the kernel as it is and fails until the
kernel is fixed; its docstring says what the harm is and how it is done. The kernel must
treat every peer as hostile: a precise error to the offending peer only, everyone else keeps
being served, nothing accepted for delivery is lost, and one uid cannot exhaust resources for
others.

Two of the attacks are memory-safety bugs (a use after free). A normal build does not show
them: glibc leaves the freed memory looking alive enough. So those tests run the daemon with a
small preloaded ``free`` (compiled here) that zero-fills whatever the kernel frees and never
reuses it, which makes a use after free visible (a crash) and a double free fatal. Under
``dev.py test --sanitize`` AddressSanitizer does the same job and the shim is not used.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from capbus._kernel import lib

import capbus
from capbus import _wire
from capbus.testing import as_user, wait_for_statistics

from .other_uid import daemon, needs_root, read_line, run_as, shared_directory

ATTACKER = 1001
INNOCENT = 1002
BYSTANDER = 1003
FD_LIMIT = 1024
FDS = 64
TIMEOUT = 30
SANITIZED = os.environ.get("CAPBUS_SANITIZED") == "1"


# A free() for the kernel's own frees: the block is zero-filled and never reused, and a second
# free of it aborts. What the kernel reads from a block it freed is then zeros (a NULL
# kernel pointer, a peer that looks unused), as it would be with an allocator that does not
# scribble on freed memory, instead of glibc's leftovers that happen to look alive.
_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SLOTS (1u << 20)
static void *freed[SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

void free(void *p)
{
    static void (*real_free)(void *);
    Dl_info info;
    if (!real_free)
        real_free = (void (*)(void *))dlsym(RTLD_NEXT, "free");
    if (!p)
        return;
    if (!dladdr(__builtin_return_address(0), &info) || !info.dli_fname ||
        !strstr(info.dli_fname, "capbus/_kernel")) {
        real_free(p);
        return;
    }
    pthread_mutex_lock(&lock);
    size_t i = ((uintptr_t)p >> 4) & (SLOTS - 1);
    while (freed[i]) {
        if (freed[i] == p) {
            static const char message[] = "capbus kernel: double free\n";
            if (write(2, message, sizeof(message) - 1) < 0) {
            }
            abort();
        }
        i = (i + 1) & (SLOTS - 1);
    }
    freed[i] = p;
    pthread_mutex_unlock(&lock);
    memset(p, 0, malloc_usable_size(p));
}
"""


@pytest.fixture(scope="module")
def freed_memory_shows() -> Iterator[dict[str, str]]:
    """The environment for a daemon in which the kernel's use of freed memory shows."""
    if SANITIZED:
        yield {}  # AddressSanitizer is preloaded already (dev.py test --sanitize)
        return
    where = Path(tempfile.mkdtemp(prefix="capbus-shim-"))
    try:
        where.chmod(0o755)
        (where / "shim.c").write_text(_SHIM)
        subprocess.run(
            ["gcc", "-O1", "-shared", "-fPIC", "-o", str(where / "shim.so"), str(where / "shim.c"), "-ldl"],
            check=True,
        )
        (where / "shim.so").chmod(0o755)
        yield {"LD_PRELOAD": str(where / "shim.so")}
    finally:
        subprocess.run(["rm", "-rf", str(where)], check=False)


def adopt(kernel: capbus.Kernel, uid: int) -> socket.socket:
    """A new peer of the embedded kernel, charged to ``uid`` as a connection it made would be."""
    theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), uid, uid, 0) == 0
    return theirs


def raw_reply(sock: socket.socket) -> bytes:
    """The body of the next reply on a raw peer socket (after struct capbus_reply)."""
    while True:
        data = sock.recv(_wire.FRAME_MAX + 1)
        assert data, "the kernel hung up"
        if _wire.FRAME.unpack_from(data)[1] == _wire.FRAME_REPLY:
            error = _wire.REPLY.unpack_from(data, _wire.FRAME.size)[0]
            assert error == 0, os.strerror(error)
            return data[_wire.FRAME.size + _wire.REPLY.size :]


async def assert_serves(path: Path, process: trio.Process) -> None:
    """The daemon is alive and answers a newcomer."""
    try:
        with trio.fail_after(TIMEOUT):
            peer = await capbus.connect_peer(path)
            try:
                await peer.info()
            finally:
                await peer.aclose()
    except OSError as error:
        with trio.move_on_after(TIMEOUT):
            await process.wait()
        raise AssertionError(
            f"the kernel no longer serves ({error}); it exited with {process.returncode}"
        ) from None
    assert process.poll() is None, f"the kernel died ({process.returncode})"


# -- in-flight fds forgotten at disconnect -----------------------------------------------------

# Parks fds in the kernel's name: a raw peer gets 4 x 64 fds written into its socket (never
# read), then asks the kernel to disconnect it, and keeps its end of the socket open. Prints
# how many cycles it did, then waits until told to stop.
_PARKER = """
import os, select, socket, struct, sys, trio, capbus
from capbus import _wire

async def main(path, cycles):
    sender = await capbus.connect_peer(path)
    key = await sender._peer_key()
    null = [os.open("/dev/null", os.O_RDONLY) for _ in range(64)]
    parked = []
    for cycle in range(cycles):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        sock.send(_wire.command(_wire.CMD_NODE_CREATE, 1))
        node = struct.unpack_from("<Q", sock.recv(4096), 24)[0]
        sock.send(_wire.command(_wire.CMD_HANDLE_TRANSFER, 2, _wire.TRANSFER.pack(node, key)))
        target = struct.unpack_from("<Q", sock.recv(4096), 24)[0]
        try:
            for _ in range(4):  # CB_SOCKET_FDS_MAX: written at once, none queued
                await sender.send(target, b"parked", fds=null)
        except capbus.QuotaExceeded:
            break  # Linux refuses the kernel's writes already
        sock.send(_wire.command(_wire.CMD_DISCONNECT, 3))
        # The kernel closes its end (and its fds_in_flight forgets these); ours stays open,
        # unread. Wait (a while at most) until it has, so that the next cycle finds the
        # kernel's count back at 0.
        poller = select.poll()
        poller.register(sock, select.POLLRDHUP)
        for _ in range(20):
            if any(events & (select.POLLHUP | select.POLLRDHUP) for _, events in poller.poll(100)):
                break
        parked.append(sock)
    print(len(parked), flush=True)
    await trio.wrap_file(sys.stdin).readline()

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""

# One fd to itself, through the kernel; prints how many fds arrived, or "lost".
_ONE_FD_TO_SELF = """
import os, sys, trio, capbus

async def main(path):
    peer = await capbus.connect_peer(path)
    inbox = await peer.create_node()
    await peer.send(inbox, b"fd", fds=[os.open("/dev/null", os.O_RDONLY)])
    with trio.move_on_after(float(sys.argv[2])):
        message = await peer.recv()
        print(len(message.fds), flush=True)
        return
    print("lost", flush=True)

trio.run(main, sys.argv[1])
"""


async def test_fds_unread_in_a_peer_the_kernel_disconnected_still_count() -> None:
    """Severity high. When the kernel disconnects a peer (DISCONNECT, violations), it counts
    the fds still unread in that peer's socket as landed ("closing the socket freed whatever
    fds were still unread in it"). It did not: closing the kernel's end leaves the frames in
    the other end's receive queue, readable and in flight, for as long as that process keeps
    its end open, and Linux keeps charging them to the kernel's uid (RLIMIT_NOFILE,
    ETOOMANYREFS). So an unprivileged uid parks 256 fds per cycle (a peer it asks to be
    disconnected, its end kept open, never read) while the kernel's own fds_in_flight says 0:
    after RLIMIT_NOFILE/256 cycles (4 for a 1024-fd daemon) every fd-carrying write of the
    kernel fails, and every other uid's message with an fd is accepted and never delivered.

    Fix: keep counting those fds until they are really gone: keep the kernel's end open
    (shut down, out of epoll, charged to the peer's uid as a held fd and its fds as in flight)
    until SIOCOUTQ says the other end read or closed, then close it."""
    needs_root()
    with shared_directory() as where:
        async with daemon(where) as (path, kernel):
            # 4 x 256 fds reach the 1024 Linux allows the kernel's uid in flight; 6 to be sure.
            attacker = await run_as(ATTACKER, _PARKER, str(path), "6")
            with trio.fail_after(TIMEOUT):
                parked = int(await read_line(attacker))
            assert parked >= 1, "the attacker could not even send"
            innocent = await run_as(INNOCENT, _ONE_FD_TO_SELF, str(path), "10")
            with trio.fail_after(TIMEOUT):
                got = await read_line(innocent)
            assert got == "1", (
                f"another uid's accepted message with one fd was not delivered ({got}) while the "
                f"attacker keeps {parked} disconnected peers' sockets unread"
            )
            assert attacker.stdin is not None
            await attacker.stdin.send_all(b"done\n")
            with trio.fail_after(TIMEOUT):
                await attacker.wait()
            await assert_serves(path, kernel)


# -- use after free: a uid freed under cb_send ----------------------------------------------

# Writes one SEND carrying one fd to a handle it does not hold, on a peer socket someone else
# made (the spawning model: a parent hands a child of another uid its connection). Prints
# the reply's per-destination error, or "hung up".
_SEND_TO_NOWHERE = """
import os, socket, struct, sys
from capbus import _wire

sock = socket.socket(fileno=int(sys.argv[1]))
sock.settimeout(20)
body = _wire.SEND.pack(1, 0, 1, 0, 0, 0) + struct.pack("<Q", (0x1234 << 3) | 3)
sock.sendmsg([_wire.command(_wire.CMD_SEND, 7, body)],
             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", os.open("/dev/null", os.O_RDONLY)))])
data = sock.recv(65536)
if not data:
    print("hung up", flush=True)
else:
    print(struct.unpack_from("<i", data, 24 + 8)[0], flush=True)
"""


async def test_a_send_from_a_uid_without_peers_does_not_free_that_uid_in_use(
    freed_memory_shows: dict[str, str],
) -> None:
    """Severity high (memory safety). cb_send looks up the writer's uid record (from
    SCM_CREDENTIALS), makes the message hold it for its fds, and at the end drops the
    message and then calls cb_user_put_if_unused on the record. When no destination took
    the message and that uid has no peer of its own, dropping the message already freed the
    record (cb_message_unref -> cb_user_put_if_unused): the second call reads freed memory
    (AddressSanitizer: heap-use-after-free, quota.c cb_user_put_if_unused from message.c
    cb_send), and with an allocator that leaves the freed block as it was, it removes a map
    entry and frees the block again. Any process can trigger it: write a SEND with one fd to a
    handle id it does not hold, on a connection made by another uid (every spawned child of
    another user does exactly this on the connection its parent made).

    Fix: in cb_send, drop the message after the last use of `user` (or take a reference on
    the user for the duration of the call)."""
    needs_root()
    with shared_directory() as where:
        async with daemon(where, env=freed_memory_shows) as (path, kernel):
            # A connection of uid 0, used by a process of uid 1002, which has no peer.
            parent = await capbus.connect_peer(path)
            sock = parent.detach()
            with sock, trio.fail_after(TIMEOUT):
                child = await run_as(
                    INNOCENT, _SEND_TO_NOWHERE, str(sock.fileno()), pass_fds=(sock.fileno(),)
                )
                result = await read_line(child)
            assert result == str(6), (
                f"ENXIO expected for the destination, got {result} (did the kernel crash?)"
            )
            await assert_serves(path, kernel)


# -- use after free: a peer freed by the retry, then used by the same wakeup -------------------


def stopped(pid: int) -> bool:
    """Whether every thread of the process is stopped (SIGSTOP took effect)."""
    tasks = os.listdir(f"/proc/{pid}/task")
    return all(
        Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for t in tasks
    )


async def test_a_peer_freed_by_a_retry_is_not_used_by_the_same_wakeup(
    freed_memory_shows: dict[str, str],
) -> None:
    """Severity high (memory safety). capbus_kernel_run takes a batch of epoll events, then
    runs the retry round if it is due, then handles the events. The retry round flushes the
    stalled peers and settles: a stalled peer whose process has gone fails its write (EPIPE),
    is doomed and freed right there, and then its own hang-up event from the same batch is
    handled through the freed pointer (AddressSanitizer: heap-use-after-free at
    loop.c `peer->fd < 0 || peer->doomed`, freed by cb_peer_disconnect from retry). Any uid
    can get its peers stalled (more than 256 fds sent to a peer that does not read) and then
    close them; a busy kernel has a retry due at nearly every wakeup, so the race is easy to
    win by repetition. Here the kernel is frozen (SIGSTOP) while the stalled peers close and
    the retry falls due, which makes the race certain.

    Fix: run the retry round before epoll_wait (or after the events), or let the retry only
    doom peers and disconnect them after the batch."""
    needs_root()
    with shared_directory() as where:
        # As root with 4096 fds: room in flight for every stalled peer's first 256 fds.
        async with daemon(where, user=None, fd_limit=4096, env=freed_memory_shows) as (path, kernel):
            sender = await capbus.connect_peer(path)
            key = await sender._peer_key()
            null = [os.open("/dev/null", os.O_RDONLY) for _ in range(FDS)]
            stalled = []
            try:
                with trio.fail_after(TIMEOUT):
                    for _ in range(3):
                        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                        sock.connect(str(path))
                        sock.send(_wire.command(_wire.CMD_NODE_CREATE, 1))
                        node = _wire.U64.unpack_from(raw_reply(sock))[0]
                        sock.send(_wire.command(_wire.CMD_HANDLE_TRANSFER, 2, _wire.TRANSFER.pack(node, key)))
                        target = _wire.U64.unpack_from(raw_reply(sock))[0]
                        # Four fill its socket's share of unread fds; the fifth waits: stalled.
                        for _ in range(5):
                            await sender.send(target, b"x", fds=null)
                        stalled.append(sock)
            finally:
                for fd in null:
                    os.close(fd)
            kernel.send_signal(signal.SIGSTOP)
            with trio.fail_after(TIMEOUT):
                while not stopped(kernel.pid):
                    await trio.sleep(0.001)
            for sock in stalled:
                sock.close()  # hang-up events wait for the kernel; its flush of them will fail
            # Not a synchronisation: the frozen kernel's retry timer (at most 128 ms) must be
            # past due when it wakes, so that the retry and the hang-ups meet in one wakeup.
            time.sleep(0.3)
            kernel.send_signal(signal.SIGCONT)
            await assert_serves(path, kernel)
            with trio.fail_after(TIMEOUT):
                assert (await sender.info()).uid == 0


# -- a child of another uid is charged to its parent's uid -------------------------------------

# A hostile child: on the connection its parent made for it, it creates `count` peers (charged
# to the parent's uid) and floods each with commands whose replies it never reads. With a count
# of 0, it floods the connections it was given instead.
_FLOODING_CHILD = """
import select, socket, sys, trio, capbus
from capbus import _wire

async def main(count, *fds):
    if count:
        control = capbus.Peer.from_socket(socket.socket(fileno=fds[0]))
        socks = [await control.create_peer() for _ in range(count)]
    else:
        socks = [socket.socket(fileno=fd) for fd in fds]
    frame = _wire.command(_wire.CMD_PEER_QUERY, 1)
    for sock in socks:
        sock.setblocking(False)
    print("ready", flush=True)
    await trio.wrap_file(sys.stdin).readline()
    while True:
        for sock in socks:
            while True:
                try:
                    sock.send(frame)
                except BlockingIOError:
                    break
        await trio.sleep(0.001)

trio.run(main, *map(int, sys.argv[1:]))
"""


async def _parents_uid_still_served(
    kernel: capbus.Kernel, parent: capbus.Peer, sibling: capbus.Peer, child: trio.Process, what: str
) -> None:
    """Lets the flooding child go, until its unread replies are past a uid's backlog bound;
    then the parent's uid must still be served."""
    try:
        with trio.fail_after(TIMEOUT):
            assert await read_line(child) == "ready"
            before = kernel.statistics().memory_bytes
            assert child.stdin is not None
            await child.stdin.send_all(b"flood\n")
            # Its peers' unread replies are past the backlog bound of a uid (the kernel
            # stops reading a uid only once it is past, by at least one reply).
            await wait_for_statistics(
                kernel, lambda s: s.memory_bytes - before > lib.CAPBUS_DEFAULT_USER_BACKLOG
            )
        with trio.move_on_after(10) as waited:
            assert (await parent.info()).uid == 0
            assert (await sibling.info()).uid == 0
        assert not waited.cancelled_caught, f"{what} stopped every peer of the parent's uid being served"
    finally:
        child.kill()
        with trio.fail_after(TIMEOUT):
            await child.wait()
        await parent.aclose()
        await sibling.aclose()


async def test_a_child_of_another_uid_cannot_stop_its_parents_uid_being_served() -> None:
    """Severity high for the spawning model. A peer belongs to the uid that made it, so a
    connection a parent makes (PEER_CREATE, socket_for_child) and hands to a child running as
    another uid (capbus.spawn(user=...)) is charged to the parent's uid, and so is every
    peer the child creates from it. The child then spends its parent's uid: here it creates
    24 peers and floods them with commands whose replies it never reads; past user_backlog
    (16 MiB) every peer of the parent's uid stops being read, the parent's own peers and all
    its other children included, for as long as the child likes. The same way a child uses
    up its parent's user_handles (262,144 nodes from four peers: the parent can create no
    node), its peers_per_user and its fair share of the kernel's fds (the parent can spawn no
    one), and its share of fds in flight (peers that do not read).

    Fix: charge what a connection costs to the uid that uses it, not to the one that made
    it: PEER_CREATE to the uid of the process that wrote the command (its SCM_CREDENTIALS),
    and a created or adopted peer's backlog, handles and in-flight fds to the uid that
    writes to it (or give each created peer a share of its own)."""
    needs_root()
    async with capbus.open_kernel() as kernel:
        parent = await kernel.connect()
        sibling = await kernel.connect()
        connection = await parent.create_peer(b"child")
        with connection:
            child = await run_as(
                ATTACKER, _FLOODING_CHILD, "24", str(connection.fileno()), pass_fds=(connection.fileno(),)
            )
        await _parents_uid_still_served(kernel, parent, sibling, child, "a child running as another uid")


async def test_children_of_another_uid_cannot_stop_their_parents_uid_on_the_connections_it_made() -> None:
    """The same attack without PEER_CREATE: a parent spawns 24 children as another uid, each
    with a connection the parent made (PEER_CREATE, socket_for_child), and they flood those
    connections with commands whose replies they never read. Each connection's backlog is
    bounded (1 MiB), but 17 of them are past the parent's uid's user_backlog (16 MiB) if
    they are charged to the uid that made them: then no peer of the parent's uid is read.
    A connection is charged to the uid that writes to it, from its first frame."""
    needs_root()
    async with capbus.open_kernel() as kernel:
        parent = await kernel.connect()
        sibling = await kernel.connect()
        connections = [await parent.create_peer(b"child") for _ in range(12)]
        connections += [kernel.socket_for_child() for _ in range(12)]
        try:
            child = await run_as(
                ATTACKER,
                _FLOODING_CHILD,
                "0",
                *(str(c.fileno()) for c in connections),
                pass_fds=tuple(c.fileno() for c in connections),
            )
        finally:
            for connection in connections:
                connection.close()
        await _parents_uid_still_served(kernel, parent, sibling, child, "children running as another uid")


# -- receivers that do not read spend their sender's kernel-wide budgets ------------------------

# The attacker: on connections charged to its uid, creates a node each and gives a handle to
# it to the server (as a subscriber would); prints the handle ids in the server, then never
# reads anything.
_SUBSCRIBER = """
import socket, struct, sys, trio, capbus
from capbus import _wire

async def main(key, *fds):
    ids, socks = [], []
    for fd in fds:
        sock = socket.socket(fileno=int(fd))
        socks.append(sock)  # kept open (and never read) until told to stop
        sock.send(_wire.command(_wire.CMD_NODE_CREATE, 1))
        node = struct.unpack_from("<Q", sock.recv(4096), 24)[0]
        sock.send(_wire.command(_wire.CMD_HANDLE_TRANSFER, 2, _wire.TRANSFER.pack(node, bytes.fromhex(key))))
        ids.append(struct.unpack_from("<Q", sock.recv(4096), 24)[0])
    print(",".join(map(str, ids)), flush=True)
    await trio.wrap_file(sys.stdin).readline()

trio.run(main, *sys.argv[1:])
"""

# The server, as another uid: sends to each subscriber until that subscriber's queue is full
# (EDQUOT for it), then sends one message to an innocent client. Prints how that went.
_SERVER = """
import os, socket, sys, trio, capbus

async def main(fd, subscribers, client, n_fds, size):
    peer = capbus.Peer.from_socket(socket.socket(fileno=int(fd)))
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(int(n_fds))]
    payload = b"x" * int(size)
    for target in map(int, subscribers.split(",")):
        while True:
            try:
                await peer.send(target, payload, fds=fds)
            except capbus.QuotaExceeded:
                break  # that subscriber does not read: the kernel pushes back
    try:
        await peer.send(int(client), b"for the client", fds=fds[:1])
        print("sent", flush=True)
    except capbus.CapbusError as error:
        print(type(error).__name__, flush=True)

trio.run(main, *sys.argv[1:])
"""


async def _server_serves_client_despite_subscribers(
    kernel: capbus.Kernel, subscribers: int, n_fds: int, size: int
) -> None:
    server = capbus.Peer.from_socket(adopt(kernel, INNOCENT))
    client = await kernel.connect()
    try:
        inbox = await client.create_node()
        to_client = await client.transfer(inbox, server)
        key = await server._peer_key()
        server_sock = server.detach()
        attacker_socks = [adopt(kernel, ATTACKER) for _ in range(subscribers)]
        attacker = await run_as(
            ATTACKER,
            _SUBSCRIBER,
            key.hex(),
            *(str(s.fileno()) for s in attacker_socks),
            pass_fds=tuple(s.fileno() for s in attacker_socks),
        )
        for sock in attacker_socks:
            sock.close()
        try:
            with trio.fail_after(TIMEOUT):
                targets = await read_line(attacker)
            with server_sock, trio.fail_after(TIMEOUT):
                server_process = await run_as(
                    INNOCENT,
                    _SERVER,
                    str(server_sock.fileno()),
                    targets,
                    str(int(to_client)),
                    str(n_fds),
                    str(size),
                    pass_fds=(server_sock.fileno(),),
                )
                result = await read_line(server_process)
            assert result == "sent", (
                f"uid {INNOCENT} could not send to an innocent client ({result}): {subscribers} peers of "
                f"uid {ATTACKER} that never read hold its kernel-wide budget"
            )
            with trio.fail_after(TIMEOUT):
                message = await client.recv()
            assert message.payload == b"for the client"
            message.close_fds()
        finally:
            attacker.kill()
            with trio.fail_after(TIMEOUT):
                await attacker.wait()
    finally:
        await client.aclose()


async def test_receivers_that_never_read_cannot_spend_their_senders_fd_budget() -> None:
    """Severity medium-high. Queued fds are held by the kernel and charged to the sending
    uid's kernel-wide fair share of held fds, until written. A receiver decides when they
    are written: 8 peers of an attacker uid that "subscribe" to a server of another uid and
    never read keep, each, half of its peer_fds (128 fds) of the server's queued fds; with a
    1024-fd kernel that is the server's whole share (about 310), and the server can no longer
    send a single fd to anyone (EDQUOT for every send, before acceptance). The attacker pays
    8 sockets. bus1 charges what is queued to the receiving side; here one receiving uid
    should at most take its fair share of what a sender may have queued.

    Fix: split each sender uid's kernel-wide budgets between receiving uids by the same fair
    share (a receiving uid pins at most half of what the sender has left), or charge queued
    fds to the receiver's uid."""
    needs_root()
    async with capbus.open_kernel(limits=capbus.Limits(kernel_fds=FD_LIMIT)) as kernel:
        await _server_serves_client_despite_subscribers(kernel, subscribers=8, n_fds=1, size=0)


async def test_receivers_that_never_read_cannot_spend_their_senders_user_bytes() -> None:
    """Severity medium-high. The same with payload bytes: each receiving peer takes at most
    half of its peer_bytes (4 MiB) from one sending uid, but the sending uid's kernel-wide
    user_bytes (64 MiB) is spent by any 17 such peers of an attacker uid that never read;
    then the server (another uid) cannot send a single byte to anyone. The attacker pays 20
    sockets; the kernel holds 64 MiB for it, charged to its victim.

    Fix: as above (user_bytes shared fairly between receiving uids)."""
    needs_root()
    async with capbus.open_kernel() as kernel:
        await _server_serves_client_despite_subscribers(
            kernel, subscribers=20, n_fds=0, size=lib.CAPBUS_PAYLOAD_MAX
        )


# -- the retry round scans every stalled peer and fd holder, as often as anything moves ------


def _thread_cpu_seconds(tid: int) -> float:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_stalled_peers_of_one_uid_do_not_make_every_retry_round_expensive() -> None:
    """Severity medium (CPU and latency for everyone; scales with the fd limit). Every retry
    round ioctls every peer with fds in its socket and flushes every stalled peer, and the
    round's delay is global: it drops back to 1 ms whenever any round moved anything. An
    attacker uid parks one unread fd in each of 4,000 peers (one multicast per 1,024
    peers, one fd held) and gets 3,400 more of its peers stalled (a second multicast past its
    in-flight share); then any other uid whose fd traffic waits on retries (here a receiver
    that reads its fds in bursts) keeps the rounds at 1-2 ms, and each round walks all of the
    attacker's peers. Measured: the kernel thread at ~75% of a core instead of ~16% for the
    same innocent traffic (5x the CPU per message), ~650,000 futile flushes per second
    instead of ~800, the innocent's throughput down by a third. With a daemon's usual limit
    (RLIMIT_NOFILE 524288 or more) one uid may have 16,384 such peers, and every further uid
    as many again: the loop saturates.

    Fix: back off per peer (or per uid), not globally; retry a peer stalled on its uid's
    in-flight share only when that uid's count went down; scan a uid's fd holders only when
    its stalled peers need the room; bound the work of one round."""
    needs_root()
    receivers_count = 4000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 4 * receivers_count
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), max(hard, needed)))
    parked: list[socket.socket] = []
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(FDS)]
    try:
        limits = capbus.Limits(kernel_fds=10500)  # room for 4,000 peers of one uid
        async with capbus.open_kernel(limits=limits) as kernel:
            assert kernel._thread is not None
            tid = kernel._thread.native_id
            assert tid is not None
            # An innocent uid's fd traffic: a receiver that reads its fds in bursts.
            receiver = capbus.Peer.from_socket(adopt(kernel, BYSTANDER))
            feeder = capbus.Peer.from_socket(adopt(kernel, BYSTANDER))
            target = await receiver.transfer(await receiver.create_node(), feeder)

            async def feed() -> None:
                while True:
                    try:
                        await feeder.send(target, b"m", fds=fds)
                    except capbus.QuotaExceeded:
                        await trio.sleep(0.0005)  # its queue is full: the workload's pace

            async def drain() -> None:
                while True:
                    await trio.sleep(0.002)  # reads in bursts: the workload's pace
                    with contextlib.suppress(trio.WouldBlock):
                        while True:
                            receiver.recv_nowait().close_fds()

            async def measure() -> tuple[float, float, float]:
                """Futile flushes per second, messages written per second, kernel CPU share."""
                await trio.sleep(0.3)  # let the workload settle
                before, cpu_before, start = kernel.statistics(), _thread_cpu_seconds(tid), time.monotonic()
                await trio.sleep(1.5)  # the measuring window
                after, cpu_after, end = kernel.statistics(), _thread_cpu_seconds(tid), time.monotonic()
                seconds = end - start
                return (
                    (after.delivery_retries - before.delivery_retries) / seconds,
                    (after.messages_written - before.messages_written) / seconds,
                    (cpu_after - cpu_before) / seconds,
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                nursery.start_soon(drain)
                _, base_written, base_cpu = await measure()

                # The attacker's peers (their ends stay here, never read).
                sender = capbus.Peer.from_socket(adopt(kernel, ATTACKER))
                key = await sender._peer_key()
                parked.extend(adopt(kernel, ATTACKER) for _ in range(receivers_count))
                for sock in parked:
                    sock.send(_wire.command(_wire.CMD_NODE_CREATE, 1))
                for sock in parked:
                    node = _wire.U64.unpack_from(raw_reply(sock))[0]
                    sock.send(_wire.command(_wire.CMD_HANDLE_TRANSFER, 2, _wire.TRANSFER.pack(node, key)))
                ids = [_wire.U64.unpack_from(raw_reply(sock))[0] for sock in parked]
                for _ in range(2):
                    for start in range(0, len(ids), _wire.DESTINATIONS_MAX):
                        await sender.send(ids[start : start + _wire.DESTINATIONS_MAX], b"", fds=fds[:1])
                stats = kernel.statistics()
                assert stats.peers_stalled > 1000, stats

                retries, written, cpu = await measure()
                nursery.cancel_scope.cancel()
            # Backing off the attacker's 3,400 stalled peers to 128 ms each would cost about
            # 27,000 flushes a second.
            per_message = (cpu / max(written, 1)) / (base_cpu / max(base_written, 1))
            report = (
                f"{retries:.0f} futile flushes/s; kernel thread at {cpu:.0%} of a core for {written:.0f} "
                f"messages/s of the innocent's, against {base_cpu:.0%} for {base_written:.0f}/s without "
                f"the attacker's peers ({per_message:.1f}x the CPU per message)"
            )
            assert retries < 60_000 and per_message < 3, report
    finally:
        for sock in parked:
            sock.close()
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- the socket path is unlinked at exit, through whatever its directories have become -------


async def test_the_daemon_does_not_unlink_by_path_at_exit() -> None:
    """Severity low. docs/wire-format.md says nothing is done to the socket's path after
    bind, but Kernel.aclose (a daemon's exit) unlinks it by path. In a directory another uid
    can write, that uid can by then have swapped a directory on the path for a symlink: the
    root daemon then deletes the file of that name in any directory (here a root-owned file in
    a root-owned 0755 directory the attacker cannot write).

    Fix: do not unlink at exit, or unlink relative to a directory fd opened (O_PATH |
    O_NOFOLLOW, checked) when binding, and only if the name still is our socket (same
    inode)."""
    needs_root()
    with shared_directory() as shared, shared_directory() as protected:
        protected.chmod(0o755)
        victim = protected / "bus"
        victim.write_text("root's file")
        run = shared / "run"
        run.mkdir()
        async with daemon(run, user=None, fd_limit=None) as (path, kernel):
            await assert_serves(path, kernel)
            swap = f"""
import os
os.rename({str(run)!r}, {str(shared / "old")!r})
os.symlink({str(protected)!r}, {str(run)!r})
"""
            result = subprocess.run(
                as_user([sys.executable, "-c", swap], ATTACKER, ATTACKER),
                cwd="/",
                check=False,
            )
            assert result.returncode == 0
            # The attacker itself cannot delete the file.
            denied = subprocess.run(
                as_user([sys.executable, "-c", f"import os; os.unlink({str(victim)!r})"], ATTACKER, ATTACKER),
                cwd="/",
                check=False,
                capture_output=True,
            )
            assert denied.returncode != 0 and victim.exists()
        assert victim.exists(), "the root daemon deleted a file the attacker could not delete"


# -- kernel memory one uid pins outside every quota ---------------------------------------------


# Under AddressSanitizer (dev.py test --sanitize) the daemon's resident memory is mostly the
# sanitizer's: a quarantine of up to 256 MiB of freed blocks, a redzone around every block (64
# bytes for a queue entry's ~150) and shadow memory (an eighth). The memory tests turn the
# quarantine off and allow for the rest with this factor, so that they measure the kernel, not
# the sanitizer (measured: 95 MiB for the empty messages, 78 MiB for the seeds).
SANITIZER_ENV = (
    {"ASAN_OPTIONS": os.environ.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=0"} if SANITIZED else {}
)
SANITIZER_OVERHEAD = 1.5 if SANITIZED else 1


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# Connects `count` peers and gives each a seed of `size` bytes (SEED_SET), then holds them.
# Prints how many peers it connected and how many seeds the kernel took (the others: EDQUOT).
_SEEDER = """
import errno, socket, struct, sys, trio
from capbus import _wire

async def main(path, count, size):
    frame = _wire.command(_wire.CMD_SEED_SET, 1, _wire.SEED.pack(0, int(size)) + b"s" * int(size))
    socks, seeded = [], 0
    for _ in range(int(count)):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        sock.send(frame)
        error = struct.unpack_from("<i", sock.recv(4096), 16)[0]
        assert error in (0, errno.EDQUOT), error
        seeded += error == 0
        socks.append(sock)
    print(len(socks), seeded, flush=True)
    await trio.wrap_file(sys.stdin).readline()

trio.run(main, *sys.argv[1:])
"""


async def test_seeds_count_against_the_memory_a_uid_may_pin() -> None:
    """Severity medium-high (memory). A seed (SEED_SET, or PEER_CREATE's) is up to 128 KiB
    that the kernel keeps until the peer takes it or goes, charged to no quota and not even
    counted in statistics().memory_bytes. Every peer may have one, so a uid pins 128 KiB per
    peer it may have: 1,000 peers (a 4096-fd daemon) pin 125 MiB, a daemon with 20,000 fds
    lets one uid pin 1 GiB, and with the usual 524,288 or more, 16,384 peers per uid (2 GiB)
    for every uid an attacker has. docs/wire-format.md's "What one uid can make the kernel
    hold" has no row for it. Measured here as the daemon's resident memory.

    Fix: charge seeds to the uid like queued payload (user_bytes) or like its backlog, and
    count them in memory_bytes."""
    needs_root()
    peers, size = 1000, lib.CAPBUS_PAYLOAD_MAX
    with shared_directory() as where:
        async with daemon(where, fd_limit=4096, env=SANITIZER_ENV) as (path, kernel):  # room for 1,000 peers
            before = _rss(kernel.pid)
            attacker = await run_as(ATTACKER, _SEEDER, str(path), str(peers), str(size))
            try:
                with trio.fail_after(TIMEOUT):
                    connected, seeded = map(int, (await read_line(attacker)).split())
                assert connected == peers
                grown = _rss(kernel.pid) - before
                # What the documented per-uid bounds would let this uid pin here: at most its
                # user_bytes and user_backlog (64 + 16 MiB); its 1,000 peers cost ~1 MiB.
                bound = (lib.CAPBUS_DEFAULT_USER_BYTES + lib.CAPBUS_DEFAULT_USER_BACKLOG) * SANITIZER_OVERHEAD
                assert grown < bound, (
                    f"one uid's {seeded} seeds pin {grown / 2**20:.0f} MiB of the kernel, charged to nothing"
                )
            finally:
                attacker.kill()
                with trio.fail_after(TIMEOUT):
                    await attacker.wait()


# Connects a sender and `count` peers that never read, and multicasts `rounds` messages with
# no payload to all of them. Prints how many deliveries were accepted, then holds everything.
_EMPTY_MESSAGES = """
import socket, struct, sys, trio, capbus
from capbus import _wire

async def main(path, count, rounds):
    sender = await capbus.connect_peer(path)
    key = await sender._peer_key()
    socks, ids = [], []
    for _ in range(int(count)):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        sock.send(_wire.command(_wire.CMD_NODE_CREATE, 1))
        node = struct.unpack_from("<Q", sock.recv(4096), 24)[0]
        sock.send(_wire.command(_wire.CMD_HANDLE_TRANSFER, 2, _wire.TRANSFER.pack(node, key)))
        ids.append(struct.unpack_from("<Q", sock.recv(4096), 24)[0])
        socks.append(sock)
    accepted = 0
    for _ in range(int(rounds)):
        accepted += sum(error is None for error in await sender.send(ids, b""))
    print(accepted, flush=True)
    await trio.wrap_file(sys.stdin).readline()

trio.run(main, *sys.argv[1:])
"""


async def test_queued_messages_without_payload_count_against_the_memory_a_uid_may_pin() -> None:
    """Severity high (memory). What a uid may have queued is bounded kernel-wide in payload
    bytes only (user_bytes); the number of queued messages only per receiving peer (half of
    peer_messages, 4,096, per sending uid). A queued message costs the kernel ~165 bytes
    (entry, frame header, its share of the message) whatever its payload, so messages with no
    payload cost a uid nothing of user_bytes: 250 peers of the attacker that never read and
    4,200 empty multicasts to them pin 165 MiB (measured: the daemon's resident memory); one
    uid with the 8,230 peers a 20,000-fd daemon gives it pins 5.5 GB, with 16,384 peers 11
    GB, and a multicast to 1,024 destinations costs it one 8 KiB frame per 170 KB pinned. The
    documented per-uid bound ("64 MiB of payload ...") does not hold.

    Fix: charge each queued entry's real size (entry and header, not only the payload) to the
    pair's bytes and to user_bytes, or bound a uid's queued messages kernel-wide."""
    needs_root()
    receivers, rounds = 250, 4200
    with shared_directory() as where:
        async with daemon(where, fd_limit=4096, env=SANITIZER_ENV) as (path, kernel):
            before = _rss(kernel.pid)
            attacker = await run_as(ATTACKER, _EMPTY_MESSAGES, str(path), str(receivers), str(rounds))
            try:
                with trio.fail_after(120):
                    accepted = int(await read_line(attacker))
                grown = _rss(kernel.pid) - before
                # Past user_bytes and user_backlog together (64 + 16 MiB), with 20 MiB to spare
                # for 250 peers and their maps.
                bound = lib.CAPBUS_DEFAULT_USER_BYTES + lib.CAPBUS_DEFAULT_USER_BACKLOG + (20 << 20)
                bound *= SANITIZER_OVERHEAD
                assert grown < bound, (
                    f"one uid pins {grown / 2**20:.0f} MiB of the kernel with {accepted} queued messages "
                    f"carrying no payload"
                )
            finally:
                attacker.kill()
                with trio.fail_after(TIMEOUT):
                    await attacker.wait()
