"""The first code a spawned child runs (``python -P -s -m capbus._child CONFIG``).

It is trusted: it arms the death signal, imports what the child needs while the whole file
system is still there, puts the sandbox up (capbus.sandbox), and only then runs the code
it was started for, which is not trusted: a Python target (``module:function``, called
with its :class:`~capbus.bootstrapping.Bootstrap`) or an argv, exec'd with its kernel
connection and the sandbox report in its environment.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn

from . import sandbox
from ._resources import package_directories

FD_VARIABLE = "CAPBUS_FD"
"""The environment variable that names the kernel connection of a child started from an argv."""
REPORT_VARIABLE = "CAPBUS_SANDBOX_REPORT"
"""... and the one that carries its sandbox report (JSON)."""
STRICT_REFUSED = 3
"""The child's exit status when a strict sandbox could not be had."""
MODULE = "capbus._child"
OPTIONS = ("-P", "-s")
"""The interpreter's options: neither the working directory nor the user site on sys.path."""


def main(argv: list[str]) -> None:
    config: dict[str, Any] = json.loads(argv[1])
    fd: int = config["fd"]
    sandbox.die_with_parent(config["parent"])
    user: dict[str, Any] | None = config.get("user")
    environment = _take_environment(user["environment"]) if user is not None else None
    policy = sandbox.Sandbox.from_json(config["sandbox"])
    cgroup: str = config["cgroup"]["state"]
    if config["cgroup"].get("fds"):
        try:
            sandbox.join_cgroup(config["cgroup"]["fds"])
        except OSError as error:
            cgroup = f"unavailable: joining it: {error}"
    fds = sandbox.close_other_fds(policy, [0, 1, 2, fd])
    target: dict[str, Any] = config["target"]
    code: list[str] = config["code"]
    packages = package_directories()
    program = [] if target["kind"] == "python" else [os.path.dirname(os.path.abspath(target["argv"][0]))]
    paths = sandbox.view(policy, [*packages, *code, *program])
    if user is not None and environment is not None:
        _become(config, user, environment, paths, cgroup)
    seccomp = bytes.fromhex(config["seccomp"]) if config.get("seccomp") else None
    trusted: dict[str, Any] = {}

    def trusted_imports() -> None:
        # Inside the view, before the last walls: what these imports open (pycapnp keeps
        # directory handles) lies in the view, and nothing of the host's stays open.
        if target["kind"] == "python":
            import trio

            from . import bootstrapping
            from .rpc import stubs  # noqa: F401 - the generated-stub registry, for typed entries

            trusted.update(trio=trio, bootstrapping=bootstrapping)

    report = sandbox.enter(policy, [0, 1, 2, fd], paths, seccomp, fds, inside=trusted_imports, cgroup=cgroup)
    # Inside the sandbox from here on. The code we were started for runs only if the sandbox
    # is what the policy demands: an argv target reports for itself, so this check is ours.
    lacking = sandbox.missing(report, policy)
    if lacking and policy.policy == "strict":
        reasons = "; ".join(f"{layer}: {report.get(layer)}" for layer in lacking)
        sys.stderr.write(
            f"capbus: strict sandbox, but not to be had here: {', '.join(lacking)} ({reasons})\n"
        )
        sys.exit(STRICT_REFUSED)
    if target["kind"] == "argv":
        environment = dict(os.environ)
        environment[FD_VARIABLE] = str(fd)
        environment[REPORT_VARIABLE] = json.dumps(report)
        os.set_inheritable(fd, True)
        os.execve(target["argv"][0], target["argv"], environment)
    sys.path[:0] = code
    trusted["trio"].run(_run, fd, report, target, trusted["bootstrapping"])


def _take_environment(fd: int) -> dict[str, str]:
    """The environment meant for a child started as another user, which the parent passes
    on a memfd (not in the arguments, which anyone may read in /proc)."""
    try:
        data = os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)
    environment: dict[str, str] = json.loads(data)
    return environment


def _become(
    config: dict[str, Any], user: dict[str, Any], environment: dict[str, str], paths: list[str], cgroup: str
) -> NoReturn:
    """A child started as another user begins as root (its parent), in an empty environment:
    so that it can start from an interpreter and code that user may not reach (under a
    private home), and so that nothing the user may write decides what runs as root. Here
    it makes what it needs reachable, becomes that user, and starts again as it, with the
    environment meant for it."""
    python_path = [os.path.realpath(p) for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    sandbox.switch_user(user["uid"], user["gid"], [*paths, *python_path])
    sandbox.die_with_parent(config["parent"])  # a change of credentials cleared it
    again = dict(config, user=None, cgroup={"state": cgroup})
    os.execve(sys.executable, [sys.executable, *OPTIONS, "-m", MODULE, json.dumps(again)], environment)


async def _run(fd: int, report: dict[str, str], target: dict[str, Any], bootstrap: Any) -> None:
    import importlib

    async with bootstrap.connect(fd, report) as boot:
        # The untrusted code is imported only now, inside the sandbox and after the parent
        # accepted the sandbox report.
        module = importlib.import_module(target["module"])
        function: Any = module
        for part in target["function"].split("."):
            function = getattr(function, part)
        await function(boot)


if __name__ == "__main__":
    main(sys.argv)
