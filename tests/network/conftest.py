"""Fixtures of the network tests."""

from __future__ import annotations

from typing import Any

import pytest

from capbus.rpc import streamvat


@pytest.fixture
def vats(monkeypatch: pytest.MonkeyPatch) -> list[streamvat.StreamVat]:
    """Every StreamVat made in the test (the service's, one a connection), to read its tables."""
    made: list[streamvat.StreamVat] = []
    original = streamvat.StreamVat.__init__

    def init(self: streamvat.StreamVat, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(streamvat.StreamVat, "__init__", init)
    return made
