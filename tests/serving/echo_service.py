"""The service the serving tests run: ``capbus serve unix:PATH echo_service:Echo`` (from
this directory), or served in the test's own process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import capbus

schema: Any = capbus.load(Path(__file__).with_name("echo.capnp"))


class Echo(schema.Echo.Server):  # type: ignore[misc,name-defined]
    def echo(self, text: str) -> str:
        return text

    def pid(self) -> int:
        return os.getpid()

    async def call(self, ping: Any) -> int:
        return int((await ping.ping()).n)


class Ping(schema.Ping.Server):  # type: ignore[misc,name-defined]
    def __init__(self, n: int) -> None:
        self.n = n

    def ping(self) -> int:
        return self.n
