"""rpc.capnp's hot messages written and read without pycapnp (capbus/rpc/twopartyflat.py):
what it writes, pycapnp reads as the same message; what pycapnp writes, it reads the same;
any other shape is left to pycapnp (None), hostile ones included."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

import capbus
from capbus.rpc import twopartyflat
from capbus.rpc.errors import Failed
from capbus.rpc.flat import FlatReader
from capbus.rpc.twoparty import (
    NONE,
    Descriptor,
    FrameReader,
    decode,
    encode_call,
    encode_exception,
    encode_finish,
    encode_results,
)

SCHEMA = """
@0xb1e2c3d4e5f60718;
struct Point { x @0 :Int32; y @1 :Int32; }
interface Sample {
  echo @0 (text :Text, count :UInt32, blob :Data, flag :Bool) -> (text :Text, count :UInt32);
  nested @1 (p :Point) -> (p :Point);
  nothing @2 () -> ();
}
"""


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("schema") / "sample.capnp"
    path.write_text(SCHEMA)
    return capbus.load(Path(path)).Sample.interface


def unframed(framed: bytes) -> list[bytes]:
    (message,) = FrameReader().feed(framed)
    return message


def no_caps(value: object) -> Descriptor:
    raise AssertionError(f"no capability expected, got {value!r}")


def test_a_flat_call_reads_in_pycapnp_as_written(sample: Any) -> None:
    method = sample.methods["echo"]
    params = {"text": "hello", "count": 7, "blob": b"\x00\x01", "flag": True}
    framed = twopartyflat.encode_call(41, 9, method, params)
    assert framed is not None
    segments = unframed(framed)
    call = decode(segments, 1 << 20).call
    assert (call.questionId, call.interfaceId, call.methodId) == (41, method.interface_id, method.ordinal)
    assert call.target.which() == "importedCap" and call.target.importedCap == 9
    assert call.sendResultsTo.which() == "caller"
    assert len(call.params.capTable) == 0
    content = call.params.content.as_struct(method.params)
    assert (content.text, content.count, bytes(content.blob), content.flag) == ("hello", 7, b"\0\1", True)


def test_a_flat_call_reads_back_here(sample: Any) -> None:
    method = sample.methods["echo"]
    framed = twopartyflat.encode_call(3, 4, method, {"text": "x" * 100, "count": 1})
    assert framed is not None
    hot = twopartyflat.read(unframed(framed))
    assert isinstance(hot, twopartyflat.HotCall)
    assert (hot.question_id, hot.import_id, hot.interface_id, hot.method_id) == (
        3,
        4,
        method.interface_id,
        method.ordinal,
    )
    view = hot.params.read(method.params, lambda: pytest.fail("read the general way"))
    assert (view.text, view.count, view.flag) == ("x" * 100, 1, False)


def test_a_call_pycapnp_builds_reads_here(sample: Any) -> None:
    method = sample.methods["echo"]
    target = Descriptor("receiverHosted", 5)
    segments, _ = encode_call(12, target, method, {"text": "hi", "count": 2}, no_caps)
    hot = twopartyflat.read([bytes(s) for s in segments])
    assert isinstance(hot, twopartyflat.HotCall)
    assert (hot.question_id, hot.import_id, hot.method_id) == (12, 5, method.ordinal)
    assert hot.params.read(method.params, lambda: pytest.fail("general")).text == "hi"


def test_results_and_finish_round_trip(sample: Any) -> None:
    method = sample.methods["echo"]
    framed = twopartyflat.encode_results(77, method, {"text": "back", "count": 3})
    assert framed is not None
    segments = unframed(framed)
    returned = decode(segments, 1 << 20).__getattr__("return")
    assert returned.answerId == 77 and returned.which() == "results" and not returned.releaseParamCaps
    assert returned.results.content.as_struct(method.results).text == "back"
    hot = twopartyflat.read(segments)
    assert isinstance(hot, twopartyflat.HotReturn) and hot.answer_id == 77 and not hot.release_param_caps
    assert hot.results.read(method.results, lambda: pytest.fail("general")).count == 3
    built, _, _ = encode_results(78, method, {"text": "b"}, no_caps)
    again = twopartyflat.read([bytes(s) for s in built])
    assert isinstance(again, twopartyflat.HotReturn) and again.answer_id == 78
    finish = twopartyflat.encode_finish(5)
    finish_message = decode(unframed(finish), 1 << 20).finish
    assert finish_message.questionId == 5 and not finish_message.releaseResultCaps
    assert twopartyflat.read(unframed(finish)) == twopartyflat.HotFinish(5, False)
    assert twopartyflat.read([bytes(s) for s in encode_finish(6)]) == twopartyflat.HotFinish(6, False)


def test_empty_params_and_results(sample: Any) -> None:
    method = sample.methods["nothing"]
    framed = twopartyflat.encode_call(1, 0, method, {})
    assert framed is not None
    hot = twopartyflat.read(unframed(framed))
    assert isinstance(hot, twopartyflat.HotCall)
    assert isinstance(hot.params.read(method.params, lambda: pytest.fail("general")), FlatReader)
    assert twopartyflat.encode_results(1, method, {}) is not None


def test_what_is_not_flat_goes_the_general_way(sample: Any) -> None:
    nested = sample.methods["nested"]
    assert twopartyflat.encode_call(1, 0, nested, {"p": {"x": 1}}) is None
    assert twopartyflat.encode_results(1, nested, {"p": {"x": 1}}) is None
    echo = sample.methods["echo"]
    assert twopartyflat.encode_call(1, 0, echo, {"count": -1}) is None  # (pycapnp's error to give)
    assert twopartyflat.encode_call(1, 0, echo, {"unknown": 1}) is None
    # Messages of other shapes: pycapnp reads them.
    promised, _ = encode_call(2, Descriptor("receiverAnswer", 1, (0,)), echo, {}, no_caps)
    assert twopartyflat.read([bytes(s) for s in promised]) is None
    with_cap, _ = encode_call(2, Descriptor("receiverHosted", 1), echo, {}, lambda v: NONE)
    assert twopartyflat.read([bytes(s) for s in with_cap]) is not None  # (an empty table)
    assert twopartyflat.read([bytes(s) for s in encode_exception(3, Failed("no"))]) is None


def hostile(framed: bytes, word: int, value: int) -> list[bytes]:
    segment = bytearray(unframed(framed)[0])
    struct.pack_into("<Q", segment, word * 8, value)
    return [bytes(segment)]


@pytest.mark.parametrize(
    ("word", "value"),
    [
        (0, 1 << 2 | 1 << 32 | 1 << 48),  # root pointing one word too far
        (0, 0x3FFFFFFF << 2 | 1 << 32 | 1 << 48),  # root pointing back before the segment
        (2, 0xFFFF << 32 | 0xFFFF << 48),  # a Call larger than the message
        (2, 2),  # a far pointer where the Call should be
        (7, 0x1FFFFFFF << 2 | 2 << 48),  # the Payload far past the end
        (11, 1 << 2 | 0xFFFF << 32),  # the content struct past the end
        (12, 1 | (7 << 32) | (1 << 35)),  # a capability table of one
    ],
)
def test_hostile_shapes_are_left_to_pycapnp_or_bounded(sample: Any, word: int, value: int) -> None:
    method = sample.methods["echo"]
    framed = twopartyflat.encode_call(1, 2, method, {"text": "abc", "count": 5})
    assert framed is not None
    hot = twopartyflat.read(hostile(framed, word, value))
    if hot is None:
        return
    assert isinstance(hot, twopartyflat.HotCall)
    general_used = []

    def general() -> Any:
        general_used.append(True)
        raise ValueError("malformed")

    try:  # (the content's own pointers are checked by the flat reader: bounded or general)
        view = hot.params.read(method.params, general)
        assert isinstance(view.text, str)
    except ValueError:
        assert general_used


def test_truncated_messages_are_none(sample: Any) -> None:
    framed = twopartyflat.encode_call(1, 2, sample.methods["echo"], {"text": "abc"})
    assert framed is not None
    segment = unframed(framed)[0]
    for cut in range(0, len(segment), 8):
        hot = twopartyflat.read([segment[:cut]])
        assert hot is None or isinstance(hot, twopartyflat.HotCall)
