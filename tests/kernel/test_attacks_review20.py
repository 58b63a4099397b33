"""Review 20: attacks on CAPBUS_CMD_SNAPSHOT (the whole object model in a sealed memfd),
``capbus status`` / ``capbus graph`` and the per-peer traffic counters, from real peers and
real sockets (and real other uids where it matters).

Tests named ``test_attack_*`` fail today and pass once the hole is closed; ``test_held_*``
pass today (attacks the kernel withstands). What else was tried and held is listed at the
end of this file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import trio

import capbus
from capbus import _wire
from capbus.testing import wait_for_statistics

from .other_uid import NOBODY, daemon, needs_root, read_line, run_as, shared_directory
from .test_hostile import RawPeer

TIMEOUT = 60


async def pipelined(raw: RawPeer, frames: list[bytes], chunk: int = 500) -> list[_wire.Reply]:
    """Writes ``chunk`` frames before reading their replies (a quick bulk builder)."""
    replies: list[_wire.Reply] = []
    for at in range(0, len(frames), chunk):
        part = frames[at : at + chunk]
        for frame in part:
            await raw.send(frame)
        replies += [await raw.reply() for _ in part]
    return replies


async def bulk_nodes(kernel: capbus.Kernel, builder: capbus.Peer, n: int) -> RawPeer:
    """A peer (of this uid, within its quotas) owning ``n`` nodes: a big bus."""
    bulk = RawPeer(await builder.create_peer(b""))
    assert (await bulk.call(_wire.CMD_SEED_TAKE)).error == 0
    replies = await pipelined(bulk, [_wire.command(_wire.CMD_NODE_CREATE, 1 + i) for i in range(n)])
    assert all(r.error == 0 for r in replies)
    return bulk


def memfd_size(fd: int) -> int:
    size = os.fstat(fd).st_size
    os.close(fd)
    return size


async def test_attack_unread_snapshots_pin_unbounded_uncharged_memory() -> None:
    """Severity: MEDIUM (kernel memory exhaustion by a monitor holder, beyond every quota).

    Attack: a peer holding a monitor handle (handed to it by a trusted owner: by design any
    uid may hold one) makes the bus big with its own uid's quota (20 000 nodes: ~1 MiB per
    snapshot; user_handles allows 262 144, ~14 MiB), then writes 100 SNAPSHOT commands and
    reads nothing until they are all answered.

    Now: each reply's memfd is charged as one held fd (fds_held), never as bytes: not to
    user_bytes, not to user_backlog (a reply entry costs its ~40 byte header there). So the
    kernel keeps 100 memfds of ~1 MiB alive at once (in the kernel's queue and the peer's
    unread socket), over 100 MiB of tmpfs pages in the kernel's memory that no quota counts;
    with the default limits and a daemon's fd budget (half of RLIMIT_NOFILE's hard limit)
    that is tens of GiB.

    Should: the snapshot's size is charged to the asker's uid backlog (user_backlog, like a
    reply body) until the reply is written and read, and/or at most one snapshot per peer is
    in flight (EBUSY / EDQUOT for the next until the previous memfd was taken)."""
    async with capbus.open_kernel() as kernel:
        owner = await kernel.connect()
        builder = await kernel.connect()
        monitor = await owner.create_monitor()
        raw, (monitor_id,) = await RawPeer.seeded(owner, [monitor])
        with raw, trio.fail_after(TIMEOUT), await bulk_nodes(kernel, builder, 20_000):
            before = kernel.statistics().nodes
            body = _wire.U64.pack(monitor_id)
            for i in range(100):
                await raw.send(_wire.command(_wire.CMD_SNAPSHOT, 1 + i, body))
            # A marker after them: once its node exists, the kernel has answered (or refused)
            # every snapshot before it, and this peer has read none of them yet.
            await raw.send(_wire.command(_wire.CMD_NODE_CREATE, 1000))
            await wait_for_statistics(kernel, lambda stats: stats.nodes > before)
            pinned = 0
            for _ in range(101):
                reply = await raw.reply()
                pinned += sum(memfd_size(fd) for fd in reply.fds)
        await owner.aclose()
        await builder.aclose()
    assert pinned <= capbus.Limits().user_backlog, (
        f"{pinned / 2**20:.0f} MiB of snapshots alive at once for one unread peer, charged to no quota"
    )


# A peer of the attacker's uid whose process names itself `sys.argv[2]` (its comm: what the
# status reads from /proc/PID/comm), then prints "ready" and stays until its stdin closes.
NAMED_PEER = """
async def main():
    with open("/proc/self/comm", "w", encoding="latin-1") as comm:
        comm.write(sys.argv[2].encode().decode("unicode_escape"))
    peer = await capbus.connect_peer(sys.argv[1])
    await peer.create_node()
    print("ready", flush=True)
    await trio.to_thread.run_sync(sys.stdin.read)
    await peer.aclose()
trio.run(main)
"""
# Clears the screen, sets the terminal's title and starts a line of its own: 15 bytes, the
# most a comm holds.
HOSTILE_COMM = r"\x1b[2J\x1b]0;X\x07\nFAKE"


async def capbus_cli(*arguments: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(TIMEOUT):
        return await trio.run_process(
            [sys.executable, "-m", "capbus", *arguments],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_attack_any_uid_writes_terminal_escapes_into_capbus_status() -> None:
    """Severity: LOW (terminal injection into the operator's ``capbus status``, by any uid).

    Attack: a process of any uid that may connect (here nobody) names itself (it may write
    its own /proc/self/comm: 15 bytes of anything but NUL) ESC [2J ESC ]0;X BEL \\n FAKE and
    connects. Root runs ``capbus status --kernel PATH`` in a terminal.

    Now: introspection.process_name reads the comm and _peer_row prints it as it is (only
    ends stripped, errors="replace" keeps control bytes): the operator's screen is cleared,
    its title set, and "FAKE" starts a line of its own, so a peer can draw fake rows (a
    fake uid 0 peer, a hidden one). The same name goes into ``capbus graph``'s labels.

    Should: process names (and anything else the kernel's clients control) are shown with
    control characters escaped (repr-style \\x1b, \\n) or replaced, in text output; JSON is
    already escaped by json.dumps."""
    needs_root()
    with shared_directory() as where:
        async with daemon(where, user=None) as (path, _):
            named = await run_as(NOBODY, NAMED_PEER, str(path), HOSTILE_COMM)
            try:
                with trio.fail_after(TIMEOUT):
                    assert await read_line(named) == "ready"
                result = await capbus_cli("status", "--kernel", str(path))
            finally:
                assert named.stdin is not None
                await named.stdin.aclose()
                with trio.fail_after(TIMEOUT):
                    await named.wait()
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert str(NOBODY) in text  # (the peer is listed)
    assert "\x1b" not in text and "\x07" not in text, (
        "control characters from a peer's comm reach the terminal"
    )
    assert not any(line.startswith("FAKE") for line in text.splitlines()), "a peer starts lines of its own"


async def test_attack_any_uid_makes_capbus_graph_write_an_svg_that_is_not_xml() -> None:
    """Severity: LOW (any uid breaks the operator's ``capbus graph`` picture).

    Attack: as above, a process of nobody names itself with control characters (ESC, BEL)
    and connects; root runs ``capbus graph --kernel PATH -o bus.svg``.

    Now: graph.peer_label puts the comm into the label as it is; Graphviz copies the bytes
    into the SVG, and XML 1.0 forbids them (even as character references): the file is not
    well-formed, browsers and viewers show an XML error instead of the graph, so one peer
    hides the whole capability graph from its operator.

    Should: labels carry process names with control characters escaped or replaced (the
    same sanitizer as ``capbus status``'s text)."""
    import xml.etree.ElementTree as ElementTree

    needs_root()
    with shared_directory() as where:
        async with daemon(where, user=None) as (path, _):
            named = await run_as(NOBODY, NAMED_PEER, str(path), HOSTILE_COMM)
            try:
                with trio.fail_after(TIMEOUT):
                    assert await read_line(named) == "ready"
                result = await capbus_cli("graph", "--kernel", str(path), "-o", str(where / "bus.svg"))
            finally:
                assert named.stdin is not None
                await named.stdin.aclose()
                with trio.fail_after(TIMEOUT):
                    await named.wait()
            assert result.returncode == 0, result.stderr
            picture = (where / "bus.svg").read_bytes()
    assert b"FAKE" in picture  # (the peer is drawn)
    ElementTree.fromstring(picture)  # (now: ParseError, not well-formed)


async def snapshots_behind(raw: RawPeer, monitor_id: int, n: int) -> None:
    body = _wire.U64.pack(monitor_id)
    for i in range(n):
        await raw.send(_wire.command(_wire.CMD_SNAPSHOT, 5000 + i, body))


async def drain(raw: RawPeer, n: int) -> None:
    for _ in range(n):
        for fd in (await raw.reply()).fds:
            os.close(fd)


async def test_attack_a_monitor_holder_stalls_the_whole_bus_with_pipelined_snapshots() -> None:
    """Severity: MEDIUM (denial of service of every peer by a holder of a monitor handle).

    Attack: on a big bus (here 260 000 nodes, inside one uid's default quotas: 4 peers of
    65 000 nodes), a peer holding a monitor handle writes 64 SNAPSHOT commands at once (24
    bytes each). A victim peer then asks the kernel something trivial.

    Now: each snapshot costs the kernel's only thread O(peers + handles) (~30 ms here: the
    walk, memfd_create, ftruncate and the page faults of an ~14 MiB file), and the loop's
    fairness budget counts frames, not work: READ_BUDGET (64) snapshots are carried out in
    one turn of one peer before anyone else is read. The victim waits ~64 snapshots (~2 s);
    more peers of the attacker (16 384 allowed per uid) multiply it. A holder of a monitor
    handle may watch, but not stop the bus.

    Should: a snapshot ends its peer's turn (counted as the whole READ_BUDGET), and a uid has
    at most one snapshot being made or queued unread at a time (EBUSY or EAGAIN otherwise),
    so the bus keeps going between snapshots whatever the asker does."""
    async with capbus.open_kernel() as kernel:
        owner, builder, victim = [await kernel.connect() for _ in range(3)]
        monitor = await owner.create_monitor()
        raw, (monitor_id,) = await RawPeer.seeded(owner, [monitor])
        bulks = []
        with raw, trio.fail_after(TIMEOUT * 3):
            for _ in range(4):
                bulks.append(await bulk_nodes(kernel, builder, 65_000))
            alone = []
            for _ in range(3):
                start = trio.current_time()
                await snapshots_behind(raw, monitor_id, 1)
                await drain(raw, 1)
                alone.append(trio.current_time() - start)
            one = sorted(alone)[1]
            await snapshots_behind(raw, monitor_id, 64)
            start = trio.current_time()
            await victim.create_node()
            waited = trio.current_time() - start
            await drain(raw, 64)
        for bulk in bulks:
            bulk.sock.close()
        for peer in (owner, builder, victim):
            await peer.aclose()
    assert waited < 8 * one + 0.05, (
        f"a victim's NODE_CREATE waited {waited:.2f} s behind one peer's snapshots ({one * 1000:.0f} ms each)"
    )


# Four peers of the attacker's uid; each makes sys.argv[2] nodes and hands every one to the
# three others (a well-connected bus: 16 000 handles for 4 000, 6 % of one uid's quota);
# prints "ready" and stays until its stdin closes.
WEB = """
async def main():
    peers = [await capbus.connect_peer(sys.argv[1]) for _ in range(4)]
    for i in range(int(sys.argv[2])):
        owner = peers[i % 4]
        node = await owner.create_node()
        for other in peers:
            if other is not owner:
                await owner.transfer(node, other)
    print("ready", flush=True)
    await trio.to_thread.run_sync(sys.stdin.read)
    for peer in peers:
        await peer.aclose()
trio.run(main)
"""


async def test_attack_any_uid_makes_capbus_graph_run_for_minutes() -> None:
    """Severity: LOW (any uid denies the operator ``capbus graph``).

    Attack: nobody connects 4 peers, makes 4 000 nodes and hands each to the 3 other peers:
    16 000 handles, 12 000 edges between 4 clusters, 6 % of one uid's user_handles (which
    allows 262 144, and every uid has as much). Root runs ``capbus graph -o bus.svg``.

    Now: graph.build draws every node and every handle (compound clusters, ltail edges) and
    hands it all to dot, whose layout is superlinear: 2 000 nodes take ~30 s here, 4 000
    more than 4 minutes (the test gives up after 60 s); with the quota's worth it never
    ends. The tool shows nothing, and any uid can keep it so.

    Should: the picture is bounded: past a limit (a --max-nodes, default some hundreds) a
    peer's nodes and edges are summarised (one "N nodes" box, one edge with a count per
    pair of peers), or the layout is chosen for size (sfdp), so that drawing takes seconds
    whatever the bus holds."""
    needs_root()
    with shared_directory() as where:
        async with daemon(where, user=None) as (path, _):
            web = await run_as(NOBODY, WEB, str(path), "4000")
            cli = None
            try:
                with trio.fail_after(TIMEOUT * 2):
                    assert await read_line(web) == "ready"
                command = [
                    sys.executable,
                    "-m",
                    "capbus",
                    "graph",
                    "--kernel",
                    str(path),
                    "-o",
                    str(where / "bus.svg"),
                ]
                cli = await trio.lowlevel.open_process(
                    command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
                with trio.move_on_after(60):
                    await cli.wait()
                finished = cli.returncode == 0
            finally:
                if cli is not None and cli.returncode is None:
                    cli.kill()
                    with trio.fail_after(TIMEOUT):
                        await cli.wait()
                assert web.stdin is not None
                await web.stdin.aclose()
                with trio.fail_after(TIMEOUT):
                    await web.wait()
    assert finished, "capbus graph still drawing, 60 s on, a bus nobody filled with 6 % of its quota"


async def test_held_unread_snapshots_of_a_peer_that_goes_are_closed_and_unheld() -> None:
    """Held: a peer asks for 200 snapshots, reads none, and hangs up (with replies in its
    socket and more in the kernel's queue): every memfd is closed and every held / in-flight
    fd given back (the kernel's fd counters return to where they were), no peer or node
    left behind."""
    async with capbus.open_kernel() as kernel:
        owner = await kernel.connect()
        monitor = await owner.create_monitor()
        with trio.fail_after(TIMEOUT):
            before = kernel.statistics()
            raw, (monitor_id,) = await RawPeer.seeded(owner, [monitor])
            with raw:
                await snapshots_behind(raw, monitor_id, 200)
                await raw.send(_wire.command(_wire.CMD_NODE_CREATE, 1))
                await wait_for_statistics(kernel, lambda stats: stats.nodes > before.nodes)
                # (since review 20's fix, the pipeline's first snapshot is made and the rest
                # refused EBUSY: one memfd in flight, not 200)
                assert kernel.statistics().fds_held + kernel.statistics().fds_in_flight > before.fds_held
            after = await wait_for_statistics(
                kernel,
                lambda stats: (
                    (stats.peers, stats.nodes, stats.fds_held, stats.fds_in_flight)
                    == (before.peers, before.nodes, before.fds_held, before.fds_in_flight)
                ),
            )
            assert after.handles == before.handles
        await owner.aclose()


# -- what held ----------------------------------------------------------------------------------


async def test_held_forged_stale_foreign_and_malformed_snapshot_requests() -> None:
    """Held: SNAPSHOT with no body, 7, 9 and 16 bytes, ids 0 / ~0 / never issued / another
    peer's id of a monitor node, a plain node, a destroyed monitor node (the holder's stale
    id and its owner's), a monitor node whose owner let go: all refused with an errno, no fd
    passed, the connection kept, and the kernel still serves a real snapshot after them."""
    import errno

    async with capbus.open_kernel() as kernel:
        owner, other = await kernel.connect(), await kernel.connect()
        monitor = await owner.create_monitor()
        dead = await owner.create_monitor()
        plain = await owner.create_node()
        raw, (monitor_id, dead_id, plain_id) = await RawPeer.seeded(owner, [monitor, dead, plain])
        other_monitor = await other.create_monitor()  # (its id means nothing to raw)
        with raw, trio.fail_after(TIMEOUT):
            await owner.destroy(dead)
            cases = {
                b"": errno.EINVAL,
                b"\x00" * 7: errno.EINVAL,
                _wire.U64.pack(monitor_id) + b"\x00": errno.EINVAL,
                _wire.U64.pack(monitor_id) * 2: errno.EINVAL,
                _wire.U64.pack(0): errno.ENXIO,
                _wire.U64.pack(2**64 - 1): errno.ENXIO,
                _wire.U64.pack(monitor_id + (1000 << 3)): errno.ENXIO,
                _wire.U64.pack(plain_id): errno.EINVAL,
                _wire.U64.pack(dead_id): errno.ESTALE,
            }
            if other_monitor.id not in (monitor_id, dead_id, plain_id):
                cases[_wire.U64.pack(other_monitor.id)] = errno.ENXIO
            for body, expected in cases.items():
                reply = await raw.call(_wire.CMD_SNAPSHOT, body)
                assert (reply.error, reply.fds) == (expected, []), (body, reply.error)
            with pytest.raises(capbus.errors.AlreadyDestroyed):
                await owner.snapshot(dead)
            reply = await raw.call(_wire.CMD_SNAPSHOT, _wire.U64.pack(monitor_id))
            assert reply.error == 0
            # The owner lets go of the monitor node after destroying it: the holder's id stays stale.
            await owner.destroy(monitor, release=True)
            reply = await raw.call(_wire.CMD_SNAPSHOT, _wire.U64.pack(monitor_id))
            assert reply.error == errno.ESTALE and not reply.fds
        await owner.aclose()
        await other.aclose()


def consistent(snapshot: capbus.snapshot.Snapshot) -> None:
    """The invariants of one instant: every handle's holder and node are listed, every
    listed node's owner is a listed peer (or 0, let go), each node's holder count is its
    non-owner handles, each peer's handle count is what is listed for it, anchors are the
    owners'."""
    per_peer: dict[int, int] = {}
    holders: dict[int, int] = {}
    for handle in snapshot.handles:
        assert handle.peer in snapshot.peers and handle.node in snapshot.nodes, handle
        per_peer[handle.peer] = per_peer.get(handle.peer, 0) + 1
        node = snapshot.nodes[handle.node]
        if handle.owner:
            assert node.owner == handle.peer, (handle, node)
        else:
            holders[handle.node] = holders.get(handle.node, 0) + 1
    for node in snapshot.nodes.values():
        assert node.owner == 0 or node.owner in snapshot.peers, node
        assert node.holders == holders.get(node.serial, 0), node
    for serial, peer in snapshot.peers.items():
        assert peer.handles == per_peer.get(serial, 0), peer


async def test_held_snapshots_stay_consistent_while_peers_churn() -> None:
    """Held: snapshots taken back to back while other peers hand nodes around, destroy them,
    let go of destroyed ones (orphans listed by their first holder), release handles and
    disconnect without a word (sockets closed with handles, held messages and unread
    replies) are each one consistent instant, and their totals match the kernel's own
    counters once the churn is over (no handle counted twice or missed, no node without
    a listed owner or holder)."""
    async with capbus.open_kernel() as kernel:
        watcher = await kernel.connect()
        monitor = await watcher.create_monitor()

        async def churn(rounds: int) -> None:
            for i in range(rounds):
                a, b, c = [await kernel.connect() for _ in range(3)]
                nodes = [await a.create_node() for _ in range(5)]
                held_by_c = []
                for node in nodes:
                    await a.transfer(node, b)
                    held_by_c.append(await a.transfer(node, c))
                    await c.transfer(held_by_c[-1], a)  # (back to its owner: one more reference)
                await b.hold_messages()
                to_b = await b.transfer(await b.create_node(), a)
                await a.send(to_b, b"held", handles=[nodes[1]])
                await a.destroy(nodes[2], release=True)  # an orphan, held by b and c
                if i % 2:
                    await c.release(held_by_c[3])
                    await a.aclose()  # (its nodes destroyed by its going: orphans held by b, c)
                await a.aclose()
                await c.aclose()
                await b.aclose()

        seen = 0
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(churn, 40)
                nursery.start_soon(churn, 40)
                while len(nursery.child_tasks) > 0:
                    consistent(await watcher.snapshot(monitor))
                    seen += 1
            stats = await wait_for_statistics(kernel, lambda stats: stats.peers == 1)
            final = await watcher.snapshot(monitor)
            consistent(final)
        assert (len(final.peers), len(final.nodes), len(final.handles)) == (
            stats.peers,
            stats.nodes,
            stats.handles,
        )
        assert seen > 10
        await watcher.aclose()


async def test_held_a_big_bus_is_counted_exactly() -> None:
    """Held: a peer with 30 000 nodes (a map grown through many rehashes): the snapshot's
    counts are what was built, to the handle, equal the kernel's counters, and return to
    what they were once the peer hangs up (its map's slots are not listed again)."""
    async with capbus.open_kernel() as kernel:
        watcher, builder = await kernel.connect(), await kernel.connect()
        monitor = await watcher.create_monitor()
        with trio.fail_after(TIMEOUT):
            base = await watcher.snapshot(monitor)
            with await bulk_nodes(kernel, builder, 30_000):
                after = await watcher.snapshot(monitor)
                consistent(after)
                assert len(after.nodes) - len(base.nodes) == 30_000
                assert len(after.handles) - len(base.handles) == 30_000
                (bulk_serial,) = set(after.peers) - set(base.peers)
                assert after.peers[bulk_serial].nodes == 30_000 == after.peers[bulk_serial].handles
                stats = kernel.statistics()
                assert (len(after.nodes), len(after.handles)) == (stats.nodes, stats.handles)
            await wait_for_statistics(kernel, lambda stats: stats.handles == len(base.handles))
            gone = await watcher.snapshot(monitor)
            assert (len(gone.nodes), len(gone.handles), len(gone.peers)) == (
                len(base.nodes),
                len(base.handles),
                len(base.peers),
            )
        await watcher.aclose()
        await builder.aclose()


# -- the tools against what is not (or no longer) a kernel -------------------------------------


async def fake_kernel(
    path: str, answer: bool, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listens at ``path`` like a kernel; each connection is read and then, if ``answer``
    is False, never answered (a stopped or hostile daemon) or, if True, hung up on after its
    first command (a kernel that dies mid-query)."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await listener.bind(path)
    listener.listen(16)
    task_status.started()
    held = []
    with listener:
        while True:
            conn, _ = await listener.accept()
            await conn.recv(1 << 17)
            if answer:
                conn.close()
            else:
                held.append(conn)  # (kept open, never answered)


async def test_attack_capbus_status_hangs_forever_on_a_kernel_that_does_not_answer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Severity: LOW (the operator's tools hang on a stopped or hostile daemon).

    Attack: what listens at the path accepts and reads but never answers: a kernel stopped
    (SIGSTOP, a debugger, swapped out for good) or a socket a hostile uid bound where the
    operator looks (capbus status is run against paths, often in /tmp or /run/user).

    Now: take_snapshot waits for the MONITOR_CREATE reply with no bound: ``capbus status``
    and ``capbus graph`` hang forever (here: still running after 20 s), in scripts and
    monitoring jobs too. (connect() itself is a blocking connect on a thread, which no trio
    timeout can cancel either, against a listener whose backlog is full.)

    Should: the tools bound the whole query (a --timeout, default some seconds) and exit 1
    saying the kernel did not answer."""
    path = str(tmp_path / "stopped.bus")
    async with trio.open_nursery() as nursery:
        await nursery.start(fake_kernel, path, False)
        command = [sys.executable, "-m", "capbus", "status", "--kernel", path]
        cli = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            with trio.move_on_after(20):
                await cli.wait()
            finished = cli.returncode is not None
        finally:
            if cli.returncode is None:
                cli.kill()
            with trio.fail_after(TIMEOUT):
                await cli.wait()
            nursery.cancel_scope.cancel()
    assert finished, "capbus status still waits, 20 s on, for a kernel that does not answer"


async def test_held_capbus_status_on_a_dying_or_bogus_kernel_path_says_why(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Held: ``capbus status`` and ``capbus graph`` against a kernel that hangs up mid-query,
    a regular file, a stream socket, a missing path and a path with newlines and escapes in
    it exit 1 with one line on stderr, no traceback; ``capbus graph -o`` a path in a missing
    directory, or with an unknown extension, exits 1 (the latter without asking)."""
    dying = str(tmp_path / "dying.bus")
    regular = tmp_path / "file.bus"
    regular.write_bytes(b"not a socket")
    stream = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await stream.bind(str(tmp_path / "stream.bus"))
    stream.listen(4)
    odd = str(tmp_path / "a\nb\x1b[2J.bus")
    async with trio.open_nursery() as nursery:
        await nursery.start(fake_kernel, dying, True)
        for where in (dying, str(regular), str(tmp_path / "stream.bus"), str(tmp_path / "missing"), odd):
            for arguments in (
                ("status", "--kernel", where),
                ("graph", "--kernel", where, "-o", str(tmp_path / "g.svg")),
            ):
                result = await capbus_cli(*arguments)
                assert result.returncode == 1, (arguments, result)
                assert b"Traceback" not in result.stderr, result.stderr.decode()
        for output in (str(tmp_path / "no" / "such" / "dir.svg"), str(tmp_path / "g.exe")):
            result = await capbus_cli("graph", "--kernel", dying, "-o", output)
            assert result.returncode == 1 and b"Traceback" not in result.stderr, result
        nursery.cancel_scope.cancel()
    stream.close()


async def test_attack_the_tools_read_an_unsealed_snapshot_file() -> None:
    """Severity: LOW (``capbus status``/``graph``, and Peer.snapshot, crash on a hostile
    "kernel").

    Attack: what answers at the path (a socket a hostile uid bound where the operator looks,
    or any kernel an application's Peer.snapshot talks to) replies to SNAPSHOT with a memfd
    it keeps a writable copy of, unsealed; it shrinks the file while the reader has it
    mapped, or grows its header's counts to the file's (sparse, free) size.

    Now: snapshot.read_memfd takes any fd: it fstat's, mmaps and decodes without looking at
    the seals. A shrink under the mapping is SIGBUS (the CLI dies, no message); and nothing
    bounds the record counts but the file size, so a sparse file of a few GiB makes the CLI
    build hundreds of millions of objects (memory exhaustion).

    Should: read_memfd refuses (SnapshotError) an fd that is not sealed against shrinking and
    writing (F_GET_SEALS ⊇ F_SEAL_SHRINK | F_SEAL_WRITE: what the kernel itself demands of a
    memfd payload, and what its snapshots carry), and bounds the size it maps."""
    import fcntl

    from capbus.snapshot import SnapshotError, read_memfd

    async with capbus.open_kernel() as kernel:
        watcher = await kernel.connect()
        monitor = await watcher.create_monitor()
        with trio.fail_after(TIMEOUT):
            reply = await watcher._call(_wire.CMD_SNAPSHOT, _wire.U64.pack(monitor.id))
        (sealed,) = reply.fds
        seals = fcntl.fcntl(sealed, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_WRITE  # (the kernel's are)
        data = os.pread(sealed, os.fstat(sealed).st_size, 0)
        os.close(sealed)
        await watcher.aclose()
    forged = os.memfd_create("not-sealed")
    os.write(forged, data)
    keep = os.dup(forged)  # (the hostile sender's writable copy)
    try:
        with pytest.raises(SnapshotError):
            read_memfd(forged)
    finally:
        os.close(keep)


async def test_held_a_snapshot_carries_no_payload_and_untrusted_uids_cannot_ask() -> None:
    """Held, against a root daemon: nobody cannot make a monitor node (EPERM) and its
    ``capbus status`` says it is not trusted (exit 1); nobody holding a monitor handle
    handed to it by root may snapshot (by design), and sees the bus, but no byte of the
    payloads queued (held messages), nor any peer's key."""
    needs_root()
    marker = b"PAYLOAD-MUST-NOT-LEAK-" * 8
    script = """
async def main():
    peer = await capbus.connect_peer(sys.argv[1])
    try:
        await peer.create_monitor()
        print("created", flush=True)
    except capbus.errors.NotPermitted:
        print("refused", flush=True)
    status = subprocess_status(sys.argv[1])
    print(f"status {status}", flush=True)
    await peer.aclose()
def subprocess_status(path):
    import subprocess
    return subprocess.run([sys.executable, "-m", "capbus", "status", "--kernel", path],
                          capture_output=True).returncode
trio.run(main)
"""
    with shared_directory() as where:
        async with daemon(where, user=None) as (path, _):
            owner = await capbus.connect_peer(path)
            holder = await capbus.connect_peer(path)
            try:
                with trio.fail_after(TIMEOUT):
                    nobody = await run_as(NOBODY, script, str(path))
                    assert await read_line(nobody) == "refused"
                    assert await read_line(nobody) == "status 1"
                    await nobody.wait()
                    await holder.hold_messages()
                    inbox = await holder.create_node()
                    await owner.send(await holder.transfer(inbox, owner), marker)
                    monitor = await owner.create_monitor()
                    sock = await owner.create_peer(b"", handles=[monitor])
                    fd = sock.detach()
                    reader = await run_as(NOBODY, SNAPSHOT_FROM_FD, str(fd), pass_fds=(fd,))
                    os.close(fd)
                    line = await read_line(reader)
                    await reader.wait()
            finally:
                await owner.aclose()
                await holder.aclose()
    assert line.startswith("snapshot "), line
    size, leaked = line.split()[1:]
    assert int(size) > 0 and leaked == "False"


# Run by nobody with a peer's fd (argv[1]) whose seed holds a monitor handle: takes a
# snapshot and says its size and whether the marker payload is in it.
SNAPSHOT_FROM_FD = """
async def main():
    peer = capbus.peer.Peer(socket.socket(fileno=int(sys.argv[1])))
    seed = await peer.take_seed()
    (monitor,) = seed.handles
    reply = await peer._call(capbus._wire.CMD_SNAPSHOT, struct.pack("<Q", monitor.id))
    (fd,) = reply.fds
    data = os.pread(fd, os.fstat(fd).st_size, 0)
    snapshot = capbus.snapshot.decode(data)
    assert any(p.uid == 0 for p in snapshot.peers.values())
    print("snapshot", len(data), b"PAYLOAD-MUST-NOT" in data, flush=True)
    await peer.aclose()
trio.run(main)
"""


async def test_held_a_non_utf8_process_name_is_replaced_in_status_and_json() -> None:
    """Held: a peer of nobody whose comm is bytes that are not UTF-8 (\\xff\\xfe, 15 bytes
    of them: the most a comm holds) is listed by ``capbus status`` and ``--json`` (exit 0,
    JSON that parses, the name replaced), with no crash."""
    import json

    needs_root()
    with shared_directory() as where:
        async with daemon(where, user=None) as (path, _):
            named = await run_as(NOBODY, NAMED_PEER_BYTES, str(path))
            try:
                with trio.fail_after(TIMEOUT):
                    assert await read_line(named) == "ready"
                text = await capbus_cli("status", "--kernel", str(path))
                as_json = await capbus_cli("status", "--kernel", str(path), "--json")
            finally:
                assert named.stdin is not None
                await named.stdin.aclose()
                with trio.fail_after(TIMEOUT):
                    await named.wait()
    assert text.returncode == 0 and as_json.returncode == 0, (text.stderr, as_json.stderr)
    document = json.loads(as_json.stdout)
    names = [peer["process"] for peer in document["peers"] if peer["uid"] == NOBODY]
    assert names and "\ufffd" in names[0]


# As NAMED_PEER, with a comm of bytes that are not UTF-8.
NAMED_PEER_BYTES = NAMED_PEER.replace(
    'with open("/proc/self/comm", "w", encoding="latin-1") as comm:\n'
    '        comm.write(sys.argv[2].encode().decode("unicode_escape"))',
    'with open("/proc/self/comm", "wb") as comm:\n        comm.write(b"\\xff\\xfe" * 7 + b"\\xff")',
)


# -- what held (tried, and the kernel or the tools withstood it) -------------------------------
#
# - Forged, stale and foreign ids, a plain node, a destroyed monitor node (also once its owner
#   let go of it), bodies of 0, 7, 9 and 16 bytes: an errno each (EINVAL, ENXIO, ESTALE), no
#   fd passed, the connection kept (test_held_forged_stale_foreign_and_malformed_...).
# - Untrusted uids cannot make the kernel snapshot: nobody gets EPERM for MONITOR_CREATE and
#   ``capbus status`` says so (exit 1); trust follows the uid that writes to a connection
#   (cb_peer_charge_to rewrites peer->uid), so a root-made connection handed to nobody is not
#   trusted either. Nobody with a monitor handle handed to it may snapshot, by design.
# - A snapshot carries no payload byte (held messages' payloads checked in the memfd bytes) and
#   no peer key; its records have no padding (every struct is packed by layout, the reserved
#   fields are zeroed by the compound literals): nothing from the kernel's heap or stack.
# - Consistency: snapshots back to back during heavy churn (transfers, destroys, owners
#   letting go of destroyed nodes so orphans are listed by their first holder, releases,
#   disconnects with held messages) each satisfy every invariant (each handle's peer and
#   node listed, holder counts, per-peer handle counts, anchors), and match the kernel's own
#   counters once quiet; a 30 000-node bus is counted exactly and back to the baseline after
#   its peer hangs up (map slots of freed handles are not listed).
# - The sizes of a snapshot (peers, nodes, handles, users) cannot overflow: counts are u32 of
#   quota-bounded maps; the file size is computed in size_t.
# - Counters: sent_bytes (a memfd payload's size) and received_bytes (the header's u32 size)
#   agree, since a memfd payload is capped at CAPBUS_MEMFD_MAX (1 GiB, checked against the
#   fstat size of a sealed file that cannot grow): neither can be inflated past what was
#   really sent, nor wrapped in any practical time (u64). A peer's counters move only by its
#   own sends or the kernel's writes to it; no peer can charge another's.
# - The fd budget: each snapshot in flight is one held fd of its asker's uid (cb_fds_hold),
#   refused with EDQUOT past that uid's fair share, so snapshots cannot exhaust the kernel's
#   fds nor starve other uids of theirs (the bytes behind those fds are another matter: see
#   test_attack_unread_snapshots_pin_unbounded_uncharged_memory). A peer that goes with 200
#   snapshots unread gives every one back: no fd or memfd leaked
#   (test_held_unread_snapshots_of_a_peer_that_goes_are_closed_and_unheld).
# - The tools against a kernel that hangs up mid-query, a regular file, a stream socket, a
#   missing path, a path with a newline and an ESC in it, and ``graph -o`` into a missing
#   directory or with an unknown extension: exit 1 and one line, no traceback. A process name
#   that is not UTF-8 is replaced, in text and JSON; ``--json`` escapes control characters.
# - A peer that writes as many SNAPSHOTs as its socket takes (279 here) and hangs up without
#   reading: the kernel does not carry them out (Linux resets the connection of a socket
#   closed with unread data, so the kernel's read fails and the peer is dropped): no stall.
