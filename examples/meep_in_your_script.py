"""Molecules in your own Meep script (the README's Meep example): one embedded TLS and one
behind a driver process, side by side in an ordinary 2D Meep simulation.

Run: .venv/bin/python examples/meep_in_your_script.py
"""

import meep as mp

from maxwellhub import SocketHub
from maxwellhub.em import MeepCoupling
from maxwellhub.run.launch import reap, start_driver

tls: dict = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 1e-4}  # a.u.
sim = mp.Simulation(cell_size=mp.Vector3(8, 8), resolution=10, boundary_layers=[mp.PML(3.0)])
with SocketHub(unixsocket="readme_meep", timeout=60) as hub:  # /tmp/socketmxl_readme_meep
    coupling = MeepCoupling(sim, time_units_fs=0.1, hub=hub)
    coupling.add_molecules("tls", centers=[(-0.5, 0)], sigma=0.1, axis="z", **tls)  # embedded
    coupling.add_socket_molecules(centers=[(0.5, 0)], sigma=0.1, axis="z")  # over a socket
    driver = start_driver("tls", tls, unix="readme_meep")  # a maxwellhub-driver process
    sim.run(coupling.step_function(), until=90)  # Meep time units (0.1 fs here)
reap([driver])
print("final Pe (embedded, socket):", coupling.history()["Pe"][-1].tolist())
