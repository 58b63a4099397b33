from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import capbus
from capbus.testing import PeerFactory


@pytest.fixture
async def kernel() -> AsyncIterator[capbus.Kernel]:
    async with capbus.open_kernel() as k:
        yield k


@pytest.fixture
async def new_peer(kernel: capbus.Kernel) -> AsyncIterator[PeerFactory]:
    """Makes peers on the test's kernel and closes them at the end."""
    made: list[capbus.Peer] = []

    async def make() -> capbus.Peer:
        peer = await kernel.connect()
        made.append(peer)
        return peer

    yield make
    for peer in made:
        await peer.aclose()
