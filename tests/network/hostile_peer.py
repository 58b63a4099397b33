"""A hostile rpc.capnp peer's tools, for the attack reviews over TCP (test_attacks_review*.py):
a raw connection writing framed messages built by hand, and what to check a service by."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import trio

import capbus
from capbus.addresses import TcpAddress
from capbus.rpc.twoparty import FrameReader, decode, rpc

ECHO_CAPNP = Path(__file__).parents[1] / "serving" / "echo.capnp"
sys.path.insert(0, str(ECHO_CAPNP.parent))
from echo_service import schema  # noqa: E402  (tests/serving/echo_service.py)

TIMEOUT = 20


def bootstrap(question_id: int) -> bytes:
    message = rpc.Message.new_message()
    message.init("bootstrap").questionId = question_id
    return bytes(message.to_bytes())


class Peer:
    """A raw TCP connection speaking framed rpc.capnp by hand."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = FrameReader(1 << 26)
        self.received: list[Any] = []
        self.eof = False

    @classmethod
    async def connect(cls, port: int, receive_buffer: int | None = None) -> Peer:
        sock = trio.socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        return cls(trio.SocketStream(sock))

    async def next(self) -> Any:
        """The next message received (None at the end of the stream)."""
        while not self.received:
            if self.eof:
                return None
            try:
                data = await self.stream.receive_some(1 << 16)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                self.eof = True
                continue
            self.received += [decode(segments, 1 << 26) for segments in self.reader.feed(data)]
        return self.received.pop(0)

    async def drain(self, counts: dict[str, int]) -> None:
        """Reads everything, counting messages by kind (and "eof")."""
        while (message := await self.next()) is not None:
            kind = str(message.which())
            counts[kind] = counts.get(kind, 0) + 1
        counts["eof"] = 1


async def kind_of_next(peer: Peer) -> str:
    """The kind of the next message ("eof" at the end; an abort with its reason)."""
    message = await peer.next()
    if message is None:
        return "eof"
    kind = str(message.which())
    return f"abort: {message.abort.reason}" if kind == "abort" else kind


def port_of(service: capbus.Service) -> int:
    assert isinstance(service.address, TcpAddress)
    return service.address.port


async def served_still(port: int) -> None:
    """Another connection is served (a capbus client's call answered)."""
    with trio.fail_after(TIMEOUT):
        async with capbus.connect(f"tcp:127.0.0.1:{port}", schema.Echo) as remote:
            assert (await remote.echo(text="other")).text == "other"
