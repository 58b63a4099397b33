"""Fixtures of the kernel tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

import capbus

from .other_uid import daemon

Connect = Callable[[], Awaitable[capbus.Peer]]


@pytest.fixture(params=["embedded", "daemon"])
async def connect(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Connect]:
    """A way to connect new peers (closed at the end): to a kernel in this process, or to a
    kernel daemon (``capbus kernel --listen``, this uid) in another."""
    made: list[capbus.Peer] = []
    if request.param == "embedded":
        async with capbus.open_kernel() as kernel:

            async def embedded() -> capbus.Peer:
                made.append(await kernel.connect())
                return made[-1]

            yield embedded
            for peer in made:
                await peer.aclose()
    else:
        async with daemon(tmp_path, user=None) as (path, _):

            async def connected() -> capbus.Peer:
                made.append(await capbus.connect_peer(path))
                return made[-1]

            yield connected
            for peer in made:
                await peer.aclose()
