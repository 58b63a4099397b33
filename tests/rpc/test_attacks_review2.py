"""Attacks on the RPC layer that still work after the fixes of the first review (per-caller
identity from the kernel-attested sending process, per-caller handler slots, queues, kept
answers and exports, the fast-path body check, Finish on forwarded calls). Each test
reproduces one with real peers (the attacker in a process of its own where who-is-who
matters) and fails until it is fixed; its docstring says the severity, the harm and a
suggested fix.
"""

from __future__ import annotations

import gc
import os
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing

import capbus
from capbus.rpc import errors, header, protocol
from capbus.rpc.vat import Vat, open_vat
from capbus.testing import server_process

from .calculator_attacks import EVALUATE, answer_to_evaluate, assert_no_more_leaves_than_words
from .processes import attacker_process
from .services import FactoryServer, schema

TIMEOUT = 30


@asynccontextmanager
async def server_and_honest(
    kernel: capbus.Kernel, **options: int
) -> AsyncIterator[tuple[capbus.Peer, Vat, FactoryServer, capbus.Handle, Any]]:
    """A factory server (its peer, vat, object and node) and an honest client of it (in this
    process: a caller of its own, apart from any attacker process)."""
    server_peer, honest_peer = await kernel.connect(), await kernel.connect()
    async with open_vat(server_peer, **options) as server_vat, open_vat(honest_peer) as honest_vat:
        server = FactoryServer()
        node = await server_vat.export(server)
        honest = honest_vat.client(await server_peer.transfer(node, honest_peer), schema.Factory)
        yield server_peer, server_vat, server, node, honest
    for peer in (server_peer, honest_peer):
        await peer.aclose()


# -- 1. a caller is a process, and a peer can make processes -----------------------------------

FORKING = """
import os
import select


def send_all(peer, target, calls):
    # Synchronous (a forked child must not run trio): waits for room in the socket.
    for payload, handles in calls:
        while True:
            try:
                peer.send_oneway_nowait(target, payload, handles=handles)
                break
            except trio.WouldBlock:
                select.select([], [peer.fileno()], [], 1)


def forked(peer, target, calls_of, children):
    # Forks ``children`` processes that write calls_of(child) on this very peer's socket,
    # then exit (as zombies: their pids stay theirs until this process ends); returns
    # once every child has written everything.
    done_r, done_w = os.pipe()
    for child in range(children):
        if os.fork() == 0:
            try:
                send_all(peer, target, calls_of(child + 1))
                os.write(done_w, b"x")
            finally:
                os._exit(0)
    for _ in range(children):
        os.read(done_r, 1)
"""


async def test_forked_processes_on_one_peer_take_every_handler_slot(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    """HIGH. The per-caller bounds assume a hostile peer is one caller, but a caller is a
    process (engine.caller_of), and any peer can make processes: here one attacker, on its
    one kernel connection, forks 3 children that write calls on the same socket (the kernel
    attests each frame's sending pid, so the vat sees 4 callers). Each caller gets
    max_calls_per_caller = 256 handlers, and 4 x 256 = max_concurrent_calls = 1024: 1024
    sum() calls whose counter is an object of the attacker that never answers take every
    handler of the vat for good, and every other caller's calls (an honest echo here) wait
    for ever. It is attack 2 of the first review again, for the cost of three fork()s; the
    same multiplication applies to max_exports_per_caller (16 forks take the server's 65,536
    nodes), the kept-answer bytes and max_queued_calls. Fix: bound what the callers of one
    peer connection (or of one uid: peers are per user in the kernel) may take together,
    e.g. a caller = (uid, the sending peer) with the kernel attesting the peer, or a
    per-uid share of max_concurrent_calls; at the least make max_concurrent_calls fail
    calls (Overloaded) rather than queue them forever once they are all held by callers
    that never let go."""
    async with server_and_honest(kernel) as (server_peer, server_vat, _server, node, honest):
        attack = (
            FORKING
            + """
async def attack(peer, report, target):
    reply, own = await peer.create_node(), await peer.create_node()

    def calls_of(caller):
        calls = []
        for i in range(256):
            call = protocol.encode_call(caller * 1000 + i, METHODS["sum"], {"counters": ["own"]})
            handles = [reply if cap is protocol.REPLY else own for cap in call.caps]
            calls.append((call.payload, handles))
        return calls

    forked(peer, target, calls_of, 3)
    send_all(peer, target, calls_of(0))
    # Every handler that starts calls our object, and never hears back.
    running = 0
    while running < 256:  # one caller's share: what one peer gets once fixed
        message = await peer.recv()
        if message.kind is capbus.MessageKind.DATA and message.destination == own:
            running += 1
    await report(running)
    while True:  # read (and never answer) whatever else comes
        await peer.recv()
"""
        )
        with trio.fail_after(TIMEOUT):
            async with attacker_process(kernel, tmp_path, attack, server_peer, [node]) as report:
                assert report == "256"
                while kernel.statistics().queued_messages:  # all 1,024 taken in (polled, bounded)
                    await trio.sleep(0.001)
                await trio.testing.wait_all_tasks_blocked()  # and every handler that may, started
                # 4 processes of one peer are one caller: 256 handlers run, the rest wait.
                assert server_vat.statistics().queued == 768
                with trio.fail_after(5):
                    assert (await honest.echo(text="still served?")).text == "still served?"


# -- 2. a return the vat cannot read back crashes it -------------------------------------------

TREE = """
@0xc3d4e5f6a7b8c9d1;
struct Node {
  next @0 :Node;
  pad @1 :Data;
}
interface Tree {
  echo @0 (node :Node) -> (node :Node);
  shared @1 (index :UInt32) -> (tree :Tree);
  # One object per index, the same for every caller (a room, a document, a singleton).
}
"""

_trees: list[tuple[Any, Path]] = []


def trees(tmp_path: Path) -> tuple[Any, Path]:
    """The schema above and its file, loaded once per process (pycapnp aborts on a second
    load of one file id from another path)."""
    if not _trees:
        path = tmp_path / "tree.capnp"
        path.write_text(TREE)
        _trees.append((capbus.load(str(path)), path))
    return _trees[0]


async def test_a_deep_kept_return_does_not_crash_the_vat(kernel: capbus.Kernel, tmp_path: Path) -> None:
    """HIGH. When a call with keepResults (every Promise call sets it) or with a pipelined
    call waiting on it returns results without capabilities, Engine.completed re-decodes
    the vat's own Return (Engine._failure_of, to keep a failure for pipelining), and decode
    runs the tree check on it, uncaught: a CapWireError there escapes the serving task (or,
    for a plain-function handler, the receive loop) and takes the whole vat down, for
    every caller. The vat's own results fail that check whenever they are deeper than the
    params could be: an attacker sends, on the fast path (its body checked alone), a 62-deep
    Node chain with a 20 KB pad in one segment to a server that returns what it was given
    (a store, an echo, a document server); the results do not fit pycapnp's first 8 KB
    segment, go the general way (Envelope, Return: two levels more), and fail the nesting
    limit in _failure_of. A server that builds deep results itself (a parse tree), or a
    List(Void) of more than ~65,536 elements echoed back (a zero-sized list costs the check
    a word per element, not its bytes), crashes the same way, even for honest callers. Fix:
    never decode our own return in completed() (a Return with an exception has no
    capabilities: keep the RpcError the vat just encoded instead), and wrap whatever
    remains in completed()/_handle so that one call's trouble fails that call only."""
    tree, path = trees(tmp_path)

    class Echo(tree.Tree.Server):  # type: ignore[misc,name-defined]
        async def echo(self, node: Any) -> Any:
            return node.pycapnp

    server_peer, honest_peer = await kernel.connect(), await kernel.connect()
    async with open_vat(server_peer) as server_vat, open_vat(honest_peer) as honest_vat:
        node = await server_vat.export(Echo())
        honest = honest_vat.client(await server_peer.transfer(node, honest_peer), tree.Tree)
        attack = f"""
        from capbus.rpc import header

        async def attack(peer, report, target):
            tree = capbus.load({str(path)!r})
            echo = tree.Tree.interface.methods["echo"]
            params = protocol._module(echo.params).new_message(num_first_segment_words=8192)
            node = params.init("node")
            for _ in range(61):
                node = node.init("next")
            node.pad = b"x" * 20000
            (body,) = params.to_segments()  # one segment: the fast path, checked alone
            head = header.call(1, echo.interface_id, echo.ordinal, 0, True)  # keepResults
            table = header.TWO_SEGMENTS.pack(1, len(head) // 8, len(body) // 8)
            reply = await peer.create_node()
            await peer.send(target, table + head + body, handles=[reply])
            message = await peer.recv()
            while message.kind is not capbus.MessageKind.DATA:
                message = await peer.recv()
            await report("answered")  # (results this deep are unreadable here too)
        """
        with trio.fail_after(TIMEOUT):
            async with attacker_process(kernel, tmp_path, attack, server_peer, [node]) as report:
                assert report == "answered"
            assert (await honest.echo(node={"pad": b"ok"})).node.pad == b"ok"
    for peer in (server_peer, honest_peer):
        await peer.aclose()


# -- 3. a Finish before the return leaks a kept answer's count ---------------------------------


async def test_cancelled_promises_do_not_use_up_the_callers_kept_answers(kernel: capbus.Kernel) -> None:
    """MEDIUM. A call with keepResults (every Promise call) counts against its caller's
    max_kept_per_caller (1024) from the moment it arrives. A Finish that comes before the
    return sets answer.keep = False (Engine._dispatch), and _forget_answer only gives the
    count back when answer.keep is set: every promise dropped (or whose task was cancelled)
    before its answer leaks one unit, for as long as the vat lives, whatever the process
    does later (a caller is a process: all its peers and reply nodes, and every later
    connection from it). After 1024 of them, none of its answers is kept again: every call
    pipelined on an answer that arrived first fails with "no answer ... to pipeline on".
    An honest, long-running client that times out calls loses pipelining on that server
    for good; the dict entry also outlives the caller. Fix: in the Finish branch, give the
    count back at once (call _take for the caller, then keep = False), or keep the flag
    and add a separate 'finished' one."""
    async with server_and_honest(kernel) as (_server_peer, server_vat, server, _node, honest):
        with trio.fail_after(TIMEOUT):
            server.gate = trio.Event()  # newCounter() waits: each promise is dropped before its answer
            promises = [await honest.newCounter.send() for _ in range(1024)]
            while server_vat.statistics().answers < 1024:  # all arrived (polled, bounded)
                await trio.sleep(0.001)
            del promises
            gc.collect()  # each dropped promise sends its Finish
            while server_vat.statistics().answers:  # all canceled (polled, bounded)
                await trio.sleep(0.001)
            server.gate.set()
            promise = await honest.newCounter.send()
            await promise
            assert (await promise.counter.increment(by=1)).value == 1


# -- 4. max_queued_calls bounds a caller's queue in calls, not in bytes ------------------------


async def test_a_callers_queued_calls_are_bounded_in_bytes(kernel: capbus.Kernel, tmp_path: Path) -> None:
    """MEDIUM-HIGH. A caller whose handler slots are all busy (its own calls that wait on
    something of its own, as in attack 1) has up to max_queued_calls = 4096 more calls
    queued, each holding its whole message, whatever its size: 4096 inline calls of
    128 KiB are 512 MiB of the server's heap, and calls sent as memfds (up to
    max_message_bytes = 64 MiB each) are 256 GiB mapped into it (against the sandbox's
    2 GiB RLIMIT_AS, mmap then fails inside Peer.recv and the receive loop dies); pipelined
    calls waiting on an answer (max_queued_calls more, Engine.start_waiting) are the same.
    Attack 1's forks multiply it. Scaled down here: max_calls_per_caller=1 and
    max_message_bytes=512 KiB; the attacker holds its one slot with slow() and queues 40
    echo() calls of 120 KB, which the server keeps: 9 times max_message_bytes. Fix: as
    for kept answers, bound a caller's queued (and waiting pipelined) calls in bytes too,
    a small multiple of max_message_bytes, answering Overloaded past it; and check a memfd
    payload's size against max_message_bytes before mapping it."""
    limit = 512 * 1024
    size = 120_000
    async with server_and_honest(kernel, max_calls_per_caller=1, max_message_bytes=limit) as (
        server_peer,
        server_vat,
        server,
        node,
        _honest,
    ):
        attack = f"""
        async def attack(peer, report, target):
            reply = await peer.create_node()
            slow = protocol.encode_call(1, METHODS["slow"], {{}})
            await peer.send(target, slow.payload, handles=[reply])
            for i in range(40):
                call = protocol.encode_call(i + 2, METHODS["echo"], {{"text": "x" * {size}}})
                await peer.send(target, call.payload, handles=[reply])
            await report("sent")
            while True:  # read (and drop) whatever comes back
                await peer.recv()
        """
        with trio.fail_after(TIMEOUT):
            async with attacker_process(kernel, tmp_path, attack, server_peer, [node]) as report:
                assert report == "sent"
                await server.slow_started.wait()
                # Every call was sent (and acknowledged by the kernel): once nothing is left
                # in the kernel's queues, the vat has taken each in (queued or refused).
                while kernel.statistics().queued_messages:  # polled, bounded
                    await trio.sleep(0.001)
                held = server_vat.statistics().queued * size
                assert held <= 4 * limit, f"the server holds {held >> 20} MiB of one caller's queued calls"


# -- 5. queued memfd calls use up a sandboxed server's address space ---------------------------

LIMITED_SERVER = """
import os
import resource
import sys

import trio

sys.path.insert(0, sys.argv[2])
import services  # noqa: E402

import capbus  # noqa: E402
from capbus.rpc.vat import open_vat  # noqa: E402


def address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


async def main(fd, limit):
    async with capbus.Peer.from_socket(fd) as peer:
        seed = (await peer.take_seed()).handles
        async with open_vat(peer, max_calls_per_caller=1) as vat:
            node = await vat.export(services.FactoryServer())
            # As a sandboxed child (Sandbox.memory_bytes, RLIMIT_AS; Sandbox.open_files,
            # RLIMIT_NOFILE), with room to spare.
            if limit == "address-space":
                room = address_space() + (1 << 30)
                resource.setrlimit(resource.RLIMIT_AS, (room, room))
            else:
                room = len(os.listdir("/proc/self/fd")) + 100
                resource.setrlimit(resource.RLIMIT_NOFILE, (room, room))
            await peer.send(seed[0], b"ready", handles=[node])
            await trio.sleep_forever()


trio.run(main, int(sys.argv[1]), sys.argv[3])
"""


@asynccontextmanager
async def limited_server(
    kernel: capbus.Kernel, tmp_path: Path, limit: str
) -> AsyncIterator[tuple[capbus.Peer, capbus.Handle]]:
    """A factory server (max_calls_per_caller=1) in a process of its own, under an
    RLIMIT_AS (``limit`` = "address-space") or RLIMIT_NOFILE ("open-files") with some room
    above what it uses; yields a peer of ours holding its factory."""
    script = tmp_path / "limited_server.py"
    script.write_text(LIMITED_SERVER)
    here = str(Path(__file__).parent)
    command = lambda fd: [sys.executable, str(script), str(fd), here, limit]  # noqa: E731
    async with server_process(kernel, command, timeout=TIMEOUT) as served:
        yield served


async def assert_still_serving(kernel: capbus.Kernel, launcher: capbus.Peer, factory: capbus.Handle) -> None:
    """An honest caller (a vat on a peer of its own) is still served."""
    honest_peer = await kernel.connect()
    handle = await launcher.transfer(factory, honest_peer)
    async with open_vat(honest_peer) as honest_vat:
        honest = honest_vat.client(handle, schema.Factory)
        assert (await honest.echo(text="still there?")).text == "still there?"
    await honest_peer.aclose()


async def test_queued_memfd_calls_do_not_crash_a_memory_bound_server(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    """HIGH. A server in its own process with an address-space limit (the sandbox's
    default: RLIMIT_AS = 2 GiB; here what it uses plus 1 GiB) and max_calls_per_caller=1.
    One attacker holds the slot with slow(), then sends 24 echo() calls of 60 MB, each as
    the same sealed memfd (it costs the attacker 60 MB once). Peer._wrap maps every memfd
    payload as it reads it, and each queued call keeps its mapping (4096 may queue per
    caller, each up to max_message_bytes = 64 MiB): past the limit, mmap fails with
    ENOMEM inside Peer._read_frame, Peer._advance takes that OSError for a broken kernel
    connection and marks the peer broken for good, recv() raises Disconnected, and the
    receive loop, the vat and the server process die, for every caller (with 10 such calls
    instead of 24 the server lives). Fix: bound a caller's queued calls in bytes (see
    attack 4), refuse a memfd payload over max_message_bytes before mapping it (the kernel
    says its size), and make a failed map a dropped message (its sender told), never a
    broken peer."""
    from capbus import _wire
    from capbus.memfd import _sealed_memfd
    from capbus.rpc import protocol

    methods = schema.Factory.interface.methods
    with trio.fail_after(TIMEOUT):
        async with limited_server(kernel, tmp_path, "address-space") as (launcher, factory):
            reply = await launcher.create_node()
            slow = protocol.encode_call(1, methods["slow"], {})
            await launcher.send(factory, slow.payload, handles=[reply])
            echo = protocol.encode_call(2, methods["echo"], {"text": "x" * 60_000_000})
            memfd = _sealed_memfd(echo.payload)
            try:
                for _ in range(24):  # the same memfd each time
                    cookie = launcher._new_cookie()
                    flags = _wire.SEND_FLAG_MEMFD
                    frame = _wire.send_frame(cookie, [factory.id], [reply.id], 1, b"", 0, flags)
                    await launcher._call(_wire.CMD_SEND, frame=frame, cookie=cookie, fds=[memfd])
            finally:
                os.close(memfd)
            await assert_still_serving(kernel, launcher, factory)


async def test_forked_processes_on_one_peer_multiply_max_exports_per_caller(tmp_path: Path) -> None:
    """HIGH. Attack 3 of the first review (many reply nodes multiply what one caller may
    hold) again, through processes: max_exports_per_caller is charged per sending process,
    and one peer forks as many as it likes, all sending on its one connection and naming
    its one reply node; the returns come back to that peer, which keeps every object.
    Scaled down as in that test: a server peer that may own 40 nodes and
    max_exports_per_caller=8; the attacker and 4 forked children ask newCounter() 8 times
    each, the attacker holds every counter (38, all the server had left, against a bound
    of 8), and an honest caller's newCounter() fails with Overloaded. At the defaults, 16
    processes of one peer take the server's 65,536 nodes. Fix: charge the objects a return
    hands out to who receives them: the peer that owns the reply node (the kernel could
    attest a node's owner), or bound them per uid as well as per process."""
    async with capbus.open_kernel(limits=capbus.Limits(nodes_owned=40)) as small:
        async with server_and_honest(small, max_exports_per_caller=8) as (server_peer, _v, _s, node, honest):
            attack = (
                FORKING
                + """
async def attack(peer, report, target):
    reply = await peer.create_node()

    def calls_of(caller):
        return [
            (protocol.encode_call(caller * 1000 + i, METHODS["newCounter"], {}).payload, [reply])
            for i in range(8)
        ]

    forked(peer, target, calls_of, 4)
    send_all(peer, target, calls_of(0))
    answers = held = 0
    while answers < 40:
        message = await peer.recv()
        if message.kind is capbus.MessageKind.DATA:
            answers += 1
            held += len(message.handles)  # kept: never released
    await report(held)
"""
            )
            with trio.fail_after(TIMEOUT):
                async with attacker_process(small, tmp_path, attack, server_peer, [node]) as held:
                    assert int(held) <= 8, f"one peer holds {held} objects of the server; the bound is 8"
                    counter = (await honest.newCounter()).counter
                    assert (await counter.increment(by=1)).value == 1


async def test_queued_calls_with_fds_do_not_crash_a_server_with_few_files(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    """HIGH. Every fd a message carries is opened in the receiving vat (Engine._data wraps
    them all, whether the method has Fd fields or not) and stays open while the call is
    queued. A sandboxed server may open 256 files (Sandbox.open_files, RLIMIT_NOFILE), and a
    message may carry 64 fds: 4 calls queued behind the caller's own slow() fill it (4096
    may queue). Here the server has 100 fds to spare and max_calls_per_caller=1; the
    attacker queues 4 echo() calls with 64 copies of one pipe fd each. The next frame
    that carries an fd (a memfd payload, any call passing an fd, the attacker's next call)
    comes back truncated (MSG_CTRUNC: no fd slot left), Peer._read_frame marks the peer
    broken, and the vat and the server die, for every caller. Fix: close the fds of a
    call whose method has no Fd field at once (only fds its Fd fields index are kept),
    bound the fds a caller's queued calls may hold (Overloaded past it), and treat a
    truncated frame as that frame's loss (its fds closed, its sender told), never as a
    broken connection."""
    methods = schema.Factory.interface.methods
    read_end, write_end = os.pipe()
    try:
        with trio.fail_after(TIMEOUT):
            async with limited_server(kernel, tmp_path, "open-files") as (launcher, factory):
                reply = await launcher.create_node()
                slow = protocol.encode_call(1, methods["slow"], {})
                await launcher.send(factory, slow.payload, handles=[reply])
                for i in range(5):  # the 5th finds no fd slot left
                    echo = protocol.encode_call(i + 2, methods["echo"], {"text": "x"})
                    await launcher.send(factory, echo.payload, handles=[reply], fds=[read_end] * 64)
                await assert_still_serving(kernel, launcher, factory)
    finally:
        os.close(read_end)
        os.close(write_end)


# -- 6. zero-sized list elements: a 144-byte call read as 65,530 expressions -------------------

ZERO_SIZED = 65_530  # as many as the check's traversal budget lets a 144-byte call have


def _struct_pointer(offset: int, data: int, pointers: int) -> int:
    return ((offset & 0x3FFFFFFF) << 2) | (data << 32) | (pointers << 48)


def _list_pointer(offset: int, size: int, count: int) -> int:
    return 1 | ((offset & 0x3FFFFFFF) << 2) | (size << 32) | (count << 35)


def zero_sized_expressions(n: int) -> bytes:
    """An evaluate() call (fast path): call(f, params) where params is a composite list of
    ``n`` zero-sized Expressions (a tag word and no content: each reads as literal 0.0)."""
    head = header.call(0, EVALUATE.interface_id, EVALUATE.ordinal, 0, False)
    function = 3 | (1 << 32)  # capability 1: the Function
    words = [
        _struct_pointer(0, 0, 1),  # root: the params struct
        _struct_pointer(0, 2, 2),  # params.expression
        0,
        3,  # Expression: the call member
        function,
        _list_pointer(0, 7, 0),  # call.params: a composite list of no words...
        n << 2,  # ...whose tag says n elements of 0 data and 0 pointer words
    ]
    body = struct.pack(f"<{len(words)}Q", *words)
    return header.TWO_SEGMENTS.pack(1, len(head) // 8, len(body) // 8) + head + body


def test_zero_sized_elements_do_not_make_a_small_call_a_huge_tree() -> None:
    """MEDIUM. The tree check (capwire.c) charges a zero-sized list element one word of its
    traversal budget, and that budget is 8 x the message's words plus a floor of 65,536
    words: a composite list whose tag claims 65,530 elements of 0 words takes one word of
    the message and passes. A 144-byte evaluate() call is then read as 65,530
    expressions (the first review's bar for its DAG attack was no more leaves than words):
    0.2 s of Python to iterate them here, and the calculator does far more with each (see
    the next test). Any List(Struct) or List(Void) parameter is such an amplifier, and the
    floor is there for every message, however small. Fix: charge zero-sized elements
    against a budget proportional to the message itself (no floor for them: e.g. at most
    as many as the message has words, or a few times that), or refuse lists of zero-sized
    elements longer than the message's word count outright."""
    payload = zero_sized_expressions(ZERO_SIZED)
    assert_no_more_leaves_than_words(
        payload, lambda expression: sum(1 for e in expression.call.params if e.which() == "literal")
    )


async def test_zero_sized_expressions_are_refused_by_the_calculator(
    kernel: capbus.Kernel, calculator_server: tuple[capbus.Peer, capbus.Handle]
) -> None:
    """MEDIUM (end to end). The calculator server, in its own process, is sent the 144-byte
    evaluate() above, with a function of 65,530 parameters the attacker defined first: it
    evaluates 65,530 literals, then calls the function with a 512 KB list of them (encoded
    and decoded again for the local call), about half a second of its CPU per 144-byte call
    here, with up to 1024 such calls running at once. The answer must be an error."""
    answer = await answer_to_evaluate(
        kernel, calculator_server, ZERO_SIZED, zero_sized_expressions(ZERO_SIZED)
    )
    assert isinstance(answer.error, errors.Failed), "the server evaluated all 65,530 expressions"


# -- 7. calls given up while waiting for their turn are remembered for ever -------------------


async def test_calls_finished_while_waiting_for_their_turn_are_forgotten(kernel: capbus.Kernel) -> None:
    """LOW-MEDIUM. A call waiting for its caller's turn (CallerCalls.wait_turn) makes a
    trio.Event in _turn_events; when its Finish cancels it, pass_turn files its ticket in
    _skipped. Both are only cleaned up when the turn reaches that ticket, and it never
    does while the call holding the turn waits for a handler slot that the caller's own
    never-ending calls hold. One caller that holds its slots (max_calls_per_caller=1 here:
    one slow() call) and sends calls, then their Finishes, grows the vat's memory by an
    Event, a dict entry and a set entry per call, for ever, without ever being past
    max_queued_calls (a canceled call is no longer queued): 4,000 calls leave 8,000
    entries, and the next 4,000 as many more. (The attacker is a bare peer here: who-is-who
    does not matter, and the test must know the calls' tasks have started before the
    Finishes go: a Finish that comes earlier finds no cancel scope and is lost, see the
    report.) Fix: forget a ticket's event when its call gives up (pop it from
    _turn_events), and keep skipped tickets as a count or ranges, or advance the turn past
    them at once when they are the next ones."""
    async with server_and_honest(kernel, max_calls_per_caller=1) as (
        server_peer,
        server_vat,
        server,
        node,
        _honest,
    ):
        attacker = await kernel.connect()
        target = await server_peer.transfer(node, attacker)
        reply = await attacker.create_node()
        methods = schema.Factory.interface.methods

        async def settled() -> None:
            while kernel.statistics().queued_messages:  # all taken in (polled, bounded)
                await trio.sleep(0.001)
            await trio.testing.wait_all_tasks_blocked()  # and every task started or ended

        with trio.fail_after(TIMEOUT):
            for i, method in enumerate(["slow", "echo"]):  # the slot, then the turn, held
                call = protocol.encode_call(i + 1, methods[method], {"text": "x"} if i else {})
                await attacker.send(target, call.payload, handles=[reply])
            await server.slow_started.wait()
            for rounds in range(2):
                first = 3 + rounds * 4000
                for i in range(first, first + 4000):
                    call = protocol.encode_call(i, methods["echo"], {"text": "x"})
                    await attacker.send(target, call.payload, handles=[reply])
                await settled()
                for i in range(first, first + 4000):
                    await attacker.send(target, protocol.encode_finish(i).payload, handles=[reply])
                await settled()
            (calls,) = server_vat._callers.values()
            assert calls.calls == 2  # the slow() call and the one holding the turn: all else is gone
            remembered = len(calls._turn_events) + len(calls._skipped)
            assert remembered <= 16, f"{remembered} entries remain for calls that are gone"
        await attacker.aclose()


# -- 8. queued calls hold the server's kernel handles -------------------------------------------


async def test_a_callers_queued_capabilities_do_not_use_up_the_servers_handles(tmp_path: Path) -> None:
    """HIGH. Every capability a call carries becomes a handle of the server's peer, held
    while the call is queued (its params hold the clients), and the kernel bounds a peer's
    handles (handles_held, 65,536 by default), which also bounds the nodes it can make:
    past it, the server can make no node (every return that hands out an object fails)
    and receives no message that carries a handle new to it (a new caller's first call,
    which carries its reply node; any call passing a new capability). max_queued_calls
    bounds a caller's calls, not their capabilities: 256 calls of 255 capabilities fill
    the server's handles at the defaults, queued behind the caller's own slow() calls.
    Scaled down: a kernel with handles_held=1024; the attacker (its one process, with two
    peers for enough nodes of its own) holds its 256 handler slots with slow(), then
    queues sum() calls carrying as many distinct capabilities of its own as the server can
    take (about 1,000); an honest caller's newCounter() then fails with Overloaded ("the
    results could not be sent: create_node: Disk quota exceeded"), and a caller new to the
    server has its very first call refused by the kernel (EDQUOT: its reply node is a
    handle new to the server). No fork is needed; forks (attack 1) only add more. Fix:
    bound the capabilities a caller's queued calls may carry (a per-caller share of the
    peer's handles_held, counted on arrival; Overloaded past it), keep headroom in
    handles_held for the vat's own nodes, and drop (release) the handles of a call that is
    refused."""
    async with capbus.open_kernel(limits=capbus.Limits(handles_held=1024)) as small:
        async with server_and_honest(small) as (server_peer, _v, _s, node, honest):
            attack = """
            async def attack(peer, report, target):
                sock = await peer.create_peer(handles=[target])
                async with capbus.Peer.from_socket(sock.detach()) as other:
                    (other_target,) = (await other.take_seed()).handles
                    reply = await peer.create_node()
                    for i in range(256):  # every handler slot of ours, held for ever
                        call = protocol.encode_call(i + 1, METHODS["slow"], {})
                        await peer.send(target, call.payload, handles=[reply])
                    echo = protocol.encode_call(300, METHODS["echo"], {"text": "x"})  # the turn
                    await peer.send(target, echo.payload, handles=[reply])
                    # Calls of as many capabilities as the server takes, until it takes no more.
                    sent, size = 0, 250
                    for sender, to, budget in ((peer, target, 750), (other, other_target, 900)):
                        sender_reply = await sender.create_node()
                        pool = [await sender.create_node() for _ in range(budget)]
                        while size and len(pool) >= size:
                            call = protocol.encode_call(400 + sent, METHODS["sum"], {"counters": pool[:size]})
                            handles = [sender_reply if cap is protocol.REPLY else cap for cap in call.caps]
                            try:
                                await sender.send(to, call.payload, handles=handles)
                            except capbus.CapbusError:
                                size //= 2  # too many for what the server has left
                                continue
                            del pool[:size]
                            sent += size
                    await report(sent)
                    await trio.sleep_forever()
            """
            with trio.fail_after(TIMEOUT):
                assert (await honest.echo(text="known")).text == "known"  # its reply node is known
                async with attacker_process(small, tmp_path, attack, server_peer, [node]) as sent:
                    assert int(sent) > 1000  # capabilities the server now holds for queued calls
                    # The handles of calls still in the kernel's queue count against the
                    # server's handles_held until its vat reads them (and refuses them, past
                    # the bound): what is asked here is what it holds once it has.
                    while small.statistics().queued_messages:  # all read (polled, bounded)
                        await trio.sleep(0.001)
                    await trio.testing.wait_all_tasks_blocked()  # and their handles let go
                    counter = (await honest.newCounter()).counter
                    assert (await counter.increment(by=1)).value == 1


# -- 9. every destroyed node costs the receive loop a walk of all answers -----------------------


class _CountingDict(dict):  # type: ignore[type-arg]
    """A dict that counts the keys its iterations visit."""

    visited = 0

    def __iter__(self) -> Any:
        for key in super().__iter__():
            self.visited += 1
            yield key


async def test_a_destroyed_node_costs_the_receive_loop_only_its_own_answers(kernel: capbus.Kernel) -> None:
    """MEDIUM. Engine._node_destroyed, run in the receive loop for every NODE_DESTROYED
    notification, walks every answer of every caller (and every open question) to find the
    ones of that node: a caller that makes the server hold N handles of its own and has M
    calls open makes N x M steps of the receive loop by destroying its nodes (closing one
    peer does it at once), during which no one is served. At the defaults: 4,352 open
    calls per caller (256 running, 4,096 queued) and 65,536 handles give 285 million steps,
    tens of seconds of a stalled vat per round, for a few seconds of the attacker's work
    (and forks multiply M). Scaled down: 2,257 open calls and 2,000 handles passed (as
    extra capabilities of queued calls) by a second peer that then disconnects; the vat
    visits 4.5 million answers for it. Fix: index answers (and questions) by reply handle
    (and target), so that a destroyed node costs only its own."""
    # The helper's 2,000 capabilities wait in queued calls: past the default
    # max_queued_capabilities_per_caller (attack 8), which would refuse them.
    async with server_and_honest(kernel, max_queued_capabilities_per_caller=2000) as (
        server_peer,
        server_vat,
        server,
        node,
        _honest,
    ):
        counting = _CountingDict(server_vat.engine.answers)
        server_vat.engine.answers = counting
        attacker, helper = await kernel.connect(), await kernel.connect()
        methods = schema.Factory.interface.methods

        async def settled() -> None:
            while kernel.statistics().queued_messages:  # all taken in (polled, bounded)
                await trio.sleep(0.001)
            await trio.testing.wait_all_tasks_blocked()

        with trio.fail_after(TIMEOUT):
            target = await server_peer.transfer(node, attacker)
            reply = await attacker.create_node()
            for i in range(256):  # every handler slot of this caller, held
                call = protocol.encode_call(i + 1, methods["slow"], {})
                await attacker.send(target, call.payload, handles=[reply])
            for i in range(2001):  # then calls that wait: answers of ours
                call = protocol.encode_call(1000 + i, methods["echo"], {"text": "x"})
                await attacker.send(target, call.payload, handles=[reply])
            helper_target = await server_peer.transfer(node, helper)
            helper_reply = await helper.create_node()
            own = [await helper.create_node() for _ in range(2000)]
            for i in range(256):  # the helper is a caller of its own (a peer): its slots, held
                call = protocol.encode_call(4000 + i, methods["slow"], {})
                await helper.send(helper_target, call.payload, handles=[helper_reply])
            for i in range(8):  # 250 capabilities of the helper on each queued call
                call = protocol.encode_call(5000 + i, methods["echo"], {"text": "x"})
                extra = own[i * 250 : (i + 1) * 250]
                await helper.send(helper_target, call.payload, handles=[helper_reply, *extra])
            await settled()
            before = counting.visited
            nodes = kernel.statistics().nodes
            await helper.aclose()  # its nodes are destroyed: a notification for each handle the server holds
            # All seen (polled, bounded): the server lets go of every handle to them, on its
            # notification or before it (then, as in bus1, it gets none for it).
            while kernel.statistics().nodes > nodes - 2001:
                await trio.sleep(0.001)
            await trio.testing.wait_all_tasks_blocked()
            visited = counting.visited - before
            assert visited <= 20 * 2000, f"2,000 destroyed nodes cost the receive loop {visited} steps"
        await attacker.aclose()


# -- 10. an object's charge stays with the caller it was first made for ------------------------


async def test_objects_another_caller_keeps_are_not_charged_to_the_first(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    """MEDIUM. max_exports_per_caller charges an export to the caller whose return first
    made its node (Engine._export_for), until the node is retired, that is until no one
    holds it. When a server hands the same object to several callers (a shared room,
    document or singleton: here shared(i) returns object i to everyone), another caller
    that also asked for it, and keeps it, keeps it charged to the first: an honest caller
    that opened 8 shared objects (max_exports_per_caller=8) and dropped them all is refused
    any new object (Overloaded: "this caller holds 8 objects") for as long as the attacker
    likes, while the attacker itself is charged nothing (and the objects it was handed
    this way are not bounded by its own max_exports_per_caller either). Fix: give each
    caller its own node for an object (one node per (object, caller)): the kernel's
    release notification then says which caller let go, and both the charge and the
    retirement are per caller."""
    tree, path = trees(tmp_path)

    class Shared(tree.Tree.Server):  # type: ignore[misc,name-defined]
        objects: dict[int, Any] = {}

        async def shared(self, index: int) -> Any:
            return Shared.objects.setdefault(index, Shared())

    server_peer, honest_peer = await kernel.connect(), await kernel.connect()
    async with (
        open_vat(server_peer, max_exports_per_caller=8) as server_vat,
        open_vat(honest_peer) as honest_vat,
    ):
        node = await server_vat.export(Shared())
        honest = honest_vat.client(await server_peer.transfer(node, honest_peer), tree.Tree)
        with trio.fail_after(TIMEOUT):
            opened = [(await honest.shared(index=i)).tree for i in range(8)]
            attack = f"""
            async def attack(peer, report, target):
                tree = capbus.load({str(path)!r})
                shared = tree.Tree.interface.methods["shared"]
                reply = await peer.create_node()
                held = []
                for i in range(8):  # the same 8 objects: no new node, no charge
                    call = protocol.encode_call(i + 1, shared, {{"index": i}})
                    await peer.send(target, call.payload, handles=[reply])
                    message = await peer.recv()
                    while message.kind is not capbus.MessageKind.DATA:
                        message = await peer.recv()
                    held.extend(message.handles)  # kept for ever
                await report(len(held))
            """
            async with attacker_process(kernel, tmp_path, attack, server_peer, [node]) as held:
                assert held == "8"
                handles = kernel.statistics().handles
                for client in opened:
                    await honest_vat.drop(client)
                del opened
                while kernel.statistics().handles > handles - 8:  # released (polled, bounded)
                    await trio.sleep(0.001)
                # The honest caller holds nothing of the server's now: it may be given an object.
                # (A vat's clients of a loaded schema are its own class, not tree.Tree.Client.)
                given = (await honest.shared(index=8)).tree
                assert given.interface.id == tree.Tree.interface.id
    for peer in (server_peer, honest_peer):
        await peer.aclose()


# -- 11. the calls of a caller that is gone go on running ---------------------------------------


async def test_the_calls_of_a_caller_that_is_gone_are_canceled(kernel: capbus.Kernel, tmp_path: Path) -> None:
    """HIGH. When a caller goes away (its process dies, its peer and reply node with it), the
    vat forgets its answers (Engine._node_destroyed) but neither cancels its running
    handlers nor drops its queued calls: a handler that waits for something of the server
    (a long poll, a lock, a slow() here) keeps its slots of max_concurrent_calls for as long
    as that takes, with no one to answer. Processes that each leave 256 such calls and
    exit, one after the other (never more than one alive, and each one a caller of its own
    at the vat), hold all 1024 handler slots after the fourth: every caller's calls then
    wait for ever. An honest client that crashes mid-call leaks the same way. Fix: when a
    reply node is destroyed, cancel the calls that would answer to it (the _serving scopes
    of its keys, and its queued calls), as Cap'n Proto cancels a connection's calls when it
    drops."""
    async with server_and_honest(kernel) as (server_peer, server_vat, _server, node, honest):
        attack = """
        async def attack(peer, report, target):
            reply = await peer.create_node()
            for i in range(256):
                call = protocol.encode_call(i + 1, METHODS["slow"], {})
                await peer.send(target, call.payload, handles=[reply])
            await report("sent")
        """
        with trio.fail_after(TIMEOUT):
            for _ in range(4):
                async with attacker_process(kernel, tmp_path, attack, server_peer, [node]) as report:
                    assert report == "sent"
                    while server_vat.statistics().answers < 256:  # all taken in (polled, bounded)
                        await trio.sleep(0.001)
                # The process is gone now (killed, its peer closed): its calls should be too.
                while server_vat.statistics().answers:  # its answers forgotten (polled, bounded)
                    await trio.sleep(0.001)
            with trio.fail_after(5):
                assert (await honest.echo(text="still served?")).text == "still served?"
