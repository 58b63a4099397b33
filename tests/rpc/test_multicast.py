"""One-way multicast of one call to many objects, in one send, in one global order."""

from __future__ import annotations

from typing import Any

import trio

import capbus
from capbus.rpc import errors
from capbus.rpc.vat import open_vat

from .services import schema

EVENT = schema.Subscriber.interface.methods["event"]


class Listener(schema.Subscriber.Server):  # type: ignore[misc,name-defined]
    def __init__(self, expected: int) -> None:
        self.seen: list[tuple[int, str]] = []
        self.expected = expected
        self.complete = trio.Event()

    async def event(self, seq: int, text: str) -> None:
        self.seen.append((seq, text))
        if len(self.seen) == self.expected:
            self.complete.set()


async def test_every_subscriber_sees_every_event_in_the_same_order(kernel: capbus.Kernel) -> None:
    n_events = 60
    publishers = [await kernel.connect() for _ in range(2)]
    subscribers = [await kernel.connect() for _ in range(3)]
    listeners = [Listener(2 * n_events) for _ in subscribers]
    with trio.fail_after(30):
        async with open_vat(publishers[0]) as pub0, open_vat(publishers[1]) as pub1:
            async with (
                open_vat(subscribers[0]) as s0,
                open_vat(subscribers[1]) as s1,
                open_vat(subscribers[2]) as s2,
            ):
                clients: list[list[Any]] = [[], []]
                for vat, listener, peer in zip((s0, s1, s2), listeners, subscribers, strict=True):
                    node = await vat.export(listener)
                    for i, (pub_peer, pub_vat) in enumerate(((publishers[0], pub0), (publishers[1], pub1))):
                        handle = await peer.transfer(node, pub_peer)
                        clients[i].append(pub_vat.client(handle, schema.Subscriber))

                async def publish(vat: Any, name: str, targets: list[Any]) -> None:
                    for seq in range(n_events):
                        assert await vat.multicast(targets, EVENT, {"seq": seq, "text": name}) == (None,) * 3

                # Two publishers at once, to the same three subscribers.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(publish, pub0, "p0", clients[0])
                    nursery.start_soon(publish, pub1, "p1", clients[1])
                for listener in listeners:
                    await listener.complete.wait()
        for listener in listeners:
            # Each publisher's events in its order; and every subscriber the same interleaving.
            assert [s for s, t in listener.seen if t == "p0"] == list(range(n_events))
            assert listener.seen == listeners[0].seen
    for peer in publishers + subscribers:
        await peer.aclose()


async def test_multicast_reports_subscribers_that_are_gone(kernel: capbus.Kernel) -> None:
    publisher = await kernel.connect()
    alive, dead = await kernel.connect(), await kernel.connect()
    listener = Listener(1)
    with trio.fail_after(30):
        async with open_vat(publisher) as pub, open_vat(alive) as alive_vat:
            async with open_vat(dead) as dead_vat:
                dead_handle = await dead.transfer(await dead_vat.export(Listener(1)), publisher)
            await dead.aclose()  # its node is destroyed with it
            alive_handle = await alive.transfer(await alive_vat.export(listener), publisher)
            targets = [
                pub.client(alive_handle, schema.Subscriber),
                pub.client(dead_handle, schema.Subscriber),
            ]
            outcome = await pub.multicast(targets, EVENT, {"seq": 1, "text": "hello"})
            assert outcome[0] is None and isinstance(outcome[1], errors.Disconnected)
            await listener.complete.wait()
            assert listener.seen == [(1, "hello")]
    await publisher.aclose()
    await alive.aclose()


async def test_one_way_multicasts_arrive_in_order_and_a_dead_subscriber_changes_nothing(
    kernel: capbus.Kernel,
) -> None:
    """multicast_oneway returns once the send is written: a publisher sends a burst, and each
    subscriber gets all of it in order, a dead one among them changing nothing for the rest."""
    publisher = await kernel.connect()
    subscribers = [await kernel.connect() for _ in range(3)]
    dead = await kernel.connect()
    n_events = 200
    listeners = [Listener(n_events) for _ in subscribers]
    with trio.fail_after(30):
        async with open_vat(publisher) as pub, open_vat(subscribers[0]) as s0, open_vat(subscribers[1]) as s1:
            async with open_vat(subscribers[2]) as s2:
                async with open_vat(dead) as dead_vat:
                    dead_handle = await dead.transfer(await dead_vat.export(Listener(1)), publisher)
                await dead.aclose()
                targets = [pub.client(dead_handle, schema.Subscriber)]
                for vat, listener, peer in zip((s0, s1, s2), listeners, subscribers, strict=True):
                    handle = await peer.transfer(await vat.export(listener), publisher)
                    targets.append(pub.client(handle, schema.Subscriber))
                for seq in range(n_events):
                    await pub.multicast_oneway(targets, EVENT, {"seq": seq, "text": "burst"})
                for listener in listeners:
                    await listener.complete.wait()
                    assert listener.seen == [(seq, "burst") for seq in range(n_events)]
    for peer in [publisher, *subscribers]:
        await peer.aclose()
