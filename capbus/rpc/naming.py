"""The one rule for schema names that Python cannot use as they are.

A method, param, result or struct field whose schema name is a Python keyword (``from``,
``class``, ``import``...) or a name that clients, servers and structs already use for
themselves (:data:`RESERVED`) is spelled with a trailing underscore in Python: method
``from`` is ``client.from_(...)`` and ``def from_(self, ...)`` on a server, param ``class``
is the keyword argument ``class_``, result ``import`` is ``results.import_`` and the key
``"import_"`` (or ``"import"``) of a returned mapping. Generated modules and ``capbus.load``
apply it alike, on the client and the server side; on the wire every name stays the
schema's. (Cap'n Proto names cannot contain underscores, so no schema name collides with
another's Python spelling.)
"""

from __future__ import annotations

import keyword
from collections.abc import Iterable

RESERVED = frozenset(
    {
        # a client's own attributes
        "interface",
        "vat",
        "handle",
        "server",
        "pipeline",
        "bound",
        "aclose",
        "send",
        # a handler's first parameter, and a struct reader's own attributes
        "self",
        "which",
        "view",
        "pycapnp",
        "schema",
        "to_dict",
    }
)


def python_name(name: str) -> str:
    """How Python spells the schema name ``name``."""
    return name + "_" if keyword.iskeyword(name) or name in RESERVED else name


def renamed(names: Iterable[str]) -> dict[str, str]:
    """Python spelling -> schema name, for the names that the rule changes (usually none)."""
    return {spelled: name for name in names if (spelled := python_name(name)) != name}
