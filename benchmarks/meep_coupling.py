"""Milliseconds per Meep step with molecules coupled through maxwellhub.em.

    OPENBLAS_NUM_THREADS=1 python benchmarks/meep_coupling.py [--steps 400] [--counts 1,100]

A 2D cell 16 x 16 at resolution 10 (periodic, no PML), Courant 0.5. Row 0 is the bare
step: one plain ContinuousSource instead of molecules (Meep allocates no fields when
nothing excites them). Other rows: N embedded TLS molecules (one batched model) on a
square lattice of distinct positions, Gaussian kernels of sigma = 0.1 (and the point
kernel), nothing recorded; then N socket molecules (--socket-counts), each a real
`maxwellhub-driver --model tls` process behind the hub on a UNIX socket; then N molecules
in two ensemble drivers (--ensemble-counts, `--molecules N/2`, batched frames). Median of
--repeat timed runs after a warm-up run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import numpy as np


def lattice(n: int, extent: float = 14.0) -> np.ndarray:
    """n distinct points on a square lattice centred in a square of side `extent`."""
    side = math.ceil(math.sqrt(n))
    spacing = min(1.0, extent / side)
    ij = np.stack(np.unravel_index(np.arange(n), (side, side)), axis=1)
    return (ij - (side - 1) / 2) * spacing + 0.013  # off the grid, as molecules are


def time_run(
    n: int, steps: int, sigma: float, repeat: int, socket: bool = False, ensembles: int = 0
) -> tuple[float, float]:
    import os

    import meep as mp

    from maxwellhub import SocketHub
    from maxwellhub.em import MeepCoupling
    from maxwellhub.run.launch import reap, start_driver

    mp.verbosity(0)
    samples, setup = [], 0.0
    for _ in range(repeat + 1):
        sources = (
            []
            if n
            else [
                mp.Source(mp.ContinuousSource(frequency=0.16), component=mp.Ez, center=mp.Vector3())
            ]
        )
        sim = mp.Simulation(cell_size=mp.Vector3(16, 16), resolution=10, sources=sources)
        coupling = hub = None
        step_funcs, drivers = [], []
        tls: dict[str, Any] = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 0.1}
        if n and socket:
            name = f"bench_meep_{os.getpid()}"
            hub = SocketHub(unixsocket=name, timeout=60)
            coupling = MeepCoupling(sim, time_units_fs=0.1, record_every=0, hub=hub)
            coupling.add_socket_molecules(centers=lattice(n), sigma=sigma, axis="z")
            if ensembles:
                per = ["--molecules", str(n // ensembles)]
                drivers = [
                    start_driver("tls", tls, unix=name, extra_args=per) for _ in range(ensembles)
                ]
            else:
                drivers = [start_driver("tls", tls, unix=name) for _ in range(n)]
            step_funcs = [coupling.step_function()]
        elif n:
            coupling = MeepCoupling(sim, time_units_fs=0.1, record_every=0)
            coupling.add_molecules("tls", centers=lattice(n), sigma=sigma, axis="z", **tls)
            step_funcs = [coupling.step_function()]
        t0 = time.perf_counter()
        sim.run(*step_funcs, until=0.05)  # init, set-up, first step
        setup = time.perf_counter() - t0
        dt = sim.fields.dt
        t0 = time.perf_counter()
        sim.run(*step_funcs, until=steps * dt)
        samples.append((time.perf_counter() - t0) / steps * 1e3)
        if hub is not None:
            hub.stop()
            reap(drivers)
    return statistics.median(samples[1:]), setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--counts", default="0,1,10,100,1000,10000")
    parser.add_argument("--sigmas", default="0.1,0")
    parser.add_argument("--socket-counts", default="1,10")
    parser.add_argument("--ensemble-counts", default="10000")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    sigmas = [float(s) for s in args.sigmas.split(",")]
    bare, _ = time_run(0, args.steps, 0.0, args.repeat)
    print("| molecules | transport | kernel | ms/step | x bare | set-up s |")
    print("|---:|---|---|---:|---:|---:|")
    print(f"| 0 (plain source) | - | - | {bare:.3f} | 1.00 | - |")
    for n in counts:
        if n == 0:
            continue
        for sigma in sigmas:
            ms, setup = time_run(n, args.steps, sigma, args.repeat)
            kernel = f"gauss {sigma:g}" if sigma > 0 else "point"
            print(
                f"| {n} | embedded | {kernel} | {ms:.3f} | {ms / bare:.2f} | {setup:.2f} |",
                flush=True,
            )
    for n in [int(c) for c in args.socket_counts.split(",") if c]:
        ms, setup = time_run(n, args.steps, 0.1, args.repeat, socket=True)
        print(
            f"| {n} | socket (UNIX) | gauss 0.1 | {ms:.3f} | {ms / bare:.2f} | {setup:.2f} |",
            flush=True,
        )
    for n in [int(c) for c in args.ensemble_counts.split(",") if c]:
        ms, setup = time_run(n, args.steps, 0.1, args.repeat, socket=True, ensembles=2)
        print(
            f"| {n} | 2 ensemble drivers | gauss 0.1 | {ms:.3f} | {ms / bare:.2f} | {setup:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
