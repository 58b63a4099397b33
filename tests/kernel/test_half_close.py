"""A peer that shuts down only its writing side (shutdown(SHUT_WR)) is half-closed, not gone
(finding F5: such a peer lost the replies to commands it had sent: 1,000 commands, 556
replies). It still gets every reply and every message queued for it, and messages sent to it
later, until it closes; then it is disconnected like any other."""

from __future__ import annotations

import socket

import trio

import capbus
from capbus import _wire
from capbus.testing import wait_for_statistics

TIMEOUT = 20
FRAME = _wire.FRAME


def _frame(command: int, cookie: int, body: bytes = b"") -> bytes:
    return FRAME.pack(FRAME.size + len(body), command, 0, cookie) + body


def read_frames(sock: socket.socket, count: int) -> list[tuple[int, int, bytes]]:
    """(type, cookie, body) of the next ``count`` frames."""
    frames = []
    for _ in range(count):
        data = sock.recv(_wire.FRAME_MAX + 1)
        assert data, "the kernel hung up"
        size, kind, _flags, cookie = FRAME.unpack_from(data)
        assert size == len(data)
        frames.append((kind, cookie, data[FRAME.size :]))
    return frames


async def test_half_closed_peer_gets_every_reply_and_message(
    kernel: capbus.Kernel, new_peer: capbus.testing.PeerFactory
) -> None:
    commands = 1000
    raw = kernel.socket_for_child()
    raw.settimeout(TIMEOUT)
    with raw:
        # One node, then 1,000 commands sent before the half-close and none of their replies
        # read yet.
        raw.send(_frame(_wire.CMD_NODE_CREATE, 1))
        ((kind, cookie, body),) = read_frames(raw, 1)
        assert (kind, cookie) == (_wire.FRAME_REPLY, 1)
        node = _wire.U64.unpack_from(body, _wire.REPLY.size)[0]
        other = await new_peer()
        raw.send(_frame(_wire.CMD_HANDLE_TRANSFER, 2, _wire.TRANSFER.pack(node, await other._peer_key())))
        ((kind, cookie, body),) = read_frames(raw, 1)
        assert (kind, cookie, _wire.REPLY.unpack_from(body)[0]) == (_wire.FRAME_REPLY, 2, 0)
        to_node = capbus.Handle(other, _wire.U64.unpack_from(body, _wire.REPLY.size)[0])
        first = 3
        for cookie in range(first, first + commands):
            raw.send(_frame(_wire.CMD_PEER_QUERY, cookie))
        await other.send(to_node, b"before")
        raw.shutdown(socket.SHUT_WR)
        with trio.fail_after(TIMEOUT):
            # The kernel has read everything up to the end of file, and kept the peer.
            await wait_for_statistics(kernel, lambda s: s.peers_half_closed == 1 and s.peers == 2)
        # Sent after the half-close: still delivered.
        await other.send(to_node, b"after")

        frames = read_frames(raw, commands + 2)
        replies = [(cookie, body) for kind, cookie, body in frames if kind == _wire.FRAME_REPLY]
        messages = [body for kind, _, body in frames if kind == _wire.FRAME_MESSAGE]
        assert [cookie for cookie, _ in replies] == list(range(first, first + commands)), "a reply was lost"
        assert all(_wire.REPLY.unpack_from(body)[0] == 0 for _, body in replies)
        assert len(messages) == 2
        assert messages[0].endswith(b"before") and messages[1].endswith(b"after")
    with trio.fail_after(TIMEOUT):
        # Closing it for good disconnects it: the node's holder sees it destroyed.
        message = await other.recv()
        assert message.kind is capbus.MessageKind.NODE_DESTROYED
        await wait_for_statistics(kernel, lambda s: s.peers == 1 and s.peers_half_closed == 0)
