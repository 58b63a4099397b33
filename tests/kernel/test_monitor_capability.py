"""Monitoring as a capability (issue 13, part 2, the kernel's side): a monitor node, made
only by a peer the kernel trusts for it, is passed like any node; a holder attaches as a
monitor and sees every send and destroy; destroying the node stops every monitor attached
through it. On an embedded kernel and on a daemon; an untrusted uid is refused."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

import capbus

from .conftest import Connect
from .other_uid import NOBODY, daemon, needs_root, read_line, run_as, shared_directory

TIMEOUT = 30


async def next_monitor_record(watcher: capbus.Peer) -> capbus.MonitorRecord:
    while True:
        message = await watcher.recv()
        if message.kind is capbus.MessageKind.MONITOR:
            return capbus.decode_monitor_record(message)


async def test_a_holder_of_a_monitor_node_watches_until_its_owner_destroys_it(connect: Connect) -> None:
    owner, watcher, alice, bob = [await connect() for _ in range(4)]
    monitor = await owner.create_monitor()
    await watcher.attach_monitor(await owner.transfer(monitor, watcher))
    node = await bob.create_node()
    to_bob = await bob.transfer(node, alice)
    with trio.fail_after(TIMEOUT):
        await alice.send(to_bob, b"hello bob", priority=3)
        record = await next_monitor_record(watcher)
        assert record.event is capbus.MessageKind.DATA and record.payload == b"hello bob"
        assert record.payload_size == 9 and record.n_destinations == 1
        info = await alice.info()
        assert record.uid == info.uid
        await owner.destroy(monitor)  # (revoked: the watcher stops seeing traffic)
        note = await watcher.recv()
        while note.kind is capbus.MessageKind.MONITOR:  # (the destroy itself may be seen)
            note = await watcher.recv()
        assert note.kind is capbus.MessageKind.NODE_DESTROYED
        await alice.send(to_bob, b"unseen")
        await bob.recv()
        await bob.recv()
    with pytest.raises(trio.WouldBlock):
        watcher.recv_nowait()  # (nothing more: not a record of the send after the revocation)


async def test_attaching_needs_a_live_monitor_node(connect: Connect) -> None:
    owner, other = await connect(), await connect()
    plain = await owner.create_node()
    with pytest.raises(capbus.InvalidArgument):
        await other.attach_monitor(await owner.transfer(plain, other))  # (not a monitor node)
    with pytest.raises(capbus.NoSuchHandle):
        await other.attach_monitor(0x7777)
    monitor = await owner.create_monitor()
    held = await owner.transfer(monitor, other)
    await owner.destroy(monitor)
    with pytest.raises(capbus.AlreadyDestroyed):
        await other.attach_monitor(held)
    fresh = await owner.create_monitor()
    await owner.attach_monitor(fresh)
    with pytest.raises(capbus.CapbusError) as raised:
        await owner.attach_monitor(fresh)
    assert raised.value.errno == 114  # EALREADY: it monitors already


async def test_an_untrusted_uid_may_not_make_a_monitor_node(tmp_path: Path) -> None:
    """A daemon run by root; a peer of uid 65534 (nobody) is refused (EPERM)."""
    needs_root()
    with shared_directory() as where:
        async with daemon(where, user=None) as (path, _):
            script = textwrap.dedent(
                """
                async def main():
                    peer = await capbus.connect_peer(sys.argv[1])
                    try:
                        await peer.create_monitor()
                        print("made", flush=True)
                    except capbus.NotPermitted as error:
                        print("refused", error.errno, flush=True)
                    await peer.aclose()
                trio.run(main)
                """
            )
            process = await run_as(NOBODY, script, str(path))
            with trio.fail_after(TIMEOUT):
                line = await read_line(process)
                await process.wait()
            assert line.split() == ["refused", "1"], line


@contextlib.asynccontextmanager
async def kernel_at(kind: str, where: Path) -> AsyncIterator[Path]:
    """A kernel daemon's socket, or an embedded kernel of this process that listens."""
    if kind == "daemon":
        async with daemon(where, user=None) as (path, _):
            yield path
    else:
        async with capbus.open_kernel(listen=where / "embedded.bus"):
            yield where / "embedded.bus"


@pytest.mark.parametrize("kind", ["daemon", "embedded"])
async def test_capbus_monitor_prints_each_event_live(kind: str, tmp_path: Path) -> None:
    """``capbus monitor --kernel PATH --json`` (a real process) against a daemon and an
    embedded kernel that listens: a line once it watches, then one per send and destroy,
    as they happen."""
    async with kernel_at(kind, tmp_path) as path:
        command = [sys.executable, "-m", "capbus", "monitor", "--kernel", str(path), "--json"]
        process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            with trio.fail_after(TIMEOUT):
                assert json.loads(await read_line(process)) == {"monitoring": str(path)}
                alice, bob = await capbus.connect_peer(path), await capbus.connect_peer(path)
                node = await bob.create_node()
                await alice.send(await bob.transfer(node, alice), b"watched payload")
                await bob.destroy(node)
                events = []
                while len(events) < 2:
                    record = json.loads(await read_line(process))
                    if (
                        record["event"] == "DATA"
                        and bytes.fromhex(record["payload_head"]) != b"watched payload"
                    ):
                        continue  # (not ours)
                    events.append(record)
            sent, destroyed = events
            assert sent["event"] == "DATA" and sent["payload_size"] == 15 and sent["destinations"] == 1
            assert sent["uid"] == os.getuid() and sent["pid"] == os.getpid()
            assert destroyed["event"] == "NODE_DESTROYED" and destroyed["seq"] > sent["seq"]
            await alice.aclose()
            await bob.aclose()
        finally:
            process.terminate()
            with trio.fail_after(TIMEOUT):
                await process.wait()


async def test_capbus_monitor_as_an_untrusted_user_says_why() -> None:
    needs_root()
    with shared_directory() as where:
        async with daemon(where, user=None) as (path, _):
            script = "sys.exit(capbus.cli.main(['monitor', '--kernel', sys.argv[1]]))"
            process = await run_as(NOBODY, script, str(path))
            with trio.fail_after(TIMEOUT):
                status = await process.wait()
                assert process.stderr is not None
                said = (await process.stderr.receive_some(4096)).decode()
    assert status != 0 and "does not trust this user to watch" in said, said


def test_a_record_for_people_says_what_happened() -> None:
    from capbus.monitoring import record_line

    record = capbus.MonitorRecord(capbus.MessageKind.DATA, 42, 1000, 4242, 2, 1, 0, 100, b"x" * 100, 3)
    line = record_line(record)
    assert line.startswith("#42") and "send" in line and "uid 1000" in line and "pid 4242" in line
    assert "-> 2 dest" in line and "100 B, 1 handles, 0 fds" in line and "'" + "x" * 48 + "…'" in line
    assert "(3 records lost so far)" in line
    destroyed = capbus.MonitorRecord(capbus.MessageKind.NODE_DESTROYED, 43, 0, 1, 1, 0, 0, 0, b"", 0)
    assert "destroy" in record_line(destroyed) and "B," not in record_line(destroyed)
