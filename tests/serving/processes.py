"""What the serving tests share: programs started as a user would, waited for by their
first line."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

HERE = Path(__file__).parent
TIMEOUT = 30


@asynccontextmanager
async def started(argv: Sequence[str], *, stderr: bool = False) -> AsyncIterator[tuple[trio.Process, str]]:
    """A program started in this directory, once its first line (what it says when it
    serves or listens) is out; killed at the end if it still runs. ``stderr``: its error
    output piped too (``process.stderr``)."""
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            lambda task_status: trio.run_process(
                list(argv),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if stderr else None,
                cwd=HERE,
                check=False,
                task_status=task_status,
            )
        )
        said = b""
        with trio.fail_after(TIMEOUT):
            assert process.stdout is not None
            while not said.endswith(b"\n"):
                chunk = await process.stdout.receive_some()
                assert chunk, f"{argv} exited before its first line (status {await process.wait()})"
                said += chunk
        try:
            yield process, said.decode().strip()
        finally:
            process.kill()
