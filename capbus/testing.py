"""Helpers for testing code that uses capbus (public, like trio.testing)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager

import trio

from .kernel import Kernel, KernelStatistics
from .peer import Handle, Message, MessageKind, Peer

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


def as_user(argv: Sequence[str], user: int, group: int, *, readable: Sequence[str] = ()) -> list[str]:
    """The command line that runs ``argv`` from a root process as ``user`` and ``group`` (no
    supplementary groups), with this interpreter, what is on its path, capbus and
    ``readable`` reachable to them wherever they are installed, as capbus.spawn makes them
    for a child started as another user (:func:`capbus.sandbox.switch_user`). For tests that
    start processes as other users: ``subprocess.run(as_user([sys.executable, ...], 1000,
    1000))``. The environment, fds and working directory pass through to ``argv``."""
    config = {"user": user, "group": group, "readable": [os.path.abspath(p) for p in readable]}
    return [sys.executable, "-P", "-s", "-c", _AS_USER, json.dumps(config), *argv]


_AS_USER = """
import json, os, sys
from capbus import _resources, sandbox

config, argv = json.loads(sys.argv[1]), sys.argv[2:]
wanted = [*_resources.package_directories(), os.path.dirname(argv[0]), *config["readable"]]
sandbox.switch_user(config["user"], config["group"], sandbox.view(sandbox.Sandbox.none(), wanted))
os.execv(argv[0], argv)
"""


@asynccontextmanager
async def server_process(
    kernel: Kernel,
    command: Callable[[int], Sequence[str]],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> AsyncIterator[tuple[Peer, Handle]]:
    """A server in a process of its own: ``command(fd)`` is its argv, ``fd`` a new peer of
    ``kernel`` whose seed holds a node of ours; the server's first message to it hands in
    its object. Yields our peer and the handle in that message; kills the process after."""
    launcher = await kernel.connect()
    inbox = await launcher.create_node()
    sock = await launcher.create_peer(handles=[inbox])
    try:
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                lambda task_status: trio.run_process(
                    list(command(sock.fileno())),
                    pass_fds=[sock.fileno()],
                    env=None if env is None else dict(env),
                    cwd="/",
                    check=False,
                    task_status=task_status,
                )
            )
            sock.close()
            try:
                with trio.fail_after(timeout):
                    message = await launcher.recv()
                if message.kind is not MessageKind.DATA:
                    raise AssertionError(f"the server died before handing in its object ({message.kind})")
                yield launcher, message.handles[0]
            finally:
                process.kill()
    finally:
        sock.close()
        await launcher.aclose()
