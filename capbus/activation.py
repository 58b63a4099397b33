"""capbus.activatable: a capability to a service that starts on its first call (kdbus's and
systemd's activation, as a capability rather than a well-known name).

::

    async with capbus.activatable(vat, "worker:main", interface=Worker, offer="worker",
                                  capabilities={"store": store}, idle_exit=30) as worker:
        await worker.work(n=1)      # spawns the child (capbus.spawn), then calls it

The capability exists at once and can be passed on like any other. The first call through
it spawns the child (sandboxed as ``capbus.spawn`` does, with ``capabilities``) and waits
for the child to offer its object under ``offer``; calls that arrive meanwhile wait too,
and every call is passed on in the order it arrived. The child may exit when it is idle
(on its own, or ``idle_exit`` seconds after its last call ended, when the parent stops it);
the next call starts it again. A child that fails to start fails the calls that waited for
it, with the reason (its exit and the last line of its stderr; or that it did not offer
within ``start_timeout``); the next call tries again. A child that is going (it shut down:
its object's node is destroyed) gets no more calls: the next call starts another.

A call in flight when the child dies fails with Disconnected (it may have run); a call the
child never received (an UNDELIVERED notice: its connection went first) is not retried
either, so that no call ever runs twice behind its caller's back.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from .rpc.client import Client
from .rpc.errors import Failed
from .rpc.interface import Method
from .rpc.server import Server
from .rpc.vat import Vat, _interface
from .sandbox import Sandbox, SandboxError
from .spawning import ChildError, Target, spawn


class _Start:
    """One start of the child: its capability once it runs, or why it could not."""

    def __init__(self) -> None:
        self.ready = trio.Event()
        self.target: Client | None = None
        self.error: BaseException | None = None
        self.pid: int | None = None


class Activator(Server):
    """The object behind an activatable capability: passes each call on to the child,
    starting it first if it is not running."""

    def __init__(
        self,
        vat: Vat,
        target: Target,
        interface: Any,
        offer: str,
        spawn_options: Mapping[str, Any],
        idle_exit: float | None,
        start_timeout: float = 20.0,
    ) -> None:
        self.interface = _interface(interface)
        self._wanted = interface
        self._vat = vat
        self._target_spec = target
        self._offer = offer
        self._spawn_options = dict(spawn_options)
        self._idle_exit = math.inf if idle_exit is None else idle_exit
        self._start_timeout = start_timeout
        self._nursery: trio.Nursery | None = None
        self._start: _Start | None = None
        self._calls = 0  # calls being passed on or answered now
        self._activity = trio.Event()
        self._next_ticket = 0
        self._turn = 0
        self._done: set[int] = set()
        self._turn_passed = trio.Event()
        self.starts = 0
        """Children started (offered their object) so far."""
        self.failed_starts = 0
        self.pid: int | None = None
        """The running child's pid, or None."""
        self.stopped = trio.Event()
        """Set each time a child has gone (then replaced by a new event)."""

    # -- calls ---------------------------------------------------------------------------------

    async def _dispatch(self, method: Method, params: dict[str, Any]) -> Mapping[str, Any]:
        ticket = self._next_ticket
        self._next_ticket += 1
        self._calls += 1
        self._activity.set()
        try:
            try:
                target = await self._running()
                await self._wait_turn(ticket)
                promise = await target.vat.send_call(target, method, params)
            finally:
                self._pass_turn(ticket)  # (sent, or never will be: the next may go)
            results = await promise
            return results.to_dict()  # type: ignore[no-any-return]
        finally:
            self._calls -= 1
            self._activity.set()

    async def _wait_turn(self, ticket: int) -> None:
        """Calls are passed on one at a time, in the order they arrived: each waits until
        those before it were sent (not answered)."""
        while self._turn != ticket:
            passed = self._turn_passed
            await passed.wait()

    def _pass_turn(self, ticket: int) -> None:
        self._done.add(ticket)
        while self._turn in self._done:
            self._done.discard(self._turn)
            self._turn += 1
        self._turn_passed.set()
        self._turn_passed = trio.Event()

    async def _running(self) -> Client:
        """The child's object, starting the child if none runs."""
        while True:
            start = self._start
            if start is None:
                if self._nursery is None:
                    raise Failed("this activatable capability was closed")
                start = self._start = _Start()
                self._nursery.start_soon(self._run_child, start)
            await start.ready.wait()
            if start.target is not None and self._start is start:
                if start.target.handle not in self._vat.engine.broken:
                    return start.target
                # (it is going: shut down, or gone; this call was not sent to it, so it
                # goes to the next one, and the old one is left to finish)
                self._start = None
                continue
            if start.error is not None:
                raise Failed(f"the service could not start: {start.error}")
            # (it ran and went before this call got to it: start another)

    # -- the child -----------------------------------------------------------------------------

    async def _run_child(self, start: _Start) -> None:
        try:
            async with spawn(self._vat, self._target_spec, **self._spawn_options) as child:
                with trio.move_on_after(self._start_timeout) as waiting:
                    start.target = await child.capability(self._offer, self._wanted)
                if waiting.cancelled_caught:  # (hung, or hostile: killed as the block ends)
                    raise ChildError(f"it did not offer {self._offer!r} within {self._start_timeout:g} s")
                self.starts += 1
                self.pid = start.pid = child.pid
                start.ready.set()
                await self._serve_until_idle(child, start)
        except (ChildError, SandboxError, OSError, TypeError) as error:
            if not start.ready.is_set():
                self.failed_starts += 1
                start.error = error
        finally:
            if self._start is start:
                self._start = None
            if self.pid == start.pid:
                self.pid = None
            start.target = None
            start.ready.set()
            self.stopped.set()
            self.stopped = trio.Event()

    async def _serve_until_idle(self, child: Any, start: _Start) -> None:
        """Returns when the child exits, or when it has had no call for idle_exit seconds
        (then no new call goes to it: the next starts another)."""
        async with trio.open_nursery() as watching:

            async def exited() -> None:
                await child.wait()
                watching.cancel_scope.cancel()

            watching.start_soon(exited)
            while True:
                self._activity = trio.Event()
                if self._calls:
                    await self._activity.wait()
                    continue
                with trio.move_on_after(self._idle_exit):
                    await self._activity.wait()
                    continue
                if not self._calls:  # idle: later calls start a new child (no checkpoint since)
                    if self._start is start:  # (unless one started already: it is going)
                        self._start = None
                    watching.cancel_scope.cancel()
                    return


@asynccontextmanager
async def activatable(
    vat: Vat,
    target: Target,
    *,
    interface: Any,
    offer: str,
    capabilities: Mapping[str, object] | None = None,
    sandbox: Sandbox | None = None,
    idle_exit: float | None = None,
    start_timeout: float = 20.0,
    code: tuple[str | os.PathLike[str], ...] = (),
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Any]:
    """A capability (a client of ``interface``) to the object a child offers as ``offer``,
    the child spawned on the first call (see the module docstring). ``target``,
    ``capabilities``, ``sandbox``, ``code`` and ``env`` are :func:`capbus.spawn`'s.
    ``idle_exit``: seconds without calls after which the child is stopped (None: it runs
    until it exits by itself or the block ends). ``start_timeout``: seconds a child has to
    offer its object, else it is killed and the waiting calls fail. Leaving the block stops the child; the
    capability then fails calls. The :class:`Activator` is the client's ``server``."""
    options: dict[str, Any] = {"capabilities": capabilities, "sandbox": sandbox, "code": code, "env": env}
    activator = Activator(vat, target, interface, offer, options, idle_exit, start_timeout)
    async with trio.open_nursery() as nursery:
        activator._nursery = nursery
        try:
            client = vat.local(activator)
            yield client
        finally:
            activator._nursery = None
            nursery.cancel_scope.cancel()
