"""A single-mode cavity with 10^3 ... 10^6 two-level systems: molecule-steps per second,
embedded and through the hub with ensemble drivers, next to MaxwellLink's
SingleModeSimulation in the same run.

    .venv/bin/python benchmarks/cavity_scale.py [--counts 1000,100000,1000000]
        [--drivers 1] [--seconds 3] [--mxl-counts 10,100,1000]

Every run: `EngineCoupling` with `SingleModeCavity` (dipole gauge with the dipole
self-energy, so every molecule's dipole goes to the engine every step) and TLS molecules,
per-molecule extras recorded every 100 steps (`record_every = 100`), the engine's records
and the ensemble aggregates every step.

- embedded: one batched `tls` model in this process;
- hub: a UNIX-socket `SocketHub` in this process and K `maxwellhub-driver --molecules M/K`
  ensemble drivers (all pinned to core 1 when the machine allows, so K > 1 share it;
  the hub to core 0), each
  step asking for the dipole keys only (the MXHFIELDS dipoles flag);
- engine alone: `field()` + `finish(sources, dipoles)` with M molecules' arrays;
- MaxwellLink 0.5.0 (its peer venv, `.peers/maxwelllink`): `SingleModeSimulation` with M
  non-socket TLS molecules (its Python loop over molecules).

Targets: embedded >= 3e7 molecule-steps/s at 10^6; through the hub >= 1e7.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

import numpy as np
from _common import machine, peer_python, pin_to

from maxwellhub import SocketHub
from maxwellhub.em import EngineCoupling, SingleModeCavity
from maxwellhub.run.launch import driver_command, driver_env, reap

TLS: dict[str, Any] = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 1e-4}
CAVITY = {
    "frequency_au": 0.242,
    "damping_au": 0.0,
    "coupling_strength": 1e-7,
    "coupling_axis": "z",
    "include_dse": True,
}


def _timed(coupling: EngineCoupling, seconds: float) -> tuple[int, float]:
    coupling.run(steps=3)  # set-up, binding, first pages touched
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps < 5:
        coupling.run(steps=5)
        steps += 5
    return steps, time.perf_counter() - t0


def embedded(m: int, seconds: float) -> float:
    coupling = EngineCoupling(SingleModeCavity(**CAVITY), dt_au=0.5, record_every=100)
    coupling.add_molecules("tls", n=m, **TLS)
    steps, wall = _timed(coupling, seconds)
    return m * steps / wall


def engine_alone(m: int, seconds: float) -> float:
    """Seconds per step of the engine's own work for m molecules."""
    engine = SingleModeCavity(**CAVITY)
    engine.setup(np.full((m, 3), np.nan), 0.5)
    sources, dipoles = np.zeros((m, 3)), np.zeros((m, 3))
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 3 or steps < 5:
        engine.field()
        engine.finish(sources, dipoles)
        steps += 1
    return (time.perf_counter() - t0) / steps


def through_hub(m: int, k: int, seconds: float) -> float:
    name = f"bench_cav_{os.getpid()}_{m}"
    hub = SocketHub(unixsocket=name)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as params:
        json.dump(TLS, params)
    procs = []
    try:
        coupling = EngineCoupling(SingleModeCavity(**CAVITY), dt_au=0.5, hub=hub, record_every=100)
        coupling.add_socket_molecules(n=m)
        for _ in range(k):
            argv = driver_command(
                "tls",
                None,
                unix=name,
                timeout=120,
                extra_args=["--molecules", str(m // k), "--params-file", params.name],
            )
            procs.append(subprocess.Popen(argv, env=driver_env(), preexec_fn=pin_to(1)))
        steps, wall = _timed(coupling, seconds)
        return m * steps / wall
    finally:
        hub.stop()
        reap(procs, 10.0)
        os.unlink(params.name)


MXL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import maxwelllink as mxl
    from maxwelllink.em_solvers.single_mode_cavity import SingleModeSimulation
    m, steps = int(sys.argv[1]), int(sys.argv[2])
    mols = [mxl.Molecule(driver="tls", driver_kwargs=dict(omega=0.242, mu12=187.0,
            orientation=2, pe_initial=1e-4)) for _ in range(m)]
    sim = SingleModeSimulation(dt_au=0.5, frequency_au=0.242, damping_au=0.0,
        molecules=mols, coupling_strength=1e-7, coupling_axis="z", include_dse=True,
        record_history=True)
    sim.run(steps=3)
    t0 = time.perf_counter()
    sim.run(steps=steps)
    print(m * steps / (time.perf_counter() - t0))
    """
)


def maxwelllink(m: int, seconds: float) -> float | None:
    python = peer_python()
    if python is None:
        return None
    steps = max(5, int(seconds * 1.5e4 / m))  # it does about 1.5e4 molecule-steps/s
    proc = subprocess.run(
        [str(python), "-c", MXL_SCRIPT, str(m), str(steps)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    )
    if proc.returncode != 0:
        print(f"# MaxwellLink failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1000,100000,1000000")
    ap.add_argument("--drivers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--mxl-counts", default="10,100,1000")
    args = ap.parse_args()
    pin_to(0)()
    print(f"# {machine()}")
    print("# single-mode cavity (dipole gauge + DSE), TLS molecules, record_every = 100")
    print(
        f"{'molecules':>10} {'embedded /s':>14} {'hub /s':>14} "
        f"{'engine ms/step':>15} {'MaxwellLink /s':>15}"
    )
    mxl_counts = {int(c) for c in args.mxl_counts.split(",") if c}
    counts = sorted({int(c) for c in args.counts.split(",")} | mxl_counts)
    for m in counts:
        emb = embedded(m, args.seconds)
        hub = through_hub(m, args.drivers, args.seconds) if m >= args.drivers else float("nan")
        eng = engine_alone(m, args.seconds)
        mxl = maxwelllink(m, args.seconds) if m in mxl_counts else None
        print(
            f"{m:>10} {emb:>14.3e} {hub:>14.3e} {1e3 * eng:>15.4f} "
            f"{(f'{mxl:.3e}' if mxl else '-'):>15}"
            + (f"   ({emb / mxl:.0f}x embedded)" if mxl else ""),
            flush=True,
        )
    print("# targets at 10^6: embedded >= 3e7, hub >= 1e7 molecule-steps/s")


if __name__ == "__main__":
    main()
