"""Attacks on the newest commit (eleventh review): a Data value already in a sealed memfd
travels as a Cap'n Proto segment of its own, attached to the bus1 message as that memfd
(capbus/rpc/segments.py, capbus/memfd.py map_sealed, Engine._data)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.memfd import Unmappable, map_sealed
from capbus.rpc import errors, protocol
from capbus.rpc.segments import ATTACHED_MIN
from capbus.rpc.vat import open_vat

from .hostile import TIMEOUT, fail_if_crashed, next_return
from .test_attached_segments import LARGE, SIZE_METHOD, Blobs, pattern, schema, sealed

_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


async def test_a_sealed_value_of_a_size_not_a_multiple_of_eight_does_not_kill_the_server(
    kernel: capbus.Kernel,
) -> None:
    """HIGH. Attack: a caller (a bare peer here; an honest vat does the same) sends a call
    whose Data value is in a sealed memfd of a size that is not a multiple of 8 (8 MiB + 1,
    made with sealed_payload). The segment table says ceil(size / 8) words; map_sealed
    accepts the memfd (its size rounds up to the segment's) and then asks mmap for the
    rounded-up length, which CPython's mmap refuses with ValueError ("mmap length is greater
    than file size": it checks the length against st_size). map_sealed turns only OSError
    into Unmappable and Engine._data catches only CapWireError and Unmappable: the
    ValueError escapes Engine.receive and kills the server's vat, from one message of any
    caller; every other client loses the server, and the caller gets no answer. Suggested
    fix: map the memfd so that the segment's padding reads as zeros without mmap's length
    check (e.g. map ``actual`` bytes rounded up to the page with a helper that does not
    compare to st_size, or refuse such a memfd with Unmappable), and treat every error of
    take_attached as a refusal of that message (except Exception, as for decode).
    Fixed: an attached memfd must be exactly its segment's size (whole words), anything
    take_attached raises refuses the message, and encoders copy odd-sized values in line."""
    server_peer, attacker, honest = await kernel.connect(), await kernel.connect(), await kernel.connect()
    size = LARGE + 1
    try:
        async with open_vat(server_peer) as server_vat, open_vat(honest) as honest_vat:
            node = await server_vat.export(Blobs())
            target = await server_peer.transfer(node, attacker)
            blobs = honest_vat.client(await server_peer.transfer(node, honest), schema.Blobs)
            reply = await attacker.create_node()
            # (Since the fix an honest encoder copies an odd-sized value in line: the attacker
            # names a segment of whole words and attaches a memfd one byte short of it.)
            encoded = protocol.encode_call(7, SIZE_METHOD, {"data": sealed(LARGE + 8, 2), "note": ""})
            assert len(encoded.attached) == 1
            odd = sealed(size, 2)
            with trio.fail_after(TIMEOUT):
                await attacker.send(target, encoded.payload, handles=[reply], fds=[odd.obj.memfd])
                returned = await next_return(attacker)
                assert returned.question_id == 7
                assert returned.error is None or isinstance(returned.error, errors.Failed), returned
                seen = await blobs.size(data=sealed(LARGE, 1), note="still serving")
                assert seen.mapped and seen.note == "still serving"
    except BaseException as error:  # noqa: BLE001 - the vat died: say so
        fail_if_crashed(error, ValueError, "a sealed Data value of 8 MiB + 1 bytes")
        raise
    finally:
        for peer in (server_peer, attacker, honest):
            await peer.aclose()


async def test_results_in_a_sealed_memfd_of_a_size_not_a_multiple_of_eight_reach_the_caller(
    kernel: capbus.Kernel,
) -> None:
    """HIGH. Attack: a callee (hostile, or honest: Blobs.make builds its results with
    sealed_payload) answers with a Data value in a sealed memfd of 8 MiB + 1 bytes. The
    caller's Engine._data runs take_attached on the return; map_sealed's mmap of the
    rounded-up segment size raises ValueError (CPython checks the length against the
    file's size), which neither map_sealed nor Engine._data catches: the CALLER's vat dies
    (every call it has open fails, every object it serves is gone) because a server it
    called answered with an odd-sized value. Suggested fix: as for calls (map the file's
    own size, or refuse with Unmappable, and catch every error of take_attached as a
    malformed return of that one question)."""
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    size = LARGE + 1
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            handle = await server_peer.transfer(await server_vat.export(Blobs()), client_peer)
            blobs = client_vat.client(handle, schema.Blobs)
            with trio.fail_after(TIMEOUT):
                results = await blobs.make(size=size, seed=3)
                assert results.data == pattern(size, 3)
                assert (await blobs.size(data=sealed(LARGE, 1), note="next")).note == "next"
    except BaseException as error:  # noqa: BLE001 - the vat died: say so
        crash = error
        while isinstance(crash, BaseExceptionGroup) and len(crash.exceptions) == 1:
            crash = crash.exceptions[0]
        if isinstance(crash, ValueError):
            pytest.fail(
                f"the caller's vat crashed on results of 8 MiB + 1 bytes in a sealed memfd: {crash!r}"
            )
        raise
    finally:
        await server_peer.aclose()
        await client_peer.aclose()


async def test_a_local_call_reads_a_sealed_value_of_a_size_not_a_multiple_of_eight(
    kernel: capbus.Kernel,
) -> None:
    """MEDIUM. A local (loopback) call whose params or results hold a Data value in a
    sealed memfd of 8 MiB + 1 bytes fails with CapWireError "a segment is not a whole
    number of words": the loopback path decodes with the sender's own views as the attached
    segments (Vat._call_local passes encoded.attached), and a view of the SealedMapping is
    the value's size, not the segment's whole words, so capwire_check_segments refuses the
    message the encoder itself just built. The same value sent to a remote vat crashes that
    vat instead (the tests above): an odd-sized sealed value works nowhere, and the error
    does not say why. Suggested fix: give the decoder segment-sized views (pad the last
    word: e.g. map the memfd over whole words, or attach only values whose size is a
    multiple of 8 and copy the rest in line), in both the loopback and the received path."""
    peer = await kernel.connect()
    size = LARGE + 1
    try:
        async with open_vat(peer) as vat:
            local = vat.local(Blobs())
            with trio.fail_after(TIMEOUT):
                assert (await local.back(data=sealed(size, 4))).data == pattern(size, 4)
                assert (await local.make(size=size, seed=6)).data == pattern(size, 6)
    finally:
        await peer.aclose()


def test_a_hugetlb_memfd_without_pages_is_refused_as_sparse() -> None:
    """LOW (needs a system with a hugetlb pool, where it is MEDIUM). Attack: attach, as a
    Data segment, a memfd made with MFD_HUGETLB | MFD_ALLOW_SEALING, ftruncated to its size
    and sealed, with no page ever written. map_sealed's hole check is lseek(SEEK_HOLE), and
    hugetlbfs does not report holes (generic llseek: the first hole is at the end), so the
    check passes: on a host with huge pages the receiver's mapping reserves them and every
    page it reads is allocated then, from the system's huge page pool and charged to the
    receiver's hugetlb cgroup (what the check exists to prevent: the sender's holes are the
    receiver's memory to fill; and a fault past a hugetlb cgroup limit is SIGBUS). The same
    check guards payload memfds (Peer._wrap), so they share the gap.
    Here (no pool) the mmap fails with ENOMEM, which hides the bypass. Suggested fix: refuse
    any attached fd that is not on tmpfs/shmem (fstatfs f_type == TMPFS_MAGIC, or
    F_GET_SEALS plus a check that it is not HUGETLBFS_MAGIC), and say why."""
    try:
        fd = os.memfd_create("huge", os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
    except OSError:
        pytest.skip("no hugetlb memfds here")
    try:
        size = 2 << 20
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        with pytest.raises(Unmappable, match="holes|huge"):
            map_sealed(fd, size)
    finally:
        os.close(fd)


async def test_attached_segments_respect_the_peers_max_mapped_bytes(kernel: capbus.Kernel) -> None:
    """LOW. Attack: a process that bounds what it maps sets Peer.max_mapped_bytes (here
    1 MiB; "a reader that refuses messages over a size sets it, so that it never maps what
    it refuses"; a sandbox under RLIMIT_AS would), below its vat's max_message_bytes. A
    caller sends it 8 MiB of Data as a payload memfd: not mapped, refused Overloaded
    ("over the 1048576 bytes this peer maps"). The same 8 MiB in a sealed memfd, attached
    as a segment: take_attached checks only the engine's max_message_bytes, so the vat
    maps it (up to max_message_bytes per message, 63 fds' worth of mappings, and twice
    that per caller queued): the peer's own bound on its address space is bypassed by the
    new path. Suggested fix: take_attached's limit is min(max_message_bytes,
    peer.max_mapped_bytes) (the engine can be given it, as open_vat already reconciles the
    two), refused the same way as a payload memfd over it (Overloaded, saying why)."""
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    server_peer.max_mapped_bytes = 1 << 20
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            handle = await server_peer.transfer(await server_vat.export(Blobs()), client_peer)
            blobs = client_vat.client(handle, schema.Blobs)
            with trio.fail_after(TIMEOUT):
                with pytest.raises(errors.RpcError, match="1048576 bytes this peer maps"):
                    await blobs.size(data=memoryview(pattern(LARGE)), note="a payload memfd")
                try:
                    seen = await blobs.size(data=sealed(LARGE), note="attached")
                except errors.RpcError as error:
                    assert "1048576" in str(error)
                else:
                    assert not seen.mapped, "an 8 MiB segment was mapped by a peer that maps 1 MiB at most"
    finally:
        await server_peer.aclose()
        await client_peer.aclose()


MANY_DATA = 65


def _many_data_schema(directory: Path) -> Any:
    params = ", ".join(f"d{i} :Data" for i in range(MANY_DATA))
    path = directory / "many.capnp"
    path.write_text(f"@0xb1b2c3d4e5f6071a;\ninterface Sink {{\n  take @0 ({params}) -> (n :UInt64);\n}}\n")
    return capbus.load(path)


async def test_a_call_with_more_sealed_values_than_fds_per_message_is_sent(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    """LOW. A caller passes 65 Data values that are each a sealed memfd of ATTACHED_MIN
    bytes (to a method with 65 Data params: any struct with that many Data fields). The
    flat codec attaches every one of them as a segment of its own, one fd each, with no
    regard to the kernel's FDS_MAX (64 fds per message, Fd fields' included): the call
    fails with "the kernel refused the call: 65 file descriptors, over 64 per message",
    though the caller passed no fd at all, where the same values as bytes (or 64 of them)
    go through. Suggested fix: attach at most FDS_MAX minus the Fd fields' fds (the rest
    copied in line, as a small value is), or refuse up front saying which Data values."""
    schema_ = _many_data_schema(tmp_path)

    class Sink(schema_.Sink.Server):  # type: ignore[misc,name-defined]
        async def take(self, **values: Any) -> dict[str, int]:
            return {"n": sum(len(value) for value in values.values())}

    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            sink = client_vat.client(
                await server_peer.transfer(await server_vat.export(Sink()), client_peer), schema_.Sink
            )
            value = sealed(ATTACHED_MIN)
            with trio.fail_after(TIMEOUT):
                answer = await sink.take(**{f"d{i}": value for i in range(MANY_DATA)})
                assert answer.n == MANY_DATA * ATTACHED_MIN
    finally:
        await server_peer.aclose()
        await client_peer.aclose()
