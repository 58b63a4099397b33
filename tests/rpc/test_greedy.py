"""An RPC server stays honest under a greedy client (finding F4 of the hardening review): a
client that keeps every capability it is given filled the server peer's nodes (the kernel's
nodes_owned); the QuotaExceeded of making the next node was swallowed as "the caller is
gone", and every later call that handed out an object, from every client, hung with no
error. Now: one caller may hold at most ``max_exports_per_caller`` objects from returns
(then Overloaded, to it only), and a return that cannot be sent fails its call with a precise
exception, never a silent hang."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc import errors
from capbus.rpc.vat import Vat, open_vat

from .processes import attacker_process
from .services import FactoryServer, schema

TIMEOUT = 20


@asynccontextmanager
async def server_and_clients(
    kernel: capbus.Kernel, **vat_options: int
) -> AsyncIterator[tuple[Vat, Vat, Any, Any, capbus.Handle]]:
    """A factory server and two clients of it, each on a peer of its own: (server vat,
    greedy vat, greedy's factory, honest's factory, the factory's node). The two clients
    are peers of this process, so the server sees them as one caller."""
    server_peer, greedy_peer, honest_peer = [await kernel.connect() for _ in range(3)]
    async with (
        open_vat(server_peer, **vat_options) as server,
        open_vat(greedy_peer) as greedy_vat,
        open_vat(honest_peer) as honest_vat,
    ):
        node = await server.export(FactoryServer())
        greedy = greedy_vat.client(await server_peer.transfer(node, greedy_peer), schema.Factory)
        honest = honest_vat.client(await server_peer.transfer(node, honest_peer), schema.Factory)
        yield server, greedy_vat, greedy, honest, node
    for peer in (server_peer, greedy_peer, honest_peer):
        await peer.aclose()


HONEST = """
async def attack(peer, report, target):  # (not one: an honest caller in a process of its own)
    async with open_vat(peer) as vat:
        counter = (await vat.client(target, schema.Factory).newCounter()).counter
        await report((await counter.increment(by=2)).value)
"""


async def test_a_caller_that_keeps_everything_is_bounded_and_others_are_served(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    async with server_and_clients(kernel, max_exports_per_caller=20) as (server, greedy_vat, greedy, _, node):
        with trio.fail_after(TIMEOUT):
            kept = [(await greedy.newCounter()).counter for _ in range(20)]
            with pytest.raises(errors.Overloaded, match="holds 20 objects of this vat and may hold 20"):
                await greedy.newCounter()
            # Others (another process: callers are processes) are served, and what the
            # greedy one holds still works.
            async with attacker_process(kernel, tmp_path, HONEST, server.peer, [node]) as value:
                assert value == "2"
            assert (await kept[0].increment(by=1)).value == 1
            # Dropping some lets it be given more, once the server hears they are released.
            exports = server.statistics().exports
            for client in kept[:5]:
                await greedy_vat.drop(client)
            while server.statistics().exports > exports - 5:
                await trio.sleep(0.001)
            more = [(await greedy.newCounter()).counter for _ in range(5)]
            assert (await more[-1].increment(by=3)).value == 3
            with pytest.raises(errors.Overloaded):
                await greedy.newCounter()


async def test_a_server_out_of_nodes_fails_calls_instead_of_hanging() -> None:
    """The kernel's own bound (nodes_owned) reached first: every call that would hand out an
    object fails with Overloaded naming the cause, for every caller; calls that hand out
    nothing are served; nothing hangs."""
    async with capbus.open_kernel(limits=capbus.Limits(nodes_owned=12)) as kernel:
        async with server_and_clients(kernel) as (_server, _greedy_vat, greedy, honest, _node):
            with trio.fail_after(TIMEOUT):
                kept = []
                with pytest.raises(
                    errors.Overloaded, match="results could not be sent: create_node: Disk quota exceeded"
                ):
                    for _ in range(20):
                        kept.append((await greedy.newCounter()).counter)
                assert 5 <= len(kept) < 12
                with pytest.raises(errors.Overloaded, match="results could not be sent"):
                    await honest.newCounter()
                assert (await honest.echo(text="still here")).text == "still here"
                assert (await kept[0].increment(by=4)).value == 4
