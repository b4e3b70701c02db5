"""The ``ase`` model against analytic results and real packages: a Morse diatomic (ASE's
MorsePotential), the flexible SPC/Fw water of ``_water``, PySCF forces, and real Meep."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from ase import Atoms, units
from ase.io import write

from maxwellhub.models import ParameterError, create_model
from maxwellhub.models._water import FlexibleWater, water_geometry
from maxwellhub.models.ase_md import (
    AU_PER_FS,
    BOHR_PER_ANG,
    HARTREE_PER_EV,
    ME_PER_AMU,
)

EPS, RHO0, R0 = 11.23, 2.6, 1.128  # the model's Morse defaults (eV, -, Å)


def morse_constants() -> tuple[float, float, float]:
    """(omega a.u., force constant k Ha/bohr², reduced mass m_e) of the default CO Morse."""
    a = RHO0 / R0 / BOHR_PER_ANG  # 1/bohr
    d = EPS * HARTREE_PER_EV
    masses = Atoms("CO").get_masses() * ME_PER_AMU
    mu = masses[0] * masses[1] / masses.sum()
    return a * np.sqrt(2 * d / mu), 2 * d * a * a, mu


def co_file(tmp_path, stretch: float = 0.0) -> str:
    path = tmp_path / "co.xyz"
    write(path, Atoms("CO", positions=[[0, 0, 0], [0, 0, R0 + stretch]]))
    return str(path)


def run(model, steps, field=None):
    field = np.zeros((model.n, 3)) if field is None else field
    out = []
    for _ in range(steps):
        model.step(field)
        out.append((model.get_state()["positions"].copy(), model.extras()))
    return out


def test_morse_frequency_and_energy_conservation(tmp_path):
    """Field-free CO (stretched by 0.005 Å): the bond oscillates at omega = a sqrt(2D/mu)
    (velocity Verlet's 2/h asin(omega h/2) to 2e-4; analytic to 1e-3) and, without a
    thermostat, the total energy stays within 1% of the vibrational energy, with no drift."""
    dt, steps = 10.0, 1000
    model = create_model("ase", geometry=co_file(tmp_path, 0.005), charges="0.3 -0.3")
    model.initialize(dt_au=dt)
    e0 = float(model.extras()["energy_au"][0])
    trace = run(model, steps)
    r = np.array([np.linalg.norm(p[0, 1] - p[0, 0]) for p, _ in trace])
    energy = np.array([float(e["energy_au"][0]) for _, e in trace])
    x = r - 0.5 * (r.max() + r.min())
    up = np.flatnonzero((x[:-1] < 0) & (x[1:] >= 0))
    crossings = up + (-x[up]) / (x[up + 1] - x[up])  # linear interpolation, in steps
    period = (crossings[-1] - crossings[0]) / (len(crossings) - 1) * dt
    measured = 2 * np.pi / period
    omega, k, _ = morse_constants()
    verlet = 2 / dt * np.arcsin(omega * dt / 2)
    e_vib = 0.5 * k * (0.005 * BOHR_PER_ANG) ** 2
    spread = np.abs(energy - e0).max() / e_vib
    drift = abs(energy[-100:].mean() - energy[:100].mean()) / e_vib
    print(
        f"\nMorse omega {measured:.7f} a.u., Verlet {verlet:.7f}, analytic {omega:.7f}; "
        f"energy spread {spread:.1e}, drift {drift:.1e} of E_vib"
    )
    assert len(crossings) > 10
    assert abs(measured / verlet - 1) < 2e-4
    assert abs(measured / omega - 1) < 1e-3
    assert spread < 1e-2
    assert drift < 1e-3


def test_static_field_shifts_dipole_by_alpha_e():
    """A weak static field along the bond, the motion damped at 0 K (Langevin, T = 0):
    the dipole settles at mu0 + alpha E with alpha = q**2 / k (Morse curvature), alpha > 0."""
    q, field = 0.3, 1e-3
    model = create_model("ase", charges=[q, -q], tau_fs=2.0, temperature_K=0.0)
    model.initialize(dt_au=10.0)
    mu0 = float(model.extras()["muz_m_au"][0])
    trace = run(model, 400, np.array([[0.0, 0.0, field]]))
    shift = float(trace[-1][1]["muz_m_au"][0]) - mu0
    _, k, _ = morse_constants()
    alpha = q * q / k
    print(f"\ndipole shift {shift:.6e}, alpha E {alpha * field:.6e}")
    assert shift > 0
    assert abs(shift / (alpha * field) - 1) < 2e-3
    assert abs(float(trace[-1][1]["muz_au"][0]) - float(trace[-2][1]["muz_au"][0])) < 1e-12


def test_resume_bitwise_with_thermostat(tmp_path):
    """Two thermostatted waters: state at step k -> fresh instance (directly and through
    an .npz file read with allow_pickle=False) continues bit for bit; the noise matters."""
    params = dict(calculator="water", temperature_K=300.0, tau_fs=[20.0, 5.0], seed=7)
    fields = np.random.default_rng(1).normal(scale=1e-3, size=(20, 2, 3))
    first = create_model("ase", n=2, **params)
    first.initialize(dt_au=8.0)
    for k in range(10):
        first.step(fields[k])
    saved = first.get_state()
    path = tmp_path / "ckpt.npz"
    np.savez(path, **saved)
    with np.load(path, allow_pickle=False) as data:
        from_file = {key: data[key] for key in data.files}
    resumed = []
    for state in (saved, from_file):
        model = create_model("ase", n=2, **params)
        model.initialize(dt_au=8.0)
        model.step(fields[0])  # overwritten by set_state
        model.set_state(state)
        resumed.append(model)
    unthermostatted = create_model("ase", n=2, **{**params, "tau_fs": 0.0})
    unthermostatted.initialize(dt_au=8.0)
    unthermostatted.set_state({**saved, "param.tau_fs": np.zeros(2)})
    for k in range(10, 20):
        expected = first.step(fields[k])
        for model in resumed:
            assert model.step(fields[k]).tobytes() == expected.tobytes()
        free = unthermostatted.step(fields[k])
    for model in resumed:
        for key, value in first.get_state().items():
            assert np.asarray(model.get_state()[key]).tobytes() == np.asarray(value).tobytes(), key
    assert np.abs(free - expected).max() > 1e-6


def normal_mode_frequencies() -> np.ndarray:
    """The three vibrational angular frequencies (a.u.) of FlexibleWater from its
    finite-difference Hessian at the minimum (mass-weighted), ascending."""
    atoms = Atoms("OH2", positions=water_geometry())
    atoms.calc = FlexibleWater()
    x0, step = atoms.get_positions().ravel(), 1e-4
    hessian = np.zeros((9, 9))
    for j in range(9):
        rows = []
        for sign in (1, -1):
            x = x0.copy()
            x[j] += sign * step
            atoms.set_positions(x.reshape(3, 3))
            rows.append(-atoms.get_forces().ravel())
        hessian[:, j] = (rows[0] - rows[1]) / (2 * step)
    hessian = 0.5 * (hessian + hessian.T) * HARTREE_PER_EV / BOHR_PER_ANG**2  # Ha/bohr²
    m = np.repeat(atoms.get_masses() * ME_PER_AMU, 3)
    eig = np.linalg.eigvalsh(hessian / np.sqrt(np.outer(m, m)))
    return np.sqrt(eig[-3:])


def test_water_spectrum_shows_normal_modes(tmp_path):
    """A displaced, field-free water: the power spectrum of the dipole (the Fourier
    transform of its autocorrelation) peaks at the Hessian's bend and symmetric stretch
    (mu_z, along the bisector) and antisymmetric stretch (mu_y), to 0.5%."""
    dt, steps = 8.0, 2500
    pos = water_geometry() + np.array([[0, 0, 0], [0, 0.01, 0.015], [0, 0.005, -0.01]])
    path = tmp_path / "water.xyz"
    write(path, Atoms("OH2", positions=pos))
    model = create_model("ase", calculator="water", geometry=str(path))
    model.initialize(dt_au=dt)
    trace = run(model, steps)
    mu = np.array([[e["muy_m_au"][0], e["muz_m_au"][0]] for _, e in trace])
    mu -= mu.mean(axis=0)
    pad = 16 * steps
    spectrum = np.abs(np.fft.rfft(mu * np.hanning(steps)[:, None], n=pad, axis=0)) ** 2
    omega_grid = 2 * np.pi * np.fft.rfftfreq(pad, d=dt)
    bend, sym, anti = normal_mode_frequencies()

    def verlet(w):
        return 2 / dt * np.arcsin(w * dt / 2)

    def peak(column, near):
        window = np.abs(omega_grid / near - 1) < 0.03
        return omega_grid[window][np.argmax(spectrum[window, column])]

    found = {"bend": peak(1, bend), "sym": peak(1, sym), "anti": peak(0, anti)}
    cm = units.Hartree / units.invcm
    print(
        "\nwater modes (cm-1): "
        + ", ".join(
            f"{k} {found[k] * cm:.1f} vs {w * cm:.1f}"
            for k, w in zip(found, (bend, sym, anti), strict=True)
        )
    )
    assert bend * cm < 2000 < sym * cm < anti * cm
    for key, w in zip(found, (bend, sym, anti), strict=True):
        assert abs(found[key] / verlet(w) - 1) < 5e-3, key


def test_pyscf_h2_energy_conservation():
    """Born-Oppenheimer MD of H2/STO-3G on PySCF RHF forces: the total energy stays
    within 1% of the vibrational energy over 40 steps (about one vibration)."""
    pytest.importorskip("pyscf")
    model = create_model("ase", calculator="pyscf", basis="sto-3g", xc="hf")
    model.initialize(dt_au=5.0)
    ex = model.extras()
    assert abs(float(ex["muz_m_au"][0])) < 1e-12  # Mulliken charges of H2: zero
    e0 = float(ex["energy_au"][0])
    trace = run(model, 40)
    energy = np.array([float(e["energy_au"][0]) for _, e in trace])
    kinetic = np.array([float(e["energy_kin_au"][0]) for _, e in trace])
    spread = np.abs(energy - e0).max()
    print(f"\nH2 BO-MD: max kinetic {kinetic.max():.3e} Ha, energy spread {spread:.2e} Ha")
    assert kinetic.max() > 1e-4  # it did vibrate (0.74 Å is off the STO-3G minimum)
    assert spread < 1e-2 * kinetic.max()


def test_charges_and_refusals(tmp_path):
    """Charges from the calculator (water) or given as text or list; clear refusals."""
    water: Any = create_model("ase", calculator="water")  # reads the private charges
    np.testing.assert_allclose(water._q, [-0.82, 0.41, 0.41])
    text: Any = create_model("ase", charges="[0.2, -0.2]")
    listed: Any = create_model("ase", charges=[0.2, -0.2])
    assert text._q.tolist() == listed._q.tolist() == [0.2, -0.2]
    with pytest.raises(ParameterError, match="charges") as err:
        create_model("ase", calculator="morse")
    assert err.value.key == "charges"
    with pytest.raises(ParameterError, match="2 finite"):
        create_model("ase", charges="1 2 3")
    dummy = tmp_path / "x.xyz"
    write(dummy, Atoms("COX", positions=[[0, 0, 0], [0, 0, 1.1], [0, 0, 0.5]]))
    with pytest.raises(ParameterError, match="massless"):
        create_model("ase", geometry=str(dummy), charges="0 0 0")
    wat = tmp_path / "w.xyz"
    write(wat, Atoms("OH2", positions=water_geometry()))
    with pytest.raises(ParameterError, match="M site"):
        create_model(
            "ase", calculator="ase.calculators.tip4p:TIP4P", geometry=str(wat), charges="0 0 0"
        )
    with pytest.raises(ParameterError, match="geometry"):
        create_model("ase", calculator="ase.calculators.emt:EMT", charges="0")
    assert abs(AU_PER_FS / 41.341374 - 1) < 1e-6


@pytest.mark.meep
def test_meep_socket_equals_embedded(tmp_path, unix_name, deadline):
    """A stretched, charged CO in a 2D Meep cell: behind a real ``maxwellhub-driver``
    socket it follows the embedded model to 1e-12 (dipole, energy, time)."""
    mp = pytest.importorskip("meep")
    from maxwellhub import SocketHub
    from maxwellhub.em import MeepCoupling
    from maxwellhub.run.launch import reap, start_driver

    params: dict[str, Any] = {
        "geometry": co_file(tmp_path, 0.02),
        "charges": "1.0 -1.0",
        "n_substeps": 2,
    }

    def sim():
        mp.verbosity(0)
        return mp.Simulation(
            cell_size=mp.Vector3(8, 8), resolution=10, boundary_layers=[mp.PML(3.0)]
        )

    embedded_sim = sim()
    coupling = MeepCoupling(embedded_sim, time_units_fs=0.1)
    coupling.add_molecules("ase", centers=[(0, 0)], sigma=0.1, axis="z", **params)
    embedded_sim.run(coupling.step_function(), until=10)
    embedded = coupling.history()

    hub = SocketHub(unixsocket=unix_name, timeout=deadline(30))
    drivers = []
    try:
        drivers = [start_driver("ase", params, unix=unix_name)]
        socket_sim = sim()
        coupling = MeepCoupling(socket_sim, time_units_fs=0.1, hub=hub, timeout=deadline(30))
        coupling.add_socket_molecules(centers=[(0, 0)], sigma=0.1, axis="z")
        socket_sim.run(coupling.step_function(), until=10)
        socket = coupling.history()
    finally:
        hub.stop()
        reap(drivers, deadline(5))
    assert embedded["muz_au"].shape[0] > 100
    assert np.ptp(embedded["muz_au"]) > 1e-3  # the bond moved
    for key in ("muz_au", "muz_m_au", "energy_au", "time_au"):
        np.testing.assert_allclose(socket[key], embedded[key], rtol=0, atol=1e-12, err_msg=key)


def test_callable_calculator_and_alias_follow_the_builtin(tmp_path):
    """``package.module:callable`` (here the water calculator's class) and MaxwellLink's
    ``atoms`` alias give the built-in ``water`` trajectory bit for bit."""
    path = tmp_path / "w.xyz"
    write(path, Atoms("OH2", positions=water_geometry() + 0.01))
    fields = np.random.default_rng(3).normal(scale=1e-3, size=(5, 1, 3))
    builtin = create_model("ase", calculator="water", geometry=str(path))
    dotted = create_model(
        "ase", calculator="maxwellhub.models._water:FlexibleWater", atoms=str(path)
    )
    for model in (builtin, dotted):
        model.initialize(dt_au=8.0)
    for k in range(5):
        assert builtin.step(fields[k]).tobytes() == dotted.step(fields[k]).tobytes()
    assert np.abs(builtin.get_state()["velocities"]).max() > 0


def test_langevin_reaches_the_target_temperature():
    """Eight waters from rest under the Langevin thermostat (300 K, tau 5 fs): the mean
    kinetic temperature over 300 steps after 5 tau is 300 K within 15% (the statistical
    error of this sample is about 6%; a thermostat off by a factor of 2 fails)."""
    model = create_model(
        "ase",
        n=8,
        calculator="water",
        temperature_K=300.0,
        tau_fs=5.0,
        initial_temperature_K=0.0,
        seed=11,
    )
    model.initialize(dt_au=10.0)
    temperatures = [e["temperature_K"] for _, e in run(model, 400)[100:]]
    mean = float(np.mean(temperatures))
    print(f"\nLangevin water: mean temperature {mean:.1f} K")
    assert abs(mean / 300.0 - 1) < 0.15
