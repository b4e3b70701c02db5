"""Acceptance of exact continuity: a 2D Meep run with TLS molecules
behind socket drivers, one driver SIGKILLed at a random step and replaced by a new
process that restores its checkpoint; the hub replays the steps the checkpoint misses.

For each checkpoint interval K it runs the same problem twice in this process, once
uninterrupted and once with the kill, and prints the differences of every molecule's
populations (whole history and final), and whether every *other* molecule stepped
exactly once per Meep step (its ``time_au`` equals the uninterrupted run's, bitwise, at
every step).

    .venv/bin/python benchmarks/continuity_acceptance.py [--steps 2000] [--drivers 8]
        [--every 1 10] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import struct
import sys
import tempfile
import time

os.environ.setdefault("OMPI_MCA_ess_singleton_isolated", "1")
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402

TLS = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 0.2}


def peer_pid(hub, molecule_id: int) -> int:
    """The pid of the process serving ``molecule_id`` (SO_PEERCRED of its UNIX socket)."""
    driver = hub.hub._molecules[molecule_id].driver
    sock = driver.link.transport.get_extra_info("socket")
    pid, _, _ = struct.unpack(
        "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    )
    return pid


def run_once(
    steps: int, drivers: int, every: int, kill_at: int | None, victim: int, workdir: str
) -> dict:
    import meep as mp

    from maxwellhub import SocketHub
    from maxwellhub.em import MeepCoupling
    from maxwellhub.run.launch import reap, start_driver

    mp.verbosity(0)
    sim = mp.Simulation(cell_size=mp.Vector3(8, 8), resolution=10, boundary_layers=[mp.PML(2.0)])
    name = os.path.join(workdir, f"hub_{every}_{kill_at}.sock")
    ckpt = os.path.join(workdir, f"ckpt_{every}_{kill_at}")
    args = ["--checkpoint-dir", ckpt, "--checkpoint-every", str(every)]
    angles = 2 * np.pi * np.arange(drivers) / drivers
    centers = [(0.6 * np.cos(a), 0.6 * np.sin(a)) for a in angles]
    procs, replaced, t_kill = [], [], None
    with SocketHub(unixsocket=name, timeout=60, history=every + 1) as hub:
        coupling = MeepCoupling(sim, time_units_fs=0.1, hub=hub, record_every=1)
        ids = coupling.add_socket_molecules(centers=centers, sigma=0.1, axis="z")
        procs = [start_driver("tls", TLS, unix=name, timeout=60, extra_args=args) for _ in ids]
        count = [0]

        def killer(sim_):
            nonlocal t_kill
            count[0] += 1
            if count[0] == kill_at:
                pid = peer_pid(hub, int(ids[victim]))
                proc = next(p for p in procs if p.pid == pid)
                proc.kill()
                proc.wait(timeout=30)
                t_kill = time.perf_counter()
                replaced.append(start_driver("tls", TLS, unix=name, timeout=60, extra_args=args))

        t0 = time.perf_counter()
        sim.run(killer, coupling.step_function(), until=steps * sim.Courant / sim.resolution)
        wall = time.perf_counter() - t0
        hub.graceful_shutdown(wait=10)
    codes = reap(procs + replaced, timeout=10)
    history = coupling.history()
    return {
        "history": history,
        "wall": wall,
        "codes": codes,
        "kill_at": kill_at,
        "steps": len(history["step"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--drivers", type=int, default=8)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    print(
        f"# Exact continuity: {args.drivers} TLS socket drivers, 2D Meep, {args.steps} "
        f"steps, seed {seed}\n"
    )
    rows = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="mxh_cont_") as work:
        for every in args.every:
            kill_at = rng.randrange(args.steps // 10, args.steps - args.steps // 10)
            victim = rng.randrange(args.drivers)
            ref = run_once(args.steps, args.drivers, every, None, victim, work)
            got = run_once(args.steps, args.drivers, every, kill_at, victim, work)
            h0, h1 = ref["history"], got["history"]
            others = [m for m in range(args.drivers) if m != victim]
            same_steps = h0["step"].shape == h1["step"].shape
            d_all = float(np.abs(h0["Pe"] - h1["Pe"]).max()) if same_steps else float("nan")
            d_final = float(np.abs(h0["Pe"][-1] - h1["Pe"][-1]).max())
            d_pg = float(np.abs(h0["Pg"][-1] - h1["Pg"][-1]).max())
            once = same_steps and bool(
                np.array_equal(h0["time_au"][:, others], h1["time_au"][:, others])
            )
            victim_time = same_steps and bool(
                np.array_equal(h0["time_au"][:, victim], h1["time_au"][:, victim])
            )
            exit_ok = sorted(got["codes"]) == [-9] + [0] * args.drivers
            rows.append(
                (
                    every,
                    kill_at,
                    victim,
                    got["steps"],
                    d_final,
                    d_pg,
                    d_all,
                    once,
                    victim_time,
                    ref["wall"],
                    got["wall"],
                    exit_ok,
                    float(h0["Pe"][-1].min()),
                    float(h0["Pe"][-1].max()),
                )
            )
            ok &= d_all == 0.0 and once and victim_time and exit_ok
    print(
        "| K | killed at step | molecule | steps | max abs diff final Pe | final Pg | "
        "Pe, whole history | others stepped once per step | victim's time_au equal | "
        "wall uninterrupted s | wall with kill s | only the killed driver exited "
        "non-zero | final Pe range |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3e} | {r[5]:.3e} | {r[6]:.3e} "
            f"| {'yes' if r[7] else 'NO'} | {'yes' if r[8] else 'NO'} | {r[9]:.2f} | "
            f"{r[10]:.2f} | {'yes' if r[11] else 'NO'} | {r[12]:.5f}..{r[13]:.5f} |"
        )
    print(f"\n{'PASS' if ok else 'FAIL'}: populations equal (tolerance 0: bitwise)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
