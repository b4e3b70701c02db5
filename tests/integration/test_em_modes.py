"""The laser and multimode-cavity engines against analytic results, with the real models.

The lead's EngineCoupling is not written yet, so :func:`_run_embedded` is a minimal
stepping loop with the contract of :mod:`maxwellhub.em.engine`: field -> model.step ->
the model's dipoles -> finish. Each physics test prints its error against the analytic
value (run with ``-s`` to see them).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.optimize import curve_fit

from maxwellhub.em.engine import Engine
from maxwellhub.em.laser import LaserField, load_field_table
from maxwellhub.em.multimode import SPEED_OF_LIGHT_AU, MultimodeCavity
from maxwellhub.errors import UsageError
from maxwellhub.models import create_model
from maxwellhub.pulses import ContinuousWave, GaussianPulse, envelope_area, scaled_to_area

_DIPOLES = ("mux_au", "muy_au", "muz_au")
_DIPOLES_M = ("mux_m_au", "muy_m_au", "muz_m_au")


def _run_embedded(engine: Engine, model, steps: int, keys=("Pe",)) -> dict[str, np.ndarray]:
    """Step ``engine`` and ``model`` together ``steps`` times; per step, the model's
    extras ``keys`` (n,), the engine's records (as ``em_<name>``) and the field of
    molecule 0, stacked in time."""
    out: dict[str, list] = {}
    n = model.n
    for _ in range(steps):
        field = engine.field()
        if field.shape != (n, 3):
            field = np.tile(field, (n, 1))
        sources = model.step(field)
        extras = model.extras()
        dipoles = nxt = None
        if engine.needs_dipoles:
            dipoles = np.stack([extras[k] for k in _DIPOLES], axis=1)
            if all(k in extras for k in _DIPOLES_M):
                nxt = 2.0 * dipoles - np.stack([extras[k] for k in _DIPOLES_M], axis=1)
        engine.finish(sources, dipoles, nxt)
        for key in keys:
            out.setdefault(key, []).append(np.array(extras[key]))
        for key, value in engine.record().items():
            out.setdefault(f"em_{key}", []).append(np.array(value))
        out.setdefault("field", []).append(np.array(field[0]))
    return {key: np.array(values) for key, values in out.items()}


def _tls(**params):
    return create_model("tls", n=1, orientation=2, **{"pe_initial": 0.0, **params})


def _start(engine: Engine, model, dt: float, positions=None) -> None:
    if positions is None:
        positions = np.full((model.n, 3), np.nan)
    engine.setup(np.asarray(positions, dtype=float), dt)
    model.initialize(dt_au=dt, molecule_ids=np.arange(model.n))


# --------------------------------------------------------------------------- laser


def _rabi_fit(laser_pulse, omega: float, mu12: float, dt: float, steps: int):
    model = _tls(omega=omega, mu12=mu12)
    engine = LaserField(pulse=laser_pulse)
    _start(engine, model, dt)
    pe = _run_embedded(engine, model, steps)["Pe"][:, 0]
    t = dt * np.arange(1, steps + 1)
    (fitted,), _ = curve_fit(lambda t, w: np.sin(w * t / 2) ** 2, t, pe, p0=[mu12 * 0.01])
    return t, pe, float(fitted)


def test_laser_cw_rabi_frequency() -> None:
    """A resonant CW laser drives Rabi flopping Pe = sin^2(Omega t/2), Omega = mu12 E0 (1%)."""
    omega, mu12, e0, dt = 0.25, 1.0, 0.01, 0.1  # Omega / omega = 0.04
    rabi = mu12 * e0
    steps = round(2 * 2 * math.pi / rabi / dt)  # two Rabi periods
    cw = ContinuousWave(e0=e0, omega=omega)
    t, pe, fitted = _rabi_fit(cw, omega, mu12, dt, steps)
    error = fitted / rabi - 1
    curve = np.abs(pe - np.sin(rabi * t / 2) ** 2).max()
    print(
        f"\nCW Rabi: Omega/omega = {rabi / omega:.3f}; fitted Omega rel. error {error:.2e}; "
        f"max |Pe - sin^2(Omega t/2)| {curve:.2e} (the counter-rotating terms)"
    )
    assert abs(error) < 0.01
    assert pe.max() > 0.98


def test_laser_midpoint_sampling_is_second_order() -> None:
    """The field at t_n + dt/2 gives Pe errors O(dt^2); sampling at t_n would be O(dt)."""
    omega, mu12, e0, fine, span = 0.25, 1.0, 0.01, 0.025, 150.0
    cw = ContinuousWave(e0=e0, omega=omega)

    def pe(dt: float, delay: float) -> np.ndarray:
        model = _tls(omega=omega, mu12=mu12)
        engine = LaserField(pulse=lambda t: cw(t - delay))
        _start(engine, model, dt)
        return _run_embedded(engine, model, round(span / dt))["Pe"][:, 0]

    reference = pe(fine, 0.0)
    errors = {}
    for dt in (0.1, 0.2):
        every = round(dt / fine)
        exact = reference[every - 1 :: every]
        # delay dt/2: the engine's midpoint sample is then the field at t_n
        errors[dt] = (np.abs(pe(dt, 0.0) - exact).max(), np.abs(pe(dt, dt / 2) - exact).max())
    table = ", ".join(f"dt {dt}: {mid:.2e}, {start:.2e}" for dt, (mid, start) in errors.items())
    print(f"\nmax |Pe - Pe(dt={fine})| (field at t_n + dt/2, at t_n): {table}")
    mid_ratio = errors[0.2][0] / errors[0.1][0]
    start_ratio = errors[0.2][1] / errors[0.1][1]
    assert 3.5 < mid_ratio < 4.5  # second order
    assert 1.8 < start_ratio < 2.2  # first order
    assert errors[0.2][0] < 0.02 * errors[0.2][1]


def test_laser_gaussian_pi_pulse_inverts() -> None:
    """A Gaussian pulse of area mu12 * envelope_area = pi inverts the TLS (Pe > 0.99)."""
    omega, mu12, dt = 0.25, 2.0, 0.2
    pulse = scaled_to_area(
        GaussianPulse(e0=1.0, omega=omega, t0=800.0, sigma=150.0), math.pi / mu12
    )
    assert mu12 * envelope_area(pulse) == pytest.approx(math.pi, rel=1e-12)
    model = _tls(omega=omega, mu12=mu12)
    engine = LaserField(pulse=pulse)
    _start(engine, model, dt)
    pe = _run_embedded(engine, model, 8000)["Pe"][:, 0]
    print(f"\npi pulse: Omega0/omega = {mu12 * pulse.e0 / omega:.3f}; final Pe = {pe[-1]:.6f}")
    assert pe[-1] > 0.99


def test_laser_plane_wave_delay() -> None:
    """Two molecules displaced by d along k_hat see the same field shifted by d/c."""
    dt, shift = 0.1, 25
    d = shift * dt * SPEED_OF_LIGHT_AU
    k_hat = np.array([1.0, 2.0, -2.0]) / 3.0
    perpendicular = np.array([2.0, 1.0, 2.0]) * 7.0  # k_hat . perpendicular = 0
    positions = np.array([[0.0, 0.0, 0.0], d * k_hat + perpendicular])
    pulse = GaussianPulse(e0=0.02, omega=0.3, t0=40.0, sigma=10.0)
    engine = LaserField(pulse=pulse, polarization=(0.0, 1.0, 0.0), direction=3.0 * k_hat)
    engine.setup(positions, dt)
    fields = []
    for _ in range(1000):
        fields.append(engine.field())
        engine.finish(np.zeros((2, 3)))
    e = np.array(fields)  # (steps, 2, 3)
    assert e.shape == (1000, 2, 3)
    assert not e[:, :, [0, 2]].any()
    exact = pulse(dt * (np.arange(1000) + 0.5) - d / SPEED_OF_LIGHT_AU)
    direct = np.abs(e[:, 1, 1] - exact).max()
    shifted = np.abs(e[shift:, 1, 1] - e[:-shift, 0, 1]).max()
    print(f"\nplane wave: |E2 - E(t - d/c)| {direct:.1e}; |E2(t) - E1(t - d/c)| {shifted:.1e}")
    assert direct <= 1e-15 * pulse.e0
    assert shifted <= 1e-13 * pulse.e0


def test_laser_tabulated_file_matches_callable(tmp_path: Path) -> None:
    """A tabulated field equals the callable it samples to linear-interpolation accuracy."""
    pulse = GaussianPulse(e0=0.02, omega=0.3, t0=60.0, sigma=15.0)
    h, dt, steps = 0.25, 0.1, 1500
    grid = np.arange(0.0, 200.0 + h / 2, h)
    path = tmp_path / "field.txt"
    body = "\n".join(f"{t!r} {e!r}" for t, e in zip(grid, pulse(grid), strict=True))
    path.write_text("# t_au E_au\n" + body + "\n")
    results = []
    for engine in (LaserField(pulse=pulse), LaserField(file=path)):
        engine.setup(np.full((1, 3), np.nan), dt)
        for _ in range(steps):
            results.append(engine.field()[2])
            engine.finish(np.zeros((1, 3)))
    exact, table = np.array(results[:steps]), np.array(results[steps:])
    # |f - interp f| <= h^2/8 max|f''|, max|f''| <= e0 (omega + 3/sigma)^2 for this pulse
    bound = h**2 / 8 * pulse.e0 * (pulse.omega + 3 / pulse.sigma) ** 2
    error = np.abs(table - exact).max()
    print(f"\ntabulated: max |E_table - E| = {error:.2e} (bound h^2/8 max|E''| = {bound:.2e})")
    assert error <= bound
    outside = load_field_table(path)(np.array([-1.0, 200.5]))
    assert not outside.any()


def test_laser_tabulated_vector_and_bad_rows(tmp_path: Path) -> None:
    """Four-column tables give a vector field; a bad row names the file and its line."""
    path = tmp_path / "vec.csv"
    path.write_text("0, 0, 0, 0\n1, 1, 2, 3\n2, 0, 0, 0\n")
    engine = LaserField(file=path)
    engine.setup(np.zeros((1, 3)), 1.0)
    assert np.allclose(engine.field(), [0.5, 1.0, 1.5])
    cases = {
        "0 1\n1 2\n2 x\n": "line 3",
        "0 1\n\n# note\n1 2 3\n": "line 4",
        "0 1\n1 2\n1 3\n": "line 3",
        "0 1\n1 nan\n": "line 2",
    }
    for text, where in cases.items():
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(UsageError, match=rf"bad\.txt.*{where}"):
            LaserField(file=bad)


# ------------------------------------------------------------------------ multimode

_OMEGA_1 = 0.1
_LENGTH = math.pi * SPEED_OF_LIGHT_AU / _OMEGA_1  # omega_k = k * 0.1


def test_multimode_frequencies_and_node() -> None:
    """omega_k = k pi c / L; a molecule at a node of mode 2 leaves q_2 exactly 0."""
    engine = MultimodeCavity(_LENGTH, 3, 1e-3, include_dse=True)
    assert np.allclose(engine.omega_k, [0.1, 0.2, 0.3], rtol=1e-14)
    model = _tls(omega=0.2, mu12=5.0, pe_initial=0.5)  # excited, on resonance with mode 2
    positions = np.array([[_LENGTH / 2, 0.0, 0.0]])  # node of mode 2
    _start(engine, model, 0.2, positions)
    qc = _run_embedded(engine, model, 3000)["em_qc_au"]  # (steps, modes, 3)
    print(f"\nnode: max |q_1| {np.abs(qc[:, 0, 2]).max():.2e}, max |q_2| {np.abs(qc[:, 1]).max()}")
    assert np.abs(qc[:, 0, 2]).max() > 1e-3
    assert not qc[:, 1].any()
    assert not qc[:, :, :2].any()  # only the coupling axis z


def _normal_mode_setup(include_dse: bool = True):
    """One SHO (omega_0 = 0.1, mu = q) at x = L/3 in a 2-mode cavity (0.1, 0.2)."""
    eps = 1.5e-3
    engine = MultimodeCavity(_LENGTH, 2, eps, include_dse=include_dse)
    model = create_model("sho", n=1, omega=0.1, mu0=1.0, orientation=2, p_initial=1.0)
    return engine, model, np.array([[_LENGTH / 3, 5.0, -3.0]])


def _force_constants(engine: MultimodeCavity, omega0: float, mu0: float) -> np.ndarray:
    """The 3x3 force-constant matrix of (q_1, q_2, x) (unit masses).

    V = omega0^2 x^2/2 + sum_k omega_k^2/2 (q_k + C_k mu0 x / omega_k^2)^2 with
    C_k = eps_k f_k(x_mol), so d2V/dq_k^2 = omega_k^2, d2V/dq_k dx = C_k mu0 and
    d2V/dx^2 = omega0^2 + sum_k (C_k mu0)^2 / omega_k^2 (the last sum is the DSE; without
    it V lacks the mu^2 term and d2V/dx^2 = omega0^2).
    """
    c = engine.coupling_matrix[0] * mu0
    k = np.diag(np.append(engine.omega_k**2, omega0**2))
    k[:2, 2] = k[2, :2] = c
    if engine.include_dse:
        k[2, 2] += (c**2 / engine.omega_k**2).sum()
    return k


def _zero_crossing_frequency(t: np.ndarray, y: np.ndarray) -> float:
    """Angular frequency of a single-frequency signal from its interpolated zero crossings."""
    idx = np.flatnonzero(np.sign(y[:-1]) * np.sign(y[1:]) < 0)
    times = t[idx] - y[idx] * (t[idx + 1] - t[idx]) / (y[idx + 1] - y[idx])
    return math.pi * (len(times) - 1) / (times[-1] - times[0])


@pytest.mark.parametrize("include_dse", [True, False])
def test_multimode_sho_normal_modes_and_energy(include_dse: bool) -> None:
    """SHO in a 2-mode cavity: frequencies = the 3x3 normal modes; undamped energy kept."""
    engine, model, positions = _normal_mode_setup(include_dse)
    dt, steps = 0.2, 8000
    _start(engine, model, dt, positions)
    run = _run_embedded(engine, model, steps, keys=("muz_au", "energy_au"))
    k = _force_constants(engine, 0.1, 1.0)
    w2, vectors = np.linalg.eigh(k)
    analytic = np.sqrt(w2)
    # coordinates at t_{n+1}: the cavity's q and the SHO's reported dipole / mu0
    qc = run["em_qc_au"]
    coords = np.column_stack([qc[:, 0, 2], qc[:, 1, 2], run["muz_au"][:, 0]])
    t = dt * np.arange(1, steps + 1)
    measured = np.array([_zero_crossing_frequency(t, coords @ v) for v in vectors.T])
    error = measured / analytic - 1
    # velocity Verlet's own dispersion: omega_num = (2/dt) asin(omega dt/2); what is left
    # beyond it is the coupling's splitting-scheme error and the estimator's
    verlet = 2 / dt * np.arcsin(analytic * dt / 2) / analytic - 1
    total = run["em_energy_au"] + run["energy_au"][:, 0]  # cavity + SHO, at t_{n+1}
    drift = np.abs(total / total[0] - 1).max()
    print(
        f"\nDSE {include_dse}: normal modes {analytic.round(6)}: rel. errors "
        f"{error.round(8)} (Verlet dispersion {verlet.round(8)}); "
        f"splitting of the lower pair {analytic[1] - analytic[0]:.5f}; "
        f"max |E/E0 - 1| = {drift:.2e}"
    )
    assert (np.abs(error) < 2e-4).all()
    assert (np.abs(error - verlet) < 1e-5).all()
    assert drift < 1e-3


def test_multimode_loss_per_mode() -> None:
    """damping_au = (kappa, 0): mode 1's energy decays as e^{-kappa t}, mode 2's stays."""
    kappa, dt, steps = 2e-3, 0.4, 4000
    engine = MultimodeCavity(_LENGTH, 2, 0.0, damping_au=[kappa, 0.0], qc_initial=[1.0, 1.0])
    model = create_model("sho", n=1, omega=0.1, mu0=1.0, orientation=2)
    _start(engine, model, dt, np.array([[_LENGTH / 3, 0.0, 0.0]]))
    energy = _run_embedded(engine, model, steps, keys=())["em_mode_energy_au"][:, :, 2]
    t = dt * np.arange(1, steps + 1)
    slope = np.polyfit(t, np.log(energy[:, 0]), 1)[0]
    kept = np.abs(energy[:, 1] / energy[0, 1] - 1).max()
    print(
        f"\nloss: fitted decay rate / kappa - 1 = {-slope / kappa - 1:.2e}; "
        f"mode 2 max |E/E0 - 1| {kept:.2e} "
        f"((omega_2 dt)^2/4 = {(engine.omega_k[1] * dt) ** 2 / 4:.2e})"
    )
    assert abs(-slope / kappa - 1) < 0.01
    # velocity Verlet keeps a shadow energy: p^2/2 + omega^2 q^2/2 wobbles by (omega dt)^2/4
    assert kept < 1.05 * (engine.omega_k[1] * dt) ** 2 / 4


@pytest.mark.parametrize("which", ["multimode", "laser"])
def test_state_restore_continues_bitwise(which: str) -> None:
    """state()/restore() mid-run (engine and model) continues bit for bit."""
    if which == "multimode":
        engine, model, positions = _normal_mode_setup()
        keys: tuple[str, ...] = ("muz_au", "energy_au")
    else:
        pulse = GaussianPulse(e0=0.01, omega=0.25, t0=30.0, sigma=10.0)
        engine, model, positions = LaserField(pulse=pulse), _tls(omega=0.25, mu12=2.0), None
        keys = ("Pe", "Pge_real")
    _start(engine, model, 0.2, positions)
    _run_embedded(engine, model, 150, keys)
    saved_engine = {key: value.copy() for key, value in engine.state().items()}
    saved_model = model.get_state()
    first = _run_embedded(engine, model, 200, keys)
    engine.restore(saved_engine)
    model.set_state(saved_model)
    second = _run_embedded(engine, model, 200, keys)
    assert first.keys() == second.keys()
    for key in first:
        assert np.array_equal(first[key], second[key]), key


def test_multimode_bad_parameters_name_the_key() -> None:
    """Bad parameters raise UsageError naming the key (multimode.* / laser.*)."""
    good: dict[str, Any] = {"length_au": _LENGTH, "n_modes": 2, "coupling_strength": 1e-3}
    bad = {
        "length_au": -1.0,
        "n_modes": 0,
        "coupling_strength": float("nan"),
        "coupling_axis": "w",
        "coupling_scaling": "linear",
        "damping_au": [0.1, 0.1, 0.1],
        "axis_position": 3,
        "qc_initial": [[1.0, 2.0]],
    }
    for key, value in bad.items():
        with pytest.raises(UsageError, match=rf"multimode\.{key}\b"):
            MultimodeCavity(**{**good, key: value})
    with pytest.raises(UsageError, match=r"multimode\.damping_au"):
        MultimodeCavity(**good, damping_au=-1.0)
    engine = MultimodeCavity(**good, axis_position=1)
    with pytest.raises(UsageError, match=r"multimode\.axis_position.*molecule index 1"):
        engine.setup(np.array([[0.0, 1.0, 0.0], [0.0, np.nan, 0.0]]), 0.1)
    with pytest.raises(UsageError, match=r"multimode\.axis_position.*molecule index 2.*outside"):
        engine.setup(np.array([[0.0, 1.0, 0.0], [0.0, _LENGTH, 0.0], [0.0, -1.0, 0.0]]), 0.1)
    engine.setup(np.array([[0.0, 1.0, 0.0]]), 0.1)
    with pytest.raises(UsageError, match=r"multimode state 'mu'"):
        engine.restore({**engine.state(), "mu": np.zeros((2, 3))})
    laser_cases = [
        ({}, "laser.pulse"),
        ({"pulse": 3.0}, "laser.pulse"),
        ({"pulse": math.cos, "polarization": (0, 0, 0)}, "laser.polarization"),
        ({"pulse": math.cos, "direction": (1, 0)}, "laser.direction"),
        ({"pulse": lambda t: np.ones(3), "polarization": (1, 0, 0)}, "laser.polarization"),
        ({"file": "/nonexistent/field.txt"}, "laser.file"),
    ]
    for kwargs, key in laser_cases:
        with pytest.raises(UsageError, match=key.replace(".", r"\.")):
            LaserField(**kwargs)  # type: ignore[arg-type]
    laser = LaserField(pulse=math.cos, direction=(1, 0, 0))
    with pytest.raises(UsageError, match=r"laser\.pulse must accept an array"):
        laser.setup(np.zeros((2, 3)), 0.1)
    laser = LaserField(pulse=np.cos, direction=(1, 0, 0))
    with pytest.raises(UsageError, match=r"laser\.direction.*molecule index 0"):
        laser.setup(np.full((2, 3), np.nan), 0.1)
