"""The driver models (tls, sho), their base-class bookkeeping, the parameter interface
(kinds, aliases, validation, mutable parameters, generators) and the model registry."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import scipy.linalg
from _toy_models import ToyKicked
from _util import mxl_venv, scaled

import maxwellhub.models as models
from maxwellhub.models import (
    REQUIRED,
    LazyModel,
    Model,
    Parameter,
    ParameterError,
    SHOModel,
    TLSModel,
    create_model,
    get_model_class,
    register_model,
)

OMEGA = 0.24188843
MU12 = 187.0819866
DT = 0.5
# A field whose coupling dt * E * mu12 is of order 0.1 rad per step: strong driving.
E_SCALE = 1e-3

TLS_EXTRAS = {
    "time_au",
    "energy_au",
    "mux_au",
    "muy_au",
    "muz_au",
    "Pe",
    "Pg",
    "Pge_real",
    "Pge_imag",
}
SHO_EXTRAS = {
    "time_au",
    "energy_au",
    "mux_au",
    "muy_au",
    "muz_au",
    "mux_m_au",
    "muy_m_au",
    "muz_m_au",
    "p_au",
    "q_au",
}


def random_fields(steps: int, n: int, seed: int = 0, scale: float = E_SCALE) -> np.ndarray:
    """(steps, n, 3) random fields in a.u."""
    return np.random.default_rng(seed).normal(scale=scale, size=(steps, n, 3))


def tls_rho(model) -> np.ndarray:
    """The (n, 2, 2) density matrices of a TLS model's committed Bloch vectors."""
    x, y, z = model.get_state()["bloch"].T
    rho = np.empty((len(x), 2, 2), dtype=complex)
    rho[:, 0, 0], rho[:, 1, 1] = 0.5 * (1 + z), 0.5 * (1 - z)
    rho[:, 0, 1] = 0.5 * (x + 1j * y)
    rho[:, 1, 0] = 0.5 * (x - 1j * y)
    return rho


def tls_reference_step(rho, field, omega, mu12, axis, dt):
    """One TLS step with scipy's general matrix exponential (MaxwellLink's formulation)."""
    h0 = np.diag([0.0, omega]).astype(complex)
    sigma_x = np.array([[0, 1], [1, 0]], dtype=complex)
    half = scipy.linalg.expm(-1j * dt * h0 / 2)
    u = half @ scipy.linalg.expm(1j * dt * field[axis] * mu12 * sigma_x) @ half
    return u @ rho @ u.conj().T


# ---------------------------------------------------------------- TLS physics


def test_tls_invariants_over_many_steps():
    """rho stays Hermitian, unit-trace and positive over 10^4 randomly driven steps."""
    n, steps = 4, 10_000
    model = create_model(
        "tls",
        n=n,
        pe_initial=[0.0, 0.3, 1.0, 0.5],
        e_phase_initial=[0.0, 1.0, 0.0, -2.0],
        orientation=[0, 1, 2, 2],
    )
    model.initialize(dt_au=DT)
    fields = random_fields(steps, n, seed=1)
    history = np.empty((steps, n, 2, 2), dtype=complex)
    for k in range(steps):
        model.step(fields[k])
        history[k] = tls_rho(model)
    hermitian_error = np.abs(history - history.conj().swapaxes(-1, -2)).max()
    trace_error = np.abs(np.trace(history, axis1=-2, axis2=-1) - 1).max()
    eigenvalues = np.linalg.eigvalsh(0.5 * (history + history.conj().swapaxes(-1, -2)))
    assert hermitian_error < 1e-13
    assert trace_error < 1e-12
    assert eigenvalues.min() > -1e-12
    assert eigenvalues.max() < 1 + 1e-12
    assert np.abs(history).max() > 0.1  # the field really drove the molecules


def test_tls_closed_form_matches_expm_reference():
    """Each closed-form step equals the scipy.linalg.expm reference step to 1e-14, and a
    300-step trajectory stays within 1e-12 of the reference (round-off accumulating)."""
    params: dict[str, list] = {
        "omega": [OMEGA, 0.5, 0.1],
        "mu12": [MU12, 50.0, -300.0],
        "orientation": [2, 0, 1],
        "pe_initial": [0.2, 0.0, 0.9],
        "e_phase_initial": [0.3, 0.0, -1.0],
    }
    n, steps = 3, 300
    model = create_model("tls", n=n, **params)
    model.initialize(dt_au=DT)
    reference = tls_rho(model)
    fields = random_fields(steps, n, seed=2)
    for k in range(steps):
        before = tls_rho(model)
        sources = model.step(fields[k])
        after = tls_rho(model)
        for i in range(n):
            omega, mu12, axis = (params[key][i] for key in ("omega", "mu12", "orientation"))
            one_step = tls_reference_step(before[i], fields[k, i], omega, mu12, axis, DT)
            assert np.abs(after[i] - one_step).max() < 1e-14
            expected = -2 * omega * mu12 * one_step[0, 1].imag
            assert abs(sources[i, axis] - expected) < 1e-14 * 2 * omega * abs(mu12)
            reference[i] = tls_reference_step(reference[i], fields[k, i], omega, mu12, axis, DT)
    assert np.abs(tls_rho(model) - reference).max() < 1e-12


def test_tls_free_precession():
    """At E = 0 populations stay put and rho_01 turns as exp(+i omega t)."""
    model = create_model("tls", pe_initial=0.25, e_phase_initial=0.7)
    model.initialize(dt_au=DT)
    rho0 = tls_rho(model)[0]
    for k in range(1, 2001):
        sources = model.step(np.zeros((1, 3)))
        t = k * DT
        rho = tls_rho(model)[0]
        expected01 = rho0[0, 1] * np.exp(1j * OMEGA * t)
        assert abs(rho[0, 1] - expected01) < 1e-12
        assert abs(rho[1, 1].real - 0.25) < 1e-15
        assert sources[0, 2] == pytest.approx(-2 * OMEGA * MU12 * expected01.imag, abs=1e-9)
    assert model.time_au == pytest.approx(2000 * DT)


def test_tls_batched_equals_single():
    """n molecules in one model give bit for bit what n single-molecule models give."""
    params = {
        "omega": [0.2, OMEGA, 0.3, 0.25, 0.4],
        "mu12": [100.0, MU12, 50.0, 10.0, 300.0],
        "orientation": [0, 1, 2, 2, 0],
        "pe_initial": [0.0, 0.1, 0.5, 1.0, 0.01],
        "e_phase_initial": [0.0, 0.5, 1.0, 1.5, 2.0],
    }
    check_batched_equals_single("tls", params, steps=300)


def check_batched_equals_single(name: str, params: dict, steps: int) -> None:
    """Step a batched model and one model per molecule (those take the float path for
    n = 1); sources, extras and states must agree bit for bit."""
    n = len(next(iter(params.values())))
    batched = create_model(name, n=n, **params)
    batched.initialize(dt_au=DT, molecule_ids=list(range(10, 10 + n)))
    singles = [
        create_model(name, **{key: value[i] for key, value in params.items()}) for i in range(n)
    ]
    for i, single in enumerate(singles):
        single.initialize(dt_au=DT, molecule_ids=[10 + i])
    fields = random_fields(steps, n, seed=3)
    for k in range(steps):
        sources = batched.step(fields[k])
        extras = batched.extras()
        for i, single in enumerate(singles):
            one = single.step(fields[k][i : i + 1])
            np.testing.assert_array_equal(sources[i], one[0])
            row = {key: float(value[i]) for key, value in extras.items()}
            assert single.extras_of(0) == batched.extras_of(i) == row
            assert {key: float(value[0]) for key, value in single.extras().items()} == row
    state = batched.get_state()
    for i, single in enumerate(singles):
        for key, value in single.get_state().items():
            np.testing.assert_array_equal(
                value, state[key] if key == "time_au" else state[key][i : i + 1]
            )


def test_stage_is_idempotent():
    """Staging twice (even with another field first) then committing equals staging once."""
    for name in ("tls", "sho"):
        once = create_model(name, n=2)
        twice = create_model(name, n=2)
        for model in (once, twice):
            model.initialize(dt_au=DT)
        fields = random_fields(50, 2, seed=4)
        for k in range(50):
            before = twice.get_state()
            twice.stage(-fields[k])
            first = twice.stage(fields[k]).copy()
            second = twice.stage(fields[k])
            # staging leaves the committed state and its extras alone
            for key, value in twice.get_state().items():
                np.testing.assert_array_equal(value, before[key])
            np.testing.assert_array_equal(first, second)
            np.testing.assert_array_equal(twice.commit(), once.step(fields[k]))
        for key, value in once.get_state().items():
            np.testing.assert_array_equal(twice.get_state()[key], value)


def test_tls_extras_keys_and_values():
    """TLS extras carry MaxwellLink's keys, per molecule, for the committed state."""
    model = create_model("tls", n=2, orientation=[0, 2], pe_initial=0.3, e_phase_initial=0.4)
    model.initialize(dt_au=DT)
    model.step(random_fields(1, 2, seed=5)[0])
    extras = model.extras()
    assert set(extras) == TLS_EXTRAS == {"time_au", *TLSModel.extras_keys}
    dipole = MU12 * model.get_state()["bloch"][:, 0]
    np.testing.assert_array_equal(extras["mux_au"], [dipole[0], 0.0])
    np.testing.assert_array_equal(extras["muz_au"], [0.0, dipole[1]])
    np.testing.assert_array_equal(extras["muy_au"], [0.0, 0.0])
    np.testing.assert_allclose(extras["Pe"] + extras["Pg"], 1.0, rtol=1e-15)
    np.testing.assert_allclose(extras["energy_au"], OMEGA * extras["Pe"], rtol=1e-15)
    np.testing.assert_array_equal(extras["time_au"], [DT, DT])


# ---------------------------------------------------------------- SHO physics


def test_sho_energy_conservation_at_zero_field():
    """Velocity Verlet at E = 0: K = p^2 + w^2 (1 - h) q^2 with h = (w dt)^2/4 is conserved
    to 1e-12 relative over 40960 steps, so H = (p^2 + w^2 q^2)/2 stays within a relative
    h/(1-h) (about 0.37 % at the defaults) and never drifts."""
    model = create_model("sho", n=2, q_initial=[0.3, 0.0], p_initial=[0.1, -0.2])
    model.initialize(dt_au=DT)
    h = (OMEGA * DT) ** 2 / 4
    steps = 40_960
    k_values = np.empty((steps, 2))
    h_values = np.empty((steps, 2))
    for k in range(steps):
        model.step(np.zeros((2, 3)))
        state = model.get_state()
        p, q = state["p"], state["q"]
        k_values[k] = p * p + OMEGA**2 * (1 - h) * q * q
        h_values[k] = 0.5 * (p * p + OMEGA**2 * q * q)
    assert (np.ptp(k_values, axis=0) / k_values[0]).max() < 1e-12
    assert (np.ptp(h_values, axis=0) / h_values.min(axis=0)).max() <= h / (1 - h) * (1 + 1e-9)
    energy = model.extras()["energy_au"]
    assert np.all(np.abs(energy - 0.5 * k_values[-1]) <= 0.5 * k_values[-1] * h / (1 - h))


def test_sho_starts_with_the_force_of_q_initial():
    """The first step from q_initial uses a = -omega^2 q_initial (MaxwellLink starts at 0)."""
    q0, p0 = 0.3, 0.1
    model = create_model("sho", q_initial=q0, p_initial=p0)
    model.initialize(dt_au=DT)
    model.step(np.zeros((1, 3)))
    p_half = p0 - 0.5 * OMEGA**2 * q0 * DT
    assert model.get_state()["q"][0] == pytest.approx(q0 + p_half * DT, rel=1e-15)


def test_sho_follows_velocity_verlet_with_field():
    """Under a field the SHO steps are MaxwellLink's velocity Verlet and report its extras."""
    mu0, omega = 150.0, 0.3
    model = create_model("sho", n=1, mu0=mu0, omega=omega, orientation=1)
    model.initialize(dt_au=DT)
    fields = random_fields(100, 1, seed=6)
    p = q = a = t = 0.0
    for k in range(100):
        sources = model.step(fields[k])
        e = fields[k, 0, 1]
        p += 0.5 * a * DT
        q += p * DT
        a = -(omega**2) * q + e * mu0
        p += 0.5 * a * DT
        p_half = p + 0.5 * a * DT
        q_half = q + 0.5 * p_half * DT
        t += DT
        assert sources[0].tolist() == [0.0, p_half * mu0, 0.0]
        extras = {key: value[0] for key, value in model.extras().items()}
        assert extras == {
            "time_au": t,
            "energy_au": 0.5 * omega**2 * q_half**2 + 0.5 * p_half**2,
            "mux_au": 0.0,
            "muy_au": mu0 * q_half,
            "muz_au": 0.0,
            "mux_m_au": 0.0,
            "muy_m_au": mu0 * q,
            "muz_m_au": 0.0,
            "p_au": p,
            "q_au": q,
        }
    assert set(model.extras()) == SHO_EXTRAS


def test_sho_batched_equals_single():
    """n SHOs in one model give bit for bit what n single-molecule models give."""
    params = {
        "omega": [0.2, OMEGA, 0.3],
        "mu0": [100.0, MU12, 50.0],
        "orientation": [0, 1, 2],
        "p_initial": [0.0, 0.1, -0.2],
        "q_initial": [0.0, 0.5, 0.1],
    }
    check_batched_equals_single("sho", params, steps=300)


# ---------------------------------------------------------------- base-class bookkeeping


@pytest.mark.parametrize("name", ["tls", "sho"])
def test_state_round_trip(name):
    """get_state/set_state round-trips exactly and a restored model continues identically."""
    original = create_model(name, n=2, orientation=[0, 2])
    original.initialize(dt_au=DT)
    fields = random_fields(40, 2, seed=7)
    for k in range(20):
        original.step(fields[k])
    state = original.get_state()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert float(state["time_au"]) == original.time_au == 20 * DT
    json.dumps({k: v.tolist() for k, v in state.items() if v.dtype.kind != "c"})
    restored = create_model(name, n=2, orientation=[0, 2])
    restored.initialize(dt_au=DT)
    restored.stage(fields[0])  # a staged step is dropped by set_state
    restored.set_state(state)
    assert not restored.staged
    for value in state.values():  # the model holds its own copies
        value[...] = 0
    for k in range(20, 40):
        np.testing.assert_array_equal(restored.step(fields[k]), original.step(fields[k]))
    for key, value in original.extras().items():
        np.testing.assert_array_equal(restored.extras()[key], value)


def test_set_state_rejects_foreign_states():
    """set_state names the wrong keys or shapes instead of accepting them."""
    tls = create_model("tls", n=2)
    with pytest.raises(ValueError, match="keys"):
        tls.set_state(create_model("sho", n=2).get_state())
    bad = tls.get_state()
    bad["bloch"] = bad["bloch"][:1]
    with pytest.raises(ValueError, match=r"shape \(1, 3\), expected \(2, 3\)"):
        tls.set_state(bad)
    bad = tls.get_state()
    bad["time_au"] = np.array(np.nan)
    with pytest.raises(ValueError, match="time_au"):
        tls.set_state(bad)


def test_usage_errors_are_clear():
    """Stepping before initialize, committing nothing and bad fields or dt raise clearly."""
    model = create_model("tls", n=2)
    with pytest.raises(RuntimeError, match="initialize"):
        model.stage(np.zeros((2, 3)))
    with pytest.raises(RuntimeError, match="nothing staged"):
        model.commit()
    bad_dts: tuple[Any, ...] = (0.0, -1.0, float("nan"), float("inf"), "x")
    for dt in bad_dts:
        with pytest.raises(ValueError, match="dt_au"):
            model.initialize(dt_au=dt)
    with pytest.raises(ValueError, match="molecule_ids"):
        model.initialize(dt_au=DT, molecule_ids=[1])
    model.initialize(dt_au=DT, molecule_ids=[5, 6])
    assert model.molecule_ids.tolist() == [5, 6]
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*got shape \(3,\)"):
        model.stage(np.zeros(3))
    with pytest.raises(ValueError, match="molecule 6 is not finite"):
        model.stage([[0.0, 0.0, 0.0], [0.0, np.inf, 0.0]])
    assert not model.staged


class Exploding(Model):
    """A model whose second molecule's source is NaN."""

    def _initial_state(self):
        return {"x": np.zeros(self.n)}

    def _stage_impl(self, state, fields):
        sources = np.zeros((self.n, 3))
        sources[1:] = np.nan
        return state, sources


def test_non_finite_sources_are_refused():
    """A model producing a non-finite source raises FloatingPointError naming the molecule."""
    model = Exploding(n=2)
    model.initialize(dt_au=DT, molecule_ids=[5, 6])
    with pytest.raises(FloatingPointError, match="source of molecule 6 is not finite"):
        model.stage(np.zeros((2, 3)))
    assert not model.staged and model.time_au == 0.0


class ExplodingOne(Exploding):
    """Exploding, with a float path for one molecule that explodes too."""

    def _stage_one(self, state, field):
        return state, (0.0, float("nan"), 0.0)

    def _extras_one(self, state):
        return {}


def test_float_path_checks_fields_and_sources():
    """With n = 1 the float path refuses non-finite fields and sources as the array path
    does, naming the molecule, and leaves nothing staged."""
    model = ExplodingOne(n=1)
    model.initialize(dt_au=DT, molecule_ids=[7])
    with pytest.raises(ValueError, match=r"field of molecule 7 is not finite: \[0.0, inf"):
        model.stage([[0.0, np.inf, 0.0]])
    with pytest.raises(
        FloatingPointError,
        match=r"source of molecule 7 is not finite "
        r"\(\[0.0, nan, 0.0\]\)",
    ):
        model.stage(np.zeros((1, 3)))
    assert not model.staged and model.time_au == 0.0
    assert model.extras_of(0) == {"time_au": 0.0}
    with pytest.raises(ValueError, match=r"shape \(1, 3\).*got shape \(3,\)"):
        model.stage(np.zeros(3))


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("tls", {"omega": -1.0}, r"parameter omega = -1.0 is not allowed; expected .*> 0"),
        ("tls", {"orientation": 3}, r"orientation = 3 is not allowed; expected 0 \(x\)"),
        ("tls", {"orientation": 1.5}, r"orientation = 1.5 is not an integer"),
        ("tls", {"pe_initial": 1.5}, r"pe_initial = 1.5 is not allowed; expected .*\[0, 1\]"),
        ("tls", {"pe_initial": [0.1, 2.0]}, r"pe_initial = 2.0 \(molecule index 1\)"),
        (
            "tls",
            {"pe_initial": [0.1, 0.2, 0.3]},
            r"pe_initial .* shape \(3,\); expected a "
            r"scalar or a sequence of length n = 2",
        ),
        ("tls", {"mu12": "big"}, r"mu12 = 'big' is not a number"),
        ("tls", {"mu12": float("nan")}, r"mu12 = nan is not allowed; expected a finite"),
        ("sho", {"omega": 0}, r"omega = 0 is not allowed"),
        (
            "tls",
            {"mu0": 1.0},
            r"unknown parameter\(s\) mu0; allowed: omega, mu12, "
            r"orientation, pe_initial, e_phase_initial",
        ),
        (
            "sho",
            {"mu12": 1.0, "verbose": True},
            r"unknown parameter\(s\) mu12, verbose; "
            r"allowed: omega, mu0, orientation",
        ),
    ],
)
def test_parameter_validation(name, params, message):
    """A bad parameter raises ValueError naming it, its value and what is allowed."""
    with pytest.raises(ValueError, match=message):
        create_model(name, n=2, **params)


def test_parameters_broadcast_and_defaults():
    """Parameters are MaxwellLink's names and defaults, broadcast to read-only (n,) arrays."""
    model = create_model("tls", n=3, pe_initial=[0.1, 0.2, 0.3])
    assert model.params["omega"].tolist() == [OMEGA] * 3
    assert model.params["mu12"].tolist() == [MU12] * 3
    assert model.params["orientation"].tolist() == [2, 2, 2]
    assert model.params["pe_initial"].tolist() == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError):
        model.params["omega"][0] = 1.0
    sho = create_model("sho")
    assert {k: v.tolist() for k, v in sho.params.items()} == {
        "omega": [OMEGA],
        "mu0": [MU12],
        "orientation": [2],
        "p_initial": [0.0],
        "q_initial": [0.0],
    }
    with pytest.raises(ValueError, match="n = 0"):
        create_model("tls", n=0)


# ---------------------------------------------------------------- parameters of every kind


def test_kinds_are_stored_as_documented(tmp_path):
    """Each kind, per molecule and shared, lands in params in its documented form."""
    geometry = tmp_path / "h2.xyz"
    geometry.write_text("2\n\nH 0 0 0\nH 0 0 0.74\n")
    model = ToyKicked(
        n=3,
        omega=[0.1, 0.2, 0.3],
        seed=5,
        damped=[True, False, "true"],
        direction=[[1, 0, 0], [0, 1, 0], [0, 0, 2]],
        kick=[0.1, 0.2, 0.3],
        scheme="EULER",
        label=["a", "b", 3],
        geometry=str(geometry),
    )
    p = model.params
    assert p["omega"].dtype == np.float64 and p["omega"].shape == (3,)
    assert p["damped"].tolist() == [True, False, True] and p["damped"].dtype == bool
    assert p["direction"].shape == (3, 3) and p["direction"][2].tolist() == [0, 0, 2]
    assert p["kick"].shape == (3,) and p["kick"].tolist() == [0.1, 0.2, 0.3]
    assert p["seed"] == 5 and type(p["seed"]) is int
    assert p["noise"] == 0.0 and type(p["noise"]) is float
    assert p["scheme"] == "Euler"  # matched case-insensitively, stored as declared
    assert p["label"] == ("a", "b", "3")  # an int given for text is its digits
    assert p["geometry"] == str(geometry)
    for key in ("omega", "damped", "direction", "kick"):
        with pytest.raises(ValueError, match="read-only"):
            p[key][0] = 1
    broadcast = ToyKicked(n=2, direction=[0, 1, 0], label="x")
    assert broadcast.params["direction"].tolist() == [[0, 1, 0], [0, 1, 0]]
    assert broadcast.params["label"] == ("x", "x")
    assert broadcast.params["geometry"] is None
    assert ToyKicked.validate_params(geometry=None) == {"geometry": None}  # JSON null: unset
    # per-instance extras keys (from an immutable parameter)
    assert set(model.extras()) == {"time_au", "energy_au", "mu_au", "p_au"}
    assert set(broadcast.extras()) == {"time_au", "energy_au", "mu_au"}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"kick": [[0, 0, 1]] * 2}, r"kick = .* has shape \(2, 3\); expected a 3-vector"),
        ({"noise": [0.1, 0.2]}, r"noise = \[0.1, 0.2\] is a list, but noise is shared"),
        ({"scheme": ["Euler", "Euler"]}, r"scheme = .* is a list, but scheme is shared"),
        ({"scheme": "rk4"}, r"scheme = 'rk4' is not allowed; expected one of symplectic, Euler"),
        ({"label": 1.5}, r"label = 1.5 is a number, not text .*quoted string"),
        ({"label": ["a", 2.5]}, r"label = 2.5 \(molecule index 1\) is a number, not text"),
        ({"label": ["a", "b", "c"]}, r"label = .* has 3 entries; expected one value or a list"),
        ({"damped": "maybe"}, r"damped = 'maybe' is not a flag; expected true or false"),
        ({"damped": [True, 2]}, r"damped = 2 \(molecule index 1\) is not a flag"),
        ({"omega": True}, r"omega = True is a flag, not a number"),
        ({"seed": 1.5}, r"seed = 1.5 is not an integer"),
        (
            {"direction": [[1, 0, 0], [0, 0, 0]]},
            r"direction = \[0, 0, 0\] \(molecule index 1\) is not "
            r"allowed; expected a nonzero 3-vector",
        ),
        (
            {"direction": [1, 0]},
            r"direction = \[1, 0\] has shape \(2,\); expected a 3-vector "
            r"\[x, y, z\], or n = 2 of them",
        ),
        (
            {"kick": [0, float("inf"), 0]},
            r"kick = \[0, inf, 0\] is not allowed; expected a 3-vector",
        ),
        (
            {"geometry": "nope.xyz"},
            r"geometry = 'nope.xyz' does not exist \(resolved against .* to "
            r".*/nope.xyz\)",
        ),
        ({"molecule_xyz": "nope.xyz"}, r"molecule_xyz = 'nope.xyz' does not exist"),
        ({"geometry": 1.0}, r"geometry = 1.0 is a number, not text"),
        ({"kick_direction": "w"}, r"kick_direction = 'w' does not convert to kick: 'w' is not x"),
        (
            {"molecule_xyz": "a", "geometry": "b"},
            r"parameters molecule_xyz and geometry both set "
            r"geometry",
        ),
        (
            {"colour": 1},
            r"unknown parameter\(s\) colour; allowed: omega, .*; molecule_xyz for "
            r"geometry; kick_direction for kick",
        ),
    ],
)
def test_kind_errors_name_the_key(params, message):
    """Every refused value raises ParameterError naming the model, the key (as given), the
    molecule where it is per molecule, and what is allowed; validate_params and the
    constructor say the same."""
    with pytest.raises(ParameterError, match=message) as info:
        ToyKicked.validate_params(2, **params)
    assert str(info.value).startswith("toy_kicked: ")
    assert info.value.key in params
    with pytest.raises(ParameterError, match=message):
        ToyKicked(n=2, **params)


def test_validate_params_is_canonical_cheap_and_resolves_paths(tmp_path, monkeypatch):
    """validate_params maps aliases, fills in canonical spellings and absolute paths
    (relative to base_dir, else the current directory), keeps one value as one value, and
    builds nothing."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "h2.xyz").write_text("2\n")
    out = ToyKicked.validate_params(
        3,
        base_dir=tmp_path / "in",
        molecule_xyz="h2.xyz",
        kick_direction="Y",
        scheme="euler",
        omega=[0.1, 0.2, 0.3],
        damped="false",
        label=7,
    )
    assert out == {
        "geometry": str(tmp_path / "in" / "h2.xyz"),
        "kick": [0.0, 1.0, 0.0],
        "scheme": "Euler",
        "omega": [0.1, 0.2, 0.3],
        "damped": False,
        "label": "7",
    }
    json.dumps(out)  # plain values, for a params file
    monkeypatch.chdir(tmp_path)
    assert ToyKicked.validate_params(geometry="in/h2.xyz")["geometry"] == out["geometry"]
    with pytest.raises(
        ParameterError,
        match=r"geometry = 'h2.xyz' does not exist \(resolved "
        rf"against {tmp_path} to {tmp_path}/h2.xyz\)",
    ):
        ToyKicked.validate_params(geometry="h2.xyz")
    (tmp_path / "empty.xyz").write_text("")
    with pytest.raises(ParameterError, match="empty file") as info:  # the cross check (_validate)
        ToyKicked.validate_params(geometry="empty.xyz")
    assert info.value.key == "geometry"

    class Costly(ToyKicked):
        def _configure(self):
            raise AssertionError("validate_params must not build the model")

    assert Costly.validate_params(2, omega=0.5) == {"omega": 0.5}


def test_required_parameters_and_declaration_errors():
    """A REQUIRED parameter must be given; bad declarations fail when the class is made."""

    class NeedsFile(ToyKicked):
        parameters: ClassVar[Mapping[str, Parameter]] = {
            **ToyKicked.parameters,
            "geometry": Parameter(REQUIRED, "input file", kind="path", shared=True),
        }

    with pytest.raises(ParameterError, match=r"parameter geometry is required \(input file\)"):
        NeedsFile.validate_params()

    class TwoAliases(ToyKicked):
        aliases: ClassVar[Mapping[str, tuple[str, Any]]] = {
            **ToyKicked.aliases,
            "xyz_file": ("geometry", None),
        }

    with pytest.raises(ParameterError, match="parameters molecule_xyz and xyz_file both set"):
        TwoAliases.validate_params(molecule_xyz="a.xyz", xyz_file="b.xyz")
    with pytest.raises(ValueError, match=r"choices .* need kind=str"):
        Parameter(1.0, "x", choices=("a",))
    with pytest.raises(ValueError, match="'path' Parameter's default must be REQUIRED or None"):
        Parameter("geometry.xyz", "x", kind="path", shared=True)
    with pytest.raises(ValueError, match="kind 'matrix' is not one of"):
        Parameter(0.0, "x", kind="matrix")
    with pytest.raises(TypeError, match="an alias must be a new name for a declared parameter"):
        type("BadAlias", (ToyKicked,), {"aliases": {"x": ("nope", None)}})
    with pytest.raises(TypeError, match="'n' cannot be a parameter name"):
        type("BadName", (Model,), {"parameters": {"n": Parameter(1.0, "x")}})


def test_slice_params_cuts_only_per_molecule_lists():
    """Shared values and single values (a 3-vector too) stay whole; lists are cut."""
    params = ToyKicked.validate_params(
        3,
        kick=[0.0, 0.0, 1.0],
        direction=[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        omega=[0.1, 0.2, 0.3],
        gain=2.0,
        label=["a", "b", "c"],
    )
    assert ToyKicked.slice_params(params, 1, 3) == {
        "kick": [0.0, 0.0, 1.0],
        "direction": [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        "omega": [0.2, 0.3],
        "gain": 2.0,
        "label": ["b", "c"],
    }
    assert ToyKicked.slice_params(params, 2, 3) == {
        "kick": [0.0, 0.0, 1.0],
        "direction": [0.0, 0.0, 1.0],
        "omega": 0.3,
        "gain": 2.0,
        "label": "c",
    }


# ---------------------------------------------------------------- mutable parameters


@pytest.mark.parametrize(
    ("name", "changes"),
    [("tls", {"omega": 0.3, "mu12": 150.0}), ("sho", {"omega": 0.3, "mu0": 150.0})],
)
@pytest.mark.parametrize("n", [1, 3])
def test_parameter_change_at_step_k_equals_a_fresh_model(name, changes, n):
    """set_params at step k gives bit for bit what a model made with the new parameters
    and set to step k's state gives."""
    fields = random_fields(60, n, seed=9)
    model = create_model(name, n=n, orientation=1)
    model.initialize(dt_au=DT)
    for k in range(30):
        model.step(fields[k])
    state_k = model.get_state()
    model.set_params(changes)
    fresh = create_model(name, n=n, orientation=1, **changes)
    fresh.initialize(dt_au=DT)
    state_k.update({k: v for k, v in fresh.get_state().items() if k.startswith("param.")})
    fresh.set_state(state_k)
    for k in range(30, 60):
        np.testing.assert_array_equal(model.step(fields[k]), fresh.step(fields[k]))
        assert model.extras_of(n - 1) == fresh.extras_of(n - 1)
    unchanged = create_model(name, n=n, orientation=1)
    unchanged.initialize(dt_au=DT)
    for k in range(60):
        unchanged.step(fields[k])
    # the change did something
    assert not np.array_equal(unchanged.extras()["energy_au"], model.extras()["energy_au"])


def test_set_params_for_some_molecules_and_its_errors():
    """A change for listed molecules touches only them; every refusal names the key and the
    molecule and leaves the model as it was (a failing _configure included)."""
    model = create_model("tls", n=3, pe_initial=0.3)
    model.initialize(dt_au=DT, molecule_ids=[4, 5, 6])
    model.step(random_fields(1, 3)[0])
    model.set_params({"omega": [0.5, 0.6]}, molecules=[2, 0])
    assert model.params["omega"].tolist() == [0.6, OMEGA, 0.5]
    model.set_params({"mu12": 10.0}, molecules=[1])
    assert model.params["mu12"].tolist() == [MU12, 10.0, MU12]
    before = (model.get_state(), dict(model.params))
    model.stage(np.zeros((3, 3)))
    cases: list[tuple[dict[str, Any], list[int] | None, str]] = [
        ({"omega": [1.0, -1.0]}, [0, 2], r"omega = -1.0 \(molecule index 2\) is not allowed"),
        ({"omega": [1.0, 2.0]}, [0], r"omega = \[1.0, 2.0\] has 2 entries for 1 molecules"),
        ({"orientation": 0}, None, r"orientation cannot be changed .*; mutable: omega, mu12"),
        ({"colour": 0}, None, r"unknown parameter\(s\) colour"),
        ({"omega": 1.0}, [3], r"molecules = \[3\] is not allowed; expected distinct indices 0..2"),
        ({"omega": 1.0}, [1, 1], r"molecules = \[1, 1\] is not allowed"),
    ]
    for changes, molecules, message in cases:
        with pytest.raises(ParameterError, match=message):
            model.set_params(changes, molecules)
        assert model.staged  # untouched: the staged step is still there
    toy = ToyKicked(n=2)
    with pytest.raises(ParameterError, match="noise is shared by all molecules; change it for all"):
        toy.set_params({"noise": 0.1}, molecules=[0])

    class FailsOnChange(TLSModel):
        def _configure(self):
            super()._configure()
            if self.params["omega"][0] > 1:
                self._half_done = True
                raise RuntimeError("cannot prepare")

    fragile = FailsOnChange(n=1)
    fragile.initialize(dt_au=DT)
    snapshot = dict(vars(fragile))
    with pytest.raises(RuntimeError, match="cannot prepare"):
        fragile.set_params({"omega": 2.0})
    assert vars(fragile).keys() == snapshot.keys() and fragile.params is snapshot["params"]
    assert fragile.params["omega"].tolist() == [OMEGA]
    for key, value in before[0].items():
        np.testing.assert_array_equal(model.get_state()[key], value)


def test_set_state_carries_mutable_and_refuses_other_parameters():
    """A state's mutable parameters are taken over; an immutable one that differs, a
    missing key or a bad value is refused naming it."""
    changed = create_model("tls", n=2)
    changed.set_params({"omega": 0.4})
    model = create_model("tls", n=2)
    model.set_state(changed.get_state())
    assert model.params["omega"].tolist() == [0.4, 0.4]
    other = create_model("tls", n=2, orientation=0).get_state()
    with pytest.raises(
        ValueError,
        match=r"state\['param.orientation'\] = \[0, 0\] differs from "
        r"this model's orientation = \[2, 2\], which cannot change",
    ):
        model.set_state(other)
    bad = model.get_state()
    bad["param.omega"] = np.array([-1.0, 1.0])
    with pytest.raises(
        ValueError, match=r"state\['param.omega'\] is not allowed: .*molecule index 0"
    ):
        model.set_state(bad)
    del bad["param.omega"]
    with pytest.raises(ValueError, match=r"missing: param.omega; unexpected: none"):
        model.set_state(bad)
    assert model.params["omega"].tolist() == [0.4, 0.4]
    toy = ToyKicked(n=2, scheme="Euler", label=["a", "b"])
    state = toy.get_state()
    assert state["param.label"].dtype.kind == "U" and state["param.scheme"].shape == ()
    assert state["param.geometry"].shape == (0,)  # unset
    with pytest.raises(ValueError, match=r"param.scheme'\] = 'symplectic' differs"):
        toy.set_state(ToyKicked(n=2, label=["a", "b"]).get_state())


def test_generator_state_is_restored_by_stage_and_carried_by_state():
    """A model's _rng: stage puts it back (re-staging draws the same numbers), commit
    advances it, get_state/set_state carry it."""
    model = ToyKicked(n=2, noise=0.1)
    model.initialize(dt_au=DT)
    fields = random_fields(20, 2, seed=10)
    first = model.stage(fields[0]).copy()
    np.testing.assert_array_equal(model.stage(fields[0]), first)
    model.commit()
    for k in range(1, 10):
        model.step(fields[k])
    saved = model.get_state()
    restored = ToyKicked(n=2, noise=0.1)
    restored.initialize(dt_au=DT)
    restored.step(fields[0])  # its generator moves on; set_state puts it back
    restored.set_state(saved)
    for k in range(10, 20):
        np.testing.assert_array_equal(restored.step(fields[k]), model.step(fields[k]))
    bad = model.get_state()
    bad["rng.state"] = np.array('{"bit_generator": "MT19937"}')
    with pytest.raises(
        ValueError,
        match=r"state\['rng.state'\] is not a state of this model's "
        "PCG64 generator",
    ):
        model.set_state(bad)


# ---------------------------------------------------------------- golden trajectories

# sha256 prefixes of 400 steps of sources, extras and states at the commit before the
# interface grew parameter kinds (tools: random fields, seed 11). Bitwise unchanged on
# machines whose numpy sin/cos give the same bits (the probe); skipped elsewhere.
GOLDEN_PROBE = "74be71fe37e056fd"
GOLDEN = [
    ("tls", 1, {"pe_initial": 0.1, "e_phase_initial": 0.3}, "71a6aaffd039d9b2"),
    (
        "tls",
        5,
        {
            "omega": [0.2, OMEGA, 0.3, 0.25, 0.4],
            "mu12": [100.0, MU12, 50.0, 10.0, 300.0],
            "orientation": [0, 1, 2, 2, 0],
            "pe_initial": [0.0, 0.1, 0.5, 1.0, 0.01],
            "e_phase_initial": [0.0, 0.5, 1.0, 1.5, 2.0],
        },
        "32b8060c63c91cc8",
    ),
    ("tls", 3, {"pe_initial": 0.2, "orientation": 1}, "691b36ca7c83431f"),
    ("sho", 1, {"q_initial": 0.1, "p_initial": 0.05}, "91c026de1901be54"),
    (
        "sho",
        3,
        {
            "omega": [0.2, OMEGA, 0.3],
            "mu0": [100.0, MU12, 50.0],
            "orientation": [0, 1, 2],
            "p_initial": [0.0, 0.1, -0.2],
            "q_initial": [0.0, 0.5, 0.1],
        },
        "5477c662da45789e",
    ),
]


def trajectory_digest(name: str, n: int, params: dict, steps: int = 400) -> str:
    h = hashlib.sha256()
    model = create_model(name, n=n, **params)
    model.initialize(dt_au=0.5, molecule_ids=list(range(n)))
    fields = np.random.default_rng(11).normal(scale=1e-3, size=(steps, n, 3))
    for k in range(steps):
        h.update(np.ascontiguousarray(model.step(fields[k])).tobytes())
        for key, value in sorted(model.extras().items()):
            h.update(key.encode())
            h.update(np.ascontiguousarray(value).tobytes())
        if n == 1:
            for key, one in sorted(model.extras_of(0).items()):
                h.update(key.encode())
                h.update(np.float64(one).tobytes())
    for key, value in sorted(model.get_state().items()):
        if not key.startswith(("param.", "rng.")):
            h.update(key.encode())
            h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize(
    ("name", "n", "params", "digest"), GOLDEN, ids=[f"{g[0]}-n{g[1]}" for g in GOLDEN]
)
def test_golden_trajectories(name, n, params, digest):
    """tls and sho trajectories are bit for bit those recorded before the interface grew."""
    x = np.linspace(-40, 40, 1001)
    probe = hashlib.sha256(np.sin(x).tobytes() + np.cos(x).tobytes()).hexdigest()[:16]
    if probe != GOLDEN_PROBE:
        pytest.skip(
            f"numpy's sin/cos differ here (probe {probe}) from the machine the "
            "digests were recorded on"
        )
    assert trajectory_digest(name, n, params) == digest


# ---------------------------------------------------------------- registry


def test_registry_by_name_and_dotted_path():
    """Models are found by registered name and by 'package.module:ClassName'."""
    assert get_model_class("tls") is TLSModel
    assert get_model_class("sho") is SHOModel
    assert get_model_class("maxwellhub.models.tls:TLSModel") is TLSModel
    assert isinstance(create_model("maxwellhub.models.sho:SHOModel", n=2), SHOModel)
    with pytest.raises(ValueError, match=r"unknown model 'nope'; known: .*sho.*tls"):
        get_model_class("nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        get_model_class("no_such_module_xyz:Model")
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        get_model_class("maxwellhub.models.tls:Nope")
    with pytest.raises(ValueError, match="not a subclass"):
        get_model_class("json:dumps")


def write_user_model(directory: Path) -> None:
    """A user's module defining a one-parameter model (source = field * gain)."""
    (directory / "user_models_for_test.py").write_text(
        textwrap.dedent("""
        import numpy as np
        from maxwellhub.models import Model, Parameter

        class Echo(Model):
            name = "echo"
            parameters = {"gain": Parameter(2.0, "source per field")}
            extras_keys = ("count",)

            def _initial_state(self):
                return {"count": np.zeros(self.n)}

            def _stage_impl(self, state, fields):
                return {"count": state["count"] + 1}, fields * self.params["gain"][:, None]

            def _extras_impl(self, state):
                return {"count": state["count"].copy()}
    """)
    )


def test_user_model_by_dotted_path_register_and_entry_point(tmp_path, monkeypatch):
    """A user model loads by dotted path, by register_model and by entry point."""
    write_user_model(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(models, "_registry", dict(models._registry))
    echo_cls = get_model_class("user_models_for_test:Echo")
    model = create_model("user_models_for_test:Echo", gain=3.0)
    model.initialize(dt_au=1.0)
    assert model.step([[1.0, 2.0, 3.0]]).tolist() == [[3.0, 6.0, 9.0]]
    assert model.extras() == {"time_au": np.array([1.0]), "count": np.array([1.0])}

    register_model("echo", echo_cls)
    assert get_model_class("echo") is echo_cls
    with pytest.raises(ValueError, match="already registered"):
        register_model("tls", echo_cls)

    @register_model("echo2")
    class Echo2(echo_cls):  # type: ignore[valid-type,misc]  # a class loaded at run time
        pass

    assert get_model_class("echo2") is Echo2

    point = EntryPoint(
        name="from_ep", value="user_models_for_test:Echo", group=models.ENTRY_POINT_GROUP
    )

    def fake_entry_points(group, name=None):
        assert group == models.ENTRY_POINT_GROUP
        return [point] if name in (None, point.name) else []

    monkeypatch.setattr(models, "entry_points", fake_entry_points)
    assert get_model_class("from_ep") is echo_cls
    assert "from_ep" in models.available_models()
    assert issubclass(echo_cls, Model)


def test_lazy_builtin_imports_on_demand_and_names_the_missing_package(tmp_path, monkeypatch):
    """A built-in registered as 'module:Class' is listed, imported only when asked for,
    and a missing optional package is one line naming the pip extra."""
    assert "rttddft" in models.available_models()
    entry = models._registry["rttddft"]
    assert isinstance(entry, LazyModel)
    assert entry.target == "maxwellhub.models.rttddft:RTTDDFTModel"
    (tmp_path / "needs_pyscf_for_test.py").write_text(
        "import pyscf\nfrom maxwellhub.models import TLSModel as Model\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(models, "_registry", dict(models._registry))
    lazy = LazyModel("needs_pyscf_for_test:Model", needs="pyscf", label="PySCF", extra="pyscf")
    register_model("needs_pyscf", lazy)
    assert "needs_pyscf" in models.available_models()
    assert "needs_pyscf_for_test" not in sys.modules  # registering imports nothing
    with monkeypatch.context() as hidden:
        hidden.setitem(sys.modules, "pyscf", None)  # as if PySCF were not installed
        with pytest.raises(ValueError) as info:
            get_model_class("needs_pyscf")
        assert str(info.value) == "model 'needs_pyscf' needs PySCF: pip install 'maxwellhub[pyscf]'"
        hidden.delitem(sys.modules, "maxwellhub.models.rttddft", raising=False)
        with pytest.raises(ValueError) as info:
            get_model_class("rttddft")
        assert str(info.value) in (
            "model 'rttddft' needs PySCF: pip install 'maxwellhub[pyscf]'",
            "model 'rttddft': its module maxwellhub.models.rttddft is not part of "
            "this installation",
        ), "rttddft must import pyscf when its module loads, so a missing PySCF is named"
    pytest.importorskip("pyscf")
    assert get_model_class("needs_pyscf") is TLSModel
    with pytest.raises(ValueError, match="already registered to needs_pyscf_for_test:Model"):
        register_model("needs_pyscf", TLSModel)


# ---------------------------------------------------------------- MaxwellLink equivalence


def mxl_python() -> Path | None:
    """A Python with MaxwellLink 0.5.0 installed (the peer venv or /tmp/mxlvenv), or None."""
    for venv in (mxl_venv(), Path("/tmp/mxlvenv")):
        if (venv / "bin" / "python").exists():
            return venv / "bin" / "python"
    return None


MXL_SCRIPT = """
import contextlib, json, sys
import numpy as np
from maxwelllink.mxl_drivers.python.models.sho_model import SHOModel
from maxwelllink.mxl_drivers.python.models.tls_model import TLSModel

job = json.load(sys.stdin)
out = {}
with contextlib.redirect_stdout(sys.stderr):  # their initialize() prints
    for name, cls in (("tls", TLSModel), ("sho", SHOModel)):
        model = cls(**job[name])
        model.initialize(job["dt_au"], 0)
        sources, extras = [], []
        for field in job["fields"]:
            model.stage_step(np.array(field))
            sources.append(model.commit_step().tolist())
            extras.append(model.append_additional_data())
        out[name] = {"sources": sources, "extras": extras}
print(json.dumps(out))
"""


def test_same_sources_as_maxwelllink_models():
    """Our tls and sho give MaxwellLink 0.5.0's sources and extras to 1e-10 relative."""
    python = mxl_python()
    if python is None:
        pytest.skip(
            f"MaxwellLink not installed: no {mxl_venv() / 'bin' / 'python'} and no "
            "/tmp/mxlvenv/bin/python"
        )
    steps = 200
    fields = random_fields(steps, 1, seed=8)[:, 0, :]
    job = {
        "dt_au": DT,
        "fields": fields.tolist(),
        "tls": {
            "omega": 0.242,
            "mu12": 187.0,
            "orientation": 1,
            "pe_initial": 0.3,
            "e_phase_initial": 0.4,
        },
        "sho": {"omega": 0.3, "mu0": 150.0, "orientation": 0, "p_initial": 0.05},
    }
    done = subprocess.run(
        [str(python), "-c", MXL_SCRIPT],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert done.returncode == 0, done.stderr
    theirs = json.loads(done.stdout)
    for name in ("tls", "sho"):
        model = create_model(name, **job[name])
        model.initialize(dt_au=DT, molecule_ids=[0])
        ours_sources = []
        ours_extras = []
        for k in range(steps):
            ours_sources.append(model.step(fields[k : k + 1])[0])
            ours_extras.append({key: float(v[0]) for key, v in model.extras().items()})
        compare_relative(np.array(ours_sources), np.array(theirs[name]["sources"]), name)
        assert [set(e) for e in ours_extras] == [set(e) for e in theirs[name]["extras"]]
        for key in ours_extras[0]:
            compare_relative(
                np.array([e[key] for e in ours_extras]),
                np.array([e[key] for e in theirs[name]["extras"]]),
                f"{name} extras {key}",
            )


def compare_relative(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    """Agreement to 1e-10 relative to the largest magnitude of the series."""
    scale = max(np.abs(theirs).max(), 1e-300)
    worst = np.abs(ours - theirs).max() / scale
    assert worst < 1e-10, f"{what}: relative difference {worst:.3g}"


def test_parameters_in_the_units_chemists_use():
    """A parameter that declares its quantity takes eV, fs or debye under a suffixed name
    (omega_eV, mu12_debye, dt_substep_fs for dt_substep_au) and stores atomic units: the
    model equals one built from the converted values bitwise; lists convert element-wise;
    giving both names, or a suffix the parameter does not declare, is refused naming it."""
    from maxwellhub.models import UNIT_SUFFIXES, get_model_class

    hartree_ev, debye_au = 27.211386245988, 0.393430307
    tls = get_model_class("tls")
    got = tls.validate_params(2, omega_eV=[6.5, 6.6], mu12_debye=2.0)
    np.testing.assert_allclose(got["omega"], [6.5 / hartree_ev, 6.6 / hartree_ev], rtol=1e-15)
    assert got["mu12"] == pytest.approx(2.0 * debye_au, rel=1e-15)
    assert UNIT_SUFFIXES["_debye"][1] == debye_au
    a = create_model("tls", omega_eV=6.5, mu12_debye=2.0, pe_initial=0.1)
    b = create_model("tls", omega=6.5 / hartree_ev, mu12=2.0 * debye_au, pe_initial=0.1)
    for m in (a, b):
        m.initialize(dt_au=0.5)
    field = np.array([[0.0, 0.0, 1e-3]])
    assert np.array_equal(a.step(field), b.step(field))
    rt = get_model_class("rttddft")
    step = rt.validate_params(1, atoms="H 0 0 0; H 0 0 0.74", dt_substep_fs=0.0024188843265857)
    assert step["dt_substep_au"] == pytest.approx(0.1, rel=1e-13)
    with pytest.raises(ValueError, match="omega and omega_eV both set omega"):
        tls.validate_params(1, omega=0.2, omega_eV=6.5)
    with pytest.raises(ValueError, match=r"unknown parameter.*pe_initial_eV"):
        tls.validate_params(1, pe_initial_eV=0.1)
    with pytest.raises(ValueError, match="omega_eV = 'x' does not convert"):
        tls.validate_params(1, omega_eV="x")


def test_kicks_are_impulsive_fields():
    """apply_kick(kappa e) is the limit of a field kappa/tau held for tau -> 0: a TLS in its
    ground state gets Pe = sin^2(kappa mu12) exactly and matches a 1e-9 a.u. step of the
    field kappa/1e-9 to 1e-9; an SHO's momentum jumps by mu0 kappa; only listed molecules
    move; a model without kicks, or a non-finite impulse, is refused naming it."""
    kappa, mu12 = 2e-3, 187.0
    tls = create_model("tls", n=3, mu12=mu12, orientation=2)
    tls.initialize(dt_au=0.5)
    tls.apply_kick([0.0, 0.0, kappa], molecules=[0, 2])
    pe = tls.extras()["Pe"]
    assert pe[0] == pytest.approx(np.sin(kappa * mu12) ** 2, rel=1e-14)
    assert pe[1] == 0.0 and pe[2] == pe[0]
    tau = 1e-9
    limit = create_model("tls", n=1, mu12=mu12, orientation=2)
    limit.initialize(dt_au=tau)
    limit.step(np.array([[0.0, 0.0, kappa / tau]]))
    assert limit.extras_of(0)["Pe"] == pytest.approx(pe[0], rel=1e-9)
    sho = create_model("sho", n=2, mu0=3.0, orientation=0)
    sho.initialize(dt_au=0.5)
    sho.apply_kick([[kappa, 0.0, 0.0], [2 * kappa, 5.0, 5.0]])
    np.testing.assert_array_equal(sho.get_state()["p"], [3.0 * kappa, 6.0 * kappa])
    with pytest.raises(ValueError, match="not finite"):
        sho.apply_kick([np.nan, 0.0, 0.0], molecules=[1])


def test_an_rttddft_kick_now_equals_the_kick_parameter_at_zero():
    """rttddft.apply_kick at t = 0 gives bit for bit the state of a model built with the
    kick_au/kick_direction parameters, and both then step identically."""
    pytest.importorskip("pyscf")
    base: dict[str, Any] = {"atoms": "H 0 0 0; H 0 0 0.74", "dt_substep_au": 0.1}
    direction = [0.3, -0.2, 1.0]
    built = create_model("rttddft", kick_au=1e-2, kick_direction=direction, **base)
    kicked = create_model("rttddft", **base)
    kicked.apply_kick(1e-2 * np.asarray(direction))
    a, b = built.get_state(), kicked.get_state()
    for key in ("P", "fock", "energy", "dipole"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for m in (built, kicked):
        m.initialize(dt_au=0.2)
    field = np.array([[1e-4, 0.0, -2e-4]])
    np.testing.assert_array_equal(built.step(field), kicked.step(field))
