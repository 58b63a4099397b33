"""Attacks on AnyStruct, AnyList, AnyPointer and Capability values (thirteenth review):
capbus/rpc/anypointer.py and its hooks in structs.py (StructReader._read, StructBuilder
__setattr__/any_struct/init_any_list/set_raw), layout.py (any_kind) and protocol.py (fill).
A hostile sender is played by a client whose method is the ``anyPointer`` method (which
takes anything) sent under another method's ordinal: the server then reads, in a field
declared AnyStruct, AnyList or Capability, whatever that sender put there. What aborts the
process runs in a child process."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc.anypointer import AnyList, AnyStruct, WrongKind, list_value, struct_value
from capbus.rpc.client import BoundMethod
from capbus.rpc.errors import RpcError

from .generated import serving

HERE = Path(__file__).parent
schema: Any = capbus.load(HERE / "anypointer.capnp")
TIMEOUT = 10


class Ping(schema.Ping.Server):  # type: ignore[misc,name-defined]
    def __init__(self, n: int = 1) -> None:
        self.n = n

    def ping(self) -> int:
        return self.n


class Store(schema.Store.Server):  # type: ignore[misc,name-defined]
    """Keeps what each call got (``got``), and echoes it."""

    def __init__(self) -> None:
        self.got: list[Any] = []

    def anyStruct(self, value: Any) -> Any:
        self.got.append(value)
        return {"value": value}

    def anyList(self, value: Any) -> Any:
        self.got.append(value)
        return {"value": value}

    def anyPointer(self, value: Any) -> Any:
        self.got.append(value)
        return {"value": value}

    def capability(self, value: Any) -> Any:
        self.got.append(value)
        return {"value": None}

    def either(self, e: Any) -> Any:
        self.got.append((e.which(), e.any if e.which() == "any" else e.n))
        return {"e": {"n": 0}}

    def tag(self, name: str, ping: Any) -> Any:
        return {}

    def unpack(self, value: Any) -> Any:
        return {"name": ""}


@asynccontextmanager
async def _store(kernel: capbus.Kernel) -> AsyncIterator[tuple[Any, Store]]:
    store = Store()
    async with serving(kernel, store, schema.Store, False) as (client, _):
        with trio.fail_after(TIMEOUT):
            yield client, store


def _as_hostile(client: Any, method: str) -> BoundMethod:
    """``method`` of ``client`` as a hostile sender calls it: the params of ``anyPointer``
    (one AnyPointer, which takes anything) sent under ``method``'s ordinal, so the server
    reads in its declared field whatever was put there."""
    methods = client.interface.methods
    spoofed = dataclasses.replace(methods["anyPointer"], ordinal=methods[method].ordinal, name=method)
    return BoundMethod(client, spoofed)


# -- unions -------------------------------------------------------------------------------------


async def test_a_union_anypointer_member_set_to_null_is_that_member_not_another(
    kernel: capbus.Kernel,
) -> None:
    """MEDIUM (wrong value). Attack (a careless caller): ``store.either(e={"any": None})``,
    setting the union member ``any`` (an AnyPointer) to null. StructBuilder.__setattr__
    returns early for an AnyPointer field given None (``if value is not None: write(...)``)
    without setting the union's discriminant, which the capability branch does; so the
    struct goes out with its default member: the server reads ``e.which() == "n"`` and
    ``e.n == 0`` -- a member the caller never set, and a value it never sent. Should: a
    null ``any`` arrives as the member set (``which() == "any"``, ``e.any`` None), as a
    null Capability member already does."""
    async with _store(kernel) as (store, server):
        await store.either(e={"any": None})
        assert server.got[-1] == ("any", None)


# -- kinds: what each field holds ---------------------------------------------------------------


async def test_an_anystruct_field_refuses_a_capability_as_it_refuses_text(kernel: capbus.Kernel) -> None:
    """MEDIUM (wrong value). Attack (a careless caller): ``store.anyStruct(value=Ping(3))``,
    a capability where the schema says AnyStruct (and ``store.anyList(value=Ping(3))``).
    anypointer.write refuses Text or a list there with WrongKind, but StructBuilder's
    __setattr__ sends any client or server as a capability before write can look at the
    field's kind; so the call goes through and the server, whose typed signature says
    ``AnyStruct | None``, gets a client, and its ``value.as_struct(T)`` fails with an
    AttributeError about a ``Capability`` interface being unknown. Should: WrongKind to the
    caller ("an AnyStruct takes a struct ..., not Ping"), as for Text, a list or a struct
    in an AnyList; nothing sent."""
    async with _store(kernel) as (store, server):
        with pytest.raises(WrongKind, match="an AnyStruct takes a struct"):
            await store.anyStruct(value=Ping(3))
        with pytest.raises(WrongKind, match="an AnyList takes a list"):
            await store.anyList(value=Ping(3))
        assert server.got == []


async def test_a_capability_received_in_an_anystruct_field_is_refused_not_handed_over_as_a_client(
    kernel: capbus.Kernel,
) -> None:
    """MEDIUM (wrong value). Attack (a hostile sender): a capability pointer in a param
    declared AnyStruct (and AnyList). StructReader._read returns whatever capability the
    slot holds before looking at the field's kind, so the server's handler, typed to get an
    ``AnyStruct | None``, gets a client of an unknown interface; its ``value.as_struct(T)``
    then raises ``AttributeError: Capability has no method 'as_struct' (this client's
    interface, Capability, is unknown here: name it ...)``, an error about naming
    interfaces that hides what the sender did, and a server echoing the value sends a
    capability out in an AnyStruct result. Should: the call is refused (a Failed for the
    caller saying the AnyStruct param holds a capability, or the value read as an
    AnyStruct whose as_struct raises ValueError "value is not a struct"); never a client in
    an AnyStruct or AnyList field."""
    async with _store(kernel) as (store, server):
        for method, kind in (("anyStruct", AnyStruct), ("anyList", AnyList)):
            try:
                await _as_hostile(store, method)(value=Ping(3))
            except RpcError:
                continue  # (refused: what the caller should see)
            got = server.got[-1]
            assert isinstance(got, kind), f"{method}: the server got {got!r} for an {kind.__name__}"


async def test_a_struct_received_in_a_capability_field_is_refused_not_read_as_null(
    kernel: capbus.Kernel,
) -> None:
    """MEDIUM (silent loss). Attack (a hostile or mistaken sender): a struct pointer in a
    param declared ``Capability``. StructReader._read returns ``capability`` (None) for
    any_kind "capability" when the slot does not hold a capability: the server reads a
    null capability and the struct the sender put there is dropped without a word (while a
    capability in an AnyStruct field is handed over, see above). libcapnp reading such a
    field raises "Message contains non-capability pointer where capability pointer was
    expected". Should: the call fails with an error saying the Capability param holds no
    capability (a malformed message), rather than the handler running with None."""
    async with _store(kernel) as (store, server):
        with pytest.raises(RpcError, match="value"):
            await _as_hostile(store, "capability")(value=struct_value(schema.Point, {"x": 5}))
        assert server.got == [], f"the handler ran with {server.got!r}"


# -- reading a value more than a few times ------------------------------------------------------


async def test_a_received_value_reads_as_often_as_its_reader_likes(kernel: capbus.Kernel) -> None:
    """MEDIUM (wrong value, misleading error). Attack (none needed: an honest value): an
    AnyList of 200,000 Int32 (and Data or Text of 800 KB in an AnyPointer) received, then
    ``as_list("Int32")`` (``as_data()``, ``as_text()``) called more than eight times, as a
    server that keeps a value and reads it per request would. Every read walks the list
    through pycapnp and is charged to the message's one traversal budget
    (capwire.traversal_budget: about eight times the message's size), and nothing is kept
    (StructReader._blobs keeps large Text and Data fields for exactly this reason, but an
    AnyPointer's value is not a field of it); so the ninth read raises ``ValueError: value
    is not a list of Int32: Exceeded message traversal limit`` -- the value *is* a list of
    Int32, it was read eight times. as_struct of a struct with a large Text field then
    raises a raw KjException with a C++ stack. Should: a received value reads the same
    every time (keep what as_list/as_data/as_text read, or give each read its own budget);
    at the very least the error must not say the value is not what it is."""
    async with _store(kernel) as (store, _):
        numbers = (await store.anyList(value=list_value("Int32", list(range(200_000))))).value
        data = (await store.anyPointer(value=b"x" * 800_000)).value
        text = (await store.anyPointer(value="t" * 800_000)).value
        for read in range(12):
            assert len(numbers.as_list("Int32")) == 200_000, read
            assert len(data.as_data()) == 800_000, read
            assert len(text.as_text()) == 800_000, read


# -- sending ------------------------------------------------------------------------------------


async def test_a_struct_value_is_taken_by_a_struct_field_of_its_own_type(kernel: capbus.Kernel) -> None:
    """LOW (unclear error). Attack (a careless caller): ``store.either(e=Either.new_value({"n":
    1}))`` or ``capbus.struct_value(Either, {"n": 1})`` for a param whose type *is*
    Either -- the struct values the AnyPointer API makes, given to an ordinary struct field.
    fill takes a mapping or a received struct there (protocol._is_struct) but not a
    StructValue, which falls through to pycapnp's setattr: ``ValueError: param 'e' of
    Store.either: StructValue(...) does not fit Struct: Tried to set field: 'e' with a
    value of: 'StructValue(...)' which is an unsupported type: '<class
    'capbus.rpc.anypointer.StructValue'>'``. Should: a StructValue of the field's own type
    is taken as its fields (as a received struct is), and one of another type refused with
    an error saying which type the field takes."""
    async with _store(kernel) as (store, server):
        await store.either(e=struct_value(schema.Either, {"n": 1}))
        assert server.got[-1] == ("n", 1)


async def test_text_that_is_not_utf8_is_refused_naming_the_value(kernel: capbus.Kernel) -> None:
    """LOW (unclear error). Attack (a hostile sender): Data that is not UTF-8 but ends in a
    NUL, ``b"\\xff\\xfe\\x00"``, in an AnyPointer, read by the receiver with ``as_text()``.
    as_text catches only KjException, so the receiver gets pycapnp's bare
    ``UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0``, which names
    neither the value nor Text (unlike every other refusal of as_text: "value is not Text:
    ..."). Should: ``ValueError: value is not Text: ...`` (not UTF-8)."""
    async with _store(kernel) as (store, _):
        value = (await store.anyPointer(value=b"\xff\xfe\x00")).value
        with pytest.raises(ValueError, match="value is not Text"):
            value.as_text()


# -- amplification ------------------------------------------------------------------------------


def _traced_peak(read: Any) -> tuple[int, Any]:
    """(the Python memory ``read()`` took at its peak, what it gave)."""
    tracemalloc.start()
    try:
        got = read()
        return tracemalloc.get_traced_memory()[1], got
    finally:
        tracemalloc.stop()


async def test_as_list_of_a_small_message_takes_memory_in_proportion_to_it(kernel: capbus.Kernel) -> None:
    """MEDIUM (unbounded resource). Attack (a hostile sender): an AnyList param that is a
    List(Int8) of 250,000 bytes (250 KB on the wire), where the server reads
    ``value.as_list(Point)`` -- as Cap'n Proto allows, each byte reads as a Point whose
    data section is that byte -- and a List(Bool) of 2,000,000 bits (250 KB), read with
    ``as_list("Bool")``. _Received._list builds a Python list of everything up front: for
    structs a StructReader and a pycapnp reader per element (about 400 bytes each: ~100 MB
    for the 250 KB message, seconds of CPU), for Bool a Python list of 8-byte pointers per
    bit (64x); with the vat's 64 MiB max_message_bytes one message is tens of GB. A plain
    List field reads lazily (pycapnp's list reader). Should: as_list's memory is in
    proportion to the message (a lazy sequence of its elements, as a List field gives),
    here under 32 times its size."""
    async with _store(kernel) as (store, _):
        size = 250_000
        small = (await store.anyList(value=list_value("Int8", [1] * size))).value
        bits = (await store.anyList(value=list_value("Bool", [True] * (8 * size)))).value
        peak, points = _traced_peak(lambda: small.as_list(schema.Point))
        assert len(points) == size
        assert peak < 32 * size, f"as_list(Point) of a {size}-byte list took {peak} bytes"
        del points
        peak, flags = _traced_peak(lambda: bits.as_list("Bool"))
        assert len(flags) == 8 * size
        assert peak < 32 * size, f"as_list('Bool') of a {size}-byte list took {peak} bytes"


# -- passing a received struct on ---------------------------------------------------------------


newer: Any = capbus.load(HERE / "review13.capnp")


async def test_a_received_struct_passed_on_keeps_the_fields_its_reader_does_not_know(
    kernel: capbus.Kernel,
) -> None:
    """HIGH (silent loss; the documented "re-sent by its fields" semantics, but data is
    dropped without a word). Attack (a newer peer, or a hostile one testing a proxy): a
    struct of a newer version of Point (``PointV2``: fields ``z`` and ``label`` added, the
    usual Cap'n Proto schema evolution) sent in an AnyStruct to a server that knows only
    Point; the server, a proxy, reads it with ``as_struct(Point)`` and passes that struct on
    (here: returns it in its AnyStruct result). anypointer.write re-sends a received struct
    from ``to_dict()``, i.e. only the fields the reader's schema names, so ``z`` and
    ``label`` are silently gone (they read 0 and "" at the far end), where Cap'n Proto's
    copy (and passing the AnyStruct on as it is) keeps them. Should: a received struct is
    passed on whole (copied, with its capabilities re-attached by their paths), or refused;
    never cut down to the reader's schema without a word."""

    class Proxy(Store):
        def anyStruct(self, value: Any) -> Any:
            return {"value": value.as_struct(schema.Point)}

    async with serving(kernel, Proxy(), schema.Store, False) as (store, _):
        with trio.fail_after(TIMEOUT):
            sent = struct_value(newer.PointV2, {"x": 1, "y": 2, "z": 3, "label": "kept?"})
            back = (await store.anyStruct(value=sent)).value.as_struct(newer.PointV2)
            assert (back.x, back.y, back.z, back.label) == (1, 2, 3, "kept?")


# -- what errors say ----------------------------------------------------------------------------


async def test_reading_a_value_as_a_list_of_the_wrong_struct_names_the_struct(kernel: capbus.Kernel) -> None:
    """LOW (unclear error). Attack (a hostile or mistaken sender): a struct where the reader
    expects a list of Points; the reader calls ``value.as_list(Point)``. The error says
    ``value is not a list of <capnp.lib.capnp._StructModule object at 0x7f...>: expected
    ref->kind() == WirePointer::LIST ...`` -- the element type as a pycapnp object's repr
    (and the same repr in a refused ``list_value(Point, ...)``'s message on the sending
    side). Should: the struct named as the schema names it ("... not a list of Point")."""
    async with _store(kernel) as (store, _):
        value = (await store.anyPointer(value=struct_value(schema.Point, {"x": 1}))).value
        with pytest.raises(ValueError) as refused:
            value.as_list(schema.Point)
        assert "not a list of Point" in str(refused.value), str(refused.value)
        assert "object at 0x" not in str(refused.value), str(refused.value)


async def test_a_received_anypointer_holding_text_is_refused_by_an_anystruct_field_as_text_is(
    kernel: capbus.Kernel,
) -> None:
    """LOW (wrong kind accepted). Attack (a careless proxy): Text received in an AnyPointer
    (an ``AnyPointer`` object) passed on in an AnyStruct param. anypointer.write lets any
    received value whose class is the field's reader class through, and AnyPointer is a
    subclass of both AnyStruct and AnyList, so the Text is copied into the AnyStruct field
    as it is (while ``"text"`` itself is refused there with WrongKind); the far end then
    finds Text in a field its schema says is a struct. Should: WrongKind to the caller
    ("an AnyStruct takes a struct ..."), as for the same Text given directly; or the value
    checked to be a struct (pycapnp's reader can tell) before it is copied."""
    async with _store(kernel) as (store, server):
        text = (await store.anyPointer(value="text")).value
        with pytest.raises(WrongKind, match="AnyStruct"):
            await store.anyStruct(value=text)
        assert len(server.got) == 1, f"the server got {server.got[1:]!r} in an AnyStruct"


# -- what aborts the serving process ------------------------------------------------------------

FORWARD_A_LIST = """
import dataclasses
from pathlib import Path

import trio

import capbus
from capbus.rpc.client import BoundMethod
from capbus.rpc.vat import open_vat

r13 = capbus.load(Path(HERE) / "review13.capnp")


class P(r13.P.Server):
    pass


class Forward(r13.Forward.Server):
    def texts(self, names):
        return {"value": names}  # (pycapnp's List(Text) reader, passed on in an AnyPointer)

    def caps(self, names):
        return {"value": None}

    def echo(self, names):
        return {"names": names}  # (the same reader, in a List(Text) result)


async def main():
    async with capbus.open_kernel() as kernel:
        server, attacker, honest = await kernel.connect(), await kernel.connect(), await kernel.connect()
        async with open_vat(server) as server_vat, open_vat(attacker) as attacker_vat, \\
                open_vat(honest) as honest_vat:
            node = await server_vat.export(Forward())
            forward = attacker_vat.client(await server.transfer(node, attacker), r13.Forward)
            good = honest_vat.client(await server.transfer(node, honest), r13.Forward)
            methods = forward.interface.methods
            spoofed = dataclasses.replace(methods["caps"], ordinal=methods[METHOD].ordinal, name=METHOD)
            with trio.fail_after(10):
                try:
                    await BoundMethod(forward, spoofed)(names=[P(), P()])
                    print("accepted", flush=True)
                except Exception as error:
                    print("refused:", type(error).__name__, error, flush=True)
                names = (await good.texts(names=["a"])).value.as_list("Text")
                names += list((await good.echo(names=["b"])).names)
                print("still serving:", names, flush=True)
        for peer in (server, attacker, honest):
            await peer.aclose()


trio.run(main)
"""


def _forward(tmp_path: Path, method: str) -> subprocess.CompletedProcess[str]:
    """FORWARD_A_LIST run in a process of its own, the hostile call made to ``method``."""
    script = tmp_path / "forward.py"
    script.write_text(f"HERE = {str(HERE)!r}\nMETHOD = {method!r}\n" + textwrap.dedent(FORWARD_A_LIST))
    path = os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )


def _served_on(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 134 and result.returncode != -6, result.stderr[-2000:]
    assert "terminate called" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout and "still serving: ['a', 'b']" in result.stdout, result.stdout


def test_a_hostile_list_passed_on_by_the_server_in_an_anypointer_does_not_abort_it(tmp_path: Path) -> None:
    """HIGH (the serving process aborts). Attack (a hostile caller): a server whose method
    takes ``names :List(Text)`` passes it on in an AnyPointer result (``return {"value":
    names}``: the param reads as pycapnp's list reader, which anypointer.write takes as "a
    value pycapnp builds itself (no capabilities)" and copies with set_raw); the caller
    puts capability pointers where the Text elements should be (any non-Text pointer
    does). The tree check lets pointers of any kind anywhere, and pycapnp's copy of the
    list (``_set`` of a _DynamicListReader) throws "Message contains non-list pointer where
    text was expected" through a call that does not translate C++ exceptions: ``terminate
    called``, the server's whole process dies (exit 134) -- every client of every object it
    serves. (Passing on a received struct's ``.pycapnp`` reader that holds a capability
    aborts the same way.) The same copy of an AnyPointer value (the _Received branch)
    raises a KjException, caught as WrongKind. Should: the caller gets an error (the
    result cannot be encoded) and the server serves on: copy pycapnp readers only where the
    copy raises, or check the value (capwire, with its schema) before copying it."""
    _served_on(_forward(tmp_path, "texts"))


def test_a_hostile_list_echoed_in_a_list_of_text_result_does_not_abort_the_server(tmp_path: Path) -> None:
    """HIGH (the serving process aborts; the root cause predates anypointer.py, which widens
    it). Attack: as above, but the server echoes its ``names :List(Text)`` param in a
    ``List(Text)`` result (``return {"names": names}``), the plainest handler there is.
    StructBuilder.__setattr__ hands the received pycapnp list reader to pycapnp's setattr,
    whose copy throws on the capability pointers through a call that does not translate C++
    exceptions: ``terminate called``, exit 134. Should: an error for the caller, the
    server serving on (the same fix as above: no pycapnp copy of a received reader that
    can throw uncaught; e.g. copy lists of Text/Data/primitives element by element in
    Python, or check the pointers' kinds with capwire first)."""
    _served_on(_forward(tmp_path, "echo"))


PASS_ON_A_READER = """
from pathlib import Path

import trio

import capbus
from capbus.rpc.anypointer import struct_value
from capbus.rpc.vat import open_vat

schema = capbus.load(Path(HERE) / "anypointer.capnp")


class Ping(schema.Ping.Server):
    def ping(self):
        return 1


class Store(schema.Store.Server):
    def anyStruct(self, value):
        return {"value": value.as_struct(schema.Tagged).pycapnp}  # (a pycapnp struct reader)

    def anyPointer(self, value):
        return {"value": value}


async def main():
    async with capbus.open_kernel() as kernel:
        server, client = await kernel.connect(), await kernel.connect()
        async with open_vat(server) as server_vat, open_vat(client) as client_vat:
            handle = await server.transfer(await server_vat.export(Store()), client)
            store = client_vat.client(handle, schema.Store)
            with trio.fail_after(10):
                try:
                    await store.anyStruct(value=struct_value(schema.Tagged, {"name": "t", "ping": Ping()}))
                    print("accepted", flush=True)
                except Exception as error:
                    print("refused:", type(error).__name__, error, flush=True)
                print("still serving:", (await store.anyPointer(value="x")).value.as_text(), flush=True)
        for peer in (server, client):
            await peer.aclose()


trio.run(main)
"""


def test_a_received_struct_reader_holding_a_capability_passed_on_does_not_abort_the_server(
    tmp_path: Path,
) -> None:
    """HIGH (the serving process aborts). Attack (none needed: an honest caller): a Tagged
    struct holding a capability sent in an AnyStruct; the server reads it with
    ``as_struct(Tagged)`` and returns its pycapnp reader (``.pycapnp``, a
    _DynamicStructReader) in its AnyStruct result. anypointer.write takes pycapnp struct
    readers as values "without capabilities" (_is_pycapnp) and copies this one with
    set_raw; pycapnp's copy meets the capability pointer and throws ("Trying to read
    capabilities without ever having created a capability context") through a call that
    does not translate C++ exceptions: ``terminate called``, exit 134, the server gone for
    every client. Should: the caller gets WrongKind/Failed (as for an AnyStruct holding a
    capability passed on as it is) and the server serves on."""
    script = tmp_path / "pass_on.py"
    script.write_text(f"HERE = {str(HERE)!r}\n" + textwrap.dedent(PASS_ON_A_READER))
    path = os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert result.returncode != 134 and result.returncode != -6, result.stderr[-2000:]
    assert "terminate called" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout and "still serving: x" in result.stdout, result.stdout


async def test_a_received_value_given_to_a_capability_field_is_refused_with_wrongkind(
    kernel: capbus.Kernel,
) -> None:
    """LOW (unclear error). Attack (a careless caller or proxy): a received AnyPointer value
    (here Text) given to a ``Capability`` param. anypointer.write looks the field's kind up
    in ``_READERS`` (which has "struct" and "list" only) for any received value, so the
    caller gets a bare ``KeyError: 'capability'`` (fill does not catch KeyError, nor name
    the field); a server doing this in its results fails its caller with the same. Should:
    ``WrongKind: param 'value' of Store.capability: a Capability takes a client or a
    server, not AnyPointer``, as for any other value a Capability cannot hold."""
    async with _store(kernel) as (store, server):
        text = (await store.anyPointer(value="text")).value
        with pytest.raises(WrongKind, match="a Capability takes a client or a server"):
            await store.capability(value=text)
