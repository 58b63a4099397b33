"""``capbus status`` and ``capbus graph`` (issue 13, part 3): run as real processes against a
kernel daemon and against an embedded kernel that listens; what they print and draw is
checked against what the test built. The untrusted are told why."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import capbus
from capbus.graph import build, cluster_id, node_id, peer_id, summary_id
from capbus.introspection import status_text

from .other_uid import NOBODY, daemon, needs_root, run_as, shared_directory

TIMEOUT = 60

Bus = tuple[Path, Callable[[], Awaitable[capbus.Peer]]]


@asynccontextmanager
async def kernel_at(kind: str, where: Path) -> AsyncIterator[Bus]:
    """A kernel reachable at a path: a daemon in another process, or one embedded in this
    process that listens."""
    made: list[capbus.Peer] = []
    if kind == "daemon":
        async with daemon(where, user=None) as (path, _):

            async def connected() -> capbus.Peer:
                made.append(await capbus.connect_peer(path))
                return made[-1]

            yield path, connected
    else:
        path = where / "embedded.bus"
        async with capbus.open_kernel(listen=path) as kernel:

            async def embedded() -> capbus.Peer:
                made.append(await kernel.connect())
                return made[-1]

            yield path, embedded
    for peer in made:
        await peer.aclose()


async def capbus_cli(*arguments: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(TIMEOUT):
        return await trio.run_process(
            [sys.executable, "-m", "capbus", *arguments],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def small_bus(connect: Callable[[], Awaitable[capbus.Peer]]) -> tuple[capbus.Peer, ...]:
    """A service whose node two clients hold, one of which gave the service a callback, and
    a message held for the second client."""
    service, client, other = await connect(), await connect(), await connect()
    api = await service.create_node()
    to_service = await service.transfer(api, client)
    await service.transfer(api, other)
    callback = await client.create_node()
    await client.transfer(callback, service)
    await other.hold_messages()
    to_other = await other.transfer(await other.create_node(), service)
    with trio.fail_after(TIMEOUT):
        await service.send(to_other, b"waiting for you")
        await client.send(to_service, b"hello service")
        await service.recv()
    return service, client, other


@pytest.mark.parametrize("kind", ["daemon", "embedded"])
async def test_capbus_status_json_says_who_holds_what(kind: str, tmp_path: Path) -> None:
    async with kernel_at(kind, tmp_path) as (path, connect):
        await small_bus(connect)
        done = await capbus_cli("status", "--kernel", str(path), "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["kernel"] == str(path)
    peers = {peer["serial"]: peer for peer in status["peers"]}
    assert len(peers) == 3  # (the query's own peer left out)
    nodes = status["nodes"]
    assert len(nodes) == 3 and all(node["owner"] in peers for node in nodes)
    by_owner = {}
    for node in nodes:
        by_owner.setdefault(node["owner"], []).append(node)
    holders = {node["serial"]: node["holders"] for node in nodes}
    service = next(s for s, p in peers.items() if p["received_messages"] == 1)
    other = next(s for s, p in peers.items() if "hold" in p["flags"])
    client = next(s for s in peers if s not in (service, other))
    assert holders[by_owner[service][0]["serial"]] == 2
    assert holders[by_owner[client][0]["serial"]] == 1
    assert peers[other]["queued"] == 1 and peers[other]["queued_bytes"] == len(b"waiting for you")
    assert peers[client]["sent_bytes"] == len(b"hello service")
    edges = {(h["peer"], h["node"]) for h in status["handles"] if not h["owner"]}
    assert edges == {
        (client, by_owner[service][0]["serial"]),
        (other, by_owner[service][0]["serial"]),
        (service, by_owner[client][0]["serial"]),
        (service, by_owner[other][0]["serial"]),
    }
    assert status["limits"]["peer_messages"] > 0 and status["seq"] > 0


async def test_capbus_status_for_people_has_a_row_per_peer_and_per_uid(tmp_path: Path) -> None:
    async with kernel_at("daemon", tmp_path) as (path, connect):
        await small_bus(connect)
        done = await capbus_cli("status", "--kernel", str(path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines[0].startswith(f"kernel {path}: seq ") and "3 peers, 3 nodes" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("PEER"))
    rows = lines[header + 1 : header + 4]
    assert len(rows) == 3 and all(row.split()[0].isdigit() for row in rows)
    assert lines[header + 4] == ""
    assert any(row.endswith("hold") for row in rows)
    assert lines[header + 5].startswith("UID")


async def test_status_text_reads_use_against_limits() -> None:
    async with capbus.open_kernel() as kernel:
        peers = await small_bus(kernel.connect)
        with trio.fail_after(TIMEOUT):
            snapshot = await kernel.snapshot()
        text = status_text(snapshot, "here")
        limits = snapshot.limits
        assert f"1/{limits.peer_messages}" in text  # (the held message, against the quota)
        assert "15 B/8 MiB" in text and "hello" not in text
        for peer in peers:
            await peer.aclose()


@pytest.mark.parametrize("kind", ["daemon", "embedded"])
async def test_capbus_graph_draws_svg_png_and_dot(kind: str, tmp_path: Path) -> None:
    async with kernel_at(kind, tmp_path) as (path, connect):
        await small_bus(connect)
        outputs = [tmp_path / "graph.svg", tmp_path / "graph.png", tmp_path / "graph.dot"]
        for output in outputs:
            done = await capbus_cli("graph", "--kernel", str(path), "-o", str(output))
            assert done.returncode == 0, done.stderr
            assert done.stderr == b"", done.stderr  # (fontconfig's chatter kept out)
    svg, png, dot = (output.read_bytes() for output in outputs)
    assert b"<svg" in svg and svg.count(b'class="cluster"') == 3 and b"node " in svg
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    text = dot.decode()
    assert text.count("subgraph cluster_peer") == 3 and text.count("->") == 4


async def test_the_graph_has_a_box_per_peer_holding_its_nodes_and_an_arrow_per_handle() -> None:
    async with capbus.open_kernel() as kernel:
        peers = await small_bus(kernel.connect)
        stray = await kernel.connect()
        orphan = await stray.create_node()
        await stray.transfer(orphan, peers[0])
        with trio.fail_after(TIMEOUT):
            await stray.destroy(orphan, release=True)
            await peers[0].recv()  # (its NODE_DESTROYED: the handle stays till released)
            await stray.aclose()
            snapshot = await kernel.snapshot()
    graph = build(snapshot)
    for serial in snapshot.peers:
        box = graph.get_subgraph(cluster_id(serial))
        assert box is not None
        inside = set(box.nodes())
        assert inside == {peer_id(serial)} | {node_id(n.serial) for n in snapshot.owned_by(serial)}
    arrows = {(edge[0], edge[1]) for edge in graph.edges()}
    assert arrows == {(peer_id(holder), node_id(node)) for holder, node, _ in snapshot.edges()}
    assert len(arrows) == 5
    (orphaned,) = [n for n in snapshot.nodes.values() if n.owner == 0]
    drawn = graph.get_node(node_id(orphaned.serial))
    assert "dashed" in drawn.attr["style"] and "destroyed" in drawn.attr["label"]
    assert all(
        node_id(orphaned.serial) not in graph.get_subgraph(cluster_id(s)).nodes() for s in snapshot.peers
    )
    for peer in peers:
        await peer.aclose()


async def test_capbus_graph_refuses_a_format_it_cannot_write(tmp_path: Path) -> None:
    done = await capbus_cli("graph", "--kernel", str(tmp_path / "none"), "-o", str(tmp_path / "graph.jpg"))
    assert done.returncode == 1 and b"say svg, png or dot" in done.stderr
    done = await capbus_cli("status", "--kernel", str(tmp_path / "none"))
    assert done.returncode == 1 and str(tmp_path / "none").encode() in done.stderr


@pytest.mark.parametrize("tool", ["status", "graph"])
async def test_an_untrusted_user_is_told_why(tool: str) -> None:
    needs_root()
    with shared_directory() as where:
        async with daemon(where, user=None) as (path, _):
            arguments = ["--kernel", str(path)] + (["-o", str(where / "g.svg")] if tool == "graph" else [])
            script = f"sys.exit(capbus.cli.main([{tool!r}] + sys.argv[1:]))"
            process = await run_as(NOBODY, script, *arguments)
            with trio.fail_after(TIMEOUT):
                status = await process.wait()
                assert process.stderr is not None
                said = (await process.stderr.receive_some(4096)).decode()
    assert status == 1 and f"capbus {tool}: the kernel at {path} does not trust this user" in said, said


async def test_past_max_nodes_each_peer_s_nodes_are_one_box_and_handles_one_arrow() -> None:
    async with capbus.open_kernel() as kernel:
        peers = await small_bus(kernel.connect)
        service, client, _ = peers
        for _ in range(3):
            await service.transfer(await service.create_node(), client)
        with trio.fail_after(TIMEOUT):
            snapshot = await kernel.snapshot()
        graph = build(snapshot, max_nodes=3)
        for peer in peers:
            await peer.aclose()
    assert "each peer's drawn as one" in graph.graph_attr["label"]
    (service_serial,) = [s for s in snapshot.peers if len(snapshot.owned_by(s)) == 4]
    arrows = {(edge[0], edge[1]): edge.attr["label"] for edge in graph.edges()}
    into_service = {
        holder: label for (holder, target), label in arrows.items() if target == summary_id(service_serial)
    }
    assert sorted(into_service.values()) == [
        "1 handle",
        "4 handles",
    ]  # (the other client's one; the client's four)
    assert graph.get_node(summary_id(service_serial)).attr["label"] == "4 nodes"
    assert not [
        name for name in graph.nodes() if name.removeprefix("node").isdigit()
    ]  # (no node drawn alone)
