"""cffi build of the capbus kernel into ``capbus._kernel``.

Run by setuptools during ``pip install`` (see setup.py's ``cffi_modules``): no manual build
step. ``CAPBUS_SANITIZE=1`` builds with AddressSanitizer and UBSan (see docs/development.md);
such a build needs the sanitizer runtime preloaded into Python (``dev.py test --sanitize``
does that).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
INCLUDE = HERE / "include"
SOURCES = sorted(str(p.relative_to(HERE.parent)) for p in (HERE / "src").glob("*.c"))


def _uapi_constants() -> str:
    """Every #define and enum member of uapi.h, declared for cffi so Python reads the values
    from the one header instead of repeating them."""
    text = (INCLUDE / "capbus" / "uapi.h").read_text()
    names = re.findall(r"^#define\s+(CAPBUS_[A-Z0-9_]+)\s+\S", text, re.M)
    names += re.findall(r"^\s+(CAPBUS_[A-Z0-9_]+)\s*=", text, re.M)
    skip = {"CAPBUS_UAPI_H"}
    return "\n".join(f"#define {n} ..." for n in names if n not in skip)


CDEF = (
    _uapi_constants()
    + """
struct capbus_frame { uint32_t size; uint16_t type; uint16_t flags; uint64_t cookie; };
struct capbus_reply { int32_t error; uint32_t command; };
struct capbus_cmd_destroy { uint32_t n_nodes; uint32_t flags; };
struct capbus_cmd_transfer { uint64_t handle; uint8_t peer_key[16]; };
struct capbus_cmd_send { uint32_t n_destinations; uint32_t n_handles; uint32_t n_fds;
    uint32_t payload_size; int32_t priority; uint32_t flags; };
struct capbus_reply_send { uint32_t n_destinations; uint32_t n_delivered; };
struct capbus_reply_query { uint8_t peer_key[16]; uint32_t uid; uint32_t gid; uint32_t pid;
    uint32_t wire_version; uint32_t payload_max; uint32_t handles_max; uint32_t fds_max;
    uint32_t destinations_max; };
struct capbus_reply_handle { uint32_t n_user; uint32_t flags; };
struct capbus_cmd_peer_create { uint32_t n_handles; uint32_t payload_size; };
struct capbus_message { uint16_t kind; uint16_t flags; int32_t priority; uint64_t destination;
    uint64_t seq; uint32_t uid; uint32_t gid; uint32_t pid; uint32_t n_handles; uint32_t n_fds;
    uint32_t payload_size; uint64_t process_id; };
struct capbus_monitor_record { uint16_t event; uint16_t n_destinations; uint32_t payload_size;
    uint64_t seq; uint32_t uid; uint32_t pid; uint32_t n_handles; uint32_t n_fds; uint64_t dropped; };

struct cb_kernel;
struct capbus_limits {
    uint64_t peer_bytes; uint64_t peer_messages; uint64_t peer_handles; uint64_t peer_fds;
    uint64_t handles_held; uint64_t nodes_owned; uint64_t user_bytes; uint64_t peers_per_user;
};
struct capbus_stats {
    uint64_t peers; uint64_t nodes; uint64_t handles; uint64_t queued_messages;
    uint64_t queued_bytes; uint64_t queued_fds; uint64_t seq; uint64_t messages_sent;
    uint64_t messages_written; uint64_t violations; uint64_t peers_doomed; uint64_t memory_bytes;
};
void capbus_kernel_default_limits(struct capbus_limits *limits);
int capbus_kernel_new(const struct capbus_limits *limits, struct cb_kernel **out);
int capbus_kernel_listen(struct cb_kernel *kernel, const char *path, unsigned int mode);
int capbus_kernel_adopt(struct cb_kernel *kernel, int fd, int64_t uid, int64_t gid, int64_t pid);
int capbus_kernel_grant_monitor(struct cb_kernel *kernel, const uint8_t *peer_key);
int capbus_kernel_run(struct cb_kernel *kernel);
void capbus_kernel_stop(struct cb_kernel *kernel);
void capbus_kernel_stats(struct cb_kernel *kernel, struct capbus_stats *out);
void capbus_kernel_free(struct cb_kernel *kernel);
"""
)

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

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
