"""pycapnp's own RPC (asyncio, TwoPartyServer) serving tests/serving/echo.capnp's Echo over
TCP, for a capbus client: ``python pycapnp_echo_server.py``; prints the port, then serves."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import capnp

echo = capnp.load(str(Path(__file__).resolve().parents[1] / "serving" / "echo.capnp"))


class Echo(echo.Echo.Server):
    async def echo(self, text, **kwargs):
        if text == "fail":
            raise ValueError("as asked")
        return text

    async def pid(self, **kwargs):
        return os.getpid()

    async def call(self, ping, **kwargs):
        return (await ping.ping()).n * 2  # (a call back into the capbus client)


async def main() -> None:
    async def on_connection(stream):
        await capnp.TwoPartyServer(stream, bootstrap=Echo()).on_disconnect()

    server = await capnp.AsyncIoStream.create_server(on_connection, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(capnp.run(main()))
