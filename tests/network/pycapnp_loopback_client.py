"""pycapnp's own client (its C++ RPC) sends a capability of its own to a capbus service that
returns it, and pipelines a call on the returned capability before the return arrives: the
promise resolves back to the client's own object, so C++ embargoes it (Disembargo
senderLoopback) until the pipelined call, which went to the service, has come back.
``python pycapnp_loopback_client.py HOST PORT``; prints what it checks."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import capnp

coverage = capnp.load(str(Path(__file__).resolve().parents[1] / "rpc" / "coverage.capnp"))


class Ping(coverage.Ping.Server):
    def __init__(self) -> None:
        self.pinged = 0

    async def ping(self, **kwargs):
        self.pinged += 1
        return self.pinged


async def main(host: str, port: int) -> None:
    connection = await capnp.AsyncIoStream.create_connection(host=host, port=port)
    cov = capnp.TwoPartyClient(connection).bootstrap().cast_as(coverage.Cov)
    mine = Ping()
    promise = cov.anyCap(cap=mine)
    pipelined = promise.cap.cast_as(coverage.Ping).ping()  # (before the return arrives)
    print("pipelined", (await pipelined).n, flush=True)
    home = (await promise).cap.as_interface(coverage.Ping)
    print("direct", (await home.ping()).n, flush=True)  # (the object itself now: its own count)
    print("pinged", mine.pinged, flush=True)


if __name__ == "__main__":
    asyncio.run(capnp.run(main(sys.argv[1], int(sys.argv[2]))))
