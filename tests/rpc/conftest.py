from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import capbus

from .services import Pair, make_pair


@pytest.fixture
async def pair(kernel: capbus.Kernel) -> AsyncIterator[Pair]:
    async for made in make_pair(kernel):
        yield made
