"""Milliseconds per Meep step: MaxwellLink 0.5.0's Meep adaptor side by side with ours.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/meep_maxwelllink.py \\
        [--counts 1,10,100,1000] [--steps 200] [--repeat 3] [--budget 60]

The set-up of meep_coupling.py (2D cell 16 x 16, resolution 10, periodic, Courant 0.5;
N embedded TLS molecules on its lattice, Gaussian sigma 0.1; median of --repeat timed
runs after a warm-up run), measured twice, each column against its own bare step (one
plain ContinuousSource) timed in the same process:

- maxwellhub: meep_coupling.time_run in this Python (our .venv);
- MaxwellLink: its documented embedded path, `Molecule(driver="tls", ...)` in a
  `MeepSimulation(molecules=...)`, run by this script re-run inside a benchmark-only venv
  `.peers/maxwelllink-meep` (made here if missing: Debian's Python, numpy, scipy and
  Meep, plus `pip install --no-deps maxwelllink==0.5.0`). A MaxwellLink row whose
  estimated time (linear in N from the row before) exceeds --budget seconds runs fewer
  steps (at least 20), or is skipped if even that would exceed it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time

from _common import PREFIX, REPO, child_env, emit
from meep_coupling import lattice, time_run

os.environ.setdefault("OMPI_MCA_ess_singleton_isolated", "1")  # no stray orted from Meep

PEER = REPO / ".peers" / "maxwelllink-meep"
PEER_SPEC = "maxwelllink==0.5.0"
TLS = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 0.1}


# ------------------------------------------------------------ MaxwellLink, in its venv


def time_maxwelllink(n: int, steps: int, sigma: float, repeat: int) -> float:
    """ms per step with n of MaxwellLink's embedded TLS molecules (n = 0: the bare step),
    measured as meep_coupling.time_run measures ours."""
    import contextlib
    import io

    import maxwelllink as mxl
    import meep as mp

    mp.verbosity(0)
    samples = []
    for _ in range(repeat + 1):
        sources = (
            []
            if n
            else [
                mp.Source(mp.ContinuousSource(frequency=0.16), component=mp.Ez, center=mp.Vector3())
            ]
        )
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per molecule
            molecules = [
                mxl.Molecule(
                    driver="tls",
                    driver_kwargs=TLS,
                    center=mp.Vector3(x, y),
                    size=mp.Vector3(1, 1, 1),
                    sigma=sigma,
                    dimensions=2,
                    store_additional_data=False,
                )
                for x, y in (lattice(n) if n else [])
            ]
            sim = mxl.MeepSimulation(
                molecules=molecules,
                time_units_fs=0.1,
                sources=sources,
                cell_size=mp.Vector3(16, 16),
                resolution=10,
            )
            sim.run(until=0.05)  # init, set-up, first step
            dt = sim.fields.dt
            t0 = time.perf_counter()
            sim.run(until=steps * dt)
            samples.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(samples[1:])


def serve(args: argparse.Namespace) -> None:
    """Inside the peer venv: report the bare step, then one row per count."""
    import maxwelllink

    emit(version=maxwelllink.__version__)
    emit(n=0, ms=time_maxwelllink(0, args.steps, 0.0, args.repeat), steps=args.steps)
    last_n, last_ms = 0, 0.0
    for n in args.counts:
        steps = args.steps
        if last_n:
            per_step = last_ms * n / last_n * 1e-3  # estimated seconds per step
            steps = min(steps, int(args.budget / ((args.repeat + 1) * per_step)))
            if steps < 20:
                emit(
                    n=n,
                    skipped=f"estimated {20 * (args.repeat + 1) * per_step:.0f} s "
                    f"for 20 steps > --budget {args.budget:g} s",
                )
                continue
        ms = time_maxwelllink(n, steps, 0.1, args.repeat)
        emit(n=n, ms=ms, steps=steps)
        last_n, last_ms = n, ms


# ------------------------------------------------------------ the table, in our venv


def ensure_peer() -> str | None:
    """Make the peer venv if missing; return None when ready, else why it is not."""
    python = PEER / "bin" / "python"
    if python.exists():
        return None
    print(
        f"creating {PEER.relative_to(REPO)}: /usr/bin/python3 -m venv --system-site-packages,"
        f" pip install --no-deps {PEER_SPEC}",
        flush=True,
    )
    for cmd in (
        ["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(PEER)],
        [str(python), "-m", "pip", "install", "-q", "--no-deps", PEER_SPEC],
    ):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            done = subprocess.CompletedProcess(cmd, 1, "", str(err))
        if done.returncode != 0:
            shutil.rmtree(PEER, ignore_errors=True)
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            return f"`{' '.join(cmd[:3])} ...` failed: {tail}"
    return None


def run_peer(args: argparse.Namespace) -> tuple[dict[int, dict], str]:
    """Run this script with --serve in the peer venv; return its rows by N and a note."""
    reason = ensure_peer()
    if reason:
        return {}, f"MaxwellLink not measured: {reason}"
    cmd = [
        str(PEER / "bin" / "python"),
        __file__,
        "--serve",
        "--counts",
        ",".join(map(str, args.counts)),
        "--steps",
        str(args.steps),
        "--repeat",
        str(args.repeat),
        "--budget",
        str(args.budget),
    ]
    timeout = 600 + args.budget * len(args.counts)
    try:
        done = subprocess.run(cmd, capture_output=True, env=child_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {}, f"MaxwellLink not measured: no result within {timeout:g} s"
    reports = [
        json.loads(line[len(PREFIX) :])
        for line in done.stdout.splitlines()
        if line.startswith(PREFIX)
    ]
    rows = {r["n"]: r for r in reports if "n" in r}
    version = next((r["version"] for r in reports if "version" in r), "?")
    if done.returncode != 0 or 0 not in rows:
        tail = (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        return rows, f"MaxwellLink run failed (exit status {done.returncode}): {tail}"
    return rows, f"MaxwellLink {version} in {PEER.relative_to(REPO)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,10,100,1000")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--budget", type=float, default=60.0, help="seconds a MaxwellLink row may take (default 60)"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.counts = [int(c) for c in args.counts.split(",") if int(c) > 0]
    if args.serve:
        serve(args)
        return

    bare, _ = time_run(0, args.steps, 0.0, args.repeat)
    ours = {n: time_run(n, args.steps, 0.1, args.repeat)[0] for n in args.counts}
    theirs, note = run_peer(args)
    mxl_bare = theirs.get(0, {}).get("ms")

    def mxl_cells(n: int) -> str:
        row = theirs.get(n, {})
        if "ms" not in row or mxl_bare is None:
            return "not measured | - | -"
        ms = row["ms"]
        return f"{ms:.3f} | {ms / mxl_bare:.2f} | {ms / (ours[n] if n else bare):.2f}"

    print(
        "| molecules | maxwellhub ms/step | x bare | MaxwellLink ms/step | x bare "
        "| ratio MaxwellLink/maxwellhub |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| 0 (plain source) | {bare:.3f} | 1.00 | {mxl_cells(0)} |")
    for n in args.counts:
        print(f"| {n} | {ours[n]:.3f} | {ours[n] / bare:.2f} | {mxl_cells(n)} |")
    print(
        f"\n{note}; {args.steps} steps per timed run, median of {args.repeat} after a warm-up run."
    )
    for n, row in theirs.items():
        if "skipped" in row:
            print(f"- MaxwellLink N = {n} skipped: {row['skipped']}.")
        elif row["steps"] != args.steps:
            print(f"- MaxwellLink N = {n}: {row['steps']} steps per timed run (--budget).")


if __name__ == "__main__":
    main()
