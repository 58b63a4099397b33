"""A child that crashes, hangs, floods its parent or runs out of memory is contained: another
child goes on being served, the parent's own work goes on, and the parent sees a clear
error (an exit status with the reason, Disconnected on the child's capabilities)."""

from __future__ import annotations

import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc import errors
from capbus.rpc.vat import Vat, open_vat

HERE = Path(__file__).resolve().parent
schema: Any = capbus.load(HERE / "children.capnp")


class Counter(schema.Sink.Server):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        self.puts = 0

    def put(self, data: bytes) -> None:
        self.puts += 1


async def healthy(stack: AsyncExitStack, vat: Vat) -> Any:
    """A well-behaved child next to the bad one; returns its prober."""
    child = await stack.enter_async_context(capbus.spawn(vat, "children:prober", code=[HERE]))
    return await child.capability("prober", schema.Prober)


async def still_served(prober: Any) -> None:
    for _ in range(20):
        assert (await prober.probe(what="environ", arg="")).outcome.startswith("ALLOWED")


async def test_a_crash(vat: Vat) -> None:
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            other = await healthy(stack, vat)
            bad = await stack.enter_async_context(capbus.spawn(vat, "children:prober", code=[HERE]))
            prober = await bad.capability("prober", schema.Prober)
            with pytest.raises(errors.Disconnected):
                await prober.crash()
            await still_served(other)
            assert await bad.wait() == -signal.SIGSEGV


async def test_a_hang(vat: Vat) -> None:
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            other = await healthy(stack, vat)
            bad = await stack.enter_async_context(capbus.spawn(vat, "children:prober", code=[HERE]))
            prober = await bad.capability("prober", schema.Prober)
            outcome: list[BaseException] = []

            async def wait_for_the_hung_call() -> None:
                try:
                    await prober.hang()
                except errors.Disconnected as error:
                    outcome.append(error)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_for_the_hung_call)
                await still_served(other)  # while a call to the hung child is pending
                bad.kill()
            assert len(outcome) == 1  # the pending call failed as soon as the child died
            assert await bad.wait() == -signal.SIGKILL


class SlowSink(schema.Sink.Server):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        self.puts = 0
        self.gate = trio.Event()

    async def put(self, data: bytes) -> None:
        await self.gate.wait()
        self.puts += 1


async def test_a_flood(kernel: capbus.Kernel, vat: Vat) -> None:
    """A child sends its parent calls as fast as it can, without waiting for answers, to an
    object that is stuck for a while: past the parent vat's bound on waiting calls, calls
    are refused with Overloaded (so the parent holds at most that many); none is lost, and
    the parent and another child go on."""
    sink = SlowSink()
    peer = await kernel.connect()
    with trio.fail_after(120):
        async with AsyncExitStack() as stack:
            bounded = await stack.enter_async_context(
                open_vat(peer, max_concurrent_calls=1, max_queued_calls=32)
            )
            other = await healthy(stack, vat)
            bad = await stack.enter_async_context(capbus.spawn(bounded, "children:prober", code=[HERE]))
            prober = await bad.capability("prober", schema.Prober)
            flood = await prober.flood.send(target=sink, calls=3000)
            await still_served(other)  # during the flood
            while bounded.statistics().queued < 32:  # the bound is reached (polled, bounded by fail_after)
                await trio.sleep(0.001)
            sink.gate.set()
            refused = (await flood).refused
            assert refused > 0  # while the sink was stuck, the bound refused calls
            assert sink.puts + refused == 3000  # every call answered or refused: none lost
            await still_served(other)
    await peer.aclose()


async def test_running_out_of_memory(vat: Vat) -> None:
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            other = await healthy(stack, vat)
            bad = await stack.enter_async_context(capbus.spawn(vat, "children:runaway", code=[HERE]))
            assert await bad.wait() == 1
            assert bad.describe_exit() == "exited with status 1: MemoryError"
            await still_served(other)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_offers_are_bounded(vat: Vat) -> None:
    """A child offering its parent fd after fd: at most 256 names, and an fd offered again
    under a name replaces (and closes) the one before: the parent's fds stay bounded."""
    with trio.fail_after(60):
        async with capbus.spawn(vat, "children:prober", code=[HERE]) as child:
            prober = await child.capability("prober", schema.Prober)
            before = open_fds()
            same = await prober.offerMany(count=300, batch=20, sameName=True)
            assert (same.accepted, same.refusal) == (300, "")
            assert open_fds() <= before + 2  # one fd kept under the one name
            many = await prober.offerMany(count=300, batch=20, sameName=False)
            assert many.accepted == 240 and many.refusal.startswith("Overloaded")
            assert "at most 256" in many.refusal
            assert open_fds() <= before + 260
            # Names are bounded too: the parent keeps them.
            refusal = (await prober.offerNamed(name="n" * 1000)).refusal
            assert refusal.startswith("Failed: an offer holds at most")
            await still_served(prober)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"  # a zombie is gone but for reaping
    except FileNotFoundError:
        return True


def _cgroups_of_this_process() -> list[str]:
    return [root for root, _, _ in os.walk("/sys/fs/cgroup") if f"/capbus-{os.getpid()}-" in root + "/"]


async def test_what_a_child_leaves_behind_is_killed_too(vat: Vat) -> None:
    """Without a pid namespace, an orphan the child left when it exited is still in its
    cgroup: leaving the block kills it, and the cgroup goes."""
    sandbox = capbus.Sandbox.strict().without("pid_namespace")
    with trio.fail_after(60):
        async with capbus.spawn(vat, "children:orphan_then_exit", code=[HERE], sandbox=sandbox) as child:
            assert await child.wait() == 0
            orphan = int(child.stderr.decode().split("ORPHAN", 1)[1].split()[0])
            assert not _gone(orphan)  # it outlived the child
        while not _gone(orphan):  # polled, bounded by fail_after: its reaping is init's
            await trio.sleep(0.01)
    assert _cgroups_of_this_process() == []


async def test_a_child_that_fails_to_exec_leaves_no_cgroup(vat: Vat) -> None:
    with trio.fail_after(30), pytest.raises(FileNotFoundError):
        async with capbus.spawn(vat, "children:prober", code=[HERE], python="/nonexistent/python"):
            pass
    assert _cgroups_of_this_process() == []


async def test_swap_counts_against_the_memory_limit(vat: Vat) -> None:
    """The cgroup bounds memory and swap together (a child could otherwise spill into swap
    past its limit)."""
    with trio.fail_after(30):
        async with capbus.spawn(vat, "children:prober", code=[HERE]) as child:
            assert child._cgroup is not None
            memory = child._cgroup.directories[0]
            limits = {}
            for name in (
                "memory.limit_in_bytes",
                "memory.memsw.limit_in_bytes",
                "memory.max",
                "memory.swap.max",
            ):
                path = os.path.join(memory, name)
                if os.path.exists(path):
                    with open(path) as f:
                        limits[name] = f.read().strip()
            expected = str((2 << 30) * 5 // 4)
            assert limits.get("memory.memsw.limit_in_bytes", expected) == expected
            assert limits.get("memory.swap.max", "0") == "0"
            assert expected in limits.values()
