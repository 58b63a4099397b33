"""The demo's sandboxed worker (examples/demo.py). It starts in a strict sandbox holding one
capability, the parent's notebook, and nothing else: no files, no network, no other
processes, no other objects."""

from __future__ import annotations

import notes_capnp as notes

import capbus


class Scratch(notes.Page.Server):
    """A page that lives in this sandboxed process: the parent will call it."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, *, line: str) -> None:
        self.lines.append(line)

    def read(self) -> list[str]:
        return [*self.lines, "(read from a page that lives in the sandbox)"]


def attempt(what: str, action: object) -> str:
    try:
        action()  # type: ignore[operator]
    except OSError as error:
        return f"{what}: denied ({error.strerror})"
    return f"{what}: ALLOWED"


async def main(boot: capbus.Bootstrap) -> None:
    notebook = boot.get("notebook", notes.Notebook)
    # Promise pipelining: write on the page before the call that makes it has returned.
    # Both calls go out at once: one round trip, not two.
    promise = await notebook.page.send(title="from the sandbox")
    await promise.page.write(line="written through a promise, before the page existed here")
    page = (await promise).page
    await page.write(line=attempt("open /etc/passwd", lambda: open("/etc/passwd")))
    # A capability passed back: an object of this process, which the parent then calls.
    scratch = Scratch()
    scratch.write(line="a line the worker wrote on its own page")
    await notebook.share(page=scratch, why="the worker's own page")
