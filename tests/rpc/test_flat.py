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
from capbus.rpc.flat import flat_codec

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
