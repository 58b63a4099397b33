"""A Data value already in a sealed memfd travels as a Cap'n Proto segment of its own, the
memfd attached to the bus1 message (capbus/rpc/segments.py): no copy by the sender or the
receiver; the same bytes whichever way it is read; and a receiver refuses, saying why,
an attached segment it cannot trust."""

from __future__ import annotations

import fcntl
import gc
import os
import struct
from typing import Any

import pytest
import trio

import capbus
from capbus.memfd import seal, sealed_payload
from capbus.rpc import errors, protocol, segments
from capbus.rpc.capwire import CapWireError
from capbus.rpc.vat import open_vat

from .hostile import next_return, open_fds
from .test_views import ViewingBlobs, schema

TIMEOUT = 20
SIZE_METHOD = schema.Blobs.interface.methods["size"]
BACK = schema.Blobs.interface.methods["back"]
MAKE = schema.Blobs.interface.methods["make"]
LARGE = 8 << 20


def pattern(size: int, seed: int = 0) -> bytes:
    block = bytes((i * 7 + seed) % 251 for i in range(4096))
    return (block * (size // 4096 + 1))[:size]


def sealed(size: int, seed: int = 0) -> memoryview:
    data = pattern(size, seed)
    return sealed_payload(size, lambda view: view.__setitem__(slice(None), data))


class Blobs(ViewingBlobs):
    """Takes its Data as views (test_views.py), and makes results in a sealed memfd."""

    def make(self, size: int, seed: int) -> memoryview:
        return sealed(size, seed)


async def _blobs(kernel: capbus.Kernel, body: Any) -> None:
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            handle = await server_peer.transfer(await server_vat.export(Blobs()), client_peer)
            with trio.fail_after(TIMEOUT):
                await body(client_vat.client(handle, schema.Blobs))
    finally:
        await server_peer.aclose()
        await client_peer.aclose()


def test_a_sealed_value_is_encoded_as_a_segment_of_its_own() -> None:
    data = sealed(LARGE, 5)
    encoded = protocol.encode_call(1, SIZE_METHOD, {"data": data, "note": "n"}, oneway=True)
    assert isinstance(encoded.payload, bytes) and len(encoded.payload) < 1024  # (not 8 MiB)
    assert encoded.attached == [data]
    assert encoded.fds == [data.obj.memfd] and encoded.field_fds == []
    assert segments.attached_sizes(encoded.payload) == [LARGE]
    received = protocol.decode(encoded.payload, [], attached=encoded.attached)
    assert isinstance(received, protocol.ReceivedCall)
    params = received.params(SIZE_METHOD.params)
    view = params.view("data")
    assert view.obj is data.obj  # the very mapping: read without a copy
    assert params.data == bytes(data) and params.note == "n"


def test_a_small_or_unsealed_value_is_copied_in_line() -> None:
    small = sealed(1000)
    for value in (small, memoryview(pattern(LARGE))):
        encoded = protocol.encode_call(1, SIZE_METHOD, {"data": value, "note": ""}, oneway=True)
        assert encoded.attached == [] and encoded.fds == []
        received = protocol.decode(encoded.payload, [])
        assert isinstance(received, protocol.ReceivedCall)
        assert received.params(SIZE_METHOD.params).data == bytes(value)


async def test_a_sealed_value_reaches_a_server_as_a_view_of_the_same_memfd(kernel: capbus.Kernel) -> None:
    data = sealed(LARGE, 9)

    async def body(blobs: Any) -> None:
        for _ in range(3):  # (the same memfd sent again: still sealed, still whole)
            seen = await blobs.size(data=data, note="attached")
            assert (seen.size, seen.first, seen.last) == (LARGE, data[0], data[-1])
            assert seen.isView and seen.mapped and seen.note == "attached"
        assert (await blobs.back(data=data)).data == bytes(data)  # (as bytes: the same bytes)

    await _blobs(kernel, body)


async def test_results_built_in_a_sealed_memfd_reach_the_caller(kernel: capbus.Kernel) -> None:
    encoded = protocol.encode_results(1, MAKE, {"data": sealed(LARGE, 3)})
    assert len(encoded.attached) == 1 and len(encoded.payload) < 1024

    async def body(blobs: Any) -> None:
        for seed in (1, 2):
            results = await blobs.make(size=LARGE, seed=seed)
            assert results.data == pattern(LARGE, seed)
            assert bytes(results.view("data")) == pattern(LARGE, seed)

    await _blobs(kernel, body)


async def test_a_local_call_reads_a_sealed_value_too(kernel: capbus.Kernel) -> None:
    peer = await kernel.connect()
    try:
        async with open_vat(peer) as vat:
            local = vat.local(Blobs())
            with trio.fail_after(TIMEOUT):
                assert (await local.back(data=sealed(LARGE, 4))).data == pattern(LARGE, 4)
                assert (await local.make(size=LARGE, seed=6)).data == pattern(LARGE, 6)
    finally:
        await peer.aclose()


async def test_attached_segments_leave_no_fds_behind(kernel: capbus.Kernel) -> None:
    data = sealed(LARGE)

    async def body(blobs: Any) -> None:
        await blobs.size(data=data, note="")  # (the first: the vats' own fds settle)
        gc.collect()
        before = open_fds()
        for _ in range(20):
            await blobs.size(data=data, note="")
            await blobs.make(size=segments.ATTACHED_MIN, seed=1)
        gc.collect()
        assert open_fds() <= before

    await _blobs(kernel, body)


def test_seal_makes_a_memfd_of_the_callers_sendable() -> None:
    fd = os.memfd_create("mine", os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, pattern(LARGE))
        view = seal(fd)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
        with pytest.raises(PermissionError):
            os.write(fd, b"changed")
        encoded = protocol.encode_call(1, SIZE_METHOD, {"data": view, "note": ""}, oneway=True)
        assert encoded.attached == [view]
    finally:
        os.close(fd)


# -- a hostile caller's attached segments ---------------------------------------------------


def _unsealed(size: int) -> int:
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    os.write(fd, bytes(size))
    return fd


def _sealed_fd(size: int) -> int:
    fd = _unsealed(size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def _sparse_sealed(size: int) -> int:
    fd = os.memfd_create("sparse", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def _pipe_end(size: int) -> int:
    read_end, write_end = os.pipe()
    os.close(write_end)
    return read_end


@pytest.mark.parametrize(
    ("make_fd", "reason"),
    [
        (_unsealed, "not sealed against write, shrink and grow"),
        (_pipe_end, "not a memfd"),
        (lambda size: _sealed_fd(size // 2), "not the segment's"),
        (_sparse_sealed, "has holes"),
        (None, "message ends before its last segment"),
    ],
    ids=["unsealed", "pipe", "short", "sparse", "missing"],
)
async def test_an_attached_segment_the_receiver_cannot_trust_is_refused_saying_why(
    kernel: capbus.Kernel, make_fd: Any, reason: str
) -> None:
    """A caller that attaches, for its Data segment, an fd it can still change (or shrink
    under the reader: SIGBUS), something that is not a memfd, one of another size, one full
    of holes (the receiver's memory to fill), or nothing at all: the call fails with why,
    and the server goes on serving."""
    server_peer, attacker, honest = await kernel.connect(), await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(honest) as honest_vat:
            node = await server_vat.export(Blobs())
            target = await server_peer.transfer(node, attacker)
            blobs = honest_vat.client(await server_peer.transfer(node, honest), schema.Blobs)
            reply = await attacker.create_node()
            encoded = protocol.encode_call(7, SIZE_METHOD, {"data": sealed(LARGE), "note": ""})
            fds = [] if make_fd is None else [make_fd(LARGE)]
            with trio.fail_after(TIMEOUT):
                try:
                    await attacker.send(target, encoded.payload, handles=[reply], fds=fds)
                finally:
                    for fd in fds:
                        os.close(fd)
                returned = await next_return(attacker)
                assert returned.question_id == 7
                assert isinstance(returned.error, errors.Failed), returned
                assert reason in returned.error.reason
                seen = await blobs.size(data=sealed(LARGE, 1), note="still serving")
                assert seen.mapped and seen.note == "still serving"
    finally:
        for peer in (server_peer, attacker, honest):
            await peer.aclose()


async def test_attached_segments_over_the_vats_limit_are_not_mapped(kernel: capbus.Kernel) -> None:
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    try:
        async with (
            open_vat(server_peer, max_message_bytes=4 << 20) as server_vat,
            open_vat(client_peer) as client_vat,
        ):
            handle = await server_peer.transfer(await server_vat.export(Blobs()), client_peer)
            blobs = client_vat.client(handle, schema.Blobs)
            with trio.fail_after(TIMEOUT), pytest.raises(errors.Failed, match="over the limit of 4194304"):
                await blobs.size(data=sealed(LARGE), note="")
    finally:
        await server_peer.aclose()
        await client_peer.aclose()


def _table(*words: int) -> bytes:
    table = struct.pack(f"<{len(words) + 1}I", len(words) - 1, *words)
    return table + b"\0" * (len(table) % 8)


def test_a_segment_table_that_the_payload_cuts_or_that_attaches_nothing_is_refused() -> None:
    with pytest.raises(CapWireError, match="ends inside a segment"):
        segments.attached_sizes(_table(1, 2) + bytes(16))
    with pytest.raises(CapWireError, match="an attached segment of no words"):
        segments.attached_sizes(_table(1, 2, 0) + bytes(8))
    assert segments.attached_sizes(_table(1, 0) + bytes(8)) == []  # (an empty segment: in line)
    assert segments.attached_sizes(_table(1, 2, 3) + bytes(8)) == [16, 24]
    fds = [_sealed_fd(16)]
    try:
        with pytest.raises(CapWireError, match="2 attached segments, but the message brought 1 fds"):
            segments.take_attached(_table(1, 2, 3) + bytes(8), fds, 1 << 20)
        with pytest.raises(CapWireError, match="over the limit of 20"):
            segments.take_attached(_table(1, 2) + bytes(8), fds, 20)
        assert len(fds) == 1  # (refused: every fd still the caller's to close)
        (view,) = segments.take_attached(_table(1, 2) + bytes(8), fds, 1 << 20)
        assert fds == [] and view.nbytes == 16 and view.readonly
    finally:
        for fd in fds:
            os.close(fd)
