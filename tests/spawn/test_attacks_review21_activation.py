"""Review 21: attacks on capbus.activatable (capbus/activation.py) with real sandboxed
children (children in review21_children.py, the Worker of activated.py).

Tests named ``test_attack_*`` fail today and pass once the hole is closed; ``test_held_*``
pass today. What else was tried and held is listed at the end of this file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import capbus
from capbus.rpc import errors
from capbus.rpc.vat import Vat

HERE = Path(__file__).resolve().parent
schema: Any = capbus.load(HERE / "activated.capnp")
TIMEOUT = 60


def activatable(vat: Vat, target: str, **options: Any) -> Any:
    return capbus.activatable(vat, target, code=[HERE], interface=schema.Worker, offer="worker", **options)


async def test_attack_a_call_during_the_child_s_graceful_exit_fails_instead_of_starting_the_next(
    vat: Vat,
) -> None:
    """Severity: MEDIUM (activation loses calls exactly when it is meant to help).

    An activated service that exits when idle should do it gracefully (the point of
    CAPBUS_CMD_SHUTDOWN / Vat.shutdown: queued calls answered, nothing lost). From its
    SHUTDOWN until its process is reaped, the parent's Activator still takes the child's
    (now DRAINING, so broken) capability as the running one: ``_running`` returns
    ``start.target`` while ``self._start is start``, and every call in that window is
    forwarded to a destroyed node and fails with Disconnected, though it was never sent
    and "the next call starts it again" is the contract. The window lasts as long as the
    child drains (Vat.shutdown's grace: 10 s by default).

    Fix: in Activator._running, treat a start whose target is broken
    (``target.handle in vat.engine.broken``, i.e. a DRAINING or final NODE_DESTROYED seen)
    as gone: forget it (``self._start = None``) and start the next child, leaving the old
    one to drain; and, in _dispatch, a call refused before it was sent (NodeDestroyed on
    the send, or an UNDELIVERED notice for its question) may be passed to the next child
    as well, since it provably never ran."""
    async with activatable(vat, "review21_children:graceful") as worker:
        activator = worker.server
        with trio.fail_after(TIMEOUT):
            first = await worker.work(n=1)
            # The child shuts down gracefully before it answers: its DRAINING NODE_DESTROY
            # reaches this vat before the answer does (one ordered stream).
            await worker.retire()
            second = await worker.work(n=2)
    assert list(first.order) == [1]
    assert list(second.order) == [2]  # (a new child: the first saw [1, 2])
    assert activator.starts == 2


async def test_attack_a_child_that_never_offers_makes_every_call_wait_forever(vat: Vat) -> None:
    """Severity: LOW (availability: no start timeout).

    A child that starts but never offers its object (a deadlock in its setup, a wait on a
    resource that never comes, or sandboxed code that is hostile: spawn is for code the
    parent does not trust) keeps ``child.capability(offer)`` waiting for ever: the first
    call, and every later call (all wait on the same _Start), never fail, and no other
    child is ever tried. "A child that fails to start fails the calls that waited for it"
    holds only for a child that exits.

    Fix: a start timeout (an ``start_timeout`` option of activatable with a finite default,
    as systemd's TimeoutStartSec): past it, kill the child and fail the waiting calls with
    Failed("did not offer ... within N s"), counted in failed_starts; the next call tries
    again."""
    async with activatable(vat, "review21_children:never_offers", start_timeout=3) as worker:  # (default 20)
        activator = worker.server
        with trio.fail_after(TIMEOUT), pytest.raises(errors.Failed):
            await worker.work(n=1)  # (now: waits for ever)
        assert activator.failed_starts == 1


async def test_held_a_caller_that_gives_up_while_the_child_starts_does_not_stall_the_others(
    vat: Vat,
) -> None:
    """Held: three calls wait for the child's start; the first caller gives up (its scope
    is cancelled) before the child offers. Its ticket is passed on (_dispatch's finally),
    so the later calls are still passed on, in order, to the one child."""
    async with activatable(vat, "activated:serve") as worker:
        activator = worker.server
        results: dict[int, Any] = {}
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                give_up = trio.CancelScope()

                async def first() -> None:
                    with give_up:
                        await worker.work(n=0)

                async def later(n: int) -> None:
                    results[n] = await worker.work(n=n)

                nursery.start_soon(first)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(later, 1)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(later, 2)
                await trio.testing.wait_all_tasks_blocked()
                assert activator.starts == 0  # (still starting)
                give_up.cancel()
        assert list(results[2].order) == [1, 2] and activator.starts == 1


async def test_held_a_child_offering_the_wrong_interface_fails_the_calls_not_the_parent(vat: Vat) -> None:
    """Held: a child that offers a Sink where a Worker is expected: each call passed on to
    it fails with an RpcError from the child's side, and the activatable and the parent's
    vat go on (one start, no failed start, every later call answered the same way)."""
    async with activatable(vat, "review21_children:wrong_interface") as worker:
        activator = worker.server
        with trio.fail_after(TIMEOUT):
            for n in range(3):
                with pytest.raises(errors.RpcError):
                    await worker.work(n=n)
        assert activator.starts == 1 and activator.failed_starts == 0


# What was tried and HELD (or is by design):
#
# - A caller that gives up while the child starts: its ticket is passed on in _dispatch's
#   finally, later calls still go in order to one child (test_held_a_caller_that_gives_up...).
#   The same finally covers a start failure and a refused send.
# - Many concurrent first calls share one start (one _Start; test_activation covers six);
#   an idle stop cannot race a new call (no checkpoint between the check of _calls and
#   forgetting the start), and a call that waits for a start keeps the child from idling.
# - A child that crashes on start, or mid-call: the waiting calls fail with the reason /
#   Disconnected; errors of spawn are OSError (CapbusError included), SandboxError,
#   ChildError or TypeError, all caught, so nothing a caller can provoke escapes into the
#   activatable's nursery and ends the parent's block.
# - A child offering the wrong object under the name: the calls reach it and fail there
#   (the parent only wraps the client, _as); nothing in the parent breaks
#   (test_held_a_child_offering_the_wrong_interface_...).
# - A hostile child that offers and then never answers, or SHUTDOWNs and sits: the calls
#   forwarded to it wait (as with any server that does not answer) and, calls being open,
#   it is never idle-stopped; callers bound their calls with cancel scopes. Not new.
# - Respawn flooding: each call after a failed start (or after a child that exits on a
#   call) starts a child again, one start at a time, with no backoff. By design ("the next
#   call tries again"); a start-rate limit (systemd's StartLimitBurst) would be a
#   hardening, noted here rather than tested.
# - The parent's Vat.shutdown while calls are being passed on: the forwarding is a served
#   call that makes a call, so it hits test_attacks_review21.py's first finding (the
#   parent's reply nodes are destroyed by SHUTDOWN).
# - A call in flight when a child exits without a graceful shutdown fails with Disconnected
#   (documented); a call arriving between the child's going (its NODE_DESTROYED) and the
#   parent reaping it fails the same way: the race behind the first finding here, not made
#   deterministic as a test of its own.
