"""The sandbox example: the converter does its job through its two capabilities, and
nothing else it tries gets through."""

from __future__ import annotations

import json
from collections.abc import Callable


def test_sandbox_example(run_example: Callable[[str], list[str]]) -> None:
    lines = run_example("sandbox")
    assert lines[0].startswith("sandbox: 12 of 12 layers active: fds, cgroup, rlimits, user_namespace")
    assert [json.loads(line)["name"] for line in lines[1:4]] == [
        "Ada Lovelace",
        "Grace Hopper",
        "Barbara Liskov",
    ]
    assert lines[4:7] == [
        "converter: open /etc/passwd: denied (No such file or directory)",
        "converter: open a TCP socket: denied (Address family not supported by protocol)",
        "converter: list /proc: denied (No such file or directory)",
    ]
    assert lines[7] == "converted 3 records; the converter exited with status 0"
