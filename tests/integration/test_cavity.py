"""The single-mode cavity engine (maxwellhub.em.cavity): MaxwellLink 0.5.0 reproduction,
vacuum Rabi splitting and the normal modes of N oscillators in both gauges, damping,
bitwise checkpoints with the Langevin thermostat, parameter errors."""

from __future__ import annotations

import io
import json
import math
import subprocess
import textwrap
from typing import Any

import numpy as np
import pytest
from _util import mxl_meep_python

from maxwellhub.em.cavity import SingleModeCavity
from maxwellhub.errors import UsageError
from maxwellhub.models import create_model
from maxwellhub.rabi import rabi_splitting_from_trajectory

_DIPOLE_KEYS = ("mux_au", "muy_au", "muz_au")
_NEXT_KEYS = ("mux_m_au", "muy_m_au", "muz_m_au")


def _run_embedded(engine, model, steps, *, extras=(), start=0):
    """Step ``engine`` with ``model`` (field -> model step -> dipoles -> finish) and return
    the engine's per-step records, as arrays, plus the listed model extras (steps, n)
    under ``"mol_" + key``."""
    n = model.n
    if start == 0:
        engine.setup(np.full((n, 3), np.nan), model.dt_au)
    records: dict[str, list] = {}
    for _ in range(steps):
        field = np.broadcast_to(engine.field(), (n, 3))
        sources = model.step(np.ascontiguousarray(field))
        ext = model.extras()
        dipoles = np.column_stack([ext[k] for k in _DIPOLE_KEYS])
        nxt = None
        if all(k in ext for k in _NEXT_KEYS):
            nxt = 2.0 * dipoles - np.column_stack([ext[k] for k in _NEXT_KEYS])
        engine.finish(sources, dipoles, nxt)
        for key, value in engine.record().items():
            records.setdefault(key, []).append(value)
        for key in extras:
            records.setdefault("mol_" + key, []).append(np.array(ext[key]))
    return {key: np.array(value) for key, value in records.items()}


# ------------------------------------------------------------ MaxwellLink reproduction

# Run in the peer venv: MaxwellLink's SingleModeSimulation with its own non-socket TLS or
# SHO molecules; writes q_c, p_c and each molecule's history of the listed extras.
_MXL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import maxwelllink as mxl
    from maxwelllink.em_solvers.single_mode_cavity import SingleModeSimulation

    spec = json.loads(sys.argv[1])
    d = spec["drive"]
    def drive(t):
        return d["amp"] * np.exp(-0.5 * ((t - d["t0"]) / d["width"]) ** 2) * np.sin(d["w"] * t)
    molecules = [
        mxl.Molecule(driver=spec["driver"], driver_kwargs=kw) for kw in spec["molecules"]
    ]
    sim = SingleModeSimulation(molecules=molecules, drive=drive, **spec["cavity"])
    sim.run(steps=spec["steps"])
    out = {"qc": np.array(sim.qc_history), "pc": np.array(sim.pc_history)}
    for i, m in enumerate(molecules):
        for key in spec["keys"]:
            out[f"{key}_{i}"] = np.asarray(m.extra[key])
    np.savez(spec["out"], **out)
    """
)

_TLS = [
    {"omega": 0.242, "mu12": 187.0, "orientation": 0, "pe_initial": 0.3, "e_phase_initial": 0.4},
    {"omega": 0.25, "mu12": 150.0, "orientation": 1, "pe_initial": 0.05, "e_phase_initial": 0.0},
    {"omega": 0.23, "mu12": 120.0, "orientation": 0, "pe_initial": 0.0, "e_phase_initial": 0.0},
]
# SHOs report the next-force-time dipole (mu*_m_au): with the DSE the field takes it
_SHO = [
    {"omega": 0.242, "mu0": 60.0, "orientation": 0, "p_initial": 0.02},
    {"omega": 0.26, "mu0": 40.0, "orientation": 1, "p_initial": -0.01},
]
_DRIVE = {"amp": 2e-3, "t0": 150.0, "width": 40.0, "w": 0.242}


def _mxl_drive(d):
    """The drive of the MaxwellLink script: a Gaussian-enveloped sine."""
    return lambda t: (
        d["amp"] * np.exp(-0.5 * ((t - d["t0"]) / d["width"]) ** 2) * np.sin(d["w"] * t)
    )


_MXL_CASES: dict[str, dict[str, Any]] = {
    "tls_dse": {"include_dse": True, "damping_au": 1e-3},
    "tls_no_dse": {"include_dse": False, "damping_au": 5e-4},
    "sho_dse": {"include_dse": True, "damping_au": 5e-4},
    "sho_no_dse": {"include_dse": False, "damping_au": 0.0},
    "tls_excite_mol_baseline": {
        "include_dse": True,
        "damping_au": 2e-4,
        "excite_ph": False,
        "excite_mol": True,  # the drive on the molecules directly: a weaker one
        "drive": {**_DRIVE, "amp": 2e-4},
        "shift_dipole_baseline": True,
        "mu_initial": [30.0, -20.0, 5.0],
        "dmudt_initial": [0.5, 0.2, 0.0],
    },
    "tls_langevin": {
        "include_dse": True,
        "damping_au": 0.0,
        "temperature_au": 1e-4,
        "langevin_tau_au": 500.0,
        "initializer": "maxwell_boltzmann",
        "random_seed": 7,
    },
}


@pytest.mark.peer
@pytest.mark.parametrize("case", sorted(_MXL_CASES))
def test_dipole_gauge_reproduces_maxwelllink(case, tmp_path):
    """Dipole gauge: q_c, p_c and every molecule's history equal MaxwellLink 0.5.0's to 1e-10
    (MaxwellLink in its peer venv with system site packages: Debian's numpy, as ours)."""
    python, why = mxl_meep_python()
    if python is None:
        pytest.skip(why)
    steps, dt = 1500, 0.5
    cavity: dict[str, Any] = {
        "dt_au": dt,
        "frequency_au": 0.242,
        "coupling_strength": 3e-4,
        "coupling_axis": "xy",
        "pc_initial": [1e-3, -5e-4, 0.0],
        **_MXL_CASES[case],
    }
    drive = cavity.pop("drive", _DRIVE)
    driver = case.partition("_")[0]
    molecules = _TLS if driver == "tls" else _SHO
    keys = ("Pe" if driver == "tls" else "q_au", *_DIPOLE_KEYS)
    spec = {
        "driver": driver,
        "keys": keys,
        "cavity": cavity,
        "molecules": molecules,
        "drive": drive,
        "steps": steps,
        "out": str(tmp_path / "mxl.npz"),
    }
    proc = subprocess.run(
        [str(python), "-c", _MXL_SCRIPT, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = np.load(spec["out"])

    params = {k: [m[k] for m in molecules] for k in molecules[0]}
    model = create_model(driver, n=len(molecules), **params)
    model.initialize(dt_au=dt, molecule_ids=list(range(len(molecules))))
    kwargs = {k: v for k, v in cavity.items() if k != "dt_au"}
    engine = SingleModeCavity(drive=_mxl_drive(drive), **kwargs)
    ours = _run_embedded(engine, model, steps, extras=keys)

    axis = np.array([1.0, 1.0, 0.0])  # MaxwellLink's Langevin kick moves uncoupled axes too
    # differences relative to each quantity's largest magnitude (at least 1): the TLS
    # dipoles are mu12 = 187 a.u. times the Bloch x, so 1e-10 of them is 1e-12 relative
    diffs = {
        "qc": np.abs(ours["qc_au"] - ref["qc"] * axis).max() / max(1.0, np.abs(ref["qc"]).max()),
        "pc": np.abs(ours["pc_au"] - ref["pc"] * axis).max() / max(1.0, np.abs(ref["pc"]).max()),
    }
    for key in keys:
        mine = ours["mol_" + key]
        theirs = np.column_stack([ref[f"{key}_{i}"] for i in range(len(molecules))])
        diffs[key] = np.abs(mine - theirs).max() / max(1.0, np.abs(theirs).max())
    scale = np.abs(ref["qc"]).max()
    print(f"\n{case}: max |q_c| {scale:.3e}; max differences (relative):", end=" ")
    print(", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert scale > 1e-3  # the mode moved
    assert engine.has_dipole_next == (driver == "sho")  # the SHOs' mu_m path was taken
    for key, value in diffs.items():
        assert value <= 1e-10, (key, value)


# ------------------------------------------------------------ vacuum Rabi splitting

_WC, _MU12, _DT = 0.242, 187.0, 0.5


def _rabi_run(gauge, n, spread, steps=4000):
    """N resonant TLS in their ground state, the mode kicked by p_c(0) (far below one
    photon, so linear): returns (g sqrt(N_bright), the fit to q_c,x(t), max Pe)."""
    # spread: orientations x, y, z in turn and all three axes coupled; each axis's mode
    # then sees N/3 molecules, as a random isotropic ensemble does on average
    bright = n // 3 if spread else n
    g_bright = 0.05 * _WC  # g sqrt(N_bright)/omega_c = 0.05
    g = g_bright / math.sqrt(bright)
    eps = g * math.sqrt(2 * _WC) / _MU12  # g = eps mu12 / sqrt(2 omega_c)
    model = create_model(
        "tls", n=n, omega=_WC, mu12=_MU12, orientation=np.arange(n) % 3 if spread else 0
    )
    model.initialize(dt_au=_DT, molecule_ids=list(range(n)))
    engine = SingleModeCavity(
        frequency_au=_WC,
        damping_au=0.0,
        coupling_strength=eps,
        coupling_axis="xyz" if spread else "x",
        include_dse=gauge == "dipole",
        gauge=gauge,
        pc_initial=[1e-3, 0.0, 0.0],
    )
    out = _run_embedded(engine, model, steps, extras=("Pe",))
    return g_bright, rabi_splitting_from_trajectory(out["qc_au"][:, 0], _DT), out["mol_Pe"].max()


@pytest.mark.parametrize("gauge", ["dipole", "velocity"])
def test_vacuum_rabi_splitting(gauge):
    """N = 1, 10, 1000 TLS (and 999 spread over x, y, z): splitting 2 g sqrt(N) within 1%."""
    print(f"\n{gauge} gauge: N | expected 2g sqrt(N) | measured | error | lower, upper error")
    for n, spread in ((1, False), (10, False), (1000, False), (999, True)):
        g_bright, fit, pe_max = _rabi_run(gauge, n, spread)
        expected = 2 * g_bright
        centre = math.sqrt(_WC**2 + g_bright**2)
        err = fit.splitting / expected - 1
        err_lo = fit.lower / (centre - g_bright) - 1
        err_hi = fit.upper / (centre + g_bright) - 1
        label = f"{n} (x/y/z)" if spread else str(n)
        print(
            f"{label} | {expected:.6f} | {fit.splitting:.6f} | {err:+.2e} | "
            f"{err_lo:+.2e}, {err_hi:+.2e}"
        )
        assert pe_max < 1e-5  # weakly excited: the linear regime
        assert abs(err) < 0.01
        # the polaritons sit at sqrt(omega_c^2 + g^2 N) -+ g sqrt(N), to the scheme's
        # O((omega dt)^2) frequency error (3e-4 at omega dt = 0.12)
        assert abs(err_lo) < 1e-3 and abs(err_hi) < 1e-3


# ------------------------------------------------------------ N oscillators + the mode

_SHO_OMEGA = np.array([0.22, 0.235, 0.25, 0.265])
_SHO_MU0 = np.array([60.0, 50.0, 40.0, 70.0])
_SHO_EPS = 1.2e-4


def _force_constants(omega_c, eps, omega, mu0):
    """The (N+1)x(N+1) force-constant matrix of the mode (index 0) and N SHOs (unit
    masses, dipoles mu0_i x_i on the coupled axis), dipole gauge with the DSE:

        V = sum_i omega_i^2 x_i^2 / 2 + (omega_c^2 / 2) (q + (eps / omega_c^2) sum_i mu0_i x_i)^2

    so d2V/dq2 = omega_c^2, d2V/dq dx_i = eps mu0_i and
    d2V/dx_i dx_j = omega_i^2 delta_ij + eps^2 mu0_i mu0_j / omega_c^2. The normal-mode
    frequencies are the square roots of its eigenvalues. The velocity gauge's
    H = (P - (eps/omega_c) M)^2/2 + omega_c^2 q^2/2 + ... becomes exactly this under the
    canonical map (q, P) -> (Q, Pi) = (-P/omega_c, omega_c q), so it has the same modes,
    with the dipole-gauge coordinate Q = -P/omega_c."""
    k = np.diag(np.concatenate(([omega_c**2], omega**2)))
    k[0, 1:] = k[1:, 0] = eps * mu0
    k[1:, 1:] += np.outer(mu0, mu0) * eps**2 / omega_c**2
    return k


def _sho_run(gauge, dt, steps, damping=0.0):
    n = len(_SHO_OMEGA)
    model = create_model(
        "sho", n=n, omega=_SHO_OMEGA, mu0=_SHO_MU0, orientation=0, p_initial=[0.02, 0, 0, -0.01]
    )
    model.initialize(dt_au=dt, molecule_ids=list(range(n)))
    engine = SingleModeCavity(
        frequency_au=_WC,
        damping_au=damping,
        coupling_strength=_SHO_EPS,
        coupling_axis="x",
        include_dse=gauge == "dipole",
        gauge=gauge,
        pc_initial=[0.01, 0.0, 0.0],
    )
    return _run_embedded(engine, model, steps, extras=("mux_au", "energy_au"))


def _mode_frequencies(gauge, dt, steps):
    """Each normal mode's frequency from the run: the trajectory projected on the mode's
    eigenvector is one sampled sinusoid y_n, for which y_{n+1} + y_{n-1} = 2 cos(W dt) y_n
    (solved by least squares); and the run's relative energy drift."""
    out = _sho_run(gauge, dt, steps)
    k = _force_constants(_WC, _SHO_EPS, _SHO_OMEGA, _SHO_MU0)
    eig, vec = np.linalg.eigh(k)
    # dipole-gauge coordinates at t_{n+1}: the mode's and the SHOs' (mu_i / mu0_i)
    q = out["qc_au"][:, 0] if gauge == "dipole" else -out["pc_au"][:, 0] / _WC
    coords = np.column_stack([q, out["mol_mux_au"] / _SHO_MU0])
    y = coords @ vec
    inner = y[1:-1]
    cosines = np.einsum("nk,nk->k", inner, y[2:] + y[:-2]) / (
        2 * np.einsum("nk,nk->k", inner, inner)
    )
    measured = np.arccos(cosines) / dt
    # total energy: the cavity part (with coupling and DSE) and the SHOs', all at t_{n+1}
    energy = out["energy_au"] + out["mol_energy_au"].sum(axis=1)
    return np.sqrt(eig), measured, np.abs(energy / energy[0] - 1).max()


@pytest.mark.parametrize("gauge", ["dipole", "velocity"])
def test_sho_normal_modes_and_energy(gauge):
    """4 SHOs + the mode: the 5 normal-mode frequencies and total energy, second order in dt."""
    errors, drifts = [], []
    for dt in (0.5, 0.25):
        exact, measured, drift = _mode_frequencies(gauge, dt, round(2000 / dt))
        errors.append(np.abs(measured / exact - 1).max())
        drifts.append(drift)
        print(
            f"\n{gauge} dt {dt}: modes {np.round(exact, 6)}; max rel. frequency error "
            f"{errors[-1]:.2e}; max |E/E0 - 1| {drift:.2e}",
            end="",
        )
    # (omega dt)^2 / 24 = 6e-4 at dt = 0.5: the leapfrog's own frequency error
    assert errors[0] < 1e-3 and drifts[0] < 5e-3
    assert 3.5 < errors[0] / errors[1] < 4.5  # second order
    assert 3.5 < drifts[0] / drifts[1] < 4.5


@pytest.mark.parametrize("gauge", ["dipole", "velocity"])
def test_damping_energy_decay_rate(gauge):
    """With damping kappa the cavity energy decays as exp(-kappa t) (fitted rate within 1%)."""
    kappa, dt, steps = 2e-3, 0.5, 5000
    engine = SingleModeCavity(
        frequency_au=_WC, damping_au=kappa, gauge=gauge, coupling_axis="x", pc_initial=[0.1, 0, 0]
    )
    model = create_model("tls", n=1)  # a TLS off the coupled axis: a bare, damped mode
    model.initialize(dt_au=dt, molecule_ids=[0])
    energy = _run_embedded(engine, model, steps)["energy_au"]
    t = dt * np.arange(1, steps + 1)
    rate = -np.polyfit(t, np.log(energy), 1)[0]
    print(
        f"\n{gauge}: fitted decay rate {rate:.6e}, kappa {kappa:.1e}, error {rate / kappa - 1:+.2e}"
    )
    assert abs(rate / kappa - 1) < 0.01


# ------------------------------------------------------------ checkpoints


def _thermostatted(gauge):
    engine = SingleModeCavity(
        frequency_au=_WC,
        damping_au=1e-4,
        coupling_strength=2e-4,
        coupling_axis="xz",
        gauge=gauge,
        include_dse=gauge == "dipole",
        temperature_au=1e-3,
        langevin_tau_au=200.0,
        initializer="maxwell_boltzmann",
        random_seed=12345,
        drive=lambda t: 1e-4 * math.sin(0.2 * t),
    )
    model = create_model("tls", n=3, orientation=[0, 2, 1], pe_initial=[0.2, 0.0, 0.5])
    model.initialize(dt_au=0.5, molecule_ids=[0, 1, 2])
    return engine, model


@pytest.mark.parametrize("gauge", ["dipole", "velocity"])
def test_checkpoint_restore_is_bitwise(gauge):
    """state() mid-run, through an .npz without pickles, into a fresh engine: bitwise equal."""
    engine, model = _thermostatted(gauge)
    whole = _run_embedded(engine, model, 400)

    engine, model = _thermostatted(gauge)
    first = _run_embedded(engine, model, 150)
    saved = io.BytesIO()
    np.savez(saved, **engine.state())
    model_state = model.get_state()
    saved.seek(0)
    with np.load(saved, allow_pickle=False) as npz:
        state = dict(npz)
    assert all(v.dtype.kind in "fiu" for v in state.values())

    fresh, model = _thermostatted(gauge)
    fresh.setup(np.full((3, 3), np.nan), 0.5)
    fresh.restore(state)
    model.set_state(model_state)
    second = _run_embedded(fresh, model, 250, start=150)
    for key, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), value)
    assert fresh.time_au == 200.0
    assert np.abs(whole["pc_au"][:, 1]).max() == 0.0  # y is not coupled: it stays 0


# ------------------------------------------------------------ bad parameters

_BAD = [
    ({"frequency_au": -1}, "cavity.frequency_au = -1: expected a finite number > 0"),
    ({"frequency_au": float("nan")}, "cavity.frequency_au"),
    ({"damping_au": -0.1}, "cavity.damping_au = -0.1: expected a finite number >= 0"),
    ({"coupling_strength": "big"}, "cavity.coupling_strength"),
    ({"coupling_axis": "w"}, "cavity.coupling_axis = 'w'"),
    ({"coupling_axis": ""}, "cavity.coupling_axis"),
    ({"drive": float("inf")}, "cavity.drive = inf: expected None, a finite number or a"),
    ({"drive": "strong"}, "cavity.drive = 'strong'"),
    ({"qc_initial": [1.0, 2.0]}, "cavity.qc_initial"),
    ({"pc_initial": [0, 0, float("nan")]}, "cavity.pc_initial"),
    ({"mu_initial": "x"}, "cavity.mu_initial"),
    ({"dmudt_initial": [[0, 0, 0]]}, "cavity.dmudt_initial"),
    ({"temperature_au": -1e-3}, "cavity.temperature_au"),
    ({"langevin_tau_au": 0.0}, "cavity.langevin_tau_au = 0.0: expected a finite number > 0"),
    ({"initializer": "uniform"}, "cavity.initializer = 'uniform'"),
    ({"random_seed": -3}, "cavity.random_seed = -3"),
    ({"random_seed": 1.5}, "cavity.random_seed"),
    ({"include_dse": "yes"}, "cavity.include_dse = 'yes': expected true or false"),
    ({"molecule_half_step": True}, "cavity.molecule_half_step = True: not supported"),
    ({"shift_dipole_baseline": 1}, "cavity.shift_dipole_baseline"),
    ({"gauge": "coulomb"}, "cavity.gauge = 'coulomb'"),
    ({"gauge": "velocity", "include_dse": True}, "cavity.include_dse = True"),
    ({"excite_ph": None}, "cavity.excite_ph"),
    ({"excite_mol": "no"}, "cavity.excite_mol"),
]


@pytest.mark.parametrize(("changes", "message"), _BAD, ids=[str(c) for c, _ in _BAD])
def test_bad_parameter_names_the_key(changes, message):
    """Every invalid parameter is a UsageError that names the key and the allowed values."""
    kwargs = {"frequency_au": _WC, "damping_au": 0.0, **changes}
    with pytest.raises(UsageError) as info:
        SingleModeCavity(**kwargs)
    assert message in str(info.value)


def test_step_order_and_dipoles_are_enforced():
    """finish() before field() and a step without dipoles are refused (the Engine contract)."""
    engine = SingleModeCavity(frequency_au=_WC, damping_au=0.0)
    engine.setup(np.zeros((2, 3)), 0.5)
    with pytest.raises(UsageError, match="finish"):
        engine.finish(np.zeros((2, 3)), np.zeros((2, 3)))
    engine.field()
    with pytest.raises(UsageError, match="dipoles"):
        engine.finish(np.zeros((2, 3)))
