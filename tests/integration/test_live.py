"""The hub with real driver processes: ours over UNIX and TCP, MaxwellLink's driver against
our hub, and our driver against MaxwellLink's hub."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _util import mxl_venv, scaled

from maxwellhub import SocketHub
from maxwellhub.models import create_model
from maxwellhub.run.launch import driver_env, reap, start_driver

DT_AU = 0.5
TLS = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 0.1}


def field_sequence(steps: int, seed: int = 1) -> np.ndarray:
    """A reproducible, non-trivial field history (a.u.) on all three axes."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps) * DT_AU
    base = 2e-3 * np.sin(0.242 * t)[:, None] * np.array([0.3, -0.5, 1.0])
    return base + 1e-4 * rng.standard_normal((steps, 3))


def open_hub(transport: str, name: str) -> tuple[SocketHub, dict]:
    if transport == "unix":
        return SocketHub(unixsocket=name, timeout=scaled(30)), {"unix": name}
    hub = SocketHub(port=0, timeout=scaled(30))
    return hub, {"host": "127.0.0.1", "port": hub.port}


def expected_sources(model: str, params: dict, n: int, fields_per_step) -> list[np.ndarray]:
    """What the model, run in-process, answers for each step's (n, 3) fields."""
    ref = create_model(model, n=n, **params)
    ref.initialize(dt_au=DT_AU, molecule_ids=list(range(n)))
    return [ref.step(f) for f in fields_per_step]


def run_steps(hub, ids, fields_per_step, expected, extras_check=None):
    """Step the hub through every field, asserting every molecule's source."""
    for step, fields in enumerate(fields_per_step):
        results = hub.step({m: {"efield_au": fields[i]} for i, m in enumerate(ids)})
        got = np.array([results[m]["amp"] for m in ids])
        np.testing.assert_allclose(
            got, expected[step], rtol=1e-12, atol=1e-300, err_msg=f"step {step}"
        )
        if extras_check:
            extras_check(step, {m: json.loads(results[m]["extra"]) for m in ids})


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_our_drivers_several_molecules(transport, unix_name):
    """Four TLS/SHO drivers over UNIX and TCP: right ids, extras, and model sources."""
    hub, where = open_hub(transport, unix_name)
    procs = []
    with hub:
        ids = [hub.register_molecule_return_id() for _ in range(4)]
        for _ in ids:
            procs.append(start_driver("tls", TLS, timeout=scaled(30), **where))
        assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=scaled(30))
        fields = [np.tile(f, (4, 1)) * np.array([[1], [2], [3], [4]]) for f in field_sequence(20)]
        expected = expected_sources("tls", TLS, 4, fields)

        def check(step, extras):
            for m in ids:
                assert extras[m]["time_au"] == pytest.approx((step + 1) * DT_AU, rel=1e-12)
                assert {"Pe", "Pg", "Pge_real", "Pge_imag", "muz_au", "energy_au"} <= set(extras[m])

        run_steps(hub, ids, fields, expected, check)
    assert reap(procs, scaled(10)) == [0, 0, 0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_thousand_steps_sixteen_drivers(transport, unix_name):
    """Acceptance: 1,000 barrier steps with 16 drivers, every source checked."""
    hub, where = open_hub(transport, unix_name)
    n, steps = 16, 1000
    pe_initial = [0.01 * (k + 1) for k in range(n)]
    params = dict(TLS, pe_initial=pe_initial)
    procs = []
    with hub:
        ids = [hub.register_molecule_return_id() for _ in range(n)]
        for k, m in enumerate(ids):
            # One at a time, so that driver k (with its own pe_initial) binds to ids[k].
            procs.append(
                start_driver(
                    "tls", dict(TLS, pe_initial=pe_initial[k]), timeout=scaled(30), **where
                )
            )
            assert hub.wait_until_bound({m: {"dt_au": DT_AU}}, timeout=scaled(30))
        fields = [np.tile(f, (n, 1)) for f in field_sequence(steps, seed=7)]
        expected = expected_sources("tls", params, n, fields)
        run_steps(hub, ids, fields, expected)
        assert hub.step_index == steps
    assert reap(procs, scaled(10)) == [0] * n


def test_killed_driver_replaced_mid_run(unix_name):
    """A driver SIGKILLed during a run is replaced; the barrier completes and every other
    driver steps exactly once per step (its time_au advances by dt every step)."""
    n, steps = 4, 60
    hub = SocketHub(unixsocket=unix_name, timeout=scaled(30))
    procs = []
    with hub:
        ids = [hub.register_molecule_return_id() for _ in range(n)]
        for _ in ids:
            procs.append(start_driver("tls", TLS, timeout=scaled(30), unix=unix_name))
        assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=scaled(30))
        victim_step = random.Random(3).randrange(10, 50)
        victim = procs[1]
        for step in range(steps):
            if step == victim_step:
                # Killed between steps (a thread killing "during the run" could come after
                # the last step: 60 steps take milliseconds); its replacement is started
                # and the step then waits in the barrier until it has bound.
                victim.send_signal(signal.SIGKILL)
                victim.wait(scaled(10))
                procs.append(start_driver("tls", TLS, timeout=scaled(30), unix=unix_name))
            results = hub.step({m: {"efield_au": [0.0, 0.0, 1e-3]} for m in ids})
            times = {m: json.loads(results[m]["extra"])["time_au"] for m in ids}
            healthy = [m for m in ids if times[m] == pytest.approx((step + 1) * DT_AU)]
            # Every driver but the victim's molecule steps exactly once per step.
            assert len(healthy) >= n - 1, (step, times)
            if step < victim_step:
                assert len(healthy) == n
        assert len(procs) == n + 1
    codes = reap(procs, scaled(10))
    assert codes[1] == -signal.SIGKILL and codes[:1] + codes[2:] == [0] * (len(codes) - 1)


# ------------------------------------------------------------------ MaxwellLink peer


@pytest.mark.peer
def test_maxwelllink_driver_matches_ours(mxl_driver, unix_name):
    """MaxwellLink's mxl_driver and ours give the same sources for the same fields (1e-10)."""
    steps = 300
    params = "omega=0.242, mu12=187, orientation=2, pe_initial=0.1"
    hub = SocketHub(unixsocket=unix_name, timeout=scaled(60))
    procs = []
    with hub:
        theirs, ours = hub.register_molecule_return_id(), hub.register_molecule_return_id()
        procs.append(
            subprocess.Popen(
                [
                    str(mxl_driver),
                    "--model",
                    "tls",
                    "--unix",
                    "--address",
                    unix_name,
                    "--param",
                    params,
                ],
                env=driver_env(),
                stdout=subprocess.DEVNULL,
            )
        )
        assert hub.wait_until_bound({theirs: {"dt_au": DT_AU}}, timeout=scaled(60))
        procs.append(start_driver("tls", TLS, timeout=scaled(30), unix=unix_name))
        assert hub.wait_until_bound({ours: {"dt_au": DT_AU}}, timeout=scaled(30))
        worst = 0.0
        for step, f in enumerate(field_sequence(steps, seed=11)):
            r = hub.step({theirs: {"efield_au": f}, ours: {"efield_au": f}})
            a, b = r[theirs]["amp"], r[ours]["amp"]
            scale = max(abs(a[2]), 1e-300)
            worst = max(worst, abs(a[2] - b[2]) / scale)
            assert abs(a[2] - b[2]) <= 1e-10 * scale, (step, a, b)
            ea, eb = json.loads(r[theirs]["extra"]), json.loads(r[ours]["extra"])
            assert set(ea) <= set(eb), set(ea) - set(eb)
            for key in ("Pe", "Pg", "Pge_real", "Pge_imag", "muz_au", "energy_au"):
                assert math.isclose(ea[key], eb[key], rel_tol=1e-9, abs_tol=1e-15), key
        print(f"max relative source difference over {steps} steps: {worst:.2e}")
    assert reap(procs, scaled(10)) == [0, 0]


_MXL_HUB_SCRIPT = textwrap.dedent("""
    import json, subprocess, sys
    import numpy as np
    from maxwelllink import SocketHub
    name, driver, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    hub = SocketHub(unixsocket=name, timeout=30.0, latency=1e-4)
    mid = hub.register_molecule_return_id()
    proc = subprocess.Popen([driver, "--unix", name, "--model", "tls", "--param",
                             "omega=0.242", "--param", "mu12=187", "--param",
                             "pe_initial=0.1", "--timeout", "30"])
    assert hub.wait_until_bound({mid: {"molecule_id": mid, "dt_au": 0.5}}, timeout=30)
    fields = json.loads(sys.stdin.read())
    out = []
    for f in fields:
        res = {}
        while not res:
            res = hub.step_barrier({mid: {"efield_au": np.array(f)}})
        out.append([float(x) for x in res[mid]["amp"]])
    hub.stop()
    proc.wait(timeout=10)
    print(json.dumps({"sources": out, "driver_exit": proc.returncode}))
""")


@pytest.mark.peer
def test_our_driver_against_maxwelllink_hub(mxl_driver, driver_exe, unix_name):
    """Our driver, served by MaxwellLink's SocketHub, answers as our model predicts."""
    steps = 100
    fields = field_sequence(steps, seed=5)
    python = mxl_venv() / "bin" / "python"
    proc = subprocess.run(
        [str(python), "-c", _MXL_HUB_SCRIPT, unix_name, str(driver_exe), str(steps)],
        input=json.dumps(fields.tolist()),
        capture_output=True,
        text=True,
        timeout=scaled(120),
        env=driver_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = expected_sources("tls", TLS, 1, [f[None, :] for f in fields])
    np.testing.assert_allclose(np.array(out["sources"]), np.vstack(expected), rtol=1e-12)
    assert out["driver_exit"] == 0


def test_demo_command_runs(deadline):
    """`maxwellhub demo` starts a hub and two drivers and prints the exchanged values."""
    exe = os.path.join(os.path.dirname(sys.executable), "maxwellhub")
    proc = subprocess.run(
        [exe, "demo", "--steps", "3"], capture_output=True, text=True, timeout=deadline(60)
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["driver_exit_codes"] == [0, 0] and summary["steps"] == 3


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_ensemble_driver_equals_single_drivers(transport, unix_name, tmp_path):
    """M molecules in one ensemble driver (--molecules M, batched frames) follow the same
    trajectories as M single drivers with the same parameters, to 1e-12, every step."""
    m, steps = 5, 200
    pe = [0.05 * (k + 1) for k in range(m)]
    hub, where = open_hub(transport, unix_name)
    params_file = tmp_path / "ensemble.json"
    params_file.write_text(json.dumps(dict(TLS, pe_initial=pe)))
    procs = []
    with hub:
        singles = [hub.register_molecule_return_id() for _ in range(m)]
        for k, mid in enumerate(singles):  # one at a time: driver k binds to singles[k]
            procs.append(
                start_driver("tls", dict(TLS, pe_initial=pe[k]), timeout=scaled(30), **where)
            )
            assert hub.wait_until_bound({mid: {"dt_au": DT_AU}}, timeout=scaled(30))
        ensemble = [hub.register_molecule_return_id() for _ in range(m)]
        procs.append(
            start_driver(
                "tls",
                None,
                timeout=scaled(30),
                **where,
                extra_args=["--molecules", str(m), "--params-file", str(params_file)],
            )
        )
        assert hub.wait_until_bound({mid: {"dt_au": DT_AU} for mid in ensemble}, timeout=scaled(30))
        ids = np.array(singles + ensemble)
        for f in field_sequence(steps, seed=3):
            scale = np.r_[np.arange(1, m + 1), np.arange(1, m + 1)][:, None]
            fields = np.tile(f, (2 * m, 1)) * scale
            result = hub.step_arrays(ids, fields)
            np.testing.assert_allclose(
                result.sources[m:], result.sources[:m], rtol=1e-12, atol=1e-300
            )
        extras = result.extras()
        for key in ("Pe", "Pg", "Pge_real", "Pge_imag", "muz_au", "energy_au", "time_au"):
            np.testing.assert_allclose(
                extras[key][m:], extras[key][:m], rtol=1e-12, atol=1e-15, err_msg=key
            )
    assert reap(procs, scaled(10)) == [0] * (m + 1)
