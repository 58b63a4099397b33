"""The strict sandbox for a child that runs as an unprivileged user (CI runs as root, so
the child is started as uid 1000): every layer is there, the walls hold, and the job gets
done through capabilities."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc.vat import Vat
from capbus.testing import as_user

HERE = Path(__file__).resolve().parent
schema: Any = capbus.load(HERE / "children.capnp")
UID = GID = 1000


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
    # This interpreter and this capbus, wherever they are: under a home only root may enter,
    # a venv that links to an interpreter there, an editable install.
    options: dict[str, Any] = {"code": [HERE], "user": UID, "group": GID}
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


UNPRIVILEGED_PARENT = """
import json, os, sys, trio, capbus
from capbus.rpc.vat import open_vat

code = sys.argv[1]
schema = capbus.load(code + "/children.capnp")

async def main():
    out = {"uid": os.getuid()}
    async with capbus.open_kernel() as kernel, await kernel.connect() as peer, open_vat(peer) as vat:
        try:
            async with capbus.spawn(vat, "children:prober", code=[code]):
                out["strict"] = "started"
        except capbus.SandboxError as error:
            out["strict"] = f"refused: {error}"
        without_cgroup = capbus.Sandbox.strict().without("cgroup")
        async with capbus.spawn(vat, "children:prober", code=[code], sandbox=without_cgroup) as child:
            out["report"] = child.sandbox_report
            prober = await child.capability("prober", schema.Prober)
            for what, arg in (("read", "/etc/passwd"), ("inet", ""), ("signal", str(os.getpid())),
                              ("unshare", ""), ("processes", "200")):
                out[what] = (await prober.probe(what=what, arg=arg)).outcome
    print(json.dumps(out))

trio.run(main)
"""


async def test_an_unprivileged_parent(sanitizer_env: dict[str, str]) -> None:
    """The parent itself unprivileged (uid 1000), kernel and all: every layer but the cgroup,
    which needs a cgroup hierarchy this user may write (root, or a delegated cgroup v2
    subtree); a strict sandbox says so and refuses, one without the cgroup holds."""
    if os.geteuid() != 0:
        pytest.fail("this test starts a parent as another user: run it as root (as CI does)")
    with trio.fail_after(120):
        done = await trio.run_process(
            as_user([sys.executable, "-P", "-c", UNPRIVILEGED_PARENT, str(HERE)], UID, GID, readable=[HERE]),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=sanitizer_env,
            cwd="/",  # one uid 1000 may enter
        )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = json.loads(done.stdout)
    assert out["uid"] == UID
    writable = _cgroups_writable_by(UID)
    if writable:
        assert out["strict"] == "started"
    else:
        assert out["strict"].startswith("refused: strict sandbox, but not to be had here: cgroup")
    report = out["report"]
    assert report["cgroup"] == "off"
    assert all(state.startswith("active") for layer, state in report.items() if layer != "cgroup"), report
    assert out["read"] == "denied: ENOENT"
    assert out["inet"] == "denied: EAFNOSUPPORT"
    assert out["signal"] == "denied: ESRCH"
    assert out["unshare"] == "denied: EPERM"
    assert out["processes"] == "denied: EAGAIN"  # RLIMIT_NPROC binds a user that is not root


def _cgroups_writable_by(uid: int) -> bool:
    """Whether ``uid`` could make a cgroup here (a delegated cgroup v2 subtree it owns)."""
    try:
        return os.stat("/sys/fs/cgroup").st_uid == uid
    except OSError:
        return False
