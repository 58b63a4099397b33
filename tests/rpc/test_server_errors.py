"""A handler's unexpected exception is logged on the server's side with its traceback
(logger ``capbus.rpc.server``), as well as sent to its caller as Failed: async handlers
(a task), plain ones (inline) and local calls alike. An RpcError a handler raises on
purpose is an answer, not logged."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc import errors
from capbus.rpc.vat import open_vat

schema: Any = capbus.load(Path(__file__).with_name("shapes.capnp"))
TIMEOUT = 10


def explode(where: str) -> None:
    raise ValueError(f"boom in {where}")


class Broken(schema.Shapes.Server):  # type: ignore[misc,name-defined]
    def pick(self, byName: str | None = None, byIndex: int | None = None) -> str:
        if byIndex is not None:
            raise errors.Failed("no index, on purpose")
        explode("pick")
        return ""

    async def list(self) -> Any:
        await trio.sleep(0)
        explode("list")


async def test_a_handlers_exception_is_logged_with_its_traceback_and_sent(
    kernel: capbus.Kernel, caplog: pytest.LogCaptureFixture
) -> None:
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    caplog.set_level(logging.ERROR, logger="capbus.rpc.server")
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            handle = await server_peer.transfer(await server_vat.export(Broken()), client_peer)
            shapes = client_vat.client(handle, schema.Shapes)
            local = client_vat.local(Broken())
            with trio.fail_after(TIMEOUT):
                for client, method in ((shapes, "pick"), (shapes, "list"), (local, "list")):
                    caplog.clear()
                    with pytest.raises(errors.Failed, match=f"ValueError: boom in {method}"):
                        await (client.pick(byName="x") if method == "pick" else client.list())
                    (record,) = [r for r in caplog.records if r.name == "capbus.rpc.server"]
                    assert record.getMessage() == f"Broken.{method} raised ValueError"
                    assert record.exc_info is not None
                    text = logging.Formatter().formatException(record.exc_info)
                    assert "in explode" in text and f"boom in {method}" in text
                caplog.clear()
                with pytest.raises(errors.Failed, match="no index, on purpose"):
                    await shapes.pick(byIndex=1)
                assert not [r for r in caplog.records if r.name == "capbus.rpc.server"]
    finally:
        await server_peer.aclose()
        await client_peer.aclose()
