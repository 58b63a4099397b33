"""Groups and defaults, with ``capbus.load`` and with a generated module that mypy --strict
checks: a struct's group and named union read and written as nested mappings, a group in
results that are a struct type, and the schema's defaults for struct fields (numbers, Text, Data, an
enum, a list, a struct), for params a caller leaves out and for results a handler leaves
out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import capbus

from .generated import compile_and_import, mypy_verdicts, serving

HERE = Path(__file__).parent


def _server(module: Any) -> Any:
    class Config(module.Config.Server):  # type: ignore[misc,name-defined]
        def put(self, settings: Any, count: int) -> dict[str, Any]:
            return {"settings": settings, "count": count}

        def defaults(self) -> dict[str, Any]:
            return {"settings": {}}

        def where(self) -> dict[str, Any]:
            return {"at": {"x": 4}}

    return Config()


async def _exercise(kernel: capbus.Kernel, module: Any, typed: bool) -> None:
    async with serving(kernel, _server(module), module.Config, typed) as (config, _):
        # Every field left out: the schema's defaults.
        s = (await config.defaults()).settings
        assert (s.name, s.retries, s.level, s.ratio, list(s.tags)) == (
            "unnamed",
            3,
            "high",
            0.5,
            ["a", "b"],
        )
        assert (s.limits.soft, s.limits.hard, s.inner.depth, bytes(s.blob)) == (
            100,
            200,
            2,
            b"\xca\xfe",
        )
        assert s.target.which() == "host" and s.target.host == "localhost"
        # A group and a named union written as nested mappings; a param left out
        # reads as its default on the server.
        put = await config.put(settings={"limits": {"hard": 7}, "target": {"port": 8080}, "name": "n"})
        assert put.count == 5
        got = put.settings
        assert (got.name, got.limits.soft, got.limits.hard) == ("n", 100, 7)
        assert got.target.which() == "port" and got.target.port == 8080
        assert got.to_dict()["limits"] == {"soft": 100, "hard": 7}
        assert got.to_dict()["target"] == {"port": 8080}
        assert (await config.put(count=0)).count == 0
        # A group in the results, and a result left out: its default.
        where = await config.where()
        assert (where.at.x, where.at.y, where.level) == (4, -1, "low")


async def test_groups_and_defaults_with_capbus_load(kernel: capbus.Kernel) -> None:
    module = capbus.load(HERE / "groups.capnp")
    await _exercise(kernel, module, False)


async def test_groups_and_defaults_with_a_generated_module(
    kernel: capbus.Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, source = compile_and_import(HERE / "groups.capnp", tmp_path)
    assert "class Settings_limits(_stubs.Struct):" in source
    await _exercise(kernel, module, True)
    monkeypatch.syspath_prepend(str(tmp_path))
    refused = mypy_verdicts(tmp_path, USER, WRONG, 3)
    assert '"Settings_limits" has no attribute "medium"' in refused
    assert 'Argument "settings" to "__call__" of "PutMethod" has incompatible type' in refused
    assert 'Incompatible types in assignment (expression has type "int", variable has type "str")' in refused


USER = """
from __future__ import annotations
from typing import Literal
import groups_capnp as g


class Config(g.Config.Server):
    def put(self, *, settings: g.Settings, count: int) -> g.Config.PutReturned:
        return {"settings": {"limits": {"soft": settings.limits.soft + 1}}, "count": count}

    def where(self) -> g.Config.WhereReturned:
        return {"at": {"x": 1, "y": 2}, "level": "high"}


async def use(config: g.Config) -> int:
    settings = (await config.put(settings={"limits": {"hard": 1}, "target": {"port": 1}})).settings
    which: Literal["host", "port"] = settings.target.which()
    del which
    at = (await config.where()).at
    level: g.Level = (await config.where()).level
    del level
    return settings.limits.soft + settings.limits.hard + settings.inner.depth + at.x + at.y
"""


WRONG = """
from __future__ import annotations
import groups_capnp as g


async def use(config: g.Config) -> None:
    settings = (await config.defaults()).settings
    settings.limits.medium
    await config.put(settings={"limits": {"hard": "seven"}})
    name: str = settings.retries
    del name
"""
