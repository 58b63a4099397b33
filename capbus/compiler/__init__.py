"""``capbus compile``: .capnp schemas to typed Python modules (see generate.py)."""

from .generate import generate, generate_file

__all__ = ["generate", "generate_file"]
