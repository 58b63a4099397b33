"""The calculator client: the steps of Cap'n Proto's sample client, against the calculator
served at the address it is given (``client.py unix:PATH``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import calculator_capnp as calc
import trio

import capbus

Calculator = calc.Calculator


class Power(calc.Calculator.Function.Server):
    """A function that lives in the client: the server calls back into it."""

    async def call(self, *, params: Sequence[float]) -> float:
        return float(params[0] ** params[1])


async def main(address: str) -> None:
    async with capbus.connect(address, Calculator) as calculator:
        # 1. A literal: the result is a Value capability, read with a second call.
        value = (await calculator.evaluate(expression={"literal": 123})).value
        print("123 =", (await value.read()).value)

        # 2. Pipelining: read() goes out before evaluate() has returned: one round trip.
        promise = await calculator.evaluate.send(expression={"literal": 45})
        print("45 (pipelined) =", (await promise.value.read()).value)

        # 3. Operators are functions; an earlier result is passed back as a capability.
        add = (await calculator.getOperator(op="add")).func
        multiply = (await calculator.getOperator(op="multiply")).func
        total = (
            await calculator.evaluate(
                expression={"call": {"function": add, "params": [{"previousResult": value}, {"literal": 45}]}}
            )
        ).value
        print("123 + 45 =", (await total.read()).value)

        # 4. A function defined by the client, evaluated by the server: f(x, y) = x * 100 + y.
        body: calc.Calculator.Expression.Fields = {
            "call": {
                "function": add,
                "params": [
                    {"call": {"function": multiply, "params": [{"parameter": 0}, {"literal": 100}]}},
                    {"parameter": 1},
                ],
            }
        }
        f = (await calculator.defFunction(paramCount=2, body=body)).func
        applied: calc.Calculator.Expression.Fields = {
            "call": {"function": f, "params": [{"literal": 12}, {"literal": 34}]}
        }
        print("f(12, 34) =", (await (await calculator.evaluate(expression=applied)).value.read()).value)

        # 5. A function that lives here: the server calls back into this process.
        power = Power()
        squared: calc.Calculator.Expression.Fields = {
            "call": {"function": power, "params": [{"literal": 2}, {"literal": 10}]}
        }
        print(
            "2 ** 10 (called back) =",
            (await (await calculator.evaluate(expression=squared)).value.read()).value,
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: client.py unix:PATH | tcp:HOST:PORT   (where server.py serves)")
    trio.run(main, sys.argv[1])
