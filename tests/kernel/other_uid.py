"""Python scripts that run as another uid, for the kernel tests that need real other users
(credentials on their sockets, their own fd limits), from any checkout: the switch is
capbus.testing.as_user, the one spawn uses. Needs root, as the tests that use it say.
"""

from __future__ import annotations

import sys
import textwrap

from capbus.testing import as_user

# What the scripts may use without importing it themselves.
_IMPORTS = "errno, os, resource, select, socket, stat, struct, sys, threading, time"
_CAPBUS = "trio, capbus, capbus.peer, capbus.kernel, capbus.cli, capbus.errors"


def python_as(uid: int, script: str, *, nofile: int | None = None) -> list[str]:
    """The argv of a Python child that runs ``script`` as ``uid`` (and gid ``uid``), with
    RLIMIT_NOFILE ``nofile`` (soft and hard) if given; arguments after it are sys.argv[1:]."""
    limit = f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile}))" if nofile else ""
    prelude = "\n".join([f"import {_IMPORTS}", f"import {_CAPBUS}", limit])
    return as_user([sys.executable, "-c", prelude + "\n" + textwrap.dedent(script)], uid, uid)
