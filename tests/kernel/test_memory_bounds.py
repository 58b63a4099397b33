"""Kernel memory one uid can pin is bounded in real bytes (finding F3: a peer that never read
cost ~4.8 MB of queued replies, since the 1 MiB reply backlog counted header bytes only; and
nodes and handles were bounded per peer only, so 16,384 peers per uid pinned tens of GiB)."""

from __future__ import annotations

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


async def test_a_peer_that_never_reads_pins_at_most_its_backlog(kernel: capbus.Kernel) -> None:
    raw = kernel.socket_for_child()
    raw.setblocking(False)
    before = kernel.statistics().memory_bytes
    sent = 0
    frame = _wire.FRAME.pack(_wire.FRAME.size, _wire.CMD_PEER_QUERY, 0, 1)
    with raw:
        # Commands until neither the kernel nor the socket takes more: the kernel stopped
        # reading this peer, whose replies it does not read.
        def writable() -> bool:
            poller = select.poll()
            poller.register(raw, select.POLLOUT)
            return bool(poller.poll(0))

        with trio.fail_after(TIMEOUT):
            while True:
                try:
                    raw.send(frame)
                    sent += 1
                    continue
                except BlockingIOError:
                    pass
                # Either the kernel reads on (the socket drains) or it stopped reading this
                # peer, which it does only past the backlog bound.
                stats = await wait_for_statistics(
                    kernel, lambda s: s.memory_bytes - before > BACKLOG or writable()
                )
                if stats.memory_bytes - before > BACKLOG and not writable():
                    break
        grown = kernel.statistics().memory_bytes - before
        assert sent > 5000, "the kernel stopped reading early"
        # The backlog, plus one reply batch past it (the bound is checked between batches).
        assert grown <= BACKLOG + 64 * 1024, f"{grown} bytes pinned by a peer that never reads"
    with trio.fail_after(TIMEOUT):
        await wait_for_statistics(kernel, lambda s: s.memory_bytes <= before)


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
