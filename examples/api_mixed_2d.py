"""Plain-Python API: one embedded TLS and one TLS behind a driver process, side by side in
an ordinary Meep simulation. Both start excited; they relax together.

    .venv/bin/python examples/api_mixed_2d.py [--until 90]
"""

import argparse
from typing import Any

import meep as mp

from maxwellhub import SocketHub
from maxwellhub.em import MeepCoupling
from maxwellhub.run.launch import reap, start_driver

parser = argparse.ArgumentParser()
parser.add_argument("--until", type=float, default=90.0)
args = parser.parse_args()

tls: dict[str, Any] = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 1e-4}  # a.u.
sim = mp.Simulation(cell_size=mp.Vector3(8, 8), resolution=10, boundary_layers=[mp.PML(3.0)])
with SocketHub(unixsocket="api_mixed_2d", timeout=60) as hub:
    coupling = MeepCoupling(sim, time_units_fs=0.1, hub=hub)
    coupling.add_molecules("tls", centers=[(-0.5, 0)], sigma=0.1, axis="z", **tls)
    coupling.add_socket_molecules(centers=[(0.5, 0)], sigma=0.1, axis="z")
    driver = start_driver("tls", tls, unix="api_mixed_2d")
    sim.run(coupling.step_function(), until=args.until)
reap([driver])
history = coupling.history()
print("final Pe (embedded, socket):", history["Pe"][-1].tolist())
