"""cffi builds: the capbus kernel into ``capbus._kernel``, and the wire contract alone
(uapi.h: constants and struct sizes, no kernel code) into ``capbus._uapi``.

A peer needs only the second, so a process that connects to a kernel (a spawned child, say)
never loads the kernel's code, nor the sanitizer runtime of a sanitizer build. Run by
setuptools during ``pip install`` (see setup.py's ``cffi_modules``): no manual build step.
``CAPBUS_SANITIZE=1`` builds the kernel with AddressSanitizer and UBSan (see
docs/development.md); such a build needs the sanitizer runtime preloaded into Python
(``dev.py test --sanitize`` does that).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
INCLUDE = HERE / "include"
SOURCES = sorted(str(p.relative_to(HERE.parent)) for p in (HERE / "src").glob("*.c"))


def _declarations(header: Path) -> str:
    """A header's declarations as cffi reads them: comments and preprocessor lines removed,
    every #define of a number declared as ``#define NAME ...`` so that cffi takes its value
    from the compiled header. So the C headers are the one place these are written."""
    text = re.sub(r"/\*.*?\*/", "", header.read_text(), flags=re.S)
    defines = re.findall(r"^#define[ \t]+(CAPBUS_[A-Z0-9_]+)[ \t]+\S", text, re.M)
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return "\n".join(f"#define {name} ..." for name in defines) + "\n" + body


CDEF = _declarations(INCLUDE / "capbus" / "uapi.h") + _declarations(INCLUDE / "capbus" / "capbus_kernel.h")

SANITIZE = os.environ.get("CAPBUS_SANITIZE") == "1"
FLAGS = ["-std=c11", "-Wall", "-Wextra", "-O2", "-g"]
LINK: list[str] = ["-pthread"]
if SANITIZE:
    FLAGS += [
        "-O1",
        "-fsanitize=address,undefined",
        "-fno-omit-frame-pointer",
        "-fno-sanitize-recover=undefined",
    ]
    LINK += ["-fsanitize=address,undefined"]

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "capbus._kernel",
    '#include "capbus/uapi.h"\n#include "capbus/capbus_kernel.h"\n',
    sources=SOURCES,
    include_dirs=[str(INCLUDE.relative_to(HERE.parent)), str((INCLUDE / "capbus").relative_to(HERE.parent))],
    define_macros=[("_GNU_SOURCE", None)],
    extra_compile_args=FLAGS,
    extra_link_args=LINK,
)

uapi_builder = cffi.FFI()
uapi_builder.cdef(_declarations(INCLUDE / "capbus" / "uapi.h"))
uapi_builder.set_source(
    "capbus._uapi",
    '#include "capbus/uapi.h"\n',
    include_dirs=[str(INCLUDE.relative_to(HERE.parent))],
    extra_compile_args=["-std=c11", "-Wall", "-Wextra", "-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
    uapi_builder.compile(verbose=True)
