"""Params and results shapes that a handler writes as the generated signature says: a
params list that is a union (only the member set is passed; the generated signature makes
each member optional), and one struct result returned as the mapping of its fields (a
mapping whose keys are all result names is the results themselves). With ``capbus.load``
and with a generated module, whose server signatures also pass mypy --strict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

import capbus
from capbus.rpc.vat import open_vat

from .generated import compile_and_import, mypy_strict

SCHEMA = Path(__file__).with_name("shapes.capnp")
TIMEOUT = 10

USER_SERVER = """
from __future__ import annotations
from collections.abc import Mapping
from typing import Any
import shapes_capnp

class Shapes(shapes_capnp.Shapes.Server):
    def pick(self, *, byName: str | None = None, byIndex: int | None = None) -> str:
        return f"name {byName}" if byName is not None else f"index {byIndex}"

    def list(self) -> shapes_capnp.Listing.Fields:
        return {"files": ["a", "b"], "total": 2}

    def listing(self) -> shapes_capnp.Shapes.ListingReturned:
        return {"files": ["c"], "total": 1}
"""

WRONG_SHAPE = """
from __future__ import annotations
import shapes_capnp

class Shapes(shapes_capnp.Shapes.Server):
    def listing(self) -> shapes_capnp.Shapes.ListingReturned:
        return {"files": ["c"], "totl": 1}
"""


def _server_class(base: Any) -> type:
    class Shapes(base):  # type: ignore[misc,valid-type]
        def pick(self, *, byName: str | None = None, byIndex: int | None = None) -> str:
            return f"name {byName}" if byName is not None else f"index {byIndex}"

        async def list(self) -> dict[str, Any]:
            return {"files": ["a", "b"], "total": 2}  # (the one result's value)

        def listing(self) -> dict[str, Any]:
            return {"files": ["c"], "total": 1}  # (the results themselves)

    return Shapes


async def _exercise(kernel: capbus.Kernel, server: Any, client_of: Any) -> None:
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            handle = await server_peer.transfer(await server_vat.export(server), client_peer)
            shapes = client_of(client_vat, handle)
            with trio.fail_after(TIMEOUT):
                assert (await shapes.pick(byName="x")).chosen == "name x"
                assert (await shapes.pick(byIndex=3)).chosen == "index 3"
                listed = (await shapes.list()).listing
                assert (list(listed.files), listed.total) == (["a", "b"], 2)
                direct = await shapes.listing()
                assert (list(direct.files), direct.total) == (["c"], 1)
    finally:
        await server_peer.aclose()
        await client_peer.aclose()


async def test_with_capbus_load(kernel: capbus.Kernel) -> None:
    schema: Any = capbus.load(SCHEMA)
    await _exercise(kernel, _server_class(schema.Shapes.Server)(), lambda v, h: v.client(h, schema.Shapes))


async def test_with_a_generated_module_whose_signatures_a_handler_can_follow(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    module, source = compile_and_import(SCHEMA, tmp_path)
    server = _server_class(module.Shapes.Server)()
    await _exercise(kernel, server, lambda v, h: v.typed_client(h, module.Shapes))
    assert "def pick(self, *, byName: str | None = None, byIndex: int | None = None)" in source
    assert "Mapping[str, Any] | Mapping[str, Any]" not in source
    checked = mypy_strict(tmp_path, "user_server.py", USER_SERVER)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Results of the wrong shape (a misspelt field) fail mypy: they are a TypedDict.
    refused = mypy_strict(tmp_path, "wrong_shape.py", WRONG_SHAPE)
    assert refused.returncode == 1 and 'Extra key "totl" for TypedDict "ListingReturned"' in refused.stdout
