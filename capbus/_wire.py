"""The wire format (kernel/include/capbus/uapi.h) as a sans-IO codec.

Encoders turn commands into frame bytes; :func:`decode` turns one received frame and its fds
into a :class:`Reply` or an :class:`Incoming` message. No sockets here: the peer (peer.py)
owns IO, so this module is testable on plain bytes and reusable over another transport.
The numbers come from the C header through cffi, so they exist in one place only.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ._uapi import ffi, lib

FRAME: Final = struct.Struct("<IHHQ")
REPLY: Final = struct.Struct("<iI")
MESSAGE: Final = struct.Struct("<HHiQQIIIIIIQQ")
SEND: Final = struct.Struct("<IIIIiI")
DESTROY: Final = struct.Struct("<II")
TRANSFER: Final = struct.Struct("<Q16s")
QUERY: Final = struct.Struct("<16sIIIIIIII")
HANDLE_STATE: Final = struct.Struct("<IIII")
RELEASE: Final = struct.Struct("<QII")
SEED: Final = struct.Struct("<II")
RECV: Final = struct.Struct("<iI")
SEND_RESULT: Final = struct.Struct("<II")
MONITOR_RECORD: Final = struct.Struct("<HHIQIIIIQ")
UNDELIVERED: Final = struct.Struct("<QQ")
U64: Final = struct.Struct("<Q")
MESSAGE_FRAME_HEAD: Final = struct.Struct("<" + FRAME.format[1:] + MESSAGE.format[1:])
"""A message frame's two headers, read in one unpack (the receive path's common case)."""


def check_layout(what: str, layouts: Sequence[tuple[struct.Struct, str]]) -> None:
    """Refuses to load when a struct format here no longer matches uapi.h's C struct."""
    for fmt, name in layouts:
        if fmt.size != ffi.sizeof(name):  # pragma: no cover - a header change without this file
            raise ImportError(f"capbus {what} layout of {name} differs from uapi.h")


check_layout(
    "wire",
    (
        (FRAME, "struct capbus_frame"),
        (REPLY, "struct capbus_reply"),
        (MESSAGE, "struct capbus_message"),
        (SEND, "struct capbus_cmd_send"),
        (DESTROY, "struct capbus_cmd_destroy"),
        (TRANSFER, "struct capbus_cmd_transfer"),
        (QUERY, "struct capbus_reply_query"),
        (HANDLE_STATE, "struct capbus_reply_handle"),
        (RELEASE, "struct capbus_cmd_release"),
        (SEED, "struct capbus_cmd_peer_create"),
        (SEND_RESULT, "struct capbus_reply_send"),
        (MONITOR_RECORD, "struct capbus_monitor_record"),
        (UNDELIVERED, "struct capbus_undelivered"),
    ),
)

CMD_NODE_CREATE: Final[int] = lib.CAPBUS_CMD_NODE_CREATE
CMD_HANDLE_RELEASE: Final[int] = lib.CAPBUS_CMD_HANDLE_RELEASE
CMD_NODES_DESTROY: Final[int] = lib.CAPBUS_CMD_NODES_DESTROY
CMD_HANDLE_TRANSFER: Final[int] = lib.CAPBUS_CMD_HANDLE_TRANSFER
CMD_SEND: Final[int] = lib.CAPBUS_CMD_SEND
CMD_PEER_QUERY: Final[int] = lib.CAPBUS_CMD_PEER_QUERY
CMD_PEER_CREATE: Final[int] = lib.CAPBUS_CMD_PEER_CREATE
CMD_SEED_TAKE: Final[int] = lib.CAPBUS_CMD_SEED_TAKE
CMD_SEED_SET: Final[int] = lib.CAPBUS_CMD_SEED_SET
CMD_DISCONNECT: Final[int] = lib.CAPBUS_CMD_DISCONNECT
CMD_HANDLE_QUERY: Final[int] = lib.CAPBUS_CMD_HANDLE_QUERY
CMD_PEER_SET_FLAGS: Final[int] = lib.CAPBUS_CMD_PEER_SET_FLAGS
PEER_FLAG_WANT_METADATA: Final[int] = lib.CAPBUS_PEER_FLAG_WANT_METADATA
PEER_FLAG_HOLD: Final[int] = lib.CAPBUS_PEER_FLAG_HOLD
CMD_RECV: Final[int] = lib.CAPBUS_CMD_RECV
CMD_MONITOR_CREATE: Final[int] = lib.CAPBUS_CMD_MONITOR_CREATE
CMD_MONITOR_ATTACH: Final[int] = lib.CAPBUS_CMD_MONITOR_ATTACH
CMD_SNAPSHOT: Final[int] = lib.CAPBUS_CMD_SNAPSHOT
CMD_SHUTDOWN: Final[int] = lib.CAPBUS_CMD_SHUTDOWN
RECV_FLAG_PRIORITY: Final[int] = lib.CAPBUS_RECV_FLAG_PRIORITY
FRAME_REPLY: Final[int] = lib.CAPBUS_FRAME_REPLY
FRAME_MESSAGE: Final[int] = lib.CAPBUS_FRAME_MESSAGE

MSG_DATA: Final[int] = lib.CAPBUS_MSG_DATA
MSG_NODE_DESTROY: Final[int] = lib.CAPBUS_MSG_NODE_DESTROY
MSG_NODE_RELEASE: Final[int] = lib.CAPBUS_MSG_NODE_RELEASE
MSG_MONITOR: Final[int] = lib.CAPBUS_MSG_MONITOR
MSG_DRAINED: Final[int] = lib.CAPBUS_MSG_DRAINED
MSG_UNDELIVERED: Final[int] = lib.CAPBUS_MSG_UNDELIVERED
MSG_FLAG_CONTINUE: Final[int] = lib.CAPBUS_MSG_FLAG_CONTINUE
MSG_FLAG_MEMFD: Final[int] = lib.CAPBUS_MSG_FLAG_MEMFD
MSG_FLAG_DRAINING: Final[int] = lib.CAPBUS_MSG_FLAG_DRAINING
SEND_FLAG_MEMFD: Final[int] = lib.CAPBUS_SEND_FLAG_MEMFD
SEND_FLAG_QUIET: Final[int] = lib.CAPBUS_SEND_FLAG_QUIET
SEND_FLAG_TRACK: Final[int] = lib.CAPBUS_SEND_FLAG_TRACK
ONEWAY_COOKIE: Final = 1 << 63
"""Cookies of one-way sends carry this bit: a reply to one means the send failed."""
MEMFD_MAX: Final[int] = lib.CAPBUS_MEMFD_MAX
DESTROY_FLAG_RELEASE: Final[int] = lib.CAPBUS_DESTROY_FLAG_RELEASE
HANDLE_STATE_OWNER: Final[int] = lib.CAPBUS_HANDLE_STATE_OWNER
HANDLE_STATE_DESTROYED: Final[int] = lib.CAPBUS_HANDLE_STATE_DESTROYED

HANDLE_FLAG_MANAGED: Final[int] = lib.CAPBUS_HANDLE_FLAG_MANAGED
HANDLE_FLAG_REMOTE: Final[int] = lib.CAPBUS_HANDLE_FLAG_REMOTE
HANDLE_INVALID: Final[int] = lib.CAPBUS_HANDLE_INVALID
PAYLOAD_MAX: Final[int] = lib.CAPBUS_PAYLOAD_MAX
HANDLES_MAX: Final[int] = lib.CAPBUS_HANDLES_MAX
FDS_MAX: Final[int] = lib.CAPBUS_FDS_MAX
DESTINATIONS_MAX: Final[int] = lib.CAPBUS_DESTINATIONS_MAX
FRAME_MAX: Final[int] = lib.CAPBUS_FRAME_MAX

NO_CREDENTIAL: Final = 0xFFFFFFFF


def command(kind: int, cookie: int, body: bytes = b"") -> bytes:
    """One command frame."""
    return FRAME.pack(FRAME.size + len(body), kind, 0, cookie) + body


def send_frame(
    cookie: int,
    destinations: Sequence[int],
    handles: Sequence[int],
    n_fds: int,
    payload: bytes | bytearray | memoryview,
    priority: int = 0,
    flags: int = 0,
) -> list[bytes | bytearray | memoryview]:
    """A CAPBUS_CMD_SEND frame as buffers for sendmsg (the payload is not copied)."""
    n_dest = len(destinations)
    n_handles = len(handles)
    if n_dest == 1 and n_handles <= 1:  # the common cases (an RPC call: its reply node), in one pack
        fixed = _UNICAST_HEADS[n_handles]
        size = fixed.size + len(payload)
        unicast = fixed.pack(
            size,
            CMD_SEND,
            0,
            cookie,
            1,
            n_handles,
            n_fds,
            len(payload),
            priority,
            flags,
            destinations[0],
            *handles,
        )
        return [unicast, payload] if len(payload) else [unicast]
    head_size = FRAME.size + SEND.size + 8 * (n_dest + n_handles)
    size = head_size + len(payload)
    head = bytearray(head_size)
    FRAME.pack_into(head, 0, size, CMD_SEND, 0, cookie)
    SEND.pack_into(head, FRAME.size, n_dest, n_handles, n_fds, len(payload), priority, flags)
    struct.pack_into(f"<{n_dest + n_handles}Q", head, FRAME.size + SEND.size, *destinations, *handles)
    return [head, payload] if len(payload) else [head]


def send_failures(body: memoryview) -> list[tuple[int, int]]:
    """(destination id, errno) of each destination a one-way send could not reach."""
    n_dest, _delivered = SEND_RESULT.unpack_from(body)
    errors = struct.unpack_from(f"<{n_dest}i", body, SEND_RESULT.size)
    ids_at = SEND_RESULT.size + (4 * n_dest + 7) // 8 * 8
    ids = struct.unpack_from(f"<{n_dest}Q", body, ids_at)
    return [(i, e) for i, e in zip(ids, errors, strict=True) if e]


_UNICAST_HEADS: Final = (
    struct.Struct("<IHHQIIIIiIQ"),  # FRAME + SEND + one destination
    struct.Struct("<IHHQIIIIiIQQ"),  # ... + one handle
)


def seed_body(handles: list[int], payload: bytes) -> bytes:
    return SEED.pack(len(handles), len(payload)) + struct.pack(f"<{len(handles)}Q", *handles) + payload


@dataclass(slots=True)
class Reply:
    """The kernel's answer to one command."""

    cookie: int
    command: int
    error: int
    body: memoryview
    fds: list[int]


@dataclass(slots=True)
class Incoming:
    """A message or notification, with ids still raw (the peer wraps them in Handles)."""

    kind: int
    flags: int
    priority: int
    destination: int
    seq: int
    uid: int
    gid: int
    pid: int
    process_id: int
    sending_peer: int
    handles: tuple[int, ...]
    payload: memoryview
    fds: list[int]
    payload_size: int
    """The payload's length; with MSG_FLAG_MEMFD it is in fds[0], not in ``payload``."""


class ProtocolError(Exception):
    """The kernel sent something this codec cannot parse (a bug on one side)."""


def decode_message(body: memoryview, fds: list[int]) -> Incoming:
    header = MESSAGE.unpack_from(body, 0)
    kind, flags, priority, destination, seq, uid, gid, pid, n_handles, _n_fds, payload_size = header[:11]
    process_id, peer = header[11:]
    offset = MESSAGE.size
    handles = struct.unpack_from(f"<{n_handles}Q", body, offset) if n_handles else ()
    offset += 8 * n_handles
    inline = 0 if flags & MSG_FLAG_MEMFD else payload_size
    if offset + inline != len(body) or (flags & MSG_FLAG_MEMFD and not fds):
        raise ProtocolError("message size does not match its header")
    return Incoming(
        kind,
        flags,
        priority,
        destination,
        seq,
        uid,
        gid,
        pid,
        process_id,
        peer,
        handles,
        body[offset:],
        fds,
        payload_size,
    )


def decode(frame: bytes | bytearray | memoryview, fds: list[int]) -> Reply | Incoming:
    """One frame from the kernel."""
    view = memoryview(frame)
    if len(view) < FRAME.size:
        raise ProtocolError(f"short frame of {len(view)} bytes")
    size, kind, _flags, cookie = FRAME.unpack_from(view, 0)
    if size != len(view):
        raise ProtocolError(f"frame says {size} bytes, datagram has {len(view)}")
    if kind == FRAME_REPLY:
        error, cmd = REPLY.unpack_from(view, FRAME.size)
        return Reply(cookie, cmd, error, view[FRAME.size + REPLY.size :], fds)
    if kind == FRAME_MESSAGE:
        return decode_message(view[FRAME.size :], fds)
    raise ProtocolError(f"unknown frame type {kind:#x}")
