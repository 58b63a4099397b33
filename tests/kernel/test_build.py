"""The kernel builds warning-free, and the sanitizer run really runs the sanitized build."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import capbus._kernel

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_compiles_without_warnings(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is required to build capbus"
    for source in sorted((ROOT / "kernel" / "src").glob("*.c")):
        result = subprocess.run(
            [
                gcc,
                "-std=c11",
                "-D_GNU_SOURCE",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-O2",
                f"-I{ROOT / 'kernel' / 'include'}",
                f"-I{ROOT / 'kernel' / 'include' / 'capbus'}",
                "-c",
                str(source),
                "-o",
                str(tmp_path / (source.stem + ".o")),
            ],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"{source.name}:\n{result.stderr}"


def test_sanitizer_run_uses_the_instrumented_kernel() -> None:
    if os.environ.get("CAPBUS_SANITIZED") != "1":
        # Normal run: the kernel must not carry the sanitizer runtime.
        maps = Path("/proc/self/maps").read_text()
        assert "libasan" not in maps
        return
    maps = Path("/proc/self/maps").read_text()
    assert "libasan" in maps and "libubsan" in maps
    kernel_file = Path(capbus._kernel.__file__).resolve()
    assert ROOT / "capbus" not in kernel_file.parents, "the sanitizer run imported the source tree"
    linked = subprocess.run(["ldd", str(kernel_file)], capture_output=True, text=True).stdout
    assert "libasan" in linked
