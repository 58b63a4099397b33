"""The RPC envelope (schemas/capbus/rpc.capnp) carries a reply capability and a params struct
with capabilities of its own, all indexing one table of attached handles."""

from __future__ import annotations

from capbus.rpc import capwire
from capbus.rpc.envelope import rpc
from capbus.rpc.layout import layout_of
from capbus.rpc.structs import CapTableReader, StructBuilder, StructReader

from .test_capwire import demo

ENVELOPE = layout_of(rpc.Envelope.schema)


class Cap:
    pass


def test_call_with_capabilities_in_params_round_trips() -> None:
    reply, echo = Cap(), Cap()
    message = rpc.Envelope.new_message()
    envelope = StructBuilder.root(message, ENVELOPE)
    call = envelope.init("call")
    call.questionId = 7
    call.interfaceId = demo.Echo.schema.node.id
    call.methodId = 0
    call.replyTo = reply
    params = call.any_struct("params", demo.Entry.schema)
    params.name = "entry"
    params.cap = echo
    params.cap = echo  # set again: the last value wins, one pointer
    segments, table = envelope.finish()
    assert table == [reply, echo]
    assert sorted(i for *_, i in capwire.scan_caps(segments)) == [0, 1]

    wire = capwire.frame_header(segments) + b"".join(bytes(s) for s in segments)
    attached = CapTableReader.strip(capwire.unframe(wire), table)
    received = StructReader(rpc.Envelope.from_segments(attached.segments), ENVELOPE, attached)
    assert received.which() == "call"
    got = received.call
    assert (got.questionId, got.methodId) == (7, 0)
    assert got.replyTo is reply
    assert got.target.which() == "node"
    entry = got.any_struct("params", demo.Entry.schema)
    assert entry.name == "entry" and entry.cap is echo


def test_return_with_exception() -> None:
    message = rpc.Envelope.new_message()
    envelope = StructBuilder.root(message, ENVELOPE)
    returned = envelope.init("return")
    returned.questionId = 9
    exception = returned.init("exception")
    exception.reason = "no such method"
    exception.type = "unimplemented"
    segments, table = envelope.finish()
    assert table == []
    attached = CapTableReader.strip(segments, [])
    received = StructReader(rpc.Envelope.from_segments(attached.segments), ENVELOPE, attached)
    assert received.which() == "return"
    exception_read = getattr(received, "return").exception
    assert (exception_read.type, exception_read.reason) == ("unimplemented", "no such method")
