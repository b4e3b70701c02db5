"""Two-level system (TLS) model: a 2x2 density matrix driven by the field along one axis.

Conventions are MaxwellLink's TLS driver (same parameter names and defaults), so the same
field sequence gives the same sources to round-off:

- H0 = diag(0, omega); dipole operator mu12 * sigma_x along axis ``orientation``;
  H(t) = H0 - E_axis(t) mu12 sigma_x.
- Initial pure state C = [sqrt(1 - pe), sqrt(pe) exp(i phase)], rho = C C^dagger.
- One step with the field E held constant: the symmetric split
  U = exp(-i H0 dt/2) exp(+i dt E mu12 sigma_x) exp(-i H0 dt/2), rho <- U rho U^dagger.
  Every factor is closed-form (phases, and cos/sin for sigma_x) and the product is applied
  analytically: the H0 halves turn rho_01, the sigma_x factor rotates the Bloch components
  (rho_00 - rho_11, 2 Im rho_01) by 2 dt E mu12. rho stays exactly Hermitian, keeps its
  trace and stays positive to round-off; at E = 0 the populations do not drift.
- Source: dmu/dt = -2 omega mu12 Im(rho_01) on the axis; dipole 2 mu12 Re(rho_01);
  energy Tr(H0 rho); Pe = rho_11, Pg = rho_00.

Never uses a general matrix exponential (no scipy).
"""

from __future__ import annotations

import numpy as np

from .base import Model, Parameter

__all__ = ["TLSModel"]

_AXES = ("mux_au", "muy_au", "muz_au")


class TLSModel(Model):
    """Two-level systems (n of them), propagated by the exact symmetric split."""

    name = "tls"
    parameters = {
        "omega": Parameter(0.24188843, "transition frequency (a.u.)",
                           valid=lambda a: a > 0, allowed="a finite number > 0"),
        "mu12": Parameter(187.0819866, "transition dipole moment (a.u.)"),
        "orientation": Parameter(2, "dipole axis: 0 (x), 1 (y) or 2 (z)", kind=int,
                                 valid=lambda a: (a >= 0) & (a <= 2),
                                 allowed="0 (x), 1 (y) or 2 (z)"),
        "pe_initial": Parameter(0.0, "initial excited-state population",
                                valid=lambda a: (a >= 0) & (a <= 1),
                                allowed="a number in [0, 1]"),
        "e_phase_initial": Parameter(0.0, "initial phase of the excited amplitude (rad)"),
    }
    extras_keys = ("energy_au", "mux_au", "muy_au", "muz_au", "Pe", "Pg", "Pge_real",
                   "Pge_imag")

    def __init__(self, n: int = 1, **params) -> None:
        super().__init__(n, **params)
        self._rows = np.arange(self.n)
        self._axis = self.params["orientation"]
        self._turn_cos = np.ones(self.n)
        self._turn_sin = np.zeros(self.n)

    def _initial_state(self):
        pe = self.params["pe_initial"]
        phase = self.params["e_phase_initial"]
        # rho = C C^dagger with C = [sqrt(1 - pe), sqrt(pe) exp(i phase)]
        amplitude = (1.0 - pe) ** 0.5 * pe**0.5
        rho = np.zeros((self.n, 2, 2), dtype=np.complex128)
        re, im = rho.real, rho.imag
        re[:, 0, 0] = 1.0 - pe
        re[:, 1, 1] = pe
        re[:, 0, 1] = re[:, 1, 0] = amplitude * np.cos(phase)
        im[:, 0, 1] = -amplitude * np.sin(phase)
        im[:, 1, 0] = -im[:, 0, 1]
        return {"rho": rho}

    def _prepare(self, dt_au: float) -> None:
        # exp(-i H0 dt/2) = diag(1, exp(-i omega dt/2)) turns rho_01 by exp(+i omega dt/2).
        half = 0.5 * dt_au * self.params["omega"]
        self._turn_cos, self._turn_sin = np.cos(half), np.sin(half)

    def _stage_impl(self, state, fields):
        # U rho U^dagger in closed form on the Bloch components of rho: each H0 half step
        # turns rho_01 by exp(+i omega dt/2), and exp(+i theta sigma_x) rotates the
        # inversion z = rho_00 - rho_11 against y = 2 Im(rho_01) by the angle 2 theta.
        # Hermiticity holds by construction and the trace is carried over unchanged.
        # Only real arithmetic: numpy's complex multiply can differ by an ulp depending on
        # memory alignment (SIMD path), which would make re-staging not bit-reproducible.
        rho = state["rho"]
        re, im = rho.real, rho.imag
        theta = self.dt_au * (fields[self._rows, self._axis] * self.params["mu12"])
        cos2, sin2 = np.cos(2.0 * theta), np.sin(2.0 * theta)
        tc, ts = self._turn_cos, self._turn_sin
        trace = re[:, 0, 0] + re[:, 1, 1]
        z = re[:, 0, 0] - re[:, 1, 1]
        x0, y0 = re[:, 0, 1], im[:, 0, 1]
        x = x0 * tc - y0 * ts  # first half turn
        y = 2.0 * (x0 * ts + y0 * tc)
        z, y = cos2 * z + sin2 * y, cos2 * y - sin2 * z
        half_y = 0.5 * y
        x, y = x * tc - half_y * ts, x * ts + half_y * tc  # second half turn: rho_01
        new_rho = np.empty_like(rho)
        new_re, new_im = new_rho.real, new_rho.imag
        new_re[:, 0, 0] = 0.5 * (trace + z)
        new_re[:, 1, 1] = 0.5 * (trace - z)
        new_im[:, 0, 0] = new_im[:, 1, 1] = 0.0
        new_re[:, 0, 1] = new_re[:, 1, 0] = x
        new_im[:, 0, 1] = y
        new_im[:, 1, 0] = -y
        sources = np.zeros((self.n, 3))
        omega, mu12 = self.params["omega"], self.params["mu12"]
        sources[self._rows, self._axis] = -2.0 * omega * y * mu12
        return {"rho": new_rho}, sources

    def _extras_impl(self, state):
        rho = state["rho"]
        dipole = self.params["mu12"] * 2.0 * rho[:, 0, 1].real
        out = {key: np.where(self._axis == k, dipole, 0.0) for k, key in enumerate(_AXES)}
        out["energy_au"] = self.params["omega"] * rho[:, 1, 1].real
        out["Pe"] = rho[:, 1, 1].real.copy()
        out["Pg"] = rho[:, 0, 0].real.copy()
        out["Pge_real"] = rho[:, 0, 1].real.copy()
        out["Pge_imag"] = rho[:, 0, 1].imag.copy()
        return out
