"""Classical harmonic oscillator (SHO) model, propagated by velocity Verlet.

H = p**2/2 + omega**2 q**2/2 - mu0 q E_axis (unit mass); the dipole is mu0 q along axis
``orientation``. Conventions are MaxwellLink's SHO driver (same parameter names, defaults
and step), so the same field sequence gives the same sources to round-off:

- one step under the field E (held constant): p += a dt/2; q += p dt;
  a = -omega**2 q + mu0 E; p += a dt/2;
- reported half a step later: p_half = p + a dt/2, q_half = q + p_half dt/2;
  source dmu/dt = mu0 p_half, dipole mu0 q_half, energy from q_half and p_half;
  extras add the dipole at the step's end (``mu*_m_au`` = mu0 q) and ``p_au``, ``q_au``.

One deliberate difference: MaxwellLink starts the acceleration at 0 even when
``q_initial != 0``; here it starts at -omega**2 q_initial, the force of the initial
position. Both agree for ``q_initial = 0`` (the default).
"""

from __future__ import annotations

import numpy as np

from .base import Model, Parameter

__all__ = ["SHOModel"]

_AXES = ("mux_au", "muy_au", "muz_au")
_AXES_M = ("mux_m_au", "muy_m_au", "muz_m_au")


class SHOModel(Model):
    """Harmonic oscillators (n of them) coupled through their dipole mu0 q."""

    name = "sho"
    parameters = {
        "omega": Parameter(0.24188843, "angular frequency (a.u.)",
                           valid=lambda a: a > 0, allowed="a finite number > 0"),
        "mu0": Parameter(187.0819866, "dipole per unit coordinate: mu = mu0 q (a.u.)"),
        "orientation": Parameter(2, "dipole axis: 0 (x), 1 (y) or 2 (z)", kind=int,
                                 valid=lambda a: (a >= 0) & (a <= 2),
                                 allowed="0 (x), 1 (y) or 2 (z)"),
        "p_initial": Parameter(0.0, "initial momentum (a.u.)"),
        "q_initial": Parameter(0.0, "initial coordinate (a.u.)"),
    }
    extras_keys = ("energy_au", "mux_au", "muy_au", "muz_au", "mux_m_au", "muy_m_au",
                   "muz_m_au", "p_au", "q_au")

    def __init__(self, n: int = 1, **params) -> None:
        super().__init__(n, **params)
        self._rows = np.arange(self.n)
        self._axis = self.params["orientation"]

    def _initial_state(self):
        q = self.params["q_initial"].copy()
        return {"p": self.params["p_initial"].copy(), "q": q,
                "acceleration": -self.params["omega"] ** 2 * q}

    def _stage_impl(self, state, fields):
        dt = self.dt_au
        omega, mu0 = self.params["omega"], self.params["mu0"]
        p = state["p"] + 0.5 * state["acceleration"] * dt
        q = state["q"] + p * dt
        a = -omega**2 * q + fields[self._rows, self._axis] * mu0
        p = p + 0.5 * a * dt
        sources = np.zeros((self.n, 3))
        sources[self._rows, self._axis] = (p + 0.5 * a * dt) * mu0
        return {"p": p, "q": q, "acceleration": a}, sources

    def _extras_impl(self, state):
        p, q, a = state["p"], state["q"], state["acceleration"]
        omega, mu0 = self.params["omega"], self.params["mu0"]
        dt = self.dt_au or 0.0  # before initialize(): report the state itself
        p_half = p + 0.5 * a * dt
        q_half = q + 0.5 * p_half * dt
        dipole = mu0 * q_half
        dipole_m = mu0 * q
        out = {key: np.where(self._axis == k, dipole, 0.0) for k, key in enumerate(_AXES)}
        out.update(
            {key: np.where(self._axis == k, dipole_m, 0.0) for k, key in enumerate(_AXES_M)})
        out["energy_au"] = 0.5 * omega**2 * q_half**2 + 0.5 * p_half**2
        out["p_au"] = p.copy()
        out["q_au"] = q.copy()
        return out
