"""The calculator server: ``server.py unix:PATH`` serves a calculator there (a kernel of its
own in this process); clients reach it with ``client.py unix:PATH`` from anywhere on this
machine that may open PATH. ``server.py tcp:HOST:PORT`` serves the same calculator over
Cap'n Proto's standard RPC protocol, to ``client.py tcp:HOST:PORT`` or any Cap'n Proto
client (pycapnp's, C++'s...)."""

from __future__ import annotations

import operator
import signal
import sys
from collections.abc import Callable, Sequence

import calculator_capnp as calc
import trio

import capbus
from capbus.rpc.vat import open_vat

Calculator = calc.Calculator

OPERATORS: dict[str, Callable[[float, float], float]] = {
    "add": operator.add,
    "subtract": operator.sub,
    "multiply": operator.mul,
    "divide": operator.truediv,
}


async def evaluate(expression: calc.Calculator.Expression, params: Sequence[float] = ()) -> float:
    which = expression.which()
    if which == "literal":
        return expression.literal
    if which == "previousResult":
        return (await expression.previousResult.read()).value
    if which == "parameter":
        return params[expression.parameter]
    call = expression.call
    args = [await evaluate(p, params) for p in call.params]
    return (await call.function.call(params=args)).value  # maybe a callback into the client


class Value(calc.Calculator.Value.Server):
    def __init__(self, value: float) -> None:
        self.value = value

    def read(self) -> float:  # quick and never blocks: a plain def runs inline, with no task
        return self.value


class Function(calc.Calculator.Function.Server):
    """A function the client defined: its body is evaluated here for each call."""

    def __init__(self, param_count: int, body: calc.Calculator.Expression) -> None:
        self.param_count = param_count
        self.body = body

    async def call(self, *, params: Sequence[float]) -> float:
        if len(params) != self.param_count:
            raise capbus.rpc.errors.Failed(f"expected {self.param_count} parameters, got {len(params)}")
        return await evaluate(self.body, params)


class Operator(calc.Calculator.Function.Server):
    def __init__(self, op: str) -> None:
        self.op = OPERATORS[op]

    def call(self, *, params: Sequence[float]) -> float:
        if len(params) != 2:
            raise capbus.rpc.errors.Failed("an operator takes two parameters")
        return self.op(params[0], params[1])


class CalculatorServer(Calculator.Server):
    async def evaluate(self, *, expression: calc.Calculator.Expression) -> Value:
        return Value(await evaluate(expression))

    async def defFunction(self, *, paramCount: int, body: calc.Calculator.Expression) -> Function:
        return Function(paramCount, body)

    async def getOperator(self, *, op: calc.Calculator.Operator) -> Operator:
        return Operator(op)


async def serve_at(address: str) -> None:
    """Serves a calculator at ``address`` (``unix:PATH``, ``tcp:HOST:PORT``) until SIGINT or
    SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with capbus.serve(CalculatorServer(), address) as service:
            print(f"serving a calculator at {service.address}", flush=True)
            async for _ in signals:
                return  # (leaving the block closes the socket and removes its file)


async def serve_on_peer(fd: int) -> None:
    """Serves on a peer a launcher handed over (its seed: where to hand the calculator)."""
    async with capbus.Peer.from_socket(fd) as peer, open_vat(peer) as vat:
        (launcher,) = (await peer.take_seed()).handles
        node = await vat.export(CalculatorServer())
        await peer.send(launcher, b"calculator", handles=[node])  # hand out the bootstrap capability
        try:
            await trio.sleep_forever()  # serve until the kernel goes away
        except capbus.Disconnected:
            pass


USAGE = "usage: server.py unix:PATH | tcp:HOST:PORT   (or server.py --fd N: on a peer a launcher hands over)"

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--fd":
        try:
            trio.run(serve_on_peer, int(sys.argv[2]))
        except* capbus.Disconnected:
            pass  # the launcher stopped the kernel: we are done
    elif len(sys.argv) == 2:
        trio.run(serve_at, sys.argv[1])
    else:
        sys.exit(USAGE)
