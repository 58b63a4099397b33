"""Builds the command-dispatcher harness (dispatch_fuzzer.c) against the kernel's sources:
with gcc as a replayer of input files (any machine), or with clang and libFuzzer."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).resolve().with_name("dispatch_fuzzer.c")
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def sources() -> list[str]:
    return [str(HARNESS), *sorted(str(p) for p in (ROOT / "kernel" / "src").glob("*.c"))]


def build(output: Path, *, libfuzzer: bool) -> Path:
    """Compiles the harness to ``output``; raises CalledProcessError with the compiler's
    messages when it does not build."""
    compiler = "clang" if libfuzzer else "gcc"
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"{compiler} is not installed (Debian: apt-get install {compiler})")
    flags = ["-std=c11", "-D_GNU_SOURCE", "-g", "-O1", "-Wall", "-Wextra", *SANITIZERS]
    flags += ["-fsanitize=fuzzer"] if libfuzzer else ["-DCB_FUZZ_STANDALONE"]
    includes = [f"-I{ROOT / 'kernel' / d}" for d in ("include", "include/capbus", "src")]
    subprocess.run(
        [compiler, *flags, *includes, *sources(), "-o", str(output), "-pthread"],
        check=True,
        capture_output=True,
        text=True,
    )
    return output


def sanitizer_env(env: dict[str, str]) -> dict[str, str]:
    """The harness links its own sanitizer runtime: no preloading (as the sanitizer run of
    the suite does for Python), leaks detected, the first error fatal."""
    env = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=1:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env
