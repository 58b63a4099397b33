"""The calculator example runs as two programs that meet at a unix: address, and prints the
right results."""

from __future__ import annotations

from collections.abc import Callable


def test_calculator_example(run_example: Callable[[str], list[str]]) -> None:
    said = run_example("calculator")
    assert said[0].startswith("serving a calculator at unix:/") and said[0].endswith("/calculator")
    assert said[1:] == [
        "123 = 123.0",
        "45 (pipelined) = 45.0",
        "123 + 45 = 168.0",
        "f(12, 34) = 1234.0",
        "2 ** 10 (called back) = 1024.0",
    ]
