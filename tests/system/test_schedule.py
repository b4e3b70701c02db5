"""``[[schedule]]`` in ``maxwellhub run``: parameter changes and kicks at given steps,
checked against the models before anything starts (each mistake named by its key), applied
at the step boundary exactly as the coupling API applies them, and a change the models
refuse at run time logged while the run goes on."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import numpy as np
import pytest

from maxwellhub.run import runner
from maxwellhub.run.config import ConfigError, load_config

CONFIG = """
[simulation]
dimensions = 2
cell = [6.0, 6.0]
resolution = 10
pml = 2.0
until = 3             # 60 steps

[transport]
kind = "{kind}"

[[molecules]]
model = "tls"
positions = [[0.0, 0.0], [0.5, 0.2]]
sigma = 0.1
axis = "z"
[molecules.params]
omega = 0.242
mu12 = 187.0
pe_initial = 1e-2

[output]
directory = "{out}"
plot = false
"""

SCHEDULE = """
[[schedule]]
step = 20
molecules = [1]
changes = { omega_eV = 7.0 }

[[schedule]]
step = 35
kick = [0.0, 0.0, 1e-3]
"""


def write(tmp_path: Path, schedule: str, kind: str = "embedded") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "run.toml"
    out = tmp_path / "out"
    path.write_text(CONFIG.format(kind=kind, out=out) + textwrap.dedent(schedule))
    return path


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("[[schedule]]\nstep = 5\nchanges = { colour = 1 }\n", "schedule[0].changes.colour"),
        (
            "[[schedule]]\nstep = 5\nchanges = { orientation = 0 }\n",
            "schedule[0].changes.orientation: tls: parameter orientation cannot be changed",
        ),
        ("[[schedule]]\nstep = 5\nchanges = { omega = -1.0 }\n", "schedule[0].changes.omega"),
        ("[[schedule]]\nstep = 500\nkick = [0, 0, 1e-3]\n", "schedule[0].step = 500: the run"),
        (
            "[[schedule]]\nstep = 5\nmolecules = [2]\nkick = [0, 0, 1e-3]\n",
            "schedule[0].molecules: no molecule with id 2",
        ),
        (
            "[[schedule]]\nstep = 5\nchanges = { omega = 0.3 }\nkick = [0, 0, 1]\n",
            "schedule[0]: give exactly one of changes",
        ),
        ("[[schedule]]\nstep = 0\nkick = [0, 0, 1e-3]\n", "schedule[0].step = 0"),
    ],
)
def test_bad_entries_are_refused_naming_the_key(tmp_path, schedule, message):
    """Unknown, immutable or out-of-range changes, steps past the end, unknown molecules
    and ambiguous entries are ConfigErrors naming schedule[i] (and the key)."""
    with pytest.raises(ConfigError) as info:
        runner.validate_models(load_config(write(tmp_path, schedule)))
    assert message in str(info.value), str(info.value)


def test_socket_runs_take_a_schedule(tmp_path):
    """Parameter changes reach socket molecules over the wire, so a socket run with a
    schedule is accepted (tests/integration/test_params_wire.py runs one)."""
    config = load_config(write(tmp_path, "[[schedule]]\nstep = 5\nkick = [0, 0, 1e-3]\n", "unix"))
    assert config.schedule[0].kick == (0.0, 0.0, 1e-3)


@pytest.mark.meep
def test_schedule_equals_the_coupling_api_bit_for_bit(tmp_path):
    """A run with a parameter change (in eV) at step 20 and a kick of every molecule at step
    35 equals, bit for bit, the same coupling driven by hand with set_params/apply_kick
    queued after steps 19 and 34; without the schedule the molecules follow another path."""
    pytest.importorskip("meep")
    import meep as mp

    from maxwellhub.em import MeepCoupling

    config = runner.validate_models(load_config(write(tmp_path / "a", SCHEDULE)))
    assert config.schedule[0].changes == {"omega": pytest.approx(7.0 / 27.211386245988)}
    omega = config.schedule[0].changes["omega"]  # 7 eV in Hartree, as the run computed it
    summary = runner.run(config, echo=lambda line: None)
    assert summary["complete"]
    scheduled = _read(Path(summary["hdf5"]))

    sim = runner.build_simulation(config)
    coupling = MeepCoupling(sim, time_units_fs=0.1)
    coupling.add_molecules(
        "tls",
        centers=[(0, 0, 0), (0.5, 0.2, 0)],
        sigma=0.1,
        axis="z",
        omega=0.242,
        mu12=187.0,
        pe_initial=1e-2,
    )

    def by_hand(sim) -> None:
        if sim.fields.t == 19:
            coupling.set_params([1], {"omega": omega})
        if sim.fields.t == 34:
            coupling.apply_kick([0, 1], [0.0, 0.0, 1e-3])

    sim.run(coupling.step_function(), by_hand, until=lambda s: s.round_time() >= 3)
    mp.verbosity(0)
    manual = coupling.history()
    for key in ("Pe", "muz_au", "time_au"):
        np.testing.assert_array_equal(scheduled[key], manual[key], err_msg=key)
    plain = runner.run(
        runner.validate_models(load_config(write(tmp_path / "b", ""))), echo=lambda line: None
    )
    unchanged = _read(Path(plain["hdf5"]))
    np.testing.assert_array_equal(scheduled["Pe"][:20], unchanged["Pe"][:20])
    assert not np.array_equal(scheduled["Pe"][:, 1], unchanged["Pe"][:, 1])


@pytest.mark.meep
def test_a_change_refused_at_run_time_is_logged_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    """If the models refuse a scheduled change when it is due (a check across parameters
    only the model can make), the run logs it naming the entry and completes."""
    pytest.importorskip("meep")
    from maxwellhub.em import MeepCoupling
    from maxwellhub.errors import UsageError

    def refuse(self, ids, changes):
        raise UsageError(f"set_params: molecule {ids[0]}: tls: refused for the test")

    monkeypatch.setattr(MeepCoupling, "set_params", refuse)
    config = runner.validate_models(load_config(write(tmp_path, SCHEDULE)))
    with caplog.at_level(logging.INFO, logger="maxwellhub.run"):
        summary = runner.run(config, echo=lambda line: None)
    assert summary["complete"] and summary["steps"] == 61
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        "schedule[0] at step 20 refused, the run goes on" in e and "molecule 1" in e for e in errors
    ), errors
    assert any("schedule[1]: kick" in r.getMessage() for r in caplog.records)


def _read(path: Path) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(path) as f:
        return {key: f[key][()] for key in f}
