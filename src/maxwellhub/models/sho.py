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

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from .base import Model, Parameter

__all__ = ["SHOModel"]

_AXES = ("mux_au", "muy_au", "muz_au")
_AXES_M = ("mux_m_au", "muy_m_au", "muz_m_au")


def _verlet_step(p, q, a, field, omega2, mu0, dt):
    """One velocity-Verlet step under ``field``; floats and arrays alike."""
    p = p + 0.5 * a * dt
    q = q + p * dt
    a = -omega2 * q + field * mu0
    return p + 0.5 * a * dt, q, a


def _half_step_ahead(p, q, a, dt):
    """(p, q) half a step after the state (p, q, a), where sources and extras are reported."""
    p_half = p + 0.5 * a * dt
    return p_half, q + 0.5 * p_half * dt


def _energy(p_half, q_half, omega2):
    return 0.5 * omega2 * (q_half * q_half) + 0.5 * (p_half * p_half)


class SHOModel(Model):
    """Harmonic oscillators (n of them) coupled through their dipole mu0 q."""

    name = "sho"
    parameters: ClassVar[Mapping[str, Parameter]] = {
        "omega": Parameter(
            0.24188843,
            "angular frequency (a.u.; omega_eV in eV)",
            valid=lambda a: a > 0,
            allowed="a finite number > 0",
            mutable=True,
            unit="energy",
        ),
        "mu0": Parameter(
            187.0819866, "dipole per unit coordinate: mu = mu0 q (a.u.)", mutable=True
        ),
        "orientation": Parameter(
            2,
            "dipole axis: 0 (x), 1 (y) or 2 (z)",
            kind=int,
            valid=lambda a: (a >= 0) & (a <= 2),
            allowed="0 (x), 1 (y) or 2 (z)",
        ),
        "p_initial": Parameter(0.0, "initial momentum (a.u.)"),
        "q_initial": Parameter(0.0, "initial coordinate (a.u.)"),
    }
    extras_keys = (
        "energy_au",
        "mux_au",
        "muy_au",
        "muz_au",
        "mux_m_au",
        "muy_m_au",
        "muz_m_au",
        "p_au",
        "q_au",
    )
    example_params: ClassVar[dict[str, Any]] = {
        "p_initial": 0.05,
        "q_initial": 0.1,
        "orientation": 0,
    }

    def _configure(self) -> None:
        axis = self.params["orientation"]
        self._axis = axis
        # a column view when all molecules share one axis (the usual case), else a gather
        self._pick = (
            (slice(None), int(axis[0])) if (axis == axis[0]).all() else (np.arange(self.n), axis)
        )
        omega = self.params["omega"]
        self._omega2 = omega * omega
        if self.n == 1:  # the constants of _stage_one and _extras_one, as floats
            self._one_params = (int(axis[0]), float(self._omega2[0]), float(self.params["mu0"][0]))

    def _initial_state(self):
        omega, q = self.params["omega"], self.params["q_initial"].copy()
        return {"p": self.params["p_initial"].copy(), "q": q, "acceleration": -(omega * omega) * q}

    def _stage_impl(self, state, fields):
        mu0 = self.params["mu0"]
        p, q, a = _verlet_step(
            state["p"],
            state["q"],
            state["acceleration"],
            fields[self._pick],
            self._omega2,
            mu0,
            self.dt_au,
        )
        p_half, _ = _half_step_ahead(p, q, a, self.dt_au)
        sources = np.zeros((self.n, 3))
        sources[self._pick] = p_half * mu0
        return {"p": p, "q": q, "acceleration": a}, sources

    # -- the compiled driver loop (maxwellhub_drivers.fastloop) steps one molecule in C
    def scalar_loop_inputs(
        self,
    ) -> tuple[tuple[float, ...], tuple[float, float, float, float]] | None:
        """What a compiled step loop needs to step this one molecule as :meth:`stage` and
        :meth:`commit` would: the constants ``(axis, omega2, mu0, dt)`` and the committed
        ``(p, q, acceleration, time)``. None when that loop does not apply: n > 1, not
        initialised, a step staged."""
        if self.n != 1 or self.dt_au is None or self.staged:
            return None
        axis, omega2, mu0 = self._one_params
        state = self._state
        p, q, a = state["p"].item(), state["q"].item(), state["acceleration"].item()
        return (float(axis), omega2, mu0, self.dt_au), (p, q, a, self.time_au)

    def scalar_loop_done(self, p: float, q: float, a: float, time_au: float) -> None:
        """The compiled loop committed steps up to ``(p, q, acceleration)`` at ``time_au``:
        the model as the last :meth:`commit` of :meth:`stage` would leave it."""
        self._state = {"p": np.array((p,)), "q": np.array((q,)), "acceleration": np.array((a,))}
        self._time = time_au
        self._staged = None

    def _kick_impl(self, state, impulses):
        # the force mu0 E integrated over the delta: the momentum jumps by mu0 kappa_axis
        new = {key: value.copy() for key, value in state.items()}
        new["p"] = state["p"] + self.params["mu0"] * impulses[self._pick]
        return new

    def _stage_one(self, state, field):
        axis, omega2, mu0 = self._one_params
        dt = self.dt_au
        p, q, a = _verlet_step(
            state["p"].item(),
            state["q"].item(),
            state["acceleration"].item(),
            field[axis],
            omega2,
            mu0,
            dt,
        )
        p_half, _ = _half_step_ahead(p, q, a, dt)
        source = [0.0, 0.0, 0.0]
        source[axis] = p_half * mu0
        return {"p": np.array((p,)), "q": np.array((q,)), "acceleration": np.array((a,))}, source

    def _extras_impl(self, state):
        p, q = state["p"], state["q"]
        mu0 = self.params["mu0"]
        p_half, q_half = _half_step_ahead(p, q, state["acceleration"], self._extras_dt)
        dipole, dipole_m = mu0 * q_half, mu0 * q
        out = {key: np.where(self._axis == k, dipole, 0.0) for k, key in enumerate(_AXES)}
        out.update({key: np.where(self._axis == k, dipole_m, 0.0) for k, key in enumerate(_AXES_M)})
        out["energy_au"] = _energy(p_half, q_half, self._omega2)
        out["p_au"] = p.copy()
        out["q_au"] = q.copy()
        return out

    def _extras_one(self, state):
        axis, omega2, mu0 = self._one_params
        p, q = state["p"].item(), state["q"].item()
        p_half, q_half = _half_step_ahead(p, q, state["acceleration"].item(), self._extras_dt)
        dipole, dipole_m = mu0 * q_half, mu0 * q
        out = {key: dipole if k == axis else 0.0 for k, key in enumerate(_AXES)}
        out.update({key: dipole_m if k == axis else 0.0 for k, key in enumerate(_AXES_M)})
        out["energy_au"] = _energy(p_half, q_half, omega2)
        out["p_au"] = p
        out["q_au"] = q
        return out

    @property
    def _extras_dt(self) -> float:
        return self.dt_au or 0.0  # before initialize(): report the state itself
