"""The rttddft model against PySCF itself and against analytic facts.

Fock builders against PySCF's get_fock, the sign of the coupling against PySCF's
finite-field SCF, conservation laws of field-free propagation, the source against the
reported dipoles, ensembles against single molecules, MaxwellLink's names and conventions
(including its own reference trajectory), staging purity and bitwise state round trips,
and the errors that name their culprit. The absorption spectrum against linear response
is in test_spectrum.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _util import REPO_ROOT, mxl_venv
from pyscf import dft, scf  # a test dependency (pyproject's test extra)

from maxwellhub.models import ParameterError
from maxwellhub.models._rt_fock import NumpyFock, PySCFFock
from maxwellhub.models.rttddft import RTTDDFTModel
from maxwellhub_drivers.cli import _text_keys, parse_params

TEXT_KEYS = _text_keys(RTTDDFTModel)  # how the driver's --param reads text parameters

MOLECULES = REPO_ROOT / "examples" / "molecules"
WATER = str(MOLECULES / "water.xyz")
HCN = str(MOLECULES / "hcn.xyz")
# H2O+ (a doublet: UHF/UKS), same geometry
WATER_CATION = "O 0 0 0.1173; H 0 0.7572 -0.4692; H 0 -0.7572 -0.4692"


def _water(**params):
    params.setdefault("xyz", WATER)
    params.setdefault("grid_level", 0)
    return RTTDDFTModel(**params)


def _cation(**params):
    params.setdefault("grid_level", 0)
    return RTTDDFTModel(atoms=WATER_CATION, charge=1, multiplicity=2, **params)


def _run(model, fields, dt):
    """Step through ``fields`` (steps, n, 3); return sources and dipoles (steps + 1, n, 3)."""
    model.initialize(dt_au=dt)
    sources, dipoles = [], [model.get_state()["dipole"]]
    for field in fields:
        sources.append(model.step(field))
        dipoles.append(model.get_state()["dipole"])
    return np.array(sources), np.array(dipoles)


# ---------------------------------------------------------------- Fock builders


@pytest.mark.parametrize("open_shell", [False, True], ids=["restricted", "unrestricted"])
@pytest.mark.parametrize("xc", ["hf", "lda", "pbe", "b3lyp"])
def test_fock_builders_match_pyscf(xc, open_shell):
    """Both builders give PySCF's own Fock matrix and energy for a complex Hermitian
    density (a kicked ground state plus a random Hermitian perturbation)."""
    model = (_cation if open_shell else _water)(xc=xc, kick_au=0.05)
    core = model.core
    p = model.get_state()["P"]
    rng = np.random.default_rng(7)
    noise = rng.standard_normal(p.shape) + 1j * rng.standard_normal(p.shape)
    p = p + 1e-3 * (noise + noise.conj().swapaxes(-1, -2))
    hcore = np.asarray(core.mf.get_hcore())
    x = core.x
    for builder in (NumpyFock, PySCFFock):
        fock, energy = builder(core.mf, x, hcore, core.restricted, None if xc == "hf" else xc)(
            p, True
        )
        dm = x @ p[0] @ x
        dm = dm[0] if core.restricted else dm
        reference = np.asarray(core.mf.get_fock(dm=dm))
        reference = x @ (reference[None] if core.restricted else reference) @ x
        assert np.abs(fock[0] - reference).max() < 1e-12, builder.__name__
        assert abs(energy[0] + core.e_nuc - core.mf.energy_tot(dm=dm)) < 1e-10, builder.__name__


def test_hcn_hf_energy_and_dipole():
    """HF/STO-3G of HCN: PySCF's SCF energy, and the dipole points from N to H (-z)."""
    model = RTTDDFTModel(xyz=HCN, xc="hf")
    assert model.scf_energy == pytest.approx(-91.675125152, abs=2e-9)
    mf = scf.RHF(model.core.mol)
    mf.verbose = 0
    mf.conv_tol = 1e-12
    mf.kernel()
    expected = mf.dip_moment(unit="au", verbose=0)
    got = model.extras_of(0)
    assert [got["mux_au"], got["muy_au"], got["muz_au"]] == pytest.approx(expected, abs=1e-8)
    assert got["muz_au"] < -0.9


# ---------------------------------------------------------------- sign of the coupling


def test_static_field_gives_finite_field_dipole():
    """A weak field E_z switched on slowly (sin² over 150 a.u.) and then held: the
    time-averaged dipole change equals the finite-field SCF's (h_core + E_z z), positive
    (measured: 1.5e-6 relative; alpha_zz = 2.13 a.u.)."""
    e_z, ramp, hold, dt = 2e-4, 150.0, 150.0, 0.5
    model = _water(xc="hf", dt_substep_au=0.1)
    mu0 = model.extras_of(0)["muz_au"]
    steps = int((ramp + hold) / dt)
    times = (np.arange(steps) + 0.5) * dt
    field = e_z * np.where(times < ramp, np.sin(0.5 * np.pi * times / ramp) ** 2, 1.0)
    fields = np.zeros((steps, 1, 3))
    fields[:, 0, 2] = field
    _, dipoles = _run(model, fields, dt)
    held = dipoles[1:, 0, 2][times + 0.5 * dt > ramp]
    rt_change = held.mean() - mu0

    mol = model.core.mol
    r_z = mol.intor_symmetric("int1e_r")[2]
    changes = []
    for strength in (0.0, e_z):
        mf = scf.RHF(mol)
        mf.verbose = 0
        mf.conv_tol = 1e-13
        h = mf.get_hcore()
        mf.get_hcore = lambda *args, h=h, strength=strength: h + strength * r_z
        mf.kernel()
        changes.append(mf.dip_moment(unit="au", verbose=0)[2])
    ff_change = changes[1] - changes[0]
    assert ff_change > 0 and rt_change > 0
    assert rt_change == pytest.approx(ff_change, rel=1e-3)


# ---------------------------------------------------------------- conservation


@pytest.mark.parametrize(
    ("factory", "xc", "propagator", "energy_bound"),
    [
        (_water, "hf", "pc", 1e-8),
        (_water, "lda", "etrs", 1e-7),
        (_cation, "lda", "pc", 1e-9),
    ],
    ids=["rhf-pc", "rks-lda-etrs", "uks-lda-pc"],
)
def test_field_free_conservation(factory, xc, propagator, energy_bound):
    """After a 1e-2 kick, 1000 field-free sub-steps of 0.05 a.u. (100 EM steps of 10):
    the total energy, the electron count, hermiticity and idempotency are conserved.
    Measured largest energy deviation: 2.5e-9 Hartree (RHF, pc at the default 1e-8; it
    drifts), 3.1e-8 (RKS LDA, etrs; it oscillates), 1.0e-10 (UKS LDA doublet, pc); trace
    error <= 5.6e-13, idempotency error <= 8.4e-13; hermiticity exact (symmetrised)."""
    model = factory(xc=xc, kick_au=1e-2, propagator=propagator, dt_substep_au=0.05)
    e0 = model.extras_of(0)["energy_au"]
    electrons = model.core.n_electrons
    model.initialize(dt_au=0.5)
    assert model.substeps == (10, pytest.approx(0.05))
    deviation = 0.0
    for _ in range(100):
        model.step(np.zeros((1, 3)))
        deviation = max(deviation, abs(model.extras_of(0)["energy_au"] - e0))
    assert deviation < energy_bound
    p = model.get_state()["P"][0]
    assert abs(np.trace(p, axis1=-2, axis2=-1).real.sum() - electrons) < 3e-12
    occupation = 2.0 if model.core.restricted else 1.0
    for block in p:
        assert np.abs(block @ block - occupation * block).max() < 3e-12
        assert np.abs(block - block.conj().T).max() < 1e-14
    assert (
        deviation > 0.0
        and np.abs(model.get_state()["dipole"] - model.core.dipoles(model.core.p0[None])).max()
        > 1e-4
    )  # it did move


# ---------------------------------------------------------------- source and dipoles


def test_source_is_dipole_change_over_the_step():
    """sources = (mu(t + D) - mu(t)) / D with the reported dipoles, under a field."""
    rng = np.random.default_rng(3)
    dt = 0.3
    model = _water(xc="lda", dt_substep_au=0.1, kick_au=1e-3)
    sources, dipoles = _run(model, 1e-2 * rng.standard_normal((30, 1, 3)), dt)
    assert model.substeps == (3, pytest.approx(0.1))
    assert np.abs(sources - np.diff(dipoles, axis=0) / dt).max() < 1e-10
    assert np.abs(sources).max() > 1e-4  # something moved


def test_impulsive_kick_raises_the_dipole_along_the_kick():
    """After E = kappa delta(t) e, mu . e rises (electrons move against the field)."""
    for direction in ([0, 0, 1], [1, -1, 0]):
        model = _water(xc="hf", kick_au=1e-3, kick_direction=direction, dt_substep_au=0.05)
        sources, _ = _run(model, np.zeros((4, 1, 3)), 0.5)
        assert sources[0, 0] @ np.array(direction, dtype=float) > 0


# ---------------------------------------------------------------- ensembles


@pytest.mark.parametrize(
    ("factory", "xc", "propagator"),
    [(_water, "hf", "pc"), (_cation, "lda", "etrs"), (_water, "b3lyp", "pc")],
    ids=["rhf-pc", "uks-lda-etrs", "rks-b3lyp-pc"],
)
def test_ensemble_equals_single_molecules(factory, xc, propagator):
    """Three molecules with their own kicks and fields in one ensemble follow the
    trajectories of three single models bit for bit (every product is done row by row and
    the eigensolver is chosen by the functional, not by the data)."""
    rng = np.random.default_rng(11)
    kicks = [0.0, 2e-3, -1e-3]
    fields = 5e-3 * rng.standard_normal((15, 3, 3))
    ensemble = factory(n=3, xc=xc, propagator=propagator, kick_au=kicks, dt_substep_au=0.1)
    sources, dipoles = _run(ensemble, fields, 0.4)
    state = ensemble.get_state()
    for i, kick in enumerate(kicks):
        single = factory(xc=xc, propagator=propagator, kick_au=kick, dt_substep_au=0.1)
        one_sources, one_dipoles = _run(single, fields[:, i : i + 1], 0.4)
        np.testing.assert_array_equal(one_sources[:, 0], sources[:, i])
        np.testing.assert_array_equal(one_dipoles[:, 0], dipoles[:, i])
        for key, value in single.get_state().items():
            if not key.startswith("param.") and key != "time_au":
                np.testing.assert_array_equal(value[0], state[key][i], err_msg=key)


# ---------------------------------------------------------------- MaxwellLink


MXL_PARAM = (
    "molecule_xyz={xyz}, functional=SCF, basis=sto-3g, delta_kick_au=1e-1, "
    "dt_rttddft_au=0.04, electron_propagation=pc, threshold_pc=1e-6"
)


def test_maxwelllink_reference_trajectory():
    """MaxwellLink 0.5.0's own socket test (HCN, HF/STO-3G, delta_kick_au=0.1, EM step
    0.20670686667 a.u.) records mu_z = 0.9845210528344084 after the first step, before its
    EM field feeds back. Its --param string, with maxwelllink_compat, gives that value;
    without compat the physical dipole has the opposite permanent part."""
    params = parse_params(
        [MXL_PARAM.format(xyz=HCN) + ", memory=8GB, num_threads=4"], text_keys=TEXT_KEYS
    )
    dt = 2.067068666750000450e-01
    compat = RTTDDFTModel(maxwelllink_compat=True, **params)
    assert compat.extras_of(0)["muz_au"] == pytest.approx(0.965020724, abs=1e-8)
    compat.initialize(dt_au=dt)
    assert compat.substeps == (5, pytest.approx(dt / 5))
    compat.step(np.zeros((1, 3)))
    assert compat.extras_of(0)["muz_au"] == pytest.approx(0.9845210528344084, abs=1e-8)

    physical = RTTDDFTModel(**params)
    assert physical.extras_of(0)["muz_au"] == pytest.approx(-0.965020724, abs=1e-8)
    physical.initialize(dt_au=dt)
    physical.step(np.zeros((1, 3)))
    # the same induced dipole to first order in the kick; the second order flips sign
    induced = physical.extras_of(0)["muz_au"] + 0.965020724
    assert induced == pytest.approx(0.9845210528344084 - 0.965020724, rel=2e-2)


def _mxl_reference() -> np.ndarray:
    """MaxwellLink 0.5.0's recorded (time_au, muz_au) of its own 2D Meep + HCN RT-TDDFT
    socket test (skip when its peer venv is not there)."""
    found = sorted(
        mxl_venv().glob(
            "lib/python3*/site-packages/maxwelllink/_workspace_payload/tests/test_psi4_rttddft/"
            "test_meep_2d_socket_rttddft_mu_z_au_ref.txt"
        )
    )
    if not found:
        pytest.skip(f"MaxwellLink's RT-TDDFT reference data not found under {mxl_venv()}")
    return np.loadtxt(found[0])


@pytest.mark.meep
@pytest.mark.peer
def test_maxwelllink_meep_reference_trajectory():
    """MaxwellLink's whole reference run, EM feedback included: a 2D Meep cell (8 x 8,
    PML 3, resolution 10, 0.1 fs per Meep time), HCN at the centre (sigma 0.1, Ez), its
    --param string, 100 steps: with maxwelllink_compat our embedded coupling gives its
    mu_z(t) to 3e-8 (measured 1.8e-8: psi4's SCF against PySCF's, and the
    predictor-corrector's 1e-6 tolerance)."""
    mp = pytest.importorskip("meep")
    from maxwellhub.em import MeepCoupling

    reference = _mxl_reference()
    mp.verbosity(0)
    sim = mp.Simulation(cell_size=mp.Vector3(8, 8, 0), boundary_layers=[mp.PML(3.0)], resolution=10)
    coupling = MeepCoupling(sim, time_units_fs=0.1)
    params = parse_params([MXL_PARAM.format(xyz=HCN)], text_keys=TEXT_KEYS)
    coupling.add_molecules(
        "rttddft", centers=[(0, 0, 0)], sigma=0.1, axis="z", maxwelllink_compat=True, **params
    )
    sim.run(coupling.step_function(), until=5)
    history = coupling.history()
    assert history["muz_au"].shape == (len(reference), 1)
    np.testing.assert_allclose(history["time_au"][:, 0], reference[:, 0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(history["muz_au"][:, 0], reference[:, 1], rtol=0, atol=3e-8)


def test_maxwelllink_names_give_our_trajectory():
    """MaxwellLink's parameter names (its --param string form) and ours: the same bits."""
    theirs = parse_params(
        [
            f"molecule_xyz={WATER}, functional=SCF, basis=sto-3g, dt_rttddft_au=0.05, "
            "delta_kick_au=2e-3, delta_kick_direction=xz, electron_propagation=ETRS, "
            "threshold_pc=1e-7, remove_permanent_dipole=true, memory=8GB, num_threads=2, "
            "checkpoint=false, restart=false"
        ],
        text_keys=TEXT_KEYS,
    )
    ours: dict[str, Any] = dict(
        xyz=WATER,
        xc="hf",
        basis="sto-3g",
        dt_substep_au=0.05,
        kick_field_au=2e-3,
        kick_direction=(1.0, 0.0, 1.0),
        propagator="etrs",
        pc_tolerance=1e-7,
        remove_permanent_dipole=True,
    )
    # the same parameters, less MaxwellLink's psi4 resources (accepted and ignored)
    canonical = RTTDDFTModel.validate_params(1, **theirs)
    for key in ("memory", "num_threads", "checkpoint", "restart"):
        canonical.pop(key)
    assert canonical == RTTDDFTModel.validate_params(1, **ours)
    fields = np.full((10, 1, 3), 1e-3)
    a_sources, a_dipoles = _run(RTTDDFTModel(**theirs), fields, 0.2)
    b_sources, b_dipoles = _run(RTTDDFTModel(**ours), fields, 0.2)
    assert np.array_equal(a_sources, b_sources) and np.array_equal(a_dipoles, b_dipoles)
    assert abs(a_dipoles[0, 0]).max() < 1e-8  # the permanent electronic dipole removed


# ---------------------------------------------------------------- staging and state


def _misaligned(state):
    """Copies of the state arrays at another memory offset (numpy's SIMD loops can round
    differently with alignment, which would break bitwise resumption)."""
    out = {}
    for key, value in state.items():
        buf = np.empty(value.nbytes + 64, dtype=np.uint8)
        start = 16 if buf.ctypes.data % 32 == 0 else 32 - buf.ctypes.data % 32
        view = buf[start : start + value.nbytes].view(value.dtype).reshape(value.shape)
        view[...] = value
        out[key] = view
    return out


@pytest.mark.parametrize("xc", ["hf", "pbe"])
def test_staging_is_pure_and_state_round_trip_is_bitwise(xc, tmp_path):
    """Staging twice gives the same bits and leaves the state alone; a state saved and
    restored (through an .npz file as the driver's checkpoints, at another memory
    alignment, into a new model) continues with identical bits."""
    rng = np.random.default_rng(5)
    fields = 1e-2 * rng.standard_normal((6, 2, 3))
    model = _water(n=2, xc=xc, kick_au=[1e-3, 0.0], dt_substep_au=0.1)
    model.initialize(dt_au=0.3)
    for field in fields[:3]:
        model.step(field)
    saved = model.get_state()
    before = {key: value.copy() for key, value in model._state.items()}
    first = model.stage(fields[3])
    again = model.stage(fields[3])
    assert np.array_equal(first, again)
    for key, value in model._state.items():
        assert np.array_equal(value, before[key]), key
    reference = [model.step(field) for field in fields[3:]]

    np.savez(tmp_path / "state.npz", **saved)
    with np.load(tmp_path / "state.npz", allow_pickle=False) as f:
        from_file = {key: f[key] for key in f.files}
    for restored in (from_file, _misaligned(saved)):
        other = _water(n=2, xc=xc, kick_au=[1e-3, 0.0], dt_substep_au=0.1)
        other.initialize(dt_au=0.3)
        other.set_state(restored)
        assert other.time_au == saved["time_au"]
        for field, expected in zip(fields[3:], reference, strict=True):
            assert np.array_equal(other.step(field), expected)
        assert all(np.array_equal(other.get_state()[k], model.get_state()[k]) for k in saved)


# ---------------------------------------------------------------- errors


def test_errors_name_the_culprit(tmp_path):
    bad = tmp_path / "bad.xyz"
    bad.write_text("3\n0 1\nO 0 0 0\nH 0 0.75 x\nH 0 -0.75 0\n")
    with pytest.raises(ValueError, match=r"bad\.xyz, line 4: coordinates"):
        RTTDDFTModel(xyz=str(bad))
    bad.write_text("3\n0 1\nO 0 0 0\nQq 0 0.75 0\nH 0 -0.75 0\n")
    with pytest.raises(ValueError, match=r"bad\.xyz, line 4: 'Qq' is not"):
        RTTDDFTModel(xyz=str(bad))
    bad.write_text("3\n0 1\nO 0 0 0\n")
    with pytest.raises(ValueError, match=r"bad\.xyz: line 1 announces 3 atom"):
        RTTDDFTModel(xyz=str(bad))
    bad.write_text("3\n0 2\nO 0 0 0.1173\nH 0 0.7572 -0.4692\nH 0 -0.7572 -0.4692\n")
    with pytest.raises(
        ValueError,
        match=r"multiplicity 2 is impossible with 10 electrons.*"
        r"bad\.xyz, line 2",
    ):
        RTTDDFTModel(xyz=str(bad))
    with pytest.raises(ParameterError, match=r"parameter molecule_xyz = .*missing\.xyz"):
        RTTDDFTModel(molecule_xyz=str(tmp_path / "missing.xyz"))
    with pytest.raises(ValueError, match=r"parameter xc = 'pbx'"):
        RTTDDFTModel(xyz=WATER, xc="pbx")
    with pytest.raises(ValueError, match=r"basis 'sto-3g' has no functions for"):
        RTTDDFTModel(atoms="Og 0 0 0", basis="sto-3g", multiplicity=1)
    with pytest.raises(ValueError, match=r"exactly one of xyz"):
        RTTDDFTModel(xyz=WATER, atoms="H 0 0 0; H 0 0 0.74")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) kick"):
        RTTDDFTModel(xyz=WATER, kick=1.0)
    with pytest.raises(ValueError, match=r"delta_kick_direction = 'w'"):
        RTTDDFTModel(molecule_xyz=WATER, delta_kick_direction="w")
    with pytest.raises(ValueError, match=r"propagator = 'rk4'"):
        RTTDDFTModel(xyz=WATER, propagator="rk4")
    with pytest.raises(
        ValueError,
        match=r"parameter charge = 1 contradicts .*water\.xyz, "
        r"line 2",
    ):
        RTTDDFTModel(xyz=WATER, charge=1)


def test_dft_needs_pyscf_grid_and_reports_scf():
    """The DFT ground state is PySCF's RKS on the requested grid level."""
    model = _water(xc="pbe", grid_level=1)
    mf = dft.RKS(model.core.mol, xc="pbe")
    mf.grids.level = 1
    mf.verbose = 0
    mf.conv_tol = 1e-12
    assert model.scf_energy == pytest.approx(mf.kernel(), abs=1e-9)
    assert model.extras_of(0)["energy_au"] == pytest.approx(model.scf_energy, abs=1e-9)
