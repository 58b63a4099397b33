"""Cap'n Proto annotations, readable from Python: ``X.capnp_annotations`` on every struct,
enum and interface (and a module's own, for a file's), a dict from the annotation's name
to its value, on ``capbus.load`` modules and on generated modules alike.

The attribute's name has an underscore, which no schema name can have, so it never
shadows a field or a method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ATTRIBUTE = "capnp_annotations"


def value_of(value: Any) -> object:
    """An annotation's value (a ``Value`` reader) as a plain Python value: numbers, bools,
    Text, Data, an enum's number, a struct or list as pycapnp reads it, None for Void."""
    kind = value.which()
    if kind == "void":
        return None
    raw = getattr(value, kind)
    if kind in ("text",):
        return str(raw)
    if kind == "data":
        return bytes(raw)
    if kind in ("struct", "list", "anyPointer", "interface"):
        return None  # (pycapnp gives no schema-free reading of these: their presence, then)
    return raw


def read(node: Any, name_of: Callable[[int], str]) -> dict[str, object]:
    """The annotations of a schema node, by the annotations' names (``name_of(id)``)."""
    return {name_of(int(a.id)): value_of(a.value) for a in node.annotations}
