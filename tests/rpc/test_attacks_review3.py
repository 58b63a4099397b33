"""Attacks on the RPC layer after redirects replaced forwarding, per-uid bounds, early cancel
scopes and partial mapping of oversized memfd payloads (third review). Each test reproduces
one with real kernel peers (a bare peer writing frames and envelopes by hand plays the
hostile side) and fails until it is fixed; its docstring says the severity, the harm and a
suggested fix.
"""

from __future__ import annotations

import fcntl
import gc
import os
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing

import capbus
from capbus import _wire
from capbus.rpc import errors, protocol
from capbus.rpc.vat import Vat, open_vat

from .hostile import (
    ECHO,
    SAME,
    SLOW,
    TIMEOUT,
    assert_a_chain_is_served,
    assert_no_file_stolen,
    close_all,
    fail_if_crashed,
    next_return,
    open_fds,
    until,
)
from .services import FactoryServer, next_call, schema


def sealed_memfd(data: bytes) -> int:
    fd = os.memfd_create("hostile-payload", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    if data:
        os.write(fd, data)
    seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


async def send_as_memfd(
    peer: capbus.Peer, target: capbus.Handle, data: bytes, handles: list[capbus.Handle]
) -> None:
    """Sends ``data`` as a memfd payload whatever its size (Peer.send only uses a memfd past
    PAYLOAD_MAX; the kernel takes a sealed memfd of any size, down to 0 bytes)."""
    fd = sealed_memfd(data)
    cookie = peer._new_cookie()
    frame = _wire.send_frame(cookie, [target.id], [h.id for h in handles], 1, b"", 0, _wire.SEND_FLAG_MEMFD)
    try:
        await peer._call(_wire.CMD_SEND, frame=frame, cookie=cookie, fds=[fd], what="send")
    finally:
        os.close(fd)


@asynccontextmanager
async def served(
    kernel: capbus.Kernel, **options: int
) -> AsyncIterator[tuple[capbus.Peer, Vat, FactoryServer, capbus.Handle, Any]]:
    """A factory server (its peer, vat, object and node) and an honest client of it."""
    server_peer, honest = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer, **options) as server_vat, open_vat(honest) as honest_vat:
            server = FactoryServer()
            node = await server_vat.export(server)
            factory = honest_vat.client(await server_peer.transfer(node, honest), schema.Factory)
            yield server_peer, server_vat, server, node, factory
    finally:
        for peer in (server_peer, honest):
            await peer.aclose()


async def _memfd_attack(kernel: capbus.Kernel, data: bytes, **options: int) -> None:
    """Sends ``data`` as a memfd call to a factory server; the server must go on serving."""
    attacker = await kernel.connect()
    try:
        async with served(kernel, **options) as (server_peer, _vat, _server, node, factory):
            target = await server_peer.transfer(node, attacker)
            reply = await attacker.create_node()
            with trio.fail_after(TIMEOUT):
                await send_as_memfd(attacker, target, data, [reply])
                assert (await factory.echo("still serving")).text == "still serving"
    except BaseException as error:  # noqa: BLE001 - the vat's receive loop died: say so
        fail_if_crashed(error, ValueError, "a hostile memfd payload")
        raise
    finally:
        await attacker.aclose()


async def test_an_empty_memfd_payload_crashes_the_vat(kernel: capbus.Kernel) -> None:
    """HIGH. Any peer that may send to a vat's node (any caller) kills the whole vat with one
    message: a sealed memfd payload of 0 bytes. The kernel takes a memfd of any size (it
    checks seals and the 1 GiB maximum only); Peer._wrap maps it with mmap(fd, 0), which
    raises ValueError ("cannot mmap an empty file"). Peer._read_frame catches only OSError
    (c6d951b), so the ValueError escapes Peer.recv, the vat's receive loop and its nursery:
    every caller of every object of that peer is cut off, and the process using open_vat
    gets the exception. Fix: in Peer._wrap treat a memfd payload of size 0 as an empty
    payload (do not map it), and catch ValueError (and any mmap failure) like OSError in
    _read_frame, losing that message only; better, have the kernel refuse memfd payloads
    no larger than PAYLOAD_MAX (they must travel inline)."""
    await _memfd_attack(kernel, b"")


async def test_a_small_memfd_payload_over_a_small_limit_crashes_the_vat(kernel: capbus.Kernel) -> None:
    """HIGH. A vat opened with max_message_bytes under PAYLOAD_HEAD_BYTES (64 KiB; e.g. a
    service that only takes small requests, max_message_bytes=4096) sets
    peer.max_mapped_bytes to it; a memfd payload larger than that but smaller than 64 KiB
    (here 5000 bytes, a well-formed call padded) is then "mapped only at its start" with
    mmap(fd, PAYLOAD_HEAD_BYTES), longer than the file: ValueError ("mmap length is greater
    than file size"), which escapes Peer.recv and kills the vat's receive loop, as above.
    One message from any caller takes the whole vat down. Fix: in Peer._wrap map
    min(size, PAYLOAD_HEAD_BYTES) bytes of the head (and catch ValueError with OSError in
    _read_frame)."""
    call = protocol.encode_call(11, ECHO, {"text": "hi"})
    padded = bytes(call.payload) + b"\0" * (5000 - len(call.payload))
    await _memfd_attack(kernel, padded, max_message_bytes=4096)


async def test_a_redirect_whose_base_never_returns_pins_the_callers_promises(kernel: capbus.Kernel) -> None:
    """MEDIUM. A hostile callee S redirects a call an honest vat A pipelined on a promise
    (``base.cap.spawn.send()``) and never returns the base call. A's vat starts
    Vat._resend(promise, ...), a task that holds the promise (and, through promise.base,
    the base promise) while it awaits base._routed(), i.e. S's return, for ever. Dropping
    both promises no longer lets them go: no Finish is ever sent for the base question (S
    is never told to let go of what it kept), and the task, the two promises, their
    events, the Resend's params and the pipelined client stay in A for as long as the vat
    lives. S can do this to every promise pipelined on its objects: the honest caller's
    memory and task count grow without bound, and nothing the caller does (drop, cancel)
    reclaims them. Fix: have _resend hold the promise weakly (a weakref, as _Resend does)
    and wait on base._done's event without pinning the promise; or cancel the resend task
    (a cancel scope per promise, cancelled by Vat._promise_gone / the finalizer of the
    base) when the promise is dropped, sending Finish for the base as usual."""
    attacker, caller_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(caller_peer) as caller_vat:
            node = await attacker.create_node()
            factory = caller_vat.client(await attacker.transfer(node, caller_peer), schema.Factory)
            with trio.fail_after(TIMEOUT):
                base = await factory.same.send()
                promise = await base.cap.spawn.send()
                _base_message, base_call = await next_call(attacker)
                message, pipelined = await next_call(attacker)
                assert pipelined.promised is not None and pipelined.promised[0] == base_call.question_id
                redirect = protocol.encode_redirect(pipelined.question_id)
                await attacker.send(message.handles[pipelined.reply], redirect.payload)
                # A's vat took the redirect:
                await until(lambda promise=promise: promise._rerouted is not None)
                gone = weakref.ref(promise), weakref.ref(base)
                del promise, base
                with trio.move_on_after(2):  # bounded: the leak shows as a promise still alive
                    while any(ref() is not None for ref in gone):
                        gc.collect()
                        await trio.sleep(0.01)
                alive = [ref() for ref in gone]
                assert alive == [None, None], (
                    "the honest caller dropped both promises, yet its vat keeps them (and the "
                    f"resend task) alive for ever: {alive}"
                )
    finally:
        for peer in (attacker, caller_peer):
            await peer.aclose()


async def test_first_waiting_pipelined_calls_of_many_connections_pass_the_uid_bytes_bound(
    kernel: capbus.Kernel,
) -> None:
    """MEDIUM. Engine._start_waiting lets the first waiting pipelined call of a caller in
    whatever its size ("the first waiting call of a caller always fits its bytes"), and
    skips the per-uid bytes check along with the per-caller one. A caller is a connection,
    and a uid may open up to the kernel's peers_per_user of them: each parks one pipelined
    call of up to max_message_bytes (64 MiB by default, held mapped or in memory) on an
    answer of its own that never comes (a call to a handler that waits on it), so one uid
    makes the vat hold peers_per_user * max_message_bytes of messages, past the
    uid_share * max_waiting_bytes the per-uid bound promises (the queue of calls waiting
    to start, CallerCalls.overloaded, does check the uid on a caller's first call). Here:
    max_queued_bytes_per_caller=16 KiB, uid_share=2 (a uid may hold 32 KiB), six
    connections of one uid park 60 KiB each. Fix: exempt only the per-caller bytes check
    for a caller's first waiting call, never the uid's (as CallerCalls.overloaded does)."""
    bound, share, connections = 16 * 1024, 2, 6
    options = {"max_message_bytes": 64 * 1024, "max_queued_bytes_per_caller": bound, "uid_share": share}
    peers = [await kernel.connect() for _ in range(connections)]
    try:
        async with served(kernel, **options) as (server_peer, server_vat, _server, node, factory):
            with trio.fail_after(TIMEOUT):
                for peer in peers:  # one uid (root), six callers
                    target = await server_peer.transfer(node, peer)
                    reply = await peer.create_node()
                    slow = protocol.encode_call(1, SLOW, {}, keep_results=True)  # never answers
                    await peer.send(target, slow.payload, handles=[reply])
                    parked = protocol.encode_call(2, ECHO, {"text": "x" * 60 * 1024}, pipeline=(1, [0]))
                    await peer.send(target, parked.payload, handles=[reply])
                    # A plain call after it: once answered, the pipelined one was handled.
                    probe = protocol.encode_call(3, ECHO, {"text": "probe"})
                    await peer.send(target, probe.payload, handles=[reply])
                    while (await next_return(peer)).question_id != 3:
                        pass
                held = server_vat.engine._waiting_bytes.of_uid((0, None))
                assert held <= bound * share, (
                    f"one uid's connections hold {held} bytes of waiting pipelined calls, over its"
                    f" bound of {bound * share} ({server_vat.engine.waiting_calls} calls waiting)"
                )
                assert (await factory.echo("still serving")).text == "still serving"
    finally:
        for peer in peers:
            await peer.aclose()


class GatedFactory(FactoryServer):
    """``same`` answers once ``gate`` is set (a slow call that returns a capability)."""

    async def same(self, cap: Any) -> Any:
        await self.gate.wait()
        return cap


async def test_calls_pipelined_two_deep_on_a_failed_call_never_get_an_answer(kernel: capbus.Kernel) -> None:
    """MEDIUM. An honest caller pipelines a chain, ``base.cap.spawn().counter.increment()``,
    on a call that fails (here: its results hold a null capability; an exception does the
    same). When the base completes, Engine._pipelined fails the first pipelined call and
    drops its answer with Engine._forget_answer, whose _stop_waiting returns the calls that
    waited on it, and these are thrown away: the second call of the chain gets no return,
    ever. The honest caller hangs without an error (its vat waits for a return that will
    not come); a server that redirects (_redirect) handles the same chain right. Fix: in
    Engine._pipelined's failure branch (and wherever an answer with waiting calls is
    forgotten: _forget_answer on a reused question id, a Finish), fail the waiting calls
    with the same error, recursively, as completed() does for the first level."""
    server_peer, honest = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(honest) as honest_vat:
            server = GatedFactory()
            server.gate = trio.Event()
            node = await server_vat.export(server)
            factory = honest_vat.client(await server_peer.transfer(node, honest), schema.Factory)
            with trio.fail_after(TIMEOUT):
                base = await factory.same.send(cap=None)
                first = await base.cap.spawn.send()
                second = await first.counter.increment.send(by=1)
                await until(lambda: server_vat.engine.waiting_calls == 2)
                server.gate.set()
            outcomes: dict[str, Any] = {}
            with trio.move_on_after(5):  # bounded: the harm is that it never ends
                for name, promise in (("first", first), ("second", second)):
                    try:
                        outcomes[name] = await promise
                    except errors.RpcError as error:
                        outcomes[name] = error
            assert isinstance(outcomes.get("first"), errors.Failed), outcomes
            assert isinstance(outcomes.get("second"), errors.RpcError), (
                f"the call pipelined on the failed pipelined call never got an answer: {outcomes}"
            )
    finally:
        for peer in (server_peer, honest):
            await peer.aclose()


async def test_a_long_chain_of_redirected_pipelined_calls_crashes_the_vat(kernel: capbus.Kernel) -> None:
    """HIGH. A hostile caller pipelines a chain of 2000 calls, each on the previous one's
    results, on a slow call of its own whose results will hold a capability of another vat
    (its own node): all wait (within max_queued_calls, 4096, and their bytes). When the base
    returns, Engine.completed -> _pipelined -> _redirect redirects the first, and _redirect
    runs the calls that waited on it through _pipelined -> _redirect again: one recursion
    level (two frames) per link. Past Python's recursion limit RecursionError escapes
    completed(), called in Vat._answer in the serving task (or in the receive loop for an
    inline handler), and kills the vat's nursery: every caller of the server is cut off.
    Fix: make _redirect (and completed's waiting-call loop) iterative, a worklist of
    (answer, waiting calls) instead of recursion; or bound the depth of pipelined chains."""
    base = protocol.encode_call(1, SAME, {"cap": "own"}, keep_results=True)
    await assert_a_chain_is_served(
        kernel, GatedFactory(), base, True, "a chain of redirected pipelined calls"
    )


async def test_kept_answers_of_a_caller_that_left_are_kept_for_ever(kernel: capbus.Kernel) -> None:
    """MEDIUM. A kept answer (a call with keep_results, answered with a capability, not yet
    Finished) is forgotten when its caller's reply node is destroyed (Engine._node_destroyed)
    or on Finish. But the vat holds the reply node's handle only while a client of it lives:
    _recent_replies keeps the last 64 callers' reply clients, and _Answer holds none. A
    caller that spreads its calls over more than 64 reply nodes (or a busy server with more
    than 64 other callers since) has the older reply clients collected and their handles
    released, so when the caller goes away (its peer closes, it crashes before Finish) no
    NODE_DESTROYED reaches the vat for them: their answers, the returned messages and the
    objects in them (servers kept alive in Encoded.caps), and their count in engine._kept
    (per caller and per uid) stay for as long as the vat lives. Each dead connection of a
    uid leaks up to max_kept_per_caller answers (and 2 * max_message_bytes of returns); the
    uid's tally never goes back down, so after uid_share such connections every later
    connection of that uid (honest programs of the same user too) can no longer pipeline on
    this vat. Here: 100 calls on 100 reply nodes, then the caller disconnects; 36 answers
    stay. Fix: hold the reply client in _Answer while it is kept (so the vat holds the handle
    and hears of its destruction), or index kept answers by caller and drop them when the
    kernel says that peer is gone."""
    new_counter = schema.Factory.interface.methods["newCounter"]
    attacker = await kernel.connect()
    async with served(kernel) as (server_peer, server_vat, _server, node, factory):
        target = await server_peer.transfer(node, attacker)
        calls = 100
        with trio.fail_after(TIMEOUT):
            for question in range(1, calls + 1):
                reply = await attacker.create_node()
                call = protocol.encode_call(question, new_counter, {}, keep_results=True)
                await attacker.send(target, call.payload, handles=[reply])
            for _ in range(calls):
                await next_return(attacker)
            assert len(server_vat.engine.answers) == calls
            await attacker.aclose()  # the caller is gone: so are all its reply nodes
            assert (await factory.echo("after")).text == "after"
        with trio.move_on_after(2):  # bounded: the leak shows as answers left
            while server_vat.engine.answers:
                gc.collect()
                await trio.sleep(0.01)
        left = len(server_vat.engine.answers)
        kept = server_vat.engine._kept.of_uid((0, None))
        assert (left, kept) == (0, 0), (
            f"{left} answers (counted {kept} against the uid) of a caller that left are kept for ever"
        )


async def test_a_finish_does_not_cancel_a_pipelined_call_still_waiting_for_its_base(
    kernel: capbus.Kernel,
) -> None:
    """LOW. A Finish cancels a call from when it is taken in (Vat._take_in makes its cancel
    scope), but a pipelined call still waiting for the answer it names is not taken in yet:
    it sits in _Answer.waiting, Engine._dispatch turns its Finish into a FinishArrived that
    finds no scope in Vat._serving, and the call stays. When the base answers, the call runs
    all the same, for a caller that cancelled it (a side effect it gave up on happens:
    here a counter is incremented by a call whose caller was cancelled before the base
    answered), its return is sent to no one, and it held the caller's pipelining budget
    meanwhile. Fix: on a Finish for a key whose answer is not done and has a _Waiting entry,
    remove that entry from its base answer's waiting list (index waiting calls by key) and
    give its budget back (_waiting, _waiting_bytes, waiting_calls)."""
    async with served(kernel) as (_server_peer, server_vat, server, _node, factory):
        server.gate = trio.Event()  # newCounter waits for it
        with trio.fail_after(TIMEOUT):
            base = await factory.newCounter.send()
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def increment() -> None:
                    with scope:
                        await base.counter.increment(by=5)

                nursery.start_soon(increment)
                await until(lambda: server_vat.engine.waiting_calls == 1)  # it waits there
                scope.cancel()  # the caller gives up before the base answers: Finish
            await trio.testing.wait_all_tasks_blocked()  # the Finish is written
            assert (await factory.echo("after the Finish")).text == "after the Finish"
            server.gate.set()
            counter = (await base).counter
            value = (await counter.increment(by=0)).value
        assert value == 0, (
            f"the cancelled pipelined call ran anyway once its base answered: counter is {value}"
        )


async def test_a_reused_question_id_makes_a_running_call_uncancellable(kernel: capbus.Kernel) -> None:
    """MEDIUM. Vat._serving maps (reply handle, question id) to one cancel scope. A caller
    that sends a second call with the question id of one still running overwrites the
    first call's scope (Vat._take_in), and Engine._call replaces its answer: from then on
    neither a Finish nor the caller's reply node destroyed (Engine._node_destroyed ->
    FinishArrived of that key) nor the caller going away reaches the first handler. A
    long-running handler (a long poll, a stream, anything that waits for an event) then
    runs for ever for no one, holding one of that caller's handler slots, one of its uid's
    and one of the vat's, and its CallerCalls/UserCalls stay; the caller can orphan as
    many as its uid may run (half the vat's handlers by default) and then disconnect: those
    slots never come back. Here the caller sends slow() twice with one question id, then
    disconnects: one slow() handler still runs. Fix: when a call arrives with a key that is
    in Vat._serving (or Engine.answers), cancel the earlier call (or refuse the new one
    with Failed); or keep every scope of a key (a list) and cancel them all on Finish and on
    the reply node's destruction."""
    attacker = await kernel.connect()
    async with served(kernel) as (server_peer, server_vat, server, node, factory):
        target = await server_peer.transfer(node, attacker)
        reply = await attacker.create_node()
        with trio.fail_after(TIMEOUT):
            slow = protocol.encode_call(5, SLOW, {})  # the same question id twice
            await attacker.send(target, slow.payload, handles=[reply])
            await until(lambda: server.running == 1)
            await attacker.send(target, slow.payload, handles=[reply])
            # Fixed: the later call replaces the earlier, which is cancelled.
            await server.slow_cancelled.wait()
            await until(lambda: server.running == 1)
            await attacker.aclose()  # the caller is gone: Finish for both, in effect
            assert (await factory.echo("after")).text == "after"
        with trio.move_on_after(2):  # bounded: the harm is a handler that runs for ever
            await until(lambda: server.running == 0)
        assert server.running == 0, (
            f"{server.running} handler(s) of a caller that left still run, and cannot be cancelled"
        )


async def test_waiting_pipelined_calls_make_the_vat_hold_unbounded_fds(kernel: capbus.Kernel) -> None:
    """MEDIUM. A message's fds become FileDescriptor objects that close when the message
    is gone; Engine._dispatch closes them at once only for a CallArrived whose method cannot
    take fds. A pipelined call that waits for its base answer (Engine._call ->
    _Answer.waiting) keeps its ReceivedCall, and with it every fd it brought, whatever the
    method it names (it is not even known yet), and no bound counts them: per caller
    max_queued_calls (4096) waiting calls of CAPBUS_FDS_MAX (64) fds each, 262144 fds, and
    uid_share times that per uid, all in the vat's process (the kernel bounds fds queued
    for a peer, 256, but not what the peer keeps after reading them). A caller with a base
    call that never answers (a handler waiting on it) thus exhausts the server process's
    RLIMIT_NOFILE: after that, every memfd payload (any call over 128 KiB, from anyone) is
    lost, fd-carrying calls arrive without their fds, and the server's own code can open no
    file. Here one caller makes the vat hold 40 * 64 fds. Fix: close a pipelined call's fds
    when it starts to wait unless its eventual method may take fds (it is known only once
    the target is: then refuse fds on waiting calls outright), or count fds in the waiting
    and queue bounds (like max_queued_capabilities_per_caller)."""
    calls, per_call, bound = 40, 64, 256
    attacker = await kernel.connect()
    read_end, write_end = os.pipe()
    try:
        async with served(kernel) as (server_peer, server_vat, _server, node, factory):
            target = await server_peer.transfer(node, attacker)
            reply = await attacker.create_node()
            with trio.fail_after(TIMEOUT):
                assert (await factory.echo("warm up")).text == "warm up"
                before = open_fds()
                slow = protocol.encode_call(1, SLOW, {}, keep_results=True)  # never answers
                await attacker.send(target, slow.payload, handles=[reply])
                for question in range(2, calls + 2):
                    parked = protocol.encode_call(question, ECHO, {"text": "x"}, pipeline=(1, [0]))
                    await attacker.send(target, parked.payload, handles=[reply], fds=[read_end] * per_call)
                # A plain call after them: once answered, they were all taken in (or refused).
                probe = protocol.encode_call(999, ECHO, {"text": "probe"})
                await attacker.send(target, probe.payload, handles=[reply])
                while (await next_return(attacker)).question_id != 999:
                    pass
                gc.collect()
                held = open_fds() - before
            assert held <= bound, (
                f"one caller's waiting pipelined calls make the server's process hold {held} fds"
            )
    finally:
        os.close(read_end)
        os.close(write_end)
        await attacker.aclose()


async def test_a_redirect_resends_a_pipelined_call_with_fd_numbers_the_caller_has_reused(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    """HIGH. A promise's pipelined call that is redirected is sent again by Vat._resend from
    the params kept in _Resend: the caller's Python values, for an Fd field an int (the
    documented way to pass one). The first send carried a duplicate, so the caller may
    close its fd once send() returned; the number is then reused by the next file it
    opens. A hostile callee S redirects the call (and returns the base with a capability
    of its own): the caller's vat encodes the params again and sends whatever file now has
    that number to S. Here the caller passes a pipe's write end, closes it, and opens a
    secret file that gets the same number: S receives the secret file's fd. Any callee can
    so steal files an honest caller never meant to give it. Fix: keep the Encoded of the
    first send (its fds duplicated, closed when the _Resend is dropped) and send that again,
    re-encoding only the header; or duplicate the fds of the params into the _Resend at
    send_call time."""
    review3: Any = capbus.load(Path(__file__).with_name("review3.capnp"))
    fill = review3.Sink.interface.methods["fill"]
    secret_path = tmp_path / "secret"
    secret_path.write_bytes(b"the caller's secret")
    attacker, caller_peer = await kernel.connect(), await kernel.connect()
    read_end, write_end = os.pipe()
    stolen: list[int] = []
    try:
        async with open_vat(caller_peer) as caller_vat:
            hub_node, own = await attacker.create_node(), await attacker.create_node()
            hub = caller_vat.client(await attacker.transfer(hub_node, caller_peer), review3.Hub)
            with trio.fail_after(TIMEOUT):
                base = await hub.sink.send()
                promise = await base.sink.fill.send(sink=write_end, data=b"for the pipe")
                os.close(write_end)  # sent (a duplicate went with the message): done with it
                secret = os.open(secret_path, os.O_RDONLY | os.O_CLOEXEC)  # reuses the number
                if secret != write_end:  # (not the lowest free number here: make it so)
                    os.dup2(secret, write_end)
                    os.close(secret)
                base_message, base_call = await next_call(attacker)
                message, pipelined = await next_call(attacker)
                for fd in message.fds:  # the pipe, as the caller meant
                    os.close(fd)
                redirect = protocol.encode_redirect(pipelined.question_id)
                await attacker.send(message.handles[pipelined.reply], redirect.payload)
                sink = review3.Hub.interface.methods["sink"]
                results = protocol.encode_results(base_call.question_id, sink, {"sink": "own"})
                await attacker.send(base_message.handles[base_call.reply], results.payload, handles=[own])
                message, resent = await next_call(attacker)  # the call again, now at `own`
                assert message.destination == own
                stolen = list(message.fds)
                answer = protocol.encode_results(resent.question_id, fill, {})
                await attacker.send(message.handles[resent.reply], answer.payload)
                await promise
            assert_no_file_stolen(stolen, read_end, "the redirected call")
    finally:
        close_all([read_end, write_end, *stolen])
        for peer in (attacker, caller_peer):
            await peer.aclose()
