"""Data past libcapnp's default traversal limit (64 MiB) goes through a vat whose
max_message_bytes lets it in, and is refused with a clear error by one whose limit does not."""

from __future__ import annotations

import os
import re
from typing import Any

import trio

import capbus
from capbus._resources import schema_directory
from capbus.rpc import errors
from capbus.rpc.vat import open_vat

schema: Any = capbus.load(os.path.join(schema_directory(), "capbus", "bench.capnp"))
SIZE = 72 << 20


class Sink(schema.Bench.Server):  # type: ignore[misc]
    def data(self, data: bytes) -> int:
        return len(data)


async def _call_with(kernel: capbus.Kernel, limit: int, send_limit: int = 80 << 20) -> int | errors.RpcError:
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    try:
        with trio.fail_after(60):
            async with (
                open_vat(server_peer, max_message_bytes=limit) as server,
                open_vat(client_peer, max_send_bytes=send_limit) as vat,
            ):
                handle = await server_peer.transfer(await server.export(Sink()), client_peer)
                sink = vat.client(handle, schema.Bench)
                try:
                    return int((await sink.data(data=bytes(SIZE))).size)
                except errors.RpcError as error:
                    return error
    finally:
        await server_peer.aclose()
        await client_peer.aclose()


async def test_a_call_larger_than_64_mib_reaches_a_vat_that_allows_it(kernel: capbus.Kernel) -> None:
    assert await _call_with(kernel, 80 << 20) == SIZE


async def test_a_call_over_the_senders_limit_raises_on_the_sending_side(kernel: capbus.Kernel) -> None:
    """By default a vat sends nothing larger than it would take (max_message_bytes): the
    caller hears so at once, with the limit, before anything is sent."""
    refused = await _call_with(kernel, 80 << 20, send_limit=64 << 20)
    assert isinstance(refused, errors.Failed)
    assert re.search(rf"a message of \d+ bytes is over this vat's max_send_bytes of {64 << 20}", str(refused))


async def test_a_call_over_the_vats_limit_is_refused_saying_so(kernel: capbus.Kernel) -> None:
    refused = await _call_with(kernel, 64 << 20)
    assert isinstance(refused, errors.Failed)
    assert re.search(
        rf"a message of \d+ bytes is over the receiving vat's limit of {64 << 20} \(max_message_bytes\)",
        str(refused),
    ), refused


async def test_a_call_this_process_cannot_map_is_answered_overloaded(
    kernel: capbus.Kernel, address_space_for_headers_only: None
) -> None:
    """A call under the vat's limit whose memfd this process has no address space left to
    map (a sandbox's RLIMIT_AS; injected here): its caller hears so, not nothing."""
    refused = await _call_with(kernel, 80 << 20)
    assert isinstance(refused, errors.Overloaded), refused
    assert "was not read here: this process could not map it" in refused.reason


def test_a_large_call_is_built_in_the_memfd_it_travels_in() -> None:
    """A call over the inline payload limit is written straight into a sealed memfd (one
    copy of its Data, not a join and then a write), and reads back the same."""
    from capbus.memfd import SealedMapping
    from capbus.rpc import protocol

    data = memoryview(bytes(range(256)) * 4096)  # 1 MiB
    method = schema.Bench.interface.methods["data"]
    encoded = protocol.encode_call(3, method, {"data": data})
    assert isinstance(encoded.payload, memoryview) and isinstance(encoded.payload.obj, SealedMapping)
    received = protocol.decode(encoded.payload, ["reply"])
    assert isinstance(received, protocol.ReceivedCall)
    assert received.params(method.params).data == bytes(data)
    small = protocol.encode_call(4, method, {"data": b"small"})
    assert isinstance(small.payload, bytes)
