"""The kernel's file descriptors are bounded per uid, and no delivery fails for want of one.

Findings F1 and F2 of the hardening review, on real processes, real uids and a real fd limit:
Linux counts fds written to unix sockets and not yet read against the sending process's uid
(RLIMIT_NOFILE; ETOOMANYREFS past it) and fds a process holds against the same limit (EMFILE).
Fds parked by one uid in sockets that are never read made every later fd-carrying write of
the kernel fail, and the kernel cut off whichever innocent receiver it was writing to; one
multicast of 64 fds to many reading receivers did the same with no attacker at all. Now:
an fd send is refused with EDQUOT before it is accepted when its uid's fair share of the
kernel's fds is used up, and a delivery that cannot take its fds now waits and is retried.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

import pytest
import trio
from capbus._kernel import lib

import capbus
from capbus.testing import wait_for_statistics

from .other_uid import daemon, needs_root, python_as, read_line, run_as, shared_directory

ATTACKER = 1001
INNOCENT = 1002
FD_LIMIT = 1024  # a common default RLIMIT_NOFILE, and what the reviewer's daemon ran with
FDS = 64  # the most one message may carry
TIMEOUT = 60


# Parks fds in two of its own peers that never read: sends 64 /dev/null fds at a time to
# each until the kernel refuses (EDQUOT), and reports how many messages it got accepted.
# Then, told to, it reads them all back and reports how many arrived.
_ATTACKER = """
import os, sys, trio, capbus

async def main(path):
    sender, parked = await capbus.connect_peer(path), [await capbus.connect_peer(path) for _ in range(2)]
    targets = [await peer.transfer(await peer.create_node(), sender) for peer in parked]
    null = [os.open("/dev/null", os.O_RDONLY) for _ in range(64)]
    accepted = refused = 0
    while refused < 2:
        try:
            await sender.send(targets[accepted % 2], accepted.to_bytes(8, "little"), fds=null)
            accepted += 1
            refused = 0
        except capbus.QuotaExceeded:
            refused += 1
    print(accepted, flush=True)
    await trio.wrap_file(sys.stdin).readline()
    got = []
    for peer in parked:
        while len(got) < accepted:
            with trio.move_on_after(5):
                message = await peer.recv()
                assert len(message.fds) == 64, len(message.fds)
                message.close_fds()
                got.append(int.from_bytes(message.payload[:8], "little"))
                continue
            break
    print(len(got), len(set(got)), flush=True)

trio.run(main, sys.argv[1])
"""

# A sender and a reading receiver of another uid: `count` messages of 64 fds, each checked.
_INNOCENT = """
import os, stat, sys, trio, capbus

async def main(path, count):
    sender, receiver = await capbus.connect_peer(path), await capbus.connect_peer(path)
    target = await receiver.transfer(await receiver.create_node(), sender)
    null = [os.open("/dev/null", os.O_RDONLY) for _ in range(64)]

    async def send():
        for index in range(count):
            await sender.send(target, index.to_bytes(8, "little"), fds=null)

    got = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        for index in range(count):
            message = await receiver.recv()
            assert int.from_bytes(message.payload[:8], "little") == index
            assert len(message.fds) == 64
            assert all(stat.S_ISCHR(os.fstat(fd).st_mode) for fd in message.fds)
            message.close_fds()
            got += 1
    print(got, flush=True)

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""


async def test_fds_parked_by_one_uid_never_cut_off_another() -> None:
    needs_root()
    with shared_directory() as where:
        async with daemon(where) as (path, kernel):
            attacker = await run_as(ATTACKER, _ATTACKER, str(path))
            with trio.fail_after(TIMEOUT):
                accepted = int(await read_line(attacker))
            # The reviewer's 19 messages of 64 fds were enough to break every later fd send.
            assert accepted >= 2, "the attacker could not even send"
            innocent = await run_as(INNOCENT, _INNOCENT, str(path), "40")
            with trio.fail_after(TIMEOUT):
                assert int(await read_line(innocent)) == 40
                assert await innocent.wait() == 0
            # Everything the attacker had accepted still arrives, once each.
            assert attacker.stdin is not None
            await attacker.stdin.send_all(b"go\n")
            with trio.fail_after(TIMEOUT):
                got, distinct = map(int, (await read_line(attacker)).split())
                assert await attacker.wait() == 0
            assert (got, distinct) == (accepted, accepted), "an accepted message was lost"
            assert kernel.returncode is None, "the kernel died"


async def test_multicast_of_fds_to_many_readers_reaches_every_one() -> None:
    """One send of 64 fds to 200 receivers needs 12,800 fds in flight, far past a 1024-fd
    kernel's: it is delivered in waves as receivers read, and nobody is cut off."""
    needs_root()
    receivers_count = 200
    with shared_directory() as where:
        async with daemon(where) as (path, _kernel):
            sender = await capbus.connect_peer(path)
            receivers = [await capbus.connect_peer(path) for _ in range(receivers_count)]
            targets = [await r.transfer(await r.create_node(), sender) for r in receivers]
            null = [os.open("/dev/null", os.O_RDONLY) for _ in range(FDS)]
            try:
                with trio.fail_after(TIMEOUT):
                    errors = await sender.send(targets, b"to all", fds=null)
                assert errors == (None,) * receivers_count
                got = 0

                async def read(receiver: capbus.Peer) -> None:
                    nonlocal got
                    message = await receiver.recv()
                    assert message.payload == b"to all"
                    assert len(message.fds) == FDS
                    message.close_fds()
                    got += 1

                with trio.fail_after(TIMEOUT):
                    async with trio.open_nursery() as nursery:
                        for receiver in receivers:
                            nursery.start_soon(read, receiver)
                assert got == receivers_count
                # And every receiver is still connected and served.
                with trio.fail_after(TIMEOUT):
                    for receiver in receivers:
                        assert (await receiver.info()).uid == 0
            finally:
                for fd in null:
                    os.close(fd)
                for peer in [sender, *receivers]:
                    await peer.aclose()


async def test_embedded_kernel_budgets_and_retries_are_counted() -> None:
    """The same multicast on an embedded kernel told it has 1024 fds: the statistics show
    the waves (retries), the budgets, and every fd landed once the receivers read."""
    limits = capbus.Limits(kernel_fds=FD_LIMIT)
    async with capbus.open_kernel(limits=limits) as kernel:
        stats = kernel.statistics()
        assert stats.fds_in_flight_max == FD_LIMIT - FD_LIMIT // 8
        assert 0 < stats.fds_held_max < FD_LIMIT
        sender = await kernel.connect()
        receivers = [await kernel.connect() for _ in range(100)]
        targets = [await r.transfer(await r.create_node(), sender) for r in receivers]
        null = [os.open("/dev/null", os.O_RDONLY) for _ in range(FDS)]
        try:
            assert await sender.send(targets, b"x", fds=null) == (None,) * len(receivers)
            stats = kernel.statistics()
            assert stats.fds_in_flight <= stats.fds_in_flight_max
            assert stats.peers_stalled > 0, "100 x 64 fds cannot all be in flight at once"
            with trio.fail_after(TIMEOUT):
                for receiver in receivers:
                    message = await receiver.recv()
                    assert len(message.fds) == FDS
                    message.close_fds()
                stats = await wait_for_statistics(
                    kernel, lambda s: s.peers_stalled == 0 and s.fds_held == 101
                )
            assert stats.delivery_retries > 0
            assert stats.peers_doomed == 0
        finally:
            for fd in null:
                os.close(fd)
            for peer in [sender, *receivers]:
                await peer.aclose()
        with trio.fail_after(TIMEOUT):
            await wait_for_statistics(kernel, lambda s: s.fds_held == 0 and s.fds_in_flight == 0)


async def test_one_uid_gets_at_most_half_of_the_free_fds() -> None:
    """Peers are fds too: one uid filling the kernel with peers and queued fds stops at its
    fair share (EDQUOT), and another uid can still connect and send fds."""
    needs_root()
    limits = capbus.Limits(kernel_fds=FD_LIMIT)
    async with capbus.open_kernel(limits=limits) as kernel:
        budget = kernel.statistics().fds_held_max
        mine: list[capbus.Peer] = []
        with pytest.raises(capbus.QuotaExceeded):
            for _ in range(budget + 1):
                mine.append(await kernel.connect())
        held = kernel.statistics().fds_held
        assert budget // 2 - 1 <= held <= budget // 2 + 1, (held, budget)
        # Another uid connects and sends an fd (a send is charged to its writer's uid).
        theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Charged to the other uid from the start, as a connection it made would be.
        assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), INNOCENT, INNOCENT, 0) == 0
        with theirs, trio.fail_after(TIMEOUT):
            result = await trio.run_process(
                [*python_as(INNOCENT, _SEND_ONE_FD), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                cwd="/",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.split() == [str(INNOCENT).encode(), b"1"]
        for peer in mine:
            await peer.aclose()


_SEND_ONE_FD = """
import os, sys, trio, capbus

async def main(fd):
    peer = capbus.Peer.from_socket(fd)
    inbox = await peer.create_node()
    await peer.send(inbox, b"fd", fds=[os.open("/dev/null", os.O_RDONLY)])
    message = await peer.recv()
    print(message.sender.uid if message.sender else (await peer.info()).uid, len(message.fds))

trio.run(main, int(sys.argv[1]))
"""


# An embedded kernel listening on a path in a process whose fd table is then filled to the
# last fd by the embedding program (the kernel's own budget cannot prevent that): newcomers
# are refused at once and the loop sleeps (F2: the listener stayed readable and the loop
# spun at 100% CPU, never accepting anyone again). Freeing fds lets newcomers in again.
_FULL_TABLE = """
import os, resource, sys, trio, capbus

async def main(path):
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    read_log, write_log = os.pipe()
    os.set_blocking(read_log, False)
    async with capbus.open_kernel(listen=path, mode=0o666) as kernel:
        kernel.log_to(write_log)
        witness = await kernel.connect()
        inbox = await witness.create_node()
        filler = []
        try:
            while True:
                filler.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        stdin = trio.wrap_file(sys.stdin)
        stdout = trio.wrap_file(sys.stdout)
        await stdout.write("full\\n"); await stdout.flush()
        await stdin.readline()  # the newcomers tried
        try:
            # The kernel cannot take an fd now: the sender is told so, not EMSGSIZE.
            await witness.send(inbox, b"fd", fds=[0])
            sent = "sent"
        except capbus.CapbusError as error:
            sent = type(error).__name__
        before = kernel.statistics()
        await trio.sleep(0.5)  # a window to count wakeups in, not a synchronisation
        after = kernel.statistics()
        for fd in filler[:32]:
            os.close(fd)
        log = os.read(read_log, 65536).decode()
        await stdout.write(f"{sent} {after.connections_refused} {after.wakeups - before.wakeups} {log!r}\\n")
        await stdout.flush()
        await stdin.readline()  # a newcomer got in
        for fd in filler[32:]:
            os.close(fd)

trio.run(main, sys.argv[1])
"""


async def test_out_of_fds_the_listener_refuses_and_the_loop_sleeps() -> None:
    with shared_directory() as where:
        path = where / "bus"
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", _FULL_TABLE, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
        )
        assert process.stdin is not None
        try:
            with trio.fail_after(TIMEOUT):
                assert await read_line(process) == "full"
                for _ in range(5):
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    sock.settimeout(TIMEOUT)
                    sock.connect(str(path))
                    # Refused: accepted and closed at once, so it sees its connection end.
                    assert sock.recv(64) == b""
                    sock.close()
                await process.stdin.send_all(b"tried\n")
                sent, refused, wakeups, log = (await read_line(process)).split(" ", 3)
            assert sent == "KernelOutOfFds"
            assert int(refused) >= 5
            # An idle loop wakes only for its retry timer (a few times in half a second); a
            # spinning one wakes hundreds of thousands of times.
            assert int(wakeups) < 100, f"the kernel loop woke {wakeups} times in 0.5 s: it spins"
            assert "out of file descriptors (EMFILE)" in log
            with trio.fail_after(TIMEOUT):
                peer = await capbus.connect_peer(path)
                assert (await peer.info()).uid == os.geteuid()
                await peer.aclose()
                await process.stdin.send_all(b"in\n")
                assert await process.wait() == 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
