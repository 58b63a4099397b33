"""The rpc.capnp connection engine (capbus/rpc/streamengine.py) driven with bytes alone, as
a transport would drive it: no socket, no trio. What a peer's messages mean (events), what
the engine answers (framed messages), and its tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import capbus
from capbus.rpc import streamengine, twopartyflat
from capbus.rpc.client import Client
from capbus.rpc.streamengine import (
    CallArrived,
    FinishArrived,
    ProtocolError,
    ReturnArrived,
    Send,
    StreamEngine,
)
from capbus.rpc.twoparty import FrameReader, decode, encode_bootstrap, encode_release, frame, rpc

echo: Any = capbus.load(Path(__file__).parents[1] / "serving" / "echo.capnp")


class Echo(echo.Echo.Server):  # type: ignore[misc,name-defined]
    def echo(self, text: str) -> str:
        return text


def unframed(framed: bytes) -> Any:
    (segments,) = FrameReader().feed(framed)
    return decode(segments, 1 << 20)


class Harness:
    """An engine serving Echo, and what it posted (Finish, Release) outside receive()."""

    def __init__(self) -> None:
        self.posted: list[bytes] = []
        self.engine = StreamEngine(
            object(),  # (the driver: only clients made here hold it)
            Echo(),
            max_message_bytes=1 << 20,
            post=lambda framed, sent: (self.posted.append(framed), sent and sent()),
            promised=lambda answer, transform: streamengine.PromisedServer(
                self.engine.generic, answer, transform
            ),
        )

    def feed(self, framed: bytes) -> list[streamengine.Event]:
        (segments,) = FrameReader().feed(framed)
        return self.engine.receive(segments)

    def bootstrap(self, question_id: int = 0) -> int:
        (sent,) = self.feed(frame(encode_bootstrap(question_id)))
        assert isinstance(sent, Send) and sent.answered is not None
        returned = unframed(sent.framed).__getattr__("return")
        return int(returned.results.capTable[0].senderHosted)


def echo_call(question_id: int, export: int, text: str, *, no_pipelining: bool) -> bytes:
    method = echo.Echo.interface.methods["echo"]
    framed = twopartyflat.encode_call(
        question_id, export, method, {"text": text}, no_pipelining=no_pipelining
    )
    assert framed is not None
    return framed


def test_a_call_is_an_event_and_its_results_a_return() -> None:
    harness = Harness()
    export = harness.bootstrap()
    assert harness.engine.exports[export].references == 1
    (arrived,) = harness.feed(echo_call(1, export, "hi", no_pipelining=True))
    assert isinstance(arrived, CallArrived) and isinstance(arrived.where, Client)
    method = arrived.where.interface.by_key[arrived.key]
    assert arrived.params(method.params).text == "hi"
    framed = harness.engine.results(1, arrived.answer, method, {"text": "hi"})
    framed = harness.engine.settle(1, arrived.answer, framed)
    returned = unframed(framed).__getattr__("return")
    assert returned.noFinishNeeded and returned.answerId == 1
    assert 1 not in harness.engine.answers  # forgotten as it went
    assert harness.feed(twopartyflat.encode_finish(1)) == []  # a late Finish: ignored


def test_a_finish_cancels_a_running_call_and_an_unknown_one_is_refused() -> None:
    harness = Harness()
    export = harness.bootstrap()
    (arrived,) = harness.feed(echo_call(1, export, "slow", no_pipelining=False))
    assert isinstance(arrived, CallArrived)
    (finish,) = harness.feed(twopartyflat.encode_finish(1))
    assert isinstance(finish, FinishArrived) and finish.answer is arrived.answer
    with pytest.raises(ProtocolError, match="a Finish for question 9"):
        harness.feed(twopartyflat.encode_finish(9))
    with pytest.raises(ProtocolError, match="asked twice"):
        harness.feed(echo_call(1, export, "again", no_pipelining=False))


def test_releases_count_exports_down() -> None:
    harness = Harness()
    export = harness.bootstrap(0)
    harness.bootstrap(1)
    assert harness.engine.exports[export].references == 2
    assert harness.feed(frame(encode_release(export, 1))) == []
    assert harness.engine.exports[export].references == 1
    with pytest.raises(ProtocolError, match="Release of export"):
        harness.feed(frame(encode_release(export, 2)))


def test_our_question_returned_and_finished() -> None:
    harness = Harness()
    method = echo.Echo.interface.methods["echo"]
    peer_object = harness.engine.client_class(echo.Echo.interface)(harness.engine.vat, 5)
    target = harness.engine.target(peer_object)
    assert target is not None and target.id == 5
    done: list[Any] = []
    question_id, question, framed = harness.engine.call(
        peer_object, target, method, {"text": "out"}, done, no_pipelining=False
    )
    call = unframed(framed).call
    assert call.target.importedCap == 5 and not call.noPromisePipelining
    results = twopartyflat.encode_results(question_id, method, {"text": "back"})
    assert results is not None
    (arrived,) = harness.feed(results)
    assert isinstance(arrived, ReturnArrived) and arrived.question is question
    assert arrived.returned.results is not None and arrived.returned.results.text == "back"
    (finish,) = harness.posted  # (its Finish: the id is free once it is out)
    assert unframed(finish).finish.questionId == question_id
    assert question_id not in harness.engine.questions


def test_an_abort_and_an_unknown_message_kind() -> None:
    harness = Harness()
    message = rpc.Message.new_message()
    abort = message.init("abort")
    abort.reason = "bye"
    (aborted,) = harness.feed(frame(list(message.to_segments())))
    assert isinstance(aborted, streamengine.Aborted) and aborted.reason == "bye"
    message = rpc.Message.new_message()
    message.init("provide").questionId = 3
    (answer,) = harness.feed(frame(list(message.to_segments())))
    assert isinstance(answer, Send) and unframed(answer.framed).which() == "unimplemented"
