"""The daemon's listen socket: its file mode is the access control (as /dev/bus1's is), so it
must have exactly the requested mode from the instant it exists, and nothing may be done to
the path after bind (finding F8: a chmod by path let another uid, in a directory it can
write, swap in a symlink and have a root daemon chmod the target)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

import capbus

from .other_uid import needs_root, python_as

NOBODY = 65534

# Swaps a symlink to the target in at the socket's path as fast as it can, until told to stop
# (stdin closes). Runs as another uid in a directory that uid can write.
_SWAPPER = """
import os, stat, sys, threading
path, target = sys.argv[1], sys.argv[2]
spare = path + ".new"
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
swaps = 0
print("ready", flush=True)
while not done.is_set():
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            continue
    except OSError:
        continue
    # The daemon has just bound its socket: swap it for a symlink to the target, in one
    # atomic step.
    try:
        os.symlink(target, spare)
    except OSError:
        pass
    try:
        os.rename(spare, path)
        swaps += 1
    except OSError:
        pass
print(swaps, flush=True)
"""


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666, 0o700])
def test_socket_has_exactly_the_mode_whatever_the_umask(tmp_path: Path, mode: int) -> None:
    previous = os.umask(0o077)
    try:
        kernel = capbus.Kernel()
        try:
            path = tmp_path / "bus"
            kernel.listen(path, mode)
            info = os.lstat(path)
            assert stat.S_ISSOCK(info.st_mode)
            assert stat.S_IMODE(info.st_mode) == mode, f"{oct(stat.S_IMODE(info.st_mode))} != {oct(mode)}"
        finally:
            lib_free(kernel)
        assert os.umask(0o077) == 0o077, "listen changed the process umask"
    finally:
        os.umask(previous)


def test_mode_outside_permission_bits_is_refused(tmp_path: Path) -> None:
    kernel = capbus.Kernel()
    try:
        with pytest.raises(capbus.CapbusError):
            kernel.listen(tmp_path / "bus", 0o4755)
        assert not (tmp_path / "bus").exists()
    finally:
        lib_free(kernel)


def lib_free(kernel: capbus.Kernel) -> None:
    """Frees a kernel that was never started (Kernel.aclose is async; nothing runs here)."""
    from capbus._kernel import lib

    lib.capbus_kernel_free(kernel._kernel)
    kernel._kernel = None
    kernel._remove_socket_file()  # as aclose does: only if it still is the socket made


def test_symlink_swapped_in_by_another_uid_is_never_chmodded(tmp_path: Path) -> None:
    needs_root("it runs the attacker as uid 65534 against a root daemon")
    # pytest's tmp_path lies under a 0700 directory the attacker cannot reach.
    shared = Path(tempfile.mkdtemp(prefix="capbus-listen-"))
    shared.chmod(0o777)  # another uid may write here (no sticky bit)
    target = tmp_path / "secret"
    target.write_bytes(b"root only")
    target.chmod(0o600)
    path = shared / "bus"
    swapper = subprocess.Popen(
        [*python_as(NOBODY, _SWAPPER), str(path), str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd="/",
    )
    listened = 0
    try:
        assert swapper.stdout is not None
        assert swapper.stdout.readline() == b"ready\n"
        for _ in range(3000):
            kernel = capbus.Kernel()
            try:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # as a daemon clearing a stale socket before it listens
                kernel.listen(path, 0o666)
                listened += 1
            except capbus.CapbusError:
                pass  # the attacker's symlink was there first: bind refuses to follow it
            finally:
                lib_free(kernel)  # removes only our own socket, never by path
            assert stat.S_IMODE(os.stat(target).st_mode) == 0o600, "the daemon chmodded the symlink's target"
    finally:
        assert swapper.stdin is not None and swapper.stdout is not None
        swapper.stdin.close()
        out = swapper.stdout.read()
        swapper.wait(timeout=30)
        shutil.rmtree(shared, ignore_errors=True)
    assert int(out) > 0, "the attacker never got to swap"
    assert listened > 0, "no listen succeeded, so nothing was checked"
