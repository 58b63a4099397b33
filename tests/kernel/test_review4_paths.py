"""Review round 4: the paths of its fixes that the attacks do not take."""

from __future__ import annotations

import os
import socket

import trio
from capbus._kernel import lib

import capbus
from capbus import _wire

TIMEOUT = 30


def frames_of(raw: socket.socket) -> list[bytes]:
    """Every frame the kernel has written to `raw` so far."""
    out = []
    while True:
        try:
            out.append(raw.recv(65536))
        except BlockingIOError:
            return out


async def test_a_handle_released_before_its_destroy_note_is_read_takes_the_note_with_it() -> None:
    """bus1: a holder that releases its handle before reading its NODE_DESTROY never sees it.
    The note still queued in the kernel (the holder's socket is full) goes with the handle, and
    the note before it in the same transaction no longer says CONTINUE."""
    with trio.fail_after(TIMEOUT):
        async with capbus.open_kernel() as kernel:
            theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # a few frames fill it
            assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), os.getuid(), os.getgid(), 0) == 0
            holder = capbus.Peer.from_socket(os.dup(theirs.fileno()))
            await holder.info()  # its key, for transfers
            theirs.setblocking(False)
            async with await kernel.connect() as owner:
                nodes = [await owner.create_node() for _ in range(3)]
                held = [await owner.transfer(node, holder) for node in nodes]
                # Fill the holder's socket with replies it does not read yet.
                for cookie in range(1, 65):
                    theirs.send(_wire.command(_wire.CMD_PEER_QUERY, cookie))
                await trio.sleep(0.2)
                await owner.destroy(*nodes, release=True)
                cookie = 1000
                theirs.send(_wire.command(_wire.CMD_HANDLE_RELEASE, cookie, held[2].id.to_bytes(8, "little")))
                await trio.sleep(0.2)
                notes = []
                for _ in range(200):
                    for frame in frames_of(theirs):
                        _size, kind, _flags, _cookie = _wire.FRAME.unpack_from(frame)
                        if kind == _wire.FRAME_MESSAGE:
                            notes.append(_wire.MESSAGE.unpack_from(frame, _wire.FRAME.size))
                    await trio.sleep(0.01)
                assert kernel.statistics().handles == 2
                assert [(note[0], note[3]) for note in notes] == [
                    (_wire.MSG_NODE_DESTROY, held[0].id),
                    (_wire.MSG_NODE_DESTROY, held[1].id),
                ]
                assert [note[1] & _wire.MSG_FLAG_CONTINUE for note in notes] == [_wire.MSG_FLAG_CONTINUE, 0]
