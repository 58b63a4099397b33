"""File descriptors received in calls and results."""

from __future__ import annotations

import os
import weakref
from types import TracebackType


def duplicates(fds: list[int]) -> list[FileDescriptor]:
    """Owned copies of ``fds``, as a receiver would get them (for calls that stay local)."""
    return [FileDescriptor(os.dup(fd)) for fd in fds]


class FileDescriptor:
    """A file descriptor that arrived in a message, owned by this object: use ``fileno()``
    while it lives, ``detach()`` to take it over, or let it close when closed or collected."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the file descriptor was closed or detached")
        return self._fd

    def detach(self) -> int:
        """Gives up ownership: the caller now closes the fd."""
        fd = self.fileno()
        self._finalizer.detach()
        self._fd = -1
        return fd

    def close(self) -> None:
        if self._fd >= 0:
            self._finalizer()
            self._fd = -1

    def __enter__(self) -> FileDescriptor:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FileDescriptor {self._fd}>" if self._fd >= 0 else "<FileDescriptor closed>"
