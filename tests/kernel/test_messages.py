"""docs/design.md 2.1 rules 7, 9-11 and 13-16: sends, queues, disconnects, quotas, bootstrap,
metadata, priority and monitors, all with real peers over real sockets."""

from __future__ import annotations

import array
import collections
import errno
import os
import select
import socket
import sys
from pathlib import Path

import pytest
import trio

import capbus
from capbus.testing import PeerFactory, as_user, assert_queue_empty, recv_kind

DATA = capbus.MessageKind.DATA
DESTROYED = capbus.MessageKind.NODE_DESTROYED
RELEASED = capbus.MessageKind.NODE_RELEASED


async def test_rule7_multicast_reports_per_destination(new_peer: PeerFactory) -> None:
    sender = await new_peer()
    receivers = [await new_peer() for _ in range(3)]
    nodes = [await r.create_node() for r in receivers]
    targets = [await r.transfer(n, sender) for r, n in zip(receivers, nodes, strict=True)]
    attached_owner = await new_peer()
    attached = await attached_owner.create_node()
    attached_in_sender = await attached_owner.transfer(attached, sender)
    await receivers[1].destroy(nodes[1])

    results = await sender.send(targets, b"to all", handles=[attached_in_sender])
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], capbus.NodeDestroyed)
    assert results[1].errno == errno.EHOSTUNREACH
    got0 = await recv_kind(receivers[0], DATA)
    assert (await receivers[1].recv()).kind is DESTROYED  # its own destroy, and nothing else
    got2 = await recv_kind(receivers[2], DATA)
    assert got0.payload == got2.payload == b"to all"
    assert got0.seq == got2.seq
    # Each receiver got its own handle to the attached node: usable in its own peer.
    for receiver, got in ((receivers[0], got0), (receivers[2], got2)):
        assert got.handles[0].peer is receiver
        await receiver.send(got.handles[0], b"back")
        assert (await recv_kind(attached_owner, DATA)).payload == b"back"
    assert_queue_empty(receivers[1])


async def test_rule7_bad_attachment_fails_whole_send(new_peer: PeerFactory) -> None:
    sender = await new_peer()
    receiver = await new_peer()
    node = await receiver.create_node()
    target = await receiver.transfer(node, sender)
    with pytest.raises(capbus.NoSuchHandle):
        await sender.send([target], b"x", handles=[0x7777_0009])
    with pytest.raises(capbus.DuplicateId):
        await sender.send([target, target], b"x")
    results = await sender.send([target, 0x4242_000B], b"ok")
    assert results[0] is None and isinstance(results[1], capbus.NoSuchHandle)
    assert (await recv_kind(receiver, DATA)).payload == b"ok"
    assert_queue_empty(receiver)


async def test_rule7_fds_are_duplicated_to_each_receiver(new_peer: PeerFactory) -> None:
    sender = await new_peer()
    receivers = [await new_peer() for _ in range(2)]
    targets = []
    for r in receivers:
        targets.append(await r.transfer(await r.create_node(), sender))
    read_end, write_end = os.pipe()
    try:
        await sender.send(targets, b"pipe", fds=[read_end])
        os.write(write_end, b"ab")
        first = await recv_kind(receivers[0], DATA)
        second = await recv_kind(receivers[1], DATA)
        assert len(first.fds) == len(second.fds) == 1
        assert first.fds[0] != read_end
        assert os.read(first.fds[0], 1) == b"a"
        assert os.read(second.fds[0], 1) == b"b"  # the same pipe, through another descriptor
        first.close_fds()
        second.close_fds()
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_rule9_one_queue_many_nodes_with_metadata(new_peer: PeerFactory) -> None:
    owner = await new_peer()
    sender = await new_peer()
    nodes = [await owner.create_node() for _ in range(3)]
    handles = [await owner.transfer(n, sender) for n in nodes]
    await sender.send(handles[0], b"before asking")
    before = await recv_kind(owner, DATA)
    assert before.sender is None  # metadata is the receiver's to ask for
    await owner.want_metadata()
    for i in (2, 0, 1):
        await sender.send(handles[i], f"to {i}".encode())
    got = [await recv_kind(owner, DATA) for _ in range(3)]
    assert [m.destination for m in got] == [nodes[2], nodes[0], nodes[1]]
    assert [m.payload for m in got] == [b"to 2", b"to 0", b"to 1"]
    me = os.pidfd_open(os.getpid())
    serial = got[0].sender.peer if got[0].sender is not None else 0
    assert serial  # the sending peer's serial: the same for its every message
    try:
        for m in got:
            expected = capbus.Credentials(os.getuid(), os.getgid(), os.getpid(), os.fstat(me).st_ino, serial)
            assert m.sender == expected
    finally:
        os.close(me)


async def test_rule10_disconnect_keeps_what_was_sent_and_notifies(
    kernel: capbus.Kernel, new_peer: PeerFactory
) -> None:
    leaving = await kernel.connect()
    staying = await new_peer()
    inbox = await staying.create_node()
    inbox_in_leaving = await staying.transfer(inbox, leaving)
    leaving_node = await leaving.create_node()
    leaving_node_held = await leaving.transfer(leaving_node, staying)
    staying_node = await staying.create_node()
    await staying.transfer(staying_node, leaving)

    for i in range(5):
        await leaving.send(inbox_in_leaving, b"%d" % i)
    await leaving.aclose()
    # Everything it sent arrives, then its node's destruction, then our nodes' release.
    for i in range(5):
        assert (await recv_kind(staying, DATA)).payload == b"%d" % i
    assert (await recv_kind(staying, DESTROYED)).destination == leaving_node_held
    released = {(await recv_kind(staying, RELEASED)).destination for _ in range(2)}
    assert released == {inbox, staying_node}
    with pytest.raises(capbus.NodeDestroyed):
        await staying.send(leaving_node_held, b"gone")
    with pytest.raises(trio.ClosedResourceError):
        await leaving.create_node()


async def test_rule10_kernel_stop_disconnects_peers() -> None:
    async with capbus.open_kernel() as kernel:
        peer = await kernel.connect()
    with pytest.raises(capbus.Disconnected) as info:
        with trio.fail_after(5):
            await peer.recv()
    assert info.value.errno == errno.ESHUTDOWN
    await peer.aclose()


async def test_rule11_quota_fails_send_and_keeps_queue() -> None:
    limits = capbus.Limits(peer_messages=8)
    async with capbus.open_kernel(limits=limits) as kernel:
        async with await kernel.connect() as receiver, await kernel.connect() as sender:
            node = await receiver.create_node()
            target = await receiver.transfer(node, sender)
            accepted = 0
            with pytest.raises(capbus.QuotaExceeded) as info:
                for i in range(1000):
                    await sender.send(target, b"%d" % i)
                    accepted += 1
            assert info.value.errno == errno.EDQUOT
            # Fair share: one user takes at most half of the free messages (plus what the
            # socket buffer took off the kernel's queue).
            assert accepted >= 4
            for i in range(accepted):
                assert (await recv_kind(receiver, DATA)).payload == b"%d" % i
            assert_queue_empty(receiver)
            # Reading freed the quota.
            await sender.send(target, b"again")
            assert (await receiver.recv()).payload == b"again"


async def test_rule13_seeded_peer_starts_with_its_capabilities(new_peer: PeerFactory) -> None:
    parent = await new_peer()
    service = await parent.create_node()
    sock = await parent.create_peer(b"config", handles=[service])
    async with capbus.Peer.from_socket(sock) as child:
        seed = await child.take_seed()
        assert seed.payload == b"config"
        (handle,) = seed.handles
        assert not handle.is_owner
        with pytest.raises(capbus.NoSeed):
            await child.take_seed()
        await child.send(handle, b"hello parent")
        assert (await recv_kind(parent, DATA)).payload == b"hello parent"
        # The seed's reference passed to the child: releasing it releases the node.
        await child.release(handle)
        assert (await recv_kind(parent, RELEASED)).destination == service


async def test_rule13_seed_replace(new_peer: PeerFactory) -> None:
    peer = await new_peer()
    one = await peer.create_node()
    two = await peer.create_node()
    await peer.set_seed(b"first", handles=[one])
    assert (await peer.handle_state(one)).references == 2
    await peer.set_seed(b"second", handles=[two])
    assert (await peer.handle_state(one)).references == 1  # the old seed let go
    seed = await peer.take_seed()
    assert seed.payload == b"second" and seed.handles == (two,)


SEEDED_CHILD = """
import os, sys, trio, capbus
async def main(fd):
    async with capbus.Peer.from_socket(fd) as peer:
        seed = await peer.take_seed()
        reply = seed.payload.replace(b"{pid}", str(os.getpid()).encode())
        await peer.send(seed.handles[0], reply)
trio.run(main, int(sys.argv[1]))
"""


async def run_seeded_child(parent: capbus.Peer, node: capbus.Handle, payload: bytes) -> capbus.Message:
    """Runs a child process whose seed holds ``node``; it sends ``payload`` back to it, with
    "{pid}" replaced by its pid, and exits."""
    sock = await parent.create_peer(payload, handles=[node])
    try:
        with trio.fail_after(30):
            await trio.run_process(
                [sys.executable, "-c", SEEDED_CHILD, str(sock.fileno())], pass_fds=[sock.fileno()]
            )
            return await recv_kind(parent, DATA)
    finally:
        sock.close()


async def test_rule13_seed_into_child_process(new_peer: PeerFactory) -> None:
    parent = await new_peer()
    await parent.want_metadata()
    service = await parent.create_node()
    message = await run_seeded_child(parent, service, b"ping from child")
    assert message.payload == b"ping from child"
    assert message.sender is not None and message.sender.pid != os.getpid()


async def test_rule14_metadata_is_the_real_sender(new_peer: PeerFactory) -> None:
    receiver = await new_peer()
    await receiver.want_metadata()
    node = await receiver.create_node()
    message = await run_seeded_child(receiver, node, b"{pid}")
    assert message.sender is not None
    assert message.sender.pid == int(message.payload)
    assert message.sender.uid == os.getuid()
    assert message.sender.process_id != 0
    # The child has exited: its identity no longer opens, even if its pid were reused.
    with pytest.raises(ProcessLookupError):
        os.close(message.sender.open_pidfd())
    # The child's peer is gone with it (its handle released); notifications carry no sender.
    assert (await recv_kind(receiver, RELEASED)).sender is None
    await receiver.destroy(node)
    assert (await recv_kind(receiver, DESTROYED)).sender is None
    # A live sender's identity opens to a pidfd of that very process.
    other = await receiver.create_node()
    await receiver.send(other, b"me")
    mine = (await recv_kind(receiver, DATA)).sender
    assert mine is not None
    pidfd = mine.open_pidfd()
    try:
        assert os.fstat(pidfd).st_ino == mine.process_id
    finally:
        os.close(pidfd)


async def test_rule15_priority_is_opt_in_and_keeps_order_among_equals(new_peer: PeerFactory) -> None:
    receiver = await new_peer()
    sender = await new_peer()
    node = await receiver.create_node()
    target = await receiver.transfer(node, sender)
    for payload, priority in ((b"low1", 0), (b"low2", 0), (b"urgent", 5), (b"low3", 0), (b"mid", 1)):
        await sender.send(target, payload, priority=priority)
    await sender.send(target, b"last", priority=-1)
    await receiver.hold_messages()  # (the kernel chooses among all it holds: tests/kernel/test_priority.py)
    ordered = [(await receiver.recv(priority=-1)).payload for _ in range(6)]
    assert ordered == [b"urgent", b"mid", b"low1", b"low2", b"low3", b"last"]
    for payload, priority in ((b"a", 0), (b"b", 9)):
        await sender.send(target, payload, priority=priority)
    assert [(await receiver.recv()).payload for _ in range(2)] == [b"a", b"b"]


async def test_rule16_monitor_sees_traffic_only_when_granted(
    kernel: capbus.Kernel, new_peer: PeerFactory
) -> None:
    watcher = await new_peer()
    bystander = await new_peer()
    receiver = await new_peer()
    sender = await new_peer()
    node = await receiver.create_node()
    target = await receiver.transfer(node, sender)
    await kernel.grant_monitor(watcher)
    await sender.send(target, b"observed payload")
    await receiver.destroy(node)
    seen = await recv_kind(watcher, capbus.MessageKind.MONITOR)
    record = capbus.decode_monitor_record(seen)
    assert record.event is DATA and record.payload == b"observed payload"
    assert record.uid == os.getuid() and record.pid == os.getpid()
    destroyed = capbus.decode_monitor_record(await recv_kind(watcher, capbus.MessageKind.MONITOR))
    assert destroyed.event is DESTROYED
    assert_queue_empty(bystander)
    await recv_kind(receiver, DATA)


async def test_daemon_socket_mode_is_the_access_control(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "bus")
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            lambda task_status: trio.run_process(
                [sys.executable, "-m", "capbus", "kernel", "--listen", path, "--mode", "600"],
                stdout=subprocess_pipe(),
                task_status=task_status,
            )
        )
        with trio.fail_after(30):
            line = await process.stdout.receive_some(200)
        assert b"listening" in line
        assert os.stat(path).st_mode & 0o777 == 0o600
        async with await capbus.connect_peer(path) as a, await capbus.connect_peer(path) as b:
            node = await a.create_node()
            await b.send(await a.transfer(node, b), b"over the daemon")
            with trio.fail_after(5):
                assert (await a.recv()).payload == b"over the daemon"
        # Someone without access to the file cannot even connect.
        assert os.getuid() == 0, "this check needs root (CI runs as root) to drop to another uid"
        probe = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
        )
        # The directory is open to it (pytest makes its own 0700, under others of 0700, which
        # as_user makes reachable): only the socket's mode stands in its way, as the control
        # with a wider mode shows.
        os.chmod(tmp_path, 0o755)
        command = as_user([sys.executable, "-c", probe, path], 65534, 65534, readable=[os.fspath(tmp_path)])
        with trio.fail_after(30):
            assert (await trio.run_process(command, check=False)).returncode == 13
            os.chmod(path, 0o666)
            assert (await trio.run_process(command, check=False)).returncode == 0
        process.terminate()


def subprocess_pipe() -> int:
    import subprocess

    return subprocess.PIPE


async def test_socket_for_child_is_a_seqpacket_connection(kernel: capbus.Kernel) -> None:
    sock = kernel.socket_for_child()
    try:
        assert sock.type == socket.SOCK_SEQPACKET and sock.family == socket.AF_UNIX
    finally:
        sock.close()


async def test_large_payload_travels_as_sealed_memfd(new_peer: PeerFactory) -> None:
    sender = await new_peer()
    receivers = [await new_peer() for _ in range(2)]
    targets = [await r.transfer(await r.create_node(), sender) for r in receivers]
    payload = os.urandom(3 * 1024 * 1024 + 7)
    assert len(payload) > capbus._wire.PAYLOAD_MAX
    results = await sender.send(targets, payload)
    assert results == (None, None)
    for receiver in receivers:
        message = await recv_kind(receiver, DATA)
        assert len(message.payload_view) == len(payload)
        assert message.payload == payload
        assert message.fds == []  # the memfd became the payload, nothing left to close
        with pytest.raises(TypeError):
            message.payload_view[0] = 0  # a read-only mapping


async def test_unsealed_memfd_payload_is_refused(new_peer: PeerFactory) -> None:
    sender = await new_peer()
    receiver = await new_peer()
    target = await receiver.transfer(await receiver.create_node(), sender)
    memfd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    os.write(memfd, b"changeable")
    try:
        with pytest.raises(capbus.NotSealed) as info:
            await sender._send(target, b"", (), [memfd], 0, capbus._wire.SEND_FLAG_MEMFD)
        assert info.value.errno == errno.ETXTBSY
        read_end, write_end = os.pipe()
        with pytest.raises(capbus.BadFileDescriptor) as not_memfd:
            await sender._send(target, b"", (), [read_end], 0, capbus._wire.SEND_FLAG_MEMFD)
        assert not_memfd.value.errno == errno.EBADF
        os.close(read_end)
        os.close(write_end)
    finally:
        os.close(memfd)
    assert_queue_empty(receiver)


async def test_oneway_send_needs_no_answer_and_reports_failures_in_order(
    kernel: capbus.Kernel, new_peer: PeerFactory
) -> None:
    sender = await new_peer()
    receiver = await new_peer()
    live = await receiver.transfer(await receiver.create_node(), sender)
    doomed_node = await receiver.create_node()
    doomed = await receiver.transfer(doomed_node, sender)
    sender_inbox = await sender.create_node()
    await receiver.destroy(doomed_node)
    assert (await recv_kind(sender, DESTROYED)).destination == doomed

    for i in range(100):
        await sender.send_oneway(live, b"%d" % i)
    await sender.send_oneway([live, doomed], b"both")
    await sender.send_oneway([live, live], b"duplicate")  # refused as a whole
    await sender.send(sender_inbox, b"marker")  # an acknowledged send after them
    # Only the failures came back, as messages, in the order they happened.
    failed = await recv_kind(sender, capbus.MessageKind.SEND_FAILED)
    assert failed.destination == doomed and isinstance(failed.error, capbus.NodeDestroyed)
    refused = await recv_kind(sender, capbus.MessageKind.SEND_FAILED)
    assert not refused.destination.is_valid and isinstance(refused.error, capbus.DuplicateId)
    assert (await recv_kind(sender, DATA)).payload == b"marker"
    assert_queue_empty(sender)
    assert (await recv_kind(receiver, DESTROYED)).destination == doomed_node
    for i in range(100):
        assert (await recv_kind(receiver, DATA)).payload == b"%d" % i
    assert (await recv_kind(receiver, DATA)).payload == b"both"
    assert_queue_empty(receiver)


async def test_oneway_failures_carry_the_senders_tag(new_peer: PeerFactory) -> None:
    sender = await new_peer()
    receiver = await new_peer()
    node = await receiver.create_node()
    target = await receiver.transfer(node, sender)
    await receiver.destroy(node)
    await sender.send_oneway(target, b"tagged", tag=12345)
    await sender.send_oneway(target, b"untagged")
    first = await recv_kind(sender, DESTROYED)
    assert first.destination == target
    tagged = await recv_kind(sender, capbus.MessageKind.SEND_FAILED)
    untagged = await recv_kind(sender, capbus.MessageKind.SEND_FAILED)
    assert tagged.tag == 12345 and untagged.tag is None
    with pytest.raises(capbus.InvalidArgument):
        await sender.send_oneway(target, b"", tag=-1)


async def test_oneway_nowait_sends_without_yielding_and_says_when_it_cannot(
    new_peer: PeerFactory,
) -> None:
    sender = await new_peer()
    receiver = await new_peer()
    node = await receiver.create_node()
    target = await receiver.transfer(node, sender)
    for i in range(10):  # no checkpoint in between: nothing else runs
        sender.send_oneway_nowait(target, b"%d" % i, tag=i)
    for i in range(10):
        assert (await recv_kind(receiver, DATA)).payload == b"%d" % i
    await receiver.destroy(node)
    assert (await recv_kind(sender, DESTROYED)).destination == target
    sender.send_oneway_nowait(target, b"late", tag=77)
    failed = await recv_kind(sender, capbus.MessageKind.SEND_FAILED)
    assert failed.tag == 77 and isinstance(failed.error, capbus.NodeDestroyed)


async def test_oneway_nowait_on_a_full_socket_raises_would_block_and_sends_nothing() -> None:
    # A socket whose other end never reads stands in for a kernel that is behind.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    peer = capbus.Peer.from_socket(ours)
    sent = 0
    with pytest.raises(trio.WouldBlock):
        for _ in range(100_000):
            peer.send_oneway_nowait(1, b"x" * 4096)
            sent += 1
    assert sent > 0
    theirs.setblocking(False)
    received = 0
    while True:
        try:
            theirs.recv(65536)
        except BlockingIOError:
            break
        received += 1
    assert received == sent  # the refused frame was not half-written
    theirs.close()
    await peer.aclose()


async def test_a_payload_over_max_mapped_bytes_is_mapped_only_at_its_start(new_peer: PeerFactory) -> None:
    """A reader that will refuse messages over a size (a vat: its max_message_bytes) sets
    max_mapped_bytes: a larger memfd payload is not mapped whole, only its first
    PAYLOAD_HEAD_BYTES (where its header is, to tell its sender why), and whole_size says
    how large it is."""
    from capbus.peer import PAYLOAD_HEAD_BYTES

    sender, receiver = await new_peer(), await new_peer()
    node = await receiver.create_node()
    target = await receiver.transfer(node, sender)
    receiver.max_mapped_bytes = 256 * 1024
    payload = bytes(range(256)) * 4096  # 1 MiB, a memfd
    await sender.send(target, payload)
    await sender.send(target, payload[: 200 * 1024])  # a memfd under the bound: whole
    with trio.fail_after(10):
        big, small = await recv_kind(receiver, DATA), await recv_kind(receiver, DATA)
    assert (len(big.payload_view), big.whole_size) == (PAYLOAD_HEAD_BYTES, len(payload))
    assert big.payload == payload[:PAYLOAD_HEAD_BYTES]
    assert (small.payload, small.whole_size) == (payload[: 200 * 1024], None)


async def test_a_payload_too_large_for_the_address_space_comes_as_its_start(
    new_peer: PeerFactory, address_space_for_headers_only: None
) -> None:
    """When the whole payload cannot be mapped but its start can, the message comes with
    its start and whole_size (a vat then tells its sender), rather than being lost."""
    from capbus.peer import PAYLOAD_HEAD_BYTES

    sender, receiver = await new_peer(), await new_peer()
    node = await receiver.create_node()
    target = await receiver.transfer(node, sender)
    await sender.send(target, b"y" * (1 << 20))
    with trio.fail_after(10):
        got = await recv_kind(receiver, DATA)
    assert (got.payload, got.whole_size) == (b"y" * PAYLOAD_HEAD_BYTES, 1 << 20)
    assert got.unread.startswith("this process could not map it")
    assert receiver.unsolicited_errors == []


class _NoFdSlots:
    """A peer's socket as a process out of file descriptors sees it: every frame's fds are
    cut short (MSG_CTRUNC)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)

    def recvmsg_into(self, *args: object) -> tuple[int, list[tuple[int, int, bytes]], int, object]:
        size, ancdata, flags, address = self._sock.recvmsg_into(*args)
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in array.array("i", data[: len(data) - len(data) % 4]):
                    os.close(fd)
        return size, [], flags | (socket.MSG_CTRUNC if ancdata else 0), address


async def test_a_message_whose_fds_are_cut_short_comes_without_them(new_peer: PeerFactory) -> None:
    """A process with no fd slot left gets a frame's fds cut short (MSG_CTRUNC): that message
    comes without its fds (a large payload, which is one, is lost, and said so), and the
    peer goes on receiving."""
    sender, receiver = await new_peer(), await new_peer()
    node = await receiver.create_node()
    target = await receiver.transfer(node, sender)
    receiver._sock = _NoFdSlots(receiver._sock)  # type: ignore[assignment]
    read_end, write_end = os.pipe()
    try:
        await sender.send(target, b"with an fd", fds=[read_end])
        await sender.send(target, b"x" * (1 << 20))  # a memfd: lost
        await sender.send(target, b"after")
        with trio.fail_after(10):
            first = await recv_kind(receiver, DATA)
            second = await recv_kind(receiver, DATA)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert (first.payload, first.fds) == (b"with an fd", [])
    assert second.payload == b"after"
    (error,) = receiver.unsolicited_errors
    assert error.errno == errno.EMFILE


def memfd_mappings() -> collections.Counter[int]:
    """Mappings of capbus's payload memfds in this process, by inode (/proc/self/maps)."""
    found: collections.Counter[int] = collections.Counter()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith("/memfd:capbus-payload"):
            found[int(fields[4])] += 1
    return found


async def test_a_payload_built_in_a_memfd_is_sent_without_a_copy(new_peer: PeerFactory) -> None:
    """sealed_payload writes a payload straight into a sealed memfd; sending it (twice here)
    passes that same memfd: the receiver maps the same file (same inode in /proc/self/maps),
    where bytes are copied into a new memfd at each send."""
    from capbus.memfd import SealedMapping, sealed_payload

    sender, receiver = await new_peer(), await new_peer()
    target = await receiver.transfer(await receiver.create_node(), sender)
    size = 3 << 20
    payload = sealed_payload(size, lambda view: view.__setitem__(slice(0, 8), b"built in"))
    assert isinstance(payload.obj, SealedMapping)
    built_inode = os.fstat(payload.obj.memfd).st_ino
    before = memfd_mappings()
    with trio.fail_after(10):
        await sender.send(target, payload)
        await sender.send(target, payload)
        await sender.send(target, b"copied" + bytes(size))
        received = [await recv_kind(receiver, DATA) for _ in range(3)]
    assert [bytes(m.payload_view[:8]) for m in received] == [b"built in", b"built in", b"copied\0\0"]
    added = memfd_mappings() - before
    assert added[built_inode] == 2  # the receiver's two, of the one file the sender built
    assert sum(added.values()) == 3  # and one of the copied payload's own file


async def test_a_send_naming_a_closed_fd_fails_alone(new_peer: PeerFactory) -> None:
    """An fd to attach that is not open (EBADF from sendmsg) fails that send with
    InvalidArgument; the connection is as good as before (it used to be given up)."""
    sender, receiver = await new_peer(), await new_peer()
    target = await receiver.transfer(await receiver.create_node(), sender)
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(capbus.InvalidArgument, match="were refused"):
        await sender.send(target, b"with a closed fd", fds=[read_end])
    await sender.send(target, b"after")
    with trio.fail_after(10):
        assert (await recv_kind(receiver, DATA)).payload == b"after"


async def test_recv_from_two_tasks_at_once_hands_each_message_to_one(new_peer: PeerFactory) -> None:
    """An RPC vat's receive loop and a caller waiting for its return both call recv: a
    message read by one task while the other was at its checkpoint is never handed out
    twice, and none is lost (nor does the other fail on an empty queue)."""
    sender, receiver = await new_peer(), await new_peer()
    node = await receiver.create_node()
    target = await receiver.transfer(node, sender)
    got: list[bytes] = []
    all_in = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def take() -> None:
                while True:
                    message = await receiver.recv()
                    got.append(bytes(message.payload_view))
                    if len(got) == 200:
                        all_in.set()

            nursery.start_soon(take)
            nursery.start_soon(take)
            for i in range(200):
                await sender.send_oneway(target, b"%d" % i)
                if i % 7 == 0:
                    await trio.testing.wait_all_tasks_blocked()
            await all_in.wait()
            nursery.cancel_scope.cancel()
    assert sorted(got, key=int) == [b"%d" % i for i in range(200)]


async def test_recv_nowait_leaves_the_socket_to_a_task_waiting_for_it(new_peer: PeerFactory) -> None:
    """A task waits for the socket (in recv; a command waiting for its reply does the
    same); meanwhile another task's recv_nowait must not read what arrives off the socket:
    the waiting task would be left waiting for readability that never comes again (for a
    command, its reply lost to it)."""
    sender, receiver = await new_peer(), await new_peer()
    target = await receiver.transfer(await receiver.create_node(), sender)
    got: list[bytes] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                got.append(bytes((await receiver.recv()).payload_view))

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()  # wait() waits for the socket
            # From here on no checkpoint: wait() cannot run until the end of this block.
            sender.send_oneway_nowait(target, b"for the waiting task")
            readable, _, _ = select.select([receiver.fileno()], [], [], 5)
            assert readable, "the message did not arrive"
            with pytest.raises(trio.WouldBlock):
                receiver.recv_nowait()
    assert got == [b"for the waiting task"]
