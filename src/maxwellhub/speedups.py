"""The optional compiled speedups, loaded in one place.

maxwellhub ships small C extensions for its per-step hot paths (the hub's steady step,
the driver's step loop). Each has a pure-Python twin with the same behaviour, which runs
when the extension is not built (no compiler at install time) or when the environment
sets ``MAXWELLHUB_PURE_PYTHON=1`` (how the tests run both paths).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["ENV", "built", "load", "pure_python"]

#: Set to 1 to run the pure-Python paths even when the extensions are built.
ENV = "MAXWELLHUB_PURE_PYTHON"


def pure_python() -> bool:
    """Whether the environment asks for the pure-Python paths."""
    return os.environ.get(ENV, "").strip() not in ("", "0")


def load(name: str) -> ModuleType | None:
    """The compiled module ``name`` (dotted), or None when it is not built or turned off."""
    return None if pure_python() else built(name)


def built(name: str) -> ModuleType | None:
    """The compiled module ``name`` whether or not it is turned off (the tests hold it to
    its pure-Python twin in either mode), or None when it is not built."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
