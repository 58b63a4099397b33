"""capbus.spawn: a child process that holds only the capabilities it was given.

::

    async with capbus.spawn(vat, "converter:main", capabilities={"input": fd, "out": sink}) as child:
        converter = await child.capability("converter", Converter)
        ...

The child gets one kernel connection and nothing else: every other fd closed (stdin and
stdout are /dev/null, stderr a pipe the parent keeps the tail of, for error messages), an
empty environment (plus what ``env`` adds), the working directory ``/``, and the sandbox
of :mod:`capbus.sandbox`. Its seed holds one handle: a Launcher object of the parent
(schemas/capbus/spawn.capnp) from which the child, once its sandbox is up and before it
runs any of its own code, fetches the capabilities passed here by name, sending its
sandbox report; the parent refuses a strict sandbox that lacks a layer. The child hands
capabilities back with ``boot.offer(...)``.

The child dies with its parent (PR_SET_PDEATHSIG; and its kernel connection ends when an
embedded kernel does); when it dies, the kernel destroys its nodes, so its capabilities
fail with Disconnected at once; leaving the ``async with`` block kills it.
"""

from __future__ import annotations

import grp
import importlib.util
import inspect
import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, overload

import trio

from . import sandbox as _sandbox
from ._child import MODULE, OPTIONS, STRICT_REFUSED
from .bootstrapping import SPAWN, Bootstrap, _as, entries, named
from .rpc.client import Client, DynamicClient
from .rpc.errors import Failed, Overloaded
from .rpc.fds import FileDescriptor
from .rpc.vat import Vat
from .sandbox import Sandbox, SandboxError

ClientT = TypeVar("ClientT", bound=Client)
STDERR_KEPT = 64 * 1024
MAX_OFFERED = 256
"""Capabilities one child may offer its parent (names; an offer under a name it used
replaces the old one)."""
MAX_REPORT_BYTES = 64 * 1024
MAX_NAME = 256


class ChildError(Exception):
    """The child could not start, or exited before it could do what was asked."""


class _Launcher(SPAWN.Launcher.Server):  # type: ignore[misc]
    """The parent's object in the child's seed (schemas/capbus/spawn.capnp)."""

    def __init__(self, capabilities: list[dict[str, Any]], policy: Sandbox) -> None:
        self._capabilities: list[dict[str, Any]] | None = capabilities
        self._policy = policy
        self.report: dict[str, str] | None = None
        self.refused: str | None = None
        self.started = trio.Event()
        self.offered: dict[str, Client | FileDescriptor] = {}
        self.offers = trio.Event()

    def start(self, report: str) -> dict[str, Any]:
        if self._capabilities is None:
            raise Failed("already started")
        try:
            if len(report) > MAX_REPORT_BYTES:
                raise ValueError(f"over {MAX_REPORT_BYTES} bytes")
            parsed = json.loads(report)
            if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
                raise ValueError("not a mapping of layer to state")
        except ValueError as error:
            self.refused = f"the child sent a malformed sandbox report: {error}"
            self.started.set()
            raise Failed(self.refused) from error
        self.report = parsed
        lacking = _sandbox.missing(parsed, self._policy)
        if lacking and self._policy.policy == "strict":
            reasons = "; ".join(f"{layer}: {parsed[layer]}" for layer in lacking)
            self.refused = f"strict sandbox, but not to be had here: {', '.join(lacking)} ({reasons})"
            self.started.set()
            raise Failed(self.refused)
        capabilities, self._capabilities = self._capabilities, None  # handed out once
        self.started.set()
        return {"capabilities": capabilities}

    def offer(self, capabilities: Any) -> None:
        # Checked before anything is kept: the names are the child's to choose.
        if len(capabilities) > MAX_OFFERED or any(len(entry.name) > MAX_NAME for entry in capabilities):
            raise Failed(f"an offer holds at most {MAX_OFFERED} names of at most {MAX_NAME} characters")
        offered = named(capabilities)
        if len(set(self.offered) | set(offered)) > MAX_OFFERED:
            for value in offered.values():
                if isinstance(value, FileDescriptor):
                    value.close()
            raise Overloaded(f"a child may offer at most {MAX_OFFERED} capabilities")
        for name, value in offered.items():
            replaced = self.offered.get(name)
            if isinstance(replaced, FileDescriptor) and replaced is not value:
                replaced.close()  # offered again: the old fd goes
            self.offered[name] = value
        self.offers.set()
        self.offers = trio.Event()


class Child:
    """A spawned child process (see the module docstring)."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        launcher: _Launcher,
        vat: Vat,
        cgroup: _sandbox.Cgroup | None = None,
    ) -> None:
        self._process = process
        self._launcher = launcher
        self._vat = vat
        self._cgroup = cgroup
        self._exited = trio.Event()
        self._stderr = bytearray()
        self.returncode: int | None = None
        """The exit status once the child is gone (negative: killed by that signal)."""

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def sandbox_report(self) -> dict[str, str]:
        """Layer -> "active ...", "off" or "unavailable: ..." for each capbus.sandbox layer."""
        return dict(self._launcher.report or {})

    @property
    def stderr(self) -> bytes:
        """The last 64 KiB the child wrote to its stderr."""
        return bytes(self._stderr)

    def describe_exit(self) -> str:
        """How the child ended, with the last line it wrote to stderr."""
        code = self.returncode
        if code is None:
            return "still running"
        if code < 0:
            try:
                what = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                what = f"killed by signal {-code}"
        else:
            what = f"exited with status {code}"
        for line in reversed(self._stderr.decode(errors="replace").splitlines()):
            text = line.strip().lstrip("|").strip()  # inside a printed exception group
            if text and not set(text) <= set("+-"):
                return f"{what}: {text}"
        return what

    @overload
    async def capability(self, name: str) -> DynamicClient | FileDescriptor: ...

    @overload
    async def capability(self, name: str, interface: type[ClientT]) -> ClientT: ...

    @overload
    async def capability(self, name: str, interface: Any) -> Any: ...

    async def capability(self, name: str, interface: Any = None) -> Any:
        """What the child offered as ``name`` (waiting for its offer); with ``interface``, as
        a client of that interface. Raises ChildError if the child is gone first."""
        while name not in self._launcher.offered:
            if self._exited.is_set():
                raise ChildError(f"the child {self.describe_exit()} without offering {name!r}")
            # Taken now, with the check above: an offer that arrives before the waiting task
            # runs sets this event (the launcher then makes a new one for later offers).
            next_offer = self._launcher.offers
            async with trio.open_nursery() as nursery:

                async def wake_on(event: trio.Event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(wake_on, self._exited)
                nursery.start_soon(wake_on, next_offer)
        value = self._launcher.offered[name]
        if interface is None:
            return value
        if not isinstance(value, Client):
            raise TypeError(f"{name!r} is a file descriptor, not a capability")
        return _as(value, interface)

    async def wait(self) -> int:
        """Waits for the child to exit; returns its status (negative: killed by that signal)."""
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        """SIGKILL for the child and every process it made (those still in its cgroup, even
        after the child itself has exited). When the child lives in a pid namespace of its
        own (seen from here, never taken from its report), the waiter outside (``pid``) is
        spared: it reaps the child and exits as it did, leaving no zombie to the host's init
        (which would keep the cgroup busy)."""
        members = self._cgroup.members() if self._cgroup is not None else []
        nested = any(_in_nested_pid_namespace(pid) for pid in members if pid != self.pid)
        targets = [pid for pid in members if pid != self.pid or not nested]
        if self.returncode is None and not targets:
            targets = [self.pid]
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    async def _watch(self) -> None:
        """Reaps the child when it exits (through a pidfd: no thread, no SIGCHLD)."""
        pidfd = os.pidfd_open(self._process.pid)
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        self.returncode = self._process.wait()
        self._exited.set()
        self._launcher.started.set()  # wakes a spawn still waiting for the start

    async def _collect_stderr(self, stream: trio.lowlevel.FdStream) -> None:
        async with stream:
            while chunk := await stream.receive_some(65536):
                self._stderr += chunk
                del self._stderr[:-STDERR_KEPT]


Target = str | Callable[..., Any] | Sequence[str]


def _in_nested_pid_namespace(pid: int) -> bool:
    """Whether ``pid`` lives in a pid namespace below ours (its NSpid has more than one)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return len(line.split()) > 2
    except OSError:
        pass
    return False


def _target(target: Target, code: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The child's target as _child.py takes it, and the directories its code needs."""
    paths = [os.path.abspath(p) for p in code]
    if isinstance(target, str):
        module, _, function = target.partition(":")
        function = function or "main"  # a module alone: its main()
        if not module:
            raise ValueError(f"a target is 'module' or 'module:function', not {target!r}")
        spec = importlib.util.find_spec(module) if not paths else None
        if spec is not None and spec.origin:
            paths.append(_import_root(spec.origin, module))
        return {"kind": "python", "module": module, "function": function}, paths
    if callable(target):
        name = target.__module__
        source = inspect.getsourcefile(target)
        if source is None:
            raise ValueError(f"{target!r} has no source file to run in the child")
        source = os.path.abspath(source)
        if name == "__main__":  # a script: imported in the child under its file's name
            name = os.path.splitext(os.path.basename(source))[0]
            paths.append(os.path.dirname(source))
        else:
            paths.append(_import_root(source, name))
        return {"kind": "python", "module": name, "function": target.__qualname__}, paths
    argv = [os.fspath(a) for a in target]
    if not argv or not os.path.isabs(argv[0]):
        raise ValueError("an argv target needs an absolute path to the program first")
    return {"kind": "argv", "argv": argv}, paths


def _user_switch(user: int | str | None, group: int | str | None) -> dict[str, int | None] | None:
    """The uid and gid a child is to become (None: keep ours), by number; None when neither
    is asked for."""
    if user is None and group is None:
        return None
    uid = pwd.getpwnam(user).pw_uid if isinstance(user, str) else user
    gid = grp.getgrnam(group).gr_gid if isinstance(group, str) else group
    if os.geteuid() != 0:
        if uid in (None, os.geteuid()) and gid in (None, os.getegid()):
            return None  # already them
        raise PermissionError(f"starting a child as user {user} / group {group} needs root")
    return {"uid": uid, "gid": gid}


def _import_root(source: str, module: str) -> str:
    """The directory to put on sys.path so that ``module`` imports from ``source``."""
    root = os.path.dirname(os.path.abspath(source))
    depth = module.count(".") + (1 if os.path.basename(source) == "__init__.py" else 0)
    for _ in range(depth):
        root = os.path.dirname(root)
    return root


@asynccontextmanager
async def spawn(
    vat: Vat,
    target: Target,
    *,
    capabilities: Mapping[str, object] | None = None,
    sandbox: Sandbox | None = None,
    code: Sequence[str | os.PathLike[str]] = (),
    env: Mapping[str, str] | None = None,
    python: str | None = None,
    user: int | str | None = None,
    group: int | str | None = None,
) -> AsyncIterator[Child]:
    """Starts a child (see the module docstring) and yields it once it runs inside its
    sandbox with its capabilities; leaving the block kills it.

    ``target``: ``"module:function"`` (``"module"``: its ``main``) or a module-level async
    function, called in the child
    with its :class:`~capbus.bootstrapping.Bootstrap`; or an argv (absolute program path
    first), exec'd inside the sandbox, which gets its capabilities with
    ``capbus.bootstrap()``. ``capabilities``: name -> client, server object (exported) or
    file descriptor (an int or anything with ``fileno()``; duplicated into the child).
    ``sandbox``: default :meth:`Sandbox.strict`. ``code``: directories the child imports
    its code from (default: where ``target`` comes from). ``python``: the interpreter
    (default this one). ``user``/``group``: run the child as them (needs root); the
    interpreter and capbus need not be reachable to them (see :func:`capbus.sandbox.switch_user`),
    but the interpreter must find capbus without ``env`` (it starts as root, without it).

    Raises :class:`SandboxError` when a strict sandbox cannot be had, :class:`ChildError`
    when the child fails before it starts.
    """
    policy = sandbox or Sandbox.strict()
    spec, code_paths = _target(target, [os.fspath(c) for c in code])
    switch = _user_switch(user, group)
    program = None
    if policy.wants("seccomp"):
        try:
            program = _sandbox.seccomp_program(policy)
        except (ImportError, OSError) as error:
            program = None  # the child reports the layer unavailable
            del error
    launcher = _Launcher(entries(capabilities or {}), policy)
    launcher_node = await vat.export(launcher)
    connection = await vat.peer.create_peer(b"capbus.spawn", handles=[launcher_node])
    environment = dict(env or {})
    cgroup: _sandbox.Cgroup | None = None
    cgroup_config: dict[str, Any] = {"state": "off"}
    cgroup_fds: list[int] = []
    if policy.wants("cgroup"):
        try:
            cgroup = _sandbox.make_cgroup(policy)
            cgroup_fds = cgroup.open_procs()
            state = "partial" if cgroup.partial else "active"
            cgroup_config = {"state": f"{state}: {cgroup.detail}", "fds": cgroup_fds}
        except OSError as error:
            if cgroup is not None:
                cgroup.remove()
                cgroup = None
            cgroup_config = {"state": f"unavailable: {error}"}
    config = {
        "fd": connection.fileno(),
        "parent": os.getpid(),
        "sandbox": policy.to_json(),
        "seccomp": program.hex() if program else None,
        "target": spec,
        "code": code_paths,
        "cgroup": cgroup_config,
    }
    passed = [connection.fileno(), *cgroup_fds]
    if switch is not None:
        # The child starts as us, in an empty environment, and becomes the user itself
        # (capbus._child): so it can start from an interpreter and code under a home that
        # user may not enter. Its environment waits on a memfd (arguments are public).
        carrier = os.memfd_create("capbus-environment", os.MFD_CLOEXEC)
        os.write(carrier, json.dumps(environment).encode())
        config["user"] = {**switch, "environment": carrier}
        passed.append(carrier)
        environment = {}
    stderr_read, stderr_write = os.pipe()
    try:
        # Popen right here, in this thread: PR_SET_PDEATHSIG fires when the *thread* that
        # forked the child ends, so a worker thread (trio.run_process's way) would kill the
        # child when the thread cache retires it.
        process = subprocess.Popen(
            [python or sys.executable, *OPTIONS, "-m", MODULE, json.dumps(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr_write,
            pass_fds=passed,
            env=environment,
            cwd="/",
        )
    except BaseException:
        os.close(stderr_read)
        if cgroup is not None:
            cgroup.remove()
        raise
    finally:
        os.close(stderr_write)
        connection.close()
        for fd in passed[1:]:
            os.close(fd)
    child = Child(process, launcher, vat, cgroup)
    # The watchers run in the vat's nursery, not in one of ours around the block: an
    # exception from the block (or from here) then reaches the caller as it is, not
    # wrapped in an exception group.
    vat.start_soon(child._watch)
    vat.start_soon(child._collect_stderr, trio.lowlevel.FdStream(stderr_read))
    try:
        await launcher.started.wait()
        if launcher.refused is not None:
            raise SandboxError(launcher.refused)
        if launcher.report is None:
            if child.returncode == STRICT_REFUSED:  # the child's own check, before any of its code
                raise SandboxError(child.describe_exit().split(": ", 1)[-1].removeprefix("capbus: "))
            raise ChildError(f"the child {child.describe_exit()} before it started")
        yield child
    finally:
        child.kill()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                await child._exited.wait()
            if not child._exited.is_set():  # a waiter that did not follow its child
                process.kill()
                await child._exited.wait()
            if cgroup is not None:
                for _ in range(400):  # what the child left running; reaping takes a moment
                    child.kill()
                    if not cgroup.members() and cgroup.remove():
                        break
                    await trio.sleep(0.005)


__all__ = ["Bootstrap", "Child", "ChildError", "Sandbox", "SandboxError", "spawn"]
