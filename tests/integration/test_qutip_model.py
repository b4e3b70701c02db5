"""The ``qutip`` model (src/maxwellhub/models/open_quantum.py) against the ``tls``
model, QuTiP's own solver and closed forms; MaxwellLink's build_model files and parameters."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from _util import REPO_ROOT

from maxwellhub.models import ParameterError, create_model, get_model_class
from maxwellhub_drivers.cli import _text_keys, parse_params

qt = pytest.importorskip("qutip")

ROOT = REPO_ROOT
BUILD_TLS = ROOT / "examples" / "models" / "build_tls.py"
PEER_BUILD_TLS = (
    ROOT / ".peers/maxwelllink/lib/python3.11/site-packages/maxwelllink/_workspace_payload"
    "/tests/test_qutip/build_tls.py"
)
TLS: dict[str, Any] = {
    "omega": 0.24188843,
    "mu12": 187.0819866,
    "pe_initial": 0.2,
    "e_phase_initial": 0.5,
}
KEYS = ("Pe", "Pg", "Pge_real", "Pge_imag", "energy_au", "mux_au", "muy_au", "muz_au")
NLEVEL: dict[str, Any] = {
    "preset": "nlevel",
    "energies": [0.30, 0.42, 0.55],
    "dipoles": [[0.0, 0.4, 1.1], [0.9, 0.0, 0.2], [0.3, 0.7, 0.0]],
}


def _run(model, fields, dt=0.5):
    model.initialize(dt_au=dt)
    sources, extras = [], []
    for f in fields:
        sources.append(model.step(f))
        extras.append(model.extras())
    return np.array(sources), {k: np.array([e[k] for e in extras]) for k in extras[0]}


@pytest.mark.parametrize("orientation", [0, 2])
def test_tls_preset_follows_the_tls_model(orientation):
    """The TLS preset equals the ``tls`` model step by step under a random field (the same
    split; only the arithmetic differs): sources and extras to 1e-12 of their scale."""
    fields = np.random.default_rng(7).normal(scale=2e-3, size=(800, 2, 3))
    params = dict(TLS, orientation=orientation)
    src_q, ext_q = _run(create_model("qutip", n=2, **params), fields)
    src_t, ext_t = _run(create_model("tls", n=2, **params), fields)
    assert np.abs(src_t).max() > 1.0  # the field drives the system hard
    err = np.abs(src_q - src_t).max() / np.abs(src_t).max()
    print(f"\nTLS preset vs tls: max relative source error {err:.1e}")
    assert err < 1e-12
    for key in KEYS:
        scale = max(1.0, np.abs(ext_t[key]).max())
        np.testing.assert_allclose(ext_q[key], ext_t[key], rtol=0, atol=1e-12 * scale, err_msg=key)


def _qutip_reference(model_params, field, dt, steps):
    """QuTiP's mesolve for the same system under a constant field (tight tolerances)."""
    from maxwellhub.models.open_quantum import build_nlevel

    cfg = build_nlevel(
        **{k: v for k, v in model_params.items() if k not in ("preset",)},
    )
    h = qt.Qobj(cfg["H0"])
    for k, axis in enumerate("xyz"):
        if cfg["mu_ops"][axis] is not None:
            h = h - field[k] * qt.Qobj(cfg["mu_ops"][axis])
    times = dt * np.arange(steps + 1)
    result = qt.mesolve(
        h,
        qt.Qobj(cfg["rho0"]),
        times,
        c_ops=[qt.Qobj(c) for c in cfg["c_ops"]],
        options={"atol": 1e-13, "rtol": 1e-12, "nsteps": 100000},
    )
    return np.array([s.full() for s in result.states[1:]])


def test_nlevel_against_qutip_mesolve():
    """A 4-level system with decay and dephasing under a constant field: populations and
    rho follow qutip.mesolve with the split's O(dt^2) error (halving dt divides the error
    by 4 within 10%), and they move by far more than the error."""
    params: dict[str, Any] = dict(
        NLEVEL, pe_initial=0.3, e_phase_initial=0.2, gamma_relax=0.01, gamma_dephase=0.004
    )
    field = np.array([0.01, -0.02, 0.03])
    errors = []
    for dt, steps in ((0.4, 100), (0.2, 200)):
        model = create_model("qutip", **params)
        model.initialize(dt_au=dt)
        rhos = []
        for _ in range(steps):
            model.step(field[None])
            rhos.append(model.get_state()["rho"][0])
        ref = _qutip_reference(params, field, dt, steps)
        pops = np.diagonal(ref, axis1=1, axis2=2).real
        assert np.ptp(pops[:, 0]) > 0.05 and np.ptp(pops[:, 2]) > 1e-3
        errors.append(np.abs(np.array(rhos) - ref).max())
    ratio = errors[0] / errors[1]
    print(
        f"\nnlevel vs mesolve: max |rho error| {errors[0]:.2e} (dt 0.4), {errors[1]:.2e} "
        f"(dt 0.2), ratio {ratio:.2f}"
    )
    assert errors[0] < 1e-3
    assert 3.6 < ratio < 4.4


def test_dephasing_decays_the_coherence_at_two_gamma():
    """c = sqrt(gamma) sigma_z (the TLS preset, and the build_tls.py file) decays rho_01 at
    exactly 2 gamma; the N-level preset's coherences all at 2 gamma too; populations stay."""
    gamma, dt, steps = 3e-3, 0.5, 400
    t = dt * np.arange(1, steps + 1)
    cases: tuple[dict[str, Any], ...] = (
        {"pe_initial": 0.3, "gamma_dephase": gamma},
        {"preset": "custom", "module": str(BUILD_TLS), "pe_initial": 0.3, "gamma_dephase": gamma},
    )
    for params in cases:
        _, ext = _run(create_model("qutip", **params), np.zeros((steps, 1, 3)), dt)
        coherence = np.hypot(ext["Pge_real"][:, 0], ext["Pge_imag"][:, 0])
        expected = np.sqrt(0.3 * 0.7) * np.exp(-2 * gamma * t)
        np.testing.assert_allclose(coherence, expected, rtol=1e-11)
        np.testing.assert_allclose(ext["Pe"][:, 0], 0.3, rtol=1e-12)
    model = create_model("qutip", **NLEVEL, pe_initial=0.4, gamma_dephase=gamma)
    model.initialize(dt_au=dt)
    rho0 = model.get_state()["rho"][0]
    for _ in range(steps):
        model.step(np.zeros((1, 3)))
    rho = model.get_state()["rho"][0]
    assert abs(rho[0, 1]) == pytest.approx(abs(rho0[0, 1]) * np.exp(-2 * gamma * t[-1]), rel=1e-11)


def test_set_params_rebuilds_the_propagator():
    """A rate changed between steps takes effect at once: the coherence then decays at the
    new 2 gamma, and a decay rate empties the excited state at gamma_relax."""
    model = create_model("qutip", pe_initial=0.5)
    model.initialize(dt_au=1.0)
    model.step(np.zeros((1, 3)))
    before = model.extras()["Pge_real"][0] ** 2 + model.extras()["Pge_imag"][0] ** 2
    model.set_params({"gamma_dephase": 0.01})
    for _ in range(50):
        model.step(np.zeros((1, 3)))
    after = model.extras()["Pge_real"][0] ** 2 + model.extras()["Pge_imag"][0] ** 2
    assert np.sqrt(after / before) == pytest.approx(np.exp(-2 * 0.01 * 50), rel=1e-11)
    model.set_params({"gamma_dephase": 0.0, "gamma_relax": 0.02})
    pe = model.extras()["Pe"][0]
    for _ in range(50):
        model.step(np.zeros((1, 3)))
    assert model.extras()["Pe"][0] == pytest.approx(pe * np.exp(-0.02 * 50), rel=1e-11)


def test_fd_source_is_the_dipole_difference():
    """fd_dmudt=true: the source is (mu(t + dt) - mu(t)) / dt of the reported dipoles; the
    analytic source agrees with it to O(dt^2) for a slowly varying dipole."""
    fields = np.random.default_rng(3).normal(scale=1e-3, size=(50, 1, 3))
    fd = create_model("qutip", **NLEVEL, pe_initial=0.1, fd_dmudt=True)
    src, ext = _run(fd, fields, dt=0.05)
    mu = np.stack([ext[k][:, 0] for k in ("mux_au", "muy_au", "muz_au")], axis=1)
    np.testing.assert_allclose(src[1:, 0], np.diff(mu, axis=0) / 0.05, rtol=1e-9, atol=1e-13)
    analytic, _ = _run(create_model("qutip", **NLEVEL, pe_initial=0.1), fields, dt=0.05)
    assert np.abs(analytic - src).max() < 0.02 * np.abs(analytic).max()


def test_analytic_source_is_the_liouvillian_derivative():
    """The analytic source is d<mu>/dt = Tr(mu L[rho]) with QuTiP's own Liouvillian (field
    and dissipator included) at the new state and the step's field, on every axis."""
    params = dict(NLEVEL, pe_initial=0.3, gamma_relax=0.02, gamma_dephase=0.01)
    model = create_model("qutip", **params)
    model.initialize(dt_au=0.3)
    from maxwellhub.models.open_quantum import build_nlevel

    cfg = build_nlevel(**{k: v for k, v in params.items() if k != "preset"})
    mus = [qt.Qobj(cfg["mu_ops"][a]) for a in "xyz"]
    for field in np.random.default_rng(2).normal(scale=0.05, size=(5, 3)):
        source = model.step(field[None])[0]
        rho = qt.Qobj(model.get_state()["rho"][0])
        h = qt.Qobj(cfg["H0"]) - sum(e * m for e, m in zip(field, mus, strict=True))
        lrho = qt.vector_to_operator(
            qt.liouvillian(h, [qt.Qobj(c) for c in cfg["c_ops"]]) * qt.operator_to_vector(rho)
        )
        expected = [(m * lrho).tr().real for m in mus]
        np.testing.assert_allclose(source, expected, rtol=1e-12, atol=1e-15)
        assert np.abs(expected).min() > 1e-4


def test_maxwelllink_job_parameters_run_unchanged(tmp_path):
    """MaxwellLink's --param string for a build_model file, parsed as maxwellhub-driver
    parses it, builds the model; with our example file and with MaxwellLink's own test
    file (when its package is there) it equals the TLS preset with the same values."""
    cls = get_model_class("qutip")
    text = (
        "preset=custom, module={path}, fd_dmudt=false, "
        "kwargs=omega=0.242,mu12=187,orientation=2,pe_initial=1e-4,gamma_relax=1e-3"
    )
    files = [BUILD_TLS] + ([PEER_BUILD_TLS] if PEER_BUILD_TLS.exists() else [])
    fields = np.random.default_rng(5).normal(scale=1e-3, size=(100, 1, 3))
    preset = _run(
        create_model("qutip", omega=0.242, mu12=187, pe_initial=1e-4, gamma_relax=1e-3), fields
    )[0]
    for path in files:
        params = parse_params(
            [text.format(path=os.path.relpath(path, tmp_path))], text_keys=_text_keys(cls)
        )
        assert params["kwargs"] == "omega=0.242" and params["gamma_relax"] == 1e-3
        canonical = cls.validate_params(1, base_dir=tmp_path, **params)
        src = _run(create_model("qutip", **canonical), fields)[0]
        np.testing.assert_allclose(
            src, preset, rtol=0, atol=1e-12 * np.abs(preset).max(), err_msg=str(path)
        )
    # MaxwellLink's preset form: preset_kwargs split at the commas, and quoted whole
    for pairs in (
        ["preset=tls, preset_kwargs=omega=0.242,mu12=187,pe_initial=1e-4,gamma_relax=1e-3"],
        ["preset=tls, preset_kwargs='omega=0.242,mu12=187,pe_initial=1e-4,gamma_relax=1e-3'"],
    ):
        params = parse_params(pairs, text_keys=_text_keys(cls))
        np.testing.assert_array_equal(_run(create_model("qutip", **params), fields)[0], preset)


def test_nlevel_arrays_as_text_and_lists_agree():
    """energies/dipoles as JSON text (the command line) and as lists (Python, TOML) build
    the same model; N levels report P0..P{N-1} and no TLS names."""
    a = create_model("qutip", **NLEVEL)
    b = create_model(
        "qutip", preset="nlevel", energies="[0.30, 0.42, 0.55]", dipoles=str(NLEVEL["dipoles"])
    )
    assert a.params["energies"] == b.params["energies"].replace("0.30", "0.3")
    assert set(a.extras()) == {
        "time_au",
        "energy_au",
        "mux_au",
        "muy_au",
        "muz_au",
        "P0",
        "P1",
        "P2",
        "P3",
    }


@pytest.mark.parametrize(
    "params, key",
    [
        ({"omgea": 0.2}, "omgea"),
        ({"gamma_relax": -1.0}, "gamma_relax"),
        ({"pe_initial": 1.5}, "pe_initial"),
        ({"preset": "custom"}, "preset"),
        ({"module": str(BUILD_TLS)}, "module"),
        ({"preset": "custom", "module": str(BUILD_TLS), "kwargs": "omegaa=1"}, "kwargs"),
        ({"preset_kwargs": "omega=0.2,bogus=1"}, "preset_kwargs"),
        ({"preset": "nlevel", "energies": "[0.3, 0.4"}, "energies"),
        ({"preset": "nlevel", "energies": "[0.3]"}, "dipoles"),
        ({"energies": "[0.3]"}, "energies"),
        ({"preset": "nlevel", "energies": "[0.3, 0.4]", "dipoles": "[1.0]"}, "energies"),
        ({"preset": "quantum"}, "preset"),
        ({**NLEVEL, "energies": "[0.3, 0.4, 0.5]", "dipoles": "[1, 2, 3]", "omega": 0.3}, "omega"),
        ({"preset": "custom", "module": "no_such_file.py"}, "module"),
    ],
)
def test_bad_parameters_name_the_key(params, key):
    with pytest.raises(ParameterError) as info:
        get_model_class("qutip").validate_params(1, **params)
    assert info.value.key == key
    assert key in str(info.value)


def test_a_broken_module_names_the_module(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def build_model(**kw):\n    return {'H0': [[0, 1], [2, 0]]}\n")
    with pytest.raises(ParameterError, match="not Hermitian") as info:
        create_model("qutip", preset="custom", module=str(bad))
    assert info.value.key == "module"


def test_without_qutip_the_error_names_the_extra(monkeypatch):
    """The module imports QuTiP when it loads, so a missing QuTiP is one clear error."""
    import sys

    monkeypatch.setitem(sys.modules, "qutip", None)  # as if QuTiP were not installed
    monkeypatch.delitem(sys.modules, "maxwellhub.models.open_quantum", raising=False)
    with pytest.raises(ValueError) as info:
        get_model_class("qutip")
    assert str(info.value) == "model 'qutip' needs QuTiP: pip install 'maxwellhub[qutip]'"


# ---------------------------------------------------------------- in Meep (2D)

MEEP_TLS = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 1e-4}


def _meep_sim(mp):
    mp.verbosity(0)
    return mp.Simulation(cell_size=mp.Vector3(8, 8), resolution=10, boundary_layers=[mp.PML(3.0)])


def _meep_embedded(model, until=90, **params):
    mp = pytest.importorskip("meep")
    from maxwellhub.em import MeepCoupling

    sim = _meep_sim(mp)
    coupling = MeepCoupling(sim, time_units_fs=0.1)
    coupling.add_molecules(model, centers=[(0, 0)], sigma=0.1, axis="z", **params)
    sim.run(coupling.step_function(), until=until)
    return coupling.history()


@pytest.mark.meep
def test_tls_preset_in_meep_follows_the_tls_model():
    """The 2D relaxation run (1801 coupled steps, EM feedback included): the embedded TLS
    preset follows the embedded ``tls`` model to 1e-10 of each quantity's scale (reached:
    about 1e-11 for Pe, 5e-13 for muz)."""
    tls = _meep_embedded("tls", **MEEP_TLS)
    qtp = _meep_embedded("qutip", **MEEP_TLS)
    assert tls["Pe"].shape == qtp["Pe"].shape == (1801, 1)
    assert tls["Pe"][-1, 0] < 0.7 * tls["Pe"][0, 0]  # it did relax
    worst = {}
    for key in ("Pe", "Pg", "Pge_real", "Pge_imag", "muz_au", "energy_au", "time_au"):
        scale = np.abs(tls[key]).max()
        worst[key] = np.abs(qtp[key] - tls[key]).max() / scale
        assert worst[key] < 1e-10, key
    print(
        "\nqutip TLS vs tls in 2D Meep, max |diff| / scale: "
        + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    )


@pytest.mark.meep
def test_maxwelllink_build_file_behind_a_socket_driver(unix_name, deadline):
    """MaxwellLink's 2D QuTiP relaxation job (its build_model file, its --param string,
    gamma_relax = 1e-3) through ``maxwellhub-driver``: the socket trajectory equals the
    embedded one to 1e-12, and Pe decays at the golden-rule rate plus gamma_relax within
    MaxwellLink's own tolerances (std < 3e-3, max < 8e-3)."""
    mp = pytest.importorskip("meep")
    from maxwellhub import SocketHub
    from maxwellhub.analysis import compare_to_curve, golden_rule_rate
    from maxwellhub.em import MeepCoupling
    from maxwellhub.run.launch import reap, start_driver
    from maxwellhub.units import MeepUnits

    gamma_relax = 1e-3
    params = {
        "preset": "custom",
        "module": str(BUILD_TLS),
        "fd_dmudt": "false",
        "kwargs": f"omega=0.242,mu12=187,orientation=2,pe_initial=1e-4,gamma_relax={gamma_relax}",
    }
    hub = SocketHub(unixsocket=unix_name, timeout=deadline(30))
    drivers = []
    try:
        drivers = [start_driver("qutip", params, unix=unix_name)]
        sim = _meep_sim(mp)
        coupling = MeepCoupling(sim, time_units_fs=0.1, hub=hub, timeout=deadline(30))
        coupling.add_socket_molecules(centers=[(0, 0)], sigma=0.1, axis="z")
        sim.run(coupling.step_function(), until=90)
        socket = coupling.history()
    finally:
        hub.stop()
        codes = reap(drivers, deadline(5))
    assert codes == [0]
    embedded = _meep_embedded("qutip", **MEEP_TLS, gamma_relax=gamma_relax)
    for key in ("Pe", "Pge_real", "Pge_imag", "muz_au", "energy_au", "time_au"):
        np.testing.assert_allclose(socket[key], embedded[key], rtol=0, atol=1e-12, err_msg=key)
    units = MeepUnits(0.1)
    t = units.time_au_to_meep(socket["time_au"][:, 0])
    gamma = golden_rule_rate(2, units.frequency_au_to_meep(0.242), units.dipole_au_to_meep(187.0))
    gamma += units.frequency_au_to_meep(gamma_relax)  # a rate converts as a frequency
    errors = compare_to_curve(t, socket["Pe"][:, 0], gamma)
    print(f"\nMaxwellLink qutip job via socket: std {errors['std']:.2e} max {errors['max']:.2e}")
    assert errors["std"] < 3e-3 and errors["max"] < 8e-3
