"""The same molecules behind socket drivers and under mpirun give the embedded serial
trajectories (real Meep, real `maxwellhub-driver` processes, real `mpirun`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

from maxwellhub import SocketHub
from maxwellhub.analysis import compare_to_curve, golden_rule_rate
from maxwellhub.run.launch import reap, start_driver
from maxwellhub.units import MeepUnits

mp = pytest.importorskip("meep")
from maxwellhub.em import MeepCoupling  # noqa: E402  (needs meep)

pytestmark = pytest.mark.meep
UNITS = MeepUnits(0.1)
# Model parameters, as add_molecules(**params: Any) takes them.
TLS: dict[str, Any] = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 1e-4}


def _sim():
    mp.verbosity(0)
    return mp.Simulation(cell_size=mp.Vector3(8, 8), resolution=10, boundary_layers=[mp.PML(3.0)])


def _embedded(n: int = 1, until: float = 90) -> dict:
    sim = _sim()
    coupling = MeepCoupling(sim, time_units_fs=0.1)
    params = dict(TLS, mu12=TLS["mu12"] / np.sqrt(n))
    coupling.add_molecules("tls", centers=[(0, 0)] * n, sigma=0.1, axis="z", **params)
    sim.run(coupling.step_function(), until=until)
    return coupling.history()


def _socket(name: str, n: int, deadline, until: float = 90) -> dict:
    params = dict(TLS, mu12=TLS["mu12"] / np.sqrt(n))
    hub = SocketHub(unixsocket=name, timeout=deadline(30))
    drivers = []
    try:
        drivers = [start_driver("tls", params, unix=name) for _ in range(n)]
        sim = _sim()
        coupling = MeepCoupling(sim, time_units_fs=0.1, hub=hub, timeout=deadline(30))
        coupling.add_socket_molecules(centers=[(0, 0)] * n, sigma=0.1, axis="z")
        sim.run(coupling.step_function(), until=until)
        return coupling.history()
    finally:
        hub.stop()
        reap(drivers, deadline(5))


def test_socket_and_embedded_trajectories_are_identical(unix_name, deadline):
    """One TLS behind a socket driver follows the embedded trajectory to 1e-12 over the
    whole 2D relaxation (1801 steps), and passes the 2D validation."""
    socket = _socket(unix_name, 1, deadline)
    embedded = _embedded()
    for key in ("Pe", "Pg", "Pge_real", "Pge_imag", "muz_au", "energy_au", "time_au"):
        np.testing.assert_allclose(socket[key], embedded[key], rtol=0, atol=1e-12, err_msg=key)
    t = UNITS.time_au_to_meep(socket["time_au"][:, 0])
    gamma = golden_rule_rate(2, UNITS.frequency_au_to_meep(0.242), UNITS.dipole_au_to_meep(187.0))
    errors = compare_to_curve(t, socket["Pe"][:, 0], gamma)
    print(
        f"\n2d via socket: std {errors['std']:.2e} max {errors['max']:.2e}, "
        f"max |socket - embedded| {np.abs(socket['Pe'] - embedded['Pe']).max():.1e}"
    )
    assert errors["std"] < 3e-3 and errors["max"] < 8e-3


def test_two_socket_drivers_at_one_point_reproduce_one(unix_name, deadline):
    """Two socket TLS at one point with mu/sqrt(2) each relax like one with mu."""
    pair = _socket(unix_name, 2, deadline)
    single = _embedded()
    np.testing.assert_allclose(pair["Pe"], np.repeat(single["Pe"], 2, axis=1), rtol=0, atol=1e-12)


def test_mixed_socket_and_embedded(unix_name, deadline):
    """An embedded and a socket molecule in one simulation are both stepped and recorded
    (ids in order of addition; the socket one reports its driver's extras)."""
    hub = SocketHub(unixsocket=unix_name, timeout=deadline(30))
    drivers = []
    try:
        drivers = [start_driver("tls", TLS, unix=unix_name)]
        sim = _sim()
        coupling = MeepCoupling(sim, hub=hub, timeout=deadline(30))
        a = coupling.add_molecules("tls", centers=[(0.5, 0)], **TLS)
        b = coupling.add_socket_molecules(centers=[(-0.5, 0)])
        sim.run(coupling.step_function(), until=5)
        history = coupling.history()
    finally:
        hub.stop()
        reap(drivers, deadline(5))
    assert (a.tolist(), b.tolist()) == ([0], [1])
    assert history["Pe"].shape == (101, 2)
    np.testing.assert_allclose(history["Pe"][:, 0], history["Pe"][:, 1], rtol=1e-9)


MPI_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import meep as mp
    from maxwellhub.em import MeepCoupling

    mp.verbosity(0)
    sim = mp.Simulation(cell_size=mp.Vector3(8, 8), resolution=10,
                        boundary_layers=[mp.PML(3.0)])
    coupling = MeepCoupling(sim, time_units_fs=0.1)
    coupling.add_molecules("tls", centers=[(0, 0), (0.03, 0.41)], sigma=0.1, axis="z",
                           omega=0.242, mu12=187.0, orientation=2, pe_initial=[0.1, 0.0])
    coupling.add_molecules("tls", centers=[(-0.04, -0.37)], sigma=0.12, axis="xy",
                           omega=0.242, mu12=187.0, orientation=0, pe_initial=0.2)
    sim.run(coupling.step_function(), until=25)
    patches = coupling._sites.patches
    with open(f"{sys.argv[1]}.rank{mp.my_rank()}.json", "w") as f:  # non-master stdout is muted
        json.dump({"rank": mp.my_rank(), "sites": sum(p.stop - p.start for p in patches)}, f)
    if mp.am_master():
        np.savez(sys.argv[1], **coupling.history())
""")


@pytest.mark.slow
@pytest.mark.mpi
def test_mpirun_equals_serial(tmp_path, deadline):
    """`mpirun -np 2` gives the serial trajectories to 1e-10, with the molecules' sites
    split over both ranks (three molecules, Ez and in-plane Ex/Ey kernels)."""
    mpirun = shutil.which("mpirun")
    assert mpirun is not None  # the mpi marker skips when it is missing
    script = tmp_path / "mpi_molecules.py"
    script.write_text(MPI_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_")}
    env["OPENBLAS_NUM_THREADS"] = "1"
    serial = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "serial.npz")],
        env=env,
        capture_output=True,
        text=True,
        timeout=deadline(120),
    )
    assert serial.returncode == 0, serial.stderr[-2000:]
    parallel = subprocess.run(
        [
            mpirun,
            "-np",
            "2",
            "--allow-run-as-root",
            "--oversubscribe",
            sys.executable,
            str(script),
            str(tmp_path / "mpi.npz"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=deadline(240),
    )
    assert parallel.returncode == 0, parallel.stderr[-2000:]
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("mpi.npz.rank*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert all(r["sites"] > 0 for r in ranks), ranks
    a, b = np.load(tmp_path / "serial.npz"), np.load(tmp_path / "mpi.npz")
    assert a["Pe"].shape == (501, 3)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in ("Pe", "Pge_real", "Pge_imag"))
    print(f"\nmpirun -np 2 vs serial: max difference {worst:.1e}")
    assert worst < 1e-10
    assert np.abs(a["Pe"][-1] - a["Pe"][0]).max() > 1e-3  # the molecules did evolve
