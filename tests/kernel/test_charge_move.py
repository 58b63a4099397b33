"""A connection is charged to the uid that writes to it (cb_peer_charge_to): the move is a new
charge for that uid, checked as one. When it does not fit, the writer's frame is refused
with EDQUOT and the connection stays charged as it was. Real uids: needs root."""

from __future__ import annotations

import errno
import socket

import trio
from capbus._kernel import lib

import capbus
from capbus import _wire
from capbus.testing import wait_for_statistics

from .other_uid import needs_root, python_as

ATTACKER = 1001
TIMEOUT = 30
COOKIE = 1 << 40


def adopt(kernel: capbus.Kernel, uid: int) -> socket.socket:
    """A new peer of the embedded kernel, charged to ``uid`` for good."""
    theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), uid, uid, 0) == 0
    return theirs


def reply_to(sock: socket.socket, cookie: int) -> tuple[int, bytes]:
    """Reads the connection up to the reply to ``cookie``: its error and body."""
    while True:
        data = sock.recv(_wire.FRAME_MAX + 1)
        assert data, "the kernel hung up"
        _, kind, _, got = _wire.FRAME.unpack_from(data)
        if kind == _wire.FRAME_REPLY and got == cookie:
            error = _wire.REPLY.unpack_from(data, _wire.FRAME.size)[0]
            return error, data[_wire.FRAME.size + _wire.REPLY.size :]


def query(sock: socket.socket, cookie: int) -> tuple[int, int | None]:
    """PEER_QUERY on a raw connection: the error, and the uid it reports."""
    sock.send(_wire.command(_wire.CMD_PEER_QUERY, cookie))
    error, body = reply_to(sock, cookie)
    return error, _wire.QUERY.unpack_from(body)[1] if error == 0 else None


# As another uid: one PEER_QUERY on the connection it is given, read up to its reply; prints
# the error and the uid the reply reports (-1 on an error).
_QUERY = f"""
from capbus import _wire
sock = socket.socket(fileno=int(sys.argv[1]))
sock.send(_wire.command(_wire.CMD_PEER_QUERY, {COOKIE}))
while True:
    data = sock.recv(_wire.FRAME_MAX + 1)
    _, kind, _, cookie = _wire.FRAME.unpack_from(data)
    if kind == _wire.FRAME_REPLY and cookie == {COOKIE}:
        break
error = _wire.REPLY.unpack_from(data, _wire.FRAME.size)[0]
print(error, _wire.QUERY.unpack_from(data, _wire.FRAME.size + _wire.REPLY.size)[1] if error == 0 else -1)
"""


async def run_as(uid: int, script: str, sock: socket.socket) -> list[int]:
    """Runs ``script`` as ``uid`` on the connection ``sock``: the numbers it prints."""
    with trio.fail_after(TIMEOUT):
        process = await trio.run_process(
            [*python_as(uid, script), str(sock.fileno())],
            pass_fds=(sock.fileno(),),
            capture_stdout=True,
            cwd="/",
        )
    return [int(word) for word in process.stdout.split()]


async def query_as(uid: int, sock: socket.socket) -> tuple[int, int | None]:
    """PEER_QUERY on ``sock`` written by a process of ``uid``: the error, and the uid it reports."""
    error, got = await run_as(uid, _QUERY, sock)
    return error, got if got >= 0 else None


async def test_a_connection_does_not_move_to_a_uid_at_its_peers_per_user() -> None:
    needs_root("it writes to connections as another uid")
    async with capbus.open_kernel(limits=capbus.Limits(peers_per_user=2)) as kernel:
        own = [adopt(kernel, ATTACKER) for _ in range(2)]  # the uid's whole peers_per_user
        connection = kernel.socket_for_child()  # this process's uid's
        try:
            assert await query_as(ATTACKER, connection) == (errno.EDQUOT, None)
            assert query(connection, 1) == (0, 0), "a refused move left the connection charged elsewhere"
            own.pop().close()
            with trio.fail_after(TIMEOUT):
                await wait_for_statistics(kernel, lambda s: s.peers == 2)
            assert await query_as(ATTACKER, connection) == (0, ATTACKER), "it fits now: it moves"
        finally:
            connection.close()
            for sock in own:
                sock.close()


async def test_a_connection_with_a_backlog_does_not_move_to_a_uid_past_half_its_user_backlog() -> None:
    needs_root("it writes to connections as another uid")
    async with capbus.open_kernel(limits=capbus.Limits(user_backlog=16384)) as kernel:
        # A peer of the uid that never reads its replies: the uid goes past its user_backlog.
        gated = adopt(kernel, ATTACKER)
        gated.setblocking(False)
        frame = _wire.command(_wire.CMD_PEER_QUERY, 1)
        with trio.fail_after(TIMEOUT):
            while kernel.statistics().peers_gated == 0:
                try:
                    gated.send(frame)
                except BlockingIOError:  # until the kernel reads it again, or gates it
                    async with trio.open_nursery() as nursery:

                        async def writable() -> None:
                            await trio.lowlevel.wait_writable(gated)
                            nursery.cancel_scope.cancel()

                        async def gated_now() -> None:
                            await wait_for_statistics(kernel, lambda s: s.peers_gated > 0)
                            nursery.cancel_scope.cancel()

                        nursery.start_soon(writable)
                        nursery.start_soon(gated_now)
        # A connection of this process's uid (as socket_for_child makes it) whose socket takes
        # only a few frames: the replies it does not read yet are soon its backlog, queued
        # before the frame the other uid writes next is read.
        connection, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), -1, -1, -1) == 0
        try:
            for cookie in range(2, 40):
                connection.send(_wire.command(_wire.CMD_PEER_QUERY, cookie))
            assert await query_as(ATTACKER, connection) == (errno.EDQUOT, None)
            assert query(connection, 1) == (0, 0), "a refused move left the connection charged elsewhere"
        finally:
            connection.close()
            gated.close()


# As another uid: NODE_CREATE on the connection it is given until the kernel refuses one;
# prints how many it made and why the next one was refused.
_NODES = """
from capbus import _wire
sock = socket.socket(fileno=int(sys.argv[1]))
made = 0
while True:
    sock.send(_wire.command(_wire.CMD_NODE_CREATE, made + 1))
    data = sock.recv(_wire.FRAME_MAX + 1)
    error = _wire.REPLY.unpack_from(data, _wire.FRAME.size)[0]
    if error:
        break
    made += 1
print(made, error)
"""


def create_nodes(sock: socket.socket) -> tuple[int, int]:
    """NODE_CREATE on a raw connection of this process until one is refused: how many, why."""
    made = 0
    while True:
        sock.send(_wire.command(_wire.CMD_NODE_CREATE, made + 1))
        error, _ = reply_to(sock, made + 1)
        if error:
            return made, error
        made += 1


async def test_handles_stay_charged_to_the_uid_they_were_made_for() -> None:
    """Handles do not move with their connection: the nodes made on a connection before it
    is handed over stay its maker's (the new uid does not pay for them, the maker does not
    get its budget back), and those made after are the new uid's (it cannot spend its
    maker's budget)."""
    needs_root("it writes to connections as another uid")
    async with capbus.open_kernel(limits=capbus.Limits(user_handles=6)) as kernel:
        connection = kernel.socket_for_child()  # this process's uid's
        mine = kernel.socket_for_child()
        try:
            assert create_nodes(connection)[0] == 6  # this uid's whole user_handles
            assert await run_as(ATTACKER, _NODES, connection) == [6, errno.EDQUOT], (
                "the uid given the connection pays for its own nodes only"
            )
            assert create_nodes(mine) == (0, errno.EDQUOT), (
                "the nodes made before the move are still this uid's"
            )
        finally:
            connection.close()
            mine.close()


# As another uid: one PEER_QUERY on the connection it is given, whose reply it never reads.
_WRITE = """
from capbus import _wire
socket.socket(fileno=int(sys.argv[1])).send(_wire.command(_wire.CMD_PEER_QUERY, 7))
"""


async def test_a_refusal_left_unread_stays_in_its_writers_backlog_when_the_connection_moves() -> None:
    """A refused writer's reply counts in the writer's backlog, not the maker's, and stays
    there when the connection moves to the writer later: once everything is read, neither
    uid has a backlog left (a count gone wrong gates the uid)."""
    needs_root("it writes to connections as another uid")
    async with capbus.open_kernel(limits=capbus.Limits(peers_per_user=2)) as kernel:
        own = [adopt(kernel, ATTACKER) for _ in range(2)]  # the uid's whole peers_per_user
        mine = kernel.socket_for_child()
        # This process's uid's, with a socket that takes only a few frames: what the kernel
        # queues for it next waits in its backlog.
        connection, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), -1, -1, -1) == 0
        for sock in (*own, mine):
            sock.settimeout(TIMEOUT / 3)  # a gated peer is never answered
        try:
            for cookie in range(2, 40):
                connection.send(_wire.command(_wire.CMD_PEER_QUERY, cookie))
            with trio.fail_after(TIMEOUT):
                # Not a synchronisation: what it was sent is read within microseconds.
                await trio.sleep(0.2)
                before = kernel.statistics().memory_bytes
                assert await run_as(ATTACKER, _WRITE, connection) == []
                await wait_for_statistics(kernel, lambda s: s.memory_bytes > before)  # refused, queued
                own.pop().close()
                await wait_for_statistics(kernel, lambda s: s.peers == 3)
            # It moves now; the writer reads everything queued up to its reply.
            assert await query_as(ATTACKER, connection) == (0, ATTACKER)
            assert query(mine, 1) == (0, 0), "the maker's uid is gated: its backlog count went wrong"
            assert query(own[0], 1) == (0, ATTACKER), (
                "the writer's uid is gated: its backlog count went wrong"
            )
            assert kernel.statistics().peers_gated == 0
        finally:
            connection.close()
            mine.close()
            for sock in own:
                sock.close()
