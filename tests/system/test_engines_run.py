"""Non-Meep engines in ``maxwellhub run`` and through :class:`EngineCoupling`: the
``[em]`` table validated before anything starts, embedded = sockets, checkpoints that
continue bit for bit, schedules at the same step boundaries as with Meep."""

from __future__ import annotations

import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from _util import REPO_ROOT

from maxwellhub.em import EngineCoupling, LaserField
from maxwellhub.errors import UsageError
from maxwellhub.pulses import ContinuousWave
from maxwellhub.run import runner
from maxwellhub.run.config import ConfigError, load_config

LASER = """
[em]
engine = "laser"

[em.laser]
pulse = {{ shape = "cw", e0 = 1e-4, omega = 0.242 }}
polarization = [0.0, 0.0, 1.0]

[simulation]
dt_au = 0.2
until = 40.0

[transport]
kind = "{kind}"
molecules_per_driver = {per}

[[molecules]]
model = "tls"
count = 3
[molecules.params]
omega = 0.242
mu12 = 187.0
orientation = 2
pe_initial = [0.0, 0.1, 0.3]

[output]
directory = "{out}"
plot = false
record_every = 5
"""


def _write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _laser_config(tmp_path: Path, kind: str = "embedded", per: int = 1, extra: str = ""):
    text = LASER.format(kind=kind, per=per, out=tmp_path / f"out_{kind}_{per}") + extra
    return load_config(_write(tmp_path, text, f"{kind}_{per}.toml"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"em.engine": "plasma"}, "em.engine = 'plasma'; allowed: meep, cavity"),
        ({"em.laser.pulse": {"shape": "square"}}, "em.laser.pulse.shape = 'square'"),
        ({"em.laser.pulse": {"shape": "cw", "e0": 1.0}}, "missing key em.laser.pulse.omega"),
        ({"em.laser.colour": 1}, "unknown key em.laser.colour"),
        ({"em.cavity": {"frequency_au": 0.2}}, "em.cavity is given but em.engine = 'laser'"),
        ({"simulation.resolution": 10}, "simulation.resolution is a Meep key"),
        ({"simulation.dt_au": -1.0}, "simulation.dt_au = -1.0"),
        ({"molecules": [{"model": "tls", "sigma": 0.1}]}, "molecules[0].sigma applies to the Meep"),
    ],
)
def test_bad_engine_config_names_the_key(tmp_path, change, message):
    """Every mistake in an engine's tables is a ConfigError naming the key."""
    path = _write(tmp_path, LASER.format(kind="embedded", per=1, out=tmp_path / "out"))
    with pytest.raises(ConfigError) as info:
        runner.validate_models(load_config(path, change))
    assert message in str(info.value)


def test_meep_keys_in_em_meep_are_the_old_simulation_keys(tmp_path):
    """[em.meep] holds Meep's keys as [simulation] did; giving one in both is refused."""
    base = load_config(REPO_ROOT / "examples" / "relax_2d.toml")
    moved = load_config(
        REPO_ROOT / "examples" / "relax_2d.toml",
        {
            "simulation": {"until": 90},
            "em.meep": {
                "dimensions": 2,
                "cell": [8.0, 8.0],
                "resolution": 10,
                "pml": 3.0,
                "time_units_fs": 0.1,
            },
        },
    )
    assert moved.simulation == base.simulation
    assert moved.em.engine == "meep"
    with pytest.raises(ConfigError, match=r"simulation\.resolution and em\.meep\.resolution"):
        load_config(
            REPO_ROOT / "examples" / "relax_2d.toml",
            {"em.meep.resolution": 20},
        )


def _history(summary: dict) -> dict[str, np.ndarray]:
    with h5py.File(summary["hdf5"]) as f:
        return {k: f[k][()] for k in ("Pe", "mux_au", "muz_au", "step")} | {
            f"engine/{k}": f["engine"][k][()] for k in f["engine"]
        }


def test_laser_run_embedded_equals_sockets_and_ensembles(tmp_path):
    """The same laser run embedded, one driver per molecule and one ensemble driver
    gives the same populations and the same engine record to 1e-12."""
    runs = {}
    for kind, per in (("embedded", 1), ("unix", 1), ("unix", 3)):
        config = runner.validate_models(_laser_config(tmp_path, kind, per))
        summary = runner.run(config, echo=lambda line: None)
        assert summary["complete"] and summary["steps"] == 200
        runs[(kind, per)] = _history(summary)
    ref = runs[("embedded", 1)]
    assert ref["Pe"].shape == (40, 3) and ref["engine/efield_au"].shape == (200, 3)
    assert ref["Pe"][-1, 0] > 1e-3  # the field did drive the molecule
    for key, run in runs.items():
        for name in ("Pe", "muz_au", "engine/efield_au", "engine/dmudt_total_au"):
            assert np.abs(run[name] - ref[name]).max() <= 1e-12, (key, name)


def _coupling(thermostat_seed=None) -> EngineCoupling:
    engine = LaserField(pulse=ContinuousWave(e0=1e-4, omega=0.242), polarization=[0, 0, 1])
    coupling = EngineCoupling(engine, dt_au=0.2, record_every=3)
    coupling.add_molecules("tls", n=4, omega=0.242, mu12=187.0, orientation=2, pe_initial=0.1)
    coupling.add_molecules("sho", n=2, omega=0.1, mu0=2.0, orientation=2, rescaling=[1.0, 0.5])
    return coupling


def test_engine_coupling_checkpoint_continues_bitwise():
    """checkpoint_state mid-run, restore into a fresh coupling, continue: the records,
    the models and the engine equal the uninterrupted run's bit for bit, with a
    parameter change and a kick queued at the boundary."""
    whole = _coupling()
    whole.run(steps=50)
    whole.set_params([1], {"omega": 0.25})
    whole.apply_kick([0, 5], [0.0, 0.0, 1e-3])
    whole.run(steps=50)

    first = _coupling()
    first.run(steps=50)
    first.set_params([1], {"omega": 0.25})
    first.apply_kick([0, 5], [0.0, 0.0, 1e-3])
    state = {k: np.array(v) for k, v in first.checkpoint_state().items()}
    second = _coupling()
    second.restore_state(state)
    second.run(until=20.0)
    a, b = whole.history(), second.history()
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=True), key
    assert second.step_index == 100


def test_engine_coupling_refuses_misuse():
    """Socket molecules without a hub, no molecules, a bad rescaling: UsageErrors."""
    with pytest.raises(UsageError, match="no molecules"):
        _empty = EngineCoupling(LaserField(pulse=ContinuousWave(e0=1.0, omega=1.0)), 0.1)
        _empty.step()
    lonely = EngineCoupling(LaserField(pulse=ContinuousWave(e0=1.0, omega=1.0)), 0.1)
    lonely.add_socket_molecules(n=2)
    with pytest.raises(UsageError, match="need a hub"):
        lonely.step()
    bad = EngineCoupling(LaserField(pulse=ContinuousWave(e0=1.0, omega=1.0)), 0.1)
    with pytest.raises(UsageError, match="rescaling"):
        bad.add_molecules("tls", n=2, rescaling=[1.0, np.nan])
    with pytest.raises(UsageError, match="dt_au"):
        EngineCoupling(LaserField(pulse=ContinuousWave(e0=1.0, omega=1.0)), 0.0)


# A cavity with its Langevin thermostat and a drive, 3 TLS: 601 steps of 0.5 a.u., as the
# Meep runs of test_restart (whose kill-and-resume machinery this reuses).
CAVITY = """
[em]
engine = "cavity"

[em.cavity]
frequency_au = 0.242
damping_au = 1e-4
coupling_strength = 1e-4
coupling_axis = "z"
include_dse = true
temperature_au = 1e-5
langevin_tau_au = 200.0
random_seed = 11
drive = {{ shape = "gaussian", e0 = 1e-3, omega = 0.242, t0 = 60.0, sigma = 20.0 }}

[simulation]
dt_au = 0.5
until = 300.5

[transport]
kind = "{kind}"
molecules_per_driver = 2
{name}

[[molecules]]
model = "tls"
count = 3
[molecules.params]
omega = 0.242
mu12 = 187.0
orientation = 2
pe_initial = [0.0, 0.01, 0.02]

[output]
directory = "{out}"
plot = false
record_every = 7
"""


@pytest.mark.parametrize("kind", ["embedded", "unix"])
def test_cavity_run_with_thermostat_killed_and_resumed_is_bitwise(tmp_path, kind, unix_name):
    """A cavity run with the Langevin thermostat, SIGKILLed after a random checkpoint and
    resumed: every dataset (molecules and the engine's records) is bitwise the
    uninterrupted run's, embedded and with ensemble drivers."""
    from test_restart import _kill_and_resume, _run, _summary, _write_config

    name = unix_name if kind == "unix" else None
    ref = tmp_path / "reference"
    ref.mkdir()
    config = _write_config(ref / "run.toml", kind, ref / "out", name, None, CAVITY)
    done = _run(["run", str(config)], "reference")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _summary(done.stdout)["steps"] == 601
    with h5py.File(ref / "out" / "molecules.h5") as f:
        assert f["engine"]["qc_au"].shape == (601, 3)
        assert np.ptp(f["engine"]["qc_au"][:, 2]) > 0  # the drive and the bath moved it
    killed = tmp_path / "killed"
    killed.mkdir()
    _kill_and_resume(killed, kind, name, ref / "out" / "molecules.h5", template=CAVITY)


ENGINE_EXAMPLES = REPO_ROOT / "examples" / "engines"


@pytest.mark.parametrize("name", sorted(p.name for p in ENGINE_EXAMPLES.glob("*.toml")))
def test_engine_example_runs(name, tmp_path):
    """Each engine example, shortened to 600 steps: complete, its plot, the engine's
    records in the HDF5 file."""
    config = load_config(ENGINE_EXAMPLES / name)
    assert config.simulation.dt_au is not None  # set for every non-Meep engine
    short = load_config(
        ENGINE_EXAMPLES / name,
        {"simulation.until": 600 * config.simulation.dt_au, "output.directory": str(tmp_path)},
    )
    summary = runner.run(runner.validate_models(short), echo=lambda line: None)
    assert summary["complete"] and summary["steps"] == 600
    assert Path(summary["plot"]).stat().st_size > 10_000
    with h5py.File(summary["hdf5"]) as f:
        assert f["engine"]["time_au"].shape == (600,)
        assert f.attrs["engine"] == config.em.engine


def test_engine_examples_exist():
    """The glob above finds the examples (an empty glob would pass vacuously)."""
    assert {"cavity_rabi.toml", "laser_rabi.toml", "multimode_1d.toml"} <= {
        p.name for p in ENGINE_EXAMPLES.glob("*.toml")
    }
