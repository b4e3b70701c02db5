"""The electromagnetic side of maxwellhub: molecules coupled to an EM engine.

``from maxwellhub.em import MeepCoupling`` (an FDTD grid; see :mod:`maxwellhub.em.meep`
for the usage example and how it works; kernels in :mod:`maxwellhub.em.kernels`), or
``EngineCoupling`` with ``SingleModeCavity``, ``MultimodeCavity`` or ``LaserField``
(:mod:`maxwellhub.em.coupling`; the engine contract in :mod:`maxwellhub.em.engine`).
The molecule side both share is :mod:`maxwellhub.em.molecules`. Meep is imported only
when a Meep coupling starts, so this package imports without Meep.
"""

from __future__ import annotations

from typing import Any

from .coupling import EngineCoupling
from .engine import Engine
from .kernels import KERNEL_CUTOFF_SIGMAS, kernel_weights
from .meep import MeepCoupling

__all__ = [
    "KERNEL_CUTOFF_SIGMAS",
    "Engine",
    "EngineCoupling",
    "LaserField",
    "MeepCoupling",
    "MultimodeCavity",
    "SingleModeCavity",
    "kernel_weights",
]

_LAZY = {
    "SingleModeCavity": ".cavity",
    "MultimodeCavity": ".multimode",
    "LaserField": ".laser",
}


def __getattr__(name: str) -> Any:  # the engines, imported when first used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
