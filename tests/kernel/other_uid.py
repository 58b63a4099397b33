"""Python children that run as another uid, from any checkout.

A child started as another uid cannot, in general, read this checkout or its venv (under a
0700 home, say): so it starts as root, imports everything it will use, and only then becomes
the other uid (its gid, no supplementary groups; the setuid drops every capability, so Linux
treats it as that user from then on: credentials on its sockets, fd limits, file access).
What it does after that is done as that uid alone. Needs root, as the tests that use it say.
"""

from __future__ import annotations

import sys
import textwrap

# Everything the children's scripts use: once the child is another uid, a module not yet
# imported may be unreadable.
_IMPORTS = "errno, os, resource, select, socket, stat, struct, sys, threading, time"
_CAPBUS = "trio, capbus, capbus.peer, capbus.kernel, capbus.cli, capbus.errors"


def python_as(uid: int, script: str, *, nofile: int | None = None) -> list[str]:
    """The argv of a Python child that runs ``script`` as ``uid`` (and gid ``uid``), with
    RLIMIT_NOFILE ``nofile`` (soft and hard) if given; arguments after it are sys.argv[1:]."""
    limit = f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile}))" if nofile else ""
    prelude = "\n".join(
        [
            f"import {_IMPORTS}",
            f"import {_CAPBUS}",
            limit,
            f"os.setgroups([]); os.setgid({uid}); os.setuid({uid})",
        ]
    )
    return [sys.executable, "-c", prelude + "\n" + textwrap.dedent(script)]
