"""Owning a unix socket path: one owner at a time, and a stale socket replaced safely.

A service killed with SIGKILL leaves its socket file behind, and the next ``bind`` fails with
"Address already in use". Removing whatever is at the path is wrong too: another service may
be running there. So the owner of a path holds an exclusive ``flock`` on ``PATH.lock`` for as
long as it serves; the kernel drops the lock when the process dies, however it dies. Whoever
takes the lock may replace a socket left at the path (no live owner can be behind it), and
whoever cannot is told the path is in use. (The lock file is removed at a clean close; a
process that took the lock on a file being removed notices, since the path no longer leads
to the file it locked, and tries again.) Only a regular file is taken as the lock file, and
only one that holds :data:`LOCK_MARK` (one made here) is ever removed: a file of that name
someone else made (a project's ``flake.lock`` beside a ``flake`` socket) stays.

Only a socket is ever replaced: a regular file or anything else at the path is an error, and
so is a socket that still accepts connections (a server that takes no lock).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from typing import Final

_ATTEMPTS: Final = 8
LOCK_MARK: Final = b"capbus socket lock\n"
"""What a lock file made here holds: only such a file is removed at the end."""


class PathInUse(OSError):
    """Another live owner serves on the path (or something else is there)."""


class SocketPath:
    """The claim on one socket path (see the module docstring): :meth:`claim` it, bind
    there, :meth:`adopt` what was bound, and :meth:`release` at the end."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock_fd: int | None = None
        self._lock_path = self.path + ".lock"
        self._socket: tuple[int, str, int, int] | None = None
        """(directory fd, name, st_dev, st_ino) of the socket made here: removed at release
        only if the name still leads to it (a path in a directory others may write can be
        changed under us)."""

    def claim(self) -> None:
        """Takes the path: the lock, then a stale socket out of the way. PathInUse if a live
        owner has it, or the path holds something that is not a stale socket."""
        for _ in range(_ATTEMPTS):
            fd = self._open_lock()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                in_use = f"{self.path} is in use: another service serves there"
                raise PathInUse(errno.EADDRINUSE, in_use) from None
            try:
                held = os.fstat(fd)
                now = os.stat(self._lock_path, follow_symlinks=False)
            except FileNotFoundError:
                os.close(fd)
                continue  # (removed by the owner closing just now: take the new one)
            if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
                os.close(fd)
                continue
            self._lock_fd = fd
            if os.pread(fd, len(LOCK_MARK) + 1, 0) == b"":
                os.pwrite(fd, LOCK_MARK, 0)  # (made here, or left empty: ours to remove at the end)
            break
        else:
            raise PathInUse(errno.EADDRINUSE, f"{self.path}: could not take {self._lock_path}")
        try:
            self._clear_stale()
        except BaseException:
            self._remove_lock_file()
            self._unlock()
            raise

    def _open_lock(self) -> int:
        """The lock file, opened (made if missing); only a regular file is taken, and never
        through a symlink."""
        try:
            fd = os.open(
                self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600
            )
        except OSError as error:
            reason = "a symlink: not followed" if error.errno == errno.ELOOP else error.strerror
            raise PathInUse(error.errno or errno.EACCES, f"{self._lock_path}: {reason}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise PathInUse(errno.EEXIST, f"{self._lock_path} exists and is not a lock file")
        return fd

    def _clear_stale(self) -> None:
        try:
            found = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(found.st_mode):
            raise PathInUse(errno.EEXIST, f"{self.path} exists and is not a socket: not replaced")
        if _answers(self.path):
            raise PathInUse(errno.EADDRINUSE, f"{self.path} is in use: something accepts connections there")
        try:
            os.unlink(self.path)  # (a stale socket of a dead owner: no one serves it)
        except FileNotFoundError:
            pass

    def adopt(self) -> None:
        """Records the socket just bound at the path, to remove it at :meth:`release`."""
        directory, name = os.path.split(self.path)
        dir_fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            made = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except BaseException:
            os.close(dir_fd)
            raise
        if stat.S_ISSOCK(made.st_mode):
            self._socket = (dir_fd, name, made.st_dev, made.st_ino)
        else:  # swapped between the bind and here: not ours to remove
            os.close(dir_fd)

    def release(self) -> None:
        """Removes the socket made here (if the path still leads to it) and the lock file,
        then drops the lock. Idempotent."""
        if self._socket is not None:
            dir_fd, name, dev, ino = self._socket
            self._socket = None
            try:
                now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (dev, ino) and stat.S_ISSOCK(now.st_mode):
                    os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass  # gone already, or not ours any more
            finally:
                os.close(dir_fd)
        self._remove_lock_file()
        self._unlock()

    def _remove_lock_file(self) -> None:
        """Removes the lock file if it is one of ours (LOCK_MARK: a file of the same name
        someone else made, such as a project's ``flake.lock``, stays) and the path still
        leads to it."""
        if self._lock_fd is None:
            return
        try:
            held = os.fstat(self._lock_fd)
            now = os.stat(self._lock_path, follow_symlinks=False)
            ours = os.pread(self._lock_fd, len(LOCK_MARK) + 1, 0) == LOCK_MARK
            if ours and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                os.unlink(self._lock_path)
        except OSError:
            pass

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _answers(path: str) -> bool:
    """Whether a live socket is bound at ``path``: a connect of its type (stream or seqpacket)
    gets through or finds its backlog full; a stale one refuses."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
        probe = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except BlockingIOError:
            return True  # (its backlog is full: alive)
        except OSError as error:
            if error.errno == errno.EPROTOTYPE:
                continue  # (a socket of the other type: ask again with that)
            if error.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise PathInUse(error.errno or errno.EADDRINUSE, f"{path}: {error.strerror}") from None
        else:
            return True
        finally:
            probe.close()
    return True
