"""The Python cost of each sans-IO step of an echo call (issue 10), in one process, without
sockets or a scheduler: what the envelope codec and the engine cost on each side, apart from
IO and trio.

    .venv/bin/python bench/callpath.py [--calls N]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import capbus
from capbus import _wire
from capbus._resources import schema_directory
from capbus.peer import Credentials, Handle, Message, MessageKind
from capbus.rpc import protocol
from capbus.rpc.engine import Engine

schema: Any = capbus.load(os.path.join(schema_directory(), "capbus", "bench.capnp"))
ECHO = schema.Bench.interface.methods["echo"]
TEXT = "x" * 32
SERVER_NODE, REPLY_NODE, CALLER_REPLY, TARGET = 0x11, 0x9, 0x1B, 0x23
SENDER = Credentials(0, 0, 123, 456)


class _Owner:
    """Stands for the peer the handles belong to."""


_OWNER: Any = _Owner()


def message(destination: int, payload: bytes, handles: tuple[int, ...] = ()) -> Message:
    return Message(
        MessageKind.DATA,
        Handle(_OWNER, destination),
        memoryview(payload),
        tuple(Handle(_OWNER, h) for h in handles),
        [],
        0,
        0,
        SENDER,
    )


class Bench(schema.Bench.Server):  # type: ignore[misc]
    def echo(self, text: str) -> str:
        return text


def timed(calls: int, step: Callable[[], object]) -> float:
    """Microseconds per call of ``step`` (after a warm-up)."""
    for _ in range(200):
        step()
    start = time.perf_counter_ns()
    for _ in range(calls):
        step()
    return (time.perf_counter_ns() - start) / calls / 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20_000)
    calls = parser.parse_args().calls
    client = Engine(REPLY_NODE, max_message_bytes=1 << 20, on_release=lambda: None)
    server = Engine(REPLY_NODE, max_message_bytes=1 << 20, on_release=lambda: None)
    server.exported(Bench(), SERVER_NODE)
    call = protocol.encode_call(5, ECHO, {"text": TEXT})
    arrived = server.receive(message(SERVER_NODE, call.payload, (CALLER_REPLY,)))[0]

    def answer() -> str:
        question = client.ask(TARGET, ECHO)
        returned = protocol.encode_results(question, ECHO, {"text": TEXT})
        (event,) = client.receive(message(REPLY_NODE, returned.payload))
        return str(event.results.text)  # type: ignore[union-attr]

    steps = [
        (
            "client",
            "encode the call (protocol.encode_call)",
            lambda: protocol.encode_call(5, ECHO, {"text": TEXT}),
        ),
        (
            "client",
            "frame it (_wire.send_frame)",
            lambda: _wire.send_frame(1, [SERVER_NODE], [], 0, call.payload, 0, _wire.SEND_FLAG_QUIET),
        ),
        (
            "server",
            "take the call in (engine.receive: checks, decode, dispatch)",
            lambda: server.receive(message(SERVER_NODE, call.payload, (CALLER_REPLY,))),
        ),
        ("server", "read the params (.text)", lambda: arrived.call.params(ECHO.params).text),  # type: ignore[union-attr]
        (
            "server",
            "encode the results (protocol.encode_results)",
            lambda: protocol.encode_results(5, ECHO, {"text": TEXT}),
        ),
        ("client", "ask, take the return in, read .text (less encode_results)", answer),
    ]
    results = [(side, what, timed(calls, step)) for side, what, step in steps]
    encode_results = results[4][2]
    side, what, both = results[5]
    results[5] = (side, what, both - encode_results)
    print("| side | step | us |\n|---|---|---:|")
    for side, what, us in results:
        print(f"| {side} | {what} | {us:.2f} |")
    print(f"| both | in all | {sum(us for _, _, us in results):.2f} |")


if __name__ == "__main__":
    main()
