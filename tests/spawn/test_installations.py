"""capbus wherever it is installed: imported by path from a source checkout, and from an
installation under a directory only its owner may enter, with children started as another
user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import capbus
from capbus import _resources

HERE = Path(__file__).resolve().parent
UID = 1000

FIND_SCHEMAS = """
import capbus.bootstrapping  # loads capbus's schemas, as a spawned child does
from capbus import _resources
print(_resources.schema_directory())
"""


def test_capbus_imported_by_path_finds_its_schemas() -> None:
    """Without site (``-S``), an editable install's import hook (run by its ``.pth`` file) is
    not there: capbus comes from its directory on ``PYTHONPATH`` and must still find the
    schemas that pyproject ships as ``capbus.schemas``."""
    here = os.path.dirname(os.path.dirname(capbus.__file__))
    dependencies = os.path.dirname(os.path.dirname(trio.__file__))
    done = subprocess.run(
        [sys.executable, "-S", "-P", "-c", FIND_SCHEMAS],
        env={"PYTHONPATH": os.pathsep.join([here, dependencies])},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.path.isfile(os.path.join(done.stdout.strip(), "capbus", "spawn.capnp"))


PRIVATE_PARENT = """
import json, os, sys, trio, capbus
from capbus.rpc.vat import open_vat

home, code, uid = sys.argv[1], sys.argv[2], int(sys.argv[3])
schema = capbus.load(code + "/children.capnp")

async def probe(child, *probes):
    prober = await child.capability("prober", schema.Prober)
    return [(await prober.probe(what=what, arg=arg)).outcome for what, arg in probes]

async def main():
    out = {"capbus": capbus.__file__}
    async with capbus.open_kernel() as kernel, await kernel.connect() as peer, open_vat(peer) as vat:
        options = dict(code=[code], user=uid, group=uid)
        async with capbus.spawn(vat, "children:prober", **options) as child:
            out["report"] = child.sandbox_report
            out["strict"] = await probe(child, ("ids", ""), ("read", "/etc/passwd"))
        # No sandbox: the host's files as the user sees them, but for what was made reachable.
        async with capbus.spawn(vat, "children:prober", sandbox=capbus.Sandbox.none(), **options) as child:
            reads = (home + "/venv/pyvenv.cfg", home + "/secret", "/etc/passwd")
            out["none"] = await probe(child, *(("read", path) for path in reads))
    print(json.dumps(out))

trio.run(main)
"""


async def test_a_child_as_another_user_from_an_installation_it_cannot_reach(
    tmp_path: Path, sanitizer_env: dict[str, str]
) -> None:
    """A root parent whose venv (linking to its interpreter), capbus and the child's code lie
    under a home only root may enter starts children as uid 1000, strict and unsandboxed:
    they run this interpreter and this capbus, and see of that home only what they need."""
    if os.geteuid() != 0:
        pytest.fail("this test starts a child as another user: run it as root (as CI does)")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "secret").write_text("root's own")
    with trio.fail_after(120):
        # A venv of symlinks (python -m venv's default), onto this interpreter.
        await trio.run_process([sys.executable, "-m", "venv", "--without-pip", str(home / "venv")])
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = home / "venv" / "lib" / version / "site-packages"
    # capbus as a wheel lays it out (schemas inside); its dependencies from where they are
    # installed here, appended to sys.path after it.
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(_resources.PACKAGE, site_packages / "capbus", ignore=skip)
    shutil.copytree(
        _resources.schema_directory(), site_packages / "capbus" / "schemas", ignore=skip, dirs_exist_ok=True
    )
    import capnp
    import cffi
    import landlockpy
    import pyseccomp

    dependencies = {
        os.path.dirname(os.path.dirname(m.__file__ or "")) for m in (trio, capnp, cffi, landlockpy, pyseccomp)
    }
    (site_packages / "dependencies.pth").write_text("".join(f"{d}\n" for d in sorted(dependencies)))
    (home / "code").mkdir()
    for name in ("children.py", "children.capnp"):
        shutil.copy(HERE / name, home / "code" / name)
    with trio.fail_after(120):
        done = await trio.run_process(
            [
                str(home / "venv" / "bin" / "python"),
                "-P",
                "-c",
                PRIVATE_PARENT,
                str(home),
                str(home / "code"),
                str(UID),
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=sanitizer_env,
            cwd="/",
        )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = json.loads(done.stdout)
    assert out["capbus"].startswith(str(home)), out["capbus"]
    assert all(state.startswith("active") for state in out["report"].values()), out["report"]
    assert out["strict"] == [f"ALLOWED: uid {UID} gid {UID}", "denied: ENOENT"]
    # Unsandboxed, it sees the host as that user does (/etc/passwd is readable), and in the
    # private home only the venv (pyvenv.cfg, which the interpreter reads to find it).
    readable, secret, passwd = out["none"]
    assert readable.startswith("ALLOWED") and passwd.startswith("ALLOWED"), out["none"]
    assert secret == "denied: ENOENT"
