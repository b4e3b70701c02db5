"""A 1D multimode cavity (Fabry-Perot standing waves) as an EM engine, in the dipole gauge.

The cavity has length ``L = length_au`` along one axis (the position column
``axis_position``) and ``M = n_modes`` standing-wave modes k = 1..M per polarisation axis
(``coupling_axis``, e.g. ``"z"`` or ``"xy"``; each axis has its own independent set)::

    omega_k = k pi c / L                (c = SPEED_OF_LIGHT_AU)
    f_k(x)  = sin(k pi x / L)            at each molecule's coordinate x (exactly 0
                                          at a node: k x / L an integer)
    eps_k   = eps * omega_k / omega_1    (``coupling_scaling = "frequency"``, default:
                                          MaxwellLink's FabryPerotCavity choice, and the
                                          physical one: the dipole-gauge field per unit
                                          q_k grows as omega_k)
            = eps                        (``coupling_scaling = "constant"``)

with ``eps = coupling_strength``. Writing C_ik = eps_k f_k(x_i) (the (molecules x modes)
matrix built once in :meth:`~MultimodeCavity.setup`) and mu_i the molecules' dipoles
projected on the coupling axes, the equations integrated are::

    q_k'' = -omega_k^2 q_k - sum_i C_ik mu_i - kappa_k q_k'
    E_i   = -sum_k C_ik q_k  - [include_dse] sum_k C_ik (1/omega_k^2) sum_j C_jk mu_j

(H = H_mol + sum_k p_k^2/2 + omega_k^2/2 (q_k + sum_i C_ik mu_i / omega_k^2)^2 with the
DSE; without it the mu^2 term is dropped). These reduce to the single-mode convention of
:mod:`maxwellhub.em.cavity` (MaxwellLink's SingleModeSimulation) for M = 1 and f = 1.

Integration: MaxwellLink's velocity Verlet with the field at the half step. Step n
(t_n -> t_{n+1}):

1. ``field()``: p_{n+1/2} = p_n + a_n dt/2; q_{n+1} = q_n + p_{n+1/2} dt; the field is
   evaluated from q at the half step, q_n + p_{n+1/2} dt/2, and (DSE) the dipole at the
   half step: ``dipoles_next`` of the previous step when every molecule gave it, else
   mu_{n-1} + dt (9/8 dmu_n/dt + 3/8 dmu_{n-1}/dt) (linear extrapolation of dmu/dt,
   MaxwellLink's expression). Before the first step the engine knows no dipoles: they
   count as zero (a_0 = -omega^2 q_0), as in MaxwellLink.
2. ``finish()``: the molecules' dipoles after their step (time t_{n+1}) give
   a_{n+1} = -omega^2 q_{n+1} - C^T mu_{n+1}; p_{n+1} = (p_{n+1/2} + a_{n+1} dt/2)
   exp(-kappa dt) (``damping_au`` = kappa_k, a number or M numbers; MaxwellLink's loss:
   the -kappa q' term integrated exactly as its own factor of the splitting, so an
   undriven mode's energy decays as e^{-kappa t}).

Per step: two matrix products (C^T mu and C q; two more with the DSE), O(1) Python
calls. ``record()`` gives
``qc_au`` and ``pc_au`` (M, 3), the photon energy per mode ``mode_energy_au`` (M, 3) and
``energy_au``: the cavity part of H at t_{n+1} (the mode energies including the
light-matter term, and the DSE when enabled), so that it plus the molecules' energies is
conserved when kappa = 0.

Molecules must sit inside the cavity, 0 <= x <= L (UsageError naming the molecule index
otherwise, or when x is not finite); only the ``axis_position`` column is read.

This module never touches a socket, a file, a thermostat or an external drive; it does
not move molecules (positions are read once at setup).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import UsageError
from .engine import Engine

__all__ = ["SPEED_OF_LIGHT_AU", "MultimodeCavity"]

#: The speed of light in atomic units, c = 1 / alpha: CODATA 2022 recommended value of the
#: inverse fine-structure constant, 137.035999177(21).
SPEED_OF_LIGHT_AU = 137.035999177

_AXES = {"x": 0, "y": 1, "z": 2}


def _key(name: str) -> str:
    return f"multimode.{name}"


def _positive(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{_key(name)} = {value!r}; expected a finite number > 0") from None
    if not (math.isfinite(number) and number > 0):
        raise UsageError(f"{_key(name)} = {value!r}; expected a finite number > 0")
    return number


def parse_axes(value: Any, key: str) -> np.ndarray:
    """A string of axis letters (``"z"``, ``"xy"``) as a boolean mask of length 3."""
    if not isinstance(value, str) or not value or set(value.lower()) - set(_AXES):
        raise UsageError(f"{key} = {value!r}; expected axis letters such as 'z' or 'xy'")
    mask = np.zeros(3, dtype=bool)
    for letter in value.lower():
        mask[_AXES[letter]] = True
    return mask


def _per_mode(name: str, value: Any, n_modes: int, nonnegative: bool = True) -> np.ndarray:
    """A scalar or an array of ``n_modes`` numbers, as a float array (M,)."""
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise UsageError(f"{_key(name)} = {value!r}; expected a number or {n_modes}") from None
    if array.ndim == 0:
        array = np.full(n_modes, float(array))
    if array.shape != (n_modes,):
        raise UsageError(
            f"{_key(name)} has shape {array.shape}; expected a number or {n_modes} numbers"
        )
    if not np.isfinite(array).all() or (nonnegative and (array < 0).any()):
        raise UsageError(
            f"{_key(name)} = {value!r}; expected finite numbers" + (" >= 0" if nonnegative else "")
        )
    return array


def _initial(name: str, value: Any, n_modes: int, mask: np.ndarray) -> np.ndarray:
    """Initial q or p: None (zero), (M,) applied on every coupling axis, or (M, 3)."""
    out = np.zeros((n_modes, 3))
    if value is None:
        return out
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise UsageError(f"{_key(name)} = {value!r}; expected numbers") from None
    if array.shape == (n_modes,):
        out[:, mask] = array[:, None]
    elif array.shape == (n_modes, 3):
        out[:] = array
    else:
        raise UsageError(
            f"{_key(name)} has shape {array.shape}; expected ({n_modes},) or ({n_modes}, 3)"
        )
    if not np.isfinite(out).all():
        raise UsageError(f"{_key(name)} = {value!r}; expected finite numbers")
    return out * mask


class MultimodeCavity(Engine):
    """M standing-wave modes of a 1D cavity coupled to the molecules' dipoles (see the
    module docstring for the equations, the normalisation and the integrator)."""

    name = "multimode"
    needs_dipoles = True

    def __init__(
        self,
        length_au: float,
        n_modes: int,
        coupling_strength: float,
        coupling_axis: str = "z",
        coupling_scaling: str = "frequency",
        damping_au: float | Sequence[float] = 0.0,
        include_dse: bool = False,
        axis_position: int = 0,
        qc_initial: Any = None,
        pc_initial: Any = None,
    ) -> None:
        super().__init__()
        self.length_au = _positive("length_au", length_au)
        if isinstance(n_modes, bool) or not isinstance(n_modes, (int, np.integer)) or n_modes < 1:
            raise UsageError(f"{_key('n_modes')} = {n_modes!r}; expected an integer >= 1")
        self.n_modes = int(n_modes)
        try:
            self.coupling_strength = float(coupling_strength)
        except (TypeError, ValueError):
            raise UsageError(
                f"{_key('coupling_strength')} = {coupling_strength!r}; expected a number"
            ) from None
        if not math.isfinite(self.coupling_strength):
            raise UsageError(f"{_key('coupling_strength')} = {coupling_strength!r}; not finite")
        self.axis = parse_axes(coupling_axis, _key("coupling_axis"))
        if coupling_scaling not in ("frequency", "constant"):
            raise UsageError(
                f"{_key('coupling_scaling')} = {coupling_scaling!r}; "
                "expected 'frequency' or 'constant'"
            )
        if axis_position not in (0, 1, 2) or isinstance(axis_position, bool):
            raise UsageError(f"{_key('axis_position')} = {axis_position!r}; expected 0, 1 or 2")
        self.axis_position = int(axis_position)
        self.include_dse = bool(include_dse)
        k = np.arange(1, self.n_modes + 1, dtype=np.float64)
        self.omega_k = k * math.pi * SPEED_OF_LIGHT_AU / self.length_au
        self.eps_k = self.coupling_strength * (
            self.omega_k / self.omega_k[0] if coupling_scaling == "frequency" else np.ones_like(k)
        )
        self.damping_k = _per_mode("damping_au", damping_au, self.n_modes)
        self._decay = np.ones((self.n_modes, 1))
        self._q = _initial("qc_initial", qc_initial, self.n_modes, self.axis)
        self._p = _initial("pc_initial", pc_initial, self.n_modes, self.axis)
        self._a = np.zeros((self.n_modes, 3))
        self._p_half = np.zeros((self.n_modes, 3))
        # molecule side, sized at setup
        self.coupling_matrix = np.zeros((0, self.n_modes))
        self._mu = np.zeros((0, 3))  # dipoles at t_n (after the last step)
        self._mu_prev = np.zeros((0, 3))
        self._dmu = np.zeros((0, 3))
        self._dmu_prev = np.zeros((0, 3))
        self._mu_next = np.zeros((0, 3))
        self._has_next = False

    # ------------------------------------------------------------------- engine

    def _setup(self, positions: np.ndarray, dt_au: float) -> None:
        x = positions[:, self.axis_position]
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size:
            raise UsageError(
                f"{_key('axis_position')}: molecule index {int(bad[0])} has no finite "
                f"position along axis {self.axis_position} (got {positions[bad[0]].tolist()})"
            )
        outside = np.flatnonzero((x < 0) | (x > self.length_au))
        if outside.size:
            raise UsageError(
                f"{_key('axis_position')}: molecule index {int(outside[0])} is at "
                f"x = {float(x[outside[0]])!r}, outside the cavity [0, {self.length_au!r}] "
                f"({_key('length_au')})"
            )
        k = np.arange(1, self.n_modes + 1, dtype=np.float64)
        # (M_mol, M_modes): C_ik = eps_k sin(k pi x_i / L); exactly 0 at a node (k x / L
        # an integer in floating point), where sin(pi r) would leave a 1e-16 remainder
        ratio = np.outer(x, k) / self.length_au
        self.mode_functions = np.where(ratio == np.rint(ratio), 0.0, np.sin(math.pi * ratio))
        self.coupling_matrix = self.mode_functions * self.eps_k[None, :]
        self._dse_matrix = self.coupling_matrix / (self.omega_k**2)[None, :]
        self._decay = np.exp(-self.damping_k * dt_au)[:, None]
        n = len(positions)
        self._mu, self._mu_prev = np.zeros((n, 3)), np.zeros((n, 3))
        self._dmu, self._dmu_prev = np.zeros((n, 3)), np.zeros((n, 3))
        self._mu_next = np.zeros((n, 3))
        self._has_next = False
        self._a = self._acceleration(self._q, self._mu)

    def _acceleration(self, q: np.ndarray, mu: np.ndarray) -> np.ndarray:
        """-omega^2 q - C^T mu on the coupling axes, (M_modes, 3)."""
        return (-(self.omega_k**2)[:, None] * q - self.coupling_matrix.T @ mu) * self.axis

    def _field(self) -> np.ndarray:
        dt = self.dt_au
        self._p_half = self._p + 0.5 * dt * self._a
        q_mid = self._q + 0.5 * dt * self._p_half
        field = -(self.coupling_matrix @ q_mid)
        if self.include_dse:
            if self._has_next:
                mu_mid = self._mu_next
            else:
                mu_mid = self._mu_prev + dt * (1.125 * self._dmu + 0.375 * self._dmu_prev)
            field -= self._dse_matrix @ (self.coupling_matrix.T @ (mu_mid * self.axis))
        return field * self.axis

    def _finish(
        self, sources: np.ndarray, dipoles: np.ndarray | None, dipoles_next: np.ndarray | None
    ) -> None:
        assert dipoles is not None  # needs_dipoles: Engine.finish checked it
        dt = self.dt_au
        self._mu_prev, self._mu = self._mu, np.array(dipoles, dtype=np.float64) * self.axis
        self._dmu_prev, self._dmu = self._dmu, np.array(sources, dtype=np.float64) * self.axis
        self._has_next = dipoles_next is not None
        if dipoles_next is not None:
            self._mu_next = np.array(dipoles_next, dtype=np.float64) * self.axis
        self._q = self._q + dt * self._p_half
        self._a = self._acceleration(self._q, self._mu)
        self._p = (self._p_half + 0.5 * dt * self._a) * self._decay

    # ------------------------------------------------------------ state, records

    def state(self) -> dict[str, np.ndarray]:
        """q, p, the acceleration and the dipole history of the DSE extrapolation."""
        out = super().state()
        out.update(
            qc=self._q.copy(),
            pc=self._p.copy(),
            acceleration=self._a.copy(),
            mu=self._mu.copy(),
            mu_prev=self._mu_prev.copy(),
            dmu=self._dmu.copy(),
            dmu_prev=self._dmu_prev.copy(),
            mu_next=self._mu_next.copy(),
            has_next=np.array(self._has_next, dtype=np.int64),
        )
        return out

    def restore(self, state: Mapping[str, Any]) -> None:
        """Back to the arrays of :meth:`state` (bitwise)."""
        shapes = dict.fromkeys(("qc", "pc", "acceleration"), (self.n_modes, 3))
        shapes.update(
            dict.fromkeys(("mu", "mu_prev", "dmu", "dmu_prev", "mu_next"), (self.n_molecules, 3))
        )
        for key, shape in shapes.items():
            if np.shape(state[key]) != shape:
                raise UsageError(
                    f"multimode state {key!r} has shape {np.shape(state[key])}; expected {shape}"
                )
        self._q = np.array(state["qc"], dtype=np.float64)
        self._p = np.array(state["pc"], dtype=np.float64)
        self._a = np.array(state["acceleration"], dtype=np.float64)
        self._mu = np.array(state["mu"], dtype=np.float64)
        self._mu_prev = np.array(state["mu_prev"], dtype=np.float64)
        self._dmu = np.array(state["dmu"], dtype=np.float64)
        self._dmu_prev = np.array(state["dmu_prev"], dtype=np.float64)
        self._mu_next = np.array(state["mu_next"], dtype=np.float64)
        self._has_next = bool(int(state["has_next"]))
        super().restore(state)

    def mode_energies(self) -> np.ndarray:
        """p^2/2 + omega^2 q^2/2 per mode and axis, (M_modes, 3), at the time reached."""
        return 0.5 * self._p**2 + 0.5 * (self.omega_k**2)[:, None] * self._q**2

    def energy(self) -> float:
        """The cavity part of H at the time reached: modes, light-matter term, DSE."""
        drive = self.coupling_matrix.T @ self._mu  # sum_i C_ik mu_i, (M_modes, 3)
        total = self.mode_energies().sum() + float((self._q * drive).sum())
        if self.include_dse:
            total += 0.5 * float(((drive**2) / (self.omega_k**2)[:, None]).sum())
        return total

    def record(self) -> dict[str, Any]:
        """``qc_au``, ``pc_au``, ``mode_energy_au`` (M, 3) and ``energy_au``."""
        return {
            "qc_au": self._q.copy(),
            "pc_au": self._p.copy(),
            "mode_energy_au": self.mode_energies(),
            "energy_au": self.energy(),
        }
