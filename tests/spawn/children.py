"""Targets the spawn tests start in children (capbus.spawn imports this file in the child,
inside its sandbox)."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from pathlib import Path
from typing import Any

import trio

import capbus

schema: Any = capbus.load(Path(__file__).with_name("children.capnp"))


def _denied(error: OSError) -> str:
    return f"denied: {errno.errorcode.get(error.errno or 0, str(error.errno))}"


class Prober(schema.Prober.Server):  # type: ignore[misc,name-defined]
    def __init__(self, boot: capbus.Bootstrap) -> None:
        self.boot = boot

    def probe(self, what: str, arg: str) -> str:
        try:
            return "ALLOWED: " + self._probe(what, arg)
        except OSError as error:
            return _denied(error)

    def _probe(self, what: str, arg: str) -> str:
        if what == "read":
            with open(arg, "rb") as f:
                return f"{len(f.read())} bytes"
        if what == "write":
            with open(arg, "w") as f:
                f.write("written from the sandbox")
            return arg
        if what == "listdir":
            return ",".join(sorted(os.listdir(arg)))
        if what == "tcp":
            with socket.create_connection(("127.0.0.1", int(arg)), timeout=5):
                return "connected"
        if what == "inet":
            socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
            return "made an AF_INET socket"
        if what == "udp":
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
            return "made a UDP socket"
        if what == "unix":  # a capbus kernel's socket: SOCK_SEQPACKET
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(arg)
                return "connected"
        if what == "abstract":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect("\0" + arg)
                return "connected"
        if what == "signal":
            os.kill(int(arg), 0)
            return "may signal"
        if what == "unshare":
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
                raise OSError(ctypes.get_errno(), "unshare")
            return "unshared"
        if what == "ptrace":
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.ptrace(16, int(arg), 0, 0) != 0:  # PTRACE_ATTACH
                raise OSError(ctypes.get_errno(), "ptrace")
            return "attached"
        if what == "open_files":  # duplicates stdin until refused: how far it got, and why not
            opened = []
            try:
                for _ in range(100_000):
                    opened.append(os.dup(0))
            except OSError as error:
                return f"{len(opened)} more fds, then {_denied(error)}"
            finally:
                for fd in opened:
                    os.close(fd)
            return f"{len(opened)} more fds"
        if what == "processes":  # forks children that exit at once, reaping none until refused
            forked = []
            try:
                for _ in range(int(arg)):
                    pid = os.fork()
                    if pid == 0:
                        os._exit(0)
                    forked.append(pid)
            finally:
                for pid in forked:
                    os.waitpid(pid, 0)
            return f"{len(forked)} processes"
        if what == "spin":  # burns CPU time for up to ``arg`` seconds
            import time

            deadline = time.process_time() + float(arg)
            while time.process_time() < deadline:
                pass
            return "spun"
        if what in ("flock", "lease"):  # on a file of the view (the host's file)
            import fcntl

            with open(arg, "rb") as f:
                if what == "flock":
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:
                    fcntl.fcntl(f, 1024, fcntl.F_RDLCK)  # F_SETLEASE
            return f"took a {what}"
        if what == "inotify":
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(0)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            os.close(fd)
            return "can watch files"
        if what == "memfd":  # memory the address-space limit does not count
            fd = os.memfd_create("hoard")
            for _ in range(int(arg)):
                os.write(fd, b"x" * (1 << 20))
            return f"wrote {arg} MiB"
        if what == "chmod":
            os.chmod(arg, 0o777)
            return "changed the mode"
        if what == "pdeathsig":  # tries to outlive its parent
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, 0, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
                raise OSError(ctypes.get_errno(), "prctl")
            return "cleared the death signal"
        if what == "ids":
            return f"uid {os.getuid()} gid {os.getgid()}"
        if what == "environ":
            return ",".join(sorted(os.environ))
        if what == "fds":  # fd:device:inode of every open fd below 256
            return ",".join(_describe(fd) for fd in range(256) if _describe(fd))
        if what == "fd":
            fd = self.boot.fd(arg)
            return os.pread(fd.fileno(), 1 << 16, 0).decode()
        raise ValueError(f"unknown probe {what}")

    async def forge(self, first: int, last: int) -> list[int]:
        boot = self.boot
        engine = boot.vat.engine
        # What it holds: its own nodes, and every handle it received (the launcher, its
        # capabilities, the reply node of each caller).
        held = {*engine.reply_nodes, *engine.exports, *engine.imports.keys(), *engine._recent_replies}
        reached = []
        for handle in range(first, last + 1):
            if handle in held:
                continue
            try:
                await boot.peer.send(handle, b"forged")
                reached.append(handle)
            except capbus.CapbusError:
                pass
        return reached

    def allocate(self, megabytes: int) -> None:
        hoard = [bytearray(1 << 20) for _ in range(megabytes)]
        del hoard

    async def flood(self, target: Any, calls: int) -> int:
        """Sends every call before waiting for any answer; returns how many were refused."""
        refused = 0
        promises = []
        for _ in range(calls):
            try:
                promises.append(await target.put.send(data=b"x" * 1024))
            except capbus.rpc.errors.Overloaded:  # the kernel: the parent's queue is full
                refused += 1
        for promise in promises:
            try:
                await promise
            except capbus.rpc.errors.Overloaded:  # the parent's vat: too many calls waiting
                refused += 1
        return refused

    async def offerMany(self, count: int, batch: int, sameName: bool) -> dict[str, Any]:  # noqa: N802, N803
        accepted = 0
        for first in range(0, count, batch):
            names = [f"fd{0 if sameName else i}" for i in range(first, min(count, first + batch))]
            try:
                await self.boot.offer(**{name: 0 for name in names})
            except capbus.rpc.errors.RpcError as error:
                return {"accepted": accepted, "refusal": f"{type(error).__name__}: {error}"}
            accepted += len(names)
        return {"accepted": accepted, "refusal": ""}

    async def offerNamed(self, name: str) -> str:  # noqa: N802
        try:
            await self.boot.offer(**{name: 0})
        except capbus.rpc.errors.RpcError as error:
            return f"{type(error).__name__}: {error}"
        return ""

    def crash(self) -> None:
        ctypes.string_at(0)  # a real fault: even a pid 1 cannot ignore it

    async def hang(self) -> None:
        await trio.sleep_forever()


def _describe(fd: int) -> str:
    try:
        status = os.fstat(fd)
    except OSError:
        return ""
    return f"{fd}:{status.st_dev}:{status.st_ino}"


async def prober(boot: capbus.Bootstrap) -> None:
    """Offers a Prober and serves it."""
    await boot.offer(prober=Prober(boot))
    await trio.sleep_forever()


async def copier(boot: capbus.Bootstrap) -> None:
    """The job done through capabilities only: reads the ``input`` fd, writes it upper-cased
    to the ``output`` Sink, then offers nothing and exits."""
    source = boot.fd("input")
    sink = boot.get("output", schema.Sink)
    while chunk := os.read(source.fileno(), 4096):
        await sink.put(data=chunk.upper())
    await sink.done()


async def runaway(boot: capbus.Bootstrap) -> None:
    """Allocates until its memory limit stops it (and does not catch the MemoryError)."""
    hoard = []
    while True:
        hoard.append(bytearray(16 << 20))


async def give_back(boot: capbus.Bootstrap) -> None:
    """Offers back what it was given (identity checks), then serves a prober."""
    await boot.offer(same=boot.get("sink", schema.Sink), prober=Prober(boot))
    await trio.sleep_forever()


async def orphan_then_exit(boot: capbus.Bootstrap) -> None:
    """Leaves a process behind (a double fork: its parent is gone at once) and exits; says
    the orphan's pid on stderr."""
    import sys
    import time

    reader, writer = os.pipe()
    if os.fork() == 0:
        if os.fork() == 0:
            os.close(reader)
            os.write(writer, str(os.getpid()).encode())
            os.close(writer)
            while True:
                time.sleep(60)
        os._exit(0)
    os.close(writer)
    print("ORPHAN", os.read(reader, 32).decode(), file=sys.stderr, flush=True)
