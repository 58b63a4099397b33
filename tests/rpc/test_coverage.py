"""Schema constructs through ``capbus.load`` at run time (issue 11): imported structs and
enums read like local ones, enums as their names (str) on both sides, constants, a
``Capability`` or ``AnyPointer`` field holding a capability (and the same object coming
home), a generic interface's brand (``Box(Ping)``: its ``V`` is a Ping), an interface that
extends several others."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

import capbus
from capbus.rpc.vat import open_vat

HERE = Path(__file__).parent
schema: Any = capbus.load(HERE / "coverage.capnp")
types: Any = capbus.load(HERE / "coverage_types.capnp")
TIMEOUT = 10


class Ping(schema.Ping.Server):  # type: ignore[misc,name-defined]
    def __init__(self, n: int) -> None:
        self.n = n

    def ping(self) -> int:
        return self.n


class Box(schema.Box.Server):  # type: ignore[misc,name-defined]
    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


class Both(schema.AB.Server):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        self.heard: list[str] = []

    def a(self) -> None:
        self.heard.append("a")

    def b(self) -> None:
        self.heard.append("b")

    def ab(self) -> None:
        self.heard.append("ab")


class Cov(schema.Cov.Server):  # type: ignore[misc,name-defined]
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

    def both(self) -> Both:
        return self.two


async def test_the_constructs_work_across_vats(kernel: capbus.Kernel) -> None:
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    server = Cov()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            handle = await server_peer.transfer(await server_vat.export(server), client_peer)
            cov = client_vat.client(handle, schema.Cov)
            with trio.fail_after(TIMEOUT):
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
    finally:
        await server_peer.aclose()
        await client_peer.aclose()


def test_constants_are_read_from_the_module() -> None:
    assert (types.maxSize, types.greeting) == (1024, "hello")
    assert (types.origin.x, types.origin.y, str(types.origin.color)) == (0, 0, "green")
    assert schema.limit == 99
