"""What the attack tests on the calculator example share: its schema, the check that a
small call does not read as a huge tree, and sending it a hand-made evaluate()."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import capnp
import trio

import capbus
from capbus.rpc import protocol
from capbus.rpc.capwire import CapWireError
from capbus.rpc.vat import open_vat

CALCULATOR = Path(__file__).resolve().parents[2] / "examples" / "calculator"
calc: Any = capbus.load(str(CALCULATOR / "calculator.capnp"))
EVALUATE = calc.Calculator.interface.methods["evaluate"]
TIMEOUT = 20


def assert_no_more_leaves_than_words(payload: bytes, leaves_of: Callable[[Any], int]) -> None:
    """An evaluate() call is refused, or its expression (``leaves_of`` counts its literals)
    has no more leaves than the message has words."""
    try:
        received = protocol.decode(payload, [None, None])
        assert isinstance(received, protocol.ReceivedCall)
        leaves = leaves_of(received.params(EVALUATE.params).expression)
    except (CapWireError, capnp.KjException, ValueError):
        return  # refused: fine
    words = len(payload) // 8
    assert leaves <= words, f"a {len(payload)}-byte call read as a tree of {leaves} expressions"


async def answer_to_evaluate(
    kernel: capbus.Kernel, calculator_server: tuple[capbus.Peer, capbus.Handle], params: int, payload: bytes
) -> protocol.ReceivedReturn:
    """Defines a function of ``params`` parameters on the calculator server (in its own
    process), then sends it the hand-made evaluate() ``payload`` (whose capability table is:
    the reply node, that function) from a bare peer; the server's answer."""
    launcher, calculator = calculator_server
    async with open_vat(launcher) as vat:
        client: Any = vat.client(calculator, calc.Calculator)
        with trio.fail_after(TIMEOUT):
            function = (await client.defFunction(paramCount=params, body={"literal": 1.0})).func
        attacker = await kernel.connect()
        try:
            reply = await attacker.create_node()
            target = await launcher.transfer(calculator, attacker)
            handed = await launcher.transfer(function.handle, attacker)
            with trio.fail_after(TIMEOUT):
                await attacker.send(target, payload, handles=[reply, handed])
                message = await attacker.recv()
        finally:
            await attacker.aclose()
    answer = protocol.decode(message.payload_view, [None] * len(message.handles))
    assert isinstance(answer, protocol.ReceivedReturn)
    return answer
