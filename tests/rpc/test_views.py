"""Data and Text read as memoryviews (StructReader.view; a handler's ``memoryview``
annotation): without a copy where the reader reads the field by hand, over the mapped memfd
for a large call; the bytes are the same whichever way they are read."""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc.vat import open_vat

schema: Any = capbus.load(Path(__file__).with_name("views.capnp"))
TIMEOUT = 10
LARGE = 1 << 20  # over the Peer API's inline payload: the call travels in a memfd


class ViewingBlobs(schema.Blobs.Server):  # type: ignore[misc,name-defined]
    """Takes its Data and Text as views (a plain-function handler: run inline)."""

    def size(self, data: bytes | memoryview, note: str | memoryview) -> dict[str, Any]:
        assert isinstance(note, memoryview)
        return {
            "size": len(data),
            "first": data[0] if len(data) else 0,
            "last": data[-1] if len(data) else 0,
            "isView": isinstance(data, memoryview),
            "mapped": isinstance(data, memoryview) and isinstance(data.obj, mmap.mmap),
            "note": bytes(note).decode(),
        }

    async def back(self, data: memoryview) -> bytes:
        await trio.sleep(0)  # (an async handler: its view outlives the receive loop's turn)
        return bytes(data)

    def nested(self, inner: Any, pick: int) -> dict[str, Any]:
        view = inner.view("blob")
        return {"size": len(view), "isView": isinstance(view, memoryview)}


class CopyingBlobs(ViewingBlobs):
    def size(self, data: bytes, note: str) -> dict[str, Any]:  # type: ignore[override]
        assert isinstance(note, str)
        return {"size": len(data), "isView": isinstance(data, memoryview), "note": note}


async def _blobs(kernel: capbus.Kernel, server: Any, body: Any) -> None:
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            handle = await server_peer.transfer(await server_vat.export(server), client_peer)
            with trio.fail_after(TIMEOUT):
                await body(client_vat.client(handle, schema.Blobs))
    finally:
        await server_peer.aclose()
        await client_peer.aclose()


def _data(size: int) -> bytes:
    return bytes((i * 7 + 3) % 251 for i in range(size)) if size < 4096 else bytes(range(256)) * (size // 256)


@pytest.mark.parametrize("size", [0, 1, 100, LARGE])
async def test_a_handler_annotated_memoryview_gets_a_view_of_the_message(
    kernel: capbus.Kernel, size: int
) -> None:
    data = _data(size)

    async def body(blobs: Any) -> None:
        seen = await blobs.size(data=data, note="héllo")
        assert (seen.size, seen.isView, seen.note) == (size, True, "héllo")
        if size:
            assert (seen.first, seen.last) == (data[0], data[-1])
        assert seen.mapped is (size == LARGE)  # a large call: a view of its mapped memfd

    await _blobs(kernel, ViewingBlobs(), body)


async def test_a_handler_annotated_bytes_gets_bytes(kernel: capbus.Kernel) -> None:
    async def body(blobs: Any) -> None:
        for size in (10, LARGE):
            seen = await blobs.size(data=_data(size), note="plain")
            assert (seen.size, seen.isView, seen.note) == (size, False, "plain")

    await _blobs(kernel, CopyingBlobs(), body)


async def test_an_async_handler_reads_its_view_after_it_awaited_and_results_read_as_views(
    kernel: capbus.Kernel,
) -> None:
    async def body(blobs: Any) -> None:
        for size in (0, 33, LARGE):
            data = _data(size)
            results = await blobs.back(data=data)
            view = results.view("data")
            assert isinstance(view, memoryview) and view.readonly
            assert bytes(view) == data == results.data

    await _blobs(kernel, ViewingBlobs(), body)


async def test_a_view_of_a_field_read_through_pycapnp_is_of_a_copy(kernel: capbus.Kernel) -> None:
    async def body(blobs: Any) -> None:
        seen = await blobs.nested(inner={"blob": b"abc"}, pick=1)
        assert (seen.size, seen.isView) == (3, True)

    await _blobs(kernel, ViewingBlobs(), body)


def test_a_view_of_a_field_that_is_not_data_or_text_is_refused() -> None:
    from capbus.rpc import protocol

    method = schema.Blobs.interface.methods["size"]
    encoded = protocol.encode_results(1, method, {"size": 5, "note": "n"})
    returned = protocol.decode(encoded.payload, [])
    assert isinstance(returned, protocol.ReceivedReturn) and returned.body is not None
    results = returned.body.struct(method.results)
    assert bytes(results.view("note")) == b"n"
    with pytest.raises(TypeError, match="not a Data or Text field"):
        results.view("size")
