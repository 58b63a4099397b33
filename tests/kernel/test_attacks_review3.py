"""Attacks on the kernel from outside, third review round (the retry walk over gated peers,
refused connection moves, handles in queued messages, and the rest of the surface).

Each test reproduces one attack that works against the kernel as it is and fails until the
kernel is fixed; its docstring gives the severity, the harm and the suggested fix. Attacks
tried in this round that did not work are listed in the round's report, not here.
"""

from __future__ import annotations

import socket

import trio
from capbus._kernel import lib

import capbus

from .other_uid import needs_root, run_as
from .test_attacks_review import _FLOODING_CHILD, _parents_uid_still_served

ATTACKER = 1001
TIMEOUT = 60


def adopt(kernel: capbus.Kernel, uid: int) -> socket.socket:
    """A new peer of the embedded kernel, charged to ``uid`` for good."""
    theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert lib.capbus_kernel_adopt(kernel._kernel, ours.detach(), uid, uid, 0) == 0
    return theirs


async def test_children_refused_a_move_cannot_stop_their_parents_uid_on_the_connections_it_made() -> None:
    """Severity MEDIUM. A connection is charged to the uid that writes to it
    (cb_peer_charge_to), but when that move does not fit the writer's uid (EDQUOT: the uid is
    at its peers_per_user, past half its user_backlog, or at its fair share of kernel fds)
    the frame is refused with an EDQUOT *reply*, and that reply is queued on the connection,
    charged to the backlog of the uid that made it. The writer, who can put its own uid in
    that state at will (here: it holds its whole peers_per_user), then floods the
    connections its parent handed it with frames it never reads the answers of: every
    connection's backlog fills to 1 MiB charged to the parent's uid, and past 17 of them
    (user_backlog, 16 MiB) no peer of the parent's uid is read any more, the parent's own
    included. This is test_attacks_review's children attack again, through the refusal path
    that the fix of round one left charged to the maker.

    Fix: do not let a writer whose move is refused queue anything charged to the maker: after
    the first refused frame stop reading the connection from that writer (doom it, or treat
    it like a protocol violation with its count), or charge the refusal replies to the
    writer's uid (its backlog, not the maker's), or answer all refusals with one reply."""
    needs_root()
    limit = 32
    async with capbus.open_kernel(limits=capbus.Limits(peers_per_user=limit)) as kernel:
        # The attacker's uid at its peers_per_user: no connection can move to it.
        own = [adopt(kernel, ATTACKER) for _ in range(limit)]
        parent = await kernel.connect()
        sibling = await kernel.connect()
        connections = [await parent.create_peer(b"child") for _ in range(12)]
        connections += [kernel.socket_for_child() for _ in range(12)]
        try:
            child = await run_as(
                ATTACKER,
                _FLOODING_CHILD,
                "0",
                *(str(c.fileno()) for c in connections),
                pass_fds=tuple(c.fileno() for c in connections),
            )
        finally:
            for connection in connections:
                connection.close()
        try:
            await _parents_uid_still_served(kernel, parent, sibling, child, "children refused a move")
        finally:
            for sock in own:
                sock.close()
