"""Calls with malformed or hostile content get a precise exception, and the server keeps
serving. The attacker is a bare peer that writes envelopes by hand."""

from __future__ import annotations

import os
import re
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc import capwire, errors, header, protocol
from capbus.rpc.vat import Vat, open_vat
from capbus.testing import wait_for_statistics

from .processes import reporting_process
from .services import FactoryServer, made_nodes, next_call, schema

CALL = protocol.ENVELOPE.fields["call"].slot
PARAMS = protocol.layout_of(protocol.rpc.Call.schema).fields["params"].slot
RETURN = protocol.ENVELOPE.fields["return"].slot
SAME = schema.Factory.interface.methods["same"]
ECHO = schema.Factory.interface.methods["echo"]


@dataclass
class Attack:
    attacker: capbus.Peer
    reply: capbus.Handle
    target: capbus.Handle
    server: Vat
    factory: Any  # a well-behaved client of the same server


@pytest.fixture
async def attack(kernel: capbus.Kernel) -> AsyncIterator[Attack]:
    server_peer = await kernel.connect()
    attacker = await kernel.connect()
    honest = await kernel.connect()
    async with (
        open_vat(server_peer, max_message_bytes=64 * 1024) as server_vat,
        open_vat(honest) as honest_vat,
    ):
        node = await server_vat.export(FactoryServer())
        reply = await attacker.create_node()
        target = await server_peer.transfer(node, attacker)
        factory = honest_vat.client(await server_peer.transfer(node, honest), schema.Factory)
        yield Attack(attacker, reply, target, server_vat, factory)
    for peer in (server_peer, attacker, honest):
        await peer.aclose()


async def answer_to(attack: Attack, payload: bytes, handles: list[capbus.Handle]) -> errors.RpcError:
    """Sends a hand-made call and returns the exception the server answered with."""
    await attack.attacker.send(attack.target, payload, handles=handles)
    message = await attack.attacker.recv()
    while message.kind is not capbus.MessageKind.DATA:  # e.g. the server let go of our reply node
        message = await attack.attacker.recv()
    assert message.destination == attack.reply
    returned = protocol.decode(message.payload_view, [None] * len(message.handles))
    assert isinstance(returned, protocol.ReceivedReturn) and returned.error is not None
    return returned.error


def with_word(payload: bytes, path: capwire.Path, word: int) -> bytes:
    segments = [bytearray(s) for s in capwire.unframe(payload)]
    location = capwire.locate(segments, path)
    assert location is not None
    struct.pack_into("<Q", segments[location[0]], location[1] * 8, word)
    return capwire.frame_header(segments) + b"".join(segments)


async def test_malformed_params_get_failed(attack: Attack) -> None:
    call = protocol.encode_call(11, ECHO, {"text": "hi"})
    out_of_bounds = 0 | (1000 << 2) | (1 << 32)  # a struct pointer far past the segment
    payload = with_word(call.payload, (("p", CALL), ("p", PARAMS)), out_of_bounds)
    with trio.fail_after(10):
        error = await answer_to(attack, payload, [attack.reply])
        assert isinstance(error, errors.Failed) and "malformed" in error.reason
        assert re.search("out.of.bounds", error.reason) and "stack:" not in error.reason
        assert (await attack.factory.echo("still serving")).text == "still serving"


async def test_malformed_body_behind_a_well_formed_header_gets_failed(attack: Attack) -> None:
    """The hand-read header (header.py) is intact; the params struct it points to is not."""
    call = protocol.encode_call(15, ECHO, {"text": "hi"})
    segments = [bytearray(s) for s in capwire.unframe(call.payload)]
    struct.pack_into("<Q", segments[1], 0, 0 | (1000 << 2) | (1 << 32))  # body root: out of bounds
    assert header.read(segments) is not None  # the fast path is the one under attack
    payload = capwire.frame_header(segments) + b"".join(segments)
    with trio.fail_after(10):
        error = await answer_to(attack, payload, [attack.reply])
        assert isinstance(error, errors.Failed) and "malformed" in error.reason
        assert re.search("out.of.bounds", error.reason) and "stack:" not in error.reason
        assert (await attack.factory.echo("still serving")).text == "still serving"


async def test_capability_index_past_the_attached_handles(attack: Attack) -> None:
    call = protocol.encode_call(12, SAME, {})
    cap_slot = SAME.params_layout.fields["cap"].slot
    segments = capwire.patch_caps(
        capwire.unframe(call.payload), [((("p", CALL), ("p", PARAMS), ("p", cap_slot)), 5)]
    )
    payload = capwire.frame_header(segments) + b"".join(bytes(s) for s in segments)
    with trio.fail_after(10):
        error = await answer_to(attack, payload, [attack.reply])
        assert isinstance(error, errors.Failed) and "capability index 5 past the 1 attached" in error.reason
        assert (await attack.factory.echo("still serving")).text == "still serving"


async def test_unknown_interface_or_method_gets_unimplemented(attack: Attack) -> None:
    with trio.fail_after(10):
        for interface_id, method_id in ((0x1234_5678_9ABC_DEF0, 0), (ECHO.interface_id, 99)):
            call = protocol.rpc.Envelope.new_message()
            body = call.init("call")
            body.questionId = 13
            body.interfaceId = interface_id
            body.methodId = method_id
            segments = call.to_segments()
            reply_slot = protocol.layout_of(protocol.rpc.Call.schema).fields["replyTo"].slot
            segments = capwire.patch_caps(segments, [((("p", CALL), ("p", reply_slot)), 0)])
            payload = capwire.frame_header(segments) + b"".join(bytes(s) for s in segments)
            error = await answer_to(attack, payload, [attack.reply])
            assert isinstance(error, errors.Unimplemented)
        assert (await attack.factory.echo("still serving")).text == "still serving"


async def test_oversized_call_gets_failed(attack: Attack) -> None:
    call = protocol.encode_call(14, ECHO, {"text": "x" * 100_000})
    with trio.fail_after(10):
        error = await answer_to(attack, call.payload, [attack.reply])
        assert isinstance(error, errors.Failed) and "over the receiving vat's limit" in error.reason
        assert (await attack.factory.echo("still serving")).text == "still serving"


async def test_garbage_is_dropped_and_the_server_goes_on(attack: Attack) -> None:
    with trio.fail_after(10):
        for size in (0, 7, 8, 64, 4096):
            await attack.attacker.send(attack.target, os.urandom(size), handles=[attack.reply])
        assert (await attack.factory.echo("still serving")).text == "still serving"
        assert attack.server.statistics().answers == 0


async def test_a_caller_is_told_of_a_malformed_return(kernel: capbus.Kernel) -> None:
    """A hostile server answers with a return the caller cannot read (a union member no
    schema has): the caller's call fails with Failed at once, not waiting forever, and the
    caller's vat goes on."""
    hostile = await kernel.connect()
    caller = await kernel.connect()
    async with open_vat(caller) as vat:
        node = await hostile.create_node()
        factory = vat.client(await hostile.transfer(node, caller), schema.Factory)
        outcome: list[BaseException] = []

        async def call() -> None:
            try:
                await factory.echo("anyone?")
            except errors.RpcError as error:
                outcome.append(error)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                message = await hostile.recv()
                received = protocol.decode(message.payload_view, list(range(len(message.handles))))
                assert isinstance(received, protocol.ReceivedCall) and isinstance(received.reply, int)
                answer = protocol.encode_exception(received.question_id, errors.Failed("x"))
                segments = [bytearray(s) for s in capwire.unframe(answer.payload)]
                slot = capwire.locate(segments, (("p", RETURN),))
                assert slot is not None
                pointer = struct.unpack_from("<Q", segments[slot[0]], slot[1] * 8)[0]
                data = (slot[1] + 1 + ((pointer >> 2) & 0x3FFFFFFF)) * 8  # the Return struct
                offset = protocol.rpc.Return.schema.node.struct.discriminantOffset * 2
                struct.pack_into("<H", segments[slot[0]], data + offset, 9)  # no such member
                broken = capwire.frame_header(segments) + b"".join(segments)
                await hostile.send(message.handles[received.reply], broken)
            assert len(outcome) == 1 and isinstance(outcome[0], errors.Failed)
            assert "malformed return" in outcome[0].reason
            await hostile.aclose()
            with pytest.raises(errors.Disconnected):
                await factory.echo("the vat goes on: this one fails cleanly too")
    await caller.aclose()


async def test_a_server_that_pipelines_onto_the_attackers_object_only_redirects(
    kernel: capbus.Kernel,
) -> None:
    """The attacker has the server pipeline a call onto the attacker's own object (once a
    way to make the server call it, and then lie in the answer): the server makes no call
    but answers with a redirect, holds nothing for it, and goes on serving."""
    server_peer, attacker, honest = await kernel.connect(), await kernel.connect(), await kernel.connect()
    async with open_vat(server_peer) as server_vat, open_vat(honest) as honest_vat:
        node = await server_vat.export(FactoryServer())
        target = await server_peer.transfer(node, attacker)
        factory = honest_vat.client(await server_peer.transfer(node, honest), schema.Factory)
        reply, own = await attacker.create_node(), await attacker.create_node()
        spawn = schema.Counter.interface.methods["spawn"]
        cap_slot = SAME.results_layout.fields["cap"].slot
        with trio.fail_after(10):
            first = protocol.encode_call(1, SAME, {"cap": "own"}, keep_results=True)
            await attacker.send(target, first.payload, handles=[reply, own])
            second = protocol.encode_call(2, spawn, {}, pipeline=(1, [cap_slot]))
            await attacker.send(target, second.payload, handles=[reply])
            answers: dict[int, protocol.ReceivedReturn] = {}
            while 2 not in answers:
                message = await attacker.recv()
                assert message.kind is capbus.MessageKind.DATA and message.destination == reply
                received = protocol.decode(message.payload_view, list(range(len(message.handles))))
                assert isinstance(received, protocol.ReceivedReturn)
                answers[received.question_id] = received
            assert answers[2].redirect
            assert (server_vat.statistics().questions, server_vat.engine.waiting_calls) == (0, 0)
            assert (await factory.echo("still serving")).text == "still serving"
    for peer in (server_peer, attacker, honest):
        await peer.aclose()


async def test_a_hostile_redirect_fails_only_the_call_it_answers(kernel: capbus.Kernel) -> None:
    """A callee that answers with redirects (rpc.capnp's Return.redirect) it has no cause
    for: a plain call redirected fails with why; a pipelined call redirected onto a null
    capability fails as null; and a redirect that arrives before the return it refers to
    (a callee may send them in any order) waits for it, then goes to the capability in it,
    which the attacker then answers. The caller's vat serves on throughout."""
    attacker, caller_peer = await kernel.connect(), await kernel.connect()
    async with open_vat(caller_peer) as caller_vat:
        node = await attacker.create_node()
        factory = caller_vat.client(await attacker.transfer(node, caller_peer), schema.Factory)
        increment = schema.Counter.interface.methods["increment"]
        async with trio.open_nursery() as nursery:
            outcomes: dict[str, Any] = {}

            async def run(name: str, call: Any) -> None:
                try:
                    outcomes[name] = await call()
                except errors.RpcError as error:
                    outcomes[name] = error

            with trio.fail_after(10):
                # A plain call, redirected.
                nursery.start_soon(run, "plain", lambda: factory.echo("hello"))
                message, call = await next_call(attacker)
                redirect = protocol.encode_redirect(call.question_id)
                await attacker.send(message.handles[call.reply], redirect.payload)
                # A pipelined call, redirected onto a null capability.
                promise = await factory.same.send()
                nursery.start_soon(run, "null", lambda: promise.cap.increment(by=1))
                base_message, base = await next_call(attacker)
                message, pipelined = await next_call(attacker)
                assert pipelined.promised is not None and pipelined.promised[0] == base.question_id
                redirect = protocol.encode_redirect(pipelined.question_id)
                await attacker.send(message.handles[pipelined.reply], redirect.payload)
                results = protocol.encode_results(base.question_id, SAME, {})
                await attacker.send(base_message.handles[base.reply], results.payload)
                # The redirect first, its base's return (with a real capability) after.
                own = await attacker.create_node()
                second = await factory.same.send()
                nursery.start_soon(run, "late", lambda: second.cap.increment(by=1))
                base_message, base = await next_call(attacker)
                message, pipelined = await next_call(attacker)
                redirect = protocol.encode_redirect(pipelined.question_id)
                await attacker.send(message.handles[pipelined.reply], redirect.payload)
                results = protocol.encode_results(base.question_id, SAME, {"cap": "own"})
                await attacker.send(base_message.handles[base.reply], results.payload, handles=[own])
                message, direct = await next_call(attacker)  # at `own`, from the caller
                assert message.destination == own and direct.promised is None
                answer = protocol.encode_results(direct.question_id, increment, {"value": 41})
                await attacker.send(message.handles[direct.reply], answer.payload)
                while len(outcomes) < 3:  # polled, bounded by fail_after
                    await trio.sleep(0.001)
        plain, null, late = outcomes["plain"], outcomes["null"], outcomes["late"]
        assert isinstance(plain, errors.Failed) and "not pipelined" in plain.reason, plain
        assert isinstance(null, errors.Failed) and "null" in null.reason, null
        assert late.value == 41
    for peer in (attacker, caller_peer):
        await peer.aclose()


async def test_objects_made_for_a_caller_that_left_are_retired(kernel: capbus.Kernel) -> None:
    """Calls that return new objects, whose caller destroys its reply node before the
    returns go out: the returns are refused, and the nodes made for them are destroyed
    rather than kept for ever (no one ever held them, so no release would retire them)."""
    server_peer, attacker = await kernel.connect(), await kernel.connect()
    async with open_vat(server_peer) as server_vat:
        server = FactoryServer()
        server.gate = trio.Event()  # newCounter waits for it
        node = await server_vat.export(server)
        target = await server_peer.transfer(node, attacker)
        with trio.fail_after(20):
            await wait_for_statistics(kernel, lambda s: s.nodes >= 2)
            before = made_nodes(kernel.statistics(), server_vat)
            new_counter = schema.Factory.interface.methods["newCounter"]
            replies = []
            for i in range(20):
                reply = await attacker.create_node()
                replies.append(reply)
                call = protocol.encode_call(i, new_counter, {})
                await attacker.send(target, call.payload, handles=[reply])
            await wait_for_statistics(kernel, lambda s: made_nodes(s, server_vat) == before + 20)  # all in
            while server_vat.statistics().answers < 20:  # polled, bounded by fail_after
                await trio.sleep(0.001)
            await attacker.destroy(*replies, release=True)
            server.gate.set()
            while server_vat.statistics().answers:  # every call answered (polled, bounded)
                await trio.sleep(0.001)
            # Back to where it was: 20 counters made, refused, retired.
            await wait_for_statistics(kernel, lambda s: made_nodes(s, server_vat) == before)
            assert server_vat.statistics().exports == 1  # the factory only
    for peer in (server_peer, attacker):
        await peer.aclose()


async def test_a_callee_cannot_answer_for_another(kernel: capbus.Kernel) -> None:
    """X, called once by H, holds H's reply handle. It forges returns for the ids around the
    question it saw, trying to answer H's pending call to Y with an object of its own: the
    question ids are unguessable, so none lands, and H gets Y's real answer."""
    x, y_peer, h_peer = await kernel.connect(), await kernel.connect(), await kernel.connect()
    y = FactoryServer()
    y.gate = trio.Event()
    async with open_vat(y_peer) as y_vat, open_vat(h_peer) as h_vat:
        factory_at_y = h_vat.client(await y_peer.transfer(await y_vat.export(y), h_peer), schema.Factory)
        x_node = await x.create_node()
        factory_at_x = h_vat.client(await x.transfer(x_node, h_peer), schema.Factory)
        new_counter = schema.Factory.interface.methods["newCounter"]
        with trio.fail_after(10):
            pending = await factory_at_y.newCounter.send()  # waits at Y's gate
            await factory_at_x.echo.send("hello X")  # X learns H's reply handle and one id
            message = await x.recv()
            seen = protocol.decode(message.payload_view, list(range(len(message.handles))))
            assert isinstance(seen, protocol.ReceivedCall) and isinstance(seen.reply, int)
            reply = message.handles[seen.reply]
            for guess in range(max(1, seen.question_id - 500), seen.question_id + 500):
                forged = protocol.encode_results(guess, new_counter, {"counter": "x's own"})
                await x.send(reply, forged.payload, handles=[x_node])
            y.gate.set()
            counter = (await pending).counter
            assert (await counter.increment(by=2)).value == 2  # Y's counter, not X's object
    for peer in (x, y_peer, h_peer):
        await peer.aclose()


PASS_OFF = """
async def attack(peer, report, y):
    x_node = await peer.create_node()
    await report("mine", [x_node])
    message = await peer.recv()  # H's call: X gets the reply handle H uses with it
    seen = protocol.decode(message.payload_view, list(range(len(message.handles))))
    h_reply = message.handles[seen.reply]
    for i in range(5):  # kept answers, "for H" if Y took the handle for H's
        call = protocol.encode_call(1000 + i, METHODS["newCounter"], {}, keep_results=True)
        await peer.send(y, call.payload, handles=[h_reply])
"""


async def test_a_callee_cannot_pass_itself_off_as_its_caller(kernel: capbus.Kernel, tmp_path: Path) -> None:
    """X (in a process of its own) holds the reply handle H gave it and presents it in
    calls of its own to Y. Y tells callers apart by the kernel-attested sender, so to Y
    those calls are X's, not H's: they cannot use up what Y keeps for H (here, two answers
    kept per caller)."""
    y_peer, h_peer = await kernel.connect(), await kernel.connect()
    async with open_vat(y_peer) as y_vat, open_vat(h_peer) as h_vat:
        y_vat.engine.max_kept_per_caller = 2
        y_node = await y_vat.export(FactoryServer())
        factory_at_y = h_vat.client(await y_peer.transfer(y_node, h_peer), schema.Factory)
        with trio.fail_after(10):
            async with reporting_process(kernel, tmp_path, PASS_OFF, y_peer, [y_node]) as message:
                x_node = message.handles[0]
                factory_at_x = h_vat.client(await x_node.peer.transfer(x_node, h_peer), schema.Factory)
                await factory_at_x.echo.send("hello X")
                while y_vat.statistics().answers < 2:  # polled, bounded by fail_after
                    await trio.sleep(0.001)
                promise = await factory_at_y.newCounter.send()
                await promise
                assert (await promise.counter.increment(by=3)).value == 3  # H's answer was kept
    for peer in (y_peer, h_peer):
        await peer.aclose()


async def test_pipelined_calls_waiting_for_an_answer_are_bounded_in_bytes(attack: Attack) -> None:
    """Calls pipelined on an answer not given yet wait with their messages: a caller's
    waiting calls may hold twice max_message_bytes (64 KiB here), not max_queued_calls
    times max_message_bytes. The first always fits; past the bytes: Overloaded."""
    (server,) = attack.server.engine.exports.values()
    assert isinstance(server, FactoryServer)
    server.gate = trio.Event()  # newCounter waits: calls pipelined on it wait too
    counter_slot = schema.Factory.interface.methods["newCounter"].results_layout.fields["counter"].slot
    with trio.fail_after(10):
        base = protocol.encode_call(1, schema.Factory.interface.methods["newCounter"], {}, keep_results=True)
        await attack.attacker.send(attack.target, base.payload, handles=[attack.reply])
        text = "x" * 60_000
        for question_id in (2, 3):
            call = protocol.encode_call(question_id, ECHO, {"text": text}, pipeline=(1, [counter_slot]))
            await attack.attacker.send(attack.target, call.payload, handles=[attack.reply])
        while attack.server.engine.waiting_calls < 2:  # polled, bounded by fail_after
            await trio.sleep(0.001)
        call = protocol.encode_call(4, ECHO, {"text": text}, pipeline=(1, [counter_slot]))
        error = await answer_to(attack, call.payload, [attack.reply])
        assert isinstance(error, errors.Overloaded) and "bytes" in error.reason, error
        assert attack.server.engine.waiting_calls == 2
        server.gate.set()
        assert (await attack.factory.echo("still serving")).text == "still serving"
