"""Capability pointers in Cap'n Proto messages, written and read on the raw segments.

A call's params and a return's results are standard Cap'n Proto messages whose capability
pointers index the handles attached to the bus1 message: the attached handles are the
message's cap table, as a capnp RPC Payload's capTable is. pycapnp serializes everything
but capabilities outside its own (asyncio-bound) RPC system: it cannot write a capability
without a live client, it raises on reading one, and it aborts the process when copying a
message that holds one. So capbus lets pycapnp write and read everything else, and handles
capability pointers here, on the segments:

- writing: leave interface fields null in pycapnp, serialize with ``to_segments()``, then
  :func:`patch_caps` writes ``3 | index << 32`` at the pointer slots named by paths (and
  :func:`set_discriminant` selects an interface-typed union member);
- reading: :func:`strip_caps` finds every capability pointer (a schema-free walk that also
  validates the message's pointers and bounds its traversal) and hands pycapnp a copy with
  them nulled, plus a table from pointer location to index; :func:`lookup_cap` resolves a
  path through that table.

A path is a tuple of steps: ``("p", n)`` is pointer slot ``n`` of the current struct (a
field's ``slot.offset``; groups use their enclosing struct's slots, so a group adds no step),
``("e", i)`` is element ``i`` of the current list. Every step but the last follows the pointer
it lands on.

Pointer words (https://capnproto.org/encoding.html), little-endian 64-bit:
kind = w & 3 (0 struct, 1 list, 2 far, 3 other: a capability when bits 2..31 are 0);
struct/list offset = signed bits 2..31 in words from the pointer's end; struct data words =
bits 32..47, pointer words = bits 48..63; list element size = bits 32..34 (6 pointer,
7 composite), count = bits 35..63; far: landing pad = bits 3..31, double-far = bit 2,
segment = bits 32..63; capability index = bits 32..63.

Pure Python: about a microsecond and a half per capability, and a few microseconds to strip
a small message. Hand-written because no library offers Cap'n Proto pointer surgery.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, TypeAlias

import capbus.rpc._capwire as _capwire

if sys.byteorder != "little":  # pragma: no cover - memoryview.cast("Q") is native-endian
    raise ImportError("capbus.rpc.capwire needs a little-endian machine")

Step: TypeAlias = tuple[Literal["p", "e"], int]
Path: TypeAlias = tuple[Step, ...]
Segment: TypeAlias = bytes | bytearray | memoryview
Location: TypeAlias = tuple[int, int]  # (segment, word) of a pointer slot

CAPABILITY = 3
_LOW32 = 0xFFFFFFFF
TRAVERSAL_LIMIT_WORDS = 8 * 1024 * 1024  # as libcapnp's default ReaderOptions
NESTING_LIMIT = 64


class CapWireError(ValueError):
    """A message whose pointers are malformed, or a path that does not fit it."""


def capability_word(index: int) -> int:
    if not 0 <= index <= _LOW32:
        raise CapWireError(f"capability index {index} out of range")
    return CAPABILITY | (index << 32)


def _words(segments: Sequence[Segment]) -> list[memoryview]:
    views = []
    for segment in segments:
        view = memoryview(segment).cast("B")
        if len(view) % 8:
            raise CapWireError("a segment is not a whole number of words")
        views.append(view.cast("Q"))
    return views


def _check(words: list[memoryview], segment: int, start: int, count: int) -> None:
    if segment >= len(words) or start < 0 or count < 0 or start + count > len(words[segment]):
        raise CapWireError(f"pointer out of bounds (segment {segment}, word {start}, {count} words)")


# A dereferenced pointer: (kind, segment, first word of the target, the word that describes it).
_Target: TypeAlias = tuple[int, int, int, int]


def _near(segment: int, location: int, word: int) -> _Target:
    offset = (word & _LOW32) >> 2
    if offset >= 1 << 29:
        offset -= 1 << 30
    return word & 3, segment, location + 1 + offset, word


def _deref(words: list[memoryview], segment: int, location: int) -> _Target | None:
    """The pointer at (segment, location), far pointers followed; None when null."""
    word = words[segment][location]
    if word == 0:
        return None
    kind = word & 3
    if kind == 3:
        return 3, segment, location, word
    if kind != 2:
        return _near(segment, location, word)
    target_segment = word >> 32
    pad = (word & _LOW32) >> 3
    if not (word >> 2) & 1:  # single far: the landing pad is an ordinary pointer
        _check(words, target_segment, pad, 1)
        landing = words[target_segment][pad]
        if landing & 3 == 2:
            raise CapWireError("far pointer to a far pointer")
        return _near(target_segment, pad, landing)
    _check(words, target_segment, pad, 2)  # double far: a far pointer to the content, then a tag
    far, tag = words[target_segment][pad], words[target_segment][pad + 1]
    if far & 7 != 2:
        raise CapWireError("bad double-far landing pad")
    if tag & 3 >= 2:  # (a tag describes a struct or a list: as capwire.c)
        raise CapWireError("bad double-far tag")
    return tag & 3, far >> 32, (far & _LOW32) >> 3, tag


def _struct(words: list[memoryview], target: _Target) -> tuple[int, int, int, int]:
    kind, segment, start, word = target
    if kind != 0:
        raise CapWireError(f"expected a struct pointer, found kind {kind}")
    data_words, pointer_words = (word >> 32) & 0xFFFF, word >> 48
    _check(words, segment, start, data_words + pointer_words)
    return segment, start, data_words, pointer_words


def _list(words: list[memoryview], target: _Target) -> tuple[int, int, int, int, int, int]:
    """(segment, first element, element size, count, data words, pointer words); the last two
    only for composite lists."""
    kind, segment, start, word = target
    if kind != 1:
        raise CapWireError(f"expected a list pointer, found kind {kind}")
    size, count = (word >> 32) & 7, word >> 35
    if size == 7:
        _check(words, segment, start, 1 + count)
        tag = words[segment][start]
        elements = (tag & _LOW32) >> 2
        data_words, pointer_words = (tag >> 32) & 0xFFFF, tag >> 48
        if elements * (data_words + pointer_words) > count:
            raise CapWireError("composite list overruns its words")
        return segment, start + 1, 7, elements, data_words, pointer_words
    bits = (0, 1, 8, 16, 32, 64, 64)[size]
    _check(words, segment, start, (count * bits + 63) // 64)
    return segment, start, size, count, 0, 0


def _walk(words: list[memoryview], path: Path) -> tuple[int, int] | tuple[int, int, int, int] | None:
    """Follows ``path`` from the root: (segment, word) of a pointer slot, (segment, start,
    data words, pointer words) of a composite-list element, or None when a pointer on the
    way is null or a slot lies past its struct (a message from an older schema)."""
    _check(words, 0, 0, 1)
    slot: tuple[int, int] | None = (0, 0)
    element: tuple[int, int, int, int] | None = None
    for op, n in path:
        if slot is not None:
            target = _deref(words, *slot)
            if target is None:
                return None
            if op == "p":
                segment, start, data_words, pointer_words = _struct(words, target)
                if n >= pointer_words:
                    return None
                slot = (segment, start + data_words + n)
            else:
                segment, first, size, count, data_words, pointer_words = _list(words, target)
                if not 0 <= n < count:
                    raise CapWireError(f"list index {n} out of range ({count} elements)")
                if size == 6:
                    slot = (segment, first + n)
                elif size == 7:
                    slot, element = (
                        None,
                        (segment, first + n * (data_words + pointer_words), data_words, pointer_words),
                    )
                else:
                    raise CapWireError("an element step into a list of plain values")
        else:
            assert element is not None
            if op != "p":
                raise CapWireError("an element step on a struct")
            segment, start, data_words, pointer_words = element
            if n >= pointer_words:
                return None
            slot, element = (segment, start + data_words + n), None
    return slot if slot is not None else element


def _slot(words: list[memoryview], path: Path) -> Location | None:
    """(segment, word) of the pointer slot at ``path``, or None (see :func:`_walk`)."""
    found = _walk(words, path)
    if found is None:
        return None
    if len(found) != 2:
        raise CapWireError(f"{path!r} ends on a struct, not a pointer slot")
    return found[0], found[1]


def locate(segments: Sequence[Segment], path: Path) -> Location | None:
    """(segment, word) of the pointer slot at ``path``, or None (see :func:`_walk`)."""
    return _slot(_words(segments), path)


def _list_at(words: list[memoryview], path: Path) -> tuple[int, int, int] | None:
    """(segment, first word, count) of the List(Interface) at ``path``; None if null."""
    found = _slot(words, path)
    target = None if found is None else _deref(words, *found)
    if target is None:
        return None
    segment, first, size, count, _, _ = _list(words, target)
    if size != 6:
        raise CapWireError("a List(Interface) must be a list of pointers")
    return segment, first, count


def read_struct_word(segments: Sequence[Segment], path: Path, word: int) -> int | None:
    """Data word ``word`` of the struct that the pointer slot at ``path`` points to, without
    looking at anything else of the message (None if the struct or the word is absent)."""
    words = _words(segments)
    found = _slot(words, path)
    target = None if found is None else _deref(words, *found)
    if target is None:
        return None
    segment, start, data_words, _ = _struct(words, target)
    return int(words[segment][start + word]) if word < data_words else None


def _capability_index(word: int) -> int | None:
    if word == 0:
        return None
    if word & _LOW32 != CAPABILITY:
        raise CapWireError(f"not a capability pointer: {word:#018x}")
    return word >> 32


def read_cap(segments: Sequence[Segment], path: Path) -> int | None:
    """The capability index at ``path`` (None for a null pointer or an absent slot)."""
    words = _words(segments)
    found = _slot(words, path)
    return None if found is None else _capability_index(words[found[0]][found[1]])


def is_cap(segments: Sequence[Segment], path: Path) -> bool:
    """Whether the pointer slot at ``path`` holds a capability pointer (an AnyPointer or
    Capability field may hold one or anything else)."""
    words = _words(segments)
    found = _slot(words, path)
    if found is None:
        return False
    word = int(words[found[0]][found[1]])
    return word != 0 and word & _LOW32 == CAPABILITY


def read_cap_list(segments: Sequence[Segment], path: Path) -> list[int | None] | None:
    """The indices of a List(Interface) at ``path`` (None for a null list)."""
    words = _words(segments)
    found = _list_at(words, path)
    if found is None:
        return None
    segment, first, count = found
    return [_capability_index(words[segment][first + i]) for i in range(count)]


def patch_caps(segments: Sequence[Segment], patches: Iterable[tuple[Path, int]]) -> list[Segment]:
    """Writes capability pointers at null slots; returns the segments with only those that
    were written copied (to bytearrays)."""
    out: list[Segment] = list(segments)
    words = _words(out)
    for path, index in patches:
        found = _slot(words, path)
        if found is None:
            raise CapWireError(f"no pointer slot at {path!r} (a null parent?)")
        segment, word = found
        if not isinstance(out[segment], bytearray):
            out[segment] = bytearray(out[segment])
            words[segment] = memoryview(out[segment]).cast("Q")
        if words[segment][word] != 0:
            raise CapWireError(f"the slot at {path!r} is not null")
        words[segment][word] = capability_word(index)
    return out


def set_discriminant(segments: list[Segment], struct_path: Path, offset: int, value: int) -> list[Segment]:
    """Writes a union's discriminant (a u16 at data offset ``offset`` in 16-bit units) in the
    struct at ``struct_path`` (``()`` for the root), which pycapnp cannot do for an
    interface-typed member without a capability. Returns the segments, the written one copied."""
    out = list(segments)
    words = _words(out)
    if struct_path:
        found = _walk(words, struct_path)
        if found is None:
            raise CapWireError(f"no struct at {struct_path!r}")
    else:
        found = (0, 0)
    if len(found) == 2:
        target = _deref(words, found[0], found[1])
        if target is None:
            raise CapWireError(f"null struct at {struct_path!r}")
        segment, start, data_words, _ = _struct(words, target)
    else:
        segment, start, data_words, _ = found
    if offset * 2 + 2 > data_words * 8:
        raise CapWireError("the discriminant lies outside the data section")
    if not isinstance(out[segment], bytearray):
        out[segment] = bytearray(out[segment])
    struct.pack_into("<H", out[segment], start * 8 + offset * 2, value)
    return out


def traversal_budget(segments: Sequence[Segment]) -> int:
    """Words a walk of this message may charge: a tree is walked in its own size (zero-sized
    elements charged a word each, as libcapnp charges them), so a few times that, with room
    for small messages; past libcapnp's default only as far as the message's own size (a
    vat whose max_message_bytes lets larger messages in must be able to read them)."""
    total = sum(len(memoryview(s).cast("B")) // 8 for s in segments)
    return _budget(total)


def _budget(words: int) -> int:
    return min(max(TRAVERSAL_LIMIT_WORDS, words + 65536), 8 * words + 65536)


def scan_caps(
    segments: Sequence[Segment],
    *,
    traversal_limit_words: int | None = None,
    nesting_limit: int = NESTING_LIMIT,
) -> list[tuple[int, int, int]]:
    """Every capability pointer of a message as (segment, word, index), found by walking all
    of it without a schema. Raises CapWireError for any malformed pointer, for two pointers
    whose targets overlap (a DAG or a loop: no Cap'n Proto writer makes one, and it is how a
    small message claims to be a huge tree), and (as libcapnp's readers do) past the
    traversal limit (default: :func:`traversal_budget`) and the nesting limit, so a hostile
    message cannot make this loop, or a reader after it, long."""
    words = _words(segments)
    found: list[tuple[int, int, int]] = []
    budget = traversal_budget(segments) if traversal_limit_words is None else traversal_limit_words
    claimed = [bytearray(len(w)) for w in words]
    # Zero-sized list elements, no more than the message has words (as capwire.c): they take
    # no room, so the budget's floor would let a few words be read as tens of thousands.
    zero_sized = sum(len(w) for w in words)

    def take_zero_sized(count: int, segment: int, word: int) -> None:
        nonlocal zero_sized
        zero_sized -= count
        if zero_sized < 0:
            raise CapWireError(
                "traversal limit exceeded: more zero-sized list elements than the message has words"
                f" (segment {segment}, word {word})"
            )

    def claim(segment: int, start: int, count: int) -> None:
        if count <= 0:
            return
        owner = claimed[segment]
        if owner.find(1, start, start + count) != -1:
            raise CapWireError(f"pointers share content at segment {segment}, word {start}: not a tree")
        owner[start : start + count] = b"\x01" * count

    _check(words, 0, 0, 1)
    pending = [(0, 0, nesting_limit)]
    while pending:
        segment, location, depth = pending.pop()
        target = _deref(words, segment, location)
        if target is None:
            continue
        if depth <= 0:
            raise CapWireError("nesting limit exceeded")
        kind = target[0]
        if kind == 3:
            index = _capability_index(target[3])
            assert index is not None
            found.append((segment, location, index))
        elif kind == 0:
            s, start, data_words, pointer_words = _struct(words, target)
            claim(s, start, data_words + pointer_words)
            budget -= max(data_words + pointer_words, 1)
            pending.extend((s, start + data_words + i, depth - 1) for i in range(pointer_words))
        else:
            s, first, size, count, data_words, pointer_words = _list(words, target)
            if size == 6:
                claim(s, first, count)
                budget -= count
                pending.extend((s, first + i, depth - 1) for i in range(count))
            elif size == 7:
                claim(s, first - 1, 1 + (target[3] >> 35))  # the tag and every word it claims
                step = data_words + pointer_words
                budget -= count * max(step, 1) + 1  # zero-sized elements: a word each
                if not step:
                    take_zero_sized(count, s, first)
                if budget < 0:
                    raise CapWireError("traversal limit exceeded")
                if pointer_words:
                    for e in range(count):
                        base = first + e * step + data_words
                        pending.extend((s, base + i, depth - 1) for i in range(pointer_words))
            else:
                size_words = (count * (0, 1, 8, 16, 32, 64)[size] + 63) // 64
                claim(s, first, size_words)
                budget -= size_words if size else count  # a Void list: a word per element
                if not size:
                    take_zero_sized(count, s, first)
        if budget < 0:
            raise CapWireError("traversal limit exceeded")
    return found


def check_tree(framed: Segment) -> None:
    """Raises CapWireError unless the message (in the stream framing) is a well-formed tree
    within the traversal budget, the same checks as :func:`scan_caps` makes, in C
    (capwire.c). Run on every message an RPC peer receives, before any reader sees it: what
    pycapnp then reads is bounded by the message's own size."""
    _checked(_capwire.lib.capwire_check_tree, framed)


def check_segment(segment: Segment) -> None:
    """:func:`check_tree` for one segment read as a whole message, as a reader handed that
    segment alone sees it: its far pointers land in itself, not in the segments that framed
    it (for a body decoded apart from its envelope's header)."""
    _checked(_capwire.lib.capwire_check_segment, segment)


def check_segments(segments: Sequence[Segment]) -> None:
    """:func:`check_tree` of a message given as its segments (an empty one is allowed: it
    stands in for a segment a body read alone does not have, segments.py)."""
    views = [memoryview(segment).cast("B") for segment in segments]
    ffi = _capwire.ffi
    pointers = ffi.new("uint8_t *[]", [ffi.from_buffer(v) if len(v) else ffi.NULL for v in views])
    sizes = ffi.new("size_t[]", [len(v) for v in views])
    budget = _budget(sum(len(v) for v in views) // 8)
    error = _capwire.lib.capwire_check_segments(pointers, sizes, len(views), budget, NESTING_LIMIT)
    if error:
        raise CapWireError(ffi.string(error).decode())


def _checked(check: Callable[..., Any], data: Segment) -> None:
    view = memoryview(data).cast("B")
    budget = _budget(len(view) // 8)
    error = check(_capwire.ffi.from_buffer(view), len(view), budget, NESTING_LIMIT)
    if error:
        raise CapWireError(_capwire.ffi.string(error).decode())


def strip_caps(segments: Sequence[Segment]) -> tuple[list[Segment], dict[Location, int]]:
    """A copy of the message for pycapnp with every capability pointer nulled (only the
    segments that held one are copied), and a table from pointer location to index. Paths
    resolve the same on the copy, so :func:`lookup_cap` finds the index for a path."""
    found = scan_caps(segments)
    out: list[Segment] = list(segments)
    table: dict[Location, int] = {}
    for segment, word, index in found:
        if not isinstance(out[segment], bytearray):
            out[segment] = bytearray(out[segment])
        struct.pack_into("<Q", out[segment], word * 8, 0)
        table[(segment, word)] = index
    return out, table


def lookup_cap(segments: Sequence[Segment], table: dict[Location, int], path: Path) -> int | None:
    """The capability index :func:`strip_caps` found at ``path``, or None."""
    found = locate(segments, path)
    return None if found is None else table.get(found)


def lookup_cap_list(
    segments: Sequence[Segment], table: dict[Location, int], path: Path
) -> list[int | None] | None:
    """The capability indices of a stripped List(Interface) at ``path``, or None if null."""
    found = _list_at(_words(segments), path)
    if found is None:
        return None
    segment, first, count = found
    return [table.get((segment, first + i)) for i in range(count)]


# -- the standard stream framing, for scatter/gather IO ----------------------------------------


def frame_header(segments: Sequence[Segment]) -> bytes:
    """The segment table that precedes a message's segments in the standard framing."""
    sizes = [len(memoryview(s).cast("B")) // 8 for s in segments]
    header = struct.pack(f"<{len(sizes) + 1}I", len(sizes) - 1, *sizes)
    return header + b"\0" * (len(header) % 8)


def segment_table(view: memoryview, segments_max: int = 512) -> tuple[tuple[int, ...], int]:
    """The sizes in words of a framed message's segments, and where its first segment starts."""
    if len(view) < 8:
        raise CapWireError("message shorter than its segment table")
    count = struct.unpack_from("<I", view, 0)[0] + 1
    if count > segments_max:
        raise CapWireError(f"{count} segments, more than {segments_max}")
    offset = 4 + 4 * count
    if offset > len(view):
        raise CapWireError("message shorter than its segment table")
    offset += offset % 8
    return struct.unpack_from(f"<{count}I", view, 4), offset


def unframe(buffer: Segment, *, segments_max: int = 512, partial: bool = False) -> list[memoryview]:
    """The segments of a framed message, as views into ``buffer`` (no copy). ``partial``:
    ``buffer`` is only the message's start (Message.whole_size): segments are cut to what
    it holds (a pointer past that then fails to read, as any pointer out of bounds)."""
    view = memoryview(buffer).cast("B")
    sizes, offset = segment_table(view, segments_max)
    out = []
    for size in sizes:
        end = offset + size * 8
        if end > len(view):
            if not partial:
                raise CapWireError("message ends before its last segment")
            end = max(offset, len(view))
        out.append(view[offset:end])
        offset = end
    if offset != len(view) and not partial:
        raise CapWireError("bytes after the last segment")
    return out
