"""Helpers for testing code that uses capbus (public, like trio.testing)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from .kernel import Kernel, KernelStatistics
from .peer import Message, MessageKind, Peer

PeerFactory = Callable[[], Awaitable[Peer]]
"""What the ``new_peer`` fixture of capbus's own tests hands out."""


async def wait_for_statistics(
    kernel: Kernel, predicate: Callable[[KernelStatistics], bool], *, poll: float = 0.001
) -> KernelStatistics:
    """Waits until the kernel's counters satisfy ``predicate`` and returns them.

    The kernel runs on its own thread, so its counters settle a moment after a peer's
    socket closes; bound the wait with ``trio.fail_after`` around the call.
    """
    while True:
        stats = kernel.statistics()
        if predicate(stats):
            return stats
        await trio.sleep(poll)


async def recv_kind(peer: Peer, kind: MessageKind) -> Message:
    """Receives the next message and checks its kind."""
    message = await peer.recv()
    if message.kind is not kind:
        raise AssertionError(f"expected {kind}, got {message.kind} ({message})")
    return message


def assert_queue_empty(peer: Peer) -> None:
    """Asserts that nothing has arrived for ``peer``."""
    try:
        message = peer.recv_nowait()
    except trio.WouldBlock:
        return
    raise AssertionError(f"unexpected message {message}")
