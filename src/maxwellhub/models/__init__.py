"""Molecular models for maxwellhub drivers, and the registry that finds them by name.

    from maxwellhub.models import create_model

    model = create_model("tls", n=3, omega=0.242, mu12=187.0, pe_initial=[1e-4, 0, 0])
    model.initialize(dt_au=0.5, molecule_ids=[0, 1, 2])
    sources = model.step(fields)  # fields (3, 3) in a.u. -> dmu/dt (3, 3)

A model is named in one of three ways:

- a registered name: ``tls``, ``sho``, ``rttddft``, ``qutip``, ``ase``, or one added with
  :func:`register_model`;
- a dotted path ``package.module:ClassName`` to a :class:`Model` subclass;
- an entry point of the group ``maxwellhub.models`` that an installed package declares.

Built-ins that need an optional package (``rttddft`` PySCF, ``qutip`` QuTiP, ``ase`` ASE)
are registered lazily, as ``module:Class`` with the pip extra that brings the package:
their module is imported only when the model is asked for, and a missing package is one
clear error naming the extra to install.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from importlib.util import find_spec
from typing import Any

# As before the models moved here from maxwellhub_drivers.models: using a model limits
# BLAS/OpenMP to one thread per process unless the environment says otherwise (the
# driver package's import does it; it also keeps the old import paths working).
import maxwellhub_drivers  # noqa: F401

from .base import KINDS, REQUIRED, UNIT_SUFFIXES, Model, Parameter, ParameterError
from .sho import SHOModel
from .tls import TLSModel

__all__ = [
    "ENTRY_POINT_GROUP",
    "KINDS",
    "REQUIRED",
    "UNIT_SUFFIXES",
    "LazyModel",
    "Model",
    "Parameter",
    "ParameterError",
    "SHOModel",
    "TLSModel",
    "available_models",
    "create_model",
    "get_model_class",
    "missing_extra",
    "register_model",
]

#: Entry-point group where installed packages declare their models.
ENTRY_POINT_GROUP = "maxwellhub.models"


@dataclass(frozen=True)
class LazyModel:
    """A model registered by ``target`` (``package.module:ClassName``), imported when
    first asked for. ``needs``: the top-level import name of the optional package it
    needs (``"pyscf"``), ``label`` its name in messages and ``extra`` the pip extra of
    maxwellhub that installs it."""

    target: str
    needs: str = ""
    label: str = ""
    extra: str = ""

    def load(self, name: str) -> type[Model]:
        module_name = self.target.partition(":")[0]
        try:
            importlib.import_module(module_name)
        except ImportError as exc:
            missing = (exc.name or "").partition(".")[0]
            if self.needs and missing == self.needs:
                raise ValueError(
                    f"model {name!r} needs {self.label or self.needs}: pip install "
                    f"'maxwellhub[{self.extra}]'"
                ) from None
            if exc.name == module_name:
                raise ValueError(
                    f"model {name!r}: its module {module_name} is not part of this installation"
                ) from None
            raise ValueError(f"model {name!r}: cannot import {module_name}: {exc}") from exc
        return _check_model_class(_load_dotted(self.target), name)


_registry: dict[str, type[Model] | LazyModel] = {
    "tls": TLSModel,
    "sho": SHOModel,
    "rttddft": LazyModel(
        "maxwellhub.models.rttddft:RTTDDFTModel",
        needs="pyscf",
        label="PySCF",
        extra="pyscf",
    ),
    "qutip": LazyModel(
        "maxwellhub.models.open_quantum:QuTiPModel",
        needs="qutip",
        label="QuTiP",
        extra="qutip",
    ),
    "ase": LazyModel("maxwellhub.models.ase_md:ASEModel", needs="ase", label="ASE", extra="ase"),
}


def register_model(name: str, cls: type[Model] | LazyModel | None = None, *, replace: bool = False):
    """Register ``cls`` (a class, or a :class:`LazyModel` imported on first use) under
    ``name``; without ``cls``, return a class decorator.

    Registering something else under a taken name needs ``replace=True``.
    """

    def add(model_cls: Any) -> Any:
        if not isinstance(model_cls, LazyModel):
            _check_model_class(model_cls, name)
        old = _registry.get(name)
        if old is not None and old != model_cls and not replace:
            where = (
                old.target if isinstance(old, LazyModel) else f"{old.__module__}.{old.__qualname__}"
            )
            raise ValueError(
                f"model name {name!r} is already registered to {where}; pass "
                "replace=True to replace it"
            )
        _registry[name] = model_cls
        return model_cls

    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"model name {name!r} must be a non-empty string without ':'")
    return add if cls is None else add(cls)


def available_models() -> list[str]:
    """Names usable with :func:`get_model_class`: registered ones and entry points."""
    return sorted(set(_registry) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def get_model_class(spec: str | type[Model]) -> type[Model]:
    """The model class named by ``spec`` (registered name, ``module:Class`` or entry point)."""
    if isinstance(spec, type):
        return _check_model_class(spec, repr(spec))
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model {spec!r} must be a name or 'package.module:ClassName'")
    if ":" in spec:
        return _check_model_class(_load_dotted(spec), spec)
    if spec in _registry:
        found = _registry[spec]
        return found.load(spec) if isinstance(found, LazyModel) else found
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=spec):
        try:
            loaded = ep.load()
        except Exception as exc:
            raise ValueError(
                f"model {spec!r}: cannot load entry point {ep.value!r} of group "
                f"{ENTRY_POINT_GROUP!r}: {exc}"
            ) from exc
        return _check_model_class(loaded, spec)
    raise ValueError(
        f"unknown model {spec!r}; known: {', '.join(available_models())}; or give a dotted "
        "path 'package.module:ClassName'"
    )


def missing_extra(spec: str) -> str | None:
    """The pip extra of maxwellhub that model ``spec`` needs and that is not installed
    (``"pyscf"`` for ``rttddft`` without PySCF), else None. Cheap: nothing is imported."""
    found = _registry.get(spec) if isinstance(spec, str) else None
    if isinstance(found, LazyModel) and found.needs and find_spec(found.needs) is None:
        return found.extra or None
    return None


def create_model(spec: str | type[Model], n: int = 1, **params: Any) -> Model:
    """Construct the model named by ``spec`` for ``n`` molecules with ``params``."""
    return get_model_class(spec)(n=n, **params)


def _load_dotted(spec: str) -> Any:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"model {spec!r}: expected 'package.module:ClassName'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ValueError(
                f"model {spec!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    return obj


def _check_model_class(obj: Any, spec: str) -> type[Model]:
    if not (isinstance(obj, type) and issubclass(obj, Model)):
        raise ValueError(f"model {spec}: {obj!r} is not a subclass of maxwellhub.models.Model")
    return obj
