# setuptools needs this file only for cffi_modules, which pyproject.toml cannot express.
import os

from setuptools import setup

# A sanitizer build must never reuse (or leave behind) objects of the normal build.
_BUILD = "build/sanitize" if os.environ.get("CAPBUS_SANITIZE") == "1" else "build/normal"

setup(
    cffi_modules=[
        "kernel/build.py:ffibuilder",
        "kernel/build.py:uapi_builder",
        "capbus/rpc/_build.py:capwire_builder",
    ],
    options={"build": {"build_base": _BUILD}},
)
