"""The electromagnetic side of maxwellhub: molecules coupled to an FDTD solver.

``from maxwellhub.em import MeepCoupling`` (see :mod:`maxwellhub.em.meep` for the usage
example and how it works); kernels are in :mod:`maxwellhub.em.kernels`. Meep is imported
only when a coupling starts, so this package imports without Meep.
"""

from __future__ import annotations

from .kernels import KERNEL_CUTOFF_SIGMAS, kernel_weights
from .meep import MeepCoupling

__all__ = ["KERNEL_CUTOFF_SIGMAS", "MeepCoupling", "kernel_weights"]
