"""A vat closing gracefully (issue 13, part 4): Vat.shutdown stops new calls (its objects'
nodes go), answers every call already queued for it, lets running calls finish, then
closes. On an embedded kernel, and on a daemon with the server in another process."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import capbus
from capbus.rpc import errors
from capbus.rpc.vat import open_vat

from .services import CounterServer, FactoryServer, schema

TIMEOUT = 30


async def test_calls_queued_before_shutdown_are_all_answered(kernel: capbus.Kernel) -> None:
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    server = FactoryServer()
    server.release_slow = trio.Event()
    answers: dict[int, str] = {}
    async with open_vat(client_peer) as client_vat:
        async with open_vat(server_peer, max_concurrent_calls=1) as server_vat:
            node = await server_vat.export(server)
            factory = client_vat.client(await server_peer.transfer(node, client_peer), schema.Factory)
            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(factory.slow)  # (holds the server's one slot)
                    await server.slow_started.wait()

                    async def echo(index: int) -> None:
                        answers[index] = (await factory.echo(text=f"queued {index}")).text

                    for index in range(40):
                        nursery.start_soon(echo, index)
                    await trio.testing.wait_all_tasks_blocked()
                    await client_peer.info()  # (every call before it is committed to the kernel)
                    nursery.start_soon(server_vat.shutdown)
                    await trio.testing.wait_all_tasks_blocked()
                    server.release_slow.set()
            assert answers == {index: f"queued {index}" for index in range(40)}
            assert not server_peer.closed  # (until the block's end)
        assert server_peer.closed  # (shut down: its peer went with the block)
        with trio.fail_after(TIMEOUT), pytest.raises(errors.Disconnected):
            await factory.echo(text="after")
    await client_peer.aclose()


async def test_shutdown_waits_at_most_its_grace(kernel: capbus.Kernel) -> None:
    """A handler that never ends: shutdown returns after its grace, the block's end cuts
    the handler and disconnects the peer, and the caller hears that its server went."""
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    server = FactoryServer()  # (slow() never returns by itself)
    failed: list[BaseException] = []
    async with open_vat(client_peer) as client_vat:
        async with trio.open_nursery() as nursery:
            async with open_vat(server_peer) as server_vat:
                node = await server_vat.export(server)
                factory = client_vat.client(await server_peer.transfer(node, client_peer), schema.Factory)

                async def stuck() -> None:
                    try:
                        await factory.slow()
                    except errors.RpcError as error:
                        failed.append(error)  # (cut off: its server went, unanswered)

                with trio.fail_after(TIMEOUT):
                    nursery.start_soon(stuck)
                    await server.slow_started.wait()
                    await server_vat.shutdown(grace=0.2)
                assert server.running == 1  # (still running: shutdown only waited)
            assert server.slow_cancelled.is_set() and server_peer.closed  # (cut by the block's end)
        assert len(failed) == 1 and isinstance(failed[0], errors.Disconnected)
    await client_peer.aclose()


class GatedCounter(CounterServer):
    """A client's object whose answer waits for the test: keeps a server's handler, which
    calls it, in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.called = trio.Event()
        self.gate = trio.Event()

    async def increment(self, by: int) -> int:
        self.called.set()
        await self.gate.wait()
        return await super().increment(by + 5)


async def test_a_handler_calling_out_during_shutdown_still_gets_its_answer(kernel: capbus.Kernel) -> None:
    """The vat keeps its reply nodes through the shutdown: a call its handler makes is
    answered, and the handler's own answer goes out before the vat closes."""
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    counter = GatedCounter()
    async with open_vat(client_peer) as client_vat:
        async with open_vat(server_peer) as server_vat:
            node = await server_vat.export(FactoryServer())
            factory = client_vat.client(await server_peer.transfer(node, client_peer), schema.Factory)
            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:
                    totals: list[int] = []

                    async def summing() -> None:
                        totals.append((await factory.sum(counters=[client_vat.local(counter)])).total)

                    nursery.start_soon(summing)
                    await counter.called.wait()  # (the server's handler waits on our counter)
                    nursery.start_soon(server_vat.shutdown)
                    await server_vat._drained.wait()  # (shut down: its factory node is gone)
                    counter.gate.set()
            assert totals == [5]
        assert server_peer.closed
    await client_peer.aclose()
