"""Molecular models for maxwellhub drivers, and the registry that finds them by name.

    from maxwellhub_drivers.models import create_model

    model = create_model("tls", n=3, omega=0.242, mu12=187.0, pe_initial=[1e-4, 0, 0])
    model.initialize(dt_au=0.5, molecule_ids=[0, 1, 2])
    sources = model.step(fields)  # fields (3, 3) in a.u. -> dmu/dt (3, 3)

A model is named in one of three ways:

- a registered name: ``tls``, ``sho``, or one added with :func:`register_model`;
- a dotted path ``package.module:ClassName`` to a :class:`Model` subclass;
- an entry point of the group ``maxwellhub.models`` that an installed package declares.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from .base import Model, Parameter
from .sho import SHOModel
from .tls import TLSModel

__all__ = [
    "ENTRY_POINT_GROUP",
    "Model",
    "Parameter",
    "SHOModel",
    "TLSModel",
    "available_models",
    "create_model",
    "get_model_class",
    "register_model",
]

#: Entry-point group where installed packages declare their models.
ENTRY_POINT_GROUP = "maxwellhub.models"

_registry: dict[str, type[Model]] = {"tls": TLSModel, "sho": SHOModel}


def register_model(name: str, cls: type[Model] | None = None, *, replace: bool = False):
    """Register ``cls`` under ``name``; without ``cls``, return a class decorator.

    Registering a different class under a taken name needs ``replace=True``.
    """

    def add(model_cls: type[Model]) -> type[Model]:
        _check_model_class(model_cls, name)
        old = _registry.get(name)
        if old is not None and old is not model_cls and not replace:
            raise ValueError(
                f"model name {name!r} is already registered to {old.__module__}."
                f"{old.__qualname__}; pass replace=True to replace it"
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
        return _registry[spec]
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
        raise ValueError(
            f"model {spec}: {obj!r} is not a subclass of maxwellhub_drivers.models.Model"
        )
    return obj
