from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import capbus
from capbus.rpc.vat import Vat, open_vat


@pytest.fixture
async def vat(kernel: capbus.Kernel) -> AsyncIterator[Vat]:
    """The parent's vat, on the test's kernel."""
    peer = await kernel.connect()
    async with open_vat(peer) as made:
        yield made
    await peer.aclose()
