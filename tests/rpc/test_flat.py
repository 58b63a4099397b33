"""The flat struct writer (capbus/rpc/flat.py): what it writes, pycapnp reads back as the
values given, for every plain kind and with defaults; anything it does not take exactly
as pycapnp would goes the general way (None), and structs that are not flat have no codec."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

import capnp
import pytest

from capbus.rpc import capwire, header, protocol
from capbus.rpc.flat import FlatReader, flat_codec
from capbus.rpc.structs import CapTableReader

from .services import schema as calls

flat: Any = capnp.load(str(Path(__file__).with_name("flat.capnp")))

RANGES = {
    "i8": (-(2**7), 2**7 - 1),
    "i16": (-(2**15), 2**15 - 1),
    "i32": (-(2**31), 2**31 - 1),
    "i64": (-(2**63), 2**63 - 1),
    "u8": (0, 2**8 - 1),
    "u16": (0, 2**16 - 1),
    "u32": (0, 2**32 - 1),
    "u64": (0, 2**64 - 1),
}


def read(schema: Any, segment: bytes) -> Any:
    capwire.check_segment(memoryview(segment))  # a tree within its segment, as a vat checks it
    return schema.from_segments([segment])


def random_every(rng: random.Random) -> dict[str, Any]:
    values: dict[str, Any] = {
        name: rng.choice([low, high, 0, rng.randint(low, high)]) for name, (low, high) in RANGES.items()
    }
    values["f32"] = struct.unpack("<f", struct.pack("<f", rng.uniform(-1e6, 1e6)))[0]  # representable
    values["f64"] = rng.uniform(-1e300, 1e300)
    values["yes"], values["no"] = rng.random() < 0.5, rng.random() < 0.5
    values["color"] = rng.choice(["red", "green", "blue", 0, 1, 2])
    values["text"] = "".join(rng.choice("aé€𝄞 \n") for _ in range(rng.randint(0, 40)))
    values["data"] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
    for name in rng.sample(sorted(values), rng.randint(0, 4)):
        del values[name]  # fields not given read as their defaults
    return values


def test_every_plain_kind_reads_back_as_written() -> None:
    codec = flat_codec(flat.Every.schema)
    assert codec is not None
    for seed in range(300):
        values = random_every(random.Random(seed))
        segment = codec.encode(values)
        assert segment is not None, seed
        reader = read(flat.Every, segment)
        for name, value in values.items():
            got = getattr(reader, name)
            if name == "color":
                names = ["red", "green", "blue"]
                assert str(got) == (value if isinstance(value, str) else names[value]), seed
            else:
                assert got == value, (seed, name)
        for name in set(RANGES) - set(values):
            assert getattr(reader, name) == 0, (seed, name)


def test_defaults_read_back_when_not_given_and_are_overridden_when_given() -> None:
    codec = flat_codec(flat.Defaults.schema)
    assert codec is not None
    empty = read(flat.Defaults, codec.encode({}) or b"")
    assert (empty.count, empty.big, empty.on, str(empty.color), empty.name) == (
        -5,
        1234567890123,
        True,
        "green",
        "default",
    )
    given = {"count": 7, "big": 0, "on": False, "color": "red", "name": "mine"}
    reader = read(flat.Defaults, codec.encode(given) or b"")
    assert (reader.count, reader.big, reader.on, str(reader.color), reader.name) == (
        7,
        0,
        False,
        "red",
        "mine",
    )


@pytest.mark.parametrize(
    "values",
    [
        {"i8": 128},  # out of range
        {"u8": -1},
        {"u64": 2**64},
        {"i32": 1.5},  # not an int
        {"i32": True},  # a bool is not taken as an int
        {"yes": 1},  # nor an int as a bool
        {"color": "purple"},  # no such enumerant
        {"color": 7},
        {"text": b"bytes"},  # Text takes str only
        {"text": "a\0b"},  # (a NUL: pycapnp's to say)
        {"data": "str"},  # Data takes bytes-like only
        {"f64": "1.0"},
        {"unknown": 1},  # no such field
        {"nothing": 1},  # Void takes None only
    ],
)
def test_what_it_does_not_take_exactly_goes_the_general_way(values: dict[str, Any]) -> None:
    codec = flat_codec(flat.Every.schema)
    assert codec is not None
    assert codec.encode(values) is None


@pytest.mark.parametrize(
    "name",
    [
        "WithUnion",
        "WithGroup",
        "WithList",
        "WithStruct",
        "WithFloatDefault",
        "WithAnyPointer",
        "WithCapability",
    ],
)
def test_a_struct_that_is_not_flat_has_no_codec(name: str) -> None:
    assert flat_codec(getattr(flat, name).schema) is None


def test_a_call_written_flat_decodes_as_the_general_way_writes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    echo = calls.Factory.interface.methods["echo"]
    fast = protocol.encode_call(9, echo, {"text": "same either way"})
    assert header.read(capwire.unframe(fast.payload)) is not None  # the split shape
    monkeypatch.setattr(protocol, "flat_codec", lambda schema: None)
    general = protocol.encode_call(9, echo, {"text": "same either way"})
    for encoded in (fast, general):
        received = protocol.decode(encoded.payload, ["reply"])
        assert isinstance(received, protocol.ReceivedCall)
        assert received.params(echo.params).text == "same either way"
    assert fast.payload == general.payload  # libcapnp lays it out the same way


# -- reading ------------------------------------------------------------------------------------

PLAIN_FIELDS = list(flat.Plain.schema.fields)


def views(schema: Any, segment: bytes) -> tuple[Any, Any]:
    """The flat reader and the general (pycapnp) reader of one body segment; for a body
    neither can read at all, both raise the same (and this returns Nones)."""
    body = protocol.Body([memoryview(segment)], CapTableReader.direct([memoryview(segment)], []))
    try:
        general = body._general(schema)
    except Exception as error:  # noqa: BLE001 - then the fast way must fail alike
        with pytest.raises(type(error)):
            body.struct(schema)
        return None, None
    return body.struct(schema), general


def outcome(view: Any, name: str) -> Any:
    try:
        value = getattr(view, name)
    except Exception as error:  # noqa: BLE001 - compared as outcomes
        return ("error", type(error).__name__)
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))  # (a NaN equals itself here)
    return ("value", value)


def random_plain(rng: random.Random) -> dict[str, Any]:
    values = random_every(rng)
    values.pop("color", None)
    if rng.random() < 0.5:
        values["withDefault"] = rng.randint(-(2**31), 2**31 - 1)
        values["on"] = rng.random() < 0.5
        values["name"] = "n" * rng.randint(0, 9)
        values["blob"] = bytes(rng.randint(0, 9))
    return values


def test_a_flat_body_reads_as_pycapnp_reads_it() -> None:
    codec = flat_codec(flat.Plain.schema)
    assert codec is not None and codec.reader_class is not None
    for seed in range(300):
        values = random_plain(random.Random(seed))
        segment = codec.encode(values)
        assert segment is not None
        fast, general = views(flat.Plain.schema, segment)
        assert isinstance(fast, FlatReader)
        for name in PLAIN_FIELDS:
            assert outcome(fast, name) == outcome(general, name), (seed, name)
        assert not fast._made  # all read without pycapnp


def test_any_body_a_vat_would_accept_reads_as_pycapnp_reads_it() -> None:
    """Mutated bodies (what a hostile writer may send), kept when they pass the tree check
    a vat makes: every field reads to the same value or fails as pycapnp's reading does."""
    codec = flat_codec(flat.Plain.schema)
    assert codec is not None
    rng = random.Random(1)
    checked = 0
    while checked < 1500:
        segment = bytearray(codec.encode(random_plain(rng)) or b"")
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(segment))
            segment[at] = rng.choice([rng.randrange(256), segment[at] ^ (1 << rng.randrange(8)), 0, 0xFF])
        try:
            capwire.check_segment(memoryview(bytes(segment)))
        except capwire.CapWireError:
            continue
        checked += 1
        fast, general = views(flat.Plain.schema, bytes(segment))
        for name in PLAIN_FIELDS if fast is not None else ():
            assert outcome(fast, name) == outcome(general, name), (bytes(segment).hex(), name)


def test_a_body_from_an_older_or_newer_schema_reads_its_defaults_and_fields() -> None:
    older = flat_codec(flat.Older.schema)
    assert older is not None
    segment = older.encode({"i8": -3, "i16": 300, "text": "from before"}) or b""
    fast, general = views(flat.Plain.schema, segment)  # read with the newer schema
    for name in PLAIN_FIELDS:
        assert outcome(fast, name) == outcome(general, name), name
    assert (fast.i8, fast.i16, fast.i32, fast.withDefault, fast.on, fast.name, fast.blob) == (
        -3,
        300,
        0,
        -5,
        True,
        "default",
        b"\x01\x02",
    )
    newer = flat_codec(flat.Plain.schema)
    assert newer is not None
    fast, general = views(flat.Older.schema, newer.encode({"i8": 1, "u64": 5, "text": "x"}) or b"")
    for name in flat.Older.schema.fields:
        assert outcome(fast, name) == outcome(general, name), name


def test_a_null_root_reads_as_every_default_and_a_far_root_the_general_way() -> None:
    fast, general = views(flat.Plain.schema, bytes(8))
    assert (fast.withDefault, fast.name, fast.text) == (-5, "default", "")
    far = struct.pack("<QQ", 2 | (1 << 3), 0)  # a far pointer (landing pad at word 1)
    fast, general = views(flat.Plain.schema, far)
    assert not isinstance(fast, FlatReader)
    for name in PLAIN_FIELDS:
        assert outcome(fast, name) == outcome(general, name), name


def test_what_only_pycapnp_offers_comes_through_it() -> None:
    codec = flat_codec(flat.Plain.schema)
    assert codec is not None
    fast, _ = views(flat.Plain.schema, codec.encode({"i32": 7}) or b"")
    assert fast.pycapnp.i32 == 7
    assert fast.i32 == 7
    assert flat_codec(flat.Every.schema).reader_class is None  # type: ignore[union-attr]  # (its enum)
