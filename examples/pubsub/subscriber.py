"""A subscriber: hands the publisher a callback, prints a digest of the events' order."""

from __future__ import annotations

import hashlib
import sys

import pubsub_capnp as ps
import trio

import capbus
from capbus.rpc.vat import open_vat


class Listener(ps.Subscriber.Server):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.done = trio.Event()

    async def event(self, *, topic: str, seq: int, body: str) -> None:
        self.events.append(f"{topic}:{seq}")

    async def end(self) -> None:
        self.done.set()


async def main(fd: int, name: str) -> None:
    async with capbus.Peer.from_socket(fd) as peer, open_vat(peer, max_concurrent_calls=1) as vat:
        (handle,) = (await peer.take_seed()).handles
        publisher = vat.typed_client(handle, ps.Publisher)
        listener = Listener()
        await publisher.subscribe(subscriber=listener)
        await listener.done.wait()
        digest = hashlib.sha256("\n".join(listener.events).encode()).hexdigest()[:16]
        print(f"{name}: {len(listener.events)} events, order {digest}", flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), sys.argv[2])
