"""Whole-run checkpoints from a script: one embedded TLS relaxing in 2D, a checkpoint every
200 steps and on SIGTERM/SIGINT. Interrupt it (Ctrl-C, kill -TERM, or even kill -9) and
run it again: it continues from the newest checkpoint in --dir and ends with the same
populations, bit for bit, as a run never interrupted.

    .venv/bin/python examples/restart_api_2d.py [--until 90] [--dir restart_api_2d]
"""

import argparse
import sys
from typing import Any

import meep as mp

from maxwellhub.em import MeepCoupling
from maxwellhub.run.checkpoint import STOPPED_BY_SIGNAL, RunCheckpointer, RunInterrupted

parser = argparse.ArgumentParser()
parser.add_argument("--until", type=float, default=90.0)
parser.add_argument("--dir", default="restart_api_2d", help="checkpoint directory")
parser.add_argument("--every", type=int, default=200, help="steps between checkpoints")
args = parser.parse_args()

tls: dict[str, Any] = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 1e-4}  # a.u.
sim = mp.Simulation(cell_size=mp.Vector3(8, 8), resolution=10, boundary_layers=[mp.PML(3.0)])
coupling = MeepCoupling(sim, time_units_fs=0.1)
coupling.add_molecules("tls", centers=[(0, 0)], sigma=0.1, axis="z", **tls)
# identity: what a checkpoint must match to be continued here (anything JSON)
with RunCheckpointer(
    args.dir,
    sim,
    coupling,
    every=args.every,
    identity={"cell": [8, 8], "resolution": 10, "tls": tls},
) as ckpt:
    step = ckpt.resume()  # None: no checkpoint yet, a fresh start
    print("resumed at step", step) if step is not None else print("fresh start")
    try:
        with ckpt.signals():
            # an absolute end (not until=90, which Meep counts from the current time)
            sim.run(
                coupling.step_function(),
                ckpt.step_function(),
                until=lambda sim: sim.round_time() >= args.until,
            )
    except RunInterrupted as exc:
        print(exc)  # names the checkpoint; run again to continue
        sys.exit(STOPPED_BY_SIGNAL)
print("steps:", sim.fields.t, "final Pe:", coupling.history()["Pe"][-1].tolist())
