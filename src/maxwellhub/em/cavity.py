"""A single cavity mode (a classical harmonic oscillator) coupled to all molecules.

Atomic units throughout. Parameter names and defaults are MaxwellLink 0.5.0's
``SingleModeSimulation``; the dipole-gauge step is its algorithm, operation for operation.
``eps`` is ``coupling_strength``, ``omega`` ``frequency_au``, ``kappa`` ``damping_au``,
``D(t)`` the drive, ``M = sum_i mu_i`` the summed (rescaled) molecular dipole and
``J = sum_i dmu_i/dt`` the summed source, each restricted to the coupled axes
(``coupling_axis``); every axis is an independent copy of the mode.

Dipole gauge (``gauge="dipole"``)
---------------------------------
H = H_mol + p^2/2 + (omega^2/2) (q + (eps/omega^2) M)^2 (the last term's M^2 part is the
dipole self-energy, DSE; without ``include_dse`` it is dropped), so

    q'' = -omega^2 q - eps M - kappa q' + D(t),
    E   = -eps q - (eps^2/omega^2) M            (second term only with include_dse).

Step n (t_n -> t_{n+1}), with a_n the acceleration kept from the previous step:

1. half kick p_{n+1/2} = p_n + (dt/2) a_n; drift q_{n+1} = q_n + dt p_{n+1/2};
2. field E at t_{n+1/2}: q_{n+1/2} = q_n + (dt/2) p_{n+1/2} and the DSE dipole estimate
   of M(t_{n+1/2}) = M_{n-1} + dt (9/8 J_n + 3/8 J_{n-1}) (the integral of J from t_{n-1}
   over 1.5 dt with J linear; M_{n-1}, J_{n-1}, J_n as reported after the steps ending
   there), or, with include_dse, the next-force-time dipole (``2 mu - mu_m``) of the last
   step when the molecules report one that differs from their dipole (sho does); with
   ``excite_mol`` plus D(t_n) on the coupled axes;
3. the molecules step under E and report J and M (at t_{n+1} for tls and sho);
4. a_{n+1} = -omega^2 q_{n+1} - eps M + D(t_n) (D only with ``excite_ph``; note t_n:
   MaxwellLink's drive enters the force one step late, kept for reproduction);
   p_{n+1} = (p_{n+1/2} + (dt/2) a_{n+1}) exp(-kappa dt);
5. Langevin thermostat (``langevin_tau_au``): p <- p exp(-dt/tau) + N(0, S) with
   S = sqrt(T (1 - exp(-2 dt/tau))), three draws per step (one per axis).

Second order in dt for the mode (velocity Verlet); the damping is a first-order split.

Velocity gauge (``gauge="velocity"``)
-------------------------------------
H = H_mol + (P - (eps/omega) M)^2/2 + omega^2 q^2/2, P canonical, so with c = eps/omega,
v = q' = P - c M:

    q' = P - c M(t),  P' = -omega^2 q + D(t),  i.e.  q'' = -omega^2 q - c J - kappa q' + D,
    E  = c q' = c (P - c M).

(It is the dipole gauge with DSE under the canonical map (q, P) -> (-P/omega, omega q),
so it has exactly the DSE normal modes.) Step n, state (q_n, P_n) at t_n and M_n, J_n,
J_{n-1}:

1. half kick P_{n+1/2} = P_n + (dt/2) (-omega^2 q_n + D(t_n));
2. field at t_{n+1/2}: E = c (P_{n+1/2} - c M_{n+1/2}) with M_{n+1/2} the next-force-time
   dipole of the last step when reported, else the Taylor estimate
   M_n + dt (5/8 J_n - 1/8 J_{n-1}) (error O(dt^3));
3. the molecules step, reporting M_{n+1}, J_{n+1} (at t_{n+1});
4. drift q_{n+1} = q_n + dt P_{n+1/2} - c I, with I the integral of M over the step by the
   end-corrected trapezoid dt (M_n + M_{n+1})/2 + dt^2 (J_n - J_{n+1})/12 (O(dt^5));
5. half kick P_{n+1} = P_{n+1/2} + (dt/2) (-omega^2 q_{n+1} + D(t_{n+1}));
6. damping and thermostat act on the velocity v = P - c M_{n+1}: v <- v exp(-kappa dt),
   then the same Langevin kick as in the dipole gauge.

For a given M(t) the kick and the drift are exact flows, so the mode's map is symplectic
(Stormer-Verlet), second order; the coupled run is second order overall.

Records (after step n, labelled t_{n+1}): ``qc_au`` and ``pc_au`` (3,) at t_{n+1} (pc the
canonical momentum: p = q' in the dipole gauge, P in the velocity gauge); ``efield_au``
(3,) the field handed to the molecules this step (at t_{n+1/2}); ``drive_au`` D(t_{n+1})
(what MaxwellLink records); ``energy_au`` the cavity part of H at t_{n+1} on the coupled
axes, with the M reported this step: dipole gauge p^2/2 + omega^2 q^2/2 + eps q M
(+ (eps M/omega)^2/2 with DSE), velocity gauge (P - c M)^2/2 + omega^2 q^2/2 (coupling
and the A^2 term included). Add the molecules' ``energy_au`` for the total.

Where we differ from MaxwellLink 0.5.0
--------------------------------------
=====================================  ===================================================
MaxwellLink 0.5.0                      here
=====================================  ===================================================
``_step_velocity_gauge`` is ``pass``:  the scheme above, checked against the analytic
the velocity-gauge state never moves   normal modes (N TLS Rabi splitting, N SHO)
``molecule_half_step`` (legacy)        refused (UsageError)
Langevin kick also on uncoupled axes   same draws (the random stream matches), but
(their q, p random-walk, unused)       uncoupled axes stay 0
``random_seed=None``: documented as    the same (fresh OS entropy); the generator state
"a default seed", is OS entropy        is in ``state()``, so a restart continues it
``coupling_axis`` any string; one      only letters x, y, z (at least one); errors are
with no x/y/z raises ValueError        UsageError naming the key
``include_dse`` with velocity gauge    refused: the A^2 term is always in that
silently meaningless                   Hamiltonian
``initializer`` other than             refused
maxwell_boltzmann silently ignored
=====================================  ===================================================

Kept as MaxwellLink does them (a faithful reproduction): the acceleration starts at 0
(the first half kick ignores the initial force), and the drive in the force of step n is
D(t_n), not D(t_{n+1}).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..errors import UsageError
from .engine import Engine

__all__ = ["SingleModeCavity"]

_MASK64 = (1 << 64) - 1


def _finite(key: str, value: Any, *, positive: bool = False, nonneg: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    number = float(value) if ok else math.nan
    if positive:
        ok, allowed = ok and math.isfinite(number) and number > 0, "a finite number > 0"
    elif nonneg:
        ok, allowed = ok and math.isfinite(number) and number >= 0, "a finite number >= 0"
    else:
        ok, allowed = ok and math.isfinite(number), "a finite number"
    if not ok:
        raise UsageError(f"cavity.{key} = {value!r}: expected {allowed}")
    return number


def _vector(key: str, value: Any) -> np.ndarray:
    if value is None:
        return np.zeros(3)
    try:
        vec = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        vec = np.full(1, np.nan)
    if vec.shape != (3,) or not np.isfinite(vec).all():
        raise UsageError(f"cavity.{key} = {value!r}: expected 3 finite numbers (x, y, z)")
    return vec


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise UsageError(f"cavity.{key} = {value!r}: expected true or false")
    return bool(value)


def _drive(value: Any) -> Callable[[float], float] | None:
    if value is None or callable(value):
        return value
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and math.isfinite(float(value))):
        raise UsageError(
            f"cavity.drive = {value!r}: expected None, a finite number or a function of "
            "the time t_au returning a number"
        )
    const = float(value)
    return lambda _t: const


def _pcg_to_array(rng: np.random.Generator) -> np.ndarray:
    st = rng.bit_generator.state
    if st["bit_generator"] != "PCG64":  # pragma: no cover - we only ever make PCG64
        raise UsageError(f"cavity: cannot save a {st['bit_generator']} generator")
    s, inc = st["state"]["state"], st["state"]["inc"]
    words = (s >> 64, s & _MASK64, inc >> 64, inc & _MASK64, st["has_uint32"], st["uinteger"])
    return np.array(words, dtype=np.uint64)


def _pcg_from_array(words: Any) -> np.random.Generator:
    w = [int(x) for x in np.asarray(words, dtype=np.uint64)]
    bit = np.random.PCG64()
    bit.state = {
        "bit_generator": "PCG64",
        "state": {"state": (w[0] << 64) | w[1], "inc": (w[2] << 64) | w[3]},
        "has_uint32": w[4],
        "uinteger": w[5],
    }
    return np.random.Generator(bit)


class SingleModeCavity(Engine):
    """One damped, driven cavity mode per coupled axis (see the module docstring)."""

    name = "cavity"
    needs_dipoles = True

    def __init__(
        self,
        *,
        frequency_au: float,
        damping_au: float,
        coupling_strength: float = 1.0,
        coupling_axis: str = "xy",
        drive: float | Callable[[float], float] | None = None,
        qc_initial: Any = None,
        pc_initial: Any = None,
        mu_initial: Any = None,
        dmudt_initial: Any = None,
        temperature_au: float = 0.0,
        langevin_tau_au: float | None = None,
        initializer: str | None = None,
        random_seed: int | None = None,
        include_dse: bool = False,
        molecule_half_step: bool = False,
        shift_dipole_baseline: bool = False,
        gauge: str = "dipole",
        excite_ph: bool = True,
        excite_mol: bool = False,
    ) -> None:
        super().__init__()
        self.frequency = _finite("frequency_au", frequency_au, positive=True)
        self.damping = _finite("damping_au", damping_au, nonneg=True)
        self.eps = _finite("coupling_strength", coupling_strength)
        axis = coupling_axis.lower() if isinstance(coupling_axis, str) else ""
        if not axis or set(axis) - set("xyz"):
            raise UsageError(
                f"cavity.coupling_axis = {coupling_axis!r}: expected letters of 'xyz' "
                "(at least one), e.g. 'x' or 'xy'"
            )
        self.axis = np.array([c in axis for c in "xyz"], dtype=np.float64)
        self.drive = _drive(drive)
        qc, pc = _vector("qc_initial", qc_initial), _vector("pc_initial", pc_initial)
        mu, dmudt = _vector("mu_initial", mu_initial), _vector("dmudt_initial", dmudt_initial)
        self.temperature = _finite("temperature_au", temperature_au, nonneg=True)
        self.langevin_tau = (
            None
            if langevin_tau_au is None
            else _finite("langevin_tau_au", langevin_tau_au, positive=True)
        )
        if initializer is not None and (
            not isinstance(initializer, str) or initializer.lower() != "maxwell_boltzmann"
        ):
            raise UsageError(
                f"cavity.initializer = {initializer!r}: expected None or 'maxwell_boltzmann'"
            )
        self.initializer = None if initializer is None else "maxwell_boltzmann"
        if random_seed is not None and (
            not isinstance(random_seed, numbers.Integral)
            or isinstance(random_seed, bool)
            or random_seed < 0
        ):
            raise UsageError(f"cavity.random_seed = {random_seed!r}: expected None or an int >= 0")
        self.include_dse = _flag("include_dse", include_dse)
        if _flag("molecule_half_step", molecule_half_step):
            raise UsageError(
                "cavity.molecule_half_step = True: not supported (a legacy MaxwellLink "
                "setting); models that step by velocity Verlet report the next-force-time "
                "dipole (mu*_m_au) instead"
            )
        self.shift_dipole_baseline = _flag("shift_dipole_baseline", shift_dipole_baseline)
        gauge_name = gauge.lower() if isinstance(gauge, str) else gauge
        if gauge_name not in ("dipole", "velocity"):
            raise UsageError(f"cavity.gauge = {gauge!r}: expected 'dipole' or 'velocity'")
        self.gauge = gauge_name
        if self.gauge == "velocity" and self.include_dse:
            raise UsageError(
                "cavity.include_dse = True: not with gauge='velocity' (its Hamiltonian "
                "always holds the (eps/omega)^2 M^2/2 term); leave it False"
            )
        self.excite_ph = _flag("excite_ph", excite_ph)
        self.excite_mol = _flag("excite_mol", excite_mol)

        # MaxwellLink's generator: default_rng(seed) is PCG64; the initializer draws q then p
        self._rng = np.random.default_rng(random_seed)
        if self.temperature > 0.0 and self.initializer == "maxwell_boltzmann":
            root_t = np.sqrt(self.temperature)
            qc = self._rng.normal(scale=root_t / self.frequency, size=3)
            pc = self._rng.normal(scale=root_t, size=(3,))
        self.qc = qc * self.axis
        self.pc = pc * self.axis
        self.dipole = mu * self.axis
        self.baseline = self.dipole.copy() if self.shift_dipole_baseline else np.zeros(3)
        self.dipole = self.dipole - self.baseline
        self.dipole_prev = self.dipole.copy()
        self.dmudt = dmudt * self.axis
        self.dmudt_prev = self.dmudt.copy()
        self.dipole_next = self.dipole.copy()
        self.has_dipole_next = False
        self.acceleration = np.zeros(3)
        self.efield = np.zeros(3)
        self._pc_half = np.zeros(3)
        self._ones = np.ones(0)

    # ------------------------------------------------------------------ helpers

    def _drive_at(self, time_au: float) -> float:
        return 0.0 if self.drive is None else float(self.drive(time_au))

    def _sum(self, rows: np.ndarray) -> np.ndarray:
        # one BLAS call: the fastest sum over 10^6 rows
        return self._ones @ np.asarray(rows, dtype=np.float64)

    def _thermostat(self, momentum: np.ndarray) -> np.ndarray:
        if self.langevin_tau is None:
            return momentum
        t_l = np.exp(-self.dt_au / self.langevin_tau)
        s_l = np.sqrt(self.temperature * (1.0 - t_l**2))
        kick = self._rng.normal(0, s_l, size=momentum.shape)
        return (momentum * t_l + kick) * self.axis

    # ------------------------------------------------------------- the engine calls

    def _setup(self, positions: np.ndarray, dt_au: float) -> None:
        self._ones = np.ones(len(positions))

    def _field(self) -> np.ndarray:
        dt, t_n = self.dt_au, self.time_au
        if self.gauge == "dipole":
            pc_half = self.pc + 0.5 * dt * self.acceleration
            qc_prev = self.qc.copy()
            self.qc = self.qc + dt * pc_half
            if self.include_dse and self.has_dipole_next:
                dipole = self.dipole_next.copy()
            else:
                dipole = self.dipole_prev + dt * (
                    9.0 / 8.0 * self.dmudt + 3.0 / 8.0 * self.dmudt_prev
                )
            efield = -self.eps * (qc_prev + 0.5 * dt * pc_half)
            if self.include_dse:
                efield -= self.eps**2 / self.frequency**2 * dipole
            efield *= self.axis
        else:
            force = -(self.frequency**2) * self.qc
            if self.excite_ph:
                force = force + self._drive_at(t_n)
            pc_half = self.pc + 0.5 * dt * force * self.axis
            if self.has_dipole_next:
                dipole = self.dipole_next.copy()
            else:
                dipole = self.dipole + dt * (5.0 / 8.0 * self.dmudt - 1.0 / 8.0 * self.dmudt_prev)
            c = self.eps / self.frequency
            efield = c * (pc_half - c * dipole) * self.axis
        self._pc_half = pc_half
        if self.excite_mol:
            efield = efield + self._drive_at(t_n) * self.axis
        self.efield = efield
        return efield.copy()

    def _finish(
        self, sources: np.ndarray, dipoles: np.ndarray | None, dipoles_next: np.ndarray | None
    ) -> None:
        assert dipoles is not None  # needs_dipoles
        dt, t_n = self.dt_au, self.time_au
        dipole = (self._sum(dipoles) - self.baseline) * self.axis
        dmudt = self._sum(sources) * self.axis
        if dipoles_next is not None:
            self.dipole_next = (self._sum(dipoles_next) - self.baseline) * self.axis
            self.has_dipole_next = bool(np.any(np.asarray(dipoles_next) != dipoles))
        else:
            self.dipole_next, self.has_dipole_next = np.zeros(3), False
        if self.gauge == "dipole":
            self.dipole_prev, self.dmudt_prev = self.dipole, self.dmudt
            self.dipole, self.dmudt = dipole, dmudt
            drive = self._drive_at(t_n) if self.excite_ph else 0.0
            acceleration = (drive - self.eps * dipole - self.frequency**2 * self.qc) * self.axis
            pc = self._pc_half + 0.5 * dt * acceleration
            pc *= np.exp(-self.damping * dt)
            self.pc = self._thermostat(pc)
            self.acceleration = acceleration
            return
        c = self.eps / self.frequency
        integral = 0.5 * dt * (self.dipole + dipole) + dt**2 / 12.0 * (self.dmudt - dmudt)
        self.qc = self.qc + (dt * self._pc_half - c * integral) * self.axis
        force = -(self.frequency**2) * self.qc
        if self.excite_ph:
            force = force + self._drive_at(t_n + dt)
        pc = self._pc_half + 0.5 * dt * force * self.axis
        velocity = (pc - c * dipole) * np.exp(-self.damping * dt)
        velocity = self._thermostat(velocity)
        self.pc = (velocity + c * dipole) * self.axis
        self.dipole_prev, self.dmudt_prev = self.dipole, self.dmudt
        self.dipole, self.dmudt = dipole, dmudt

    # ---------------------------------------------------------------- state, records

    _STATE = (
        "qc",
        "pc",
        "acceleration",
        "dipole",
        "dipole_prev",
        "dmudt",
        "dmudt_prev",
        "dipole_next",
        "efield",
    )

    def state(self) -> dict[str, np.ndarray]:
        """The mode, the dipole history, the flags and the generator's state."""
        out = super().state()
        for key in self._STATE:
            out[key] = np.array(getattr(self, key), dtype=np.float64)
        out["has_dipole_next"] = np.array(self.has_dipole_next, dtype=np.int64)
        out["rng_pcg64"] = _pcg_to_array(self._rng)
        return out

    def restore(self, state: Mapping[str, Any]) -> None:
        """Back to the arrays of :meth:`state` (after :meth:`setup`)."""
        for key in self._STATE:
            value = np.array(state[key], dtype=np.float64)
            if value.shape != (3,):
                raise UsageError(f"cavity state {key!r}: expected shape (3,), got {value.shape}")
            setattr(self, key, value)
        self.has_dipole_next = bool(int(state["has_dipole_next"]))
        self._rng = _pcg_from_array(state["rng_pcg64"])
        super().restore(state)

    def record(self) -> dict[str, Any]:
        """qc_au, pc_au, efield_au (3,), energy_au, drive_au (module docstring)."""
        qc, pc, mu, w = self.qc, self.pc, self.dipole, self.frequency
        if self.gauge == "dipole":
            energy = 0.5 * pc**2 + 0.5 * w**2 * qc**2 + qc * self.eps * mu
            if self.include_dse:
                energy = energy + 0.5 * (self.eps * mu / w) ** 2
        else:
            velocity = pc - self.eps / w * mu
            energy = 0.5 * velocity**2 + 0.5 * w**2 * qc**2
        return {
            "qc_au": qc.copy(),
            "pc_au": pc.copy(),
            "efield_au": self.efield.copy(),
            "energy_au": float(np.sum(energy * self.axis)),
            "drive_au": self._drive_at(self.time_au),
        }
