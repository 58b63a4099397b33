"""cffi build of ``capbus.rpc._capwire`` (capwire.c: the tree check every received RPC message
passes). Run by setuptools during ``pip install`` (setup.py's ``cffi_modules``). Never built
with sanitizers: spawned children import the RPC layer without the sanitizer runtime; the
check is fuzzed against capwire.py's Python walk instead (tests/rpc/test_capwire_tree.py)."""

from __future__ import annotations

from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent

DECLARATIONS = """
const char *capwire_check_tree(const uint8_t *data, size_t size, int64_t budget, uint32_t nesting);
const char *capwire_check_segment(const uint8_t *data, size_t size, int64_t budget, uint32_t nesting);
const char *capwire_check_segments(const uint8_t *const *data, const size_t *sizes, uint32_t count,
                                   int64_t budget, uint32_t nesting);
"""

capwire_builder = cffi.FFI()
capwire_builder.cdef(DECLARATIONS)
capwire_builder.set_source(
    "capbus.rpc._capwire",
    DECLARATIONS,
    sources=[str((HERE / "capwire.c").relative_to(HERE.parent.parent))],
    extra_compile_args=["-std=c11", "-Wall", "-Wextra", "-O2"],
)

if __name__ == "__main__":
    capwire_builder.compile(verbose=True)
