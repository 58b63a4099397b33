"""Sandbox layers for spawned children (capbus.spawn): the policy, and the code that applies it.

A :class:`Sandbox` says which layers a child gets; the child applies them to itself
(:func:`enter`) right after it starts, before it imports any code it was asked to run, in
the order that lets each layer be set up by the one before it:

1. ``fds``: every file descriptor but stdio and the kernel connection closed;
2. ``cgroup``: a cgroup of its own, made by the parent, that bounds all the memory the
   child's processes use (memfds and other shared memory included, which the address-space
   limit does not see) and how many processes and threads it has;
   ``rlimits``: address space, open files, processes, CPU time, no core dumps;
3. ``user_namespace``, then ``ipc_namespace``, ``network_namespace`` (only ``lo``, down)
   and ``pid_namespace`` (the child becomes pid 1 of its own; a small waiter process
   stays outside, so the parent still has a pid to wait for and kill);
4. ``mount_namespace``: a read-only view of only what the interpreter and the child's
   code need, on an empty tmpfs root (pivot_root): host files, daemon sockets and /proc
   are simply not there;
5. ``capabilities``: the capabilities the user namespace granted are dropped;
6. ``no_new_privs``;
7. ``landlock``: read and execute only in that view, no TCP, no abstract unix sockets or
   signals outside the sandbox (ABI 4 and 6 features where the kernel has them);
8. ``seccomp``: no sockets but AF_UNIX, no namespaces, mounts, ptrace, bpf, io_uring,
   keyrings, kernel modules or process_vm access.

A layer the running kernel lacks is reported ("unavailable: why"), never silently skipped;
with the ``strict`` policy the parent then refuses to go on. ``report`` maps every layer
to "active ...", "off" (relaxed by the policy) or "unavailable: ...".

This module must not import trio or the RPC layer: it runs in the child before anything
else, and the namespace calls need a single-threaded process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

LAYERS = (
    "fds",
    "cgroup",
    "rlimits",
    "user_namespace",
    "ipc_namespace",
    "network_namespace",
    "pid_namespace",
    "mount_namespace",
    "capabilities",
    "no_new_privs",
    "landlock",
    "seccomp",
)
"""Every layer, in the order they are applied (and reported)."""

Policy = Literal["strict", "best-effort"]


class SandboxError(Exception):
    """A sandbox could not be set up as its policy demands."""


@dataclass(frozen=True)
class Sandbox:
    """Which layers a spawned child gets. The default is the strict sandbox: every layer,
    and a child that cannot have one of them does not start. Relax it with the named
    methods (each returns a new Sandbox)."""

    policy: Policy = "strict"
    """``strict``: refuse to start a child that lacks a layer; ``best-effort``: start it and
    say in the report which layers are missing."""
    off: frozenset[str] = frozenset()
    """Layers turned off (by :meth:`without` or a relaxation)."""
    read_only: tuple[str, ...] = ()
    """Host paths the child may read besides the interpreter and its own code."""
    writable_tmp: bool = False
    """A private, empty, writable /tmp (a tmpfs of ``tmp_bytes``)."""
    tmp_bytes: int = 16 * 1024 * 1024
    memory_bytes: int | None = 2 * 1024 * 1024 * 1024
    """RLIMIT_AS: the child's address space (Python reserves a good deal of it early)."""
    open_files: int | None = 256
    processes: int | None = 64
    """RLIMIT_NPROC, per user: Linux does not apply it to root (uid 0), even in a user
    namespace; it binds for children of an unprivileged parent."""
    cpu_seconds: int | None = None
    network: bool = False
    """Whether the child may use the host's network (:meth:`allow_network`)."""

    @classmethod
    def strict(cls) -> Sandbox:
        """The default: every layer, refuse to start without one."""
        return cls()

    @classmethod
    def none(cls) -> Sandbox:
        """No layer at all (a child as trusted as its parent; still a clean environment and
        only its kernel connection)."""
        return cls(policy="best-effort", off=frozenset(set(LAYERS) - {"fds"}))

    def best_effort(self) -> Sandbox:
        """Start even where the kernel lacks a layer (the report says which)."""
        return dataclasses.replace(self, policy="best-effort")

    def without(self, *layers: str) -> Sandbox:
        """These layers off (names from :data:`LAYERS`)."""
        unknown = set(layers) - set(LAYERS)
        if unknown:
            raise ValueError(f"no such sandbox layers: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, off=self.off | frozenset(layers))

    def allow_network(self) -> Sandbox:
        """The host's network: no network namespace, and neither seccomp nor Landlock keep
        the child from making TCP/UDP sockets."""
        return dataclasses.replace(self, off=self.off | {"network_namespace"}, network=True)

    def allow_read(self, *paths: str | os.PathLike[str]) -> Sandbox:
        """These host paths readable (and executable) in the child's view too."""
        extra = tuple(os.path.abspath(os.fspath(p)) for p in paths)
        return dataclasses.replace(self, read_only=self.read_only + extra)

    def allow_tmp(self, size_bytes: int | None = None) -> Sandbox:
        """A private writable /tmp."""
        return dataclasses.replace(self, writable_tmp=True, tmp_bytes=size_bytes or self.tmp_bytes)

    def limits(
        self,
        *,
        memory_bytes: int | None | Literal[False] = False,
        open_files: int | None | Literal[False] = False,
        processes: int | None | Literal[False] = False,
        cpu_seconds: int | None | Literal[False] = False,
    ) -> Sandbox:
        """Other resource limits (None: unlimited; an argument not given keeps its value)."""
        changes: dict[str, Any] = {}
        for name, value in (
            ("memory_bytes", memory_bytes),
            ("open_files", open_files),
            ("processes", processes),
            ("cpu_seconds", cpu_seconds),
        ):
            if value is not False:
                changes[name] = value
        return dataclasses.replace(self, **changes)

    def wants(self, layer: str) -> bool:
        return layer not in self.off

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["off"] = sorted(self.off)
        out["read_only"] = list(self.read_only)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sandbox:
        values = dict(data)
        values["off"] = frozenset(values.get("off", ()))
        values["read_only"] = tuple(values.get("read_only", ()))
        return cls(**values)


def missing(report: Mapping[str, str], sandbox: Sandbox | None = None) -> list[str]:
    """The layers ``sandbox`` wants (all, if None) that a report does not say are active:
    unavailable, partial, or absent from the report."""
    wanted = [layer for layer in LAYERS if sandbox is None or sandbox.wants(layer)]
    return [layer for layer in wanted if not str(report.get(layer, "")).startswith("active")]


# -- applying it (in the child) ----------------------------------------------------------------

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWCGROUP = 0x02000000
_CLONE_NEWTIME = 0x00000080
_NAMESPACE_FLAGS = (
    _CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC, _CLONE_NEWUSER,
    _CLONE_NEWPID, _CLONE_NEWNET, _CLONE_NEWCGROUP, _CLONE_NEWTIME,
)  # fmt: skip

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_SYS_PIVOT_ROOT, _SYS_CAPSET = 155, 126  # x86_64
_PR_SET_PDEATHSIG, _PR_SET_SECCOMP, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 22, 24, 38
_SECCOMP_MODE_FILTER = 2
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4

# Flags of a mount (statvfs) that a read-only bind remount must keep: the kernel refuses to
# clear one that a more privileged mount namespace set (the mount is "locked").
_KEPT_FLAGS = (
    (os.ST_NOEXEC, _MS_NOEXEC),
    (os.ST_NOATIME, 1024),
    (os.ST_NODIRATIME, 2048),
    (os.ST_RELATIME, 1 << 21),
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (and right now, if it already has)."""
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the prctl: nothing left to serve


def view(sandbox: Sandbox, code_paths: Iterable[str]) -> list[str]:
    """The host paths the child can see: the interpreter's prefixes, every directory on
    sys.path, system libraries (extension modules load them lazily), the dynamic loader's
    cache, the child's own code and what the sandbox adds. Existing paths only, each once."""
    candidates = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        *sys.path,
        "/usr/lib",
        "/usr/lib64",
        "/etc/ld.so.cache",
        *code_paths,
        *sandbox.read_only,
    ]
    seen: list[str] = []
    for path in candidates:
        if not path:
            continue
        real = os.path.realpath(path)
        if real != "/" and os.path.exists(real) and real not in seen:  # never the whole host
            seen.append(real)
    return _outermost(seen)


def _outermost(paths: Sequence[str]) -> list[str]:
    """``paths`` without those inside another one (which covers them)."""
    return [p for p in paths if not any(p != q and _inside(p, q) for q in paths)]


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


# -- another user (the child of a root parent) -------------------------------------------------

_SYS_OPEN_TREE, _SYS_MOVE_MOUNT = 428, 429  # x86_64
_OPEN_TREE_CLONE, _AT_EMPTY_PATH, _MOVE_MOUNT_F_EMPTY_PATH = 1, 0x1000, 4


def switch_user(uid: int | None, gid: int | None, paths: Sequence[str]) -> list[str]:
    """Makes this process (started as root) ``uid`` and ``gid`` (no supplementary groups
    then), each if not None, after making ``paths`` reachable to them; returns the
    directories it covered for that.

    A directory above them that the user may not enter (a home of mode 0700 holding the
    interpreter, the venv or the code) is covered, in a mount namespace of this process's
    own, by an empty read-only tmpfs that holds read-only binds of only the paths below it,
    at the same paths: the interpreter's prefix and ``pyvenv.cfg``, the import hooks of an
    editable install and ``sys.path`` keep working unchanged, and nothing else of that
    directory shows. What the paths themselves hold must be readable to the user (as an
    installation's files are: only the directories above them may be private). The host's
    mounts are untouched; call :func:`die_with_parent` again afterwards (a change of
    credentials clears the death signal)."""
    if gid is not None:
        os.setgroups([])
    wanted = [p for p in _outermost(list(paths)) if os.path.exists(p)]
    blocked = _closed_to(uid, gid, wanted)
    if blocked:
        _unshare(_CLONE_NEWNS)
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing of this reaches the host
        for directory in blocked:
            _cover(directory, [p for p in wanted if _inside(p, directory)])
    if gid is not None:
        os.setresgid(gid, gid, gid)
    if uid is not None:
        os.setresuid(uid, uid, uid)
    return blocked


def _closed_to(uid: int | None, gid: int | None, paths: Iterable[str]) -> list[str]:
    """The outermost directory on the way to each of ``paths`` that ``uid``/``gid`` (with
    this process's supplementary groups) may not enter. Checked by the kernel itself, under
    those ids as the file system ids (ACLs and all): they change only what file access is
    checked as, and root gets its own back after."""
    _libc.setfsgid(os.getegid() if gid is None else gid)
    _libc.setfsuid(os.geteuid() if uid is None else uid)
    blocked: list[str] = []
    try:
        if _libc.setfsuid(-1) != (os.geteuid() if uid is None else uid):  # -1: only asks
            raise OSError(errno.EPERM, "setfsuid: could not check access as the other user")
        for path in paths:
            parent = "/"
            for part in path.strip("/").split("/"):
                here = os.path.join(parent, part)
                try:
                    os.lstat(here)  # needs the right to enter every directory above it
                except PermissionError:
                    if parent != "/" and parent not in blocked:  # never the host's root
                        blocked.append(parent)
                    break
                except OSError:
                    break
                parent = here
    finally:
        _libc.setfsuid(os.geteuid())
        _libc.setfsgid(os.getegid())
    return blocked


def _cover(directory: str, keep: Sequence[str]) -> None:
    """An empty read-only tmpfs over ``directory`` with read-only binds of ``keep`` (paths
    below it) at their own paths. The binds are detached copies (open_tree) taken before
    the tmpfs hides what they copy."""
    trees: list[tuple[str, bool, int]] = []
    try:
        for path in keep:
            tree = _libc.syscall(
                _SYS_OPEN_TREE, _AT_FDCWD, path.encode(), _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE
            )
            if tree < 0:
                _check(-1, f"open_tree {path}")
            trees.append((path, os.path.isdir(path), tree))
            attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, 0)
            _check(
                _libc.syscall(
                    _SYS_MOUNT_SETATTR,
                    tree,
                    b"",
                    _AT_EMPTY_PATH | _AT_RECURSIVE,
                    ctypes.byref(attr),
                    ctypes.sizeof(attr),
                ),
                f"mount_setattr {path}",
            )
        _mount("capbus-reach", directory, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
        for path, is_directory, tree in trees:
            _make_mount_point(directory, path, is_directory)
            _check(
                _libc.syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, path.encode(), _MOVE_MOUNT_F_EMPTY_PATH),
                f"move_mount {path}",
            )
        _mount(None, directory, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    finally:
        for _, _, tree in trees:
            os.close(tree)


def _make_mount_point(top: str, path: str, is_directory: bool) -> None:
    """``path`` on the fresh tmpfs at ``top``, its directories enterable by anyone (mkdir's
    mode is filtered by the umask, which may be 077)."""
    here = top
    parts = os.path.relpath(path, top).split("/")
    for index, part in enumerate(parts):
        here = os.path.join(here, part)
        if index == len(parts) - 1 and not is_directory:
            os.close(os.open(here, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        elif not os.path.isdir(here):
            os.mkdir(here)
        os.chmod(here, 0o755 if os.path.isdir(here) else 0o644)


# -- cgroups (made by the parent, joined by the child) ---------------------------------------

_cgroup_serial = 0


@dataclass
class Cgroup:
    """The cgroups made for one child: it joins them (through fds on their ``cgroup.procs``
    files, opened by the parent) first thing; the parent removes them once it is gone."""

    directories: list[str]
    detail: str
    partial: bool = False
    """Made, but without all its limits (``detail`` says which is missing)."""

    def procs(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.directories]

    def open_procs(self) -> list[int]:
        """Write-only fds on the ``cgroup.procs`` files, for the child to join through."""
        return [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in self.procs()]

    def members(self) -> list[int]:
        """The pids in it (the child and every process it made)."""
        try:
            with open(self.procs()[0]) as f:
                return [int(line) for line in f if line.strip()]
        except (OSError, IndexError):
            return []

    def remove(self) -> bool:
        """Removes what is empty; whether all of it is gone (a process of the child that
        is not reaped yet keeps its cgroup busy for a moment)."""
        for directory in list(reversed(self.directories)):
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError:
                continue
            self.directories.remove(directory)
        return not self.directories


def _own_cgroups() -> dict[str, str]:
    """controller (or "" for the unified hierarchy) -> this process's cgroup path."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(","):
                out[controller] = path
    return out


def make_cgroup(sandbox: Sandbox) -> Cgroup:
    """A cgroup (cgroup v2, or v1's memory and pids hierarchies) below this process's own,
    limiting memory, swap included, to a quarter above ``sandbox.memory_bytes`` and tasks
    to ``sandbox.processes``. Raises OSError when the system will not let this process make
    one. The child joins it through fds the parent opens (:meth:`Cgroup.open_procs`): the
    kernel checks the opener's rights, so a child started as another user needs none.

    The address-space limit (rlimits) makes an ordinary allocation past ``memory_bytes``
    fail cleanly (MemoryError); the cgroup, set higher so that it does not strike first, is
    the hard bound on all the memory (memfds, shared memory, page cache, swap), enforced by
    killing the child."""
    memory = None if sandbox.memory_bytes is None else sandbox.memory_bytes * 5 // 4
    own = _own_cgroups()
    made: list[str] = []
    limits: list[str] = []
    unlimited_swap = False
    try:
        unified = "/sys/fs/cgroup"
        if os.path.exists(os.path.join(unified, "cgroup.controllers")) and "" in own:
            parent = unified + own[""]
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                delegated = f.read().split()
            if not {"memory", "pids"} <= set(delegated):
                raise OSError(errno.EPERM, f"memory and pids are not delegated to {parent}")
            made.append(_new_cgroup(parent))
            settings = [
                (made[0], "memory.max", memory),
                (made[0], "memory.swap.max", 0 if memory is not None else None),
                (made[0], "pids.max", sandbox.processes),
            ]
        else:
            settings = []
            for controller in ("memory", "pids"):
                root = os.path.join("/sys/fs/cgroup", controller)
                if controller not in own or not os.path.isdir(root):
                    raise OSError(errno.ENOENT, f"no {controller} cgroup hierarchy")
                made.append(_new_cgroup(root + own[controller]))
            # memsw (memory + swap) after the plain limit: it may not be below it.
            settings = [
                (made[0], "memory.limit_in_bytes", memory),
                (made[0], "memory.memsw.limit_in_bytes", memory),
                (made[1], "pids.max", sandbox.processes),
            ]
        for directory, name, value in settings:
            if value is None:
                continue
            path = os.path.join(directory, name)
            if not os.path.exists(path):  # no swap accounting in this kernel
                unlimited_swap = unlimited_swap or ("swap" in name or "memsw" in name)
                continue
            with open(path, "w") as f:
                f.write(str(value))
            limits.append(f"{name}={value}")
    except OSError:
        Cgroup(made, "").remove()
        raise
    version = "v2" if len(made) == 1 else "v1"
    detail = f"{' '.join(limits)} (cgroup {version})"
    if unlimited_swap and _swap_in_use():
        detail += "; swap is not limited (no swap accounting): memory can spill into it"
        return Cgroup(made, detail, partial=True)
    return Cgroup(made, detail)


def _new_cgroup(parent: str) -> str:
    import secrets

    _sweep(parent)
    for _ in range(8):  # a unique name: a dead parent's pid may have been reused
        directory = os.path.join(parent, f"capbus-{os.getpid()}-{secrets.token_hex(6)}")
        try:
            os.mkdir(directory)
            return directory
        except FileExistsError:
            continue
        except PermissionError as error:  # the usual case for an unprivileged parent: say what would do
            raise PermissionError(
                error.errno,
                f"uid {os.geteuid()} may not make a cgroup in {parent} (that needs root, or a cgroup v2 "
                "subtree delegated to this user with the memory and pids controllers)",
            ) from error
    raise OSError(errno.EEXIST, f"no free cgroup name in {parent}")


def _swap_in_use() -> bool:
    try:
        with open("/proc/swaps") as f:
            return len(f.read().strip().splitlines()) > 1
    except OSError:
        return True


def _sweep(parent: str) -> None:
    """Removes the empty cgroups of parents that died without removing them (a parent
    killed with SIGKILL runs no clean-up)."""
    for entry in os.listdir(parent):
        parts = entry.split("-")
        if len(parts) != 3 or parts[0] != "capbus" or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # its parent lives: its to remove
        except ProcessLookupError:
            pass
        except (OSError, OverflowError):
            continue
        try:
            os.rmdir(os.path.join(parent, entry))
        except OSError:
            pass  # not empty yet


def join_cgroup(fds: Sequence[int]) -> None:
    """In the child, first of all: moves this process into its cgroup(s), through the fds
    the parent opened on their ``cgroup.procs`` files, and closes them."""
    try:
        for fd in fds:
            os.write(fd, str(os.getpid()).encode())
    finally:
        for fd in fds:
            os.close(fd)


def close_other_fds(sandbox: Sandbox, keep_fds: Sequence[int]) -> str:
    """The ``fds`` layer, applied first of all, before any library opens descriptors of its
    own (which closing them later would break); returns its report entry."""
    if not sandbox.wants("fds"):
        return "off"
    _close_fds_except(keep_fds)
    return f"active: kept {', '.join(str(fd) for fd in sorted(keep_fds))}"


def enter(
    sandbox: Sandbox,
    keep_fds: Sequence[int],
    paths: Sequence[str],
    seccomp: bytes | None,
    fds: str,
    inside: Callable[[], None] = lambda: None,
    cgroup: str = "off",
) -> dict[str, str]:
    """Applies ``sandbox`` to this process (see the module docstring); returns the report.
    ``seccomp``: the filter program (:func:`seccomp_program`, made by the parent), None if
    the parent could not make one; ``fds``: what :func:`close_other_fds` reported.
    ``inside`` runs once the view is up, before the last walls (Landlock, seccomp): the
    trusted imports, so that what they open (pycapnp keeps directory handles) lies in the
    view; every fd opened before that, but ``keep_fds``, is closed first. May fork (for the
    pid namespace): then only the process inside returns; the one outside waits for it and
    exits with its status."""
    report = {layer: "off" for layer in LAYERS}
    report["fds"] = fds
    report["cgroup"] = cgroup

    def attempt(layer: str, action: Any) -> bool:
        if not sandbox.wants(layer):
            return False
        try:
            report[layer] = "active" + (f": {detail}" if (detail := action()) else "")
            return True
        except _Partial as partial:
            report[layer] = f"partial: {partial}"
            return True
        except (OSError, ImportError, ValueError) as error:
            report[layer] = f"unavailable: {error}"
            return False

    attempt("rlimits", lambda: _set_limits(sandbox))
    in_userns = attempt("user_namespace", _user_namespace)
    if in_userns:
        attempt("ipc_namespace", lambda: _unshare(_CLONE_NEWIPC | _CLONE_NEWUTS))
        attempt("network_namespace", lambda: _unshare(_CLONE_NEWNET))
        attempt("pid_namespace", lambda: _pid_namespace(keep_fds))
        mounted = attempt("mount_namespace", lambda: _mount_view(sandbox, paths))
        attempt("capabilities", _drop_capabilities)
    else:
        mounted = False
        for layer in _INSIDE_THE_USER_NAMESPACE:
            if sandbox.wants(layer):
                report[layer] = "unavailable: needs the user namespace"
    # Nothing opened before the view may stay open: a directory handle on the host's root
    # would reach past it (chmod, utime, connect, through *at calls).
    if sandbox.wants("fds"):
        _close_fds_except(keep_fds)
    inside()
    attempt("no_new_privs", lambda: _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "NO_NEW_PRIVS"))
    attempt("landlock", lambda: _landlock(sandbox, paths, private_tmp=mounted and sandbox.writable_tmp))
    attempt("seccomp", lambda: _load_seccomp(seccomp))
    return report


_INSIDE_THE_USER_NAMESPACE = (
    "ipc_namespace",
    "network_namespace",
    "pid_namespace",
    "mount_namespace",
    "capabilities",
)


def _close_fds_except(keep: Sequence[int]) -> str:
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)
    return ""


def _set_limits(sandbox: Sandbox) -> str:
    settings = [
        ("AS", resource.RLIMIT_AS, sandbox.memory_bytes),
        ("NOFILE", resource.RLIMIT_NOFILE, sandbox.open_files),
        ("NPROC", resource.RLIMIT_NPROC, sandbox.processes),
        ("CPU", resource.RLIMIT_CPU, sandbox.cpu_seconds),
        ("CORE", resource.RLIMIT_CORE, 0),
    ]
    applied = []
    for name, limit, value in settings:
        if value is None:
            continue
        # CPU: SIGXCPU at the limit, SIGKILL a second later for a process that does not
        # stop for SIGXCPU (a pid namespace's init, which the child is, ignores it).
        hard = value + 1 if limit == resource.RLIMIT_CPU else value
        resource.setrlimit(limit, (value, hard))
        applied.append(f"{name}={value}")
    if sandbox.processes is not None and os.getuid() == 0:
        applied.append("(NPROC does not bind uid 0)")
    return " ".join(applied)


def _unshare(flags: int) -> str:
    if hasattr(os, "unshare"):  # 3.12+
        os.unshare(flags)
    else:
        _check(_libc.unshare(flags), "unshare")
    return ""


def _user_namespace() -> str:
    uid, gid = os.getuid(), os.getgid()
    _unshare(_CLONE_NEWUSER | _CLONE_NEWNS)
    # The same ids inside as outside: files the child may read stay readable to it.
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1\n")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1\n")
    return f"uid {uid} gid {gid}"


def _pid_namespace(keep_fds: Sequence[int]) -> str:
    _unshare(_CLONE_NEWPID)
    alive_read, alive_write = os.pipe()
    child = os.fork()
    if child:
        # The waiter outside keeps nothing of the child's: above all not its kernel
        # connection, which must close the moment the child dies.
        os.close(alive_read)
        for fd in keep_fds:
            if fd > 2:
                os.close(fd)
        _wait_and_mirror(child)  # never returns
    os.close(alive_write)
    # Inside, getppid() is 0 (the parent is outside the namespace): the pipe tells whether
    # the waiter died before the death signal was armed (then its end is closed).
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    import select

    if select.select([alive_read], [], [], 0)[0]:
        os._exit(1)
    os.close(alive_read)
    return f"pid {os.getpid()} inside"


def _wait_and_mirror(child: int) -> NoReturn:
    """In the waiter outside the pid namespace: exit as the child did (and take it along
    when asked to stop). Never returns, whatever happens: a waiter that went on would run
    the child's code outside its pid namespace."""
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda number, _frame: os.kill(child, signal.SIGKILL))
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            if number not in (signal.SIGKILL, signal.SIGSTOP):  # those have no handler to reset
                signal.signal(number, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [number])
            os.kill(os.getpid(), number)
        elif os.WIFEXITED(status):
            code = os.WEXITSTATUS(status)
    finally:
        os._exit(code)


def _encode(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(_encode(source), _encode(target), _encode(fstype), ctypes.c_ulong(flags), _encode(data)),
        f"mount {target}",
    )


def _mount_view(sandbox: Sandbox, paths: Sequence[str]) -> str:
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    root = "/mnt" if os.path.isdir("/mnt") else "/tmp"
    _mount("capbus-sandbox", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
    for path in paths:
        target = root + path
        if os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        _mount(path, target, None, _MS_BIND | _MS_REC)
        kept = os.statvfs(path).f_flag
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
        for statvfs_flag, mount_flag in _KEPT_FLAGS:
            if kept & statvfs_flag:
                flags |= mount_flag
        _mount(None, target, None, flags)
        _read_only_below(target)
    # Top-level symlinks such as /lib -> usr/lib keep working.
    for name in ("lib", "lib64", "bin", "sbin"):
        host = "/" + name
        if os.path.islink(host) and not os.path.exists(root + host):
            os.symlink(os.readlink(host), root + host)
    os.makedirs(root + "/dev", exist_ok=True)
    open(root + "/dev/null", "a").close()
    _mount("/dev/null", root + "/dev/null", None, _MS_BIND)
    if sandbox.writable_tmp:
        os.makedirs(root + "/tmp", exist_ok=True)
        _mount(
            "capbus-tmp",
            root + "/tmp",
            "tmpfs",
            _MS_NOSUID | _MS_NODEV,
            f"mode=1777,size={sandbox.tmp_bytes}",
        )
    os.chdir(root)
    _check(_libc.syscall(_SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", _MNT_DETACH), "umount the old root")
    os.chdir("/")
    _mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    return f"{len(paths)} read-only paths"


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE = 442, -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 1, 2, 4


def _read_only_below(target: str) -> None:
    """Read-only for the mounts under a bind too (a remount reaches only the top one)."""
    attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, 0)
    result = _libc.syscall(
        _SYS_MOUNT_SETATTR, _AT_FDCWD, target.encode(), _AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    if result != 0 and ctypes.get_errno() != errno.ENOSYS:  # before Linux 5.12: the top one only
        _check(result, f"mount_setattr {target}")


def _drop_capabilities() -> str:
    last = 0
    while _libc.prctl(_PR_CAPBSET_DROP, last, 0, 0, 0) == 0:
        last += 1
    if ctypes.get_errno() != errno.EINVAL:
        _check(-1, "PR_CAPBSET_DROP")
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: all empty
    _check(_libc.syscall(_SYS_CAPSET, header, data), "capset")
    return f"{last} dropped"


class _Partial(Exception):
    """A layer applied without all of its rules (reported "partial: ...")."""


def _landlock(sandbox: Sandbox, paths: Sequence[str], *, private_tmp: bool) -> str:
    # landlockpy (not the older PyPI `landlock`, which has no network or scope rules).
    import landlockpy

    abi = landlockpy.abi_version()
    if abi <= 0:
        raise OSError(errno.ENOSYS, "the kernel has no Landlock")
    lacking = [what for what, since in (("TCP rules", 4), ("scopes", 6)) if abi < since]
    read = landlockpy.AccessFS.READ_FILE | landlockpy.AccessFS.READ_DIR | landlockpy.AccessFS.EXECUTE
    handled_net = landlockpy.AccessNet(0) if sandbox.network else None  # None: every TCP right
    scoped = landlockpy.Scope.ABSTRACT_UNIX_SOCKET | landlockpy.Scope.SIGNAL
    with landlockpy.Ruleset(handled_net=handled_net, scoped=scoped) as ruleset:
        for path in paths:
            ruleset.allow_path(path, read if os.path.isdir(path) else read & ~landlockpy.AccessFS.READ_DIR)
        ruleset.allow_path("/dev/null", landlockpy.AccessFS.READ_FILE | landlockpy.AccessFS.WRITE_FILE)
        if private_tmp:  # only the sandbox's own tmpfs, never the host's /tmp
            ruleset.allow_path("/tmp", landlockpy.fs_for_abi(abi))
        ruleset.restrict()
        handled = f"fs, {'no ' if sandbox.network else ''}tcp rules, scopes {ruleset.scoped!r}"
    if lacking:
        raise _Partial(f"abi {abi}; {handled}; without {' and '.join(lacking)} (they need a newer kernel)")
    return f"abi {abi}; {handled}"


# System calls the child never needs and that reach past its capabilities or the sandbox.
_DENIED_CALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "open_by_handle_at", "name_to_handle_at",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog",
    # File metadata: Landlock does not guard it, and a root child could otherwise change
    # it through any path or handle it can name.
    "chmod", "fchmod", "fchmodat", "chown", "fchown", "lchown", "fchownat",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    "utime", "utimes", "utimensat", "futimesat",
    # Locks and watches on files of the view, which are the host's files: a lock or lease
    # stalls host processes, a watch sees what they do.
    "flock", "inotify_init", "inotify_init1", "inotify_add_watch", "fanotify_init", "fanotify_mark",
)  # fmt: skip
# fcntl commands that lock or lease a file (F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW,
# F_SETLEASE).
_DENIED_FCNTL = (6, 7, 37, 38, 1024)
# Newer than some libseccomp releases know by name: x86-64 numbers.
_DENIED_NUMBERS = {"fchmodat2": 452, "open_tree_attr": 467, "listmount": 458, "statmount": 457}


_programs: dict[bool, bytes] = {}


def seccomp_program(sandbox: Sandbox) -> bytes:
    """The seccomp filter for ``sandbox``, as BPF for PR_SET_SECCOMP, made with libseccomp
    (through pyseccomp) in the parent and cached: the child only loads it, which keeps
    libseccomp's start-up cost out of every spawn."""
    program = _programs.get(sandbox.network)
    if program is not None:
        return program
    import tempfile

    # pyseccomp: libseccomp through ctypes (Debian's binding serves only Debian's python).
    import pyseccomp as seccomp

    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    if not sandbox.network:
        # io_uring is denied below: its socket operations would bypass this rule.
        rules.add_rule(
            seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.NE, socket.AF_UNIX)
        )
    for call in _DENIED_CALLS:
        rules.add_rule(seccomp.ERRNO(errno.EPERM), call)
    for name, number in _DENIED_NUMBERS.items():
        try:
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):
            rules.add_rule(seccomp.ERRNO(errno.EPERM), number)
    for command in _DENIED_FCNTL:
        rules.add_rule(seccomp.ERRNO(errno.EPERM), "fcntl", seccomp.Arg(1, seccomp.EQ, command))
    # The death signal stays armed: a child that cleared it would outlive its parent.
    rules.add_rule(seccomp.ERRNO(errno.EPERM), "prctl", seccomp.Arg(0, seccomp.EQ, _PR_SET_PDEATHSIG))
    # clone with any namespace flag: EPERM; clone3 (whose flags sit behind a pointer, out of
    # a filter's reach): ENOSYS, so that libc falls back to clone.
    for flag in _NAMESPACE_FLAGS:
        rules.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:
        rules.export_bpf(out)
        out.seek(0)
        program = _programs[sandbox.network] = out.read()
    return program


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _load_seccomp(program: bytes | None) -> str:
    if not program:
        raise OSError(errno.ENOPKG, "no filter: the parent could not make one (libseccomp missing?)")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    _check(_libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "PR_SET_SECCOMP")
    return f"{len(program) // 8} BPF instructions"
