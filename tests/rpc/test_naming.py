"""The naming rule (capbus/rpc/naming.py): schema names that are Python keywords or names
a client, server or struct uses itself get a trailing underscore in Python, on the client
and the server side alike, with ``capbus.load`` and with a generated module; the wire keeps
the schema's names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

import capbus
from capbus.rpc.naming import python_name
from capbus.rpc.vat import open_vat

from .generated import compile_and_import

SCHEMA = Path(__file__).with_name("naming.capnp")
TIMEOUT = 10


def test_the_rule() -> None:
    assert [python_name(n) for n in ("from", "class", "aclose", "self", "which", "send", "plain")] == [
        "from_",
        "class_",
        "aclose_",
        "self_",
        "which_",
        "send_",
        "plain",
    ]


def _server_class(base: Any) -> type:
    class Keywords(base):  # type: ignore[misc,valid-type]
        async def from_(self, *, class_: str, self_: int, pass_: bool) -> dict[str, Any]:
            return {"import_": f"{class_}/{self_}/{pass_}", "which": self_ + 1}

        def aclose_(self) -> int:
            return 7

        def lambda_(self, *, item: Any, global_: Any) -> dict[str, Any]:
            assert (item.def_, item.which_, item.self_) == ("d", 3, True)
            return {"item": {"def_": global_.def_ + "!", "which_": global_.which_ + 1}, "def": "done"}

    return Keywords


async def _exercise(kernel: capbus.Kernel, server: Any, client_of: Any) -> None:
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            handle = await server_peer.transfer(await server_vat.export(server), client_peer)
            keywords = client_of(client_vat, handle)
            with trio.fail_after(TIMEOUT):
                results = await keywords.from_(class_="c", self_=41, pass_=True)
                assert (results.import_, results.which_) == ("c/41/True", 42)
                assert (await keywords.aclose_()).send_ == 7
                made = await keywords.lambda_(
                    item={"def_": "d", "which_": 3, "self_": True}, global_={"def": "g", "which": 9}
                )
                assert (made.item.def_, made.item.which_, made.def_) == ("g!", 10, "done")
                local = client_vat.local(server)  # (the same names on a local call)
                assert (await local.aclose_()).send_ == 7
            await keywords.aclose()  # (the client's own aclose is still its own)
    finally:
        await server_peer.aclose()
        await client_peer.aclose()


async def test_with_capbus_load(kernel: capbus.Kernel) -> None:
    schema: Any = capbus.load(SCHEMA)
    server = _server_class(schema.Keywords.Server)()
    await _exercise(kernel, server, lambda vat, handle: vat.client(handle, schema.Keywords))


async def test_with_a_generated_module(kernel: capbus.Kernel, tmp_path: Path) -> None:
    module, source = compile_and_import(SCHEMA, tmp_path)
    server = _server_class(module.Keywords.Server)()
    await _exercise(kernel, server, lambda vat, handle: vat.typed_client(handle, module.Keywords))
    assert "def from_(self, *, class_: str, self_: int, pass_: bool)" in source  # (the server's)
