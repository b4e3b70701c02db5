"""The engines by name, built from a config table (``[em.cavity]``, ``[em.multimode]``,
``[em.laser]``): what ``maxwellhub run`` uses, and the one place that turns TOML values
into constructor arguments.

TOML has no functions, so a time-dependent quantity (the cavity's ``drive``, the laser's
``pulse``) is a table naming one of the pulse shapes of :mod:`maxwellhub.pulses`::

    [em.laser]
    pulse = { shape = "gaussian", e0 = 0.01, omega = 0.242, t0 = 600.0, sigma = 100.0 }

(``shape``: ``gaussian`` (e0, omega, t0, sigma, phi), ``chirped`` (... and beta),
``sin2`` (e0, omega, t0, duration, phi), ``cw`` (e0, omega, phi)); a file path
(``file``) is relative to the config file's directory. Errors name the key as
``<engine>.<key>`` (the config adds the ``em.`` in front).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .engine import Engine

__all__ = ["ENGINE_CLASSES", "build_engine", "pulse_from_table"]

#: engine name -> "module:Class" (imported when built)
ENGINE_CLASSES = {
    "cavity": "maxwellhub.em.cavity:SingleModeCavity",
    "multimode": "maxwellhub.em.multimode:MultimodeCavity",
    "laser": "maxwellhub.em.laser:LaserField",
}

_SHAPES = {
    "gaussian": "GaussianPulse",
    "chirped": "ChirpedPulse",
    "sin2": "Sin2Pulse",
    "cw": "ContinuousWave",
}


def pulse_from_table(where: str, table: Mapping[str, Any]):
    """A pulse of :mod:`maxwellhub.pulses` from ``{shape = ..., <its fields>}``."""
    from .. import pulses

    shape = table.get("shape")
    if shape not in _SHAPES:
        raise UsageError(f"{where}.shape = {shape!r}; allowed: {', '.join(_SHAPES)}")
    cls = getattr(pulses, _SHAPES[shape])
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in table.items() if k != "shape"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise UsageError(
            f"unknown key {where}.{unknown[0]} for shape {shape!r}; allowed: "
            + ", ".join(sorted(fields))
        )
    for key, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}.{key} = {value!r}; expected a number")
    missing = sorted(
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.name not in kwargs
    )
    if missing:
        raise UsageError(f"missing key {where}.{missing[0]} for shape {shape!r}")
    try:
        return cls(**{k: float(v) for k, v in kwargs.items()})
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None


def engine_class(name: str) -> type[Engine]:
    if name not in ENGINE_CLASSES:
        raise UsageError(f"engine {name!r}; allowed: meep, {', '.join(ENGINE_CLASSES)}")
    module, _, attr = ENGINE_CLASSES[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls  # type: ignore[no-any-return]


def build_engine(
    name: str, params: Mapping[str, Any], base_dir: str | Path | None = None
) -> Engine:
    """The engine ``name`` with the keys of its config table (UsageError naming
    ``<name>.<key>`` for a bad one)."""
    cls = engine_class(name)
    kwargs = dict(params)
    signature = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in signature.values()):
        allowed = [k for k in signature if k != "self"]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise UsageError(f"unknown key {name}.{unknown[0]}; allowed: {', '.join(allowed)}")
    for key in ("drive", "pulse"):
        if isinstance(kwargs.get(key), Mapping):
            kwargs[key] = pulse_from_table(f"{name}.{key}", kwargs[key])
    if isinstance(kwargs.get("file"), str) and base_dir is not None:
        path = Path(kwargs["file"])
        kwargs["file"] = str(path if path.is_absolute() else Path(base_dir) / path)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # an unknown keyword: name it
        raise UsageError(f"{name}: {exc}") from None
