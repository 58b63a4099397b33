"""A vat closing gracefully (issue 13, part 4): Vat.shutdown stops new calls (its objects'
nodes go), answers every call already queued for it, lets running calls finish, then
closes. On an embedded kernel, and on a daemon with the server in another process."""

from __future__ import annotations

import trio
import trio.testing

import capbus
from capbus.rpc import errors
from capbus.rpc.vat import open_vat

from .services import FactoryServer, schema

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
            assert server_peer.closed
            with (
                trio.fail_after(TIMEOUT),
                trio.testing.RaisesGroup(errors.Disconnected, allow_unwrapped=True),
            ):
                await factory.echo(text="after")
    await client_peer.aclose()


async def test_shutdown_waits_at_most_its_grace(kernel: capbus.Kernel) -> None:
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    server = FactoryServer()  # (slow() never returns by itself)
    async with open_vat(client_peer) as client_vat, open_vat(server_peer) as server_vat:
        node = await server_vat.export(server)
        factory = client_vat.client(await server_peer.transfer(node, client_peer), schema.Factory)
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                failed: list[BaseException] = []

                async def stuck() -> None:
                    try:
                        await factory.slow()
                    except errors.RpcError as error:
                        failed.append(error)  # (cut off: its server went, unanswered)

                nursery.start_soon(stuck)
                await server.slow_started.wait()
                await server_vat.shutdown(grace=0.2)
                await server.slow_cancelled.wait()  # (the stuck handler was cancelled)
        assert len(failed) == 1 and isinstance(failed[0], errors.Disconnected)
    await client_peer.aclose()
