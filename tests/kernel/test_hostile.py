"""The kernel treats every peer as hostile (uapi.h is the contract).

Malformed, oversized and inconsistent frames, forged and stale ids, fd abuse, floods past
quota (from the same user and from another uid), a peer killed mid-send, and a peer that
never reads its replies. Each attack must be refused precisely, and must hurt no one else:
every test runs a well-behaved pair of peers (:class:`Witness`) with messages queued before
and during the attack, and checks afterwards that they all arrive, in order and intact, and
that the pair still round-trips.
"""

from __future__ import annotations

import array
import errno
import fcntl
import functools
import inspect
import os
import random
import signal
import socket
import struct
import sys
import termios
import textwrap
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec

import pytest
import trio

import capbus
from capbus import _kernel, _wire
from capbus.errors import error_from_errno
from capbus.testing import PeerFactory, as_user, assert_queue_empty, recv_kind, wait_for_statistics

from .other_uid import needs_root

DATA = capbus.MessageKind.DATA
DESTROYED = capbus.MessageKind.NODE_DESTROYED
RELEASED = capbus.MessageKind.NODE_RELEASED

VIOLATIONS_MAX: int = _kernel.lib.CAPBUS_VIOLATIONS_MAX
REPLY_BACKLOG_MAX: int = _kernel.lib.CAPBUS_REPLY_BACKLOG_MAX
FRAME = _wire.FRAME
U64 = _wire.U64
HEADER = FRAME.size
MESSAGE_HEADER = FRAME.size + _wire.MESSAGE.size  # bytes of a message frame before handles/payload
ANC_SPACE = socket.CMSG_SPACE(4 * _wire.FDS_MAX)
MiB = 1 << 20
NOBODY = 65534
TIMEOUT = 20  # seconds, for any single wait; everything normally takes milliseconds
TEST_TIMEOUT = 40  # seconds, for a whole test (each takes well under one)
WITNESS_BASE = 1 << 40  # witness payload numbers, far from any attacker's


P = ParamSpec("P")


def bounded(test: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
    """Runs the whole test under one ``trio.fail_after``, so no wait (set-up included) can
    hang it; the phases inside have their own, tighter bounds."""

    @functools.wraps(test)
    async def run(*args: P.args, **kwargs: P.kwargs) -> None:
        with trio.fail_after(TEST_TIMEOUT):
            await test(*args, **kwargs)

    return run


def numbered(index: int, size: int) -> bytes:
    """A payload that carries its index in every 8 bytes: a tear, mix-up or cut shows."""
    stamp = index.to_bytes(8, "little")
    return (stamp * (size // 8 + 1))[:size]


def index_of(message: capbus.Message) -> int:
    return int.from_bytes(message.payload_view[:8], "little")


def unread_bytes(fileno: int) -> int:
    """Bytes of every datagram waiting in a SEQPACKET socket (Linux FIONREAD sums them)."""
    return struct.unpack("i", fcntl.ioctl(fileno, termios.FIONREAD, b"\0\0\0\0"))[0]


def assert_error(reply: _wire.Reply, code: int, cls: type[capbus.CapbusError], what: str = "") -> None:
    name = errno.errorcode.get(reply.error, str(reply.error))
    assert reply.error == code, f"{what}: expected {errno.errorcode[code]}, got {name}"
    assert isinstance(error_from_errno(reply.error), cls)


def send_datagram(
    cookie: int,
    destinations: Sequence[int],
    *,
    handles: Sequence[int] = (),
    payload: bytes = b"",
    n_fds: int = 0,
    n_destinations: int | None = None,
    n_handles: int | None = None,
    payload_size: int | None = None,
    send_flags: int = 0,
    flags: int = 0,
) -> bytes:
    """A CAPBUS_CMD_SEND frame whose counts can lie; the frame size always tells the truth.
    ``flags`` go in the frame header, ``send_flags`` in the SEND body."""
    body = _wire.SEND.pack(
        len(destinations) if n_destinations is None else n_destinations,
        len(handles) if n_handles is None else n_handles,
        n_fds,
        len(payload) if payload_size is None else payload_size,
        0,
        send_flags,
    )
    ids = [*destinations, *handles]
    body += struct.pack(f"<{len(ids)}Q", *ids) + payload
    return FRAME.pack(HEADER + len(body), _wire.CMD_SEND, flags, cookie) + body


class RawPeer:
    """A peer that speaks raw frames over its socket: whatever bytes a hostile peer could."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._cookie = 1000
        self.messages: list[_wire.Incoming] = []

    @classmethod
    async def seeded(cls, owner: capbus.Peer, handles: Sequence[capbus.Handle]) -> tuple[RawPeer, list[int]]:
        """A new peer made by ``owner`` whose seed carries ``handles``; returns their ids."""
        raw = cls(await owner.create_peer(b"", handles=handles))
        reply = await raw.call(_wire.CMD_SEED_TAKE)
        assert reply.error == 0
        return raw, list(_wire.decode_message(reply.body, []).handles)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def next_cookie(self) -> int:
        self._cookie += 1
        return self._cookie

    async def send(self, datagram: bytes | bytearray, fds: Sequence[int] = ()) -> None:
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while True:
            try:
                self.sock.sendmsg([datagram], ancdata)
                return
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)

    async def recv(self, bufsize: int = _wire.FRAME_MAX + 1) -> tuple[bytes, list[int], int]:
        """One datagram from the kernel: (bytes, fds, flags); b"" with no fds is EOF."""
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(bufsize, ANC_SPACE, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            fds: list[int] = []
            for level, kind, item in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", item[: len(item) - len(item) % 4]))
            return data, fds, flags

    async def reply(self, bufsize: int = _wire.FRAME_MAX + 1) -> _wire.Reply:
        """The next reply (messages that come first are kept in ``messages``)."""
        while True:
            data, fds, flags = await self.recv(bufsize)
            assert data, "the kernel hung up"
            assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC), "the kernel sent an oversized frame"
            event = _wire.decode(data, fds)
            if isinstance(event, _wire.Reply):
                return event
            self.messages.append(event)

    async def call(
        self, kind: int, body: bytes = b"", *, flags: int = 0, fds: Sequence[int] = ()
    ) -> _wire.Reply:
        """Sends one command frame and returns its reply (checking the cookie)."""
        return await self.call_with(
            lambda cookie: FRAME.pack(HEADER + len(body), kind, flags, cookie) + body, fds
        )

    async def call_with(self, make: Callable[[int], bytes], fds: Sequence[int] = ()) -> _wire.Reply:
        cookie = self.next_cookie()
        await self.send(make(cookie), fds)
        reply = await self.reply()
        assert reply.cookie == cookie, f"reply for cookie {reply.cookie}, expected {cookie}"
        for fd in reply.fds:
            os.close(fd)
        return reply

    async def frames_until_eof(self) -> list[_wire.Reply | _wire.Incoming]:
        frames: list[_wire.Reply | _wire.Incoming] = []
        while True:
            data, fds, _flags = await self.recv()
            if not data and not fds:
                return frames
            frames.append(_wire.decode(data, fds))


class FdProbe:
    """A pipe whose read end gets handed out. Once every copy of the read end is closed,
    writing to the write end fails with EPIPE: that tells whether the kernel really closed
    the copies it was given (it runs in this process, so a leak would stay open here)."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()
        self._read_open = True

    def __enter__(self) -> FdProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_read()
        os.close(self.write)

    def _close_read(self) -> None:
        if self._read_open:
            self._read_open = False
            os.close(self.read)

    def assert_no_copy_left(self, what: str) -> None:
        self._close_read()
        try:
            os.write(self.write, b"x")
        except BrokenPipeError:
            return
        raise AssertionError(f"{what}: a copy of the fd is still open somewhere (the kernel leaked it)")


class Witness:
    """A well-behaved pair: everything it queues, before, during or after an attack, must
    arrive in order and intact, and it must keep getting served."""

    def __init__(
        self, sender: capbus.Peer, receiver: capbus.Peer, inbox: capbus.Handle, to_inbox: capbus.Handle
    ):
        self.sender = sender
        self.receiver = receiver
        self.inbox = inbox
        self.to_inbox = to_inbox
        self.expected: deque[bytes] = deque()
        self.count = 0

    @classmethod
    async def start(cls, new_peer: PeerFactory) -> Witness:
        receiver = await new_peer()
        await receiver.want_metadata()
        sender = await new_peer()
        inbox = await receiver.create_node()
        witness = cls(sender, receiver, inbox, await receiver.transfer(inbox, sender))
        await witness.queue(4)  # queued before the attack, read only after it
        return witness

    async def queue(self, n: int) -> None:
        for _ in range(n):
            payload = numbered(WITNESS_BASE + self.count, 8 * (1 + self.count % 97))
            self.count += 1
            with trio.fail_after(TIMEOUT):
                await self.sender.send(self.to_inbox, payload)
            self.expected.append(payload)

    async def round_trip(self) -> None:
        """Sends one more message and receives everything queued so far, checking each."""
        with trio.fail_after(TIMEOUT):
            await self.queue(1)
            while self.expected:
                message = await recv_kind(self.receiver, DATA)
                want = self.expected.popleft()
                assert message.destination == self.inbox
                assert message.payload == want, "a well-behaved peer's message was lost or damaged"
                assert message.sender is not None and message.sender.uid == os.getuid()
            assert_queue_empty(self.receiver)

    async def verify(self) -> None:
        await self.queue(3)
        await self.round_trip()


@pytest.fixture
def closing() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


@dataclass
class Attack:
    """What most attacks need: a witness pair, a victim peer (``sink``) with a node, and a raw
    peer that holds a handle (``to_sink``, a raw id) to that node."""

    witness: Witness
    sink: capbus.Peer
    inbox: capbus.Handle
    raw: RawPeer
    to_sink: int

    def parts(self) -> tuple[Witness, capbus.Peer, capbus.Handle, RawPeer, int]:
        return self.witness, self.sink, self.inbox, self.raw, self.to_sink


@pytest.fixture
async def attack(new_peer: PeerFactory, closing: ExitStack) -> Attack:
    witness = await Witness.start(new_peer)
    sink = await new_peer()
    inbox = await sink.create_node()
    raw, (to_sink,) = await RawPeer.seeded(sink, [inbox])
    closing.enter_context(raw)
    return Attack(witness, sink, inbox, raw, to_sink)


@asynccontextmanager
async def kernel_with_peers(limits: capbus.Limits) -> AsyncIterator[tuple[capbus.Kernel, PeerFactory]]:
    """Like the ``kernel`` and ``new_peer`` fixtures, with other limits."""
    async with capbus.open_kernel(limits=limits) as kernel:
        made: list[capbus.Peer] = []

        async def make() -> capbus.Peer:
            peer = await kernel.connect()
            made.append(peer)
            return peer

        try:
            yield kernel, make
        finally:
            for peer in made:
                await peer.aclose()


# -- child processes ---------------------------------------------------------------------------
# Attackers that must be real processes speak raw frames with the standard library only (no
# trio, no capbus import: fast to start, and runnable as another uid). The wire layouts come
# from capbus._wire, so they follow uapi.h.

_CHILD_PRELUDE = f"""
import os, socket, struct, sys
FRAME = struct.Struct({_wire.FRAME.format!r})
REPLY = struct.Struct({_wire.REPLY.format!r})
SEND = struct.Struct({_wire.SEND.format!r})
SEND_RESULT = struct.Struct({_wire.SEND_RESULT.format!r})
U64 = struct.Struct("<Q")
CMD_NODE_CREATE = {_wire.CMD_NODE_CREATE}
CMD_SEND = {_wire.CMD_SEND}
FRAME_REPLY = {_wire.FRAME_REPLY}
FRAME_MAX = {_wire.FRAME_MAX}
EDQUOT = {errno.EDQUOT}
"""

_CHILD_COMMON = """
sock = socket.socket(fileno=int(sys.argv[1]))
sock.setblocking(True)
last_cookie = 0


def call(kind, body):
    global last_cookie
    last_cookie += 1
    sock.send(FRAME.pack(FRAME.size + len(body), kind, 0, last_cookie) + body)
    while True:
        data = sock.recv(FRAME_MAX + 1)
        if not data:
            sys.exit("the kernel hung up")
        _size, frame_type, _flags, cookie = FRAME.unpack_from(data)
        if frame_type != FRAME_REPLY:
            continue
        if cookie != last_cookie:
            sys.exit(f"reply to cookie {cookie}, expected {last_cookie}")
        error, _command = REPLY.unpack_from(data, FRAME.size)
        return error, data[FRAME.size + REPLY.size:]


def send(destination, payload, handles=()):
    ids = (destination, *handles)
    body = SEND.pack(1, len(handles), 0, len(payload), 0, 0) + struct.pack(f"<{len(ids)}Q", *ids) + payload
    error, result = call(CMD_SEND, body)
    if error:
        sys.exit(f"send refused as a whole: {error}")
    return struct.unpack_from("<i", result, SEND_RESULT.size)[0]
"""

# argv: socket fd, destination id, payload size, cap. Floods until EDQUOT, tries once more,
# prints "accepted first_error retry_error uid gid".
_FLOOD_CHILD = """
destination, size, cap = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
accepted = code = retry = 0
while accepted < cap:
    code = send(destination, numbered(accepted, size))
    if code:
        retry = send(destination, numbered(accepted, size))
        break
    accepted += 1
print(accepted, code, retry, os.getuid(), os.getgid(), flush=True)
"""

# argv: socket fd, destination id, progress fd, payload size. Sends numbered messages one by
# one, the first with a handle to a node of its own, retrying on EDQUOT, and records in the
# progress file how many the kernel accepted. Runs until killed.
_STREAM_CHILD = """
destination, progress, size = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
error, body = call(CMD_NODE_CREATE, b"")
if error:
    sys.exit(f"node create failed: {error}")
own = U64.unpack_from(body)[0]
index = 0
while index < 50_000_000:
    code = send(destination, numbered(index, size), (own,) if index == 0 else ())
    if code == EDQUOT:
        continue
    if code:
        sys.exit(f"send failed: {code}")
    index += 1
    os.pwrite(progress, U64.pack(index), 0)
sys.exit("never killed")
"""


def child_script(body: str) -> str:
    return "\n".join([_CHILD_PRELUDE, inspect.getsource(numbered), _CHILD_COMMON, textwrap.dedent(body)])


def malformed_datagrams(rng: random.Random) -> list[tuple[bytes, int, int]]:
    """Unparseable datagrams, each with the (cookie, command) its EBADMSG reply must carry:
    0 and 0 when there is not even a header, the header's own when its size field lies."""
    cases: list[tuple[bytes, int, int]] = [
        (b"", 0, 0),
        (b"\x05", 0, 0),
        (rng.randbytes(HEADER - 1), 0, 0),
        # A well-formed header whose size says one byte more, one byte less, 0, 4 GiB.
        (FRAME.pack(HEADER + 1, _wire.CMD_NODE_CREATE, 0, 101), 101, _wire.CMD_NODE_CREATE),
        (
            FRAME.pack(HEADER + 7, _wire.CMD_HANDLE_RELEASE, 0, 102) + U64.pack(9),
            102,
            _wire.CMD_HANDLE_RELEASE,
        ),
        (rng.randbytes(8), 0, 0),
        (FRAME.pack(0, _wire.CMD_PEER_QUERY, 0, 103), 103, _wire.CMD_PEER_QUERY),
        (b"", 0, 0),
        (FRAME.pack(0xFFFFFFFF, _wire.CMD_SEND, 0, 104) + bytes(64), 104, _wire.CMD_SEND),
    ]
    for length in (HEADER, HEADER + 1, 40, 255, 1000, 4096, 65536, 1 << 17):
        data = bytearray(rng.randbytes(length))
        size, kind, _flags, cookie = FRAME.unpack_from(data)
        if size == length:
            FRAME.pack_into(data, 0, size + 1, kind, _flags, cookie)
        cases.append((bytes(data), cookie, kind))
    # The last one, the one that gets the peer cut off, is a plain lie about the size.
    cases.insert(
        VIOLATIONS_MAX - 1,
        (FRAME.pack(HEADER + 100, _wire.CMD_SEND, 0, 105) + bytes(50), 105, _wire.CMD_SEND),
    )
    return cases


# -- 1. garbage --------------------------------------------------------------------------------


@bounded
async def test_garbage_gets_ebadmsg_until_the_peer_is_cut_off(
    kernel: capbus.Kernel, new_peer: PeerFactory, closing: ExitStack
) -> None:
    witness = await Witness.start(new_peer)
    raw = closing.enter_context(RawPeer(kernel.socket_for_child()))
    probe = closing.enter_context(FdProbe())
    cases = malformed_datagrams(random.Random(0xCAB05))
    assert len(cases) >= VIOLATIONS_MAX
    cases = cases[:VIOLATIONS_MAX]
    before = kernel.statistics()

    with trio.fail_after(TIMEOUT):
        for number, (datagram, cookie, command) in enumerate(cases[:-1]):
            # The first one is an empty datagram carrying an fd: not EOF, and the fd is closed.
            await raw.send(datagram, [probe.read] if number == 0 else [])
            reply = await raw.reply()
            what = f"malformed datagram #{number} ({len(datagram)} bytes)"
            assert_error(reply, errno.EBADMSG, capbus.MalformedFrame, what)
            assert (reply.cookie, reply.command) == (cookie, command), what
            assert reply.fds == [] and len(reply.body) == 0, what
            if number == 0:
                probe.assert_no_copy_left("fd on an empty datagram")
            if number == len(cases) // 2:
                await witness.queue(2)

        # One short of the limit, the peer is still served normally.
        reply = await raw.call(_wire.CMD_PEER_QUERY)
        assert reply.error == 0
        stats = kernel.statistics()
        assert stats.violations == before.violations + VIOLATIONS_MAX - 1
        assert stats.peers_doomed == before.peers_doomed
        assert stats.peers == before.peers

        # The last straw: answered (the reply may or may not make it), then EOF.
        datagram, cookie, command = cases[-1]
        await raw.send(datagram)
        frames = await raw.frames_until_eof()
        assert len(frames) <= 1, f"frames after the last violation: {frames}"
        for frame in frames:
            assert isinstance(frame, _wire.Reply)
            assert (frame.error, frame.cookie, frame.command) == (errno.EBADMSG, cookie, command)
        stats = await wait_for_statistics(kernel, lambda s: s.peers == before.peers - 1)
        assert stats.peers_doomed == before.peers_doomed + 1
        assert stats.violations == before.violations + VIOLATIONS_MAX

    await witness.verify()


# -- 2. oversized ------------------------------------------------------------------------------


@bounded
async def test_oversized_frames_and_payloads_get_emsgsize(
    kernel: capbus.Kernel, new_peer: PeerFactory, attack: Attack
) -> None:
    witness, sink, inbox, raw, to_sink = attack.parts()
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
    before = kernel.statistics()

    with trio.fail_after(TIMEOUT):
        for length in (_wire.FRAME_MAX + 1, _wire.FRAME_MAX + 4096, 3 * MiB):
            cookie = raw.next_cookie()
            datagram = bytearray(length)
            # A well-formed SEND of the whole datagram, just too big.
            payload_size = length - HEADER - _wire.SEND.size - 8
            FRAME.pack_into(datagram, 0, length, _wire.CMD_SEND, 0, cookie)
            _wire.SEND.pack_into(datagram, HEADER, 1, 0, 0, payload_size, 0, 0)
            U64.pack_into(datagram, HEADER + _wire.SEND.size, to_sink)
            await raw.send(datagram)
            reply = await raw.reply()
            assert_error(reply, errno.EMSGSIZE, capbus.MessageTooLarge, f"{length}-byte datagram")
            assert reply.cookie in (cookie, 0)
        await witness.queue(2)

        # A SEND that claims more payload than allowed, with or without carrying it.
        too_big = numbered(7, _wire.PAYLOAD_MAX + 1)
        reply = await raw.call_with(lambda c: send_datagram(c, [to_sink], payload=too_big))
        assert_error(reply, errno.EMSGSIZE, capbus.MessageTooLarge, "payload_size = PAYLOAD_MAX + 1")
        # Claiming more than it carries is refused too: as too large or as a body that does not
        # add up (docs/wire-format.md lists the layout check first, the kernel checks the size
        # first; either refusal is right, accepting is not).
        for claimed in (_wire.PAYLOAD_MAX + 1, 0xFFFFFFFF):
            reply = await raw.call_with(lambda c, n=claimed: send_datagram(c, [to_sink], payload_size=n))
            assert reply.error in (errno.EMSGSIZE, errno.EINVAL), (
                f"payload_size = {claimed:#x}: {reply.error}"
            )
        assert kernel.statistics().messages_sent == before.messages_sent + 2  # the witness's two
        assert_queue_empty(sink)

        # The peer API carries payloads over PAYLOAD_MAX out of band (a sealed memfd): the
        # same bytes arrive intact, and the inline limit is never crossed on the wire.
        sender = await new_peer()
        to_inbox = await sink.transfer(inbox, sender)
        await sender.send(to_inbox, too_big)
        message = await recv_kind(sink, DATA)
        assert message.payload == too_big

        # Exactly at the limit works, from both, and nothing refused arrived.
        largest = numbered(8, _wire.PAYLOAD_MAX)
        await sender.send(to_inbox, largest)
        reply = await raw.call_with(lambda c: send_datagram(c, [to_sink], payload=largest))
        assert reply.error == 0
        for _ in range(2):
            message = await recv_kind(sink, DATA)
            assert message.payload == largest
        assert_queue_empty(sink)
        assert (await raw.call(_wire.CMD_PEER_QUERY)).error == 0

    await witness.verify()


def sealed_memfd(data: bytes, *, size: int | None = None, seals: int | None = None) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if size is not None:
        os.ftruncate(fd, size)  # sparse: costs no memory
    if seals is None:
        seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@bounded
async def test_hostile_memfd_payloads_are_refused_and_closed(
    kernel: capbus.Kernel, new_peer: PeerFactory, attack: Attack
) -> None:
    witness, sink, inbox, raw, to_sink = attack.parts()
    memfd_flag = _wire.SEND_FLAG_MEMFD
    future_write = 0x10  # F_SEAL_FUTURE_WRITE: existing writable mappings may still write
    cases: list[tuple[str, Callable[[], int], int, type[capbus.CapbusError]]] = [
        ("a pipe as payload", lambda: os.dup(probe.read), errno.EBADF, capbus.BadFileDescriptor),
        ("unsealed memfd", lambda: sealed_memfd(b"changeable", seals=0), errno.ETXTBSY, capbus.NotSealed),
        (
            "only F_SEAL_WRITE",
            lambda: sealed_memfd(b"x", seals=fcntl.F_SEAL_WRITE),
            errno.ETXTBSY,
            capbus.NotSealed,
        ),
        (
            "no F_SEAL_GROW",
            lambda: sealed_memfd(b"x", seals=fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK),
            errno.ETXTBSY,
            capbus.NotSealed,
        ),
        (
            "F_SEAL_FUTURE_WRITE instead of F_SEAL_WRITE",
            lambda: sealed_memfd(b"x", seals=future_write | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW),
            errno.ETXTBSY,
            capbus.NotSealed,
        ),
        (
            "over CAPBUS_MEMFD_MAX",
            lambda: sealed_memfd(b"big", size=_wire.MEMFD_MAX + 1),
            errno.EMSGSIZE,
            capbus.MessageTooLarge,
        ),
    ]
    before = kernel.statistics()
    with trio.fail_after(TIMEOUT):
        for what, make_fd, code, cls in cases:
            with FdProbe() as probe:
                payload_fd = make_fd()
                try:
                    reply = await raw.call_with(
                        lambda c: send_datagram(c, [to_sink], n_fds=2, send_flags=memfd_flag),
                        [payload_fd, probe.read],
                    )
                finally:
                    os.close(payload_fd)
                assert_error(reply, code, cls, what)
                probe.assert_no_copy_left(f"fd sent along with {what}")
            await witness.queue(1)
        stats = kernel.statistics()
        assert stats.messages_sent == before.messages_sent + len(cases)  # the witness's
        assert stats.queued_fds == 0
        assert_queue_empty(sink)

        # A properly sealed memfd of exactly the limit's little brother works.
        data = numbered(3, 3 * _wire.PAYLOAD_MAX)
        payload_fd = sealed_memfd(data)
        try:
            reply = await raw.call_with(
                lambda c: send_datagram(c, [to_sink], n_fds=1, send_flags=memfd_flag), [payload_fd]
            )
        finally:
            os.close(payload_fd)
        assert reply.error == 0
        message = await recv_kind(sink, DATA)
        assert message.payload == data and message.fds == []
        assert_queue_empty(sink)

    await witness.verify()


# -- 3. unknown commands, flags, inconsistent SENDs, fds where they do not belong -------------


@bounded
async def test_unknown_commands_and_flags_are_refused_without_effect(
    kernel: capbus.Kernel, new_peer: PeerFactory, attack: Attack
) -> None:
    witness, sink, inbox, raw, to_sink = attack.parts()
    before = kernel.statistics()

    with trio.fail_after(TIMEOUT):
        # Unknown commands are well-formed frames: ENOTTY every time, never a violation, so
        # many more than VIOLATIONS_MAX of them do not get the peer cut off.
        unknown = [0x00, 0x0B, 0x13, 0x7F, _wire.FRAME_REPLY, _wire.FRAME_MESSAGE, 0xFFFF]
        for round_ in range(2 * VIOLATIONS_MAX // len(unknown) + 1):
            for kind in unknown:
                reply = await raw.call(kind, bytes(8 * round_))
                assert_error(reply, errno.ENOTTY, capbus.UnknownCommand, f"command {kind:#x}")
                assert reply.command == kind
        await witness.queue(2)

        # Unknown frame flags: EINVAL, and the command is not carried out.
        for flags in (1, 0x8000, 0xFFFF):
            reply = await raw.call(_wire.CMD_NODE_CREATE, flags=flags)
            assert_error(reply, errno.EINVAL, capbus.InvalidArgument, f"NODE_CREATE flags {flags:#x}")
            reply = await raw.call_with(
                lambda c, f=flags: send_datagram(c, [to_sink], payload=b"no", flags=f)
            )
            assert_error(reply, errno.EINVAL, capbus.InvalidArgument, f"SEND flags {flags:#x}")
            reply = await raw.call(_wire.CMD_DISCONNECT, flags=flags)
            assert_error(reply, errno.EINVAL, capbus.InvalidArgument, f"DISCONNECT flags {flags:#x}")

        stats = kernel.statistics()
        assert stats.nodes == before.nodes, "a refused NODE_CREATE created a node"
        assert stats.violations == before.violations
        assert stats.messages_sent == before.messages_sent + 2  # the witness's
        assert (await raw.call(_wire.CMD_PEER_QUERY)).error == 0
        assert_queue_empty(sink)

    await witness.verify()


@bounded
async def test_inconsistent_sends_are_einval_and_deliver_nothing(
    kernel: capbus.Kernel, new_peer: PeerFactory, attack: Attack
) -> None:
    witness, sink, inbox, raw, to_sink = attack.parts()
    payload = b"must never arrive"
    n = len(payload)
    memfd = _wire.SEND_FLAG_MEMFD
    cases: list[tuple[str, Callable[[int], bytes], int]] = [
        ("no destinations", lambda c: send_datagram(c, [], payload=payload), 0),
        (
            "n_destinations beyond the body",
            lambda c: send_datagram(c, [to_sink], payload=payload, n_destinations=2),
            0,
        ),
        (
            "n_destinations short of the body",
            lambda c: send_datagram(c, [to_sink, to_sink], n_destinations=1),
            0,
        ),
        ("n_handles with no handles", lambda c: send_datagram(c, [to_sink], payload=payload, n_handles=1), 0),
        ("handles not counted", lambda c: send_datagram(c, [to_sink], handles=[to_sink], n_handles=0), 0),
        (
            "payload_size too large",
            lambda c: send_datagram(c, [to_sink], payload=payload, payload_size=n + 1),
            0,
        ),
        (
            "payload_size too small",
            lambda c: send_datagram(c, [to_sink], payload=payload, payload_size=n - 1),
            0,
        ),
        (
            "unknown send flag",
            lambda c: send_datagram(
                c,
                [to_sink],
                payload=payload,
                send_flags=(_wire.SEND_FLAG_MEMFD | _wire.SEND_FLAG_QUIET | _wire.SEND_FLAG_TRACK) << 1,
            ),
            0,
        ),
        (
            "unknown high send flag",
            lambda c: send_datagram(c, [to_sink], payload=payload, send_flags=1 << 31),
            0,
        ),
        (
            "memfd flag and an inline payload",
            lambda c: send_datagram(c, [to_sink], payload=payload, send_flags=memfd, n_fds=1),
            1,
        ),
        ("memfd flag, no fd", lambda c: send_datagram(c, [to_sink], send_flags=memfd), 0),
        ("body shorter than the send header", lambda c: _wire.command(_wire.CMD_SEND, c, bytes(12)), 0),
        ("n_fds but no fds", lambda c: send_datagram(c, [to_sink], payload=payload, n_fds=1), 0),
        ("fds but n_fds 0", lambda c: send_datagram(c, [to_sink], payload=payload, n_fds=0), 1),
        ("n_fds above the fds", lambda c: send_datagram(c, [to_sink], payload=payload, n_fds=3), 2),
        ("n_fds below the fds", lambda c: send_datagram(c, [to_sink], payload=payload, n_fds=1), 2),
    ]
    before = kernel.statistics()
    with trio.fail_after(TIMEOUT):
        for number, (what, make, n_fds) in enumerate(cases):
            with FdProbe() as probe:
                reply = await raw.call_with(make, [probe.read] * n_fds)
                assert_error(reply, errno.EINVAL, capbus.InvalidArgument, what)
                assert reply.command == _wire.CMD_SEND
                if n_fds:
                    probe.assert_no_copy_left(what)
            if number == len(cases) // 2:
                await witness.queue(2)
        stats = kernel.statistics()
        assert stats.messages_sent == before.messages_sent + 2  # the witness's
        assert stats.queued_fds == 0
        assert_queue_empty(sink)

        # The same frame builder, telling the truth, is delivered (with its fd).
        with FdProbe() as probe:
            valid = await raw.call_with(
                lambda c: send_datagram(c, [to_sink], payload=b"valid", n_fds=1), [probe.read]
            )
            assert valid.error == 0
            n_dest, delivered = _wire.SEND_RESULT.unpack_from(valid.body)
            assert (n_dest, delivered) == (1, 1)
            message = await recv_kind(sink, DATA)
            assert message.payload == b"valid" and len(message.fds) == 1
            message.close_fds()
            probe.assert_no_copy_left("delivered fd")
        assert_queue_empty(sink)

    await witness.verify()


@bounded
async def test_fds_on_commands_other_than_send_are_einval_and_closed(
    kernel: capbus.Kernel, new_peer: PeerFactory, attack: Attack
) -> None:
    witness, sink, inbox, raw, to_sink = attack.parts()
    before = kernel.statistics()
    commands = [
        (_wire.CMD_NODE_CREATE, b""),
        (_wire.CMD_HANDLE_RELEASE, U64.pack(to_sink)),
        (_wire.CMD_HANDLE_QUERY, U64.pack(to_sink)),
        (_wire.CMD_PEER_QUERY, b""),
        (_wire.CMD_SEED_TAKE, b""),
        (_wire.CMD_DISCONNECT, b""),
        (_wire.CMD_NODES_DESTROY, _wire.DESTROY.pack(0, 0)),
    ]
    with trio.fail_after(TIMEOUT):
        for kind, body in commands:
            for n_fds in (1, 3, _wire.FDS_MAX):
                with FdProbe() as probe:
                    reply = await raw.call(kind, body, fds=[probe.read] * n_fds)
                    what = f"command {kind:#x} with {n_fds} fds"
                    assert_error(reply, errno.EINVAL, capbus.InvalidArgument, what)
                    assert reply.command == kind
                    probe.assert_no_copy_left(what)
            await witness.queue(1)

        # None of them was carried out: no node made, the handle is not released, the
        # peer is still connected.
        assert kernel.statistics().nodes == before.nodes
        reply = await raw.call(_wire.CMD_HANDLE_QUERY, U64.pack(to_sink))
        assert reply.error == 0
        assert _wire.HANDLE_STATE.unpack_from(reply.body)[0] == 1
        assert kernel.statistics().peers == before.peers
        assert kernel.statistics().queued_fds == 0
        assert_queue_empty(sink)

    await witness.verify()


# -- 4. forged and stale ids -------------------------------------------------------------------


@bounded
async def test_forged_ids_get_enxio_everywhere(kernel: capbus.Kernel, new_peer: PeerFactory) -> None:
    witness = await Witness.start(new_peer)
    victim = await new_peer()
    attacker = await new_peer()
    victim_nodes = [await victim.create_node() for _ in range(8)]
    own = await attacker.create_node()
    shared = await victim.transfer(victim_nodes[0], attacker)
    held = {own.id, shared.id}
    rng = random.Random(0x1D5)
    forged = [0, 2**64 - 1, _wire.HANDLE_INVALID - 1, 1, 2, 3, own.id | 2, own.id + 8, shared.id & ~2]
    forged += [rng.getrandbits(64) for _ in range(16)]
    # Ids that are real in another peer (ids are per peer, so they must mean nothing here).
    forged += [n.id for n in victim_nodes] + [n.id | 2 for n in victim_nodes]
    forged = [f for f in dict.fromkeys(forged) if f not in held]
    assert len(forged) > 30
    before = kernel.statistics()

    async def refused(what: str, operation: Callable[[], object]) -> None:
        with pytest.raises(capbus.NoSuchHandle) as info:
            await operation()  # type: ignore[misc]
        assert info.value.errno == errno.ENXIO, what

    with trio.fail_after(TIMEOUT):
        for number, fid in enumerate(forged):
            await refused("destination", lambda f=fid: attacker.send(f, b"forged"))
            await refused("attached handle", lambda f=fid: attacker.send(shared, b"x", handles=[f]))
            await refused(
                "attached after a real one", lambda f=fid: attacker.send(shared, b"x", handles=[own, f])
            )
            await refused("release", lambda f=fid: attacker.release(f))
            await refused("destroy", lambda f=fid: attacker.destroy(f))
            await refused("destroy with a real one", lambda f=fid: attacker.destroy(own, f))
            await refused("handle_state", lambda f=fid: attacker.handle_state(f))
            await refused("transfer source", lambda f=fid: attacker.transfer(f, victim))
            # One forged destination among real ones fails alone; the real one gets it.
            results = await attacker.send([shared, fid], numbered(number, 16))
            assert results[0] is None
            assert isinstance(results[1], capbus.NoSuchHandle) and results[1].errno == errno.ENXIO
            if number % 8 == 0:
                await witness.queue(1)

        # Nothing was hurt: the victim got exactly the multicast copies, in order.
        for number in range(len(forged)):
            message = await recv_kind(victim, DATA)
            assert message.destination == victim_nodes[0]
            assert message.payload == numbered(number, 16) and message.handles == ()
        assert_queue_empty(victim)
        assert_queue_empty(attacker)
        for node in victim_nodes:
            state = await victim.handle_state(node)
            assert state.owner and not state.destroyed
        assert await attacker.handle_state(own) == capbus.HandleState(1, True, False)
        assert await attacker.handle_state(shared) == capbus.HandleState(1, False, False)
        stats = kernel.statistics()
        assert (stats.nodes, stats.handles) == (before.nodes, before.handles)

    await witness.verify()


@bounded
async def test_stale_ids_stay_dead_and_ids_are_never_reused(
    kernel: capbus.Kernel, new_peer: PeerFactory
) -> None:
    witness = await Witness.start(new_peer)
    a = await new_peer()
    b = await new_peer()
    node = await a.create_node()
    other = await a.create_node()
    to_other = await a.transfer(other, b)

    async def all_refused(peer: capbus.Peer, stale: int, target: capbus.Handle) -> None:
        operations = [
            lambda: peer.send(stale, b"stale"),
            lambda: peer.send(target, b"x", handles=[stale]),
            lambda: peer.release(stale),
            lambda: peer.destroy(stale),
            lambda: peer.handle_state(stale),
            lambda: peer.transfer(stale, witness.receiver),
        ]
        for operation in operations:
            with pytest.raises(capbus.NoSuchHandle):
                await operation()

    with trio.fail_after(TIMEOUT):
        # A remote handle, fully released, is gone for good.
        in_b = await a.transfer(node, b)
        await b.release(in_b)
        assert (await recv_kind(a, RELEASED)).destination == node
        await all_refused(b, in_b.id, to_other)
        again = await a.transfer(node, b)
        assert again.id != in_b.id, "a released id came back"
        await all_refused(b, in_b.id, to_other)
        await witness.queue(2)

        # The owner's handle after destroy and release, likewise.
        await a.destroy(node, release=True)
        assert (await recv_kind(a, DESTROYED)).destination == node
        assert (await recv_kind(b, DESTROYED)).destination == again
        await all_refused(a, node.id, other)
        await b.release(again)
        await all_refused(b, again.id, to_other)

        # Create and release many: no id ever comes back, in the owner or in a holder.
        ids_a = [node.id, other.id]
        ids_b = [in_b.id, again.id, to_other.id]
        for _ in range(4):
            batch = [await a.create_node() for _ in range(64)]
            ids_a += [h.id for h in batch]
            in_b_batch = [await a.transfer(h, b) for h in batch[:16]]
            ids_b += [h.id for h in in_b_batch]
            await a.destroy(*batch, release=True)
            for handle in in_b_batch:
                await b.release(handle)
        third = await a.create_node()
        ids_a.append(third.id)
        for _ in range(64):
            # b holds nothing else of `third`: each transfer installs a new handle, each
            # release frees it, and the next one must get a fresh id.
            handle = await a.transfer(third, b)
            ids_b.append(handle.id)
            await b.release(handle)
        assert len(set(ids_a)) == len(ids_a), "an owner id was reused"
        assert len(set(ids_b)) == len(ids_b), "a holder id was reused"
        live = {other.id, third.id, to_other.id}
        for stale in ids_a[2::7] + ids_a[-70::9]:
            if stale not in live:
                await all_refused(a, stale, other)
        for stale in ids_b[3::5]:
            if stale not in live:
                await all_refused(b, stale, to_other)

    await witness.verify()


# -- 5. fds: too many, unix sockets ------------------------------------------------------------


@bounded
async def test_too_many_fds_are_refused_and_none_leak(
    kernel: capbus.Kernel, new_peer: PeerFactory, attack: Attack
) -> None:
    witness, sink, inbox, raw, to_sink = attack.parts()
    sender = await new_peer()
    to_inbox = await sink.transfer(inbox, sender)
    before = kernel.statistics()

    with trio.fail_after(TIMEOUT):
        # FDS_MAX + 1 fds: the kernel's buffer holds FDS_MAX, it sees MSG_CTRUNC: EMSGSIZE,
        # whatever the frame claims (claiming FDS_MAX would otherwise pass the count check
        # and silently drop one), and on any command.
        for n_fds in (_wire.FDS_MAX + 1, _wire.FDS_MAX + 10):
            for claimed in (n_fds, _wire.FDS_MAX):
                with FdProbe() as probe:
                    reply = await raw.call_with(
                        lambda c, k=claimed: send_datagram(c, [to_sink], payload=b"too many", n_fds=k),
                        [probe.read] * n_fds,
                    )
                    what = f"SEND with {n_fds} fds claiming {claimed}"
                    assert_error(reply, errno.EMSGSIZE, capbus.MessageTooLarge, what)
                    probe.assert_no_copy_left(what)
            with FdProbe() as probe:
                reply = await raw.call(_wire.CMD_NODE_CREATE, fds=[probe.read] * n_fds)
                assert_error(reply, errno.EMSGSIZE, capbus.MessageTooLarge, f"NODE_CREATE with {n_fds} fds")
                probe.assert_no_copy_left(f"NODE_CREATE with {n_fds} fds")
            with FdProbe() as probe:
                with pytest.raises(capbus.MessageTooLarge) as info:
                    await sender.send(to_inbox, b"too many", fds=[probe.read] * n_fds)
                assert info.value.errno == errno.EMSGSIZE
                probe.assert_no_copy_left(f"peer API send with {n_fds} fds")
        await witness.queue(2)
        stats = kernel.statistics()
        assert stats.messages_sent == before.messages_sent + 2
        assert (stats.queued_fds, stats.nodes) == (0, before.nodes)
        assert_queue_empty(sink)

        # Exactly FDS_MAX distinct fds work, and every one is usable by the receiver.
        with ExitStack() as pipes:
            probes = [pipes.enter_context(FdProbe()) for _ in range(_wire.FDS_MAX)]
            for number, probe in enumerate(probes):
                os.write(probe.write, bytes([number]))
            await sender.send(to_inbox, b"max", fds=[p.read for p in probes])
            message = await recv_kind(sink, DATA)
            assert message.payload == b"max"
            assert len(message.fds) == _wire.FDS_MAX
            for number, fd in enumerate(message.fds):
                assert os.read(fd, 1) == bytes([number]), "fds arrived out of order or wrong"
            message.close_fds()
            for probe in probes:
                probe.assert_no_copy_left("delivered fd")
        assert_queue_empty(sink)

    await witness.verify()


@bounded
async def test_unix_sockets_cannot_be_attached(
    kernel: capbus.Kernel, new_peer: PeerFactory, closing: ExitStack
) -> None:
    witness = await Witness.start(new_peer)
    sink = await new_peer()
    inbox = await sink.create_node()
    sender = await new_peer()
    to_inbox = await sink.transfer(inbox, sender)
    before = kernel.statistics()

    with trio.fail_after(TIMEOUT):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
            left, right = socket.socketpair(socket.AF_UNIX, kind)
            with left, right, FdProbe() as probe:
                for fds in ([left], [probe.read, left], [left, probe.read]):
                    with pytest.raises(capbus.NotSupported) as info:
                        await sender.send(to_inbox, b"socket", fds=fds)
                    assert info.value.errno == errno.EOPNOTSUPP
                probe.assert_no_copy_left("pipe sent along with a unix socket")
        # A peer's own kernel connection is a unix socket too.
        with pytest.raises(capbus.NotSupported):
            await sender.send(to_inbox, b"myself", fds=[sender.fileno()])
        await witness.queue(1)
        assert kernel.statistics().messages_sent == before.messages_sent + 1
        assert_queue_empty(sink)
        await sender.send(to_inbox, b"fine")
        assert (await recv_kind(sink, DATA)).payload == b"fine"

    await witness.verify()


# -- 6. floods past quota ----------------------------------------------------------------------


@bounded
async def test_flood_from_the_same_user_stops_with_edquot_and_loses_nothing(
    kernel: capbus.Kernel, new_peer: PeerFactory
) -> None:
    size = 64 * 1024
    frame_size = MESSAGE_HEADER + size
    half = capbus.Limits().peer_bytes // 2  # one user's fair share of an idle receiver
    witness = await Witness.start(new_peer)
    victim = await new_peer()
    flooder = await new_peer()
    inbox = await victim.create_node()
    to_victim = await victim.transfer(inbox, flooder)

    def in_socket() -> int:
        return unread_bytes(victim.fileno()) // frame_size * size

    accepted = 0
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                await flooder.send(to_victim, numbered(accepted, size))
            except capbus.QuotaExceeded as error:
                refused = error
                break
            accepted += 1
            assert accepted * size <= 16 * MiB, "the kernel never stopped the flood"
            if accepted % 16 == 0:
                await witness.queue(1)
        assert refused.errno == errno.EDQUOT
        with pytest.raises(capbus.QuotaExceeded):
            await flooder.send(to_victim, numbered(accepted, size))

        # Every accepted byte is charged in the kernel or sits in the victim's socket.
        stats = await wait_for_statistics(kernel, lambda s: s.queued_bytes + in_socket() == accepted * size)
        assert unread_bytes(victim.fileno()) % frame_size == 0
        assert stats.queued_bytes + in_socket() <= 16 * MiB
        assert stats.queued_bytes <= half, "one user took more than half of an idle receiver's quota"
        assert stats.queued_bytes + size > half, "EDQUOT although the message fitted the fair share"

        # Others are served while the victim is full.
        await witness.round_trip()

        for index in range(accepted):
            message = await recv_kind(victim, DATA)
            assert message.payload == numbered(index, size), f"accepted message {index} lost or damaged"
        assert_queue_empty(victim)
        await wait_for_statistics(kernel, lambda s: s.queued_bytes == 0)
        # The quota is free again.
        await flooder.send(to_victim, numbered(accepted, size))
        assert (await recv_kind(victim, DATA)).payload == numbered(accepted, size)

    await witness.verify()


@bounded
async def test_flood_from_another_uid_is_held_to_half_and_others_still_get_through() -> None:
    needs_root("it runs the attacker as uid 65534 to check per-uid quotas")
    limits = capbus.Limits(peer_bytes=1 * MiB)
    size = 64 * 1024
    frame_size = MESSAGE_HEADER + size
    cap = 4 * limits.peer_bytes // size

    async with kernel_with_peers(limits) as (kernel, new_peer):
        witness = await Witness.start(new_peer)
        victim = await new_peer()
        await victim.want_metadata()
        inbox = await victim.create_node()
        # Set up the second uid's sender now: once the flood is queued, no call may be made on
        # the victim (a call reads its socket, which would make room in it).
        owner = await new_peer()
        to_victim_root = await victim.transfer(inbox, owner)
        attacker = capbus.Peer.from_socket(await victim.create_peer(b"", handles=[inbox]))
        seed = await attacker.take_seed()
        (to_victim,) = seed.handles
        with attacker.detach() as raw, trio.fail_after(TIMEOUT):
            flood = [sys.executable, "-I", "-c", child_script(_FLOOD_CHILD)]
            result = await trio.run_process(
                as_user([*flood, str(raw.fileno()), str(to_victim.id), str(size), str(cap)], NOBODY, NOBODY),
                pass_fds=[raw.fileno()],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert result.returncode == 0, result.stderr.decode()
        accepted, first, retry, uid, gid = map(int, result.stdout.split())
        assert (uid, gid) == (NOBODY, NOBODY)
        assert accepted < cap, "the kernel never stopped a flood from another uid"
        assert first == errno.EDQUOT, f"flood stopped by {errno.errorcode.get(first, first)}, not EDQUOT"
        assert retry == errno.EDQUOT

        def in_socket() -> int:
            return unread_bytes(victim.fileno()) // frame_size * size

        with trio.fail_after(TIMEOUT):
            stats = await wait_for_statistics(
                kernel, lambda s: s.queued_bytes + in_socket() == accepted * size
            )
        foreign = stats.queued_bytes
        half = limits.peer_bytes // 2
        assert half - size < foreign <= half, f"uid {NOBODY} has {foreign} bytes queued, its share is {half}"

        # A second uid (root, this test) can still send to the same receiver, up to half of
        # what the first one left free.
        sent = 0
        with trio.fail_after(TIMEOUT):
            while True:
                try:
                    await owner.send(to_victim_root, numbered(1000 + sent, size))
                except capbus.QuotaExceeded as error:
                    assert error.errno == errno.EDQUOT
                    break
                sent += 1
                assert sent <= cap
        assert sent >= 1, "the other uid's flood left this uid no room at all"
        mine = kernel.statistics().queued_bytes - foreign
        assert mine == sent * size
        assert mine <= (limits.peer_bytes - foreign) // 2 < mine + size

        # Everything accepted arrives, in order, with the real sender's credentials.
        with trio.fail_after(TIMEOUT):
            for index in range(accepted):
                message = await recv_kind(victim, DATA)
                assert message.payload == numbered(index, size), f"foreign message {index} lost or damaged"
                assert message.sender is not None
                assert (message.sender.uid, message.sender.gid) == (NOBODY, NOBODY)
            for index in range(sent):
                message = await recv_kind(victim, DATA)
                assert message.payload == numbered(1000 + index, size)
                assert message.sender is not None and message.sender.uid == 0
            assert_queue_empty(victim)
        await witness.verify()


# -- 7. a peer killed mid-send -----------------------------------------------------------------


@bounded
async def test_peer_killed_mid_send_leaves_a_clean_prefix(
    kernel: capbus.Kernel, new_peer: PeerFactory, tmp_path: Path
) -> None:
    kill_after = 300
    size = 200
    witness = await Witness.start(new_peer)
    receiver = await new_peer()
    inbox = await receiver.create_node()
    peers_before = kernel.statistics().peers
    child = capbus.Peer.from_socket(await receiver.create_peer(b"", handles=[inbox]))
    (to_receiver,) = (await child.take_seed()).handles
    progress = os.open(tmp_path / "progress", os.O_RDWR | os.O_CREAT, 0o600)
    received: list[capbus.Message] = []
    try:
        os.pwrite(progress, U64.pack(0), 0)
        with child.detach() as raw:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-I", "-c", child_script(_STREAM_CHILD)]
                + [str(raw.fileno()), str(to_receiver.id), str(progress), str(size)],
                pass_fds=[raw.fileno(), progress],
            )
        try:
            with trio.fail_after(TIMEOUT):
                while len(received) < kill_after:
                    received.append(await recv_kind(receiver, DATA))
                    if len(received) == kill_after // 2:
                        await witness.queue(2)
                process.kill()
                assert await process.wait() == -signal.SIGKILL, "the sender stopped before it was killed"
                accepted = U64.unpack(os.pread(progress, 8, 0))[0]
                # Its stream ends, then its death shows: its node is destroyed (we hold a
                # handle) and its handle to our inbox is released (it held the only one).
                notes: dict[capbus.MessageKind, capbus.Message] = {}
                while len(notes) < 2:
                    message = await receiver.recv()
                    if message.kind is DATA:
                        assert not notes, "data arrived after the sender's death was notified"
                        received.append(message)
                    else:
                        assert message.kind in (DESTROYED, RELEASED) and message.kind not in notes, message
                        notes[message.kind] = message
                await wait_for_statistics(kernel, lambda s: s.peers == peers_before)
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
    finally:
        os.close(progress)

    indices = [index_of(m) for m in received]
    assert indices == list(range(len(received))), "gap, duplicate or reordering in the dead peer's stream"
    for index, message in enumerate(received):
        assert message.payload == numbered(index, size), f"message {index} arrived damaged"
        assert message.destination == inbox
    assert accepted <= len(received) <= accepted + 1, (
        f"the sender had {accepted} messages accepted, the receiver got {len(received)}"
    )
    (its_node,) = received[0].handles
    assert its_node.is_valid and not its_node.is_owner
    assert all(m.handles == () for m in received[1:])
    assert notes[DESTROYED].destination == its_node, "the holder of the dead peer's node was not told"
    assert notes[RELEASED].destination == inbox
    assert (await receiver.handle_state(its_node)).destroyed
    assert_queue_empty(receiver)
    await witness.verify()


# -- 8. a peer that never reads its replies -----------------------------------------------------


async def flood_until_paused(
    kernel: capbus.Kernel,
    witness: Witness,
    sock: socket.socket,
    frame: Callable[[int], bytes],
    consumed: Callable[[capbus.KernelStatistics], int],
    reply_size: int,
) -> int:
    """Writes ``frame(0)``, ``frame(1)``, ... to a peer that never reads its replies (each
    command's reply is ``reply_size`` bytes), until the kernel stops reading it although it
    has commands waiting. ``consumed`` counts the commands the kernel carried out. Returns
    how many were written."""
    cap = 4 * (REPLY_BACKLOG_MAX // reply_size)
    written = 0

    async def flood() -> None:
        nonlocal written
        while written < cap:
            try:
                sock.send(frame(written))
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            written += 1
            if written % 256 == 0:
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        # A kernel that reads a peer with input waiting always reads it during a round trip
        # of others (epoll is level-triggered), so: until a round trip leaves it unread.
        while True:
            sent = written
            before = consumed(kernel.statistics())
            await witness.round_trip()
            after = consumed(kernel.statistics())
            # Reply bytes the kernel holds for it: all it answered, less what sits in its socket.
            held = after * reply_size - unread_bytes(sock.fileno())
            assert held <= REPLY_BACKLOG_MAX + reply_size, (
                f"the kernel holds {held} reply bytes for a peer that reads none, "
                f"more than CAPBUS_REPLY_BACKLOG_MAX ({REPLY_BACKLOG_MAX}): it kept reading"
            )
            if sent > before and after == before:
                break
        nursery.cancel_scope.cancel()
    return written


@bounded
async def test_peer_that_never_reads_replies_is_paused_while_others_are_served(
    kernel: capbus.Kernel, new_peer: PeerFactory, closing: ExitStack
) -> None:
    witness = await Witness.start(new_peer)
    raw = closing.enter_context(RawPeer(kernel.socket_for_child()))
    reply_size = HEADER + _wire.REPLY.size + U64.size  # the reply to NODE_CREATE
    base = kernel.statistics().nodes

    def consumed(stats: capbus.KernelStatistics) -> int:
        return stats.nodes - base  # each NODE_CREATE made one node

    with trio.fail_after(TIMEOUT):
        written = await flood_until_paused(
            kernel,
            witness,
            raw.sock,
            lambda index: _wire.command(_wire.CMD_NODE_CREATE, index + 1),
            consumed,
            reply_size,
        )
        paused = kernel.statistics()
        assert written > consumed(paused), "the bad peer has no commands waiting"
        # The backlog is counted in heap bytes: a reply's entry, header and the allocator's
        # overhead, a few times the reply's own bytes (docs/wire-format.md).
        replies = consumed(paused) * reply_size
        assert REPLY_BACKLOG_MAX // 8 < replies <= REPLY_BACKLOG_MAX, f"paused at {replies} reply bytes"
        # Others are served, and the bad peer stays paused.
        await witness.queue(5)
        for _ in range(3):
            await witness.round_trip()
        assert kernel.statistics().nodes == paused.nodes, "the kernel read a peer past its reply backlog"

        # Once it reads, the kernel resumes it: every command gets its one reply, in order.
        for cookie in range(1, written + 1):
            reply = await raw.reply(bufsize=256)
            assert (reply.cookie, reply.command, reply.error) == (cookie, _wire.CMD_NODE_CREATE, 0)
        assert kernel.statistics().nodes == base + written
        assert (await raw.call(_wire.CMD_PEER_QUERY)).error == 0

    await witness.verify()


@bounded
async def test_paused_peer_that_hangs_up_has_everything_it_sent_carried_out() -> None:
    """Beyond the brief's case 8, from loop.c's own promise: "A peer that hung up is read to
    the end at once: everything it sent before it went away is carried out (no budget, no
    reply backlog: it reads nothing any more)". A paused peer always hangs up with replies
    unread, which Linux reports to the kernel's end as a one-shot ECONNRESET before the
    queued datagrams; that must not cost the datagrams."""
    # Room for every message the flood makes, so each send it wrote must be delivered.
    limits = capbus.Limits(peer_messages=1 << 20, peer_bytes=1 << 30, user_bytes=1 << 30)
    async with kernel_with_peers(limits) as (kernel, new_peer):
        base = kernel.statistics().messages_sent
        witness = await Witness.start(new_peer)
        sink = await new_peer()
        inbox = await sink.create_node()
        raw, (to_sink,) = await RawPeer.seeded(sink, [inbox])
        reply_size = HEADER + _wire.REPLY.size + _wire.SEND_RESULT.size + 8  # SEND to one destination

        def consumed(stats: capbus.KernelStatistics) -> int:
            return stats.messages_sent - base - witness.count  # the witness sends too

        with raw, trio.fail_after(TIMEOUT):
            written = await flood_until_paused(
                kernel,
                witness,
                raw.sock,
                lambda index: send_datagram(index + 1, [to_sink], payload=numbered(index, 8)),
                consumed,
                reply_size,
            )
            carried_out = consumed(kernel.statistics())
            assert written > carried_out, "the paused peer has no sends waiting"
        # It hung up (with its replies unread, as a paused peer must have).
        with trio.fail_after(TIMEOUT):
            received = 0
            while True:
                message = await sink.recv()
                if message.kind is not DATA:
                    assert message.kind is RELEASED  # its handle went with it
                    break
                assert message.payload == numbered(received, 8), f"send {received} lost or damaged"
                received += 1
            assert received == written, (
                f"the peer wrote {written} sends before hanging up; {carried_out} were carried out while it "
                f"was paused and only {received - carried_out} of the {written - carried_out} waiting ones "
                "after it hung up: the rest were dropped"
            )
            assert_queue_empty(sink)
        await witness.verify()


async def test_a_frame_written_before_the_kernel_took_the_connection_is_the_connections() -> None:
    """A frame written right after connect, before the kernel accepted the connection and set
    SO_PASSCRED on its end, carries no credentials: Linux reports pid 0 and the overflow uid
    (65534). It is the connection's own, not nobody's: such a frame must not charge the peer,
    or what it sends, to uid 65534 (with the connection charged to whoever writes to it, one
    uid's peers would otherwise escape its budgets by writing first)."""
    async with capbus.open_kernel() as kernel:
        theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            theirs.send(_wire.command(_wire.CMD_PEER_QUERY, 1))  # before the kernel has it
            assert _kernel.lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), -1, -1, -1) == 0
            with trio.fail_after(TIMEOUT):
                reply = await trio.to_thread.run_sync(theirs.recv, _wire.FRAME_MAX + 1)
            peer = capbus.Peer.from_socket(theirs.detach())
            try:
                with trio.fail_after(TIMEOUT):
                    assert (await peer.info()).uid == os.getuid()
            finally:
                await peer.aclose()
        header = _wire.FRAME.size + _wire.REPLY.size
        assert struct.unpack_from("<16sI", reply, header)[1] == os.getuid()
