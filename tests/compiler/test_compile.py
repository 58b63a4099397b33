"""``capbus compile``: typed modules that are deterministic, pass mypy --strict, and work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "tests" / "rpc"


CALCULATOR = ROOT / "examples" / "calculator"


def compile_to(tmp_path: Path, name: str, directory: Path = SCHEMAS) -> Path:
    output = tmp_path / f"{name}_capnp.py"
    result = subprocess.run(
        [sys.executable, "-m", "capbus", "compile", str(directory / f"{name}.capnp"), "-o", str(output)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the source tree: `-m` puts the working directory first on sys.path
    )
    assert result.returncode == 0, result.stderr
    return output


def test_output_is_deterministic(tmp_path: Path) -> None:
    for name in ("calls", "files", "stream", "capwire_demo", "naming"):
        first = compile_to(tmp_path, name).read_bytes()
        again = compile_to(tmp_path, name).read_bytes()
        assert first == again, name


def test_generated_code_passes_mypy_strict(tmp_path: Path) -> None:
    for name in ("calls", "files", "stream", "capwire_demo", "naming"):
        compile_to(tmp_path, name)
    compile_to(tmp_path, "calculator", CALCULATOR)  # nested types
    (tmp_path / "nested.py").write_text(
        "from __future__ import annotations\n"
        "import calculator_capnp as calc\n\n"
        "class Value(calc.Calculator.Value.Server):  # nested types by their nested names\n"
        "    def read(self) -> float:\n"
        "        return 1.0\n\n"
        "async def use(calculator: calc.Calculator, op: calc.Calculator.Operator) -> float:\n"
        "    value: calc.Calculator.Value = (await calculator.evaluate(expression={'literal': 1})).value\n"
        "    flat: calc.Calculator_Value = value  # the flat name is the same class\n"
        "    expression: calc.Calculator.Expression | None = None\n"
        "    del expression, op\n"
        "    return (await flat.read()).value\n"
    )
    (tmp_path / "usage.py").write_text(
        "from __future__ import annotations\n"
        "import calls_capnp\n\n"
        "class Counter(calls_capnp.Counter.Server):\n"
        "    def __init__(self) -> None:\n"
        "        self.value = 0\n\n"
        "    async def increment(self, *, by: int) -> int:\n"
        "        self.value += by\n"
        "        return self.value\n\n"
        "    def spawn(self) -> Counter:  # a plain def handler fits the base's signature too\n"
        "        return Counter()\n\n"
        "async def use(factory: calls_capnp.Factory) -> int:\n"
        "    counter = (await factory.newCounter()).counter\n"
        "    value: int = (await counter.increment(by=2)).value\n"
        "    text: str = (await factory.echo(text='hi')).text\n"
        "    promise: calls_capnp.Factory.NewCounterPromise = await factory.newCounter.send()\n"
        "    promised: calls_capnp.Counter = promise.counter\n"
        "    chained = await promised.spawn.send()\n"
        "    later: int = (await chained.counter.increment(by=1)).value\n"
        "    arrived: calls_capnp.Counter = (await promise).counter\n"
        "    await factory.echo.oneway(text='no answer')\n"
        "    return value + len(text) + later + len(repr(arrived))\n"
    )
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\nstrict = True\n"
        f"mypy_path = {ROOT}\n"
        # capbus is a library here: analysed for types, its own findings not reported.
        "[mypy-capbus.*]\nfollow_imports = silent\n"
        "[mypy-capnp.*]\nignore_missing_imports = True\n"
    )
    targets = [str(p) for p in sorted(tmp_path.glob("*.py"))]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), *targets],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


ROUND_TRIP = """
import importlib.util, sys
import trio, capbus
from capbus.rpc import errors
from capbus.rpc.vat import open_vat

spec = importlib.util.spec_from_file_location("calls_capnp", sys.argv[1])
stubs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stubs)


class Counter(stubs.Counter.Server):
    def __init__(self):
        self.value = 0

    async def increment(self, *, by):
        self.value += by
        return self.value


class Factory(stubs.Factory.Server):
    def __init__(self):
        self.heard = []

    async def echo(self, *, text):
        self.heard.append(text)
        return text.upper()

    async def newCounter(self):
        return Counter()

    async def same(self, *, cap):
        return cap


async def main():
    async with capbus.open_kernel() as kernel:
        server_peer, client_peer = await kernel.connect(), await kernel.connect()
        with trio.fail_after(10):
            async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
                server = Factory()
                node = await server_vat.export(server)
                handle = await server_peer.transfer(node, client_peer)
                factory = client_vat.typed_client(handle, stubs.Factory)
                assert isinstance(factory, stubs.Factory)
                assert (await factory.echo(text="typed")).text == "TYPED"
                counter = (await factory.newCounter()).counter
                assert isinstance(counter, stubs.Counter)  # received capabilities get the typed class
                assert (await counter.increment(by=4)).value == 4
                assert (await factory.same(cap=counter)).cap is counter
                promise = await factory.newCounter.send()  # typed promise pipelining
                assert isinstance(promise.counter, stubs.Counter)
                assert (await promise.counter.increment(by=5)).value == 5
                arrived = (await promise).counter
                assert isinstance(arrived, stubs.Counter) and arrived.pipeline is None
                assert (await arrived.increment(by=1)).value == 6
                await factory.echo.oneway(text="one-way")
                assert (await factory.echo(text="after")).text == "AFTER"
                assert server.heard[-2:] == ["one-way", "after"]
                try:
                    await factory.slow()
                except errors.Unimplemented as error:
                    assert "Echo.slow" in error.reason
                else:
                    raise AssertionError("an unimplemented method answered")
        await server_peer.aclose()
        await client_peer.aclose()
    print("round trip ok")


trio.run(main)
"""


def test_generated_stubs_make_real_calls(tmp_path: Path) -> None:
    # In its own process: importing generated stubs makes every client of their interfaces
    # an instance of the generated classes, process-wide, which other tests do not expect.
    module = compile_to(tmp_path, "calls")
    result = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP, str(module)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round trip ok" in result.stdout


def test_generated_code_holds_any_value_and_file_name_safely(tmp_path: Path) -> None:
    """Constants, annotations and file names become literals and docstrings in the
    generated module: quotes, backslashes, newlines, non-finite floats and a file name that
    tries to end the docstring must neither break the module nor run anything."""
    directory = tmp_path / 'we"""ird \\ dir'
    directory.mkdir()
    name = 'x"""; raise SystemExit(3) #'
    schema = directory / f"{name}.capnp"
    schema.write_text(
        "@0xd1e2f3a4b5c6d7e8;\n"
        "annotation tag(*) :Text;\n"
        'const tricky :Text = "it\'s \\"quoted\\"\\n\\\\ and \\"\\"\\" done";\n'
        "const notANumber :Float64 = nan;\n"
        "const infinite :Float32 = inf;\n"
        "const negative :Float64 = -inf;\n"
        'const blob :Data = "\\x00\\xff";\n'
        'struct S $tag("a \\"\\"\\" b") { a @0 :Text; }\n'
    )
    output = tmp_path / "safe_capnp.py"
    result = subprocess.run(
        [sys.executable, "-m", "capbus", "compile", str(schema), "-o", str(output)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    probe = (
        "import math, safe_capnp as m\n"
        'assert m.tricky == \'it\\\'s "quoted"\\n\\\\ and """ done\', repr(m.tricky)\n'
        "assert math.isnan(m.notANumber) and m.infinite == float('inf') and m.negative == -float('inf')\n"
        "assert m.blob == b'\\x00\\xff'\n"
        "assert m.S.capnp_annotations == {'tag': 'a \"\"\" b'}, m.S.capnp_annotations\n"
        "print('ok')\n"
    )
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert ran.returncode == 0 and ran.stdout == "ok\n", ran.stdout + ran.stderr
