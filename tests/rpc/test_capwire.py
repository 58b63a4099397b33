"""capbus.rpc.capwire against what libcapnp itself writes for the same message.

The reference is built by pycapnp with real capabilities (its own clients, inside its own
asyncio event loop on a thread); ours is built by pycapnp with null interface fields, then
patched. They must be equal byte for byte, including multi-segment messages (far pointers).
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import capnp
import pytest

from capbus.rpc import capwire
from capbus.rpc.capwire import CapWireError

capnp.remove_import_hook()
demo: Any = capnp.load(str(Path(__file__).with_name("capwire_demo.capnp")), imports=[])
HOLDER = demo.Holder.schema


def slot(schema: Any, name: str) -> int:
    field = schema.fields[name].proto
    return int(field.slot.offset)


ENTRY_CAP = slot(demo.Entry.schema, "cap")
GROUP = HOLDER.fields["group"].schema
P_SINGLE = (("p", slot(HOLDER, "single")),)
P_MANY = (("p", slot(HOLDER, "many")),)
P_ENTRIES = ("p", slot(HOLDER, "entries"))
P_INNER = (("p", slot(GROUP, "inner")),)
P_UNION = (("p", slot(HOLDER, "capInUnion")),)
DISCRIMINANT = (HOLDER.node.struct.discriminantOffset, HOLDER.fields["capInUnion"].proto.discriminantValue)

# Every capability of the message, in the order both builders set them (pycapnp numbers
# capabilities in the order they are set).
PLAN: list[tuple[capwire.Path, int]] = [
    (P_SINGLE, 0),
    ((*P_MANY, ("e", 0)), 1),
    ((*P_MANY, ("e", 2)), 2),
    ((P_ENTRIES, ("e", 0), ("p", ENTRY_CAP)), 3),
    ((P_ENTRIES, ("e", 2), ("p", ENTRY_CAP)), 4),
    (P_INNER, 5),
    (P_UNION, 6),
]


def fill_plain(message: Any, blob: bytes) -> None:
    message.id = 42
    message.label = "holder"
    message.init("many", 3)
    entries = message.init("entries", 3)
    for i, entry in enumerate(entries):
        entry.name = f"entry {i}"
        entry.weight = i * 10
    message.group.note = "in a group"
    message.blob = blob


def build_ours(first_words: int | None, blob: bytes) -> list[bytes]:
    kwargs = {"num_first_segment_words": first_words} if first_words else {}
    message = demo.Holder.new_message(**kwargs)
    fill_plain(message, blob)
    segments = capwire.patch_caps(message.to_segments(), PLAN)
    segments = capwire.set_discriminant(segments, (), *DISCRIMINANT)
    return [bytes(s) for s in segments]


class EchoServer(demo.Echo.Server):  # type: ignore[misc]
    async def echo(self, text: str, **kwargs: Any) -> str:
        return text


def build_reference(first_words: int | None, blob: bytes) -> list[bytes]:
    """The same message with real capabilities, as libcapnp writes it."""
    result: list[list[bytes]] = []
    errors: list[BaseException] = []

    async def build() -> None:
        async with capnp.kj_loop():
            clients = [demo.Echo._new_client(EchoServer()) for _ in range(7)]
            kwargs = {"num_first_segment_words": first_words} if first_words else {}
            message = demo.Holder.new_message(**kwargs)
            fill_plain(message, blob)
            message.single = clients[0]
            message.many[0] = clients[1]
            message.many[2] = clients[2]
            message.entries[0].cap = clients[3]
            message.entries[2].cap = clients[4]
            message.group.inner = clients[5]
            message.capInUnion = clients[6]
            result.append([bytes(s) for s in message.to_segments()])

    def run() -> None:
        try:
            asyncio.run(build())
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


@pytest.mark.parametrize("first_words", [None, 2, 5])
@pytest.mark.parametrize("blob", [b"", os.urandom(3000)])
def test_byte_identical_to_libcapnp(first_words: int | None, blob: bytes) -> None:
    ours = build_ours(first_words, blob)
    reference = build_reference(first_words, blob)
    assert ours == reference
    if first_words:
        assert len(reference) > 1  # far pointers were exercised


@pytest.mark.parametrize("first_words", [None, 2, 5])
def test_read_back_and_strip(first_words: int | None) -> None:
    segments = build_ours(first_words, b"payload")
    for path, index in PLAN:
        assert capwire.read_cap(segments, path) == index
    assert capwire.read_cap_list(segments, P_MANY) == [1, None, 2]
    assert sorted(index for *_, index in capwire.scan_caps(segments)) == list(range(7))

    clean, table = capwire.strip_caps(segments)
    assert capwire.scan_caps(clean) == []
    for path, index in PLAN:
        assert capwire.lookup_cap(clean, table, path) == index
    assert capwire.lookup_cap_list(clean, table, P_MANY) == [1, None, 2]
    # pycapnp reads everything else of the stripped message.
    reader = demo.Holder.from_segments(clean)
    assert reader.id == 42 and reader.label == "holder" and reader.which() == "capInUnion"
    assert [e.name for e in reader.entries] == ["entry 0", "entry 1", "entry 2"]
    assert reader.blob == b"payload"
    # Only segments that held a capability were copied.
    assert all(c is s or isinstance(c, bytearray) for c, s in zip(clean, segments, strict=True))


def test_framing_round_trip() -> None:
    segments = build_ours(2, b"x" * 100)
    buffer = capwire.frame_header(segments) + b"".join(segments)
    assert [bytes(s) for s in capwire.unframe(buffer)] == segments
    message = demo.Holder.new_message()
    fill_plain(message, b"")
    assert (
        bytes(capwire.frame_header(message.to_segments()) + b"".join(message.to_segments()))
        == message.to_bytes()
    )


GARBAGE: list[tuple[str, Callable[[], list[bytes]]]] = [
    ("empty message", lambda: []),
    ("root out of bounds", lambda: [struct.pack("<Q", (100 << 2) | (1 << 32))]),
    ("list overruns segment", lambda: [struct.pack("<QQ", 1 | (0 << 2) | (6 << 32) | (50 << 35), 0)]),
    ("far pointer to a missing segment", lambda: [struct.pack("<Q", 2 | (0 << 3) | (7 << 32))]),
    ("unknown other pointer", lambda: [struct.pack("<Q", 3 | (1 << 2))]),
    (
        "composite list lies about its size",
        lambda: [struct.pack("<QQ", 1 | (7 << 32) | (1 << 35), (5 << 2) | (1 << 32))],
    ),
]


@pytest.mark.parametrize("name,make", GARBAGE, ids=[g[0] for g in GARBAGE])
def test_malformed_messages_are_refused(name: str, make: Callable[[], list[bytes]]) -> None:
    with pytest.raises(CapWireError):
        capwire.scan_caps(make())


def test_limits_bound_the_walk() -> None:
    # A struct whose one pointer points at itself: endless without the nesting limit.
    loop = [
        struct.pack("<QQ", 0 | (0 << 2) | (0 << 32) | (1 << 48), 0 | ((-1 & 0x3FFFFFFF) << 2) | (1 << 48))
    ]
    with pytest.raises(CapWireError, match="not a tree"):
        capwire.scan_caps(loop)
    # Many pointers to one big list: bounded by the traversal limit (the amplification attack).
    n = 64
    words = [0 | (0 << 2) | (0 << 32) | (n << 48)]
    list_start = 1 + n
    for i in range(n):
        offset = list_start - (1 + i) - 1
        words.append(1 | (offset << 2) | (5 << 32) | (4096 << 35))
    segment = struct.pack(f"<{len(words)}Q", *words) + bytes(4096 * 8)
    with pytest.raises(CapWireError, match="not a tree"):
        capwire.scan_caps([segment])


def test_patching_refuses_wrong_slots() -> None:
    segments = build_ours(None, b"")
    with pytest.raises(CapWireError, match="not null"):
        capwire.patch_caps(segments, [(P_SINGLE, 9)])
    message = demo.Holder.new_message()
    message.id = 1
    with pytest.raises(CapWireError, match="null parent"):
        capwire.patch_caps(message.to_segments(), [((P_ENTRIES, ("e", 0), ("p", ENTRY_CAP)), 0)])
    with pytest.raises(CapWireError, match="not a capability"):
        capwire.read_cap(build_ours(None, b""), (("p", slot(HOLDER, "label")),))
