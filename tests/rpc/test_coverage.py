"""Schema constructs through ``capbus.load`` at run time (issue 11): imported structs and
enums read like local ones, enums as their names (str) on both sides, constants, a
``Capability`` or ``AnyPointer`` field holding a capability (and the same object coming
home), a generic interface's brand (``Box(Ping)``: its ``V`` is a Ping), an interface that
extends several others."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import capbus

from .generated import compile_and_import, mypy_verdicts, serving

HERE = Path(__file__).parent
schema: Any = capbus.load(HERE / "coverage.capnp")
types: Any = capbus.load(HERE / "coverage_types.capnp")


def _servers(module: Any) -> Any:
    """The servers of the coverage schema, on ``module``'s bases (capbus.load's or a
    generated module's)."""

    class Ping(module.Ping.Server):  # type: ignore[misc,name-defined]
        def __init__(self, n: int) -> None:
            self.n = n

        def ping(self) -> int:
            return self.n

    class Box(module.Box.Server):  # type: ignore[misc,name-defined]
        def __init__(self, value: Any) -> None:
            self.value = value

        def get(self) -> Any:
            return self.value

    class Both(module.AB.Server):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.heard: list[str] = []

        def a(self) -> None:
            self.heard.append("a")

        def b(self) -> None:
            self.heard.append("b")

        def ab(self) -> None:
            self.heard.append("ab")

    class Cov(module.Cov.Server):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.seen: list[object] = []
            self.two = Both()

        def move(self, p: Any) -> dict[str, Any]:
            self.seen.append(p.color)
            return {"x": p.x + 1, "y": p.y, "color": p.color}

        def paint(self, c: str) -> str:
            self.seen.append(c)
            return {"red": "green", "green": "blue", "blue": "red"}[c]

        def anyCap(self, cap: Any) -> Any:
            return cap

        def anyPtr(self, ptr: Any) -> Any:
            return ptr

        def boxed(self) -> Box:
            return Box(Ping(41))

        def local(self, l: Any) -> dict[str, Any]:  # noqa: E741 - the schema's name
            return {"c": l.c, "p": {"x": l.p.x * 2, "y": l.p.y}}

        async def call(self, ping: Any) -> int:
            return int((await ping.ping()).n)

        def both(self) -> Both:
            return self.two

    return Cov, Ping


async def _exercise(kernel: capbus.Kernel, module: Any, typed: bool) -> None:
    Cov, Ping = _servers(module)
    server = Cov()
    async with serving(kernel, server, module.Cov, typed) as (cov, client_vat):
        moved = (await cov.move(p={"x": 1, "y": 2, "color": "blue"})).p
        assert (moved.x, moved.y, moved.color) == (2, 2, "blue")  # an imported struct
        assert (await cov.paint(c="red")).c == "green"  # an imported enum, as a str
        assert server.seen == ["blue", "red"] and all(type(v) is str for v in server.seen)
        local = (await cov.local(l={"c": "blue", "p": {"x": 3, "y": 4}})).l
        assert local.to_dict() == {"c": "blue", "p": {"x": 6, "y": 4, "color": "green"}}
        mine = Ping(7)
        echoed = (await cov.anyCap(cap=mine)).cap  # a Capability field
        assert echoed.server is mine  # the object came home: this vat's own
        assert (await echoed.ping()).n == 7
        ptr = (await cov.anyPtr(ptr=client_vat.local(Ping(8)))).ptr  # an AnyPointer
        assert (await ptr.ping()).n == 8
        box = (await cov.boxed()).box  # Box(Ping): its V is a Ping
        value = (await box.get()).value
        assert (await value.ping()).n == 41
        both = (await cov.both()).ab  # extends A and B
        await both.a()
        await both.b()
        await both.ab()
        assert server.two.heard == ["a", "b", "ab"]
        assert (await cov.call(ping=Ping(3))).n == 3  # (a server for a Ping param)


async def test_the_constructs_work_across_vats_with_capbus_load(kernel: capbus.Kernel) -> None:
    await _exercise(kernel, schema, False)


async def test_the_constructs_work_with_generated_modules_that_mypy_checks(
    kernel: capbus.Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))  # (the imported schema's module, beside it)
    compile_and_import(HERE / "coverage_types.capnp", tmp_path)
    module, source = compile_and_import(HERE / "coverage.capnp", tmp_path)
    assert "_coverage_types_capnp.Point" in source and "limit: Final[int] = 99" in source
    await _exercise(kernel, module, True)
    # A server of another interface where a Box is due, returned or passed: mypy says so.
    refused = mypy_verdicts(tmp_path, USER, WRONG, 5)
    # (a typed client has its interface's methods only, not a dynamic client's any name)
    assert '"Cov" has no attribute "pong"' in refused
    # (a struct param is its Fields TypedDict: each field's type checked)
    assert 'Argument "p" to "__call__" of "MoveMethod" has incompatible type' in refused
    # (Box(Ping)'s V is a Ping: its ping's n an int)
    assert 'Incompatible types in assignment (expression has type "int", variable has type "str")' in refused
    assert 'Ping" of "boxed" incompatible with return type' in refused, refused
    assert 'Argument "ping" to "__call__" of "CallMethod" has incompatible type "Cov"' in refused


WRONG = """
from __future__ import annotations
import coverage_capnp


class Ping(coverage_capnp.Ping.Server):
    def ping(self) -> int:
        return 1


class Cov(coverage_capnp.Cov.Server):
    def boxed(self) -> Ping:
        return Ping()


async def use(cov: coverage_capnp.Cov) -> None:
    await cov.call(ping=Cov())
    value = (await (await cov.boxed()).box.get()).value
    text: str = (await value.ping()).n
    del text
    await cov.move(p={"x": "one"})
    await cov.pong()
"""


USER = """
from __future__ import annotations
from collections.abc import Mapping
from typing import Any
from capbus.rpc.vat import Vat
import coverage_capnp
import coverage_types_capnp as types


class Cov(coverage_capnp.Cov.Server):
    def move(self, *, p: types.Point) -> types.Point.Fields:
        return {"x": p.x + 1, "y": p.y, "color": p.color}

    def paint(self, *, c: types.Color) -> types.Color:
        return c


class PingServer(coverage_capnp.Ping.Server):
    def ping(self) -> int:
        return 1


class BoxServer(coverage_capnp.Box.Server[coverage_capnp.Ping]):  # (a generic: Box(V) of Ping)
    def get(self) -> PingServer:
        return PingServer()


async def boxed(cov: coverage_capnp.Cov) -> int:
    value = (await (await cov.boxed()).box.get()).value  # (typed Ping: the brand's V)
    return (await value.ping()).n


async def dynamic(vat: Vat, handle: int) -> None:
    await vat.client(handle, coverage_capnp.Cov).pong()  # (any name: looked up when called)


async def use(cov: coverage_capnp.Cov) -> int:
    point: types.Point = (await cov.move(p={"x": 1})).p
    color: types.Color = (await cov.paint(c="red")).c
    del color
    return point.x + types.maxSize + coverage_capnp.limit
"""


def test_annotations_are_read_from_the_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert schema.Cov.capnp_annotations == {"note": "the interface"}
    assert schema.Ping.capnp_annotations == {}
    monkeypatch.syspath_prepend(str(tmp_path))
    compile_and_import(HERE / "coverage_types.capnp", tmp_path)
    module, _ = compile_and_import(HERE / "coverage.capnp", tmp_path)
    assert module.Cov.capnp_annotations == {"note": "the interface"}


def test_constants_are_read_from_the_module() -> None:
    assert (types.maxSize, types.greeting) == (1024, "hello")
    assert (types.origin.x, types.origin.y, str(types.origin.color)) == (0, 0, "green")
    assert schema.limit == 99


def test_constants_in_generated_modules(tmp_path: Path) -> None:
    module, _ = compile_and_import(HERE / "coverage_types.capnp", tmp_path)
    assert (module.maxSize, module.greeting) == (1024, "hello")
    assert module.origin == {"x": 0, "y": 0, "color": "green"}
