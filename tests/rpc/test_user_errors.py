"""Errors a user can act on (issue 11): a value that does not fit its field names the field
and the range, on the sending side; a handler's wrong return says what it should be;
connecting to a missing socket names it; results and structs show their fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc import errors

from .services import FactoryServer, Pair, schema
from .test_shapes import SCHEMA as SHAPES

TIMEOUT = 10


async def test_an_integer_out_of_range_or_of_the_wrong_type_names_the_param(pair: Pair) -> None:
    with trio.fail_after(TIMEOUT):
        counter = (await pair.factory.newCounter()).counter
        with pytest.raises(
            ValueError,
            match=r"^param 'by' of Counter.increment: -1 is out of range for a UInt32 \(0\.\.4294967295\)$",
        ):
            await counter.increment(by=-1)
        with pytest.raises(ValueError, match=r"^param 'by' of Counter.increment: 4294967296 is out of range"):
            await counter.increment(by=1 << 32)
        with pytest.raises(
            TypeError, match=r"^param 'by' of Counter.increment: a UInt32 takes an int, not str$"
        ):
            await counter.increment(by="3")
        with pytest.raises(TypeError, match=r"^param 'text' of Echo.echo: a Text takes a str, not int$"):
            await pair.factory.echo(text=5)
        assert (await counter.increment(by=2)).value == 2  # (nothing was sent before)


class WrongReturns(FactoryServer):
    async def slow(self) -> Any:  # -> () : no results
        return 5

    async def echo(self, text: str) -> Any:
        return {"txt": text} if text == "mapping" else [text]


async def test_a_wrong_return_says_what_it_should_be(kernel: capbus.Kernel) -> None:
    from capbus.rpc.vat import open_vat

    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            node = await server_vat.export(WrongReturns())
            factory = client_vat.client(await server_peer.transfer(node, client_peer), schema.Factory)
            with trio.fail_after(TIMEOUT):
                with pytest.raises(errors.Failed, match="slow has no results: return None, not int"):
                    await factory.slow()
                with pytest.raises(errors.Failed, match=r"has no field 'txt'"):
                    await factory.echo(text="mapping")
    finally:
        await server_peer.aclose()
        await client_peer.aclose()


async def test_connecting_to_a_missing_socket_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-kernel.sock"
    with pytest.raises(FileNotFoundError) as raised:
        await capbus.connect_peer(missing)
    assert raised.value.filename == str(missing)
    assert str(missing) in str(raised.value) and "capbus kernel --listen" in str(raised.value)


async def test_results_and_structs_show_their_fields_and_convert_to_dicts(kernel: capbus.Kernel) -> None:
    from capbus.rpc.vat import open_vat

    from .test_shapes import _server_class

    shapes_schema: Any = capbus.load(SHAPES)
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            node = await server_vat.export(_server_class(shapes_schema.Shapes.Server)())
            handle = await server_peer.transfer(node, client_peer)
            shapes = client_vat.client(handle, shapes_schema.Shapes)
            with trio.fail_after(TIMEOUT):
                results = await shapes.list()
                assert results.to_dict() == {"listing": {"files": ["a", "b"], "total": 2}}
                # (<Shapes.list$Results ...>, or <ListResults ...> once a generated module of
                # the same schema registered its classes in this process)
                shown = " {'listing': {'files': ['a', 'b'], 'total': 2}}>"
                assert repr(results).endswith(shown), repr(results)
                picked = await shapes.pick(byIndex=4)
                assert picked.to_dict() == {"chosen": "index 4"}
    finally:
        await server_peer.aclose()
        await client_peer.aclose()


async def test_generated_structs_show_their_fields(kernel: capbus.Kernel, tmp_path: Path) -> None:
    from capbus.rpc.vat import open_vat

    from .generated import compile_and_import
    from .test_shapes import _server_class

    module, _ = compile_and_import(SHAPES, tmp_path)
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            node = await server_vat.export(_server_class(module.Shapes.Server)())
            shapes = client_vat.typed_client(await server_peer.transfer(node, client_peer), module.Shapes)
            with trio.fail_after(TIMEOUT):
                listing = (await shapes.list()).listing
                assert listing.to_dict() == {"files": ["a", "b"], "total": 2}
                assert repr(listing) == "<Listing {'files': ['a', 'b'], 'total': 2}>"
    finally:
        await server_peer.aclose()
        await client_peer.aclose()


async def test_a_large_text_of_a_general_struct_reads_as_often_as_wanted(
    kernel: capbus.Kernel, tmp_path: Path
) -> None:
    """pycapnp charges every read of a field to the message's one traversal budget: a 1 MiB
    Text of results read through pycapnp (a struct with a list is not flat) could be read
    only some eight times before "Exceeded message traversal limit"."""
    from capbus.rpc.vat import open_vat

    schema_file = tmp_path / "big.capnp"
    schema_file.write_text(
        "@0xd1e2f3a4b5c6d7f1;\ninterface Big { get @0 () -> (text :Text, tags :List(Text)); }\n"
    )
    big: Any = capbus.load(schema_file)
    text = "x" * (1 << 20)

    class Server(big.Big.Server):  # type: ignore[misc,name-defined]
        def get(self) -> dict[str, Any]:
            return {"text": text, "tags": ["a"]}

    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            handle = await server_peer.transfer(await server_vat.export(Server()), client_peer)
            results = await client_vat.client(handle, big.Big).get()
            with trio.fail_after(TIMEOUT):
                for _ in range(30):
                    assert results.text == text
    finally:
        await server_peer.aclose()
        await client_peer.aclose()
