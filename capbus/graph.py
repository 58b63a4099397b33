"""``capbus graph``: the capability graph of a kernel, drawn. Each peer is a box, the nodes it
owns are inside it, and an arrow goes from a peer to each node of another peer it holds a
handle to: who can reach whom, which is the whole security story of a capability bus.

The picture comes from a :class:`~capbus.snapshot.Snapshot` (one instant of the global
order) through Graphviz (pygraphviz's wheels carry it: nothing to install on the system);
:func:`build` returns the graph itself, so a test asserts what the picture shows.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .introspection import DEFAULT_TIMEOUT, printable, process_name, run_tool, size, take_snapshot
from .snapshot import NodeStatus, PeerFlags, PeerStatus, Snapshot

if TYPE_CHECKING:
    import pygraphviz

FORMATS = ("svg", "png", "dot")
_FONT = "Helvetica"
MAX_NODES = 400
"""Past this many nodes, each peer's nodes are drawn as one box, and its handles to another
peer's nodes as one arrow with a count: Graphviz's layout grows much faster than the graph
(thousands of nodes take minutes), and any uid may make thousands."""
MAX_PEERS = 300
"""Past this many peers there is no picture to read: the tool says so (capbus status lists
them)."""


class GraphUnavailable(RuntimeError):
    """pygraphviz is not installed."""


class GraphTooLarge(ValueError):
    """More peers than a picture can show."""


def _pygraphviz() -> object:
    try:
        import pygraphviz
    except ImportError:
        raise GraphUnavailable(
            "drawing needs pygraphviz (which carries Graphviz): pip install 'capbus[graph]'"
        ) from None
    return pygraphviz


def peer_id(serial: int) -> str:
    """The graph's name of a peer's anchor (edges start there)."""
    return f"peer{serial}"


def node_id(serial: int) -> str:
    return f"node{serial}"


def cluster_id(serial: int) -> str:
    """The box of a peer (Graphviz draws subgraphs named cluster* as boxes)."""
    return f"cluster_peer{serial}"


def peer_label(peer: PeerStatus) -> str:
    name = process_name(peer.pid)
    lines = [f"peer {peer.serial}", f"uid {peer.uid}, pid {peer.pid}" + (f" ({name})" if name else "")]
    if peer.queued:
        lines.append(f"{peer.queued} queued ({size(peer.queued_bytes)})")
    flags = [f.name.lower() for f in PeerFlags if f in peer.flags and f.name]
    if flags:
        lines.append(", ".join(flags))
    return "\n".join(lines)


def node_label(node: NodeStatus) -> str:
    label = f"node {node.serial}"
    if node.monitor:
        label += "\nmonitor"
    if node.destroyed:
        label += "\ndestroyed"
    return label


def summary_id(serial: int) -> str:
    """A peer's nodes drawn as one box (past MAX_NODES); 0: the nodes let go by their owners."""
    return f"nodes_of_peer{serial}"


def build(snapshot: Snapshot, title: str = "", max_nodes: int = MAX_NODES) -> pygraphviz.AGraph:
    """The capability graph of ``snapshot``: a cluster per peer (``cluster_id``) holding an
    anchor (``peer_id``) and its nodes (``node_id``), and an edge from a holder's anchor to
    each node of another peer it holds, labelled with the holder's handle id. Past
    ``max_nodes`` nodes, summarised: a peer's nodes are one box (``summary_id``) and the
    handles a peer holds to them one edge, labelled with their count. Raises GraphTooLarge
    past MAX_PEERS peers."""
    if len(snapshot.peers) > MAX_PEERS:
        raise GraphTooLarge(
            f"{len(snapshot.peers)} peers are more than a picture shows (capbus status lists them)"
        )
    pgv = _pygraphviz()
    graph = pgv.AGraph(directed=True, strict=False, compound=True, rankdir="LR")  # type: ignore[attr-defined]
    summarised = len(snapshot.nodes) > max_nodes
    if summarised:
        title = f"{title} ({len(snapshot.nodes)} nodes: each peer's drawn as one)".strip()
    graph.graph_attr.update(fontname=_FONT, fontsize="11", label=title, labelloc="t", nodesep="0.3")
    graph.node_attr.update(fontname=_FONT, fontsize="10")
    graph.edge_attr.update(fontname=_FONT, fontsize="9", color="#3465a4", fontcolor="#3465a4")
    if summarised:
        _summarise(graph, snapshot)
        return graph
    for peer in sorted(snapshot.peers.values(), key=lambda p: p.serial):
        box = _peer_box(graph, peer, [node_id(n.serial) for n in snapshot.owned_by(peer.serial)])
        for node in snapshot.owned_by(peer.serial):
            _add_node(box, node)
    for node in snapshot.nodes.values():
        if node.owner not in snapshot.peers:  # let go by its owner (or the asker's)
            _add_node(graph, node)
    for holder, held, handle in snapshot.edges():
        if holder not in snapshot.peers or held not in snapshot.nodes:
            continue
        label = f"id {handle.id}" + (f" x{handle.references}" if handle.references > 1 else "")
        graph.add_edge(peer_id(holder), node_id(held), ltail=cluster_id(holder), label=label)
    return graph


def _peer_box(graph: pygraphviz.AGraph, peer: PeerStatus, inside: list[str]) -> pygraphviz.AGraph:
    """A peer's box (a cluster), with its anchor and room for ``inside``."""
    box = graph.add_subgraph(
        [peer_id(peer.serial), *inside],
        name=cluster_id(peer.serial),
        label="",
        style="rounded,filled",
        fillcolor="#eeeeec",
        color="#555753",
    )
    box.add_node(peer_id(peer.serial), label=peer_label(peer), shape="plaintext")
    return box


def _summarise(graph: pygraphviz.AGraph, snapshot: Snapshot) -> None:
    owned: dict[int, int] = {}
    for node in snapshot.nodes.values():
        owner = node.owner if node.owner in snapshot.peers else 0
        owned[owner] = owned.get(owner, 0) + 1
    for peer in sorted(snapshot.peers.values(), key=lambda p: p.serial):
        box = _peer_box(graph, peer, [summary_id(peer.serial)] if peer.serial in owned else [])
        if peer.serial in owned:
            box.add_node(summary_id(peer.serial), label=f"{owned[peer.serial]} nodes", shape="box3d")
    if 0 in owned:
        graph.add_node(summary_id(0), label=f"{owned[0]} nodes let go", shape="box3d", style="dashed")
    held: dict[tuple[int, int], int] = {}
    for holder, held_node, _ in snapshot.edges():
        owner = snapshot.nodes[held_node].owner if held_node in snapshot.nodes else 0
        key = (holder, owner if owner in snapshot.peers else 0)
        if holder in snapshot.peers:
            held[key] = held.get(key, 0) + 1
    for (holder, owner), count in sorted(held.items()):
        label = f"{count} handle" + ("s" if count > 1 else "")
        graph.add_edge(peer_id(holder), summary_id(owner), ltail=cluster_id(holder), label=label)


def _add_node(graph: pygraphviz.AGraph, node: NodeStatus) -> None:
    style = "filled,dashed" if node.destroyed else "filled"
    fill = "#fce94f" if node.monitor else "#ffffff"
    graph.add_node(node_id(node.serial), label=node_label(node), shape="ellipse", style=style, fillcolor=fill)


def output_format(output: str | os.PathLike[str], chosen: str | None = None) -> str:
    """The format to write: ``chosen``, else the file's extension (.svg, .png, .dot, .gv)."""
    if chosen is None:
        suffix = Path(output).suffix.lower().lstrip(".")
        chosen = "dot" if suffix == "gv" else suffix
    if chosen not in FORMATS:
        raise ValueError(f"{output}: say svg, png or dot (by its extension or with --format)")
    return chosen


def draw(
    snapshot: Snapshot,
    output: str | os.PathLike[str],
    fmt: str | None = None,
    title: str = "",
    max_nodes: int = MAX_NODES,
) -> None:
    """Writes the capability graph of ``snapshot`` to ``output`` (svg, png or dot)."""
    fmt = output_format(output, fmt)
    graph = build(snapshot, title, max_nodes)
    if fmt == "dot":
        graph.write(os.fspath(output))
    else:
        with _fontconfig_quieted():
            graph.draw(os.fspath(output), format=fmt, prog="dot")


@contextlib.contextmanager
def _fontconfig_quieted() -> Iterator[None]:
    """The fontconfig in pygraphviz's wheel is older than many systems' configuration and
    warns about each newer element it reads, on fd 2, from C: a dozen lines that say nothing
    about the picture. What else is written to fd 2 meanwhile is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                if not line.startswith("Fontconfig warning"):
                    sys.stderr.write(line)


def run(
    path: str,
    output: str,
    fmt: str | None,
    err: TextIO = sys.stderr,
    timeout: float = DEFAULT_TIMEOUT,
    max_nodes: int = MAX_NODES,
) -> int:
    """``capbus graph``: exit status 1 with the reason when it cannot."""
    try:
        fmt = output_format(output, fmt)
        _pygraphviz()
    except (ValueError, GraphUnavailable) as error:
        print(f"capbus graph: {error}", file=err)
        return 1
    snapshot = run_tool("graph", path, lambda: take_snapshot(path), err, timeout)
    if snapshot is None:
        return 1
    title = f"capbus kernel {printable(path)}, seq {snapshot.seq}"
    try:
        draw(snapshot, output, fmt, title=title, max_nodes=max_nodes)
    except GraphTooLarge as error:
        print(f"capbus graph: {error}", file=err)
        return 1
    except OSError as error:
        print(f"capbus graph: {output}: {error.strerror or error}", file=err)
        return 1
    return 0
