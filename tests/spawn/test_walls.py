"""The walls of the strict sandbox, each tested from inside a child, and each shown to be the
wall: with the layers that make it turned off, the same probe gets through. A child can
still do its job through the capabilities it was given."""

from __future__ import annotations

import os
import signal
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc.vat import Vat

HERE = Path(__file__).resolve().parent
schema: Any = capbus.load(HERE / "children.capnp")


async def probe(vat: Vat, sandbox: capbus.Sandbox, what: str, arg: str = "") -> str:
    """What a probe finds from inside a child with ``sandbox``."""
    with trio.fail_after(30):
        async with capbus.spawn(vat, "children:prober", code=[HERE], sandbox=sandbox) as child:
            prober = await child.capability("prober", schema.Prober)
            outcome: str = (await prober.probe(what=what, arg=arg)).outcome
            return outcome


STRICT = capbus.Sandbox.strict()


async def test_host_files_are_out_of_reach(vat: Vat, tmp_path: Path) -> None:
    assert await probe(vat, STRICT, "read", "/etc/passwd") == "denied: ENOENT"  # not in the view
    escape = tmp_path / "escape"
    # ENOENT, or EROFS where the path's parents are in the view (this checkout under /tmp).
    assert await probe(vat, STRICT, "write", str(escape)) in ("denied: ENOENT", "denied: EROFS")
    assert not escape.exists()
    # Each of the two file system walls holds on its own ...
    assert await probe(vat, STRICT.without("mount_namespace"), "read", "/etc/passwd") == "denied: EACCES"
    assert await probe(vat, STRICT.without("landlock"), "read", "/etc/passwd") == "denied: ENOENT"
    # ... and without both, the probe gets through: the test can tell.
    opened = await probe(vat, STRICT.without("mount_namespace", "landlock"), "read", "/etc/passwd")
    assert opened.startswith("ALLOWED")


async def test_no_handle_on_a_host_directory_is_left_open(vat: Vat) -> None:
    """Every fd the child holds when its code runs: none is a host directory outside its
    view (a handle on the host's root, opened before the view went up, would reach past it
    through the *at calls)."""
    host = {(s.st_dev, s.st_ino) for s in (os.stat(p) for p in ("/", "/etc", "/tmp", "/root", "/var"))}
    fds = (await probe(vat, STRICT, "fds")).removeprefix("ALLOWED: ").split(",")
    held = {tuple(int(x) for x in fd.split(":")[1:]) for fd in fds}
    assert not held & host, fds


async def test_file_metadata_cannot_be_changed(vat: Vat, tmp_path: Path) -> None:
    """Landlock does not guard chmod, chown or utime, and a child of a root parent owns
    root's files; seccomp does. Shown without the view, where the child can name the file."""
    victim = tmp_path / "victim"
    victim.write_text("mode 600")
    victim.chmod(0o600)
    assert await probe(vat, STRICT, "chmod", str(victim)) == "denied: EPERM"  # seccomp, before the path
    no_view = STRICT.without("mount_namespace")
    assert await probe(vat, no_view, "chmod", str(victim)) == "denied: EPERM"
    assert victim.stat().st_mode & 0o777 == 0o600
    assert await probe(vat, no_view.without("seccomp"), "chmod", str(victim)) == "ALLOWED: changed the mode"
    assert victim.stat().st_mode & 0o777 == 0o777


async def test_files_of_the_view_cannot_be_locked_or_watched(vat: Vat, tmp_path: Path) -> None:
    """The view's files are the host's: a lock or a lease would stall host processes that
    use them, a watch would see what they do."""
    shared = tmp_path / "shared.txt"
    shared.write_text("a host file in the child's view")
    sandbox = STRICT.allow_read(shared)
    for what in ("flock", "lease"):
        assert await probe(vat, sandbox, what, str(shared)) == "denied: EPERM"
        assert await probe(vat, sandbox.without("seccomp"), what, str(shared)) == f"ALLOWED: took a {what}"
    assert await probe(vat, STRICT, "inotify") == "denied: EPERM"
    assert await probe(vat, STRICT.without("seccomp"), "inotify") == "ALLOWED: can watch files"


async def test_the_death_signal_cannot_be_cleared(vat: Vat) -> None:
    """A child that cleared PR_SET_PDEATHSIG would outlive its parent."""
    assert await probe(vat, STRICT, "pdeathsig") == "denied: EPERM"
    assert await probe(vat, STRICT.without("seccomp"), "pdeathsig") == "ALLOWED: cleared the death signal"


async def test_no_network(vat: Vat) -> None:
    listener = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = str(listener.getsockname()[1])
    try:
        assert await probe(vat, STRICT, "inet") == "denied: EAFNOSUPPORT"  # no TCP socket at all
        assert await probe(vat, STRICT, "udp") == "denied: EAFNOSUPPORT"
        assert await probe(vat, STRICT, "tcp", port) == "denied: EAFNOSUPPORT"
        # Without seccomp the socket is made, but Landlock refuses the connect; without
        # Landlock too, the network namespace has no route to 127.0.0.1.
        assert await probe(vat, STRICT.without("seccomp"), "tcp", port) == "denied: EACCES"
        only_netns = STRICT.without("seccomp", "landlock")
        assert await probe(vat, only_netns, "tcp", port) == "denied: ENETUNREACH"
        wide_open = STRICT.without("seccomp", "network_namespace", "landlock")
        assert await probe(vat, wide_open, "tcp", port) == "ALLOWED: connected"
        assert await probe(vat, STRICT.allow_network(), "tcp", port) == "ALLOWED: connected"
    finally:
        listener.close()


async def test_host_processes_cannot_be_seen_or_signalled(vat: Vat) -> None:
    me = str(os.getpid())
    assert await probe(vat, STRICT, "signal", me) == "denied: ESRCH"  # another pid namespace
    assert await probe(vat, STRICT, "listdir", "/proc") == "denied: ENOENT"  # no /proc at all
    assert (
        await probe(vat, STRICT.without("pid_namespace"), "signal", me) == "denied: EPERM"
    )  # Landlock scope
    no_walls = STRICT.without("pid_namespace", "landlock")
    assert await probe(vat, no_walls, "signal", me) == "ALLOWED: may signal"
    assert (await probe(vat, no_walls.without("mount_namespace"), "listdir", "/proc")).startswith("ALLOWED")


async def test_sockets_it_was_not_given_are_out_of_reach(vat: Vat, tmp_path: Path) -> None:
    """A daemon's socket (this test's kernel, listening on a path) and an abstract socket."""
    path = str(tmp_path / "daemon.sock")
    name = f"capbus-test-{uuid.uuid4().hex}"
    async with capbus.open_kernel(listen=path, mode=0o666):
        abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        abstract.bind("\0" + name)
        abstract.listen()
        try:
            assert await probe(vat, STRICT, "unix", path) == "denied: ENOENT"
            assert await probe(vat, STRICT, "abstract", name) in ("denied: ECONNREFUSED", "denied: EPERM")
            # The mount namespace is the wall for path sockets (Landlock does not cover connect).
            assert await probe(vat, STRICT.without("mount_namespace"), "unix", path) == "ALLOWED: connected"
            # Abstract sockets: the network namespace and Landlock's scope, each on its own.
            only_landlock = STRICT.without("network_namespace")
            assert await probe(vat, only_landlock, "abstract", name) == "denied: EPERM"
            only_netns = STRICT.without("landlock")
            assert await probe(vat, only_netns, "abstract", name) == "denied: ECONNREFUSED"
            neither = STRICT.without("network_namespace", "landlock")
            assert await probe(vat, neither, "abstract", name) == "ALLOWED: connected"
        finally:
            abstract.close()


async def test_no_new_namespaces(vat: Vat) -> None:
    assert await probe(vat, STRICT, "unshare") == "denied: EPERM"
    assert await probe(vat, STRICT.without("seccomp"), "unshare") == "ALLOWED: unshared"


async def test_memory_is_limited(vat: Vat) -> None:
    """The address-space limit (2 GiB by default) stops a 3 GiB allocation with a
    MemoryError (the cgroup, a quarter higher, does not strike first); the child lives on
    and answers."""
    with trio.fail_after(60):
        async with capbus.spawn(vat, "children:prober", code=[HERE]) as child:
            prober = await child.capability("prober", schema.Prober)
            with pytest.raises(capbus.rpc.errors.Failed, match="MemoryError"):
                await prober.allocate(megabytes=3072)
            assert (await prober.probe(what="environ", arg="")).outcome.startswith("ALLOWED")
        unlimited = STRICT.without("rlimits", "cgroup")
        async with capbus.spawn(vat, "children:prober", code=[HERE], sandbox=unlimited) as child:
            prober = await child.capability("prober", schema.Prober)
            await prober.allocate(megabytes=3072)  # no limit: it gets the memory


async def test_all_memory_is_limited(vat: Vat) -> None:
    """Memory in a memfd is not address space: the cgroup bounds it. The child is killed
    (the cgroup's OOM killer) and its cgroup removed; without the cgroup it gets it all."""
    small = STRICT.limits(memory_bytes=768 << 20)
    with trio.fail_after(60):
        async with capbus.spawn(vat, "children:prober", code=[HERE], sandbox=small) as child:
            assert child.sandbox_report["cgroup"].startswith("active")
            prober = await child.capability("prober", schema.Prober)
            with pytest.raises(capbus.rpc.errors.Disconnected):
                await prober.probe(what="memfd", arg="1536")
            assert await child.wait() == -signal.SIGKILL
    assert not [d for d in _cgroup_directories() if d.startswith(f"capbus-{os.getpid()}-")]
    assert await probe(vat, small.without("cgroup"), "memfd", "1536") == "ALLOWED: wrote 1536 MiB"


def _cgroup_directories() -> list[str]:
    found = []
    for root, _, _ in os.walk("/sys/fs/cgroup"):
        found.append(os.path.basename(root))
    return found


async def test_open_files_are_limited(vat: Vat) -> None:
    limited = await probe(vat, STRICT.limits(open_files=64), "open_files")
    assert limited.startswith("ALLOWED: ") and limited.endswith("more fds, then denied: EMFILE")
    assert int(limited.split()[1]) < 64
    # Without the layer, only the limit the parent has (here far above 64) applies.
    unlimited = await probe(vat, STRICT.without("rlimits"), "open_files")
    assert int(unlimited.split()[1]) > 64


async def test_cpu_time_is_limited(vat: Vat) -> None:
    """Past its CPU seconds the kernel kills the child; the parent sees it go. (SIGXCPU
    without a pid namespace; inside one the child is its init, which the kernel does not
    stop with SIGXCPU, and the hard limit's SIGKILL does it.)"""
    with trio.fail_after(60):
        for sandbox, signal_number in (
            (STRICT.limits(cpu_seconds=1), signal.SIGKILL),
            (STRICT.limits(cpu_seconds=1).without("pid_namespace"), signal.SIGXCPU),
        ):
            async with capbus.spawn(vat, "children:prober", code=[HERE], sandbox=sandbox) as child:
                prober = await child.capability("prober", schema.Prober)
                with pytest.raises(capbus.rpc.errors.Disconnected):
                    await prober.probe(what="spin", arg="30")
                assert await child.wait() == -signal_number
                assert child.describe_exit().startswith(f"killed by {signal_number.name}")
    assert await probe(vat, STRICT.without("rlimits"), "spin", "1.5") == "ALLOWED: spun"


class Counter(schema.Sink.Server):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        self.puts = 0

    def put(self, data: bytes) -> None:
        self.puts += 1


async def test_handle_ids_cannot_be_forged(vat: Vat) -> None:
    """The child sends to every handle id in a range but those it holds: none reaches
    anything, and an object of ours it was not given hears nothing."""
    hidden = Counter()
    await vat.export(hidden)  # a node of ours, never given to the child
    given = Counter()
    with trio.fail_after(60):
        async with capbus.spawn(
            vat, "children:give_back", code=[HERE], capabilities={"sink": given}
        ) as child:
            prober = await child.capability("prober", schema.Prober)
            assert list((await prober.forge(first=0, last=4096)).reached) == []
            assert hidden.puts == 0 and given.puts == 0
