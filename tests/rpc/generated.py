"""What tests of generated modules share: compiling a schema with ``capbus compile`` (a real
process) and importing the module it wrote."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import trio

import capbus
from capbus.rpc.vat import Vat, open_vat

TIMEOUT = 10


def compile_and_import(schema: Path, tmp_path: Path) -> tuple[ModuleType, str]:
    """The generated module of ``schema`` (written into ``tmp_path``), and its source."""
    output = tmp_path / f"{schema.stem}_capnp.py"
    command = [sys.executable, "-m", "capbus", "compile", str(schema), "-o", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    spec = importlib.util.spec_from_file_location(output.stem, output)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, output.read_text()


def mypy_strict(tmp_path: Path, name: str, source: str) -> subprocess.CompletedProcess[str]:
    """``source`` written to ``tmp_path/name`` and checked by mypy --strict there (beside the
    generated modules it imports)."""
    (tmp_path / name).write_text(source)
    command = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), name]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)


def mypy_verdicts(tmp_path: Path, user: str, wrong: str, errors: int) -> str:
    """mypy --strict passes ``user`` and finds exactly ``errors`` errors in ``wrong`` (both
    sources beside the generated modules): returns what it said of ``wrong``."""
    checked = mypy_strict(tmp_path, "user.py", user)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    refused = mypy_strict(tmp_path, "wrong.py", wrong)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stdout.count("error:") == errors, refused.stdout
    return refused.stdout


@asynccontextmanager
async def serving(
    kernel: capbus.Kernel, server: Any, interface: Any, typed: bool
) -> AsyncIterator[tuple[Any, Vat]]:
    """``server`` served by one peer's vat, and (a client of it, the client's vat) in another
    peer's: a typed client (``vat.typed_client``) for a generated module's interface, else
    ``vat.client``; within TIMEOUT seconds."""
    server_peer, client_peer = await kernel.connect(), await kernel.connect()
    try:
        async with open_vat(server_peer) as server_vat, open_vat(client_peer) as client_vat:
            handle = await server_peer.transfer(await server_vat.export(server), client_peer)
            client = (client_vat.typed_client if typed else client_vat.client)(handle, interface)
            with trio.fail_after(TIMEOUT):
                yield client, client_vat
    finally:
        await server_peer.aclose()
        await client_peer.aclose()
