"""A kernel's whole object model at one instant (CAPBUS_CMD_SNAPSHOT, docs/peer-api.md
"Introspection"): who is connected, which nodes each peer owns, who holds handles to whose
node, how full queues and quotas are, and what has moved.

The kernel writes it into a sealed memfd while it holds the bus, so a snapshot is one point
of the global order (:attr:`Snapshot.seq`). This module only reads that file: no sockets,
so it is testable on bytes, and what ``capbus status`` prints and ``capbus graph`` draws
are computed here, where a test can assert them.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Final

from ._uapi import lib
from ._wire import check_layout

MAGIC: Final[int] = lib.CAPBUS_SNAPSHOT_MAGIC
VERSION: Final[int] = lib.CAPBUS_SNAPSHOT_VERSION

_HEADER = struct.Struct("<" + "I" * 10 + "Q" * 22)
_PEER = struct.Struct("<QIIIIIIIIQIIQQQQQII")
_NODE = struct.Struct("<QQII")
_HANDLE = struct.Struct("<QQQII")
_USER = struct.Struct("<IIQQIIII")

check_layout(
    "snapshot",
    (
        (_HEADER, "struct capbus_snapshot"),
        (_PEER, "struct capbus_snapshot_peer"),
        (_NODE, "struct capbus_snapshot_node"),
        (_HANDLE, "struct capbus_snapshot_handle"),
        (_USER, "struct capbus_snapshot_user"),
    ),
)


class SnapshotError(ValueError):
    """The file is not a snapshot this version of capbus can read."""


class PeerFlags(IntFlag):
    HOLD = lib.CAPBUS_SNAPSHOT_PEER_HOLD
    WANT_METADATA = lib.CAPBUS_SNAPSHOT_PEER_WANT_METADATA
    MONITOR = lib.CAPBUS_SNAPSHOT_PEER_MONITOR
    GATED = lib.CAPBUS_SNAPSHOT_PEER_GATED
    STALLED = lib.CAPBUS_SNAPSHOT_PEER_STALLED
    HALF_CLOSED = lib.CAPBUS_SNAPSHOT_PEER_HALF_CLOSED
    RECV_WAITING = lib.CAPBUS_SNAPSHOT_PEER_RECV_WAITING


class NodeFlags(IntFlag):
    DESTROYED = lib.CAPBUS_SNAPSHOT_NODE_DESTROYED
    MONITOR = lib.CAPBUS_SNAPSHOT_NODE_MONITOR


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One connection. ``serial`` is the ``peer`` a message's metadata names its sender by."""

    serial: int
    uid: int
    gid: int
    pid: int
    flags: PeerFlags
    nodes: int
    handles: int
    queued: int
    """Messages and notifications queued for it, not yet written to it."""
    queued_messages: int
    """Of those, the messages charged to their senders (the peer's quota in use) ..."""
    queued_bytes: int
    queued_handles: int
    queued_fds: int
    backlog_bytes: int
    """Replies and notifications the kernel queued for it (nobody's quota)."""
    sent_messages: int
    sent_bytes: int
    received_messages: int
    received_bytes: int
    charged_uid: int


@dataclass(frozen=True, slots=True)
class NodeStatus:
    serial: int
    owner: int
    """The owning peer's serial; 0 once the owner let go of the (destroyed) node."""
    flags: NodeFlags
    holders: int

    @property
    def destroyed(self) -> bool:
        return NodeFlags.DESTROYED in self.flags

    @property
    def monitor(self) -> bool:
        return NodeFlags.MONITOR in self.flags


@dataclass(frozen=True, slots=True)
class HandleStatus:
    peer: int
    """The holder's serial."""
    node: int
    id: int
    """The id the holder knows it by."""
    references: int
    owner: bool
    """Is it the owner's own handle (the node's anchor)?"""


@dataclass(frozen=True, slots=True)
class UserStatus:
    uid: int
    peers: int
    queued_bytes: int
    backlog_bytes: int
    handles: int
    fds_held: int
    fds_in_flight: int


@dataclass(frozen=True, slots=True)
class SnapshotLimits:
    """The kernel's limits (capbus.Limits), so that use can be read against them."""

    peer_bytes: int
    peer_messages: int
    peer_handles: int
    peer_fds: int
    handles_held: int
    nodes_owned: int
    user_bytes: int
    peers_per_user: int
    user_handles: int
    user_backlog: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    you: int
    """The serial of the peer that asked (a status query is a peer too)."""
    seq: int
    """Transactions committed when it was taken: its place in the global order."""
    messages_sent: int
    messages_written: int
    violations: int
    peers_doomed: int
    memory_bytes: int
    fds_held: int
    fds_held_max: int
    fds_in_flight: int
    fds_in_flight_max: int
    connections_refused: int
    limits: SnapshotLimits
    peers: dict[int, PeerStatus] = field(default_factory=dict)
    nodes: dict[int, NodeStatus] = field(default_factory=dict)
    handles: list[HandleStatus] = field(default_factory=list)
    users: dict[int, UserStatus] = field(default_factory=dict)

    def owned_by(self, peer: int) -> list[NodeStatus]:
        """The nodes ``peer`` owns, oldest first."""
        return sorted((n for n in self.nodes.values() if n.owner == peer), key=lambda n: n.serial)

    def held_by(self, peer: int) -> list[HandleStatus]:
        """The handles ``peer`` holds to other peers' nodes (its own nodes' left out)."""
        return sorted((h for h in self.handles if h.peer == peer and not h.owner), key=lambda h: h.node)

    def holders_of(self, node: int) -> list[int]:
        """The serials of the peers holding a handle to ``node``, its owner left out."""
        return sorted(h.peer for h in self.handles if h.node == node and not h.owner)

    def edges(self) -> Iterator[tuple[int, int, HandleStatus]]:
        """(holder peer, node, handle) for every handle held to another peer's node."""
        for handle in sorted(self.handles, key=lambda h: (h.peer, h.node)):
            if not handle.owner:
                yield handle.peer, handle.node, handle

    def others(self) -> Snapshot:
        """This snapshot without the peer that asked for it (and what only it had)."""
        you = self.you
        handles = [h for h in self.handles if h.peer != you]
        nodes = {s: n for s, n in self.nodes.items() if n.owner != you}
        return Snapshot(
            **{name: getattr(self, name) for name in _SCALARS},
            peers={s: p for s, p in self.peers.items() if s != you},
            nodes=nodes,
            handles=[h for h in handles if h.node in nodes],
            users=self.users,
        )


_SCALARS = (
    "you seq messages_sent messages_written violations peers_doomed memory_bytes fds_held fds_held_max "
    "fds_in_flight fds_in_flight_max connections_refused limits"
).split()


def _records(
    data: bytes | mmap.mmap, offset: int, count: int, size: int, fmt: struct.Struct
) -> Iterator[tuple]:  # type: ignore[type-arg]
    if size < fmt.size:
        raise SnapshotError(f"snapshot records of {size} bytes are shorter than this version's {fmt.size}")
    end = offset + count * size
    if end > len(data):
        raise SnapshotError("snapshot cut short")
    for start in range(offset, end, size):
        yield fmt.unpack_from(data, start)


def decode(data: bytes | mmap.mmap) -> Snapshot:
    """Reads a snapshot's bytes (uapi.h: struct capbus_snapshot and its records)."""
    if len(data) < _HEADER.size:
        raise SnapshotError("snapshot cut short")
    fields = _HEADER.unpack_from(data, 0)
    magic, version, peer_size, node_size, handle_size, user_size, n_peers, n_nodes, n_handles, n_users = (
        fields[:10]
    )
    if magic != MAGIC:
        raise SnapshotError("not a capbus snapshot")
    if version != VERSION:
        raise SnapshotError(f"snapshot version {version}; this capbus reads version {VERSION}")
    you, seq, sent, written, violations, doomed, memory, held, held_max, flying, flying_max, refused = fields[
        10:22
    ]
    snapshot = Snapshot(
        you=you,
        seq=seq,
        messages_sent=sent,
        messages_written=written,
        violations=violations,
        peers_doomed=doomed,
        memory_bytes=memory,
        fds_held=held,
        fds_held_max=held_max,
        fds_in_flight=flying,
        fds_in_flight_max=flying_max,
        connections_refused=refused,
        limits=SnapshotLimits(*fields[22:32]),
    )
    whole = (
        _HEADER.size
        + n_peers * peer_size
        + n_nodes * node_size
        + n_handles * handle_size
        + n_users * user_size
    )
    if whole != len(data):
        raise SnapshotError(f"a snapshot of {len(data)} bytes whose header says {whole}")
    offset = _HEADER.size
    for record in _records(data, offset, n_peers, peer_size, _PEER):
        peer = PeerStatus(*record[:4], PeerFlags(record[4]), *record[5:18])  # type: ignore[call-arg]
        snapshot.peers[peer.serial] = peer
    offset += n_peers * peer_size
    for serial, owner, flags, holders in _records(data, offset, n_nodes, node_size, _NODE):
        snapshot.nodes[serial] = NodeStatus(serial, owner, NodeFlags(flags), holders)
    offset += n_nodes * node_size
    for holder, node, id_, references, flags in _records(data, offset, n_handles, handle_size, _HANDLE):
        owner = bool(flags & lib.CAPBUS_SNAPSHOT_HANDLE_OWNER)
        snapshot.handles.append(HandleStatus(holder, node, id_, references, owner))
    offset += n_handles * handle_size
    for record in _records(data, offset, n_users, user_size, _USER):
        user = UserStatus(*record[:7])
        snapshot.users[user.uid] = user
    return snapshot


MAX_BYTES: Final = 1 << 30
"""The largest snapshot read (a kernel at its default limits writes far less)."""
_SEALED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE


def read_memfd(fd: int) -> Snapshot:
    """Reads the snapshot in the sealed memfd ``fd`` (closes it). Only a memfd sealed against
    shrinking and writing is mapped (what the kernel sends): whoever sent another could
    change it under the reader, or shrink it (SIGBUS)."""
    try:
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if seals & _SEALED != _SEALED:
            raise SnapshotError("not a sealed memfd: not a snapshot of a capbus kernel")
        size = os.fstat(fd).st_size
        if size == 0:
            raise SnapshotError("empty snapshot")
        if size > MAX_BYTES:
            raise SnapshotError(f"a snapshot of {size} bytes (more than {MAX_BYTES} read)")
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
            return decode(view)
    finally:
        os.close(fd)
