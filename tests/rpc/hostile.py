"""What the attack tests (test_attacks_review*.py, test_uid_bounds.py) share: a bare peer's
view of what a vat sends it, and how a test tells a crashed vat from a failed check."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc import protocol
from capbus.rpc.vat import open_vat
from capbus.testing import wait_for_statistics

from .processes import attacker_process, reporting_process
from .services import FactoryServer, next_call, schema

TIMEOUT = 20
SAME = schema.Factory.interface.methods["same"]
ECHO = schema.Factory.interface.methods["echo"]
SLOW = schema.Factory.interface.methods["slow"]
NEW_COUNTER = schema.Factory.interface.methods["newCounter"]
SPAWN = schema.Counter.interface.methods["spawn"]


def fail_if_crashed(error: BaseException, kind: type[BaseException], cause: str) -> None:
    """Fails the test, saying so, if ``error`` (as nurseries wrap it) is the vat's crash."""
    crash = error
    while isinstance(crash, BaseExceptionGroup) and len(crash.exceptions) == 1:
        crash = crash.exceptions[0]
    if isinstance(crash, kind):
        pytest.fail(f"the server's vat crashed on {cause}: {crash!r}")


async def until(condition: Callable[[], Any]) -> None:
    """Polls ``condition()`` (a vat's counters settle as messages arrive); bounded by the
    caller's fail_after."""
    while not condition():
        await trio.sleep(0.001)


async def next_return(peer: capbus.Peer) -> protocol.ReceivedReturn:
    """The next return a bare peer (playing a hostile caller) receives, skipping the rest."""
    while True:
        message = await peer.recv()
        if message.kind is capbus.MessageKind.DATA:
            received = protocol.decode(message.payload_view, [None] * len(message.handles))
            if isinstance(received, protocol.ReceivedReturn):
                return received


def open_fds() -> int:
    """File descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


async def assert_a_chain_is_served(
    kernel: capbus.Kernel, server: FactoryServer, base: protocol.Encoded, own: bool, cause: str
) -> None:
    """A hostile caller pipelines 2,000 spawn() calls, each on the previous one's results,
    on ``base`` (question 1, whose results' pointer 0 holds a Counter; with ``own`` its
    second capability is a node of the attacker's own); ``server.gate`` holds the base
    until all wait. The chain must settle (its last call answered) and the vat serve on;
    a RecursionError that kills the vat fails the test as such (``cause``)."""
    links = 2000
    server_peer, attacker, honest = await kernel.connect(), await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(honest) as honest_vat:
            server.gate = trio.Event()
            node = await server_vat.export(server)
            factory = honest_vat.client(await server_peer.transfer(node, honest), schema.Factory)
            target = await server_peer.transfer(node, attacker)
            reply = await attacker.create_node()
            handles = [reply, await attacker.create_node()] if own else [reply]
            with trio.fail_after(TIMEOUT):
                await attacker.send(target, base.payload, handles=handles)
                for question in range(2, links + 2):
                    link = protocol.encode_call(
                        question, SPAWN, {}, keep_results=True, pipeline=(question - 1, [0])
                    )
                    await attacker.send(target, link.payload, handles=[reply])
                await until(lambda: server_vat.engine.waiting_calls == links)
                server.gate.set()
                while (await next_return(attacker)).question_id != links + 1:
                    pass
                assert (await factory.echo("still serving")).text == "still serving"
    except BaseException as error:  # noqa: BLE001 - the vat died: say so
        fail_if_crashed(error, RecursionError, cause)
        raise
    finally:
        for peer in (server_peer, attacker, honest):
            await peer.aclose()


async def until_taken_or_refused(attacker: capbus.Peer, taken: Callable[[], int], calls: int) -> None:
    """Waits until each of ``calls`` calls the attacker sent is either held by the vat (of
    ``taken()``) or was answered with an error."""
    refused = 0

    async def count_refusals() -> None:
        nonlocal refused
        while True:
            refused += (await next_return(attacker)).error is not None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(count_refusals)
        await until(lambda: taken() + refused == calls)
        nursery.cancel_scope.cancel()


HONEST_LARGE_CALL = """
async def attack(peer, report, target, results):
    go = await peer.create_node()
    await report("ready", [go])
    await peer.recv()  # the test's word: the server's fds are used up by now
    async with open_vat(peer) as vat:
        factory = vat.client(target, schema.Factory)
        try:
            with trio.fail_after(5):
                answer = await factory.echo("y" * 140000)
            outcome = "answered" if answer.text == "y" * 140000 else "a wrong answer"
        except trio.TooSlowError:
            outcome = "no answer and no error in 5 s"
        except Exception as error:
            outcome = "failed: " + type(error).__name__
        await peer.send(results, outcome.encode())
"""


async def honest_large_call_after(
    kernel: capbus.Kernel,
    tmp_path: Path,
    server_peer: capbus.Peer,
    factory_node: capbus.Handle,
    flood: str,
    flood_handles: list[capbus.Handle],
) -> str:
    """With room for only 100 more fds in this process (the server's: a lowered
    RLIMIT_NOFILE), runs ``flood`` (an attack script, given ``flood_handles``) in a process
    of its own until it reports "sent" and the server has read every message it sent (their
    memfds are in flight until then); then an honest process calls echo() with 140 KB of
    text on ``factory_node``. Returns what became of that call ("answered", or why not)."""
    inbox = await kernel.connect()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        results = await inbox.create_node()
        factory = await server_peer.transfer(factory_node, inbox)
        (tmp_path / "honest").mkdir()
        (tmp_path / "flood").mkdir()
        async with reporting_process(
            kernel, tmp_path / "honest", HONEST_LARGE_CALL, inbox, [factory, results]
        ) as ready:
            (go,) = ready.handles
            numbers = [int(name) for name in os.listdir("/proc/self/fd")]
            # (room for 100 more fds, or what the holes in the fd table leave)
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(max(numbers) + 1, len(numbers) + 100), hard))
            async with attacker_process(
                kernel, tmp_path / "flood", flood, server_peer, flood_handles
            ) as sent:
                assert sent == "sent"
                await wait_for_statistics(kernel, lambda s: s.fds_in_flight == 0)
                await go.peer.send(go, b"go")
                return bytes((await inbox.recv()).payload_view).decode()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await inbox.aclose()


async def fds_held_by_kept_results(
    kernel: capbus.Kernel,
    interface: Any,
    call: Callable[[Any], Any],
    answer: Callable[[protocol.ReceivedCall], protocol.Encoded],
    calls: int = 100,
) -> int:
    """A client of a bare peer playing a hostile server (it answers every call with
    ``answer(call)``) makes ``calls`` calls (``call(client)``) and keeps every results
    object: how many more fds its process holds then."""
    client_peer, hostile = await kernel.connect(), await kernel.connect()
    try:
        handle = await hostile.transfer(await hostile.create_node(), client_peer)

        async def serve() -> None:
            while True:
                message, received = await next_call(hostile)
                await hostile.send(message.handles[received.reply], answer(received).payload)

        async with open_vat(client_peer) as vat, trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            client = vat.client(handle, interface)
            with trio.fail_after(TIMEOUT):
                before = open_fds()
                kept = [await call(client) for _ in range(calls)]
                held = open_fds() - before
            del kept
            nursery.cancel_scope.cancel()
        return held
    finally:
        await client_peer.aclose()
        await hostile.aclose()


def assert_no_file_stolen(stolen: list[int], pipe_end: int, what: str) -> None:
    """Of the fds a hostile callee got (``stolen``), none may be a file other than the pipe
    ``pipe_end`` belongs to (the caller's secret is what the attack would get)."""
    pipe = os.fstat(pipe_end).st_ino
    got = [b"<the pipe>" if os.fstat(fd).st_ino == pipe else os.pread(fd, 100, 0) for fd in stolen]
    assert b"the caller's secret" not in got, f"{what} sent the callee a file it was never given: {got}"


def close_all(fds: list[int]) -> None:
    """Closes each of ``fds`` that is still open."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
