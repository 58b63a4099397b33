"""Review 19: attacks on monitoring as a capability (MONITOR_CREATE / MONITOR_ATTACH, the
``capbus monitor`` CLI), from real processes of other uids where it matters.

Tests named ``test_attack_*`` fail today and pass once the hole is closed; ``test_held_*``
pass today (attacks the kernel withstands)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import capbus

from .other_uid import NOBODY, daemon, needs_root, read_line, run_as, shared_directory

TIMEOUT = 60

# Two peers of the attacker's uid: a sends `count` messages of `size` bytes to b's node and b
# takes each one (so the attacker stays inside its own quotas); prints "done" at the end.
FLOOD = """
async def main():
    a = await capbus.connect_peer(sys.argv[1])
    b = await capbus.connect_peer(sys.argv[1])
    node = await b.create_node()
    to_b = await b.transfer(node, a)
    payload = b"\\xff" * int(sys.argv[3])
    for _ in range(int(sys.argv[2])):
        await a.send(to_b, payload)
        await b.recv()
    print("done", flush=True)
    await a.aclose()
    await b.aclose()
trio.run(main)
"""


async def next_monitor_record(watcher: capbus.Peer) -> capbus.MonitorRecord:
    while True:
        message = await watcher.recv()
        if message.kind is capbus.MessageKind.MONITOR:
            return capbus.decode_monitor_record(message)


async def test_attack_a_stalled_capbus_monitor_lets_any_uid_gate_every_root_peer() -> None:
    """Severity: HIGH (cross-uid denial of service of root's peers).

    Attack: root runs ``capbus monitor --kernel PATH`` with its output going to a pipe or a
    terminal nobody reads right now (``| less``, a paused terminal): the CLI blocks in
    print and stops reading its peer. Any uid (here nobody) then sends ~5000 messages of
    4 KiB between its own two peers, well inside its own quotas.

    Now: every record (header + up to 4096 payload bytes) is queued to the monitor and
    charged to the *monitor's* uid's backlog (cb_queue_push: "what no sender was charged
    for"); the only bound is peer_messages (8192 entries, ~34 MB), which is past
    user_backlog (16 MiB): root's uid is gated, the kernel stops reading every root peer,
    and a fresh root peer's NODE_CREATE never gets an answer.

    Should: a monitor's records are bounded by bytes well below the user backlog (or not
    charged to its uid at all): past it they are dropped and counted (monitor_dropped, the
    documented "a monitor that does not keep up loses records, never blocks anyone")."""
    needs_root()
    with shared_directory() as where:
        async with daemon(where, user=None) as (path, _):
            command = [sys.executable, "-m", "capbus", "monitor", "--kernel", str(path)]
            cli = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                with trio.fail_after(TIMEOUT):
                    assert (await read_line(cli)).startswith("monitoring")
                    # (from here the test never reads the CLI's output again)
                    attacker = await run_as(NOBODY, FLOOD, str(path), "5000", "4096")
                    assert (await read_line(attacker)).strip() == "done"
                    await attacker.wait()
                victim = await capbus.connect_peer(path)
                try:
                    with trio.fail_after(10):
                        await victim.create_node()  # (now: never answered, root is gated)
                finally:
                    with trio.move_on_after(5):
                        await victim.aclose()
            finally:
                cli.kill()
                with trio.fail_after(TIMEOUT):
                    await cli.wait()


async def test_attack_an_embedder_grant_is_lost_when_a_monitor_node_is_destroyed() -> None:
    """Severity: LOW (revocation takes away more than the revoker gave).

    Attack: a peer attaches through a monitor node, then the embedder grants it the monitor
    itself (Kernel.grant_monitor). The node's owner destroys the node.

    Now: capbus_kernel_grant_monitor sees peer->monitor already set and leaves monitor_via
    at the node's serial, so cb_monitor_revoke stops the embedder-granted monitor too: it
    sees nothing more, though the embedder never revoked it.

    Should: a grant by the embedder makes monitor_via 0 (not revocable through a node), as
    when the grant comes first."""
    async with capbus.open_kernel() as kernel:
        owner, watcher, alice, bob = [await kernel.connect() for _ in range(4)]
        with trio.fail_after(10):  # (now: the record never comes)
            monitor = await owner.create_monitor()
            await watcher.attach_monitor(await owner.transfer(monitor, watcher))
            await kernel.grant_monitor(watcher)
            await owner.destroy(monitor)
            node = await bob.create_node()
            await alice.send(await bob.transfer(node, alice), b"after the destroy")
            await bob.recv()
            while True:
                message = await watcher.recv()
                if message.kind is capbus.MessageKind.MONITOR:
                    record = capbus.decode_monitor_record(message)
                    if record.payload == b"after the destroy":
                        break
        for peer in (owner, watcher, alice, bob):
            await peer.aclose()


async def test_attack_monitors_of_one_uid_queue_past_its_user_backlog() -> None:
    """Severity: MEDIUM (memory: the per-uid backlog bound does not hold for monitors).

    Attack: a uid handed a monitor node (here nobody, through connections the embedder
    charges to it) attaches several of its peers as monitors and never reads them. Other
    users' ordinary traffic (2000 sends of 4 KiB) then fills their queues.

    Now: cb_monitor_observe only stops at peer_messages entries per monitor (8192, ~34 MB
    each), never at the monitor uid's user_backlog: with user_backlog 1 MiB, four monitors
    make the kernel hold ~33 MB of records charged to nobody (peers_per_user monitors could
    hold ~34 MB each).

    Should: a record that would take the monitor's uid (or the monitor) past its backlog is
    dropped and counted (monitor_dropped), so kernel memory stays within user_backlog per
    uid (plus socket buffers)."""
    backlog = 1 << 20
    async with capbus.open_kernel(limits=capbus.kernel.Limits(user_backlog=backlog)) as kernel:
        owner, alice, bob = [await kernel.connect() for _ in range(3)]
        watchers = [capbus.Peer(kernel.socket_charged_to(NOBODY, NOBODY, os.getpid())) for _ in range(4)]
        with trio.fail_after(TIMEOUT):
            monitor = await owner.create_monitor()
            for watcher in watchers:
                await watcher.attach_monitor(await owner.transfer(monitor, watcher))
            node = await bob.create_node()
            to_bob = await bob.transfer(node, alice)
            before = kernel.statistics().memory_bytes
            payload = b"m" * 4096
            for _ in range(2000):
                await alice.send(to_bob, payload)
                await bob.recv()
            grown = kernel.statistics().memory_bytes - before
        for peer in (owner, alice, bob, *watchers):
            with trio.move_on_after(5):
                await peer.aclose()
    assert grown < 8 * backlog, f"{grown} bytes held for monitors of one uid (user_backlog {backlog})"


MAKE_A_MONITOR = """
async def main():
    peer = capbus.Peer.from_socket(int(sys.argv[1]))
    try:
        await peer.create_monitor()
        print("made", flush=True)
    except capbus.NotPermitted as error:
        print("refused", error.errno, flush=True)
trio.run(main)
"""


async def create_monitor_as_nobody(fd: int) -> str:
    """What a process of uid nobody that writes MONITOR_CREATE on connection ``fd`` says."""
    process = await run_as(NOBODY, MAKE_A_MONITOR, str(fd), pass_fds=(fd,))
    with trio.fail_after(TIMEOUT):
        line = await read_line(process)
        await process.wait()
    return line


async def test_held_a_socket_for_child_of_a_root_embedder_handed_to_nobody_is_not_trusted() -> None:
    """Held: a root embedder hands Kernel.socket_for_child() (charged to root until a send
    says otherwise) to a process of uid nobody: its MONITOR_CREATE is refused (EPERM)."""
    needs_root()
    async with capbus.open_kernel() as kernel:
        child = kernel.socket_for_child()
        line = await create_monitor_as_nobody(child.fileno())
        child.close()
        assert line.split() == ["refused", "1"], line


async def test_held_a_root_connection_handed_to_nobody_may_not_make_a_monitor() -> None:
    """Held: root connects to a root daemon and hands the socket to a process of uid nobody;
    its first write charges the connection to nobody (cb_peer_charge_to), so MONITOR_CREATE
    is refused (EPERM) although the connection was made by root."""
    needs_root()
    with shared_directory() as where:
        async with daemon(where, user=None) as (path, _):
            handed = await capbus.connect_peer(path)
            line = await create_monitor_as_nobody(handed.fileno())
            assert line.split() == ["refused", "1"], line
            with trio.move_on_after(5):
                await handed.aclose()


async def test_held_an_owner_going_away_revokes_its_monitors() -> None:
    """Held: the owner of a monitor node disconnects (no explicit destroy): its nodes are
    destroyed through cb_nodes_destroy, so the monitor attached through it stops; a new
    node and a new attach work afterwards (n_monitors not left wrong)."""
    async with capbus.open_kernel() as kernel:
        owner, watcher, alice, bob = [await kernel.connect() for _ in range(4)]
        with trio.fail_after(TIMEOUT):
            monitor = await owner.create_monitor()
            await watcher.attach_monitor(await owner.transfer(monitor, watcher))
            await owner.aclose()
            note = await watcher.recv()
            while note.kind is capbus.MessageKind.MONITOR:
                note = await watcher.recv()
            assert note.kind is capbus.MessageKind.NODE_DESTROYED
            node = await bob.create_node()
            to_bob = await bob.transfer(node, alice)
            await alice.send(to_bob, b"unseen")
            await bob.recv()
            with pytest.raises(trio.WouldBlock):
                watcher.recv_nowait()
            again = await alice.create_monitor()
            await watcher.attach_monitor(await alice.transfer(again, watcher))
            await alice.send(to_bob, b"seen")
            assert (await next_monitor_record(watcher)).payload == b"seen"
            await bob.recv()
        for peer in (watcher, alice, bob):
            await peer.aclose()


async def test_held_monitor_records_carry_no_fds_and_no_handle_ids() -> None:
    """Held: a send with an fd and a handle is recorded as counts only: the monitor gets no
    fd and no handle (fds and handle ids are never copied)."""
    async with capbus.open_kernel() as kernel:
        owner, alice, bob = [await kernel.connect() for _ in range(3)]
        with trio.fail_after(TIMEOUT):
            monitor = await owner.create_monitor()
            await owner.attach_monitor(monitor)
            node = await bob.create_node()
            to_bob = await bob.transfer(node, alice)
            extra = await alice.create_node()
            r, w = os.pipe()
            try:
                await alice.send(to_bob, b"secret", handles=[extra], fds=[r])
            finally:
                os.close(r)
                os.close(w)
            while True:
                message = await owner.recv()
                if message.kind is capbus.MessageKind.MONITOR:
                    break
            assert not message.fds and not message.handles
            record = capbus.decode_monitor_record(message)
            assert record.n_fds == 1 and record.n_handles == 1
            received = await bob.recv()
            for fd in received.fds:
                os.close(fd)
        for peer in (owner, alice, bob):
            await peer.aclose()


async def test_held_capbus_monitor_says_why_when_the_kernel_goes_away(tmp_path: Path) -> None:
    """Held: ``capbus monitor`` watching a daemon that exits ends with status 1 and a
    one-line reason, no traceback."""
    async with daemon(tmp_path, user=None) as (path, kernel_process):
        command = [sys.executable, "-m", "capbus", "monitor", "--kernel", str(path), "--json"]
        cli = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            with trio.fail_after(TIMEOUT):
                await read_line(cli)
                kernel_process.kill()
                status = await cli.wait()
                assert cli.stderr is not None
                said = (await cli.stderr.receive_some(65536)).decode()
        finally:
            if cli.returncode is None:
                cli.kill()
                await cli.wait()
    assert status == 1 and "Traceback" not in said and said.startswith("capbus monitor:"), said


def test_held_hostile_payload_bytes_stay_on_one_escaped_line() -> None:
    """Held: terminal escapes, newlines and quotes in a payload come out escaped in the
    line for people, and as hex in --json."""
    import json

    from capbus.monitoring import record_fields, record_line

    payload = b"\x1b]0;pwned\x07\n\r'\"\x00" + "é".encode()
    record = capbus.MonitorRecord(capbus.MessageKind.DATA, 1, 0, 1, 1, 0, 0, len(payload), payload, 0)
    line = record_line(record)
    assert "\x1b" not in line and "\n" not in line and "\r" not in line and "\x07" not in line
    assert bytes.fromhex(json.loads(json.dumps(record_fields(record)))["payload_head"]) == payload


async def test_held_monitor_nodes_count_against_nodes_owned() -> None:
    """Held: MONITOR_CREATE goes through cb_node_create, so a trusted peer's monitor nodes
    count in nodes_owned like any node: past it, QuotaExceeded."""
    async with capbus.open_kernel(limits=capbus.kernel.Limits(nodes_owned=3)) as kernel:
        owner = await kernel.connect()
        with trio.fail_after(TIMEOUT):
            await owner.create_node()
            await owner.create_monitor()
            await owner.create_monitor()
            with pytest.raises(capbus.QuotaExceeded):
                await owner.create_monitor()
        await owner.aclose()
