"""The strict sandbox for a child that runs as an unprivileged user (CI runs as root, so
the child is started as uid 1000): every layer is there, the walls hold, and the job gets
done through capabilities."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc.vat import Vat

HERE = Path(__file__).resolve().parent
schema: Any = capbus.load(HERE / "children.capnp")
UID = GID = 1000


def interpreter_for(uid: int) -> str:
    """A Python of this version that ``uid`` can run (this venv's may live under a home
    directory only its owner can enter, as pyenv's under /root does)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        try:
            done = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2])"],
                user=uid,
                capture_output=True,
                text=True,
                timeout=30,
                cwd="/",
            )
        except OSError:
            continue
        if done.returncode == 0 and done.stdout.strip() == str(sys.version_info[:2]):
            return candidate
    pytest.fail(f"no Python {version} that uid {uid} can run: install one (e.g. /usr/bin/python{version})")


def import_path() -> str:
    """What the other interpreter needs on PYTHONPATH to import capbus and its dependencies
    from this installation."""
    import capnp
    import trio as trio_module

    packages = {os.path.dirname(os.path.dirname(capbus.__file__))}
    packages |= {os.path.dirname(os.path.dirname(m.__file__ or "")) for m in (capnp, trio_module)}
    return os.pathsep.join(sorted(packages))


class Sink(schema.Sink.Server):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        self.data = bytearray()
        self.finished = trio.Event()

    def put(self, data: bytes) -> None:
        self.data += data

    def done(self) -> None:
        self.finished.set()


async def test_the_strict_sandbox_as_an_unprivileged_user(vat: Vat, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test starts a child as another user: run it as root (as CI does)")
    python = interpreter_for(UID)
    options: dict[str, Any] = {
        "code": [HERE],
        "python": python,
        "env": {"PYTHONPATH": import_path()},
        "user": UID,
        "group": GID,
    }
    with trio.fail_after(60):
        async with capbus.spawn(vat, "children:prober", **options) as child:
            assert all(state.startswith("active") for state in child.sandbox_report.values()), (
                child.sandbox_report
            )
            prober = await child.capability("prober", schema.Prober)
            assert (await prober.probe(what="ids", arg="")).outcome == f"ALLOWED: uid {UID} gid {GID}"
            assert (await prober.probe(what="read", arg="/etc/passwd")).outcome == "denied: ENOENT"
            assert (await prober.probe(what="inet", arg="")).outcome == "denied: EAFNOSUPPORT"
            assert (await prober.probe(what="signal", arg=str(os.getpid()))).outcome == "denied: ESRCH"
            assert (await prober.probe(what="unshare", arg="")).outcome == "denied: EPERM"
            # RLIMIT_NPROC binds a user that is not root: 64 processes of uid 1000 at most.
            assert (await prober.probe(what="processes", arg="200")).outcome == "denied: EAGAIN"
        data = tmp_path / "input.txt"
        data.write_bytes(b"as nobody in particular\n")
        os.chmod(tmp_path, 0o700)  # the child cannot open it by name: only through the fd
        sink = Sink()
        with open(data, "rb") as input_file:
            options["capabilities"] = {"input": input_file, "output": sink}
            async with capbus.spawn(vat, "children:copier", **options) as child:
                await sink.finished.wait()
                assert bytes(sink.data) == b"AS NOBODY IN PARTICULAR\n"
                assert await child.wait() == 0
