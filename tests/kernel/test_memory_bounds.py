"""Kernel memory one uid can pin is bounded in real bytes (finding F3: a peer that never read
cost ~4.8 MB of queued replies, since the 1 MiB reply backlog counted header bytes only; and
nodes and handles were bounded per peer only, so 16,384 peers per uid pinned tens of GiB)."""

from __future__ import annotations

import contextlib
import os
import select
import socket

import pytest
import trio
from capbus._kernel import lib

import capbus
from capbus import _wire
from capbus.testing import wait_for_statistics

TIMEOUT = 20
BACKLOG = lib.CAPBUS_REPLY_BACKLOG_MAX
OTHER_UID = 1002


def writable(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


async def flood_until_ignored(kernel: capbus.Kernel, raw: socket.socket, bound: int) -> int:
    """Writes commands to a peer that never reads their replies until the kernel stops reading
    it, which it may do only once what it holds for the peer is past ``bound`` bytes. Returns
    how many were written."""
    raw.setblocking(False)
    before = kernel.statistics().memory_bytes
    frame = _wire.FRAME.pack(_wire.FRAME.size, _wire.CMD_PEER_QUERY, 0, 1)
    sent = 0
    while True:
        try:
            raw.send(frame)
            sent += 1
            continue
        except BlockingIOError:
            pass
        # Either the kernel reads on (the socket drains) or it stopped reading this peer.
        stats = await wait_for_statistics(kernel, lambda s: s.memory_bytes - before > bound or writable(raw))
        if stats.memory_bytes - before > bound and not writable(raw):
            return sent


async def test_a_peer_that_never_reads_pins_at_most_its_backlog(kernel: capbus.Kernel) -> None:
    raw = kernel.socket_for_child()
    before = kernel.statistics().memory_bytes
    with raw:
        with trio.fail_after(TIMEOUT):
            sent = await flood_until_ignored(kernel, raw, BACKLOG)
        grown = kernel.statistics().memory_bytes - before
        assert sent > 5000, "the kernel stopped reading early"
        # The backlog, plus one reply batch past it (the bound is checked between batches).
        assert grown <= BACKLOG + 64 * 1024, f"{grown} bytes pinned by a peer that never reads"
    with trio.fail_after(TIMEOUT):
        await wait_for_statistics(kernel, lambda s: s.memory_bytes <= before)


async def test_many_peers_of_one_uid_pin_at_most_its_backlog() -> None:
    """Per peer is not enough (16,384 peers per uid x 1 MiB): a uid's peers together stop
    being served past user_backlog; another uid is served, and they resume once they read."""
    limits = capbus.Limits(user_backlog=512 * 1024)
    async with capbus.open_kernel(limits=limits) as kernel:
        before = kernel.statistics().memory_bytes
        hogs = [kernel.socket_for_child() for _ in range(6)]
        frame = _wire.FRAME.pack(_wire.FRAME.size, _wire.CMD_PEER_QUERY, 0, 1)
        for hog in hogs:
            hog.setblocking(False)
        with trio.fail_after(TIMEOUT):
            # Commands from all six, none of whose replies is read, until the kernel stops
            # reading them for their uid's backlog.
            while not kernel.statistics().peers_gated:
                for hog in hogs:
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            hog.send(frame)
                await wait_for_statistics(kernel, lambda s: s.peers_gated > 0 or any(map(writable, hogs)))
            gated = kernel.statistics().peers_gated
        assert gated >= 1, "six peers that never read did not reach the uid's backlog bound"
        grown = kernel.statistics().memory_bytes - before
        assert grown <= limits.user_backlog + 6 * 64 * 1024, f"{grown} bytes pinned by one uid"
        # A newcomer of the same uid is not read either ...
        late = await kernel.connect()
        # (more hogs may be gated meanwhile too, as the kernel's thread gets to them: the
        # counts grow, and only this uid's peers are ever counted)
        with trio.fail_after(TIMEOUT):
            await wait_for_statistics(kernel, lambda s: s.peers_gated > gated)
        # ... while another uid's is.
        other_end, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), OTHER_UID, OTHER_UID, 0) == 0
        async with capbus.Peer.from_socket(other_end) as other:
            with trio.fail_after(TIMEOUT):
                assert (await other.info()).uid == OTHER_UID
        assert kernel.statistics().peers_gated <= len(hogs) + 1  # (the other uid's is not)
        # The hogs go away: the uid is under its bound again, and the late peer is served (the
        # kernel looks at gated peers again on its retry timer).
        for hog in hogs:
            hog.close()
        with trio.fail_after(TIMEOUT):
            assert (await late.info()).uid == 0
            await wait_for_statistics(kernel, lambda s: s.peers_gated == 0)
        await late.aclose()


async def test_handles_are_bounded_per_uid_not_only_per_peer() -> None:
    limits = capbus.Limits(user_handles=500)
    async with capbus.open_kernel(limits=limits) as kernel:
        peers = [await kernel.connect() for _ in range(10)]
        made = 0
        with pytest.raises(capbus.QuotaExceeded):
            while made <= limits.user_handles:
                await peers[made % len(peers)].create_node()
                made += 1
        assert made == limits.user_handles
        assert kernel.statistics().handles == limits.user_handles
        # Nor can they be given more: a send installing a new handle is refused for them.
        other_end, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), OTHER_UID, OTHER_UID, 0) == 0
        other = capbus.Peer.from_socket(other_end)
        # Another uid is not affected.
        theirs = [await other.create_node() for _ in range(10)]
        with pytest.raises(capbus.QuotaExceeded):
            await other.transfer(theirs[0], peers[0])
        for peer in [other, *peers]:
            await peer.aclose()
        with trio.fail_after(TIMEOUT):
            await wait_for_statistics(kernel, lambda s: s.handles == 0)


async def test_seeds_are_charged_to_user_bytes_until_taken() -> None:
    """A seed counts in its uid's queued bytes (user_bytes) until it is taken or dropped:
    past the budget SEED_SET is EDQUOT, and taking a seed gives its room back."""
    size = lib.CAPBUS_PAYLOAD_MAX
    limits = capbus.Limits(user_bytes=3 * size)
    async with capbus.open_kernel(limits=limits) as kernel:
        peers = [await kernel.connect() for _ in range(3)]
        with trio.fail_after(TIMEOUT):
            await peers[0].set_seed(b"s" * size)
            await peers[1].set_seed(b"s" * size)
            assert kernel.statistics().seed_bytes > 2 * size
            with pytest.raises(capbus.QuotaExceeded):
                await peers[2].set_seed(b"s" * size)
            assert (await peers[0].take_seed()).payload == b"s" * size
            await peers[2].set_seed(b"s" * size)  # the room the taken seed gave back
            for peer in peers:
                await peer.aclose()
            await wait_for_statistics(kernel, lambda s: s.seed_bytes == 0 and s.peers == 0)


async def test_a_disconnected_peers_unread_fds_count_until_its_other_end_is_gone() -> None:
    """The kernel's end of a peer disconnected with fds unread in its socket lingers, shut
    down, with those fds still counted in flight (Linux counts them until they are read or
    the other end closes); then it is closed and they land."""
    async with capbus.open_kernel() as kernel:
        sender = await kernel.connect()
        raw, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), -1, -1, -1) == 0
        with raw, open("/dev/null") as null, trio.fail_after(TIMEOUT):
            receiver = capbus.Peer.from_socket(raw.dup())
            target = await receiver.transfer(await receiver.create_node(), sender)
            receiver.detach().close()
            await sender.send(target, b"fd", fds=[null.fileno()])
            await wait_for_statistics(kernel, lambda s: s.fds_in_flight == 1)
            raw.send(_wire.command(_wire.CMD_DISCONNECT, 9))
            stats = await wait_for_statistics(kernel, lambda s: s.sockets_lingering == 1)
            assert stats.fds_in_flight == 1 and stats.peers == 1
            # Still readable after the hang-up: reading it all lands the fd.
            received = []
            while True:
                data, fds, _, _ = socket.recv_fds(raw, _wire.FRAME_MAX + 1, 8)
                received += fds
                if not data:
                    break
            for fd in received:
                os.close(fd)
            assert len(received) == 1
            await wait_for_statistics(kernel, lambda s: s.sockets_lingering == 0 and s.fds_in_flight == 0)


async def test_a_peer_that_sends_itself_in_frames_the_kernel_never_reads_does_not_linger_for_ever() -> None:
    """A peer cut off (here: it said DISCONNECT) with fds unread in its socket, whose later
    frames, never read by the kernel, carry its own end: that end is then held only from the
    kernel's receive queue, and the kernel's end lingered on it for ever, its fds counted in
    flight (found by the raw-frame fuzzer in session 10, 1 run in 6). The kernel throws away
    what a disconnected peer wrote after it went, closing the fds on it."""
    async with capbus.open_kernel() as kernel:
        sender = await kernel.connect()
        raw, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), -1, -1, -1) == 0
        with open("/dev/null") as null, trio.fail_after(TIMEOUT):
            receiver = capbus.Peer.from_socket(raw.dup())
            target = await receiver.transfer(await receiver.create_node(), sender)
            receiver.detach().close()
            await sender.send(target, b"fd", fds=[null.fileno()])
            await wait_for_statistics(kernel, lambda s: s.fds_in_flight == 1)
            raw.setblocking(False)
            raw.send(_wire.command(_wire.CMD_DISCONNECT, 9))
            for cookie in range(10, 50):  # (more than one batch of reads: some stay unread)
                try:
                    socket.send_fds(raw, [_wire.command(_wire.CMD_PEER_QUERY, cookie)], [raw.fileno()])
                except OSError:
                    break  # (the kernel hung up: the rest were never written)
            raw.close()  # (its end lives on only in the frames the kernel did not read)
            await wait_for_statistics(kernel, lambda s: s.sockets_lingering == 0 and s.fds_in_flight == 0)
        await sender.aclose()
