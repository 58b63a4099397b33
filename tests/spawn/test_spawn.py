"""capbus.spawn: capabilities by name both ways, fds as capabilities, a clean start (no
inherited fds, an empty environment), argv targets, exit status, kill, Disconnected when
the child dies, and a child that never outlives its parent."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio

import capbus
from capbus.rpc import errors
from capbus.rpc.vat import Vat

HERE = Path(__file__).resolve().parent
schema: Any = capbus.load(HERE / "children.capnp")
# What a child's environment may hold: LC_CTYPE, which Python sets itself under the C
# locale (PEP 538).
ALLOWED_VARIABLES = {"LC_CTYPE"}


class Sink(schema.Sink.Server):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        self.data = bytearray()
        self.finished = trio.Event()
        self.puts = 0

    def put(self, data: bytes) -> None:
        self.data += data
        self.puts += 1

    def done(self) -> None:
        self.finished.set()


async def test_capabilities_go_in_by_name_and_come_back_by_name(vat: Vat, tmp_path: Path) -> None:
    data = tmp_path / "input.txt"
    data.write_text("hello from the parent")
    sink = Sink()
    with trio.fail_after(30), open(data, "rb") as input_file:
        capabilities = {"sink": sink, "input": input_file}
        async with capbus.spawn(vat, "children:give_back", code=[HERE], capabilities=capabilities) as child:
            prober = await child.capability("prober", schema.Prober)
            # An fd passed as a capability works in the child, which cannot open the file itself.
            assert (await prober.probe(what="fd", arg="input")).outcome == "ALLOWED: hello from the parent"
            assert (await prober.probe(what="read", arg=str(data))).outcome.startswith("denied")
            # Our own object, handed back, is our own object again (identity holds).
            assert await child.capability("same") is vat.local(sink)


async def test_a_child_does_its_job_through_its_capabilities_only(vat: Vat, tmp_path: Path) -> None:
    data = tmp_path / "input.txt"
    data.write_bytes(b"convert me\n" * 1000)
    sink = Sink()
    with trio.fail_after(30), open(data, "rb") as input_file:
        capabilities = {"input": input_file, "output": sink}
        async with capbus.spawn(vat, "children:copier", code=[HERE], capabilities=capabilities) as child:
            await sink.finished.wait()
            assert bytes(sink.data) == b"CONVERT ME\n" * 1000
            assert await child.wait() == 0
            assert child.sandbox_report["seccomp"].startswith("active")


async def test_a_child_starts_clean(vat: Vat, tmp_path: Path) -> None:
    """No fd of the parent's but the kernel connection (an inheritable one included), and
    an empty environment, even without any sandbox layer."""
    secret = tmp_path / "secret"
    secret.write_text("not for the child")
    leaked = os.open(secret, os.O_RDONLY)
    os.set_inheritable(leaked, True)
    os.environ["CAPBUS_TEST_SECRET"] = "not for the child"
    try:
        with trio.fail_after(30):
            bare = capbus.Sandbox.none()
            async with capbus.spawn(vat, "children:prober", code=[HERE], sandbox=bare) as child:
                prober = await child.capability("prober", schema.Prober)
                fds = (await prober.probe(what="fds", arg="")).outcome.removeprefix("ALLOWED: ").split(",")
                status = os.fstat(leaked)
                assert f"{status.st_dev}:{status.st_ino}" not in {f.split(":", 1)[1] for f in fds}
                environ = (await prober.probe(what="environ", arg="")).outcome.removeprefix("ALLOWED: ")
                assert set(filter(None, environ.split(","))) <= ALLOWED_VARIABLES
                assert child.sandbox_report["fds"].startswith("active")
                assert child.sandbox_report["seccomp"] == "off"
    finally:
        os.close(leaked)
        del os.environ["CAPBUS_TEST_SECRET"]


async def test_a_module_or_a_function_as_the_target(vat: Vat) -> None:
    """ "module" runs module.main; a function object runs that function (found by its module)."""
    spec = importlib.util.spec_from_file_location("children", HERE / "children.py")
    assert spec is not None and spec.loader is not None
    children = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(children)
    with trio.fail_after(30):
        async with capbus.spawn(vat, "copier_module", code=[HERE], capabilities={"sink": Sink()}) as child:
            assert await child.capability("sink") is not None  # copier_module.main offered it back
        async with capbus.spawn(vat, children.prober, code=[HERE]) as child:
            prober = await child.capability("prober", schema.Prober)
            assert (await prober.probe(what="ids", arg="")).outcome.startswith("ALLOWED: uid")


async def test_an_argv_target_gets_its_capabilities_from_bootstrap(vat: Vat) -> None:
    argv = [sys.executable, "-P", "-s", str(HERE / "argv_child.py")]
    with trio.fail_after(30):
        async with capbus.spawn(vat, argv, code=[HERE]) as child:
            prober = await child.capability("prober", schema.Prober)
            assert (await prober.probe(what="read", arg="/etc/passwd")).outcome.startswith("denied")
            assert child.sandbox_report["landlock"].startswith("active")


async def test_a_dead_child_disconnects_its_capabilities_at_once(vat: Vat) -> None:
    with trio.fail_after(30):
        async with capbus.spawn(vat, "children:prober", code=[HERE]) as child:
            prober = await child.capability("prober", schema.Prober)
            with pytest.raises(errors.Disconnected):
                await prober.crash()  # a real SIGSEGV in the middle of the call
            with pytest.raises(errors.Disconnected):
                await prober.probe(what="environ", arg="")
            assert await child.wait() == -signal.SIGSEGV
            assert child.describe_exit().startswith("killed by SIGSEGV")


async def test_kill_ends_a_hung_child(vat: Vat) -> None:
    with trio.fail_after(30):
        async with capbus.spawn(vat, "children:prober", code=[HERE]) as child:
            prober = await child.capability("prober", schema.Prober)
            with trio.move_on_after(0.5):  # the caller's own timeout, not a synchronisation
                await prober.hang()
            child.kill()
            assert await child.wait() == -signal.SIGKILL
            with pytest.raises(errors.Disconnected):
                await prober.probe(what="environ", arg="")


async def test_a_child_that_fails_to_start_is_a_clear_error(vat: Vat) -> None:
    with trio.fail_after(30), pytest.raises(capbus.ChildError, match="ModuleNotFoundError"):
        async with capbus.spawn(vat, "no_such_module:main", code=[HERE]) as child:
            await child.capability("anything")


WITHOUT_USER_NAMESPACES = """
import errno, json, sys, trio, pyseccomp, capbus
from capbus.rpc.vat import open_vat

# This process and its children now live on a system without user namespaces (as under
# Docker's default seccomp profile): unshare fails with EPERM.
rules = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
rules.add_rule(pyseccomp.ERRNO(errno.EPERM), "unshare")
rules.load()

# Every layer but the cgroup, which is not what this test is about and needs root (tested
# on its own): so that the user namespace is the layer missing here.
strict = capbus.Sandbox.strict().without("cgroup")

async def main():
    out = {}
    async with capbus.open_kernel() as kernel, await kernel.connect() as peer, open_vat(peer) as vat:
        try:
            async with capbus.spawn(vat, "children:prober", code=[sys.argv[1]], sandbox=strict):
                out["strict"] = "started"
        except capbus.SandboxError as error:
            out["strict"] = f"refused: {error}"
        # An argv target reports for itself: this one claims every layer is active.
        liar = [sys.executable, "-P", "-s", sys.argv[1] + "/liar.py"]
        try:
            async with capbus.spawn(vat, liar, code=[sys.argv[1]], sandbox=strict):
                out["liar"] = "started"
        except capbus.SandboxError as error:
            out["liar"] = f"refused: {error}"
        relaxed = capbus.Sandbox.strict().best_effort().allow_tmp()
        async with capbus.spawn(vat, "children:prober", code=[sys.argv[1]], sandbox=relaxed) as child:
            out["report"] = child.sandbox_report
            schema = capbus.load(sys.argv[1] + "/children.capnp")
            prober = await child.capability("prober", schema.Prober)
            out["passwd"] = (await prober.probe(what="read", arg="/etc/passwd")).outcome
            # No view, so no private /tmp: the host's /tmp must stay out of reach.
            out["tmp"] = (await prober.probe(what="write", arg=sys.argv[2] + "/from-child")).outcome
    print(json.dumps(out))

trio.run(main)
"""


async def test_a_strict_sandbox_refuses_to_start_without_a_layer(tmp_path: Path) -> None:
    """A layer the system really lacks (user namespaces, denied by a seccomp filter around
    the parent): strict refuses, best-effort starts and says what is missing."""
    with trio.fail_after(60):
        done = await trio.run_process(  # cwd: not the source tree, which -c would import from
            [sys.executable, "-c", WITHOUT_USER_NAMESPACES, str(HERE), str(tmp_path)],
            capture_stdout=True,
            cwd=tmp_path,
        )
    out = json.loads(done.stdout)
    assert out["strict"].startswith("refused: strict sandbox, but not to be had here: user_namespace")
    report = out["report"]
    assert (
        report["user_namespace"].startswith("unavailable")
        and "EPERM" in report["user_namespace"]
        or ("not permitted" in report["user_namespace"])
    )
    assert report["mount_namespace"] == "unavailable: needs the user namespace"
    assert report["seccomp"].startswith("active") and report["landlock"].startswith("active")
    assert out["passwd"] == "denied: EACCES"  # Landlock still holds the wall
    assert out["tmp"] == "denied: EACCES" and not (tmp_path / "from-child").exists()
    # The lying program never ran: the trusted start-up code refused before exec.
    assert out["liar"].startswith("refused: strict sandbox, but not to be had here: user_namespace")
    assert not (tmp_path / "liar-ran").exists()


PARENT = """
import sys, trio, capbus
from capbus.rpc.vat import open_vat

async def main():
    async with capbus.open_kernel() as kernel, await kernel.connect() as peer, open_vat(peer) as vat:
        async with capbus.spawn(vat, "children:prober", code=[sys.argv[1]]) as child:
            await child.capability("prober")
            print(child.pid, flush=True)
            await trio.sleep_forever()

trio.run(main)
"""


def _processes_mentioning(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


async def test_a_child_never_outlives_its_parent(vat: Vat, tmp_path: Path) -> None:
    # The code directory's unique path is in the children's command lines: every process of
    # the child (the waiter outside its pid namespace and the child inside) can be found.
    code = tmp_path / "code"
    code.mkdir()
    for name in ("children.py", "children.capnp"):
        (code / name).write_bytes((HERE / name).read_bytes())
    with trio.fail_after(60):
        parent = await trio.lowlevel.open_process(
            [sys.executable, "-c", textwrap.dedent(PARENT), str(code)], stdout=subprocess.PIPE, cwd=tmp_path
        )
        assert parent.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            chunk = await parent.stdout.receive_some(100)
            assert chunk, "the parent exited before its child started (its stderr is above)"
            line += chunk
        child_pid = int(line)
        family = _processes_mentioning(str(code))
        assert child_pid in family and len(family) >= 2  # the waiter and the child inside
        parent.kill()  # no clean-up code runs
        await parent.wait()
        while _processes_mentioning(str(code)):
            await trio.sleep(0.01)  # polling /proc, bounded by fail_after
        # The dead parent could not remove its child's cgroup: once the host's init has
        # reaped the last of its processes (polled, bounded by fail_after), the next spawn
        # sweeps it.
        while any(_members(cgroup) for cgroup in _cgroups_of(parent.pid)):
            await trio.sleep(0.01)
        assert _cgroups_of(parent.pid)
        async with capbus.spawn(vat, "children:prober", code=[HERE]) as child:
            await child.capability("prober")
        assert _cgroups_of(parent.pid) == []


def _cgroups_of(parent_pid: int) -> list[str]:
    return [root for root, _, _ in os.walk("/sys/fs/cgroup") if f"/capbus-{parent_pid}-" in root + "/"]


def _members(cgroup: str) -> list[str]:
    with open(os.path.join(cgroup, "cgroup.procs")) as f:
        return f.read().split()


async def test_an_untyped_capability_says_how_to_type_it(vat: Vat) -> None:
    with trio.fail_after(30):
        async with capbus.spawn(vat, "children:prober", code=[HERE]) as child:
            untyped = await child.capability("prober")  # no interface given, none registered
            with pytest.raises(AttributeError, match=r"unknown here: name it"):
                untyped.probe  # noqa: B018
            typed = await child.capability("prober", schema.Prober)
            assert typed is untyped  # the same client, now of its interface
            assert (await typed.probe(what="ids", arg="")).outcome.startswith("ALLOWED")
