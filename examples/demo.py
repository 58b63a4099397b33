"""capbus demo: typed Cap'n Proto interfaces over bus1 handles, with a sandboxed child.
Run it with ``python3 dev.py demo``. Each line says what just happened.

    notes.capnp      two interfaces: a Notebook that hands out Pages (capabilities)
    this process     an embedded kernel, and the Notebook server (typed stubs)
    worker.py        a child in a strict sandbox holding one capability: the notebook;
                     it pipelines a call on a page it has not got yet, and passes an
                     object of its own back, which this process then calls.

(``examples/peers.py`` shows the layer below: peers, nodes and handles.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import trio

import capbus
from capbus.compiler import generate_file
from capbus.rpc.vat import open_vat

HERE = Path(__file__).resolve().parent / "demo"


def say(who: str, what: str) -> None:
    print(f"{who:>9} | {what}", flush=True)


async def main() -> int:
    stubs = generate_file(HERE / "notes.capnp")
    say("compile", f"notes.capnp -> {Path(stubs).name}: a typed client and Server base per interface")
    sys.path.insert(0, str(HERE))
    import notes_capnp as notes

    class Page(notes.Page.Server):
        def __init__(self, title: str) -> None:
            self.title, self.lines = title, []

        def write(self, *, line: str) -> None:
            say("page", f"{self.title!r}.write({line!r})")
            self.lines.append(line)

        def read(self) -> list[str]:
            return self.lines

    class Notebook(notes.Notebook.Server):
        def __init__(self) -> None:
            self.pages: list[Page] = []

        def page(self, *, title: str) -> Page:
            say("notebook", f"page({title!r}): a new Page, sent back as a capability (a bus1 handle)")
            self.pages.append(Page(title))
            return self.pages[-1]

        async def share(self, *, page: Any, why: str) -> int:
            say("notebook", f"share(page, {why!r}): a capability that came from the sandbox")
            lines = (await page.read()).lines
            say("notebook", f"called it back across the sandbox: read() -> {list(lines)}")
            return len(lines)

    notebook = Notebook()
    async with capbus.open_kernel() as kernel, await kernel.connect() as peer, open_vat(peer) as vat:
        say("kernel", "embedded in this process; this process is one peer on it")
        capabilities = {"notebook": notebook}
        async with capbus.spawn(vat, "worker:main", code=[HERE], capabilities=capabilities) as child:
            report = child.sandbox_report
            active = [layer for layer, state in report.items() if state.startswith("active")]
            say(
                "spawn",
                f"worker (pid {child.pid}) in a sandbox: {len(active)} of {len(report)} layers active",
            )
            say("spawn", "it holds one capability, the notebook, and can reach nothing else")
            with trio.fail_after(60):
                status = await child.wait()
        say("worker", f"{child.describe_exit()}")
        (page,) = notebook.pages
        say("notebook", f"page {page.title!r} now holds {page.lines}")
        stats = kernel.statistics()
        say("kernel", f"{stats.messages_sent} messages delivered, {stats.peers} peers left")
    return status


if __name__ == "__main__":
    sys.exit(trio.run(main))
