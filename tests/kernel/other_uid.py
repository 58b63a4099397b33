"""Python scripts that run as another uid, for the kernel tests that need real other users
(credentials on their sockets, their own fd limits), from any checkout: the switch is
capbus.testing.as_user, the one spawn uses. Needs root, as the tests that use it say.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import trio

from capbus.testing import as_user

# What the scripts may use without importing it themselves.
_IMPORTS = "errno, os, resource, select, socket, stat, struct, sys, threading, time"
_CAPBUS = "trio, capbus, capbus.peer, capbus.kernel, capbus.cli, capbus.errors"


def python_as(uid: int, script: str, *, nofile: int | None = None) -> list[str]:
    """The argv of a Python child that runs ``script`` as ``uid`` (and gid ``uid``), with
    RLIMIT_NOFILE ``nofile`` (soft and hard) if given; arguments after it are sys.argv[1:]."""
    limit = f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile}))" if nofile else ""
    prelude = "\n".join([f"import {_IMPORTS}", f"import {_CAPBUS}", limit])
    return as_user([sys.executable, "-c", prelude + "\n" + textwrap.dedent(script)], uid, uid)


# -- what the tests that run a daemon and attackers of other uids share ------------------------

NOBODY = 65534
TIMEOUT = 60


def needs_root(why: str = "it runs the kernel and its peers as other uids") -> None:
    """Fails (never skips) a test that cannot be checked as an unprivileged user."""
    assert os.geteuid() == 0, (
        f"this test needs root: {why} (CI runs the suite as root); it cannot be checked as an"
        " unprivileged user"
    )


@contextlib.contextmanager
def shared_directory() -> Iterator[Path]:
    """A directory every uid of the test can reach (pytest's tmp_path is under a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="capbus-uids-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


@contextlib.asynccontextmanager
async def daemon(
    where: Path,
    fd_limit: int | None = 1024,
    *,
    user: int | None = NOBODY,
    env: dict[str, str] | None = None,
) -> AsyncIterator[tuple[Path, trio.Process]]:
    """``capbus kernel`` listening in ``where``: by default as uid 65534 (no CAP_SYS_RESOURCE:
    Linux's in-flight fd limit applies) with RLIMIT_NOFILE ``fd_limit``, soft and hard; as
    this process's uid when ``user`` is None."""
    path = where / "bus"

    def limit() -> None:
        if fd_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    arguments = ["kernel", "--listen", str(path), "--mode", "666"]
    if user is None:
        command = [sys.executable, "-m", "capbus", *arguments]
    else:  # (through as_user: this interpreter and capbus may be out of that uid's reach)
        command = python_as(user, "capbus.cli.main(sys.argv[1:])", nofile=fd_limit) + arguments
    process = await trio.lowlevel.open_process(
        command,
        preexec_fn=limit if user is None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
        env={**os.environ, **(env or {})},
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(TIMEOUT):
            line = await process.stdout.receive_some(4096)
        assert b"listening" in line, line
        yield path, process
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)  # (a test may have stopped it)
            process.terminate()
        with trio.fail_after(TIMEOUT):
            await process.wait()
            assert process.stderr is not None
            log = await process.stderr.receive_some(1 << 16)
        print("kernel log:", log.decode(errors="replace")[-4000:])  # shown when the test fails


async def run_as(uid: int, script: str, *args: str, pass_fds: tuple[int, ...] = ()) -> trio.Process:
    """``script`` run by :func:`python_as` with pipes on its standard streams."""
    return await trio.lowlevel.open_process(
        [*python_as(uid, script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=pass_fds,
        cwd="/",
    )


async def read_line(process: trio.Process) -> str:
    """The next line the child prints, or its stderr in the failure if it ended first."""
    assert process.stdout is not None
    data = b""
    while not data.endswith(b"\n"):
        chunk = await process.stdout.receive_some(1)
        if not chunk:
            assert process.stderr is not None
            err = await process.stderr.receive_some(65536)
            raise AssertionError(f"the child ended: {err.decode(errors='replace')}")
        data += chunk
    return data.decode().strip()
