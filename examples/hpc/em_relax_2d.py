"""The 2D relaxation of N two-level molecules whose drivers run elsewhere: another job,
a SLURM array job, or the same mpirun (MPMD). They find the hub through a rendezvous file.

    # serially, or under mpirun -np K; drivers started separately:
    python examples/hpc/em_relax_2d.py --address-file run/hub.addr --molecules 8
    maxwellhub-driver --address-file run/hub.addr --model tls \\
        --param omega=0.242 --param mu12=187 --param orientation=2 --param pe_initial=1e-4

    # MPMD: the drivers in the same mpirun (see src/maxwellhub/parallel/mpmd.py for why the wrapper)
    mpirun -np 2 python examples/hpc/em_relax_2d.py --address-file run/hub.addr : \\
        -np 8 python -m maxwellhub.mpmd maxwellhub-driver --address-file run/hub.addr ...

The hub listens on MPI rank 0 only (--host, default 127.0.0.1; 0.0.0.0 on a cluster, and
then the file names this node's host name) with a secret if --secret-file is given (the
address file names the secret file's path, never the secret). Rank 0 writes the
populations to --out (.npz) and prints one JSON line.
"""

import argparse
import json
import os
import time

import meep as mp
import numpy as np

from maxwellhub import SocketHub, am_master
from maxwellhub.em import MeepCoupling
from maxwellhub.parallel.mpmd import split_world
from maxwellhub.protocol.auth import load_secret

# Before the simulation exists: in an MPMD job keep Meep and the hub to this program's
# ranks (outside MPMD a no-op costing one Allgather).
em_comm = split_world()

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--address-file", required=True, help="where the hub publishes itself")
parser.add_argument("--host", default="127.0.0.1", help="address to listen on (TCP)")
parser.add_argument("--port", type=int, default=0, help="TCP port (0: any free one)")
parser.add_argument("--unix", help="listen on this UNIX socket instead of TCP")
parser.add_argument("--secret-file", help="require drivers to prove this secret")
parser.add_argument("--molecules", type=int, default=8)
parser.add_argument("--until", type=float, default=90.0, help="Meep time units")
parser.add_argument("--wait", type=float, default=300.0, help="seconds to wait for drivers")
parser.add_argument("--out", help="write the populations here (.npz, rank 0)")
args = parser.parse_args()

mp.verbosity(0)
sim = mp.Simulation(cell_size=mp.Vector3(8, 8), resolution=10, boundary_layers=[mp.PML(3.0)])
where = {"unixsocket": args.unix} if args.unix else {"host": args.host, "port": args.port}
hub = SocketHub(
    timeout=args.wait,
    address_file=args.address_file,
    auth=load_secret(args.secret_file, env=None) if args.secret_file else None,
    **where,
)
coupling = MeepCoupling(sim, time_units_fs=0.1, hub=hub, timeout=args.wait)
# N molecules on a line through the centre, 0.4 apart: they see each other's fields.
xs = 0.4 * (np.arange(args.molecules) - (args.molecules - 1) / 2)
coupling.add_socket_molecules(centers=[(x, 0) for x in xs], sigma=0.1, axis="z")
start = time.perf_counter()
sim.run(coupling.step_function(), until=args.until)
hub.stop()  # STOP to every driver; the address file is removed
if am_master():
    history = coupling.history()
    if args.out:
        np.savez(args.out, **history)
    print(
        json.dumps(
            {
                "molecules": args.molecules,
                "steps": int(history["Pe"].shape[0]),
                "em_ranks": em_comm.Get_size() if em_comm is not None else 1,
                "meep_ranks": mp.count_processors(),
                "world_ranks": int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")),
                "final_Pe": history["Pe"][-1].tolist(),
                "wall_time_s": round(time.perf_counter() - start, 3),
            }
        ),
        flush=True,
    )
