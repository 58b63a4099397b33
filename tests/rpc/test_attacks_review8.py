"""Attacks on the newest commit (eighth review): received payloads mapped with the mmap
module (an fd held per mapping before Python 3.13), flat params dropped once read, and a
caller's flat results read from a copy of a mapped return (Body.struct(detach=True))."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

import capbus
from capbus.rpc import protocol
from capbus.rpc.vat import open_vat

from .hostile import ECHO, TIMEOUT, fds_held_by_kept_results, open_fds, until_taken_or_refused
from .services import schema

LARGE_TEXT = "x" * (130 * 1024)  # over PAYLOAD_MAX: a sealed memfd


def _general_return(question_id: int, results: dict[str, Any]) -> protocol.Encoded:
    """A Return in the general envelope shape (what encode_results writes for results that
    are not flat): pycapnp splits a large one into several segments."""
    message = protocol.rpc.Envelope.new_message()
    envelope = protocol.StructBuilder.root(message, protocol.ENVELOPE)
    returned = envelope.init("return")
    returned.questionId = question_id
    protocol.fill(returned.any_struct("results", ECHO.results), ECHO.results_layout, results)
    return protocol._encoded(envelope)


async def test_flat_results_in_the_general_envelope_shape_still_hold_the_mapping(
    kernel: capbus.Kernel,
) -> None:
    """LOW. Engine._returned reads a caller's flat results with Body.struct(detach=True),
    but only the fast, single-segment shape is detached: a Return that header.read_framed
    does not take (the general envelope pycapnp writes, several segments for a large one)
    gives a Body with a parent (``self._parent.any_struct``) or several segments, and both
    paths return a reader over the mapped payload. The callee chooses the shape, so the
    review-6 finding is back for any hostile server: echo's flat results, sent in the
    general shape over PAYLOAD_MAX, each hold the mapping and (Python < 3.13,
    MAPPING_HOLDS_FD) an fd of the client for as long as it keeps them; 100 kept results,
    ~100 fds, past RLIMIT_NOFILE the client loses every memfd and fd sent to it.
    Fix: detach in Body.struct whatever the shape (copy a mapped payload's segments, or
    the whole payload, before making the pycapnp reader), or in Engine._returned copy any
    mapped return whose results are flat before decoding it."""
    calls, bound = 100, 64
    held = await fds_held_by_kept_results(
        kernel,
        schema.Factory,
        lambda factory: factory.echo("hi"),
        lambda call: _general_return(call.question_id, {"text": LARGE_TEXT}),
        calls,
    )
    assert held <= bound, f"the flat results of {calls} calls a client keeps hold {held} fds"


def _general_call(question_id: int, method: Any, params: dict[str, Any]) -> protocol.Encoded:
    """A call in the general envelope shape (what encode_call writes for a pipelined call
    or params that are not flat): pycapnp splits a large one into several segments."""
    message = protocol.rpc.Envelope.new_message()
    envelope = protocol.StructBuilder.root(message, protocol.ENVELOPE)
    call = envelope.init("call")
    call.questionId = question_id
    call.interfaceId = method.interface_id
    call.methodId = method.ordinal
    call.replyTo = protocol.REPLY
    protocol.fill(call.any_struct("params", method.params), method.params_layout, params)
    return protocol._encoded(envelope)


REVIEW3: Any = capbus.load(Path(__file__).with_name("review3.capnp"))
FILL = REVIEW3.Sink.interface.methods["fill"]


class SlowSink(REVIEW3.Sink.Server):  # type: ignore[misc]
    def __init__(self) -> None:
        self.running = 0
        self.gate = trio.Event()

    async def fill(self, sink: Any, data: bytes) -> None:
        self.running += 1
        try:
            await self.gate.wait()  # (writing to the file, as slow as it likes)
        finally:
            self.running -= 1


async def test_running_calls_whose_params_may_hold_fds_each_hold_an_uncounted_mapping_fd(
    kernel: capbus.Kernel,
) -> None:
    """MEDIUM. Review 6's finding is back for every method whose params are not flat. With
    the mmap module again (MAPPING_HOLDS_FD, Python < 3.13), a mapped payload holds an fd of
    the server's process; Engine counts it (``mapped``) while the call is queued, and
    Vat._serve dequeues that count when the handler starts. Only calls with flat params
    drop their message then (_copied_out); any other method -- one with an Fd, a
    capability, a list or a struct in its params, here review 3's Sink.fill(sink :Fd,
    data :Data), an honest method whose handler takes its time -- keeps
    ``arrived.call.body`` and so the mapping and its fd for as long as the handler runs,
    counted nowhere. A caller pads each call past PAYLOAD_MAX (130 KiB of data, no fd sent
    at all): 200 running calls, ~200 more fds in the server's process; past RLIMIT_NOFILE
    the server loses every memfd and fd sent to it. (The round-7 libc mapping held no fd;
    this commit's return to mmap reopened it.)
    Fix: keep counting a running call's mapping fd against the per-caller/per-uid fd bounds
    until the handler returns (not dequeue ``mapped`` at start), or read every call's params
    out of a copy / release the payload once params_of has read them (Fd and capability
    values are already resolved then)."""
    calls, bound = 200, 64
    attacker, server_peer = await kernel.connect(), await kernel.connect()
    server = SlowSink()
    try:
        async with open_vat(server_peer) as server_vat:
            target = await server_peer.transfer(await server_vat.export(server), attacker)
            reply = await attacker.create_node()
            with trio.fail_after(TIMEOUT):
                before = open_fds()
                for question in range(1, calls + 1):
                    call = protocol.encode_call(question, FILL, {"data": b"x" * (130 * 1024)})
                    await attacker.send(target, bytes(call.payload), handles=[reply])
                    del call
                # (fixed: the calls past the fd bound are answered Overloaded)
                await until_taken_or_refused(attacker, lambda: server.running, calls)
                held = open_fds() - before
            server.gate.set()
            assert held <= bound, (
                f"one caller's {calls} running fill() calls of 130 KiB (no fds sent) make the"
                f" server's process hold {held} more fds"
            )
    finally:
        server.gate.set()
        await attacker.aclose()
        await server_peer.aclose()


REVIEW5: Any = capbus.load(Path(__file__).with_name("review5.capnp"))
GET = REVIEW5.Blob.interface.methods["get"]


async def test_results_that_are_not_flat_each_hold_an_fd_a_hostile_server_chose(
    kernel: capbus.Kernel,
) -> None:
    """LOW. detach=True (Engine._returned) copies only flat results; results with a
    capability, a list or a struct (review 5's Blob.get -> (text, again :Blob), null
    ``again`` here) are read in place from the mapped return, so each results object a
    client keeps holds the mapping and (Python < 3.13) an fd of the client's process. The
    size is the callee's choice: 130 KiB of text per answer, 100 kept answers, ~100 fds;
    past RLIMIT_NOFILE the client loses every memfd and fd sent to it on any connection.
    Fix: copy any mapped return before decoding it (or map without an fd: a C mapping,
    trackfd=False), not only the flat ones."""
    calls, bound = 100, 64
    held = await fds_held_by_kept_results(
        kernel,
        REVIEW5.Blob,
        lambda blob: blob.get("hi"),
        lambda call: protocol.encode_results(call.question_id, GET, {"text": LARGE_TEXT}),
        calls,
    )
    assert held <= bound, f"the results of {calls} calls a client keeps hold {held} fds of its process"
