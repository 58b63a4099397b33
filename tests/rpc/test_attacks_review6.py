"""Attacks on the RPC layer after the fifth review's fixes (a mapped payload counted as
one fd against the queued and waiting calls' fd bounds, kept answers' fd bound, the sparse
memfd check) (sixth review). Each test reproduces one with real kernel peers (a bare peer
writing envelopes by hand plays the hostile side) and fails until it is fixed; its
docstring says the severity, the harm and a suggested fix.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
from pathlib import Path
from typing import Any

import trio

import capbus
from capbus.memfd import SealedMapping, sealed_payload
from capbus.rpc import protocol
from capbus.rpc.errors import Disconnected as RpcDisconnected
from capbus.rpc.errors import RpcError
from capbus.rpc.vat import open_vat

from .hostile import (
    ECHO,
    TIMEOUT,
    fds_held_by_kept_results,
    honest_large_call_after,
    next_return,
    open_fds,
    until,
)
from .services import FactoryServer, schema

REVIEW6: Any = capbus.load(Path(__file__).with_name("review6.capnp"))
PUT = REVIEW6.Store.interface.methods["put"]

LARGE_TEXT = "x" * (130 * 1024)  # over PAYLOAD_MAX: the call travels as a sealed memfd


class StoreServer(REVIEW6.Store.Server):  # type: ignore[misc]
    def __init__(self) -> None:
        self.running = 0
        self.gate = trio.Event()

    async def put(self, text: str) -> None:
        self.running += 1
        try:
            await self.gate.wait()  # (the store's own I/O, as slow as it likes)
        finally:
            self.running -= 1


async def test_running_large_calls_each_hold_an_uncounted_mapping_fd(kernel: capbus.Kernel) -> None:
    """MEDIUM. The fifth review counts a mapped payload as one fd (CPython's mmap keeps a
    duplicate of the memfd) while its call is queued (QueueBounds.fds) or waits for a
    pipelined base (max_waiting_fds), and the count goes back at CallArrived's dequeue
    when the handler starts. But the message stays mapped for as long as the handler
    runs: the vat's task keeps ``arrived`` (arrived.call holds the mapped payload the
    params were decoded from), though the params are already Python values. Running calls
    are bounded only by slots (max_calls_per_caller 256, a uid's share of
    max_concurrent_calls), not by fds: one caller calling an honest method that takes a
    130 KiB text and takes its time (any handler awaiting I/O) makes the server's process
    hold one fd per running call, 256 per caller, more per uid, up to the vat's
    concurrency: past RLIMIT_NOFILE (often 1024) the server loses every memfd payload and
    fd sent to it (Peer._lose_fds), and honest large calls are never answered (the fifth
    review's HIGH finding, by another way). Here 200 such calls: the server holds ~200
    more fds. Fix: drop the reference to the mapped payload once the params are decoded
    (arrived.call's payload released, or params copied out of it before the handler
    starts: release the memoryview / close the mmap), or keep counting a running call's
    mapping against a per-caller (and per-uid) fd bound until the handler returns."""
    calls, bound = 200, 64
    attacker, server_peer = await kernel.connect(), await kernel.connect()
    server = StoreServer()
    try:
        async with open_vat(server_peer) as server_vat:
            target = await server_peer.transfer(await server_vat.export(server), attacker)
            reply = await attacker.create_node()
            with trio.fail_after(TIMEOUT):
                before = open_fds()
                for question in range(1, calls + 1):
                    call = protocol.encode_call(question, PUT, {"text": LARGE_TEXT})
                    await attacker.send(target, bytes(call.payload), handles=[reply])
                    del call
                await until(lambda: server.running == calls)
                held = open_fds() - before
            server.gate.set()
            assert held <= bound, (
                f"one caller's {calls} running calls of {len(LARGE_TEXT)} bytes (no fds) make"
                f" the server's process hold {held} more fds"
            )
    finally:
        server.gate.set()
        await attacker.aclose()
        await server_peer.aclose()


INCREMENT = schema.Counter.interface.methods["increment"]


async def test_a_multicast_to_many_subscribers_breaks_the_publishers_connection(
    kernel: capbus.Kernel,
) -> None:
    """MEDIUM. The fifth review made a send of too many fds fail alone (MessageTooLarge
    before the write, EINVAL with fds -> InvalidArgument), but Peer._send_frame checks no
    other count: not the destinations (DESTINATIONS_MAX, 1024) nor the handles
    (HANDLES_MAX, 256), nor the frame against FRAME_MAX. A frame the kernel would refuse
    is still written; one larger than the socket's send buffer (net.core.wmem_default,
    212992 bytes: ~26,600 destinations of 8 bytes, or as many handles) makes sendmsg fail
    with EMSGSIZE, which _write_nowait takes for a broken socket: the peer is marked
    Disconnected and every node, handle and call of it is gone. Vat.multicast sends one
    frame to every client it is given: a publisher whose subscriber list callers fill (a
    caller that subscribes its callback 30,000 times, or 30,000 callbacks of its own)
    takes the publisher's whole vat down with the next event. Fix: refuse more than
    DESTINATIONS_MAX destinations and HANDLES_MAX handles in _send_frame (MessageTooLarge /
    InvalidArgument) before writing, and take EMSGSIZE from sendmsg as that send failing
    only; Vat.multicast may split a long target list into sends of DESTINATIONS_MAX."""
    publisher, subscriber = await kernel.connect(), await kernel.connect()
    try:
        node = await subscriber.create_node()
        handle = await subscriber.transfer(node, publisher)
        async with open_vat(publisher) as vat:
            client = vat.client(handle, schema.Counter)
            with trio.fail_after(TIMEOUT):
                try:
                    await vat.multicast([client] * 30_000, INCREMENT, {"by": 1})
                except (capbus.CapbusError, RpcError):
                    pass  # refused: fine, if that send alone is
                try:
                    outcome = await vat.multicast([client], INCREMENT, {"by": 1})
                except (capbus.Disconnected, RpcDisconnected) as error:
                    raise AssertionError(
                        f"one multicast to 30000 subscribers broke the publisher's connection: {error}"
                    ) from error
                assert outcome == (None,)
                message = await subscriber.recv()
                assert message.kind is capbus.MessageKind.DATA
    finally:
        await publisher.aclose()
        await subscriber.aclose()


async def test_a_typed_memoryview_payload_breaks_the_peer(kernel: capbus.Kernel) -> None:
    """LOW. Peer.send takes ``bytes | bytearray | memoryview``, and _send_frame and
    _wire.send_frame size the payload with len(payload): for a memoryview of a typed
    buffer (array.array('Q'), a numpy array, memoryview.cast('Q')) that is its count of
    items, not of bytes. 800 KB of 8-byte items is 100,000 items, under PAYLOAD_MAX
    (131,072), so it is not sent as a memfd but written inline, in a frame that says
    100,000 bytes and is 800 KB long: sendmsg fails with EMSGSIZE, which _write_nowait
    takes for a broken socket, and the peer is Disconnected (every node, handle and call
    of it gone). A smaller one (len under PAYLOAD_MAX, nbytes under the socket buffer) is
    refused by the kernel as a malformed frame, where the same bytes would have been sent.
    Fix: take ``memoryview(payload).cast("B")`` (or nbytes) for every size in
    _send_frame, _sealed_memfd and send_frame; and EMSGSIZE fails that send only."""
    sender, receiver = await kernel.connect(), await kernel.connect()
    try:
        node = await receiver.create_node()
        target = await receiver.transfer(node, sender)
        payload = memoryview(array.array("Q", bytes(8 * 100_000)))
        with trio.fail_after(TIMEOUT):
            try:
                await sender.send(target, payload)
            except capbus.Disconnected as error:
                raise AssertionError(f"a send of an 800 KB array broke the peer: {error}") from error
            message = await receiver.recv()
            assert len(message.payload) == payload.nbytes
            await sender.send(target, b"still connected")
            assert bytes((await receiver.recv()).payload_view) == b"still connected"
    finally:
        await sender.aclose()
        await receiver.aclose()


async def test_the_head_of_a_sparse_memfd_is_allocated_by_the_receiver(kernel: capbus.Kernel) -> None:
    """LOW. The fifth review's fix maps a sparse memfd payload (fewer blocks than its size)
    only at its start (PAYLOAD_HEAD_BYTES, 64 KiB), so that its sender can be answered, and
    maps one of at most 64 KiB whole without the check. Both are still mmap'd MAP_SHARED: a
    read fault on a hole of a shmem file allocates a page in the *sender's* file, charged to
    the receiver's memory cgroup, and the page stays as long as the sender keeps its memfd
    open (long after the receiver dropped the message). Reading the call's header (here
    Engine._refuse -> call_identity) faults in the first page; a header that points further
    into the head would make the receiver fault in more, up to 16 pages per message (not
    shown here). A sender that
    keeps its memfds (RLIMIT_NOFILE, ~20,000 here; more processes, more) pins that much
    memory the receiver pays for, and can send as many such messages as it likes (each is
    refused at once). Here a 2 MiB memfd that is all holes: after the vat has dealt with it
    (an echo call after it is answered), the sender's file holds pages it never wrote.
    Fix: read the head of a sparse (or head-only, or small) memfd with os.pread into bytes
    (a read of a shmem hole copies the zero page and allocates nothing), not a mapping;
    that also leaves no fd held for it."""
    attacker, server_peer = await kernel.connect(), await kernel.connect()
    size = 2 << 20
    fd = os.memfd_create("sparse", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        sparse = memoryview(SealedMapping(fd, size, mmap.MAP_SHARED, mmap.PROT_READ))
        async with open_vat(server_peer) as server_vat:
            target = await server_peer.transfer(await server_vat.export(FactoryServer()), attacker)
            reply = await attacker.create_node()
            with trio.fail_after(TIMEOUT):
                assert os.fstat(fd).st_blocks == 0
                await attacker.send(target, sparse, handles=[reply])
                after = protocol.encode_call(1, ECHO, {"text": "after"})
                await attacker.send(target, after.payload, handles=[reply])
                answer = await next_return(attacker)
                assert answer.question_id == 1 and answer.error is None
            allocated = os.fstat(fd).st_blocks * 512
            assert allocated == 0, (
                f"the server allocated {allocated} bytes in the sender's sparse memfd (charged to"
                " the server, kept while the sender holds the memfd)"
            )
        sparse.release()
    finally:
        os.close(fd)
        await attacker.aclose()
        await server_peer.aclose()


RUNNING_FLOOD = f"""
PUT = capbus.load({str(Path(__file__).with_name("review6.capnp"))!r}).Store.interface.methods["put"]

async def attack(peer, report, target):
    reply = await peer.create_node()
    for question in range(1, 251):
        call = protocol.encode_call(question, PUT, {{"text": "x" * (130 * 1024)}})
        await peer.send(target, call.payload, handles=[reply])
        del call
    await report("sent")
    while True:
        await peer.recv()
"""


async def test_an_honest_large_call_is_lost_once_running_large_calls_use_up_the_servers_fds(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    """HIGH (with test_running_large_calls_each_hold_an_uncounted_mapping_fd). The fifth
    review's HIGH finding, again, through running calls: a caller in a process of its own
    calls an honest method that takes 130 KiB of text and takes its time (Store.put), 250
    times; with the default max_calls_per_caller (256) every one of them runs at once, and
    each holds its mapped message, an fd of the server's process that no bound counts
    (its queue fd count went back when the handler started). Here the server's process may
    open 100 more fds (RLIMIT_NOFILE lowered as in the fifth review's test; at the common
    1024, two uids' callers reach it: a uid may run max_concurrent_calls // 2 = 512
    handlers, the vat 1024): once none is left, Peer._lose_fds drops every memfd payload,
    and an honest process's echo() of 140 KB gets no answer (nor an error) within 5 s.
    Fix: as in that test, let go of a call's mapped message once its params are decoded, or
    count a running call's mapping against the per-caller and per-uid fd bounds (refusing
    with Overloaded past them), with headroom below RLIMIT_NOFILE."""
    server_peer = await kernel.connect()
    store = StoreServer()
    try:
        async with open_vat(server_peer) as server_vat:
            node = await server_vat.export(FactoryServer())
            store_node = await server_vat.export(store)
            with trio.fail_after(TIMEOUT):
                outcome = await honest_large_call_after(
                    kernel, tmp_path, server_peer, node, RUNNING_FLOOD, [store_node]
                )
            running = store.running
            store.gate.set()
            assert outcome == "answered", f"an honest caller's large call: {outcome} ({running} puts running)"
    finally:
        store.gate.set()
        await server_peer.aclose()


async def test_results_a_client_keeps_each_hold_an_fd_a_hostile_server_chose(kernel: capbus.Kernel) -> None:
    """LOW. Every fd bound of the fifth review is a server's; the client side has none. A
    return over PAYLOAD_MAX arrives as a memfd, Peer._wrap maps it (CPython's mmap keeps a
    duplicate of the fd open while the mapping lives), and the results reader a call hands
    back (echo's ResultsReader here) is a view of that mapping: for as long as the client
    keeps a results object, its process holds one fd. Which returns are large is the
    callee's choice, not the client's: a hostile server answers each call with 130 KiB
    (here a Text that the schema allows; any result can be padded past PAYLOAD_MAX), and a
    client that keeps the results of its calls (a cache, a list of answers, the results
    of a promise it keeps for pipelining) holds an fd per result, with nothing to tell it
    so: 100 calls, 100 fds here; past RLIMIT_NOFILE the client loses every memfd payload
    and fd sent to it on every connection. Fix: map without keeping an fd (a mapping made
    in C, capwire, or mmap(trackfd=False) once Python 3.13 is the floor), which also makes
    the servers' fd counting of mapped messages unnecessary; or copy a return that is
    small enough into bytes."""
    calls, bound = 100, 64
    held = await fds_held_by_kept_results(
        kernel,
        schema.Factory,
        lambda factory: factory.echo("hi"),
        lambda call: protocol.encode_results(call.question_id, ECHO, {"text": LARGE_TEXT}),
        calls,
    )
    assert held <= bound, f"the results of {calls} calls a client keeps hold {held} fds of its process"


async def test_a_payload_built_with_sealed_payload_that_leaves_zeros_unwritten_is_cut(
    kernel: capbus.Kernel,
) -> None:
    """LOW. sealed_payload(size, fill) gives ``fill`` a view of a new memfd that starts
    zeroed (ftruncate), so a fill that writes only what is not zero is a natural, honest
    use: a Cap'n Proto builder writes only the fields that are set and relies on zeroed
    memory, a fixed-size table or image is mostly zeros. Under 1 MiB sealed_payload maps
    it without MAP_POPULATE, so the pages fill never wrote are holes, and the fifth
    review's sparse check (Peer._wrap: st_blocks * 512 < size) takes such a payload for an
    attack: every receiver gets only its first 64 KiB (Message.whole_size set), and a vat
    refuses it as Overloaded("no address space left here to map ..."), a reason that is
    not true and invites a retry that can never succeed. Here 512 KiB written only in its
    first and last bytes: the receiver gets 64 KiB of it. Fix: have sealed_payload
    populate every page before fill (fallocate(2) on the memfd, or MAP_POPULATE at every
    size), so that what capbus builds is never sparse; and give a sparse payload's refusal
    its own reason (and error kind) rather than the address space's."""
    sender, receiver = await kernel.connect(), await kernel.connect()
    size = 512 * 1024

    def fill(view: memoryview) -> None:
        view[:6] = b"header"
        view[-7:] = b"trailer"

    try:
        node = await receiver.create_node()
        target = await receiver.transfer(node, sender)
        payload = sealed_payload(size, fill)
        with trio.fail_after(TIMEOUT):
            await sender.send(target, payload)
            message = await receiver.recv()
        received = len(message.payload_view)
        assert message.whole_size is None and received == size, (
            f"a {size}-byte payload built with sealed_payload reached its receiver as its first"
            f" {received} bytes (whole_size={message.whole_size})"
        )
        assert bytes(message.payload_view[-7:]) == b"trailer"
    finally:
        await sender.aclose()
        await receiver.aclose()
