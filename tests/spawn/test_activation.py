"""capbus.activatable (issue 13, part 5): a capability whose service starts on the first call
through it. Calls before, during and after the start arrive in order; an idle child is
stopped and started again on the next call; a child that exits by itself too; a child that
crashes on start fails the calls that waited, with the reason, and the next call retries.
Real children (capbus.spawn, sandboxed), real callers over the bus."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc import errors
from capbus.rpc.vat import Vat, open_vat

HERE = Path(__file__).resolve().parent
schema: Any = capbus.load(HERE / "activated.capnp")
TIMEOUT = 60


def activatable(vat: Vat, target: str = "activated:serve", **options: Any) -> Any:
    return capbus.activatable(vat, target, code=[HERE], interface=schema.Worker, offer="worker", **options)


@asynccontextmanager
async def two_peers(
    kind: str, kernel: capbus.Kernel, where: Path
) -> AsyncIterator[tuple[capbus.Peer, capbus.Peer]]:
    """The parent's and a caller's peers: on the test's embedded kernel, or on a kernel
    daemon (``capbus kernel --listen``) in a process of its own."""
    if kind == "embedded":
        yield await kernel.connect(), await kernel.connect()
        return
    path = where / "bus"
    command = [sys.executable, "-m", "capbus", "kernel", "--listen", str(path)]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, cwd="/")
    try:
        assert process.stdout is not None
        with trio.fail_after(TIMEOUT):
            assert b"listening" in await process.stdout.receive_some(4096)
        yield await capbus.connect_peer(path), await capbus.connect_peer(path)
    finally:
        process.terminate()
        with trio.fail_after(TIMEOUT):
            await process.wait()


@pytest.mark.parametrize("kind", ["embedded", "daemon"])
async def test_calls_before_during_and_after_the_start_arrive_in_order(
    kind: str, kernel: capbus.Kernel, tmp_path: Path
) -> None:
    async with two_peers(kind, kernel, tmp_path) as (parent_peer, caller_peer):
        async with (
            open_vat(parent_peer) as vat,
            activatable(vat) as worker,
            open_vat(caller_peer) as caller_vat,
        ):
            activator = worker.server
            assert activator.starts == 0 and activator.pid is None  # (nothing runs yet)
            node = await vat.export(activator)
            remote = caller_vat.client(await parent_peer.transfer(node, caller_peer), schema.Worker)
            with trio.fail_after(TIMEOUT):
                # Sent one after another without waiting: the first starts the child, the
                # rest arrive while it starts.
                promises = [await remote.work.send(n=n) for n in range(6)]
                results = [await promise for promise in promises]
                after = await remote.work(n=6)
        await caller_peer.aclose()
        await parent_peer.aclose()
    assert [r.n for r in results] == list(range(6))
    assert list(after.order) == list(range(7))  # (one child saw them all, in order)
    assert activator.starts == 1


async def test_an_idle_child_is_stopped_and_started_again(vat: Vat) -> None:
    async with activatable(vat, idle_exit=0.2) as worker:
        activator = worker.server
        with trio.fail_after(TIMEOUT):
            await worker.work(n=1)
            first = activator.pid  # (as the parent sees it: the child has a pid namespace)
            stopped = activator.stopped
            await stopped.wait()  # (idle for 0.2 s: stopped)
            assert activator.pid is None
            second = await worker.work(n=2)
    assert first and activator.starts == 2 and list(second.order) == [2]  # (a new child)


async def test_a_child_that_exits_by_itself_is_started_again(vat: Vat) -> None:
    async with activatable(vat) as worker:
        activator = worker.server
        with trio.fail_after(TIMEOUT):
            await worker.work(n=1)
            first = activator.pid
            stopped = activator.stopped
            try:
                await worker.retire()
            except errors.Disconnected:
                pass  # (it may exit before its answer is out)
            await stopped.wait()
            second = await worker.work(n=2)
            assert activator.pid not in (None, first)
    assert activator.starts == 2 and list(second.order) == [2]  # (a new child)


async def test_a_child_that_crashes_on_start_fails_the_waiting_calls_with_the_reason(vat: Vat) -> None:
    async with activatable(vat, "activated:crash_on_start") as worker:
        activator = worker.server
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                failures: list[BaseException] = []

                async def call(n: int) -> None:
                    with pytest.raises(errors.Failed) as failed:
                        await worker.work(n=n)
                    failures.append(failed.value)

                for n in range(3):
                    nursery.start_soon(call, n)
            assert len(failures) == 3
            assert all("no configuration to start with" in str(f) for f in failures), failures
            assert activator.failed_starts == 1  # (the three waited for one start)
            with pytest.raises(errors.Failed):
                await worker.work(n=9)  # (a later call tries again)
            assert activator.failed_starts == 2 and activator.starts == 0


async def test_the_capability_fails_once_its_block_is_left(vat: Vat) -> None:
    async with activatable(vat) as worker:
        with trio.fail_after(TIMEOUT):
            pid = (await worker.work(n=1)).pid
    with trio.fail_after(TIMEOUT), pytest.raises(errors.RpcError):
        await worker.work(n=2)
    assert worker.server.pid is None and pid
