"""The pubsub example: three subscriber processes see the same order of events."""

from __future__ import annotations

from collections.abc import Callable


def test_pubsub_example(run_example: Callable[[str], list[str]]) -> None:
    lines = run_example("pubsub")
    assert lines[-1] == "all 3 subscribers saw the same order of 400 events"
    digests = {line.rsplit(" ", 1)[1] for line in lines[:-1]}
    assert len(lines) == 4 and len(digests) == 1
    assert all(": 400 events, order " in line for line in lines[:-1])
