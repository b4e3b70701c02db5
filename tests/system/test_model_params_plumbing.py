"""Model parameters on their way to the models: ``maxwellhub run`` validates them without
building a model and hands canonical values (absolute paths) to drivers, slicing only
per-molecule lists; the driver CLI keeps text parameters text; driver checkpoints carry
the parameters; embedded molecules take parameter changes at step boundaries.

Config-level tests need no Meep; the embedded-coupling tests at the end do.
"""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from maxwellhub.models import create_model
from maxwellhub.run import fleet, runner
from maxwellhub.run.config import ConfigError, load_config
from maxwellhub_drivers import cli
from maxwellhub_drivers.checkpoint import Continuity

TOY = "_toy_models:ToyKicked"  # tests/ is on sys.path


def write_config(
    directory: Path, params: str, *, model: str = TOY, count: int = 3, per: int = 1
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "run.toml"
    path.write_text(
        textwrap.dedent(f"""
        [simulation]
        dimensions = 2
        cell = [8.0, 8.0]
        resolution = 10
        pml = 3.0
        until = 1

        [transport]
        molecules_per_driver = {per}

        [[molecules]]
        model = "{model}"
        position = [0.0, 0.0]
        count = {count}

        [molecules.params]
    """)
        + textwrap.dedent(params)
    )
    return path


# ---------------------------------------------------------------- maxwellhub run


@pytest.mark.parametrize(
    ("params", "key", "message"),
    [
        ("colour = 1", "molecules[0].params.colour", "unknown parameter(s) colour"),
        ("omega = 'fast'", "molecules[0].params.omega", "omega = 'fast' is not a number"),
        ("label = 2.5", "molecules[0].params.label", "is a number, not text"),
        (
            "molecule_xyz = 'missing.xyz'",
            "molecules[0].params.molecule_xyz",
            "molecule_xyz = 'missing.xyz' does not exist",
        ),
        ("noise = [0.1, 0.2, 0.3]", "molecules[0].params.noise", "noise is shared"),
        (
            "omega = [0.1, 0.2]",
            "molecules[0].params.omega",
            "expected a scalar or a sequence of length n = 3",
        ),
    ],
)
def test_run_refuses_bad_params_naming_the_key(tmp_path, params, key, message):
    """Unknown keys, wrong types and missing files are ConfigErrors naming
    molecules[i].params.<key>, found without building the model."""
    config = load_config(write_config(tmp_path, params))
    with pytest.raises(ConfigError) as info:
        runner.validate_models(config)
    assert str(info.value).startswith(f"{key}: toy_kicked: "), str(info.value)
    assert message in str(info.value)


def test_run_main_exits_2_before_anything_starts(tmp_path, capsys, monkeypatch):
    """`maxwellhub run` refuses a missing input file with exit status 2, naming the key,
    the path as given and as resolved against the config's directory."""
    path = write_config(tmp_path / "cfg", "geometry = 'in/h2.xyz'")
    monkeypatch.chdir(tmp_path)
    assert runner.main(str(path)) == 2
    err = capsys.readouterr().err
    assert "molecules[0].params.geometry" in err
    assert f"'in/h2.xyz' does not exist (resolved against {tmp_path / 'cfg'}" in err
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_relative_paths_resolve_against_the_config_directory(tmp_path, monkeypatch):
    """A relative path in [molecules.params] is the config file's neighbour, whatever the
    current directory; the run hands drivers the absolute path."""
    (tmp_path / "cfg" / "in").mkdir(parents=True)
    (tmp_path / "cfg" / "in" / "h2.xyz").write_text("2\n")
    path = write_config(tmp_path / "cfg", "molecule_xyz = 'in/h2.xyz'\nscheme = 'EULER'")
    monkeypatch.chdir(tmp_path)  # not the config's directory
    config = runner.validate_models(load_config(path))
    params = config.molecules[0].params
    assert params == {"geometry": str(tmp_path / "cfg" / "in" / "h2.xyz"), "scheme": "Euler"}
    assert config.base_dir == tmp_path / "cfg"
    assert runner.validate_models(config) == config  # idempotent: run() validates again
    batches = fleet.driver_batches(config, [np.arange(3)])
    assert batches == [([0, 1, 2], TOY, params)]  # identical parameters: one batch


def test_shared_vectors_stay_whole_and_per_molecule_lists_are_sliced(tmp_path):
    """A shared 3-vector is never cut, n per-molecule 3-vectors are, one per molecule;
    ensembles get their slices."""
    params = """
        kick = [0.0, 0.0, 1.0]
        direction = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        label = ["a", "b", "c"]
        omega = 0.5
    """
    config = runner.validate_models(load_config(write_config(tmp_path / "one", params)))
    batches = fleet.driver_batches(config, [np.arange(3)])
    assert [b[0] for b in batches] == [[0], [1], [2]]
    assert batches[1][2] == {
        "kick": [0.0, 0.0, 1.0],
        "direction": [0.0, 1.0, 0.0],
        "label": "b",
        "omega": 0.5,
    }
    config = runner.validate_models(load_config(write_config(tmp_path / "ens", params, per=2)))
    batches = fleet.driver_batches(config, [np.arange(3)])
    assert [b[0] for b in batches] == [[0, 1], [2]]
    assert batches[0][2] == {
        "kick": [0.0, 0.0, 1.0],
        "direction": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
        "label": ["a", "b"],
        "omega": 0.5,
    }
    assert batches[1][2]["direction"] == [0.0, 0.0, 1.0]
    for ids, model, sliced in batches:  # each slice is valid for its driver
        create_model(model, n=len(ids), **sliced)


def test_drivers_receive_typed_params_in_a_file(tmp_path, monkeypatch):
    """The run passes parameters to drivers in a JSON file: text that looks like a number
    and paths with commas arrive as they are."""
    started = []

    def fake_start(model, params, **kw):
        started.append((model, params, kw["extra_args"]))
        return object()

    monkeypatch.setattr(fleet, "start_driver", fake_start)
    params = {"label": "1e-3", "geometry": "/data/a,b.xyz", "kick": [0.0, 0.0, 1.0]}
    fleet.start_batch([4, 5], TOY, params, 1, tmp_path, {"unix": "x"}, 1.0)
    assert [s[0] for s in started] == [TOY, TOY] and started[0][1] is None
    extra = started[0][2]
    assert extra[0] == "--params-file"
    assert json.loads(Path(extra[1]).read_text()) == params
    assert cli.parse_params([], extra[1]) == params


# ---------------------------------------------------------------- the driver CLI


def test_cli_keeps_text_params_text_and_resolves_paths(tmp_path, monkeypatch, capsys):
    """--param values of str/path parameters stay the text written ('6-31g', '1',
    '1e-3'); relative paths resolve against the driver's directory; bad ones exit 2."""
    (tmp_path / "h2.xyz").write_text("2\n")
    monkeypatch.chdir(tmp_path)
    built = []

    def run_client(model, **kw):  # instead of connecting: keep the model built
        built.append(model)
        return 0

    monkeypatch.setattr("maxwellhub_drivers.client.run_client", run_client)
    argv = [
        "--unix",
        "x",
        "--model",
        TOY,
        "--molecules",
        "2",
        "--param",
        'label=["6-31g", 1], molecule_xyz=h2.xyz, kick_direction=y',
        "--param",
        "seed=3, damped=true",
    ]
    assert cli.main(argv) == 0
    p = built[0].params
    assert p["label"] == ("6-31g", "1") and p["geometry"] == str(tmp_path / "h2.xyz")
    assert p["kick"].tolist() == [0.0, 1.0, 0.0] and p["seed"] == 3
    assert p["damped"].tolist() == [True, True]
    assert cli.main(["--unix", "x", "--model", TOY, "--param", "label=1e-3"]) == 0
    assert built[1].params["label"] == ("1e-3",)
    assert cli.parse_params(["label='a, b', omega=0.5"], text_keys={"label"}) == {
        "label": "a, b",
        "omega": 0.5,
    }
    assert cli.parse_value("'1e-3'") == "1e-3"  # quoted: text even without a model
    for bad, message in (
        ("geometry=nope.xyz", "geometry = 'nope.xyz' does not exist"),
        ("noise=[1, 2]", "noise is shared"),
    ):
        with pytest.raises(SystemExit) as info:
            cli.main(["--unix", "x", "--model", TOY, "--param", bad])
        assert info.value.code == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------- driver checkpoints


def test_driver_checkpoints_carry_changed_params_and_refuse_other_models(tmp_path, caplog):
    """A parameter changed during the run comes back from the driver's checkpoint into a
    driver started with the config's value; a checkpoint whose immutable parameter differs
    is skipped, naming it."""
    model = create_model("tls", n=1, pe_initial=0.1)
    model.initialize(dt_au=0.5, molecule_ids=[7])
    cont = Continuity(tmp_path, every=1)
    cont.begin(model, [7], {"version": 1, "step": 0, "history": 0})
    for k in range(4):
        if k == 2:
            model.set_params({"omega": 0.3})
        model.step([[1e-3, 0.0, 2e-3]])
        cont.committed(model, None)
    fresh = create_model("tls", n=1, pe_initial=0.1)
    fresh.initialize(dt_au=0.5, molecule_ids=[7])
    assert Continuity(tmp_path).begin(fresh, [7], {"version": 1, "step": 4, "history": 4}) == 4
    assert fresh.params["omega"].tolist() == [0.3]
    np.testing.assert_array_equal(fresh.step([[0.0, 0.0, 1e-3]]), model.step([[0.0, 0.0, 1e-3]]))
    caplog.set_level(logging.WARNING)
    other = create_model("tls", n=1, pe_initial=0.1, orientation=0)
    other.initialize(dt_au=0.5, molecule_ids=[7])
    assert Continuity(tmp_path).begin(other, [7], {"version": 1, "step": 4, "history": 4}) == 0
    assert any(
        "param.orientation" in r.getMessage() and "cannot change" in r.getMessage()
        for r in caplog.records
    )
    assert other.params["orientation"].tolist() == [0]  # left as it was made


# ---------------------------------------------------------------- embedded molecules


@pytest.mark.meep
def test_embedded_set_params_errors_name_the_molecule_and_key():
    """MeepCoupling.set_params checks at once: errors name the molecule id and the key,
    also against changes already queued; socket molecules without a hub refuse it clearly."""
    mp = pytest.importorskip("meep")
    from maxwellhub.em import MeepCoupling
    from maxwellhub.errors import UsageError

    sim = mp.Simulation(cell_size=mp.Vector3(8, 0), resolution=10, boundary_layers=[mp.PML(3.0)])
    coupling = MeepCoupling(sim, time_units_fs=0.1)
    coupling.add_molecules(
        "tls", centers=[(0, 0, 0)] * 2, sigma=0.1, axis="z", omega=0.242, mu12=187.0, pe_initial=0.1
    )
    coupling.add_socket_molecules(centers=[(1, 0, 0)], sigma=0.1, axis="z")
    cases: list[tuple[Any, dict[str, Any], str]] = [
        (
            [2],
            {"omega": 0.3},
            r"socket molecules need a hub \(hub=...\)",  # with one: over the wire
        ),
        ([9], {"omega": 0.3}, "no molecule with id 9"),
        (
            [0, 1],
            {"omega": [0.3, -1.0]},
            r"molecule 1: tls: parameter omega = -1.0 "
            r"\(molecule index 1\) is not allowed",
        ),
        (0, {"orientation": 0}, "molecule 0: tls: parameter orientation cannot be changed"),
    ]
    for ids, changes, message in cases:
        with pytest.raises(UsageError, match=message):
            coupling.set_params(ids, changes)
    coupling.set_params([1], {"omega": 0.3})
    with pytest.raises(UsageError, match=r"molecule 1: tls: parameter omega = -2.0"):
        coupling.set_params([1], {"omega": -2.0})
    assert coupling._groups[0].model.params["omega"].tolist() == [0.242, 0.242]  # queued


def _embedded_run(change, steps=(20, 20)):
    """Two embedded TLS run for steps[0], then ``change(coupling)``, then steps[1] more;
    the recorded history and the coupling."""
    import meep as mp

    from maxwellhub.em import MeepCoupling

    mp.verbosity(0)
    sim = mp.Simulation(cell_size=mp.Vector3(8, 0), resolution=10, boundary_layers=[mp.PML(3.0)])
    coupling = MeepCoupling(sim, time_units_fs=0.1)
    coupling.add_molecules(
        "tls",
        centers=[(0, 0, 0), (0.5, 0, 0)],
        sigma=0.1,
        axis="z",
        omega=0.242,
        mu12=187.0,
        pe_initial=0.1,
    )
    dt = 0.5 / 10  # Courant 0.5, resolution 10
    sim.run(coupling.step_function(), until=steps[0] * dt)
    change(coupling)
    sim.run(coupling.step_function(), until=steps[1] * dt)
    return coupling.history(), coupling


@pytest.mark.meep
def test_embedded_set_params_applies_before_the_next_step():
    """A queued change equals changing the model right there, before the next step, bit
    for bit; a checkpoint taken before that step already holds it."""
    pytest.importorskip("meep")
    queued, coupling = _embedded_run(lambda c: c.set_params([1], {"omega": 0.3}))
    direct, _ = _embedded_run(
        lambda c: c._groups[0].model.set_params({"omega": 0.3}, molecules=[1])
    )
    unchanged, _ = _embedded_run(lambda c: None)
    assert coupling._groups[0].model.params["omega"].tolist() == [0.242, 0.3]
    for key in ("Pe", "time_au", "energy_au"):
        np.testing.assert_array_equal(queued[key], direct[key], err_msg=key)
    first = int(np.argmax(queued["Pe"][:, 1] != unchanged["Pe"][:, 1]))
    assert first > 0  # the same until the change ...
    np.testing.assert_array_equal(queued["Pe"][:first], unchanged["Pe"][:first])
    assert not np.array_equal(queued["Pe"], unchanged["Pe"])  # ... then not

    def change_then_checkpoint(c):
        c.set_params([0], {"mu12": 150.0})
        c.saved = c.checkpoint_state()

    _, coupling = _embedded_run(change_then_checkpoint)
    np.testing.assert_array_equal(coupling.saved["model.0.param.mu12"], [150.0, 187.0])


@pytest.mark.meep
def test_resume_without_the_config_resolves_paths_where_the_run_did(tmp_path, monkeypatch):
    """A run whose parameters name a file relative to its config, resumed from its
    checkpoint alone (no config file) from another directory, finds the same file."""
    pytest.importorskip("meep")
    (tmp_path / "cfg" / "in").mkdir(parents=True)
    (tmp_path / "cfg" / "in" / "h2.xyz").write_text("2\n")
    path = write_config(tmp_path / "cfg", "molecule_xyz = 'in/h2.xyz'\nnoise = 1e-4", count=2)
    text = path.read_text().replace("[transport]", '[transport]\nkind = "embedded"')
    path.write_text(
        text
        + textwrap.dedent(f"""
        [output]
        directory = "{tmp_path / "out"}"
        plot = false

        [checkpoint]
        dir = "{tmp_path / "ck"}"
        every = 10
    """)
    )
    monkeypatch.chdir(tmp_path)
    assert runner.main(str(path), {"simulation.until": 0.5}) == 0
    manifest = json.loads(next((tmp_path / "ck").glob("step_*/manifest.json")).read_text())
    assert manifest["config_dir"] == str(tmp_path / "cfg")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert runner.main(None, {"simulation.until": 1.0}, resume=str(tmp_path / "ck")) == 0


def test_missing_extras_name_the_pip_extra_of_a_missing_package(tmp_path, capsys, monkeypatch):
    """`maxwellhub run --missing-extras` (what ./dev.sh run asks before a run) prints the
    extra of a lazily registered model whose package is absent, and nothing when it is
    installed; without PySCF, validating an rttddft config is one line naming the extra."""
    import maxwellhub.models as models

    path = write_config(tmp_path, "", model="rttddft", count=1)
    assert runner.main(str(path), missing_extras=True) == 0
    assert capsys.readouterr().out == ""  # PySCF is installed in the test venv
    monkeypatch.setattr(models, "find_spec", lambda name: None)
    assert runner.main(str(path), missing_extras=True) == 0
    assert capsys.readouterr().out == "pyscf\n"
    assert models.missing_extra("tls") is None
    monkeypatch.delitem(sys.modules, "maxwellhub.models.rttddft", raising=False)
    monkeypatch.setitem(sys.modules, "pyscf", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"needs PySCF: pip install 'maxwellhub\[pyscf\]'"):
        runner.validate_models(load_config(path))


@pytest.mark.meep
def test_embedded_kick_applies_at_the_next_step_boundary():
    """coupling.apply_kick queues a kick like a parameter change: bit for bit the model
    kicked right there, before the next step; the same as no kick until then; a socket
    molecule, a bad impulse or a model without kicks is refused naming the molecule."""
    pytest.importorskip("meep")
    impulse = [0.0, 0.0, 1e-3]
    queued, coupling = _embedded_run(lambda c: c.apply_kick([1], impulse))
    direct, _ = _embedded_run(lambda c: c._groups[0].model.apply_kick(impulse, molecules=[1]))
    unchanged, _ = _embedded_run(lambda c: None)
    for key in ("Pe", "time_au", "energy_au"):
        np.testing.assert_array_equal(queued[key], direct[key], err_msg=key)
    first = int(np.argmax(queued["Pe"][:, 1] != unchanged["Pe"][:, 1]))
    assert first > 0
    np.testing.assert_array_equal(queued["Pe"][:first], unchanged["Pe"][:first])
    with pytest.raises(Exception, match="finite 3-vector"):
        coupling.apply_kick([0], [0.0, np.inf, 0.0])
    with pytest.raises(Exception, match="no molecule with id 7"):
        coupling.apply_kick([7], impulse)
