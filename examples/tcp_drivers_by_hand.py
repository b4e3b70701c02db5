"""A hub on TCP whose drivers you start yourself, on this machine or another one.

    .venv/bin/python examples/tcp_drivers_by_hand.py --port 31415 --molecules 2
    # then, in other shells (or on other nodes: use --host 0.0.0.0 here and the
    # node's address there; see the README on authentication before doing so):
    maxwellhub-driver --host 127.0.0.1 --port 31415 --model tls \
        --param omega=0.242 --param mu12=187 --param pe_initial=1e-4

It waits up to --wait seconds for the drivers, then runs the 2D relaxation with them.
"""

import argparse

import meep as mp

from maxwellhub import SocketHub
from maxwellhub.em import MeepCoupling

parser = argparse.ArgumentParser()
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=31415)
parser.add_argument("--molecules", type=int, default=2)
parser.add_argument("--until", type=float, default=90.0)
parser.add_argument("--wait", type=float, default=300.0)
args = parser.parse_args()

sim = mp.Simulation(cell_size=mp.Vector3(8, 8), resolution=10, boundary_layers=[mp.PML(3.0)])
with SocketHub(host=args.host, port=args.port, timeout=args.wait) as hub:
    print(f"hub listening on {args.host}:{hub.port}; start {args.molecules} drivers:", flush=True)
    print(
        f"  maxwellhub-driver --host {args.host} --port {hub.port} --model tls "
        "--param omega=0.242 --param mu12=187 --param pe_initial=1e-4",
        flush=True,
    )
    coupling = MeepCoupling(sim, time_units_fs=0.1, hub=hub, timeout=args.wait)
    # Two molecules at one point, each carrying half the dipole strength.
    coupling.add_socket_molecules(centers=[(0, 0)] * args.molecules, sigma=0.1, axis="z")
    sim.run(coupling.step_function(), until=args.until)
print("final Pe:", coupling.history()["Pe"][-1].tolist())
