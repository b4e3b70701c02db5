"""The 2D relaxation with Meep on several MPI ranks, the hub and its drivers on rank 0.

    mpirun -np 2 .venv/bin/python examples/mpi_relax_2d.py [--until 90]
    (as root: mpirun --allow-run-as-root --oversubscribe -np 2 ...)

Only rank 0 creates a listening socket and talks to drivers (SocketHub is inert on other
ranks); the sources reach every rank by an MPI broadcast of plain float arrays. The
drivers are started without the MPI environment, so they never join Meep's MPI world.
"""

import argparse

import meep as mp

from maxwellhub import SocketHub, am_master
from maxwellhub.em import MeepCoupling
from maxwellhub.run.launch import reap, start_driver

parser = argparse.ArgumentParser()
parser.add_argument("--until", type=float, default=90.0)
args = parser.parse_args()

tls = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 1e-4}
sim = mp.Simulation(cell_size=mp.Vector3(8, 8), resolution=10, boundary_layers=[mp.PML(3.0)])
hub = SocketHub(unixsocket="mpi_relax_2d", timeout=60)  # listens on rank 0 only
coupling = MeepCoupling(sim, time_units_fs=0.1, hub=hub)
coupling.add_socket_molecules(centers=[(0, 0)], sigma=0.1, axis="z")
drivers = [start_driver("tls", tls, unix="mpi_relax_2d")] if am_master() else []
sim.run(coupling.step_function(), until=args.until)
hub.stop()
reap(drivers)
if am_master():
    print("final Pe:", coupling.history()["Pe"][-1].tolist())
