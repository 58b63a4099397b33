"""Mutated envelopes (random bytes changed in valid calls and returns, both the hand-read
header shape and the general one) are decoded without crashing the process: every failure
is a Python exception of the kinds the vat turns into a clean Failed for the sender."""

from __future__ import annotations

import random

import capnp

from capbus.rpc import protocol
from capbus.rpc.capwire import CapWireError
from capbus.rpc.errors import Failed

from .services import schema

METHODS = schema.Factory.interface.methods
# What bad input raises: capwire's and pycapnp's errors (RuntimeError: "Member was null"),
# ValueError (text that is not UTF-8), Failed (params_of's verdict). The engine turns any of
# them into a Failed for the sender; what must never happen is the process going down.
EXPECTED = (Failed, capnp.KjException, CapWireError, ValueError, RuntimeError)


def samples() -> list[protocol.Encoded]:
    cap = object()
    return [
        protocol.encode_call(7, METHODS["echo"], {"text": "hello"}),
        protocol.encode_call(8, METHODS["same"], {"cap": cap}),
        protocol.encode_call(9, METHODS["sum"], {"counters": [cap, object()]}),
        protocol.encode_call(10, METHODS["echo"], {"text": "p"}, pipeline=(3, [0])),  # general shape
        protocol.encode_results(11, METHODS["echo"], {"text": "back"}),
        protocol.encode_exception(12, Failed("no")),
    ]


def test_mutated_envelopes_fail_cleanly() -> None:
    rng = random.Random(20261123)
    decoded = failed = 0
    for _ in range(4000):
        data = bytearray(rng.choice(samples()).payload)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(8, len(data))] = rng.randrange(256)
        try:
            got = protocol.decode(memoryview(bytes(data)), [None, None, None])
            if isinstance(got, protocol.ReceivedCall):
                for method in METHODS.values():
                    try:
                        protocol.params_of(got, method)
                    except Failed:
                        failed += 1
            elif isinstance(got, protocol.ReceivedReturn) and got.body is not None:
                results = got.body.struct(METHODS["echo"].results)
                protocol.as_kwargs(results, METHODS["echo"].results_layout)
            decoded += 1
        except EXPECTED:
            failed += 1
    assert decoded > 500 and failed > 500  # both outcomes were exercised
