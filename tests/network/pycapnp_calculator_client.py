"""pycapnp's own RPC (asyncio, TwoPartyClient) as a client of a capbus calculator over TCP:
``python pycapnp_calculator_client.py HOST PORT``. Each line it prints is one check; the
test compares them. Written the way pycapnp's calculator example is, not with capbus."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import capnp

calculator = capnp.load(
    str(Path(__file__).resolve().parents[2] / "examples" / "calculator" / "calculator.capnp")
)


class PowerFunction(calculator.Calculator.Function.Server):
    """A function hosted here: the capbus server calls back into this process."""

    async def call(self, params, **kwargs):
        return pow(params[0], params[1])


async def main(host: str, port: int) -> None:
    connection = await capnp.AsyncIoStream.create_connection(host=host, port=port)
    client = capnp.TwoPartyClient(connection)
    calc = client.bootstrap().cast_as(calculator.Calculator)

    # A literal, its value read through the pipelined promise: one round trip.
    read = calc.evaluate({"literal": 123}).value.read()
    print("pipelined", (await read).value, flush=True)

    # An operator and a previous result (a capability of the server's, coming home).
    add = calc.getOperator(op="add").func
    first = (await calc.evaluate({"literal": 45})).value
    total = calc.evaluate({"call": {"function": add, "params": [{"previousResult": first}, {"literal": 5}]}})
    print("home", (await total.value.read()).value, flush=True)

    # A function defined here, evaluated there: f(x, y) = x * 100 + y.
    multiply = calc.getOperator(op="multiply").func
    body = {
        "call": {
            "function": add,
            "params": [
                {"call": {"function": multiply, "params": [{"parameter": 0}, {"literal": 100}]}},
                {"parameter": 1},
            ],
        }
    }
    f = (await calc.defFunction(paramCount=2, body=body)).func
    applied = calc.evaluate({"call": {"function": f, "params": [{"literal": 12}, {"literal": 34}]}})
    print("defined", (await applied.value.read()).value, flush=True)

    # A function that lives here: a callback into this process.
    power = calc.evaluate(
        {"call": {"function": PowerFunction(), "params": [{"literal": 2}, {"literal": 10}]}}
    )
    print("callback", (await power.value.read()).value, flush=True)

    # An exception from the server.
    try:
        await calc.evaluate({"call": {"function": add, "params": [{"literal": 1}]}}).value.read()
    except capnp.KjException as error:
        print("exception", error.description.split(":")[-1].strip(), flush=True)


if __name__ == "__main__":
    asyncio.run(capnp.run(main(sys.argv[1], int(sys.argv[2]))))
