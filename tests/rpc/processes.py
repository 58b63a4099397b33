"""Another caller in a process of its own, for tests where who-is-who matters: a vat tells
its callers apart by their kernel-attested sending peer (capbus.rpc.engine.caller_of), so
the attacker's peer is a caller of its own."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

import capbus
from capbus.testing import as_user

CALLS = Path(__file__).with_name("calls.capnp")

CHILD = """
import sys

import trio

import capbus
from capbus.rpc import errors, protocol
from capbus.rpc.vat import open_vat

schema = capbus.load(sys.argv[2])
METHODS = schema.Factory.interface.methods
INCREMENT = schema.Counter.interface.methods["increment"]

{attack}

async def main(fd):
    async with capbus.Peer.from_socket(fd) as peer:
        seed = (await peer.take_seed()).handles

        async def report(value, handles=()):
            await peer.send(seed[0], str(value).encode(), handles=list(handles))

        await attack(peer, report, *seed[1:])
        await trio.sleep_forever()  # keeps what it took until the test kills it

trio.run(main, int(sys.argv[1]))
"""


@asynccontextmanager
async def attacker_process(
    kernel: capbus.Kernel,
    tmp_path: Path,
    attack: str,
    holder: capbus.Peer,
    handles: Sequence[capbus.Handle],
    *,
    user: int | None = None,
) -> AsyncIterator[str]:
    """Runs ``attack`` (the source of ``async def attack(peer, report, *handles)``) in a
    process of its own (as uid and gid ``user`` if given: its peer is then that uid's), on a
    peer given ``handles`` (held by ``holder``); yields what it passed to ``await
    report(...)``. The process, and everything it holds, goes at the end."""
    async with reporting_process(kernel, tmp_path, attack, holder, handles, user=user) as message:
        yield bytes(message.payload_view).decode()


@asynccontextmanager
async def reporting_process(
    kernel: capbus.Kernel,
    tmp_path: Path,
    attack: str,
    holder: capbus.Peer,
    handles: Sequence[capbus.Handle],
    *,
    user: int | None = None,
) -> AsyncIterator[capbus.Message]:
    """:func:`attacker_process`, yielding the message ``await report(value, handles)`` sent:
    the handles it passed along are held by a peer of this process until the end."""
    launcher = await kernel.connect()
    inbox = await launcher.create_node()
    given = [await holder.transfer(handle, launcher) for handle in handles]
    sock = await launcher.create_peer(handles=[inbox, *given])
    script = tmp_path / "attacker.py"
    script.write_text(CHILD.replace("{attack}", textwrap.dedent(attack)))
    argv = [sys.executable, str(script), str(sock.fileno()), str(CALLS)]
    if user is not None:
        argv = as_user(argv, user, user, readable=[str(script), str(CALLS)])
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            lambda task_status: trio.run_process(
                argv,
                pass_fds=[sock.fileno()],
                check=False,
                task_status=task_status,
            )
        )
        sock.close()
        try:
            message = await launcher.recv()
            assert message.kind is capbus.MessageKind.DATA, "the attacker died (its stderr is above)"
            yield message
        finally:
            process.kill()
    await launcher.aclose()
