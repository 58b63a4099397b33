"""The calculator example's server, in its own process, against a hostile client (finding F6
of the hardening review): a 2.7 KB evaluate() whose expressions share their params lists (a
DAG) unfolds into 2^depth evaluations; it cost the server 58 s of CPU, bounded only by
libcapnp's 8M-word traversal limit. Now every received message must be a tree within its own
size, checked before any handler sees it: the call fails at once with a precise error, and
the server keeps serving."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import trio

import capbus
from capbus.rpc import capwire, errors, protocol
from capbus.rpc.vat import open_vat

CALCULATOR = Path(__file__).resolve().parents[2] / "examples" / "calculator"
TIMEOUT = 30
DEPTH = 26  # 2^26 evaluations if the server walked the DAG (and within the nesting limit)


def chain(depth: int, function: object) -> dict[str, Any]:
    """add(chain(depth - 1), add()) ...: element 1 of each params list is a call whose own
    params the attack then points at element 0's list."""
    if depth == 0:
        return {"literal": 1.0}
    spare = {"call": {"function": function, "params": [{"literal": 0.0}, {"literal": 0.0}]}}
    return {"call": {"function": function, "params": [chain(depth - 1, function), spare]}}


def share_lists(payload: bytes, depth: int) -> bytes:
    """Points each level's spare call at the same params list as its sibling: a DAG."""
    segments = [bytearray(s) for s in capwire.unframe(payload)]
    call = protocol.ENVELOPE.fields["call"].slot
    params = protocol.layout_of(protocol.rpc.Call.schema).fields["params"].slot
    path: capwire.Path = (("p", call), ("p", params), ("p", 0))  # evaluate's expression
    for _ in range(depth - 1):  # the last level's first element is a literal: no list
        first = capwire.locate(segments, (*path, ("p", 1), ("e", 0), ("p", 1)))
        second = capwire.locate(segments, (*path, ("p", 1), ("e", 1), ("p", 1)))
        assert first is not None and second is not None and first[0] == second[0]
        (word,) = struct.unpack_from("<Q", segments[first[0]], first[1] * 8)
        if word & 3 == 1:  # a near list pointer: relative to where it sits
            offset = (word & 0xFFFFFFFF) >> 2
            target = first[1] + 1 + (offset - (1 << 30) if offset >= 1 << 29 else offset)
            moved = target - (second[1] + 1)
            word = (word & ~0xFFFFFFFC) | ((moved & 0x3FFFFFFF) << 2)
        else:  # a far pointer names its landing pad absolutely
            assert word & 3 == 2
        struct.pack_into("<Q", segments[second[0]], second[1] * 8, word)
        path = (*path, ("p", 1), ("e", 0))
    return capwire.frame_header(segments) + b"".join(segments)


async def test_a_dag_of_expressions_fails_at_once_and_the_server_serves_on(
    kernel: capbus.Kernel, calculator_server: tuple[capbus.Peer, capbus.Handle]
) -> None:
    launcher, calculator = calculator_server
    calc = capbus.load(str(CALCULATOR / "calculator.capnp"))
    async with open_vat(launcher) as vat:
        client: Any = vat.client(calculator, calc.Calculator)
        with trio.fail_after(TIMEOUT):
            add = (await client.getOperator(op="add")).func
            honest = await client.evaluate(expression=chain(3, add))
            assert (await honest.value.read()).value == 1.0

        attacker = await kernel.connect()
        reply = await attacker.create_node()
        target = await launcher.transfer(calculator, attacker)
        function = await launcher.transfer(add.handle, attacker)
        method = calc.Calculator.interface.methods["evaluate"]
        encoded = protocol.encode_call(77, method, {"expression": chain(DEPTH, add)})
        payload = share_lists(encoded.payload, DEPTH)
        assert len(payload) < 8 * 1024
        handles = [reply if cap is protocol.REPLY else function for cap in encoded.caps]
        with trio.fail_after(TIMEOUT):
            await attacker.send(target, payload, handles=handles)
            message = await attacker.recv()
        answer = protocol.decode(message.payload_view, [None] * len(message.handles))
        assert isinstance(answer, protocol.ReceivedReturn)
        assert isinstance(answer.error, errors.Failed), answer
        assert "not a tree" in answer.error.reason

        with trio.fail_after(TIMEOUT):
            again = await client.evaluate(expression=chain(2, add))
            assert (await again.value.read()).value == 1.0
        await attacker.aclose()
