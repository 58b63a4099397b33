"""AnyStruct, AnyList, AnyPointer and Capability fields (capbus/rpc/anypointer.py), with
``capbus.load`` and with a generated module that mypy --strict checks: a struct (holding a
capability) or a list sent as a typed value and read back with ``as_struct``/``as_list``,
Text and Data in an AnyPointer, a received value passed on as it is, a union member that is
an AnyPointer, and each kind refusing what it cannot hold with an error naming the field."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import capbus
from capbus.rpc import anypointer
from capbus.rpc.anypointer import AnyList, AnyPointer, AnyStruct, list_value, struct_value
from capbus.rpc.errors import Failed

from .generated import compile_and_import, mypy_verdicts, serving

HERE = Path(__file__).parent
schema: Any = capbus.load(HERE / "anypointer.capnp")


def _servers(module: Any) -> tuple[Any, Any]:
    class Ping(module.Ping.Server):  # type: ignore[misc,name-defined]
        def __init__(self, n: int) -> None:
            self.n = n

        def ping(self) -> int:
            return self.n

    class Store(module.Store.Server):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.got: list[Any] = []

        def anyStruct(self, value: Any) -> Any:
            self.got.append(value)
            return value

        def anyList(self, value: Any) -> Any:
            self.got.append(value)
            return value

        def anyPointer(self, value: Any) -> Any:
            self.got.append(value)
            return value

        def capability(self, value: Any) -> Any:
            return value

        def either(self, e: Any) -> Any:
            return {"any": e.any} if e.which() == "any" else {"n": e.n + 1}

        def tag(self, name: str, ping: Any) -> Any:
            return anypointer.struct_value(module.Tagged, {"name": name, "ping": ping, "points": [{"x": 1}]})

        async def unpack(self, value: Any) -> dict[str, Any]:
            tagged = value.as_struct(module.Tagged)
            return {"name": tagged.name, "n": (await tagged.ping.ping()).n}

    return Store, Ping


@asynccontextmanager
async def _store(kernel: capbus.Kernel, module: Any, typed: bool) -> AsyncIterator[tuple[Any, Any, Any]]:
    """(a client of a Store, the Store server, the Ping server class)."""
    Store, Ping = _servers(module)
    store = Store()
    async with serving(kernel, store, module.Store, typed) as (client, _):
        yield client, store, Ping


async def _exercise(kernel: capbus.Kernel, module: Any, typed: bool, value_of: Callable[..., Any]) -> None:
    async with _store(kernel, module, typed) as (store, server, Ping):
        # A struct holding a capability and a list of structs, in an AnyStruct: the server
        # reads it as what it is, capability included.
        tagged = value_of(module.Tagged, {"name": "t", "ping": Ping(6), "points": [{"x": 1}, {"y": 2}]})
        assert (await store.unpack(value=tagged)).name == "t"
        assert (await store.unpack(value=tagged)).n == 6
        # Echoed as received: the server passes the AnyStruct it got on, as it is.
        point = (await store.anyStruct(value=value_of(module.Point, {"x": 3, "y": -4}))).value
        assert isinstance(point, AnyStruct) and isinstance(server.got[-1], AnyStruct)
        read = point.as_struct(module.Point)
        assert (read.x, read.y) == (3, -4)
        # A list of structs and a list of numbers in an AnyList.
        points = (await store.anyList(value=list_value(module.Point, [{"x": 1}, {"x": 2, "y": 9}]))).value
        assert isinstance(points, AnyList)
        assert [(p.x, p.y) for p in points.as_list(module.Point)] == [(1, 0), (2, 9)]
        numbers = (await store.anyList(value=list_value("Int64", [1, -2, 1 << 40]))).value
        assert numbers.as_list("Int64") == [1, -2, 1 << 40]
        # An AnyPointer: a struct, Text, Data, a list of Text, a capability.
        got = (await store.anyPointer(value=value_of(module.Point, {"x": 8}))).value
        assert isinstance(got, AnyPointer) and got.as_struct(module.Point).x == 8
        assert (await store.anyPointer(value="text")).value.as_text() == "text"
        assert (await store.anyPointer(value=b"\x00data\xff")).value.as_data() == b"\x00data\xff"
        words = (await store.anyPointer(value=list_value("Text", ["a", "bc"]))).value
        assert words.as_list("Text") == ["a", "bc"]
        pinged = (await store.anyPointer(value=Ping(9))).value
        assert (await pinged.ping()).n == 9
        # A struct (holding a capability) read from one call's results, sent in another
        # call's params (by its fields: its capability too).
        made = (await store.tag(name="made", ping=Ping(11))).value.as_struct(module.Tagged)
        assert (made.name, [p.x for p in made.points]) == ("made", [1])
        unpacked = await store.unpack(value=made)
        assert (unpacked.name, unpacked.n) == ("made", 11)
        # A union member that is an AnyPointer.
        either = (await store.either(e={"any": value_of(module.Point, {"y": 5})})).e
        assert either.which() == "any" and either.any.as_struct(module.Point).y == 5
        assert (await store.either(e={"n": 1})).e.n == 2
        # Null: None.
        assert (await store.anyStruct()).value is None
        assert (await store.capability()).value is None


async def test_any_pointers_with_capbus_load(kernel: capbus.Kernel) -> None:
    await _exercise(kernel, schema, False, struct_value)


async def test_any_pointers_with_a_generated_module(
    kernel: capbus.Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, source = compile_and_import(HERE / "anypointer.capnp", tmp_path)
    assert "def value(self) -> _anypointer.AnyStruct | None:" in source
    await _exercise(kernel, module, True, lambda type_, fields: type_.new_value(fields))
    # (struct_value takes generated classes too)
    await _exercise(kernel, module, True, struct_value)
    monkeypatch.syspath_prepend(str(tmp_path))
    refused = mypy_verdicts(tmp_path, USER, WRONG, 3)
    assert 'Argument "value" to "__call__" of "AnyStructMethod" has incompatible type "ListValue"' in refused
    assert '"AnyStruct" has no attribute "as_list"' in refused
    assert 'TypedDict item "x" has type "int"' in refused


USER = """
from __future__ import annotations
from collections.abc import Sequence
from capbus.rpc.anypointer import list_value
import anypointer_capnp as m


async def use(store: m.Store) -> int:
    value = (await store.anyStruct(value=m.Point.new_value({"x": 1}))).value
    assert value is not None
    point: m.Point = value.as_struct(m.Point)
    items = (await store.anyList(value=list_value(m.Point, [{"x": 1}]))).value
    assert items is not None
    listed: Sequence[m.Point] = items.as_list(m.Point)
    return point.x + listed[0].y
"""


WRONG = """
from __future__ import annotations
from capbus.rpc.anypointer import list_value
import anypointer_capnp as m


async def use(store: m.Store) -> None:
    value = (await store.anyStruct(value=list_value("Int8", [1]))).value
    assert value is not None
    value.as_list(m.Point)
    m.Point.new_value({"x": "one"})
"""


@pytest.mark.parametrize(
    ("method", "value", "message"),
    [
        (
            "anyStruct",
            lambda: list_value("Int8", [1]),
            "param 'value' of Store.anyStruct: an AnyStruct takes a struct",
        ),
        ("anyStruct", lambda: "text", "an AnyStruct takes a struct"),
        ("anyList", lambda: struct_value(schema.Point, {}), "an AnyList takes a list"),
        ("anyList", lambda: [1, 2], "an AnyList takes a list (capbus.list_value), not list"),
        ("capability", lambda: "text", "a Capability takes a client or a server, not str"),
        ("anyPointer", lambda: {"x": 1}, "an AnyPointer takes a struct, a list, Text, Data or a capability"),
    ],
)
async def test_each_kind_refuses_what_it_cannot_hold(
    kernel: capbus.Kernel, method: str, value: Callable[[], Any], message: str
) -> None:
    async with _store(kernel, schema, False) as (store, _, _):
        with pytest.raises(
            TypeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")
        ):
            await getattr(store, method)(value=value())
        assert (await store.anyPointer(value="still serving")).value.as_text() == "still serving"


async def test_reading_a_value_as_what_it_is_not_names_the_field(kernel: capbus.Kernel) -> None:
    async with _store(kernel, schema, False) as (store, _, _):
        text = (await store.anyPointer(value="text")).value
        with pytest.raises(ValueError, match="value is not a struct"):
            text.as_struct(schema.Point)
        with pytest.raises(ValueError, match="unknown list element type 'Int33'"):
            text.as_list("Int33")
        with pytest.raises(TypeError, match="not a struct type"):
            text.as_struct(schema.Ping)


async def test_a_received_struct_holding_a_capability_passed_on_as_it_is_says_why_not(
    kernel: capbus.Kernel,
) -> None:
    """A received AnyStruct is passed on by copying it; the capabilities inside cannot be
    found without its type, so the copy is refused (with what to do) rather than sent
    without them; read it with as_struct and send that instead."""
    async with _store(kernel, schema, False) as (store, server, Ping):
        tagged = struct_value(schema.Tagged, {"name": "t", "ping": Ping(2)})
        with pytest.raises(
            Failed, match="result 'value' of Store.anyStruct: .*read it with as_struct or as_list first"
        ):
            await store.anyStruct(value=tagged)  # (the server echoes what it got)
        assert isinstance(server.got[-1], AnyStruct)


def test_list_value_refuses_an_unknown_element_type() -> None:
    with pytest.raises(ValueError, match="unknown list element type 'Point'"):
        list_value("Point", [])
    with pytest.raises(TypeError, match="not a struct type"):
        struct_value(int, {})
    assert "Int32" in anypointer.PRIMITIVES
