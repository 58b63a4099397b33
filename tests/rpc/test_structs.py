"""Struct views: capabilities set and read by field name, through the schema's layout."""

from __future__ import annotations

import pytest

from capbus.rpc import capwire
from capbus.rpc.capwire import CapWireError
from capbus.rpc.layout import FieldKind, layout_of
from capbus.rpc.structs import CapTableReader, StructBuilder, StructReader

from .test_capwire import build_reference, demo, fill_plain

HOLDER = layout_of(demo.Holder.schema)


class Cap:
    """Stands for a client object: the views only need identity."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def build_with_views(first_words: int | None, caps: list[Cap]) -> tuple[list[bytes], list[object]]:
    kwargs = {"num_first_segment_words": first_words} if first_words else {}
    message = demo.Holder.new_message(**kwargs)
    fill_plain(message, b"")
    view = StructBuilder.root(message, HOLDER)
    view.single = caps[0]
    view.many[0] = caps[1]  # the list fill_plain allocated
    view.many[2] = caps[2]
    view.entries[0].cap = caps[3]
    view.entries[2].cap = caps[4]
    view.group.inner = caps[5]
    view.capInUnion = caps[6]
    segments, table = view.finish()
    return [bytes(s) for s in segments], table


def test_layout_knows_where_capabilities_are() -> None:
    fields = HOLDER.fields
    assert fields["single"].kind is FieldKind.CAPABILITY
    assert fields["many"].kind is FieldKind.CAPABILITY_LIST
    assert fields["entries"].kind is FieldKind.STRUCT_LIST and fields["entries"].nested is not None
    assert fields["group"].kind is FieldKind.GROUP
    assert fields["capInUnion"].discriminant is not None
    assert fields["label"].kind is FieldKind.PLAIN
    assert HOLDER.may_hold_caps and HOLDER.has_union
    assert not layout_of(demo.Echo.schema.methods["echo"].param_type).may_hold_caps


@pytest.mark.parametrize("first_words", [None, 2])
def test_views_write_what_libcapnp_writes(first_words: int | None) -> None:
    caps = [Cap(f"c{i}") for i in range(7)]
    ours, table = build_with_views(first_words, caps)
    assert ours == build_reference(first_words, b"")
    assert table == caps


def test_same_capability_twice_gets_one_index() -> None:
    shared = Cap("shared")
    message = demo.Holder.new_message()
    view = StructBuilder.root(message, HOLDER)
    view.single = shared
    view.many = [shared, shared]
    segments, table = view.finish()
    assert table == [shared]
    assert capwire.read_cap_list(segments, (("p", HOLDER.fields["many"].slot),)) == [0, 0]


def test_reader_resolves_capabilities_by_field() -> None:
    caps = [Cap(f"c{i}") for i in range(7)]
    segments, table = build_with_views(2, caps)
    attached = CapTableReader.strip(segments, table)
    reader = StructReader(demo.Holder.from_segments(attached.segments), HOLDER, attached)
    assert reader.id == 42 and reader.label == "holder"
    assert reader.single is caps[0]
    assert reader.many == [caps[1], None, caps[2]]
    assert [e.cap for e in reader.entries] == [caps[3], None, caps[4]]
    assert [e.name for e in reader.entries] == ["entry 0", "entry 1", "entry 2"]
    assert reader.group.inner is caps[5] and reader.group.note == "in a group"
    assert reader.which() == "capInUnion" and reader.capInUnion is caps[6]
    with pytest.raises(AttributeError):
        _ = reader.text  # not the union member that is set


def test_index_past_the_attached_handles_is_refused() -> None:
    caps = [Cap(f"c{i}") for i in range(7)]
    segments, _ = build_with_views(None, caps)
    with pytest.raises(CapWireError, match="past the 3 attached"):
        CapTableReader.strip(segments, caps[:3])
