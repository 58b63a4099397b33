"""Generics beyond one interface (tests/rpc/generics.capnp), with ``capbus.load`` and with a
generated module that mypy --strict checks: an interface extending a generic one with its
own parameter (``Shelf(V) extends(Box(V))``: a ``Shelf(Ping)`` is a ``Box(Ping)``, its
inherited ``get`` typed by the brand), and a generic struct with two parameters, one bound
to an interface (read as its client) and one to Text (read as a str)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import capbus

from .generated import compile_and_import, mypy_verdicts, serving

HERE = Path(__file__).parent


def _maker(module: Any) -> Any:
    class Ping(module.Ping.Server):  # type: ignore[misc,name-defined]
        def __init__(self, n: int) -> None:
            self.n = n

        def ping(self) -> int:
            return self.n

    class Shelf(module.Shelf.Server):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.value: Any = Ping(1)

        def get(self) -> Any:
            return self.value

        def put(self, value: Any) -> None:
            self.value = value

    class Maker(module.Maker.Server):  # type: ignore[misc,name-defined]
        def shelf(self) -> Shelf:
            return Shelf()

        def pair(self) -> dict[str, Any]:
            return {"first": Ping(3), "second": "two"}

    return Maker(), Ping


async def _exercise(kernel: capbus.Kernel, module: Any, typed: bool) -> None:
    maker_server, Ping = _maker(module)
    async with serving(kernel, maker_server, module.Maker, typed) as (maker, _):
        shelf = (await maker.shelf()).shelf
        assert (await (await shelf.get()).value.ping()).n == 1  # (inherited from Box)
        await shelf.put(value=Ping(7))
        assert (await (await shelf.get()).value.ping()).n == 7
        pair = (await maker.pair()).pair
        assert (await pair.first.ping()).n == 3
        assert pair.second == "two"


async def test_generics_with_capbus_load(kernel: capbus.Kernel) -> None:
    module = capbus.load(HERE / "generics.capnp")
    await _exercise(kernel, module, False)


async def test_generics_with_a_generated_module(
    kernel: capbus.Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, source = compile_and_import(HERE / "generics.capnp", tmp_path)
    assert "class Shelf(Box[_Shelf_V], Generic[_Shelf_V]):" in source
    assert "class Server(Box.Server[_Shelf_V_], Generic[_Shelf_V_]):" in source
    await _exercise(kernel, module, True)
    monkeypatch.syspath_prepend(str(tmp_path))
    refused = mypy_verdicts(tmp_path, USER, WRONG, 3)
    assert 'expression has type "int", variable has type "str"' in refused
    assert 'Unsupported operand types for + ("str" and "int")' in refused
    assert 'Argument "value" to "__call__" of "PutMethod" has incompatible type "Maker"' in refused


USER = """
from __future__ import annotations
import generics_capnp as g


class PingServer(g.Ping.Server):
    def ping(self) -> int:
        return 1


class ShelfServer(g.Shelf.Server[g.Ping]):
    def get(self) -> PingServer:  # (a Box method, typed by the Shelf's brand)
        return PingServer()

    def put(self, *, value: g.Ping) -> None:
        del value


async def use(maker: g.Maker) -> int:
    shelf: g.Box[g.Ping] = (await maker.shelf()).shelf  # (a Shelf(Ping) is a Box(Ping))
    n: int = (await (await shelf.get()).value.ping()).n
    pair = (await maker.pair()).pair
    first: g.Ping = pair.first
    del first
    return n + len(pair.second.upper())
"""


WRONG = """
from __future__ import annotations
import generics_capnp as g


async def use(maker: g.Maker) -> None:
    shelf = (await maker.shelf()).shelf
    text: str = (await (await shelf.get()).value.ping()).n
    del text
    (await maker.pair()).pair.second + 1
    await shelf.put(value=maker)
"""
