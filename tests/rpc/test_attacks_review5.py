"""Attacks on the RPC layer after the large-payload path (capbus.peer.sealed_payload,
SealedMapping: a mapped payload keeps its memfd open) and the fourth review's fixes (fifth
review). Each test reproduces one with real kernel peers (a bare peer writing envelopes by
hand plays the hostile side) and fails until it is fixed; its docstring says the severity,
the harm and a suggested fix.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from pathlib import Path
from typing import Any

import trio

import capbus
from capbus.memfd import SealedMapping
from capbus.rpc import protocol
from capbus.rpc.vat import open_vat

from .hostile import (
    ECHO,
    NEW_COUNTER,
    SLOW,
    TIMEOUT,
    honest_large_call_after,
    next_return,
    open_fds,
    until_taken_or_refused,
)
from .services import FactoryServer

REVIEW5: Any = capbus.load(Path(__file__).with_name("review5.capnp"))
GET = REVIEW5.Blob.interface.methods["get"]


class BlobServer(REVIEW5.Blob.Server):  # type: ignore[misc]
    async def get(self, text: str) -> Any:
        return {"text": text, "again": self}


LARGE_TEXT = "x" * (130 * 1024)  # over PAYLOAD_MAX: the call travels as a sealed memfd


async def test_queued_large_calls_each_keep_a_memfd_open_uncounted(kernel: capbus.Kernel) -> None:
    """MEDIUM. Since 7a3007a a received large payload is a SealedMapping, which keeps a
    duplicate of its memfd open for as long as the mapping lives (so that it can be sent
    again as that memfd), on top of the duplicate CPython's mmap.mmap keeps itself (before
    3.13's trackfd=False): two fds per mapped payload. A queued call holds its message, so
    each queued large call holds two fds in the server's process. The fourth review's fd
    bound (QueueBounds.fds, 64 per caller) counts only CallArrived.fds, the fds the message
    brought besides the memfd (Peer._wrap pops the memfd off event.fds): a call with no Fd
    field at all, just over PAYLOAD_MAX (128 KiB), costs fds that no bound sees. The bytes
    bound (2 * max_message_bytes = 128 MiB per caller) allows ~1000 such calls per caller
    (~2000 fds), uid_share times that per uid: past the process's RLIMIT_NOFILE (often
    1024) the server can no longer receive any memfd payload or fd (lost messages), create
    a memfd for a large return, or open a file. Here max_calls_per_caller=1, one slow()
    call holds the caller's slot and 200 echo calls of 130 KiB queue behind it: the server
    holds 400 more fds. Fix: count a mapped payload's fds in CallArrived.fds (the queue's fd
    bound); and keep one fd per mapping (SealedMapping can send mapping.fileno(), the
    duplicate mmap already holds, instead of a second os.dup)."""
    calls, bound = 200, 64
    attacker, server_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer, max_calls_per_caller=1) as server_vat:
            server = FactoryServer()
            target = await server_peer.transfer(await server_vat.export(server), attacker)
            reply = await attacker.create_node()
            with trio.fail_after(TIMEOUT):
                await attacker.send(target, protocol.encode_call(1, SLOW, {}).payload, handles=[reply])
                await server.slow_started.wait()
                before = open_fds()
                for question in range(2, calls + 2):
                    payload = bytes(protocol.encode_call(question, ECHO, {"text": LARGE_TEXT}).payload)
                    await attacker.send(target, payload, handles=[reply])
                # (fixed: the calls past the bound are answered Overloaded)
                await until_taken_or_refused(
                    attacker, lambda: sum(c.queued for c in server_vat._callers.values()), calls
                )
                held = open_fds() - before
            assert held <= bound, (
                f"one caller's {calls} queued calls of {len(LARGE_TEXT)} bytes (no fds) make the"
                f" server's process hold {held} more fds"
            )
    finally:
        await attacker.aclose()
        await server_peer.aclose()


def sparse_sealed_payload(size: int) -> tuple[int, memoryview]:
    """A sealed memfd of ``size`` bytes of which no page was ever written (a hole), and a
    view of the whole of it that Peer.send sends as that memfd; nothing is touched here."""
    fd = os.memfd_create("sparse", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd, memoryview(SealedMapping(fd, size, mmap.MAP_SHARED, mmap.PROT_READ))


async def test_a_sparse_memfd_payload_is_populated_by_the_receiver(kernel: capbus.Kernel) -> None:
    """MEDIUM. Peer._wrap maps a received memfd payload of 1 MiB or more with MAP_POPULATE
    (7a3007a), before anything reads or checks it. A memfd is shmem: a read fault on a hole
    of a shared mapping allocates a page in the file's page cache, charged to the memory
    cgroup of the process that faulted, and the page stays allocated as long as the file
    exists, i.e. as long as the *sender* keeps its memfd open, long after the receiver
    dropped the message. So a hostile peer sends sealed memfds that are all holes
    (ftruncate, no write: they cost it no memory, and the kernel charges a memfd's size to
    no quota) of up to max_message_bytes (64 MiB) each, to any node of a vat; the vat's
    process allocates the whole of each at once, whatever the message is (garbage here),
    and every page stays pinned by an fd of the attacker: 64 MiB of RAM per fd the attacker
    keeps, charged to the victim (in a container, its OOM kill). Here two 48 MiB messages
    of holes get 96 MiB allocated. Fix: no MAP_POPULATE for received payloads (fault in
    only what is read, and check the message's segment table, whose sizes bound what is
    read, before touching the rest), or refuse a memfd payload whose st_blocks * 512 is
    below its size (a sparse file) before mapping it."""
    size, messages = 48 * 1024 * 1024, 2
    attacker, server_peer = await kernel.connect(), await kernel.connect()
    memfds: list[int] = []
    try:
        async with open_vat(server_peer) as server_vat:
            server = FactoryServer()
            target = await server_peer.transfer(await server_vat.export(server), attacker)
            reply = await attacker.create_node()
            with trio.fail_after(TIMEOUT):
                for _ in range(messages):
                    fd, payload = sparse_sealed_payload(size)
                    memfds.append(fd)
                    await attacker.send(target, payload, handles=[reply])
                    del payload
                # The vat reads its messages in order: once this call is answered, the
                # sparse ones were received (and mapped) before it.
                await attacker.send(
                    target, protocol.encode_call(1, ECHO, {"text": "hi"}).payload, handles=[reply]
                )
                while (await next_return(attacker)).question_id != 1:
                    pass
            allocated = sum(os.fstat(fd).st_blocks * 512 for fd in memfds)
            assert allocated < size, (
                f"{messages} memfd payloads of {size} bytes of holes, sent to a vat, now have"
                f" {allocated} bytes allocated (by the receiver), pinned by the sender's fds"
            )
    finally:
        for fd in memfds:
            os.close(fd)
        await attacker.aclose()
        await server_peer.aclose()


async def test_kept_large_answers_each_keep_a_memfd_open_uncounted(kernel: capbus.Kernel) -> None:
    """MEDIUM. The same two fds per SealedMapping, on the return side: a return over
    PAYLOAD_MAX is encoded by protocol._payload straight into sealed_payload's memfd, mapped
    (SealedMapping: mmap's duplicate of the fd, and SealedMapping.memfd). An answer kept
    for its caller (keep_results, until it sends Finish) keeps that Encoded, so each kept
    large answer holds two fds in the server's process, and the kept-answer bounds count
    answers (max_kept_per_caller, 1024) and bytes (2 * max_message_bytes), not fds: a
    caller that calls an honest method that hands back 130 KiB of text and a capability (here
    Blob.get) with keep_results, and never
    sends Finish, makes the server hold ~2000 fds per caller (uid_share times that per
    uid), past RLIMIT_NOFILE: the server then loses every memfd payload and fd sent to it
    and fails every large return. Here 200 such calls: the server holds 400 more fds. Fix:
    keep one fd per mapping (SealedMapping can use mapping.fileno()), and bound a caller's
    kept answers in fds too (count a memfd-backed Encoded as one), or keep a kept answer's
    payload as the memfd alone and map it only when it is sent or read again."""
    calls, bound = 200, 64
    attacker, server_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat:
            server = BlobServer()
            target = await server_peer.transfer(await server_vat.export(server), attacker)
            reply = await attacker.create_node()
            with trio.fail_after(TIMEOUT):
                payload = bytes(protocol.encode_call(1, GET, {"text": LARGE_TEXT}, keep_results=True).payload)
                await attacker.send(target, payload, handles=[reply])
                await next_return(attacker)  # (the first return's memfd, already mapped, counts no more)
                before = open_fds()
                for question in range(2, calls + 2):
                    call = protocol.encode_call(question, GET, {"text": LARGE_TEXT}, keep_results=True)
                    await attacker.send(target, bytes(call.payload), handles=[reply])
                    del call
                    await next_return(attacker)
                # (less the last return's memfd, which its server task may still hold: it
                # lets it go once the kernel acknowledges the send, which can come after the
                # attacker already has the return)
                held = open_fds() - before - 1
            assert held <= bound, (
                f"one caller's {calls} kept answers of {len(LARGE_TEXT)} bytes make the server's"
                f" process hold {held} more fds"
            )
    finally:
        await attacker.aclose()
        await server_peer.aclose()


async def test_waiting_large_pipelined_calls_each_keep_a_memfd_open_uncounted(kernel: capbus.Kernel) -> None:
    """MEDIUM. The same two fds per SealedMapping, on the pipelining side: a call pipelined
    on an answer not yet there waits in the engine (_Waiting) with its message, which for a
    payload over PAYLOAD_MAX is a SealedMapping holding two fds. Engine._dispatch counts
    ``len(fds)`` (the fds besides the memfd) against max_waiting_fds, so such a call costs
    0 there: max_waiting_bytes (2 * max_message_bytes) allows ~1000 waiting calls of 130
    KiB per caller, ~2000 fds, uid_share times that per uid, past RLIMIT_NOFILE (the server
    then loses every memfd payload and fd sent to it). Here one call whose handler waits
    (newCounter, gated) and 200 calls of 130 KiB pipelined on it: the server holds 400
    more fds. Fix: count a mapped payload's fds in _Waiting.fds (and CallArrived.fds) in
    Engine._dispatch, and keep one fd per mapping."""
    calls, bound = 200, 64
    attacker, server_peer = await kernel.connect(), await kernel.connect()
    server = FactoryServer()
    server.gate = trio.Event()
    try:
        async with open_vat(server_peer) as server_vat:
            target = await server_peer.transfer(await server_vat.export(server), attacker)
            reply = await attacker.create_node()
            with trio.fail_after(TIMEOUT):
                base = protocol.encode_call(1, NEW_COUNTER, {}, keep_results=True)
                await attacker.send(target, base.payload, handles=[reply])
                before = open_fds()
                for question in range(2, calls + 2):
                    call = protocol.encode_call(question, ECHO, {"text": LARGE_TEXT}, pipeline=(1, [0]))
                    await attacker.send(target, bytes(call.payload), handles=[reply])
                    del call
                # (fixed: the calls past the bound are answered Overloaded)
                await until_taken_or_refused(attacker, lambda: server_vat.engine.waiting_calls, calls)
                held = open_fds() - before
            server.gate.set()
            assert held <= bound, (
                f"one caller's {calls} waiting pipelined calls of {len(LARGE_TEXT)} bytes (no fds)"
                f" make the server's process hold {held} more fds"
            )
    finally:
        server.gate.set()
        await attacker.aclose()
        await server_peer.aclose()


FLOOD = """
async def attack(peer, report, target):
    reply = await peer.create_node()
    await peer.send(target, protocol.encode_call(1, METHODS["slow"], {}).payload, handles=[reply])
    for question in range(2, 252):
        call = protocol.encode_call(question, METHODS["echo"], {"text": "x" * (130 * 1024)})
        await peer.send(target, call.payload, handles=[reply])
        del call
    await report("sent")
    while True:
        await peer.recv()
"""


async def test_an_honest_large_call_hangs_once_queued_large_calls_use_up_the_servers_fds(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    """HIGH (with the three attacks above). What the uncounted memfds do to everyone else:
    once the server's process has no fd slot left, Peer._lose_fds drops every message whose
    payload is a memfd (it comes without it) with only a line in unsolicited_errors; a
    call that is lost so is never answered, and an honest caller's call with over 128 KiB
    of params waits forever, with no error (its question, reply node and everything it
    holds kept as long). Here the server's process may open 100 more fds (a lowered
    RLIMIT_NOFILE soft limit: 1024 is the common default, the attacker just needs ten
    times the calls), a caller in a process of its own (max_calls_per_caller=1) queues
    250 calls of 130 KiB behind a slow() call, and an honest process then calls echo()
    with 140 KB of text: it gets no answer (nor an error) within 5 s. Fix: bound the fds
    that queued, waiting and kept calls hold, memfds included (the other three tests),
    with headroom below RLIMIT_NOFILE; and when a memfd payload is lost, answer what can
    be answered (a caller that reached the head could be told: map the head from the
    kernel's copy, or have the kernel refuse a memfd message to a peer with no fd slot so
    the sender's send fails)."""
    server_peer = await kernel.connect()
    try:
        async with open_vat(server_peer, max_calls_per_caller=1) as server_vat:
            node = await server_vat.export(FactoryServer())
            with trio.fail_after(TIMEOUT):
                outcome = await honest_large_call_after(kernel, tmp_path, server_peer, node, FLOOD, [node])
            assert outcome == "answered", f"an honest caller's large call: {outcome}"
    finally:
        await server_peer.aclose()


async def test_a_send_of_more_fds_than_scm_max_fd_breaks_the_peer(kernel: capbus.Kernel) -> None:
    """LOW. The fourth review made a send naming an fd that is not open fail alone
    (Peer._write_nowait: EBADF -> InvalidArgument). A send attaching more than the kernel's
    CAPBUS_FDS_MAX (64) fds is refused alone too (MessageTooLarge), but one attaching more
    than Linux's SCM_MAX_FD (253) is refused by sendmsg itself with EINVAL, which
    _write_nowait takes for a broken socket: the peer is marked Disconnected and every
    node, handle and call of it (a whole vat) is gone, for one oversized send. Nothing
    checks the count before sendmsg (_send_frame, send_frame). A vat whose handler
    returns the files of many callers (a List of Fd structs, or a struct of many Fd
    fields) or a caller passing a long list of files takes its whole connection down.
    Fix: refuse len(fds) > _wire.FDS_MAX in Peer._send_frame with MessageTooLarge before
    writing (and treat EINVAL with fds like EBADF)."""
    sender, receiver = await kernel.connect(), await kernel.connect()
    read_end, write_end = os.pipe()
    try:
        node = await receiver.create_node()
        target = await receiver.transfer(node, sender)
        with trio.fail_after(TIMEOUT):
            try:
                await sender.send(target, b"files", fds=[read_end] * 254)
            except capbus.CapbusError:
                pass  # refused: fine, if that send alone is
            await sender.send(target, b"still connected")
            message = await receiver.recv()
            assert bytes(message.payload_view) == b"still connected"
    finally:
        os.close(read_end)
        os.close(write_end)
        await sender.aclose()
        await receiver.aclose()
