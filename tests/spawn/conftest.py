from __future__ import annotations

import os
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


@pytest.fixture
def sanitizer_env() -> dict[str, str]:
    """What a process that embeds the kernel needs in the sanitizer run (dev.py test
    --sanitize): its sanitizer runtime, preloaded. (Children never load the kernel.)"""
    names = ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "CAPBUS_SANITIZED")
    return {name: os.environ[name] for name in names if name in os.environ}
