"""The tree check every received RPC message passes (capwire.check_tree, in C): the same
verdict as capwire.scan_caps's Python walk on valid and mutated messages, and the two
amplification attacks of the hardening review refused at once:
- F6: a small message whose pointers share lists (a DAG) unfolds into a huge tree;
- F7: a composite list of 2^29 zero-sized elements in a 24-byte message.
"""

from __future__ import annotations

import random
import struct

import pytest

from capbus.rpc import capwire, errors, protocol
from capbus.rpc.capwire import CapWireError

from .services import schema

METHODS = schema.Factory.interface.methods
SAMPLES = [
    protocol.encode_call(1, METHODS["echo"], {"text": "hello" * 20}).payload,
    protocol.encode_exception(2, errors.Failed("no")).payload,
]


def framed(words: list[int], *more: list[int]) -> bytes:
    segments = [struct.pack(f"<{len(w)}Q", *w) for w in (words, *more)]
    return capwire.frame_header(segments) + b"".join(segments)


def python_verdict(payload: bytes) -> str | None:
    try:
        capwire.scan_caps(capwire.unframe(payload))
    except CapWireError as error:
        return str(error)
    return None


def c_verdict(payload: bytes) -> str | None:
    try:
        capwire.check_tree(payload)
    except CapWireError as error:
        return str(error)
    return None


def test_valid_messages_pass() -> None:
    for payload in SAMPLES:
        assert c_verdict(payload) is None
        assert python_verdict(payload) is None


def mutated(rng: random.Random, sample: bytes) -> bytes:
    data = bytearray(sample)
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(data))
        if rng.random() < 0.5:
            data[position] = rng.randrange(256)
        else:
            data[position] ^= 1 << rng.randrange(8)
    return bytes(data)


def test_the_c_check_agrees_with_the_python_walk_on_mutations() -> None:
    rng = random.Random(9)
    disagreements = []
    for _ in range(20000):
        payload = mutated(rng, rng.choice(SAMPLES))
        try:
            capwire.unframe(payload)
        except CapWireError:
            assert c_verdict(payload) is not None  # the framing itself is refused too
            continue
        python, c = python_verdict(payload), c_verdict(payload)
        if (python is None) != (c is None):
            disagreements.append((payload.hex(), python, c))
    assert not disagreements, disagreements[:3]


def test_the_segment_check_agrees_with_the_python_walk_on_one_segment() -> None:
    """check_segment reads one segment as a whole message (a fast-path body, read alone):
    its far pointers land in itself."""
    rng = random.Random(10)
    body = bytes(capwire.unframe(SAMPLES[0])[1])
    disagreements = []
    for _ in range(20000):
        segment = mutated(rng, body)
        try:
            capwire.scan_caps([segment])
            python = None
        except CapWireError as error:
            python = str(error)
        try:
            capwire.check_segment(segment)
            c = None
        except CapWireError as error:
            c = str(error)
        if (python is None) != (c is None):
            disagreements.append((segment.hex(), python, c))
    assert not disagreements, disagreements[:3]


def test_the_segments_check_agrees_with_the_python_walk_on_attached_shapes() -> None:
    """check_segments (a message given as separate segments, as a body with attached
    segments is read: segments.body_alone) against the Python walk, on mutations of a call
    whose Data value reaches a segment of its own through a double-far pointer; the empty
    stand-in segment, and segments that do not start on a word, included."""
    from capbus.memfd import sealed_payload
    from capbus.rpc import segments as attached_segments

    size = attached_segments.ATTACHED_MIN
    value = sealed_payload(size, lambda view: view.__setitem__(slice(None), bytes(size)))
    from .test_attached_segments import SIZE_METHOD  # (a flat struct with a Data param)

    encoded = protocol.encode_call(1, SIZE_METHOD, {"data": value, "note": "n"})
    inline = capwire.unframe(encoded.payload, partial=True)[:-1]
    body = attached_segments.body_alone([*inline, bytes(size)])
    rng = random.Random(11)
    disagreements = []
    for trial in range(5000):
        parts = [bytes(part) for part in body]
        which = rng.choice([0, 2])
        parts[which] = mutated(rng, parts[which])
        if trial % 2:
            parts = [memoryview(b"\0" + part)[1:] for part in parts]  # (unaligned starts)
        try:
            capwire.scan_caps(parts)
            python = None
        except CapWireError as error:
            python = str(error)
        try:
            capwire.check_segments(parts)
            c = None
        except CapWireError as error:
            c = str(error)
        if (python is None) != (c is None):
            disagreements.append((python, c))
    assert not disagreements, disagreements[:3]
    capwire.check_segments(body)  # (the unmutated shape is a valid tree)


def test_shared_lists_are_refused() -> None:
    """F6: a struct with 64 pointers to one 4096-word list: 2.4 KB that reads as 2 MiB."""
    n = 64
    words = [0 | (0 << 2) | (0 << 32) | (n << 48)]
    list_start = 1 + n
    for i in range(n):
        words.append(1 | ((list_start - (1 + i) - 1) << 2) | (5 << 32) | (4096 << 35))
    words += [0] * 4096
    with pytest.raises(CapWireError, match="not a tree"):
        capwire.check_tree(framed(words))


def test_loops_are_refused() -> None:
    loop = [0 | (0 << 2) | (0 << 32) | (1 << 48), 0 | ((-1 & 0x3FFFFFFF) << 2) | (1 << 48)]
    with pytest.raises(CapWireError, match="not a tree"):
        capwire.check_tree(framed(loop))


def test_zero_sized_elements_are_charged_a_word_each() -> None:
    """F7: 2^29 elements of zero words from three words: charged 1 word before, looped over
    element by element."""
    count = (1 << 29) - 1
    words = [1 | (0 << 2) | (7 << 32) | (0 << 35), (count << 2), 0]
    message = framed(words)
    assert len(message) <= 32
    with pytest.raises(CapWireError, match="traversal"):
        capwire.check_tree(message)
    with pytest.raises(CapWireError, match="traversal"):
        capwire.scan_caps(capwire.unframe(message))
    # A Void list, the same.
    void = framed([1 | (0 << 2) | (0 << 32) | (count << 35)])
    with pytest.raises(CapWireError, match="traversal"):
        capwire.check_tree(void)


def test_deep_chains_hit_the_nesting_limit() -> None:
    depth = capwire.NESTING_LIMIT + 2
    words = [0 | (0 << 2) | (0 << 32) | (1 << 48)] * depth + [0]
    with pytest.raises(CapWireError, match="nesting"):
        capwire.check_tree(framed(words))
