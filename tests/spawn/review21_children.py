"""Children of review 21's activation attacks (test_attacks_review21_activation.py)."""

from __future__ import annotations

from pathlib import Path

import trio
from activated import Worker

import capbus


class Graceful(Worker):
    """retire() shuts its peer down gracefully (CAPBUS_CMD_SHUTDOWN: no new calls, the
    queued ones still answered) and answers; the child then drains and lingers (a slow
    graceful exit) until it is stopped."""

    def __init__(self, boot: capbus.Bootstrap) -> None:
        super().__init__()
        self.boot = boot

    async def retire(self) -> None:
        await self.boot.peer.begin_shutdown()


async def graceful(boot: capbus.Bootstrap) -> None:
    worker = Graceful(boot)
    await boot.offer(worker=worker)
    await trio.sleep_forever()


async def never_offers(boot: capbus.Bootstrap) -> None:
    await trio.sleep_forever()


_children = capbus.load(Path(__file__).with_name("children.capnp"))


class _Sink(_children.Sink.Server):  # type: ignore[misc,name-defined]
    async def put(self, data: bytes) -> None:
        pass

    async def done(self) -> None:
        pass


async def wrong_interface(boot: capbus.Bootstrap) -> None:
    """Offers a Sink under the name the parent expects a Worker under."""
    await boot.offer(worker=_Sink())
    await trio.sleep_forever()
