"""Attack review 17: the reworked rpc.capnp-over-streams code (streamengine.py, the sans-IO
tables; streamvat.py, its trio driver with one ordered outbox, corking and backpressure;
twopartyflat.py) attacked from outside with real sockets: capbus.serve services, capbus
clients, and hand-written hostile peers (tests/network/hostile_peer.py).

The tests before the "held" section FAIL on the code reviewed and pass once the finding is
fixed; each docstring says the severity, the attack, what happens now and what should
happen. The "held" tests are attacks that did not work: they pass today and keep it so."""

from __future__ import annotations

import functools
import gc
import socket
import struct
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc import streamvat, twopartyflat
from capbus.rpc.errors import RpcError

from .certificates import tls_contexts
from .hostile_peer import Peer, bootstrap, port_of, schema, served_still

TIMEOUT = 20

SCHEMA = """
@0xd1e2f3a4b5c6d7ec;
interface Thing {
  echo @0 (data :Data) -> (data :Data);
  make @1 (n :UInt32, wait :Bool) -> (thing :Thing);
  id @2 () -> (n :UInt32);
  hold @3 () -> ();
}
"""


@pytest.fixture(scope="module")
def things(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("review17") / "thing.capnp"
    path.write_text(SCHEMA)
    return capbus.load(path)


def _thing_server(things: Any, gate: trio.Event | None = None) -> Any:
    class Thing(things.Thing.Server):  # type: ignore[misc]
        def __init__(self, n: int = 0) -> None:
            self.n = n

        async def echo(self, data: bytes) -> bytes:
            return data

        async def make(self, n: int, wait: bool) -> Any:
            if wait and gate is not None:
                await gate.wait()
            return Thing(n)

        async def id(self) -> int:
            return self.n

        async def hold(self) -> None:
            await trio.sleep_forever()

    return Thing


def _client_vat(vats: list[streamvat.StreamVat]) -> streamvat.StreamVat:
    (vat,) = [v for v in vats if v.engine.bootstrap is None]
    return vat


async def _poll(condition: Any, what: str) -> None:
    """Waits (bounded, polling) until ``condition()``."""
    with trio.fail_after(TIMEOUT):
        while not condition():
            await trio.sleep(0.01)


# -- HIGH ---------------------------------------------------------------------------------------


async def test_two_capbus_vats_under_load_in_both_directions_do_not_deadlock(
    things: Any, vats: list[streamvat.StreamVat]
) -> None:
    """HIGH. Attack (no hostile peer needed: a capbus client and a capbus service): 64 tasks
    of the client each make 8 echo calls of 256 KiB in a row (each the next once the last
    returned), to an async handler.

    Now: both sides soon have more than OUTBOX_HIGH (512 KiB) queued behind a write the
    kernel does not take: the client its Calls, the service its Returns. Each receive loop
    then stops reading ("the peer reads too little: read no more"), so neither side's write
    ever completes: both connections hang with both writers stuck and both receive loops in
    ``_wait_for_room`` until send_timeout (60 s) disconnects them. Measured: 2 of 1 280
    calls answered in 15 s (the same calls, all sent at once in one round, pass in 0.3 s).
    Nothing hostile is needed: any two such peers under steady load both ways (or a
    handler calling back to its caller under load) can end up so.

    Should: a side never stops reading because of what it sends, unless it still serves
    what the reads bring (e.g. stop only taking new Calls, but keep reading Returns,
    Finishes and Releases, which free the peer; or bound the Calls in flight per
    connection instead of bytes): every call here is answered."""
    Thing = _thing_server(things)
    size, tasks, rounds = 1 << 18, 64, 8
    answered = 0
    async with capbus.serve(Thing(), "tcp:127.0.0.1:0") as service:
        with trio.fail_after(TIMEOUT):
            async with capbus.connect(f"tcp:127.0.0.1:{port_of(service)}", things.Thing) as remote:

                async def caller() -> None:
                    nonlocal answered
                    for _ in range(rounds):
                        assert len((await remote.echo(data=bytes(size))).data) == size
                        answered += 1

                with trio.move_on_after(10):
                    async with trio.open_nursery() as nursery:
                        for _ in range(tasks):
                            nursery.start_soon(caller)
                stuck = [(v._queued, v._writing) for v in vats]
    assert answered == tasks * rounds, (
        f"{answered} of {tasks * rounds} calls answered; (queued, writing): {stuck}"
    )


async def test_a_call_on_a_returned_promises_capability_goes_to_that_capability(
    things: Any, vats: list[streamvat.StreamVat]
) -> None:
    """HIGH (silently wrong answers, no hostile peer needed). Attack: a capbus client sends
    ``make(n=1)`` as a promise and awaits it; then makes another call, ``make(n=2)``, still
    pending; then calls ``id()`` on the first promise's capability (``promise.thing.id()``).

    Now: the first question's id was freed when its Return came (and its Finish was
    queued), and the next call took the same id (the free list is last-in first-out). The
    pipelined call asks StreamEngine.target, which finds *a* question with the promise's id
    not yet returned, and sends the call as promisedAnswer of the new question: it runs on
    the thing ``make(n=2)`` returns and answers 2. Any later call through a promise whose
    question has returned can land on whatever the next call returns (another user's
    object, a different interface, a null: "pipelined capability is null"); so can
    ``promise.thing`` passed as a param (StreamEngine.describe uses target too).

    Should: a question's id names the promise only while it is that question (as
    _promise_gone checks with ``done``); once it has returned, calls go to the capability
    in its results: ``id()`` answers 1."""
    gate = trio.Event()
    Thing = _thing_server(things, gate)
    got: list[int] = []
    async with capbus.serve(Thing(), "tcp:127.0.0.1:0") as service:
        with trio.fail_after(TIMEOUT):
            async with capbus.connect(f"tcp:127.0.0.1:{port_of(service)}", things.Thing) as remote:
                client = _client_vat(vats)
                first = await remote.make.send(n=1, wait=False)
                await first
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: remote.make(n=2, wait=True))
                    await _poll(lambda: len(client.questions) == 1, "the second make is asked")

                    async def pipelined() -> None:
                        got.append((await first.thing.id()).n)

                    nursery.start_soon(pipelined)
                    await _poll(lambda: len(client.questions) == 2 or got, "the id() call is sent")
                    gate.set()
    assert got == [1], f"first.thing.id() answered {got}, not 1"


# -- MEDIUM -------------------------------------------------------------------------------------


class _PartialSocket:
    """The vat's raw socket, whose kernel takes only the first 4 KiB of the next write;
    right after, a garbage collection runs (as it may in CPython at the next allocation of
    a tracked object: ``memoryview(data)[sent:]`` in StreamVat._write allocates one)."""

    def __init__(self, raw: socket.socket) -> None:
        self.raw, self.armed = raw, False

    def send(self, data: bytes, flags: int = 0) -> int:
        if not self.armed:
            return self.raw.send(data, flags)
        self.armed = False
        sent = self.raw.send(data[:4096], flags)
        gc.collect()
        return sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


async def test_a_finish_from_a_collected_promise_never_lands_inside_a_partly_written_call(
    things: Any, vats: list[streamvat.StreamVat]
) -> None:
    """MEDIUM. Attack: a capbus client holds an unanswered promise only through a reference
    cycle, then makes a 256 KiB call; the kernel takes the first 4 KiB of its write and the
    cyclic garbage is collected right after (CPython may collect at any tracked allocation).

    Now: StreamVat._write sends directly on the raw socket; the promise's finalizer runs
    between ``send`` returning and the unsent rest being queued
    (``self._outbox.append(memoryview(data)[sent:].tobytes())``), and ``_post`` queues its
    Finish first: the Finish's bytes are written into the middle of the Call. Here the
    service reads the Finish's bytes as part of the 256 KiB param, echoes the altered
    data (the caller gets a wrong payload, silently), then reads the Call's displaced tail
    as a message and aborts ("malformed message"): every other call fails Disconnected.
    The ``_post`` docstring says finalizers only queue for exactly this reason, but the
    partial-write path is not atomic with respect to them.

    Should: the rest of a partial write is queued before anything that can run a finalizer
    (or posts go to a separate list merged after the write); the call is answered, the
    connection lives on."""
    Thing = _thing_server(things)
    outcome = "answered"
    async with capbus.serve(Thing(), "tcp:127.0.0.1:0") as service:
        with trio.fail_after(TIMEOUT):
            async with capbus.connect(f"tcp:127.0.0.1:{port_of(service)}", things.Thing) as remote:
                client = _client_vat(vats)
                assert client._raw is not None
                partial = _PartialSocket(client._raw)
                client._raw = partial  # type: ignore[assignment]
                gc.disable()
                try:
                    promise = await remote.hold.send()
                    cycle: list[Any] = [promise]
                    cycle.append(cycle)
                    del promise, cycle
                    partial.armed = True
                    try:
                        data = (await remote.echo(data=bytes(1 << 18))).data
                        if data != bytes(1 << 18):
                            outcome = "a wrong payload"
                    except RpcError as error:
                        outcome = f"{type(error).__name__}: {error}"
                finally:
                    gc.enable()
                client._raw = partial.raw
    assert outcome == "answered", outcome


async def test_a_send_cancelled_as_it_is_written_still_finishes_its_call(
    things: Any, vats: list[streamvat.StreamVat]
) -> None:
    """MEDIUM. Attack (a capbus client's own timeouts): ``await remote.hold.send()`` five
    times, each in a cancel scope that is already cancelled (or whose deadline passes as
    the send waits for room past OUTBOX_HIGH: ``call`` has the same hole in
    ``_wait_for_room``).

    Now: StreamVat.send_call queues the Call (``_write``), then ``_send_bytes``' checkpoint
    raises Cancelled; the promise's finalizer is detached and nothing else ever sends a
    Finish for the question: the Call goes out, its handler runs on the service for as long
    as it likes (here forever), holding one of the connection's max_calls slots and its
    answer, and the question stays in the client's table. A client whose sends time out
    now and then exhausts the service's max_calls (every later call Overloaded) and leaks.

    Should: a Call once queued is always followed by a Finish when its caller gives up
    (or the send is not cancellable once queued): the service's handlers are cancelled and
    its answers and the client's questions drain to none."""
    Thing = _thing_server(things)
    async with capbus.serve(Thing(), "tcp:127.0.0.1:0") as service:
        with trio.fail_after(TIMEOUT):
            async with capbus.connect(f"tcp:127.0.0.1:{port_of(service)}", things.Thing) as remote:
                client = _client_vat(vats)
                (server,) = [v for v in vats if v.engine.bootstrap is not None]
                for _ in range(5):
                    with trio.CancelScope() as scope:
                        scope.cancel()
                        await remote.hold.send()
                assert (await remote.id()).n == 0  # (everything before it has arrived)
                with trio.move_on_after(3):  # (bounded poll: the Finishes, if any, come at once)
                    while server.answers or client.questions:
                        await trio.sleep(0.01)
                left = (len(server.answers), len(client.questions), server.max_calls - server._calls.value)
    assert left == (0, 0, 0), f"(service answers, client questions, call slots taken) = {left}"


# -- held ---------------------------------------------------------------------------------------


def _no_finish_needed(segment: bytes) -> bytes:
    """A one-segment Return message with its noFinishNeeded bit (Return's data bit 33) set."""
    words = bytearray(segment)

    def target(at: int) -> tuple[int, int]:
        pointer = struct.unpack_from("<Q", words, at * 8)[0]
        offset = (pointer & 0xFFFFFFFF) >> 2
        return at + 1 + offset, (pointer >> 32) & 0xFFFF  # (the struct's word, its data words)

    message, data_words = target(0)
    returned, _ = target(message + data_words)  # (Message's one pointer: the Return)
    first = struct.unpack_from("<Q", words, returned * 8)[0]
    struct.pack_into("<Q", words, returned * 8, first | twopartyflat._NO_FINISH_NEEDED)
    return bytes(words)


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
async def test_held_finishes_and_cancelled_gatherers_never_overtake_their_calls(
    things: Any, vats: list[streamvat.StreamVat], scheme: str
) -> None:
    """Held. Attack (ordering, from a capbus client, over tcp: with the raw-socket path and
    over tls: through the writer task only): 150 tasks at once each send a call to a
    handler that never returns and drop or cancel the promise at once (Finish from a
    finalizer, ``_post``), while 100 more make calls (gathering others' Calls,
    ``_send_call``) of which every other one is cancelled inside its gathering. No Finish
    overtakes its Call (the service would abort: "a Finish for question N, which is not
    one"), the uncancelled calls are answered, and the service's answers drain to none."""
    Thing = _thing_server(things)
    options: dict[str, Any] = {}
    client_options: dict[str, Any] = {}
    if scheme == "tls":
        options["tls"], client_options["tls"] = tls_contexts()
    answered = 0
    async with capbus.serve(Thing(), f"{scheme}:127.0.0.1:0", **options) as service:
        with trio.fail_after(TIMEOUT):
            async with capbus.connect(str(service.address), things.Thing, **client_options) as remote:

                async def dropped(n: int) -> None:
                    promise = await remote.hold.send()
                    if n % 2:
                        promise.cancel()
                    del promise

                async def caller(n: int) -> None:
                    nonlocal answered
                    with trio.CancelScope() as scope:
                        if n % 2:
                            scope.cancel()  # (cancelled where it waits: in or after gathering)
                        assert (await remote.echo(data=b"%d" % n)).data == b"%d" % n
                        answered += 1

                async with trio.open_nursery() as nursery:
                    for n in range(150):
                        nursery.start_soon(dropped, n)
                    for n in range(100):
                        nursery.start_soon(caller, n)
                assert (await remote.echo(data=b"after")).data == b"after"
                (server,) = [v for v in vats if v.engine.bootstrap is not None]
                await _poll(lambda: not server.answers, "the service's answers drain")
                assert server.closed is None
    assert answered == 50


async def test_held_a_hostile_servers_odd_returns_fail_the_client_and_never_hang_it(
    things: Any,
) -> None:
    """Held. Attack: a hostile server answers a capbus client's Bootstrap with
    noFinishNeeded set, then answers its first call with a Return for a question id it
    never asked, then a second Return for the bootstrap's id. The client's call fails
    (Disconnected: it aborts the connection), nothing hangs, nothing else is raised."""
    from capbus.rpc.twoparty import Descriptor, encode_bootstrap_return, frame, rpc

    outcome: list[str] = []

    async def hostile(stream: trio.SocketStream) -> None:
        peer = Peer(stream)
        message = await peer.next()
        question = int(message.bootstrap.questionId)
        (segment,) = encode_bootstrap_return(question, Descriptor("senderHosted", 0))
        await stream.send_all(frame([_no_finish_needed(bytes(segment))]))
        outcome.append(str((await peer.next()).which()))  # (the call: no Finish before it)

        def stray(answer_id: int) -> bytes:
            message = rpc.Message.new_message()
            message.init("return").answerId = answer_id
            message.__getattr__("return").init("exception").reason = "stray"
            return frame([bytes(message.to_bytes())[8:]])

        await stream.send_all(stray(4242) + stray(question))
        with trio.move_on_after(TIMEOUT):
            while await peer.next() is not None:
                pass

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(functools.partial(trio.serve_tcp, hostile, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with trio.fail_after(TIMEOUT):
            async with capbus.connect(f"tcp:127.0.0.1:{port}", things.Thing) as remote:
                try:
                    await remote.id()
                    outcome.append("answered")
                except RpcError as error:
                    outcome.append(type(error).__name__)
        nursery.cancel_scope.cancel()
    assert outcome == ["call", "Disconnected"], outcome


async def test_held_a_peer_that_floods_inline_calls_does_not_starve_another_connection() -> None:
    """Held. Attack: a hostile peer writes hot echo Calls as fast as the socket takes them
    (served inline in the receive loop, the Returns corked into one write a read) and
    reads all it gets; meanwhile another client's call over its own connection is
    answered (the receive loop checkpoints after each read)."""
    echo = schema.Echo.interface.methods["echo"]
    async with capbus.serve(_echo_server(), "tcp:127.0.0.1:0") as service:
        peer = await Peer.connect(port_of(service))
        counts: dict[str, int] = {}

        async def flood() -> None:
            await peer.stream.send_all(bootstrap(0))
            question = 1
            while True:
                batch = []
                for _ in range(500):
                    framed = twopartyflat.encode_call(question, 0, echo, {"text": "x"}, no_pipelining=True)
                    assert framed is not None
                    batch.append(framed)
                    question += 1
                await peer.stream.send_all(b"".join(batch))

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                nursery.start_soon(peer.drain, counts)
                await _poll(lambda: counts.get("return", 0) > 2000, "the flood is served")
                await served_still(port_of(service))
                nursery.cancel_scope.cancel()
        await peer.stream.aclose()


def _echo_server() -> Any:
    class Echo(schema.Echo.Server):  # type: ignore[misc]
        def echo(self, text: str) -> str:
            return text

    return Echo()
