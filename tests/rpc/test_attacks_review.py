"""Attacks on the RPC layer that work on the code they were written against (the review of
the tree check, max_exports_per_caller and the out-of-nodes fix). Each test reproduces one
with real peers (the attacker in a process of its own where who-is-who matters) and fails
until it is fixed; its docstring says what the harm is.

The attacker is either a bare peer writing envelopes by hand, or a child process running a
short ``attack(peer, report, *handles)`` coroutine (:func:`attacker_process`) that reports
back and then keeps everything it took until the test ends.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc import errors, header, protocol
from capbus.rpc.vat import Vat, open_vat

from .calculator_attacks import EVALUATE, answer_to_evaluate, assert_no_more_leaves_than_words
from .processes import attacker_process
from .services import FactoryServer, schema

TIMEOUT = 20
METHODS = schema.Factory.interface.methods
INCREMENT = schema.Counter.interface.methods["increment"]
SAME_CAP = METHODS["same"].results_layout.fields["cap"].slot
NEW_COUNTER = METHODS["newCounter"].results_layout.fields["counter"].slot


# -- helpers -----------------------------------------------------------------------------------


@asynccontextmanager
async def server_and_honest(
    kernel: capbus.Kernel, **options: int
) -> AsyncIterator[tuple[capbus.Peer, Vat, FactoryServer, capbus.Handle, Any]]:
    """A factory server (its peer, vat, object and node) and an honest client of it."""
    server_peer, honest_peer = await kernel.connect(), await kernel.connect()
    async with open_vat(server_peer, **options) as server_vat, open_vat(honest_peer) as honest_vat:
        server = FactoryServer()
        node = await server_vat.export(server)
        honest = honest_vat.client(await server_peer.transfer(node, honest_peer), schema.Factory)
        yield server_peer, server_vat, server, node, honest
    for peer in (server_peer, honest_peer):
        await peer.aclose()


THINGS = """
@0xb1e2d3c4b5a69711;
interface Thing {
  one @0 () -> (a :Thing);
  pair @1 () -> (a :Thing, b :Thing);
  next @2 () -> (a :Thing);
  # Waits for the next publish(), then hands out a new Thing (a long poll).
  publish @3 () -> ();
}
"""


_things: list[Any] = []


def things(tmp_path: Path) -> Any:
    """The schema above, loaded once per process (pycapnp aborts on a second load of one
    file id from another path)."""
    if not _things:
        path = tmp_path / "things.capnp"
        path.write_text(THINGS)
        _things.append(capbus.load(str(path)))
    return _things[0]


# -- 1. the tree check sees another message than the reader ----------------------------------

PADS = (1, 3, 5, 6, 7)
"""Words of a call header (header.py) that read as harmless pointers: the Envelope's data
word (0: a zero-sized struct), the question id (0 here), the method word (0), the reply
capability, the null promisedAnswer."""


def _struct_pointer(offset: int, data: int, pointers: int) -> int:
    return ((offset & 0x3FFFFFFF) << 2) | (data << 32) | (pointers << 48)


def _list_pointer(offset: int, size: int, count: int) -> int:
    return 1 | ((offset & 0x3FFFFFFF) << 2) | (size << 32) | (count << 35)


def shared_expressions(k: int) -> bytes:
    """An evaluate() call: call(f, L1), L1 = [k x call(f, L2)], ... L6 = [k literals], so
    k**6 leaves, each list written once. Every level's params pointers are far pointers to
    segment 0 at one of PADS: the body, read on its own as decode() hands it to pycapnp,
    holds a landing pad there to the next level's list; the tree check, which reads the
    whole message, lands them in the call header instead and sees a tree."""
    head = header.call(0, EVALUATE.interface_id, EVALUATE.ordinal, 0, False)
    function = 3 | (1 << 32)  # capability 1: the Function
    one = struct.unpack("<Q", struct.pack("<d", 1.0))[0]
    words = [_struct_pointer(7, 0, 1), 0, 0, 0, 0, 0, 0, 0]  # root; words 1..7: landing pads
    words += [_struct_pointer(0, 2, 2)]  # word 8: params.expression
    words += [0, 3, function, 0]  # words 9..12: call(f, params -> L1)
    lists = []
    for level in range(len(PADS) + 1):
        lists.append(len(words))
        words.append((k << 2) | (2 << 32) | (2 << 48))  # composite tag: k Expressions
        for _ in range(k):
            if level < len(PADS):
                words += [0, 3, function, 2 | (PADS[level] << 3)]  # params: far, segment 0
            else:
                words += [one, 0, 0, 0]
    words[12] = _list_pointer(lists[0] - 13, 7, 4 * k)
    for level, pad in enumerate(PADS):
        words[pad] = _list_pointer(lists[level + 1] - pad - 1, 7, 4 * k)
    body = struct.pack(f"<{len(words)}Q", *words)
    return header.TWO_SEGMENTS.pack(1, len(head) // 8, len(body) // 8) + head + body


def test_the_tree_check_and_the_reader_see_the_same_message() -> None:
    """HIGH. decode() checks the whole framed message (capwire.check_tree), then, for the
    fast two-segment shape, hands pycapnp segment 1 alone as the body: a far pointer in the
    body to segment 0 lands in the call header for the check, but in the body itself for
    the reader. Far pointers to five header words that read as harmless turn a 0.9 KB call
    into a DAG whose expressions the handler walks 4096 times over; only the reader's own
    8M-word traversal limit bounds it, so finding F6 (a small call that costs the server a
    minute of CPU) is back."""

    def leaves(expression: Any) -> int:
        if expression.which() == "call":
            return sum(leaves(param) for param in expression.call.params)
        return 1

    assert_no_more_leaves_than_words(shared_expressions(4), leaves)


async def test_a_dag_through_the_call_header_is_refused_by_the_calculator(
    kernel: capbus.Kernel, calculator_server: tuple[capbus.Peer, capbus.Handle]
) -> None:
    """HIGH (F6 again, end to end). The calculator server, in its own process, is sent a
    1.2 KB evaluate() whose expression lists are shared through landing pads in the call
    header (see the test above): it evaluates 7**6 = 117,649 literals and makes 19,608
    calls of the function (about 2 s of its CPU here; with a larger k, up to the reader's
    8M-word limit: tens of seconds per call, and calls run 1024 at a time) instead of
    refusing the call at once. The answer must be an error."""
    k = 7
    answer = await answer_to_evaluate(kernel, calculator_server, k, shared_expressions(k))
    assert isinstance(answer.error, errors.Failed), "the server evaluated the whole DAG"


# -- 2. one caller takes every handler slot ----------------------------------------------------


async def test_a_caller_cannot_take_every_handler_slot(kernel: capbus.Kernel, tmp_path: Path) -> None:
    """HIGH. max_concurrent_calls (1024) and the E-order turn are shared by all callers. An
    attacker in its own process sends 1,100 small sum() calls whose counters list holds an
    object of its own that never answers: 1024 handlers wait for it for ever, the 1025th
    holds the turn, and every other caller's calls (here an honest echo) hang, with no
    error and no end, for as long as the attacker likes. Any handler that awaits a
    capability its caller passed (a callback; the calculator's function) is enough; the
    attack takes 0.3 s of sending."""
    async with server_and_honest(kernel) as (server_peer, _server_vat, _server, node, honest):
        attack = """
        async def attack(peer, report, target):
            reply, own = await peer.create_node(), await peer.create_node()
            for i in range(1100):
                call = protocol.encode_call(i + 1, METHODS["sum"], {"counters": ["own"]})
                handles = [reply if cap is protocol.REPLY else own for cap in call.caps]
                await peer.send(target, call.payload, handles=handles)
            await report("sent")
        """
        with trio.fail_after(TIMEOUT):
            async with attacker_process(kernel, tmp_path, attack, server_peer, [node]) as report:
                assert report == "sent"
                with trio.fail_after(5):
                    assert (await honest.echo(text="still served?")).text == "still served?"


# -- 3. max_exports_per_caller is per reply node, and reply nodes are free --------------------


async def test_many_reply_nodes_do_not_multiply_what_one_caller_may_hold(tmp_path: Path) -> None:
    """HIGH. The bound counts objects per reply node, and a caller makes as many reply
    nodes as it likes (17 make 17 x 4096 > nodes_owned = 65,536). Scaled down here: a
    server peer that may own 40 nodes, max_exports_per_caller=8; an attacker in its own
    process with 6 reply nodes takes all 38 nodes left, and an honest caller's newCounter()
    fails with Overloaded ("the results could not be sent"): what the bound was to prevent."""
    async with capbus.open_kernel(limits=capbus.Limits(nodes_owned=40)) as small:
        async with server_and_honest(small, max_exports_per_caller=8) as (
            server_peer,
            _vat,
            _s,
            node,
            honest,
        ):
            attack = """
            async def attack(peer, report, target):
                replies = [await peer.create_node() for _ in range(6)]
                for i in range(48):
                    call = protocol.encode_call(i + 1, METHODS["newCounter"], {})
                    await peer.send(target, call.payload, handles=[replies[i % 6]])
                answers = held = 0
                while answers < 48:
                    message = await peer.recv()
                    if message.kind is capbus.MessageKind.DATA:
                        answers += 1
                        held += len(message.handles)  # kept: never released
                await report(held)
            """
            with trio.fail_after(TIMEOUT):
                async with attacker_process(small, tmp_path, attack, server_peer, [node]) as held:
                    assert int(held) <= 8  # no more than one caller may hold, over all its reply nodes
                    counter = (await honest.newCounter()).counter
                    assert (await counter.increment(by=1)).value == 1


# -- 4. nodes made for a return that then failed are never retired ----------------------------


async def test_a_return_that_fails_halfway_does_not_leak_its_nodes(tmp_path: Path) -> None:
    """HIGH. A return with two new objects when the server peer has one node left:
    Vat._handles_for makes the first node (exported, and counted for the caller), then
    fails on the second; the call fails with Overloaded, but the first node is never sent,
    so no one ever holds it, no release ever comes, and it is never retired. A caller that
    fills the server, then releases one object at a time and asks for a pair each time,
    turns every node of the server into a leaked one: once it has released everything (or
    left), the server is still out of nodes, for good, and every caller's object-returning
    call fails."""
    thing = things(tmp_path)

    class Thing(thing.Thing.Server):  # type: ignore[misc,name-defined]
        async def one(self) -> Any:
            return Thing()

        async def pair(self) -> Any:
            return {"a": Thing(), "b": Thing()}

    async with capbus.open_kernel(limits=capbus.Limits(nodes_owned=10)) as kernel:
        server_peer, client_peer = await kernel.connect(), await kernel.connect()
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            node = await server_vat.export(Thing())
            root = client_vat.client(await server_peer.transfer(node, client_peer), thing.Thing)
            with trio.fail_after(TIMEOUT):
                held = []
                with pytest.raises(errors.Overloaded):
                    while True:
                        held.append((await root.one()).a)
                while held:
                    exports = server_vat.statistics().exports
                    await client_vat.drop(held.pop())
                    while server_vat.statistics().exports >= exports:  # retired (polled, bounded)
                        await trio.sleep(0.001)
                    try:
                        await root.pair()  # one node left: fails (and, now, leaks one)
                    except errors.Overloaded:
                        pass
                # The caller holds nothing now: the server must be able to hand out an object.
                try:
                    await root.one()
                except errors.Overloaded as error:
                    leaked = server_vat.statistics().exports - 1
                    pytest.fail(f"{leaked} objects no one holds use up the server's nodes: {error}")
        for peer in (server_peer, client_peer):
            await peer.aclose()


# -- 5. the bound is checked before the nodes are made -----------------------------------------


async def test_returns_completing_together_stay_within_max_exports_per_caller(tmp_path: Path) -> None:
    """MEDIUM. Vat._bounded compares the caller's count with the bound when a return is
    ready, but the count only grows once create_node has come back (Vat._export), after an
    await: returns that complete together all see the old count. Handlers that wait for
    one event complete together, and the caller can often trigger it (here a long poll:
    40 next() calls, then publish()): it is handed all 40 objects with
    max_exports_per_caller=10, and up to max_concurrent_calls more per burst and per reply
    node."""
    thing = things(tmp_path)

    class Thing(thing.Thing.Server):  # type: ignore[misc,name-defined]
        published = trio.Event()

        async def next(self) -> Any:
            await Thing.published.wait()
            return Thing()

        async def publish(self) -> None:
            Thing.published.set()
            Thing.published = trio.Event()

    async with capbus.open_kernel() as kernel:
        server_peer, client_peer = await kernel.connect(), await kernel.connect()
        async with (
            open_vat(server_peer, max_exports_per_caller=10) as server_vat,
            open_vat(client_peer) as client_vat,
        ):
            node = await server_vat.export(Thing())
            root = client_vat.client(await server_peer.transfer(node, client_peer), thing.Thing)
            with trio.fail_after(TIMEOUT):
                promises = [await root.next.send() for _ in range(40)]
                while server_vat.statistics().answers < 40:  # all waiting (polled, bounded)
                    await trio.sleep(0.001)
                await root.publish()
                got = []
                for promise in promises:
                    try:
                        got.append((await promise).a)
                    except errors.Overloaded:
                        pass
                assert len(got) <= 10, f"one caller was handed {len(got)} objects; the bound is 10"
        for peer in (server_peer, client_peer):
            await peer.aclose()


# -- 6. pipelined calls forwarded for a caller were charged to the vat that forwarded them ----


async def test_calls_forwarded_for_a_caller_do_not_use_up_the_forwarders_quota(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    """MEDIUM. S (honest) returned a capability of T in results its caller A may pipeline
    on (here S.same(cap=T's factory)). A's pipelined newCounter() calls on it are forwarded
    by S to T as S's own calls: T counts the counters A is handed, and keeps, against S.
    With T's max_exports_per_caller=5, A (in its own process) takes 5 that way, and S's own
    newCounter() on T fails with Overloaded ("this caller holds 5 objects"), while A keeps
    its own full quota at T. Any vat that returns a capability of another vat could be
    locked out of that vat by one of its callers. Fixed: S no longer makes such a call but
    redirects it (rpc.capnp's Return.redirect), and A makes it on T itself, as itself."""
    t_peer, s_peer = await kernel.connect(), await kernel.connect()
    async with open_vat(t_peer, max_exports_per_caller=5) as t_vat, open_vat(s_peer) as s_vat:
        t_node = await t_vat.export(FactoryServer())
        s_node = await s_vat.export(FactoryServer())
        t_at_s = s_vat.client(await t_peer.transfer(t_node, s_peer), schema.Factory)
        t_at_holder = await t_peer.transfer(t_node, s_peer)  # (the same handle: for the child)
        attack = f"""
        async def attack(peer, report, s_handle, t_handle):
            async with open_vat(peer) as vat:
                s = vat.client(s_handle, schema.Factory)
                t = vat.client(t_handle, schema.Factory)
                promise = await s.same.send(cap=t)
                kept = []
                for _ in range(5):
                    results = await vat.call_pipelined(promise, ({SAME_CAP},), METHODS["newCounter"], {{}})
                    kept.append(results.counter)
                await report(len(kept))
                await trio.sleep_forever()  # the vat and the counters stay
        """
        with trio.fail_after(TIMEOUT):
            async with attacker_process(kernel, tmp_path, attack, s_peer, [s_node, t_at_holder]) as report:
                assert report == "5"
                counter = (await t_at_s.newCounter()).counter
                assert (await counter.increment(by=1)).value == 1
    for peer in (t_peer, s_peer):
        await peer.aclose()


# -- 7. kept answers are bounded in number, not in bytes ---------------------------------------


async def test_answers_kept_for_pipelining_are_bounded_in_bytes(kernel: capbus.Kernel) -> None:
    """HIGH. A call with keepResults has its whole Return envelope kept until the caller's
    Finish, which a hostile caller never sends; max_kept_per_caller bounds their number
    (1024 per reply node, and reply nodes are free), not their size. 64 echo() calls of
    1 MiB with keepResults make a server whose max_message_bytes is 2 MiB keep 64 MiB; at
    the default 64 MiB, 1024 calls of 60 MiB (sent as memfds) would make it keep 60 GiB.
    Results without a capability cannot even be pipelined on. What one caller can make the
    server keep must be a small multiple of max_message_bytes at most."""
    limit = 2 << 20
    async with server_and_honest(kernel, max_message_bytes=limit) as (server_peer, server_vat, _s, node, _h):
        attacker = await kernel.connect()
        target = await server_peer.transfer(node, attacker)
        reply = await attacker.create_node()
        text = "x" * (1 << 20)
        with trio.fail_after(TIMEOUT):
            for i in range(64):
                call = protocol.encode_call(i + 1, METHODS["echo"], {"text": text}, keep_results=True)
                await attacker.send(target, call.payload, handles=[reply])
                message = await attacker.recv()
                while message.kind is not capbus.MessageKind.DATA:
                    message = await attacker.recv()
        kept = sum(
            len(answer.returned.payload)
            for answer in server_vat.engine.answers.values()
            if answer.returned is not None
        )
        assert kept <= 4 * limit, f"the server keeps {kept >> 20} MiB of answers for one caller"
        await attacker.aclose()


# -- 8. a pipelined call's transform is unbounded ----------------------------------------------


async def test_a_huge_pipeline_transform_is_refused_at_once(kernel: capbus.Kernel) -> None:
    """MEDIUM. decode() turns a PromisedAnswer's transform (a List(UInt16)) into a Python
    list at once, whatever its length: a 1 MiB pipelined call becomes ~20 MiB of Python
    objects, kept while the call waits for its answer (up to max_queued_calls of them, of
    up to 64 MiB each), and when it fails the whole list is formatted into the error (a
    1 MB call is answered with a 3.4 MB reason). A transform is a path of pointer fields:
    one longer than the nesting limit cannot name anything."""
    async with server_and_honest(kernel) as (server_peer, server_vat, server, node, _honest):
        attacker = await kernel.connect()
        target = await server_peer.transfer(node, attacker)
        reply = await attacker.create_node()
        steps = [1000 + i % 60000 for i in range(500_000)]

        async def answer() -> protocol.ReceivedReturn:
            message = await attacker.recv()
            while message.kind is not capbus.MessageKind.DATA:
                message = await attacker.recv()
            received = protocol.decode(message.payload_view, [None] * len(message.handles))
            assert isinstance(received, protocol.ReceivedReturn)
            return received

        with trio.fail_after(TIMEOUT):
            # On an answer already given: the error must not echo the transform back.
            first = protocol.encode_call(1, METHODS["echo"], {"text": "x"}, keep_results=True)
            await attacker.send(target, first.payload, handles=[reply])
            await answer()
            call = protocol.encode_call(2, INCREMENT, {"by": 1}, pipeline=(1, steps))
            await attacker.send(target, call.payload, handles=[reply])
            refused = await answer()
            assert refused.error is not None
            assert len(refused.error.reason) < 4096, f"a {len(refused.error.reason)}-byte reason"
            # On an answer not given yet: refused at once, not kept waiting.
            slow = protocol.encode_call(3, METHODS["slow"], {}, keep_results=True)
            await attacker.send(target, slow.payload, handles=[reply])
            await server.slow_started.wait()
            call = protocol.encode_call(4, INCREMENT, {"by": 1}, pipeline=(3, steps))
            await attacker.send(target, call.payload, handles=[reply])
            with trio.fail_after(5):
                refused = await answer()
            assert refused.question_id == 4 and refused.error is not None
            assert server_vat.engine.waiting_calls == 0
        await attacker.aclose()


# -- 9. pipelined calls: one budget for everyone, and forwards a Finish cannot stop -----------


async def test_a_caller_cannot_take_the_whole_pipelining_budget(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    """MEDIUM. The pipelined calls that may wait at once (max_queued_calls) were one budget
    for all callers. An attacker in its own process pipelines 64 calls on a call of its own
    that is held (newCounter, behind the server's gate): the budget is used up, and an
    honest caller's pipelined call was answered Overloaded. (As first reported, the
    attacker's calls were forwarded to an object of its own that never answered: redirects
    ended forwarding, and with it that way of holding the budget for good.)"""
    async with server_and_honest(kernel, max_queued_calls=64) as (
        server_peer,
        server_vat,
        server,
        node,
        honest,
    ):
        attack = f"""
        async def attack(peer, report, target):
            reply = await peer.create_node()
            first = protocol.encode_call(1, METHODS["newCounter"], {{}}, keep_results=True)
            await peer.send(target, first.payload, handles=[reply])
            for i in range(64):
                call = protocol.encode_call(i + 2, INCREMENT, {{"by": 1}}, pipeline=(1, [{NEW_COUNTER}]))
                await peer.send(target, call.payload, handles=[reply])
            await report("sent")
        """
        server.gate = trio.Event()  # newCounter waits: every call pipelined on it waits too
        with trio.fail_after(TIMEOUT):
            async with attacker_process(kernel, tmp_path, attack, server_peer, [node]) as report:
                assert report == "sent"
                while server_vat.engine.waiting_calls < 64:  # polled, bounded by fail_after
                    await trio.sleep(0.001)
                promise = await honest.newCounter.send()
                outcome: list[Any] = []

                async def pipelined() -> None:
                    try:
                        outcome.append((await promise.counter.increment(by=2)).value)
                    except errors.RpcError as error:
                        outcome.append(error)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pipelined)
                    while not outcome and server_vat.engine.waiting_calls == 64:  # polled, bounded
                        await trio.sleep(0.001)
                    server.gate.set()
                assert outcome == [2], outcome


async def test_a_pipelined_call_on_another_vats_object_is_made_by_its_caller(kernel: capbus.Kernel) -> None:
    """LOW-MEDIUM. A pipelined call on a capability of another vat X was forwarded by the
    server (Vat._forward), which is not a served handler: the caller's Finish found no
    cancel scope, the forward kept waiting for X (with its question, its answer entry and
    a unit of the pipelining budget), and X was never sent a Finish. A hostile X kept all
    of that for ever, long after the caller gave up. Now the server redirects the call: X
    gets it from the caller, the server holds nothing for it, and the caller's Finish goes
    to X."""
    server_peer, caller_peer, x = await kernel.connect(), await kernel.connect(), await kernel.connect()
    async with open_vat(server_peer) as server_vat, open_vat(caller_peer) as caller_vat:
        node = await server_vat.export(FactoryServer())
        factory = caller_vat.client(await server_peer.transfer(node, caller_peer), schema.Factory)
        x_node = await x.create_node()
        x_counter = caller_vat.client(await x.transfer(x_node, caller_peer), schema.Counter)
        with trio.fail_after(TIMEOUT):
            promise = await factory.same.send(cap=x_counter)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(caller_vat.call_pipelined, promise, (SAME_CAP,), INCREMENT, {"by": 1})
                message = await x.recv()  # the call, which X never answers
                assert message.kind is capbus.MessageKind.DATA and message.destination == x_node
                call = protocol.decode(message.payload_view, list(range(len(message.handles))))
                assert isinstance(call, protocol.ReceivedCall) and call.promised is None
                stats = server_vat.statistics()
                assert (server_vat.engine.waiting_calls, stats.questions) == (0, 0)
                nursery.cancel_scope.cancel()  # the caller gives up: Finish, to X
            finish = await x.recv()
            received = protocol.decode(finish.payload_view, list(range(len(finish.handles))))
            assert isinstance(received, protocol.ReceivedFinish)
            assert received.question_id == call.question_id
    for peer in (server_peer, caller_peer, x):
        await peer.aclose()
