from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import capbus
from capbus.compiler import generate_file
from capbus.testing import PeerFactory, server_process

CALCULATOR = Path(__file__).resolve().parents[1] / "examples" / "calculator"


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


@pytest.fixture
async def calculator_server(kernel: capbus.Kernel) -> AsyncIterator[tuple[capbus.Peer, capbus.Handle]]:
    """The calculator example's server.py in a process of its own; yields a peer of ours
    holding its calculator."""
    generate_file(CALCULATOR / "calculator.capnp", CALCULATOR / "calculator_capnp.py")
    env = {**os.environ, "PYTHONPATH": str(CALCULATOR)}
    command = lambda fd: [sys.executable, str(CALCULATOR / "server.py"), "--fd", str(fd)]  # noqa: E731
    async with server_process(kernel, command, env=env) as served:
        yield served


@pytest.fixture
def address_space_for_headers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failure injection: this process cannot map more than a received payload's start (as
    a sandbox's RLIMIT_AS would have it for a large payload): Peer's mapping of anything
    larger fails with ENOMEM for the rest of the test."""
    import errno

    from capbus import peer as peer_module
    from capbus.peer import PAYLOAD_HEAD_BYTES

    real_map = peer_module._map

    def small_room(fd: int, length: int) -> memoryview:
        if length > PAYLOAD_HEAD_BYTES:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
        return real_map(fd, length)

    monkeypatch.setattr(peer_module, "_map", small_room)
