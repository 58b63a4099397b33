"""``-> stream`` methods: flow control with a window of bytes in flight, delivery in order,
and an error that fails the next call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc import errors
from capbus.rpc.vat import open_vat

streams: Any = capbus.load(Path(__file__).with_name("stream.capnp"))


class SlowSink(streams.Sink.Server):  # type: ignore[misc,name-defined]
    def __init__(self, fail_at: int | None = None) -> None:
        self.seen: list[int] = []
        self.bytes = 0
        self.fail_at = fail_at
        self.running = self.most_running = 0
        self.proceed = trio.Event()

    async def write(self, seq: int, data: bytes) -> None:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.proceed.wait()  # a slow consumer: nothing is processed until allowed
            if seq == self.fail_at:
                raise errors.Failed(f"cannot take chunk {seq}")
            self.seen.append(seq)
            self.bytes += len(data)
        finally:
            self.running -= 1

    async def done(self) -> dict[str, int]:
        return {"count": len(self.seen), "bytes": self.bytes}


async def test_stream_calls_are_flow_controlled_and_in_order(kernel: capbus.Kernel) -> None:
    sink = SlowSink()
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    chunk = b"x" * 10_000
    with trio.fail_after(20):
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            client_vat.stream_window = 64 * 1024
            node = await server_vat.export(sink)
            remote = client_vat.client(await server_peer.transfer(node, client_peer), streams.Sink)
            # Nothing is acknowledged yet: the writes that fit the window return at once ...
            sent = 0
            with trio.move_on_after(0.5):  # the caller's patience, not a synchronisation
                for seq in range(100):
                    await remote.write(seq, chunk)
                    sent += 1
            state = client_vat._streams[remote.handle]
            assert 0 < sent < 100  # ... and the next one waits for acknowledgements
            assert state.in_flight <= client_vat.stream_window
            sink.proceed.set()
            for seq in range(sent, 100):
                await remote.write(seq, chunk)
            totals = await remote.done()  # a regular call waits for the stream to drain
            assert (totals.count, totals.bytes) == (100, 100 * len(chunk))
            assert sink.seen == list(range(100))  # delivered and run in order ...
            assert sink.most_running == 1  # ... one at a time
            assert state.most_in_flight <= client_vat.stream_window
    await server_peer.aclose()
    await client_peer.aclose()


async def test_a_stream_error_fails_the_next_call(kernel: capbus.Kernel) -> None:
    sink = SlowSink(fail_at=3)
    sink.proceed.set()
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    with trio.fail_after(20):
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            node = await server_vat.export(sink)
            remote = client_vat.client(await server_peer.transfer(node, client_peer), streams.Sink)
            for seq in range(6):
                try:
                    await remote.write(seq, b"data")
                except errors.Failed:
                    break  # an earlier chunk's error surfaced
            with pytest.raises(errors.Failed, match="cannot take chunk 3"):
                await remote.done()
            with pytest.raises(errors.Failed, match="cannot take chunk 3"):
                await remote.done()  # a failed stream stays failed
            assert sink.seen[:3] == [0, 1, 2]
    await server_peer.aclose()
    await client_peer.aclose()


async def test_queued_stream_calls_of_a_caller_that_left_are_canceled(kernel: capbus.Kernel) -> None:
    """A caller sends five stream calls to a sink that takes one at a time, then goes away:
    the one running is canceled, and so are the four queued behind it, before they start
    (they used to run one after another, for no one)."""
    sink = SlowSink()
    started = 0
    write = sink.write

    async def counted(seq: int, data: bytes) -> None:
        nonlocal started
        started += 1
        await write(seq, data)

    sink.write = counted  # type: ignore[method-assign]
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    with trio.fail_after(20):
        async with open_vat(server_peer) as server_vat:
            node = await server_vat.export(sink)
            async with open_vat(client_peer) as client_vat:
                remote = client_vat.client(await server_peer.transfer(node, client_peer), streams.Sink)
                for seq in range(5):
                    await remote.write(seq, b"chunk")
                while sum(len(q) for q in server_vat._stream_queues.values()) < 5:  # polled, bounded
                    await trio.sleep(0.001)
            await client_peer.aclose()  # its reply node goes with it
            while server_vat._stream_queues:  # polled, bounded by fail_after
                await trio.sleep(0.001)
            assert (started, sink.seen, sink.running) == (1, [], 0)
            assert server_vat.statistics().answers == 0
    await server_peer.aclose()
