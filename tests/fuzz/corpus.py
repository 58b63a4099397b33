"""Seed inputs for the libFuzzer harness (dispatch_fuzzer.c), written from scenarios rather
than kept as binary blobs: valid traffic for every command, then the ways each goes wrong.

    python tests/fuzz/corpus.py DIRECTORY

The record encoding is described at the top of dispatch_fuzzer.c. Handle ids are predictable
on the harness's fresh kernel ((counter << 3) | MANAGED | REMOTE per peer, docs/wire-format.md),
so :class:`Scenario` models them and the seeds name real handles, which the fuzzer then mutates.
The layouts come from capbus._wire, so the seeds follow uapi.h.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from pathlib import Path

from capbus import _wire

# Must match dispatch_fuzzer.c.
DISPATCH, DISPATCH_KEY, DRAIN, HANGUP, CLOSE, MONITOR = 0, 3, 4, 5, 6, 7
FLAG_RAW_SIZE, FLAG_FOREIGN, FLAG_CTRUNC, FLAG_OVERSIZED, FLAG_NO_SETTLE = 0x01, 0x02, 0x04, 0x08, 0x10
PIPE, MEMFD_SEALED, MEMFD_LOOSE, MEMFD_HUGE, UNIX_SOCKET, OWN_CONNECTION, EVENTFD, MIXED = range(8)
COUNT_FDS_MAX, COUNT_TOO_MANY = 30, 31
INITIAL_SLOTS = 4
SLOTS_MAX = 8


def fdspec(kind: int, count: int) -> int:
    """The fdspec byte for ``count`` fds (0 to 29, FDS_MAX, or FDS_MAX + 1)."""
    if count == _wire.FDS_MAX:
        code = COUNT_FDS_MAX
    elif count == _wire.FDS_MAX + 1:
        code = COUNT_TOO_MANY
    else:
        assert 0 <= count < COUNT_FDS_MAX, count
        code = count
    return code << 3 | kind


class Scenario:
    """One input: records, plus a model of the handle ids each slot's peer will be given."""

    def __init__(self, *, tiny_limits: bool = False) -> None:
        self.data = bytearray([1 if tiny_limits else 0])
        self.cookie = 0
        self.slots = INITIAL_SLOTS
        self.counters = [0] * SLOTS_MAX
        self.held: list[dict[str, int]] = [{} for _ in range(SLOTS_MAX)]
        self.owner: dict[str, int] = {}

    # -- records -------------------------------------------------------------------------------

    def record(self, slot: int, action: int, datagram: bytes = b"", *, flags: int = 0, spec: int = 0) -> None:
        assert len(datagram) < 1 << 16
        self.data += bytes([action << 3 | slot, flags, spec]) + struct.pack("<H", len(datagram)) + datagram

    def command(
        self,
        slot: int,
        kind: int,
        body: bytes = b"",
        *,
        fds: tuple[int, int] = (PIPE, 0),
        flags: int = 0,
        header_flags: int = 0,
        key_of: int | None = None,
    ) -> None:
        """A command frame from ``slot``; ``key_of`` puts that slot's peer key at byte 24."""
        self.cookie += 1
        frame = _wire.FRAME.pack(_wire.FRAME.size + len(body), kind, header_flags, self.cookie) + body
        if key_of is None:
            self.record(slot, DISPATCH, frame, flags=flags, spec=fdspec(*fds))
        else:
            self.record(slot, DISPATCH_KEY, frame, flags=flags, spec=key_of)

    def drain(self, slot: int) -> None:
        self.record(slot, DRAIN)

    # -- the id model ----------------------------------------------------------------------------

    def _install(self, slot: int, node: str) -> int:
        if node in self.held[slot]:
            return self.held[slot][node]
        self.counters[slot] += 1
        remote = self.owner[node] != slot
        handle = (
            self.counters[slot] << 3 | _wire.HANDLE_FLAG_MANAGED | (_wire.HANDLE_FLAG_REMOTE if remote else 0)
        )
        self.held[slot][node] = handle
        return handle

    def id(self, slot: int, node: str) -> int:
        return self.held[slot][node]

    # -- commands that change the model -----------------------------------------------------------

    def create_node(self, slot: int, node: str) -> int:
        self.owner[node] = slot
        self.command(slot, _wire.CMD_NODE_CREATE)
        return self._install(slot, node)

    def create_monitor(self, slot: int, node: str) -> int:
        self.owner[node] = slot
        self.command(slot, _wire.CMD_MONITOR_CREATE)
        return self._install(slot, node)

    def transfer(self, slot: int, node: str, to: int) -> int:
        body = _wire.TRANSFER.pack(self.id(slot, node), b"\0" * 16)
        self.command(slot, _wire.CMD_HANDLE_TRANSFER, body, key_of=to)
        return self._install(to, node)

    def send(
        self,
        slot: int,
        destinations: Sequence[int],
        payload: bytes = b"",
        *,
        handles: Sequence[int] = (),
        fds: tuple[int, int] = (PIPE, 0),
        send_flags: int = 0,
        flags: int = 0,
        priority: int = 0,
        receivers: Sequence[tuple[int, Sequence[str]]] = (),
    ) -> None:
        """A SEND; ``receivers`` are (slot, attached node names) that it installs handles in."""
        n_fds = fds[1] if fds[1] <= _wire.FDS_MAX else _wire.FDS_MAX
        body = _wire.SEND.pack(len(destinations), len(handles), n_fds, len(payload), priority, send_flags)
        body += struct.pack(f"<{len(destinations) + len(handles)}Q", *destinations, *handles) + payload
        self.command(slot, _wire.CMD_SEND, body, fds=fds, flags=flags)
        for receiver, nodes in receivers:
            for node in nodes:
                self._install(receiver, node)

    def peer_create(self, slot: int, nodes: Sequence[str], payload: bytes = b"") -> int:
        """PEER_CREATE, then ``slot`` reads the reply, whose socket becomes the next slot."""
        ids = [self.id(slot, n) for n in nodes]
        self.command(slot, _wire.CMD_PEER_CREATE, _wire.seed_body(ids, payload))
        self.drain(slot)
        child = self.slots
        self.slots += 1
        for node in nodes:
            self._install(child, node)
        return child


def release_body(handle: int, count: int | None = None) -> bytes:
    return _wire.U64.pack(handle) if count is None else _wire.RELEASE.pack(handle, count, 0)


def destroy_body(ids: Sequence[int], flags: int = 0) -> bytes:
    return _wire.DESTROY.pack(len(ids), flags) + struct.pack(f"<{len(ids)}Q", *ids)


# -- the scenarios --------------------------------------------------------------------------------


def node_lifecycle() -> Scenario:
    s = Scenario()
    own = s.create_node(0, "a")
    s.command(0, _wire.CMD_HANDLE_QUERY, _wire.U64.pack(own))
    s.command(0, _wire.CMD_HANDLE_RELEASE, release_body(own))  # EBUSY: the owner's pin
    s.command(0, _wire.CMD_HANDLE_RELEASE, release_body(own, 2))  # EINVAL: more than held
    other = s.create_node(0, "b")
    s.command(0, _wire.CMD_NODES_DESTROY, destroy_body([own, own]))  # ENOTUNIQ
    s.command(0, _wire.CMD_NODES_DESTROY, destroy_body([own, other], _wire.DESTROY_FLAG_RELEASE))
    s.command(0, _wire.CMD_NODES_DESTROY, destroy_body([own]))  # ENXIO: released
    s.command(0, _wire.CMD_HANDLE_QUERY, _wire.U64.pack(other))
    s.drain(0)
    third = s.create_node(1, "c")
    s.command(1, _wire.CMD_NODES_DESTROY, destroy_body([third]))
    s.command(1, _wire.CMD_NODES_DESTROY, destroy_body([third]))  # ESTALE
    s.command(1, _wire.CMD_HANDLE_RELEASE, release_body(third, 1))
    s.drain(1)
    return s


def transfer_and_send() -> Scenario:
    s = Scenario()
    inbox = s.create_node(0, "inbox")
    to_inbox = s.transfer(0, "inbox", 1)
    s.command(1, _wire.CMD_HANDLE_TRANSFER, _wire.TRANSFER.pack(to_inbox, b"\0" * 16))  # ESRCH
    own = s.create_node(1, "own")
    s.send(1, [to_inbox], b"hello", handles=[own], fds=(PIPE, 1), receivers=[(0, ["own"])])
    s.send(1, [to_inbox], b"", fds=(MEMFD_SEALED, 1), send_flags=_wire.SEND_FLAG_MEMFD)
    s.send(1, [to_inbox], b"x" * 3000, send_flags=_wire.SEND_FLAG_QUIET)
    s.drain(0)
    back = s.id(0, "own")
    s.send(0, [back], b"reply", handles=[inbox], receivers=[(1, ["inbox"])])
    s.command(0, _wire.CMD_HANDLE_RELEASE, release_body(back))  # the owner hears NODE_RELEASE
    s.drain(1)
    s.command(1, _wire.CMD_HANDLE_QUERY, _wire.U64.pack(to_inbox))
    s.command(1, _wire.CMD_HANDLE_RELEASE, release_body(to_inbox, 2))
    s.command(0, _wire.CMD_NODES_DESTROY, destroy_body([inbox]))
    s.send(1, [to_inbox], b"too late")  # EHOSTUNREACH
    s.drain(0)
    s.drain(1)
    return s


def multicast() -> Scenario:
    s = Scenario()
    s.create_node(0, "n0")
    s.create_node(1, "n1")
    d0 = s.transfer(0, "n0", 2)
    d1 = s.transfer(1, "n1", 2)
    s.command(2, _wire.CMD_PEER_SET_FLAGS, _wire.U64.pack(_wire.PEER_FLAG_WANT_METADATA))
    s.command(0, _wire.CMD_PEER_SET_FLAGS, _wire.U64.pack(_wire.PEER_FLAG_WANT_METADATA))
    s.send(2, [d0, d1], b"to both", fds=(EVENTFD, 2))
    s.send(2, [d0, d1], b"one way", send_flags=_wire.SEND_FLAG_QUIET)
    s.send(2, [d0, d0], b"twice")  # ENOTUNIQ
    s.send(2, [d0, 0x1234_5678_9ABC_DEF1], b"one forged", send_flags=_wire.SEND_FLAG_QUIET)
    s.send(2, [d1], b"x", handles=[0x99])  # ENXIO: attached handle not held
    s.drain(0)
    s.drain(1)
    s.drain(2)
    return s


def held_receives() -> Scenario:
    """A peer that holds its messages: RECV by priority and in order, one waiting for a
    message that comes, one replaced by another, holding turned off with one waiting."""
    s = Scenario()
    s.create_node(0, "n0")
    d0 = s.transfer(0, "n0", 1)
    s.command(0, _wire.CMD_RECV, _wire.RECV.pack(0, 0))  # EINVAL: not holding
    s.command(0, _wire.CMD_PEER_SET_FLAGS, _wire.U64.pack(_wire.PEER_FLAG_HOLD))
    s.send(1, [d0], b"plain")
    s.send(1, [d0], b"urgent", priority=7)
    s.command(0, _wire.CMD_RECV, _wire.RECV.pack(5, _wire.RECV_FLAG_PRIORITY))
    s.command(0, _wire.CMD_RECV, _wire.RECV.pack(9, _wire.RECV_FLAG_PRIORITY))  # waits
    s.command(0, _wire.CMD_RECV, _wire.RECV.pack(0, 0))  # replaces it; takes "plain"
    s.command(0, _wire.CMD_RECV, _wire.RECV.pack(-3, _wire.RECV_FLAG_PRIORITY))  # waits
    s.send(1, [d0], b"late", priority=-1)  # answers it
    s.command(0, _wire.CMD_RECV, _wire.RECV.pack(0, 0x80))  # EINVAL: unknown flag
    s.command(0, _wire.CMD_RECV, _wire.RECV.pack(0, 0))  # waits
    s.command(0, _wire.CMD_PEER_SET_FLAGS, _wire.U64.pack(0))  # ECANCELED for it
    s.send(1, [d0], b"pushed")
    s.drain(0)
    s.drain(1)
    return s


def monitor_capability() -> Scenario:
    """A monitor node made, handed on, attached through, traffic seen, snapshots taken,
    destroyed (revoked); attaching and snapshots through a plain node, a destroyed one."""
    s = Scenario()
    s.create_monitor(3, "mon")  # (slot 3: of the kernel's own uid, trusted)
    s.create_node(0, "plain")
    s.create_node(1, "n1")
    d1 = s.transfer(1, "n1", 2)
    watch = s.transfer(3, "mon", 2)
    s.command(2, _wire.CMD_MONITOR_ATTACH, _wire.U64.pack(watch))
    s.command(2, _wire.CMD_MONITOR_ATTACH, _wire.U64.pack(watch))  # EALREADY
    s.command(0, _wire.CMD_MONITOR_ATTACH, _wire.U64.pack(s.id(0, "plain")))  # EINVAL
    s.send(2, [d1], b"seen")
    s.command(2, _wire.CMD_SNAPSHOT, _wire.U64.pack(watch))  # a memfd of the whole model
    s.command(3, _wire.CMD_SNAPSHOT, _wire.U64.pack(s.id(3, "mon")))
    s.command(0, _wire.CMD_SNAPSHOT, _wire.U64.pack(s.id(0, "plain")))  # EINVAL
    s.command(0, _wire.CMD_SNAPSHOT, b"\0" * 4)  # EINVAL: size
    s.command(0, _wire.CMD_MONITOR_CREATE)  # EPERM: uid 1000 is not trusted
    s.command(3, _wire.CMD_NODES_DESTROY, destroy_body([s.id(3, "mon")]))  # revoked
    s.command(2, _wire.CMD_SNAPSHOT, _wire.U64.pack(watch))  # ESTALE
    s.send(2, [d1], b"unseen")
    s.command(1, _wire.CMD_MONITOR_ATTACH, _wire.U64.pack(0x7777))  # ENXIO
    s.drain(0)
    s.drain(1)
    s.drain(2)
    s.drain(3)
    return s


def shutdown_and_undelivered() -> Scenario:
    """A graceful disconnect with messages queued (some tracked) and a multicast to it; a
    second SHUTDOWN; nodes refused after it; a holding receiver disconnected with tracked
    messages unwritten (UNDELIVERED to their senders); a sender gone first."""
    s = Scenario()
    s.create_node(0, "inbox")
    s.create_node(2, "other")
    d1 = s.transfer(0, "inbox", 1)
    o1 = s.transfer(2, "other", 1)
    s.send(1, [d1], b"queued", send_flags=_wire.SEND_FLAG_QUIET | _wire.SEND_FLAG_TRACK)
    s.send(1, [d1, o1], b"both", send_flags=_wire.SEND_FLAG_TRACK)
    s.command(0, _wire.CMD_SHUTDOWN)
    s.command(0, _wire.CMD_SHUTDOWN)  # EALREADY
    s.command(0, _wire.CMD_SHUTDOWN, b"\0" * 8)  # EALREADY (before looking at the body)
    s.command(2, _wire.CMD_SHUTDOWN, b"\0" * 3)  # EINVAL: size
    s.command(2, _wire.CMD_SHUTDOWN, _wire.U64.pack(0x7777))  # ENXIO
    s.command(1, _wire.CMD_SHUTDOWN, _wire.U64.pack(d1))  # EREMOTE: not its own
    s.command(2, _wire.CMD_SHUTDOWN, _wire.U64.pack(s.id(2, "other")))  # keeps "other"
    s.command(0, _wire.CMD_NODE_CREATE)  # (made after a shutdown: its own affair)
    s.send(1, [d1], b"too late")  # EHOSTUNREACH: destroyed
    s.send(0, [s.id(0, "inbox")], b"to itself, destroyed")
    s.drain(0)
    s.command(2, _wire.CMD_PEER_SET_FLAGS, _wire.U64.pack(_wire.PEER_FLAG_HOLD))
    s.send(1, [o1], b"held", send_flags=_wire.SEND_FLAG_QUIET | _wire.SEND_FLAG_TRACK)
    s.send(1, [o1], b"held too", send_flags=_wire.SEND_FLAG_TRACK, priority=3)
    s.send(1, [o1], b"untracked")
    s.command(0, _wire.CMD_DISCONNECT)
    s.command(2, _wire.CMD_DISCONNECT)  # (two tracked ones unwritten: told to slot 1)
    s.drain(1)
    s.send(3, [0x7777], b"nowhere", send_flags=_wire.SEND_FLAG_TRACK | 0x40)  # EINVAL: flag
    s.drain(3)
    return s


def fds() -> Scenario:
    s = Scenario()
    s.create_node(0, "inbox")
    to_inbox = s.transfer(0, "inbox", 1)
    for kind in (PIPE, MEMFD_LOOSE, MEMFD_HUGE, UNIX_SOCKET, OWN_CONNECTION, EVENTFD, MIXED):
        s.send(1, [to_inbox], b"fd", fds=(kind, 3))
    for kind in (MEMFD_SEALED, MEMFD_LOOSE, MEMFD_HUGE, PIPE):
        s.send(1, [to_inbox], fds=(kind, 1), send_flags=_wire.SEND_FLAG_MEMFD)
    s.send(1, [to_inbox], b"max", fds=(PIPE, _wire.FDS_MAX))
    s.send(1, [to_inbox], b"too many", fds=(PIPE, _wire.FDS_MAX + 1))
    s.send(1, [to_inbox], b"cut short", fds=(PIPE, 2), flags=FLAG_CTRUNC)
    s.command(1, _wire.CMD_NODE_CREATE, fds=(PIPE, 2))  # EINVAL: fds only on SEND
    s.command(1, _wire.CMD_PEER_QUERY, fds=(EVENTFD, 1), flags=FLAG_CTRUNC)  # EMSGSIZE / EMFILE
    s.drain(0)
    s.drain(1)
    return s


def peers_and_seeds() -> Scenario:
    s = Scenario()
    s.create_node(0, "n")
    child = s.peer_create(0, ["n"], b"seed payload")
    s.command(0, _wire.CMD_PEER_CREATE, _wire.seed_body([0x77], b""))  # ENXIO
    s.command(child, _wire.CMD_SEED_TAKE)
    s.command(child, _wire.CMD_SEED_TAKE)  # ENOENT
    s.send(child, [s.id(child, "n")], b"from the child")
    s.create_node(child, "m")
    s.command(child, _wire.CMD_SEED_SET, _wire.seed_body([s.id(child, "m")], b"next"))
    s.command(child, _wire.CMD_PEER_QUERY)
    grandchild = s.peer_create(child, ["m"])
    s.command(grandchild, _wire.CMD_SEED_TAKE)
    s.command(child, _wire.CMD_DISCONNECT)
    s.drain(child)
    s.drain(0)
    s.drain(grandchild)
    return s


def garbage() -> Scenario:
    s = Scenario()
    s.record(1, DISPATCH, b"")
    s.record(1, DISPATCH, b"\x05\x00")
    s.record(1, DISPATCH, _wire.FRAME.pack(999, _wire.CMD_NODE_CREATE, 0, 7), flags=FLAG_RAW_SIZE)
    s.record(1, DISPATCH, _wire.FRAME.pack(0, _wire.CMD_SEND, 0, 8) + bytes(40), flags=FLAG_OVERSIZED)
    s.command(1, 0x0B)  # ENOTTY
    s.command(1, 0xFFFF, b"\0" * 8)
    s.command(1, _wire.CMD_NODE_CREATE, header_flags=1)  # EINVAL
    s.command(1, _wire.CMD_NODE_CREATE, b"\0")
    s.command(1, _wire.CMD_PEER_SET_FLAGS, _wire.U64.pack(0x80))
    s.command(1, _wire.CMD_SEND, b"\0" * 12)
    s.command(1, _wire.CMD_DISCONNECT, b"\0")
    s.drain(1)
    # Enough violations to be cut off, with frames after the last one that must go unanswered.
    for cookie in range(16):
        s.record(2, DISPATCH, _wire.FRAME.pack(17, _wire.CMD_PEER_QUERY, 0, cookie), flags=FLAG_RAW_SIZE)
    s.command(2, _wire.CMD_PEER_QUERY)
    s.drain(2)
    return s


def monitor_and_hangups() -> Scenario:
    s = Scenario()
    s.record(2, MONITOR)
    s.create_node(0, "a")
    to_a = s.transfer(0, "a", 1)
    s.create_node(1, "b")
    s.send(1, [to_a], b"watched" * 100, handles=[s.id(1, "b")], receivers=[(0, ["b"])])
    s.send(1, [to_a], b"queued", fds=(PIPE, 2))
    s.command(0, _wire.CMD_NODES_DESTROY, destroy_body([s.id(0, "a")]))
    s.drain(2)
    s.record(0, CLOSE)  # unread messages; the kernel finds out when it next writes to it
    s.send(1, [to_a], b"after close")
    s.record(1, HANGUP)
    s.drain(2)
    return s


def tiny_quotas() -> Scenario:
    s = Scenario(tiny_limits=True)
    s.create_node(0, "inbox")
    to_inbox = s.transfer(0, "inbox", 1)
    for _ in range(10):
        s.send(1, [to_inbox], b"q" * 600, fds=(PIPE, 1))
    s.send(2, [to_inbox], b"other uid")  # fails: 2 holds no handle; ENXIO
    for n in range(13):
        s.create_node(1, f"x{n}")
    for _ in range(7):  # past peers_per_user
        s.command(0, _wire.CMD_PEER_CREATE, _wire.seed_body([], b""))
    s.drain(0)
    s.drain(1)
    return s


SCENARIOS = {
    f.__name__: f
    for f in (
        node_lifecycle,
        transfer_and_send,
        multicast,
        held_receives,
        monitor_capability,
        shutdown_and_undelivered,
        fds,
        peers_and_seeds,
        garbage,
        monitor_and_hangups,
        tiny_quotas,
    )
}


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, scenario in SCENARIOS.items():
        path = directory / f"seed-{name}"
        path.write_bytes(bytes(scenario().data))
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for path in write(Path(sys.argv[1])):
        print(path)
