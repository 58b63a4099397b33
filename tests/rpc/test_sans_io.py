"""The protocol cores are sans-IO (docs/design.md 3): the bus engine (capbus/rpc/engine.py),
the rpc.capnp codecs (capbus/rpc/twoparty.py, twopartyflat.py) and the rpc.capnp
connection engine (capbus/rpc/streamengine.py) import no trio, no peer and no vat, so the
same logic can be driven by another transport (and tested without sockets)."""

from __future__ import annotations

import subprocess
import sys


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_engine_and_the_twoparty_codec_import_no_io() -> None:
    imported = _python(
        "import sys\n"
        "import capbus.rpc.engine, capbus.rpc.twoparty, capbus.rpc.twopartyflat, capbus.rpc.streamengine\n"
        "io = ('trio', 'capbus.peer', 'capbus.rpc.vat', 'capbus.rpc.streamvat')\n"
        "print(sorted(m for m in io if m in sys.modules))\n"
    )
    assert imported.strip() == "[]", imported


def test_the_peer_api_is_still_one_import_away() -> None:
    said = _python("import capbus\nprint(capbus.Peer.__module__, capbus.connect_peer.__module__)\n")
    assert said.split() == ["capbus.peer", "capbus.peer"]
