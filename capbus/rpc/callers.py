"""What one caller has going at a vat (vat.py): its calls waiting to start, their order, and
its share of the handlers.

A caller is who the kernel says sent a call (:data:`capbus.rpc.engine.Caller`). Calls of
one caller start in the order they arrived (E-order), although trio may run a batch of new
tasks in any order: each call gets a ticket and waits for its turn. Callers do not wait for
one another's turns, and each may run a bounded number of handlers at once: a caller whose
handlers never end (they await a capability of its own that never answers) holds its own
share of the vat's handlers and no more, and the calls of others go on.

A uid can connect many peers (up to the kernel's peers_per_user), each a caller of its own:
what all callers of one uid have queued and running is bounded too (:class:`UserCalls`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import trio


@dataclass(frozen=True)
class QueueBounds:
    """What one caller's calls waiting to start may hold (Vat's max_queued_calls,
    max_queued_bytes_per_caller, max_queued_capabilities_per_caller); all callers of one
    uid together may hold ``uid_share`` times that."""

    calls: int
    bytes: int
    capabilities: int
    uid_share: int
    fds: int = 64
    """File descriptors their messages brought (for methods that may take some)."""


@dataclass(eq=False)
class UserCalls:
    """The calls of all callers of one uid at a vat (kept while any of them has calls)."""

    slots: trio.Semaphore
    """Handlers of this uid's callers that may run at once."""
    callers: int = 0
    """Its callers the vat keeps (CallerCalls)."""
    queued: int = 0
    queued_bytes: int = 0
    queued_handles: int = 0
    """The sum of its callers' distinct queued handles."""
    queued_fds: int = 0
    running_fds: int = 0


@dataclass(eq=False)
class CallerCalls:
    """One caller's calls at a vat (kept while it has any)."""

    slots: trio.Semaphore
    """Handlers of this caller that may run at once (``max_calls_per_caller``)."""
    user: UserCalls
    """Its uid's calls."""
    calls: int = 0
    """Calls taken in (queued or running): the vat forgets the caller when none are left."""
    queued: int = 0
    """Calls whose handler has not started (bounded by ``max_queued_calls``)."""
    queued_bytes: int = 0
    """Bytes of those calls' messages (bounded by ``max_queued_bytes_per_caller``)."""
    queued_fds: int = 0
    """File descriptors those messages brought and this process holds (QueueBounds.fds)."""
    running_fds: int = 0
    """... and those its running calls' messages still hold (counted with them)."""
    queued_handles: dict[int, int] = field(default_factory=dict)
    """Handles those calls brought besides their reply capability -> how many of them carry
    it (distinct handles bounded by ``max_queued_capabilities_per_caller``: the kernel counts
    a handle once however many messages carried it)."""
    tickets: int = 0
    turn: int = 0
    _turn_events: dict[int, trio.Event] = field(default_factory=dict)
    _skipped: list[tuple[int, int]] = field(default_factory=list)
    """Tickets given up before their turn, as sorted, disjoint [start, end) ranges: calls
    canceled while an earlier one holds the turn cost no memory each (the turn may stay
    where it is for as long as the caller's own handlers hold its slots)."""

    @property
    def idle(self) -> bool:
        """No call of this caller waits for its turn: a new one may start at once."""
        return self.turn == self.tickets

    def overloaded(self, size: int, handles: tuple[int, ...], fds: int, bounds: QueueBounds) -> str | None:
        """Why a call of ``size`` bytes that brings ``handles`` and ``fds`` may not queue
        (None: it may). The first call of a caller always fits its own bounds (not its
        uid's)."""
        new = len(set(handles).difference(self.queued_handles))
        user, share = self.user, bounds.uid_share
        held_fds = self.queued_fds + self.running_fds
        if (
            self.queued >= bounds.calls
            or (
                self.queued
                and (
                    len(self.queued_handles) + new > bounds.capabilities
                    or self.queued_bytes + size > bounds.bytes
                )
            )
            or (held_fds and held_fds + fds > bounds.fds)  # (running calls' too)
        ):
            return (
                f"{self.queued} calls are already waiting here (from this caller), of"
                f" {self.queued_bytes} bytes with {len(self.queued_handles)} capabilities and"
                f" {self.queued_fds} file descriptors"
            )
        if (
            user.queued >= bounds.calls * share
            or user.queued_handles + new > bounds.capabilities * share
            or user.queued_bytes + size > bounds.bytes * share
            or user.queued_fds + user.running_fds + fds > bounds.fds * share
        ):
            return (
                f"{user.queued} calls are already waiting here (from this caller's uid, of all"
                f" its connections), of {user.queued_bytes} bytes with {user.queued_handles}"
                f" capabilities and {user.queued_fds} file descriptors"
            )
        return None

    def enqueue(self, size: int, handles: tuple[int, ...], fds: int = 0) -> None:
        """A call taken in, to wait for its turn and a handler slot."""
        self.calls += 1
        self.queued += 1
        self.queued_bytes += size
        self.queued_fds += fds
        self.user.queued += 1
        self.user.queued_bytes += size
        self.user.queued_fds += fds
        for handle in handles:
            held = self.queued_handles.get(handle, 0)
            self.queued_handles[handle] = held + 1
            self.user.queued_handles += not held

    def dequeue(self, size: int, handles: tuple[int, ...], fds: int = 0, held: int = 0) -> None:
        """A call whose handler starts (or that will not run); ``held`` of its ``fds`` stay
        held while it runs (until :meth:`release`)."""
        self.queued -= 1
        self.queued_bytes -= size
        self.queued_fds -= fds
        self.running_fds += held
        self.user.running_fds += held
        self.user.queued -= 1
        self.user.queued_bytes -= size
        self.user.queued_fds -= fds
        for handle in handles:
            left = self.queued_handles.pop(handle) - 1
            if left:
                self.queued_handles[handle] = left
            else:
                self.user.queued_handles -= 1

    def release(self, held: int) -> None:
        """A handler that ran ended: what its message held is let go."""
        self.running_fds -= held
        self.user.running_fds -= held

    def ticket(self) -> int:
        self.tickets += 1
        return self.tickets - 1

    async def wait_turn(self, ticket: int) -> None:
        if ticket != self.turn:  # (a task just started needs no checkpoint of its own)
            event = self._turn_events.setdefault(ticket, trio.Event())
            await event.wait()

    def pass_turn(self, ticket: int | None) -> None:
        """Lets the next call start (a ticket given up before its turn is skipped later)."""
        if ticket is None:
            return
        if ticket != self.turn:
            self._turn_events.pop(ticket, None)  # no one waits on it any more
            self._skip(ticket)
            return
        self.turn += 1
        if self._skipped and self._skipped[0][0] == self.turn:
            self.turn = self._skipped.pop(0)[1]
        event = self._turn_events.pop(self.turn, None)
        if event is not None:
            event.set()

    def _skip(self, ticket: int) -> None:
        """Files ``ticket`` in :attr:`_skipped`, merged with the ranges next to it."""
        ranges = self._skipped
        index = bisect.bisect_left(ranges, (ticket, ticket))
        start, end = ticket, ticket + 1
        if index < len(ranges) and ranges[index][0] == end:
            end = ranges.pop(index)[1]
        if index and ranges[index - 1][1] == start:
            index -= 1
            start = ranges.pop(index)[0]
        ranges.insert(index, (start, end))
