"""Attacks on the newest commits (ninth review): a caller reads its own return, Data/Text
read as memoryviews, and retired nodes kept for the next objects a vat exports."""

from __future__ import annotations

import contextvars
from typing import Any

import trio

import capbus
from capbus.rpc import protocol
from capbus.rpc.vat import open_vat

from .hostile import ECHO, NEW_COUNTER, TIMEOUT
from .services import CounterServer, next_call, schema

INCREMENT = schema.Counter.interface.methods["increment"]


class SameCounterFactory(schema.Factory.Server):  # type: ignore[misc,name-defined]
    """newCounter hands out one and the same counter every time (a plain-function handler:
    served inline, its return sent by a task of its own since it hands out an object)."""

    def __init__(self) -> None:
        self.counter = CounterServer()

    def newCounter(self) -> CounterServer:  # noqa: N802
        return self.counter

    def echo(self, text: str) -> str:
        return text


async def _return_of(peer: capbus.Peer, question: int) -> tuple[protocol.ReceivedReturn, capbus.Message]:
    while True:
        message = await peer.recv()
        if message.kind is not capbus.MessageKind.DATA:
            continue
        received = protocol.decode(message.payload_view, list(range(len(message.handles))))
        if isinstance(received, protocol.ReceivedReturn) and received.question_id == question:
            return received, message


def _nodes_of(vat: Any, server: object) -> list[int]:
    return [node for node, exported in vat.engine.exports.items() if exported is server]


async def test_a_node_handed_out_again_while_it_retires_is_recycled_under_its_holder(
    kernel: capbus.Kernel,
) -> None:
    """HIGH. Node recycling (Vat._retire, SPARE_NODES) trusts Engine.retire's check that no
    send of ours carries the node (_export_busy), but that check runs when the _retire task
    resumes after the kernel's handle_state reply, and the send that hands the node out
    again may have been written after handle_state was answered (holders 0) and acknowledged
    before _retire resumes (both replies read in one go; trio runs the woken tasks in either
    order). A hostile caller releases the object it got from newCounter() (NODE_RELEASED)
    and at once calls newCounter() again, which returns the same object, on the same node:
    the return's send and the _retire's handle_state race. When they interleave so, the
    vat forgets the export and keeps its node as a spare while the caller holds a handle to
    it (before this commit the node was destroyed: the caller's handle died). The next object
    the vat exports, for anyone, gets that node: the attacker's old handle now reaches the
    victim's new object (identity confusion; here it increments another caller's counter).
    Fix: make the retire decision race-free: record a per-node generation/"handed out"
    counter that every send carrying the node bumps (before its write) and have _retire
    compare it with the value seen before it asked handle_state; or query holders only after
    all sends carrying it are acknowledged and re-query after any; never recycle a node
    whose handle_state was asked before a send of it was written. (The race itself predates
    this commit: the node was then destroyed under its holder, a self-inflicted dead handle;
    recycling turns it into reaching another object.)"""
    attacker, server_peer = await kernel.connect(), await kernel.connect()
    server = SameCounterFactory()
    victim = CounterServer()
    rounds = 300
    try:
        async with open_vat(server_peer) as server_vat:
            target = await server_peer.transfer(await server_vat.export(server), attacker)
            reply = await attacker.create_node()
            with trio.fail_after(TIMEOUT * 3):
                question = 1
                call = protocol.encode_call(question, NEW_COUNTER, {})
                await attacker.send(target, bytes(call.payload), handles=[reply])
                received, message = await _return_of(attacker, question)
                held = message.handles[0]
                hit = False
                for _ in range(rounds):
                    # Release the counter and ask for it again, back to back.
                    await attacker.release(held)
                    question += 1
                    call = protocol.encode_call(question, NEW_COUNTER, {})
                    await attacker.send(target, bytes(call.payload), handles=[reply])
                    received, message = await _return_of(attacker, question)
                    assert message.handles, "newCounter() returned no capability"
                    held = message.handles[0]
                    # A round trip through the vat: the _retire of this round is done.
                    question += 1
                    ping = protocol.encode_call(question, ECHO, {"text": "ping"})
                    await attacker.send(target, bytes(ping.payload), handles=[reply])
                    await _return_of(attacker, question)
                    if not _nodes_of(server_vat, server.counter):
                        hit = True  # the vat let go of the node the attacker holds
                        break
                if hit:
                    # The next object the vat exports (another caller's, say) takes a
                    # spare node: the attacker calls it through its old handle.
                    await server_vat.export(victim)
                    question += 1
                    call = protocol.encode_call(question, INCREMENT, {"by": 1000})
                    try:
                        await attacker.send(held, bytes(call.payload), handles=[reply])
                    except capbus.CapbusError:
                        pass  # (before recycling: the node was destroyed under its holder)
                    else:
                        await _return_of(attacker, question)
            assert not hit or victim.value == 0, (
                "the vat recycled the node of an object the attacker still holds: through its"
                f" old handle the attacker reached a new object (victim's value {victim.value})"
            )
            assert not hit, (
                "the vat retired the node of an object the attacker still holds (handed out"
                " again while its handle_state was in flight)"
            )
    finally:
        await attacker.aclose()
        await server_peer.aclose()


class ViewingEcho(schema.Factory.Server):  # type: ignore[misc,name-defined]
    """echo takes its Text param as a view (the memoryview annotation); records what it got."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def echo(self, text: memoryview) -> str:
        self.got.append(bytes(text))
        return "ok"


class CopyingEcho(schema.Factory.Server):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        self.got: list[str] = []

    def echo(self, text: str) -> str:
        self.got.append(text)
        return "ok"


async def _echo_raw(kernel: capbus.Kernel, server: Any, payload: bytes) -> protocol.ReceivedReturn:
    attacker, server_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat:
            target = await server_peer.transfer(await server_vat.export(server), attacker)
            reply = await attacker.create_node()
            with trio.fail_after(TIMEOUT):
                await attacker.send(target, payload, handles=[reply])
                return (await _return_of(attacker, 1))[0]
    finally:
        await attacker.aclose()
        await server_peer.aclose()


async def test_a_text_view_hands_the_handler_bytes_that_are_not_utf8(kernel: capbus.Kernel) -> None:
    """LOW. FlatReader.view (flat.py _blob_span) checks a Text's bounds and its closing NUL
    but not that it is UTF-8, nor free of NULs inside, where every other way of reading Text
    refuses it (the flat reader's str() falls back to pycapnp, which fails the call as
    malformed before the handler runs). A hostile caller sends echo() a Text of invalid UTF-8
    with a NUL inside: a handler that annotates it ``memoryview`` (as the commit suggests for
    speed) gets those bytes as if they were Text, so a handler that trusts the schema's Text
    (hands it on to a C API, a path, a log, a parser expecting UTF-8) is fed what the same
    handler taking ``str`` would never see. Fix: validate a Text view's bytes as UTF-8 (one
    pass, e.g. codecs.utf_8_decode on the view or a C check) before handing it out, and fail
    the call as malformed otherwise, as the copying path does."""
    call = bytes(protocol.encode_call(1, ECHO, {"text": "AAAAAAA"}).payload)
    assert call.count(b"AAAAAAA\x00") == 1
    hostile = call.replace(b"AAAAAAA\x00", b"\xff\xfeA\x00B\xc3(\x00")
    copying = CopyingEcho()
    refused = await _echo_raw(kernel, copying, hostile)
    viewing = ViewingEcho()
    taken = await _echo_raw(kernel, viewing, hostile)
    assert not copying.got and refused.error is not None  # what a str handler sees: nothing
    assert not viewing.got, (
        f"a Text param read as a view handed the handler {viewing.got!r} (not UTF-8, a NUL"
        f" inside), where a str handler's call is refused: {refused.error!r}; the view's"
        f" call was answered {taken.error!r}"
    )


ROLE: contextvars.ContextVar[str] = contextvars.ContextVar("ROLE", default="nobody")
"""What an application keeps per task (the identity a request acts as, a trace id, ...)."""


class RoleRecorder(schema.Factory.Server):  # type: ignore[misc,name-defined]
    """echo (inline: a plain function) and newCounter (a task of its own) record the ROLE
    their handler runs under; echo also sets ROLE to what its caller sent, as a handler that
    keeps the request's identity in a context variable would."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def echo(self, text: str) -> str:
        self.seen.append(("echo", ROLE.get()))
        ROLE.set(text)  # (the handler's own context, it believes)
        return text

    async def newCounter(self) -> CounterServer:  # noqa: N802
        self.seen.append(("newCounter", ROLE.get()))
        return CounterServer()


async def test_a_call_served_while_a_caller_reads_runs_in_that_callers_context(
    kernel: capbus.Kernel,
) -> None:
    """MEDIUM. While a caller awaits its return it now reads the socket itself
    (Vat._await_return) and handles everything that arrives in its own task: a plain-function
    handler for another peer's call runs right in the caller's task, in the caller's
    contextvars.Context, and an async handler's task is started (nursery.start_soon) from
    the caller's task, so it runs in a copy of the caller's context (trio copies the
    spawning task's context). Before, the receive loop did both, in the vat's context. An
    application that keeps per-request state in context variables (the role or user a
    request acts as, a tenant, a trace id: the usual way in async Python) now serves a
    hostile peer's call as whichever innocent caller happened to be waiting: here the
    attacker's calls run with ROLE='admin', set by the vat's own task before its outgoing
    call. Worse, the inline handler's ROLE.set() (meant for its own request) lands in the
    caller's context: after its call returns, the innocent caller runs as whatever the
    attacker sent ('root'). (Before this commit an inline handler's set() already stayed in
    the receive loop's context, reaching later handlers of any caller: a lesser, older form of
    the same missing isolation.) Fix: run _deliver in the vat's own context when a caller reads
    (contextvars.Context.run with a context captured in open_vat, for the inline handlers and
    for the start_soon of handler tasks: nursery.start_soon(..., context=...) / a fresh
    copy of the vat's context), or give handler tasks an explicitly captured context."""
    vat_peer, callee, attacker = await kernel.connect(), await kernel.connect(), await kernel.connect()
    recorder = RoleRecorder()
    try:
        async with open_vat(vat_peer) as vat:
            # The vat's object the attacker calls, and a hostile callee's the vat calls.
            target = await vat_peer.transfer(await vat.export(recorder), attacker)
            remote_node = await callee.create_node()
            remote = vat.client(await callee.transfer(remote_node, vat_peer), schema.Factory)
            reply = await attacker.create_node()
            after: list[str] = []

            async def innocent_caller() -> None:
                ROLE.set("admin")
                await remote.echo(text="hi")
                after.append(ROLE.get())

            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(innocent_caller)
                    message, call = await next_call(callee)  # the innocent caller now reads
                    # The attacker calls the vat's object meanwhile (both kinds of handler).
                    await attacker.send(
                        target, bytes(protocol.encode_call(1, NEW_COUNTER, {}).payload), handles=[reply]
                    )
                    await _return_of(attacker, 1)
                    await attacker.send(
                        target,
                        bytes(protocol.encode_call(2, ECHO, {"text": "root"}).payload),
                        handles=[reply],
                    )
                    await _return_of(attacker, 2)
                    answer = protocol.encode_results(call.question_id, ECHO, {"text": "hi"})
                    await callee.send(message.handles[call.reply], bytes(answer.payload))
            assert "admin" not in {role for _, role in recorder.seen} and after == ["admin"], (
                f"the attacker's calls were served with the waiting caller's context ({recorder.seen});"
                f" after its call the innocent caller runs as {after}"
            )
    finally:
        await vat_peer.aclose()
        await callee.aclose()
        await attacker.aclose()
