"""RT-TDHF/TDDFT molecules inside a real 2D Meep run: a molecule behind a socket driver
follows the embedded trajectory to 1e-12 (closed shell, and an open-shell doublet on UKS),
over 200 coupled steps."""

from __future__ import annotations

import numpy as np
import pytest

from maxwellhub import SocketHub
from maxwellhub.run.launch import reap, start_driver

mp = pytest.importorskip("meep")
pytest.importorskip("pyscf")
from maxwellhub.em import MeepCoupling  # noqa: E402  (needs meep)

pytestmark = pytest.mark.meep

UNTIL = 10.0  # Meep time units at tau = 0.1 fs: 200 EM steps of 0.2067 a.u.
CASES = {
    # closed shell (RHF): H2 along z, kicked along its axis
    "h2_hf": {
        "atoms": "H 0 0 0; H 0 0 0.74",
        "xc": "hf",
        "kick_au": 2e-2,
        "kick_direction": [0.0, 0.0, 1.0],
        "dt_substep_au": 0.1,
    },
    # open shell (UKS, LDA): the NH2 radical, a doublet with no degenerate orbital to
    # half-fill (OH's pi pair keeps an LDA SCF from converging tightly)
    "nh2_uks_lda": {
        "atoms": "N 0 0 0.14; H 0 0.80 -0.49; H 0 -0.80 -0.49",
        "multiplicity": 2,
        "xc": "lda",
        "grid_level": 0,
        "kick_au": 2e-3,
        "kick_direction": [0.0, 0.0, 1.0],
        "dt_substep_au": 0.1,
    },
}
KEYS = ("mux_au", "muy_au", "muz_au", "energy_au", "time_au")


def _sim():
    mp.verbosity(0)
    return mp.Simulation(cell_size=mp.Vector3(6, 6), resolution=10, boundary_layers=[mp.PML(2.0)])


def _embedded(params: dict) -> dict:
    sim = _sim()
    coupling = MeepCoupling(sim, time_units_fs=0.1)
    coupling.add_molecules("rttddft", centers=[(0, 0)], sigma=0.1, axis="z", **params)
    sim.run(coupling.step_function(), until=UNTIL)
    return coupling.history()


def _socket(params: dict, name: str, tmp_path) -> dict:
    hub = SocketHub(unixsocket=name)
    log = tmp_path / "driver.log"
    drivers = [start_driver("rttddft", params, unix=name, log_path=log)]
    try:
        hub.watch_processes(drivers)  # a driver that dies ends the wait, naming it
        sim = _sim()
        coupling = MeepCoupling(sim, time_units_fs=0.1, hub=hub)
        coupling.add_socket_molecules(centers=[(0, 0)], sigma=0.1, axis="z")
        sim.run(coupling.step_function(), until=UNTIL)
        return coupling.history()
    finally:
        hub.stop()
        codes = reap(drivers, 10.0)
        assert codes == [0], log.read_text(errors="replace")[-3000:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_socket_driver_follows_the_embedded_trajectory(case, unix_name, tmp_path):
    """One kicked RT-TDHF/TDDFT molecule in 2D Meep: the socket driver's dipoles, energies
    and times equal the embedded model's to 1e-12 over 200 coupled steps, and the kick
    moved the dipole."""
    params = CASES[case]
    embedded = _embedded(params)
    socket = _socket(params, unix_name, tmp_path)
    assert socket["muz_au"].shape == embedded["muz_au"].shape == (201, 1)
    for key in KEYS:
        np.testing.assert_allclose(
            socket[key], embedded[key], rtol=0, atol=1e-12, err_msg=f"{case}: {key}"
        )
    muz = embedded["muz_au"][:, 0]
    assert np.ptp(muz) > 1e-4, f"{case}: the kick did not move the dipole"
    energy = embedded["energy_au"][:, 0]
    print(
        f"\n{case}: max |socket - embedded| muz "
        f"{np.abs(socket['muz_au'] - embedded['muz_au']).max():.1e}, "
        f"dipole swing {np.ptp(muz):.3e} a.u., energy change {energy[-1] - energy[0]:.3e} Eh"
    )
