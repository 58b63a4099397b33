"""The publisher: waits for its subscribers, then publishes two topics at once."""

from __future__ import annotations

import sys

import pubsub_capnp as ps
import trio

import capbus
from capbus.rpc.vat import Vat, open_vat

EVENT = ps.Subscriber.interface.methods["event"]
END = ps.Subscriber.interface.methods["end"]


class Publisher(ps.Publisher.Server):
    def __init__(self, expected: int) -> None:
        self.subscribers: list[ps.Subscriber] = []
        self.expected = expected
        self.ready = trio.Event()

    async def subscribe(self, *, subscriber: ps.Subscriber) -> int:
        self.subscribers.append(subscriber)
        if len(self.subscribers) == self.expected:
            self.ready.set()
        return len(self.subscribers)


async def publish(vat: Vat, publisher: Publisher, topic: str, count: int) -> None:
    for seq in range(count):
        # One multicast: the same call to every subscriber, in one kernel send.
        await vat.multicast(
            publisher.subscribers, EVENT, {"topic": topic, "seq": seq, "body": f"{topic} #{seq}"}
        )


async def main(fd: int, expected: int, count: int) -> None:
    async with capbus.Peer.from_socket(fd) as peer, open_vat(peer) as vat:
        (launcher,) = (await peer.take_seed()).handles
        publisher = Publisher(expected)
        await peer.send(launcher, b"publisher", handles=[await vat.export(publisher)])
        await publisher.ready.wait()
        async with trio.open_nursery() as nursery:  # two topics published concurrently
            nursery.start_soon(publish, vat, publisher, "weather", count)
            nursery.start_soon(publish, vat, publisher, "traffic", count)
        await vat.multicast(publisher.subscribers, END, {})
        await trio.sleep_forever()  # until the launcher stops the kernel


if __name__ == "__main__":
    try:
        trio.run(main, int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    except* capbus.Disconnected:
        pass
