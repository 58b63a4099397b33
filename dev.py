#!/usr/bin/env python3
"""The project's two commands, on a fresh machine with only Python 3.11+, gcc and pip:

    python3 dev.py demo     # set up .venv, build the kernel, run the demo (typed RPC, a sandboxed child)
    python3 dev.py test     # set up .venv, build the kernel, run the whole test suite

``python3 dev.py test --sanitize`` runs the test suite against an ASan+UBSan build of the
kernel, installed for real (not editable) in .venv-sanitize. Standard library only: this
runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _inputs_digest(extra: str, trees: tuple[str, ...]) -> str:
    """A digest of everything that decides what the install contains."""
    digest = hashlib.sha256(extra.encode())
    paths = [ROOT / "pyproject.toml", ROOT / "setup.py"]
    for tree in trees:
        paths.extend((ROOT / tree).rglob("*") if (ROOT / tree).is_dir() else [ROOT / tree])
    for path in sorted(paths):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_venv(name: str, *, sanitize: bool = False) -> Path:
    """Creates the venv and (re)installs capbus into it when its inputs changed."""
    where = ROOT / name
    python = where / "bin" / "python"
    if not python.exists():
        print(f"== creating {name}", flush=True)
        # Symlinks, as `python -m venv` makes on Linux (EnvBuilder's default is copies): the
        # venv people have. A copied interpreter built with a shared libpython hides
        # problems: run by a user who cannot reach its own libpython and standard library
        # (pyenv's, under /root), it silently runs on the system's instead.
        venv.EnvBuilder(with_pip=True, symlinks=True).create(where)
    stamp = where / ".capbus-installed"
    # An editable install sees Python edits live (not C ones); a real one must be redone for
    # them too.
    compiled = ("kernel", "schemas", "capbus/rpc/capwire.c", "capbus/rpc/_build.py")
    trees = ("kernel", "capbus", "schemas") if sanitize else compiled
    digest = _inputs_digest(f"sanitize={sanitize} editable_mode=compat", trees)
    if not stamp.exists() or stamp.read_text() != digest:
        print(f"== installing capbus into {name} (builds the C kernel)", flush=True)
        env = dict(os.environ)
        if sanitize:
            env["CAPBUS_SANITIZE"] = "1"
        # The normal venv is editable (edit Python, rerun); the sanitizer one is a real install,
        # so that its instrumented kernel never lands in the source tree.
        # Editable in compat mode: a .pth naming the source tree, which mypy follows (the
        # default mode's import hook hides capbus from mypy in a user's project).
        target = [".[test]"] if sanitize else ["-e", ".[test]", "--config-settings", "editable_mode=compat"]
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *target],
            cwd=ROOT,
            env=env,
            check=True,
        )
        stamp.write_text(digest)
    return python


def sanitizer_env() -> dict[str, str]:
    """Python itself is not built with ASan, so its runtime is preloaded."""
    env = dict(os.environ)
    libs = []
    for lib in ("libasan.so", "libubsan.so"):
        found = subprocess.run(
            ["gcc", f"-print-file-name={lib}"], capture_output=True, text=True
        ).stdout.strip()
        if os.path.isabs(found):
            libs.append(found)
    env["LD_PRELOAD"] = " ".join(libs)
    # CPython's own allocations look like leaks at exit; the kernel's are checked by its
    # counters in the tests instead.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["CAPBUS_SANITIZED"] = "1"
    return env


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test"}:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        python = ensure_venv(".venv")
        return subprocess.run([str(python), "examples/demo.py", *rest], cwd=ROOT).returncode
    if "--sanitize" in rest:
        rest.remove("--sanitize")
        python = ensure_venv(".venv-sanitize", sanitize=True)
        # The whole suite unless paths were given (options alone do not count): it runs
        # against a real install, so it also catches what packaging leaves out.
        paths = [a for a in rest if not a.startswith("-")]
        targets = rest if paths else [*rest, "tests"]
        # The pytest script (not ``python -m``) keeps the source tree off sys.path, so the
        # tests import the installed, instrumented capbus.
        pytest = python.parent / "pytest"
        return subprocess.run(
            [str(pytest), "-p", "no:cacheprovider", *targets], cwd=ROOT, env=sanitizer_env()
        ).returncode
    python = ensure_venv(".venv")
    return subprocess.run([str(python), "-m", "pytest", *rest], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
