"""The EM-engine interface: what an electromagnetic solver gives the molecules each step
and what it takes back.

An engine is the field side of a coupled run without the molecules: a single cavity mode
(:mod:`maxwellhub.em.cavity`), a 1D multimode cavity (:mod:`maxwellhub.em.multimode`), a
prescribed laser (:mod:`maxwellhub.em.laser`). The molecules, the hub barrier, the
``on_lost`` policies, parameter changes and kicks, the records, the checkpoints and the
stepping loop are written once, in :class:`maxwellhub.em.coupling.EngineCoupling`
(molecule bookkeeping shared with Meep's coupling lives in
:mod:`maxwellhub.em.molecules`). Meep is the fourth engine; its coupling
(:class:`maxwellhub.em.meep.MeepCoupling`) keeps its own stepping because Meep calls it
(``sim.run(coupling.step_function())``), and shares the molecule side.

An implementer provides, numbered as in scipy's ``OdeSolver``:

1. ``name`` (str) and ``needs_dipoles`` (bool): whether :meth:`Engine.finish` needs each
   molecule's dipole (the extras keys ``mux_au``, ``muy_au``, ``muz_au`` every model
   reports) besides its source dmu/dt. Engines that need dipoles make the coupling ask
   the molecules for them every step (ensemble drivers: the dipole keys only).
2. ``_setup(positions, dt_au)``: called once before the first step with the molecules'
   positions ((M, 3), a.u. or the engine's length unit; NaN where a molecule has none)
   and the time step. Check here what depends on the molecules (UsageError naming the
   key).
3. ``_field()``: the field every molecule holds during this step, as an (M, 3) array or
   a (3,) vector that is the same for all molecules (a.u.). It may advance the engine's
   own state to the middle of the step (a leapfrog half kick); it must not depend on
   this step's molecular answers.
4. ``_finish(sources, dipoles, dipoles_next)``: the molecules' answers to that field,
   (M, 3) each, already multiplied by each molecule's rescaling: dmu/dt and (when
   ``needs_dipoles``) the dipole they report after their step (``mux_au``...), and,
   when every molecule reports them, the dipoles at the next force time (``mux_m_au``...:
   ``2 mu - mu_m``; else None). Completes the step.
5. ``state()`` / ``restore(state)``: everything carried from one step to the next, as
   named float or int arrays (no objects: checkpoints load with ``allow_pickle=False``),
   including any random generator's state.
6. ``record()``: the engine's per-step observables as ``{name: float or small array}``
   (e.g. ``qc_au``, ``energy_au``); the coupling stores them every step.

Time: step n advances from ``t_n = n dt`` to ``t_{n+1}``; the records of step n are
labelled ``t_{n+1}``. Each engine says in its docstring at which time its field is
evaluated and which time the dipoles it takes refer to.

This module never touches a socket, a file or Meep; engines are pure numpy, with O(1)
Python calls per step whatever the number of molecules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import UsageError

__all__ = ["Engine"]


class Engine:
    """Base class of the non-Meep EM engines (see the module docstring for the contract)."""

    name: str = ""
    needs_dipoles: bool = False

    def __init__(self) -> None:
        self.dt_au = 0.0
        self.n_molecules = 0
        self.step_index = 0  # steps completed
        self._in_step = False

    # ------------------------------------------------------------- the public calls

    def setup(self, positions: np.ndarray, dt_au: float) -> None:
        """Once, before the first step (the coupling calls it)."""
        if not (np.isfinite(dt_au) and dt_au > 0):
            raise UsageError(f"dt_au = {dt_au!r}; expected a finite number > 0")
        positions = np.asarray(positions, dtype=np.float64)
        if positions.ndim != 2 or positions.shape[1] != 3:
            raise UsageError(f"positions must have shape (M, 3), got {positions.shape}")
        self.dt_au = float(dt_au)
        self.n_molecules = len(positions)
        self._setup(positions, self.dt_au)

    def field(self) -> np.ndarray:
        """The field of this step: (M, 3) or a (3,) vector shared by all molecules."""
        if self._in_step:
            raise UsageError(f"{self.name}: field() twice without finish()")
        self._in_step = True
        return self._field()

    def finish(
        self,
        sources: np.ndarray,
        dipoles: np.ndarray | None = None,
        dipoles_next: np.ndarray | None = None,
    ) -> None:
        """The molecules' answers to this step's field; completes the step."""
        if not self._in_step:
            raise UsageError(f"{self.name}: finish() before field()")
        if self.needs_dipoles and dipoles is None:
            raise UsageError(f"{self.name}: this engine needs the molecules' dipoles")
        self._finish(sources, dipoles, dipoles_next)
        self._in_step = False
        self.step_index += 1

    @property
    def time_au(self) -> float:
        """Time reached: ``step_index * dt_au``."""
        return self.step_index * self.dt_au

    # ---------------------------------------------------------- for implementers

    def _setup(self, positions: np.ndarray, dt_au: float) -> None:
        """Check and precompute what depends on the molecules (optional)."""

    def _field(self) -> np.ndarray:
        raise NotImplementedError

    def _finish(
        self, sources: np.ndarray, dipoles: np.ndarray | None, dipoles_next: np.ndarray | None
    ) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """Everything carried between steps (implementers add theirs to this dict)."""
        return {"step_index": np.array(self.step_index, dtype=np.int64)}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Back to :meth:`state`'s arrays (implementers restore theirs, then call this)."""
        self.step_index = int(state["step_index"])
        self._in_step = False

    def record(self) -> dict[str, Any]:
        """Per-step observables (after :meth:`finish`)."""
        return {}
