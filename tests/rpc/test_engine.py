"""The engine without IO: fed hand-made peer messages, it answers with events."""

from __future__ import annotations

from typing import Any

from capbus.peer import Handle, Message, MessageKind
from capbus.rpc import errors, protocol
from capbus.rpc.engine import CallArrived, Engine, FinishArrived, MayRetire, Returned, Send

from .services import FactoryServer, schema
from .test_hostile_calls import CALL, PARAMS, with_word

ECHO = schema.Factory.interface.methods["echo"]
REPLY_NODE = 0x9
FACTORY_NODE = 0x11
CALLER_REPLY = 0x1B  # the caller's reply node, as a handle in this peer


class Owner:
    """Stands for the peer that Handles belong to."""


def message(
    kind: MessageKind, destination: int, payload: bytes = b"", handles: tuple[int, ...] = ()
) -> Message:
    owner: Any = Owner()
    return Message(
        kind, Handle(owner, destination), memoryview(payload), tuple(Handle(owner, h) for h in handles)
    )


def engine() -> tuple[Engine, list[int]]:
    woken: list[int] = []
    e = Engine(REPLY_NODE, max_message_bytes=1 << 20, on_release=lambda: woken.append(1))
    e.exported(FactoryServer(), FACTORY_NODE)
    return e, woken


def test_a_call_arrives_and_its_reply_capability_is_counted() -> None:
    e, woken = engine()
    call = protocol.encode_call(5, ECHO, {"text": "hi"})
    (event,) = e.receive(message(MessageKind.DATA, FACTORY_NODE, call.payload, (CALLER_REPLY,)))
    assert isinstance(event, CallArrived)
    assert event.method is ECHO and event.question_id == 5
    assert event.reply is not None and event.reply.handle == CALLER_REPLY
    assert set(e.answers) == {(CALLER_REPLY, 5)}
    # The reply client owns the kernel reference it arrived with. It is kept while its
    # caller calls (references are released in batches), and let go when the caller's
    # reply node is destroyed: then its reference is released, and the call it was to
    # answer is canceled (no one is left to answer).
    del event
    assert e.take_releases() == {}
    assert e.receive(message(MessageKind.NODE_DESTROYED, CALLER_REPLY)) == [FinishArrived((CALLER_REPLY, 5))]
    assert e.take_releases() == {CALLER_REPLY: 1} and woken


def test_a_return_answers_its_question_and_a_destroy_fails_the_rest() -> None:
    e, _ = engine()
    first = e.ask(0x23, ECHO)
    second = e.ask(0x23, ECHO)
    returned = protocol.encode_results(first, ECHO, {"text": "back"})
    (event,) = e.receive(message(MessageKind.DATA, REPLY_NODE, returned.payload))
    assert isinstance(event, Returned) and event.question_id == first
    assert event.results is not None and event.results.text == "back"
    (gone,) = e.receive(message(MessageKind.NODE_DESTROYED, 0x23))
    assert isinstance(gone, Returned) and gone.question_id == second
    assert isinstance(gone.error, errors.Disconnected)
    assert e.questions == {}


def test_malformed_params_are_refused_on_arrival() -> None:
    e, _ = engine()
    call = protocol.encode_call(6, ECHO, {"text": "hi"})
    broken = with_word(call.payload, (("p", CALL), ("p", PARAMS)), 0 | (1000 << 2) | (1 << 32))
    # The whole message is checked as it arrives (a tree within its size): the caller, whom
    # the header names, is answered Failed at once; no handler sees it.
    (event,) = e.receive(message(MessageKind.DATA, FACTORY_NODE, broken, (CALLER_REPLY,)))
    assert isinstance(event, Send)
    answer = protocol.decode(event.encoded.payload, [])
    assert isinstance(answer, protocol.ReceivedReturn) and isinstance(answer.error, errors.Failed)
    assert answer.error.reason.startswith("malformed message:") and "out of bounds" in answer.error.reason


def test_an_unreadable_reply_capability_gets_an_exception_to_send() -> None:
    e, _ = engine()
    call = protocol.encode_call(7, ECHO, {"text": "hi"})
    # The reply capability's index points past the one handle attached: refused, and
    # answered (the header is readable) to... nobody: the reply capability is the bad one.
    assert e.receive(message(MessageKind.DATA, FACTORY_NODE, call.payload, ())) == []


def test_release_of_an_export_asks_to_retire_it() -> None:
    e, _ = engine()
    assert e.receive(message(MessageKind.NODE_RELEASED, FACTORY_NODE)) == [MayRetire(FACTORY_NODE)]
    before = e.sends_of(FACTORY_NODE)
    assert before is not None
    e.sending([FACTORY_NODE], True)
    assert e.sends_of(FACTORY_NODE) is None  # a send of ours carries it right now
    assert not e.retire(FACTORY_NODE, holders=0, sends=before)
    e.sending([FACTORY_NODE], False)
    # A send since the holders were asked for: they may not count its receiver.
    assert not e.retire(FACTORY_NODE, holders=0, sends=before)
    now = e.sends_of(FACTORY_NODE)
    assert now is not None
    assert not e.retire(FACTORY_NODE, holders=1, sends=now)
    assert e.retire(FACTORY_NODE, holders=0, sends=now) and e.exports == {}
