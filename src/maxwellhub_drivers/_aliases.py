"""Old import paths kept importable: ``maxwellhub_drivers.models`` and every module under it
are the modules of :mod:`maxwellhub.models` (where the models moved), not copies.

``import maxwellhub_drivers.models.tls`` gives the very module object
``maxwellhub.models.tls``, so classes, the model registry and anything a test patches are
shared, and ``--model maxwellhub_drivers.models.tls:TLSModel`` still names ``TLSModel``.
A module is imported when first asked for under either name (the optional-package models
``rttddft``, ``open_quantum`` and ``ase_md`` stay lazy).

Nothing here imports numpy or maxwellhub at import time (see the package's docstring).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

#: Old package name -> new one; a module under the old name is the same module under the new.
ALIASES = {"maxwellhub_drivers.models": "maxwellhub.models"}


def _target(fullname: str) -> str | None:
    for old, new in ALIASES.items():
        if fullname == old or fullname.startswith(old + "."):
            return new + fullname[len(old) :]
    return None


class AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and loads it as the new module itself (``sys.modules`` then holds
    one module object under both names)."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        new = _target(fullname)
        if new is None:
            return None
        # An unknown submodule is an ordinary ModuleNotFoundError for the old name.
        if importlib.util.find_spec(new) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=False)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = _target(spec.name)
        assert new is not None  # find_spec only returns a spec for aliased names
        module = importlib.import_module(new)
        # The import system sets __spec__ on what we return; exec_module puts the module's
        # own spec back, so the module keeps its real name for reload and introspection.
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        own = module.__spec__.loader_state if module.__spec__ is not None else None
        if own is not None:
            module.__spec__ = own


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, AliasFinder())


install()
