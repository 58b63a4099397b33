"""Attacks on the large-payload path as the sixth review's fix left it (seventh review):
Peer._wrap maps a received memfd through libc (ctypes: a c_char array over the pages,
weakref.finalize -> munmap), reads heads with pread and refuses sparse memfds by fstat's
st_blocks. Each test reproduces one finding with real kernel peers; the ones that crash
a process run it as a child of its own, so that the suite survives."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import signal
import subprocess
import sys
import textwrap

import trio

import capbus
from capbus import _wire
from capbus.memfd import SealedMapping
from capbus.rpc import protocol
from capbus.rpc.vat import open_vat

from .hostile import ECHO, TIMEOUT, next_return
from .services import FactoryServer

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 1
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


async def test_a_sparse_memfd_whose_blocks_lie_past_its_end_passes_the_sparse_check(
    kernel: capbus.Kernel,
) -> None:
    """MEDIUM. Peer._wrap's sparse check (_sparse: st_blocks * 512 < size) counts every
    block of the file, including blocks allocated *past its end*: fallocate(2) with
    FALLOC_FL_KEEP_SIZE before sealing allocates them without growing the file (F_SEAL_GROW
    only forbids that after the seal). A memfd of 2 MiB that is all holes, with 2 MiB
    allocated past its end, passes: the receiver maps it whole. The sender then frees those
    blocks: ftruncate(2) to the same size is allowed under F_SEAL_SHRINK|F_SEAL_GROW and
    shmem truncates everything past the end. Every page the receiver (its RPC engine, a
    handler, ``bytes(payload_view)``) reads is then allocated in the sender's file and
    charged to the receiver's memory cgroup, kept as long as the sender holds the memfd:
    exactly what the check was added to prevent, at no lasting cost to the sender (up to
    MEMFD_MAX per message, times the memfds it keeps open).
    Fix: do not trust st_blocks for "no holes"; check the range itself: lseek(SEEK_HOLE, 0)
    must return ``size`` (shmem reports holes exactly), which also makes blocks past the end
    irrelevant."""
    sender, receiver = await kernel.connect(), await kernel.connect()
    size = 2 << 20
    fd = os.memfd_create("holes", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        assert _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, size, size) == 0, os.strerror(ctypes.get_errno())
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0  # (the payload itself: nothing but a hole)
        target = await receiver.transfer(await receiver.create_node(), sender)
        payload = memoryview(SealedMapping(fd, size, mmap.MAP_SHARED, mmap.PROT_READ))
        with trio.fail_after(TIMEOUT):
            await sender.send(target, payload)
            message = await receiver.recv()
        payload.release()
        os.ftruncate(fd, size)  # same size: allowed under the seals, frees the blocks past the end
        assert os.fstat(fd).st_blocks == 0
        whole = message.whole_size is None
        if whole:
            bytes(message.payload_view)  # what any reader of the whole payload does
        allocated = os.fstat(fd).st_blocks * 512
        assert not whole, (
            f"a memfd that is all holes was mapped whole; reading it allocated {allocated} bytes"
            " in the sender's file, charged to the receiver"
        )
    finally:
        os.close(fd)
        await sender.aclose()
        await receiver.aclose()


def _run_child(body: str) -> subprocess.CompletedProcess[str]:
    """Runs ``body`` (which has ``kernel``, ``sender``, ``receiver`` and ``target``: a node of
    the receiver's the sender may send to) in a Python process of its own, with a kernel of
    its own."""
    script = textwrap.dedent(
        """
        import atexit, ctypes, gc, sys, trio, capbus

        async def main():
            async with capbus.open_kernel() as kernel:
                sender, receiver = await kernel.connect(), await kernel.connect()
                target = await receiver.transfer(await receiver.create_node(), sender)
        {body}

        trio.run(main)
        """
    ).format(body=textwrap.indent(textwrap.dedent(body), " " * 8))
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT * 3, check=False
    )


def test_payload_views_are_unmapped_at_exit_while_still_in_use() -> None:
    """MEDIUM. Peer._map registers ``weakref.finalize(pages, munmap, ...)`` with finalize's
    default ``atexit=True``: when the interpreter exits, weakref's atexit hook calls every
    live finalizer, unmapping every payload still held, while the views of it are alive.
    Anything that reads one afterwards reads unmapped memory: an atexit handler registered
    before the first large message arrived (atexit runs handlers last-in first-out: one
    that saves or logs the last messages, a flush of a queue of received work), a daemon
    thread still working on a message, a ``__del__`` at interpreter teardown. The process
    dies of SIGSEGV instead of exiting (here: an atexit handler that reads a kept message).
    A crash, with data a peer sent, at every exit of a process that keeps messages.
    Fix: ``finalizer.atexit = False`` on the munmap finalizer (the mapping goes with the
    process anyway)."""
    child = _run_child(
        """
        kept = []
        atexit.register(lambda: print(bytes(kept[0].payload_view[:4]).decode(), flush=True))
        await sender.send(target, b"abcd" * (200 * 1024))  # over PAYLOAD_MAX: a memfd
        kept.append(await receiver.recv())
        assert kept[0].whole_size is None
        print("received", flush=True)
        """
    )
    assert "received" in child.stdout, child.stderr
    assert child.returncode != -signal.SIGSEGV, (
        "reading a kept payload in an atexit handler crashed the process (SIGSEGV: the payload"
        " was unmapped at exit under a live view)"
    )
    assert child.returncode == 0 and child.stdout.split() == ["received", "abcd"], (
        child.returncode,
        child.stderr,
    )


def test_cyclic_garbage_unmaps_a_payload_before_the_finalizers_that_read_it() -> None:
    """HIGH. Peer._map unmaps a payload in a weakref callback (weakref.finalize on the
    ctypes array). When the views of a payload hang off garbage that is in a reference cycle
    (a generator or coroutine in a cycle, an object with ``__del__`` that refers to itself
    through a callback, a traceback's frames), the cyclic collector first calls the weakref
    callbacks of everything it found unreachable (handle_weakrefs: munmap) and only then the
    finalizers of that same garbage (a suspended generator's ``finally:``, ``__del__``), which
    still hold live views of the pages just unmapped. Reading one is a read of unmapped
    memory: SIGSEGV here (or, once the address is mapped again, another message's or
    allocation's bytes read as this payload's). Pure Python code that reads a payload in a
    cleanup path crashes the process, whenever the collector happens to run; here a
    generator reading a received payload, left suspended in a cycle, and gc.collect().
    Fix: unmap in the dealloc of the object that exports the pages (tp_dealloc runs after
    every finalizer of the garbage has run), not in a weakref callback: e.g. cffi's
    ``ffi.gc(pointer, munmap)`` owned by a read-only exporter, or CPython's mmap with
    trackfd=False where available."""
    child = _run_child(
        """
        def records(message, state):
            view = message.payload_view
            try:
                while True:
                    yield view[:4]
            finally:  # (what a cleanup does: log, checksum, save progress)
                state["last"] = bytes(view[:4]).decode()
                print(state["last"], flush=True)

        await sender.send(target, b"abcd" * (200 * 1024))  # over PAYLOAD_MAX: a memfd
        state = {}
        state["reader"] = reader = records(await receiver.recv(), state)  # (a cycle)
        next(reader)
        del state, reader
        print("received", flush=True)
        gc.collect()
        print("collected", flush=True)
        """
    )
    assert "received" in child.stdout, child.stderr
    assert child.returncode != -signal.SIGSEGV, (
        "a generator's finally: reading a received payload crashed the process (SIGSEGV) when"
        " the cyclic collector unmapped the payload before running the generator's finalizer"
    )
    assert child.returncode == 0 and child.stdout.split() == ["received", "abcd", "collected"], (
        child.returncode,
        child.stdout,
        child.stderr,
    )


def test_a_payloads_obj_is_writable_and_writing_it_crashes_the_receiver() -> None:
    """LOW. ``message.payload_view`` is read-only, but its ``.obj`` is the ctypes c_char
    array Peer._map made over the PROT_READ pages, and a ctypes array exports a *writable*
    buffer: ``ctypes.c_char.from_buffer(view.obj)``,
    ``numpy.frombuffer(view.obj)`` (writeable), ``sock.recv_into(view.obj)``, ``.obj.raw = ...``
    all accept it, and the first write kills the process with SIGSEGV. Before, ``.obj`` was
    the mmap.mmap (PROT_READ), which refuses a writable buffer (TypeError) as every Python
    API does for read-only memory; code that reaches for ``.obj`` (as capbus does itself in
    _sealed_memfd and engine._held_fds) to find what a view is of now holds a live grenade.
    Fix: export the pages through an object whose buffer is read-only (e.g. a small exporter
    in the cffi module, or a MAP_PRIVATE PROT_READ|PROT_WRITE mapping, where a write only
    copies a page of the receiver's own), or keep the ctypes array out of ``.obj``."""
    child = _run_child(
        """
        await sender.send(target, b"abcd" * (200 * 1024))  # over PAYLOAD_MAX: a memfd
        message = await receiver.recv()
        assert message.whole_size is None and message.payload_view.readonly
        print("received", flush=True)
        try:
            ctypes.c_char.from_buffer(message.payload_view.obj).value = b"x"
        except (TypeError, BufferError) as error:
            print("refused", flush=True)
        """
    )
    assert "received" in child.stdout, child.stderr
    assert child.returncode != -signal.SIGSEGV, (
        "writing through payload_view.obj (a writable ctypes array over PROT_READ pages)"
        " crashed the receiver with SIGSEGV"
    )
    assert child.returncode == 0 and "refused" in child.stdout, (child.returncode, child.stdout, child.stderr)


async def test_unreadable_memfd_payloads_grow_a_vats_unsolicited_errors_without_bound(
    kernel: capbus.Kernel,
) -> None:
    """LOW. The kernel takes any fd with the three seals as a memfd payload, whatever its
    access mode: a sender reopens its sealed memfd write-only (open("/proc/self/fd/N",
    O_WRONLY): seals are the inode's, F_GET_SEALS and fstat work on it). The receiver's
    Peer._wrap then cannot read it: the mmap (PROT_READ) fails with EACCES, and so does the
    pread of its head that was to say why (EBADF), so Peer._read_frame drops the message and
    appends a CapbusError to ``Peer.unsolicited_errors``, a list nothing bounds and that a
    vat never reads or clears. Each such message (one small frame; the same fd sent again
    and again, the kernel duplicates it) leaves an exception object with its message string
    in the vat's process for its life: unbounded memory growth driven by any peer that can
    send to one of its nodes (here 3,000 messages, 3,000 entries).
    Fix: keep unsolicited_errors bounded (a deque with maxlen, plus a count of those
    dropped), and give a payload that cannot be read a Message with ``unread`` set and an
    empty head instead of losing it, so that a vat answers its sender."""
    attacker, server_peer = await kernel.connect(), await kernel.connect()
    size = _wire.PAYLOAD_MAX + 1
    fd = os.memfd_create("write-only", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    write_only = -1
    try:
        os.write(fd, b"x" * size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        write_only = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
        mapping = SealedMapping(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        mapping.memfd = write_only  # (what this process sends for a view of it: the attacker's own choice)
        payload = memoryview(mapping)
        async with open_vat(server_peer) as server_vat:
            target = await server_peer.transfer(await server_vat.export(FactoryServer()), attacker)
            reply = await attacker.create_node()
            with trio.fail_after(TIMEOUT * 3):
                for _ in range(3000):
                    await attacker.send(target, payload, handles=[reply])
                after = protocol.encode_call(1, ECHO, {"text": "after"})
                await attacker.send(target, after.payload, handles=[reply])
                answer = await next_return(attacker)
                assert answer.question_id == 1 and answer.error is None
            kept = len(server_peer.unsolicited_errors)
            assert kept <= 100, (
                f"the vat's peer keeps {kept} errors, one per unreadable payload an attacker sent"
                f" (e.g. {server_peer.unsolicited_errors[0]!r}), and nothing ever drops them"
            )
        payload.release()
    finally:
        if write_only >= 0:
            os.close(write_only)
        os.close(fd)
        await attacker.aclose()
        await server_peer.aclose()
