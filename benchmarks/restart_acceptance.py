"""Acceptance of whole-run restart: the EM process killed and resumed.

The 2,000-step 2D TLS run (8 x 8 cell, PML 3, resolution 10, tau = 0.1 fs, until 100) with
8 TLS molecules (a 4 x 2 grid, P0 = 0.01), each behind its own ``maxwellhub-driver`` over a
UNIX socket:

1. the uninterrupted run (no checkpoints);
2. the same run with ``[checkpoint] every = N, driver_every = K``; at a random moment its
   step is read from the control endpoint (``Status``) and ``maxwellhub run`` -- the EM
   process -- is killed with SIGKILL (its drivers see the hub vanish and exit);
3. ``maxwellhub run CONFIG --resume DIR``: new drivers restore their own checkpoints, the
   hub replays the fields they miss, Meep reloads its fields.

With ``--np K`` every run is ``mpirun -np K maxwellhub run ...`` (hub and drivers on rank
0) and the kill is SIGKILL to the whole job at once: mpirun and each of its ranks (Open
MPI puts every rank in a process group of its own, in mpirun's session).

Printed: the kill step, the checkpoint resumed from, wall times, and the max population
difference (and whether every HDF5 dataset is bitwise equal) against run 1.

    .venv/bin/python benchmarks/restart_acceptance.py [--every 100] [--driver-every 10]
                                                      [--seed S] [--keep] [--np K]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent

CONFIG = """
[simulation]
dimensions = 2
cell = [8.0, 8.0]
resolution = 10
pml = 3.0
time_units_fs = 0.1
until = 100                # 2,000 steps

[transport]
kind = "unix"
name = "{name}"

[[molecules]]
model = "tls"
positions = [[-0.6, -0.2], [-0.2, -0.2], [0.2, -0.2], [0.6, -0.2],
             [-0.6, 0.2], [-0.2, 0.2], [0.2, 0.2], [0.6, 0.2]]
sigma = 0.1
axis = "z"
[molecules.params]
omega = 0.242
mu12 = 187.0
pe_initial = 1e-2

[output]
directory = "{out}"
plot = false
"""


NP = 1  # MPI ranks (--np)


def _env() -> dict[str, str]:
    if NP > 1:  # a fresh MPI world, not one this script may run in
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
        return dict(env, OPENBLAS_NUM_THREADS="1")
    return dict(os.environ, OMPI_MCA_ess_singleton_isolated="1")


def _command(args: list[str]) -> list[str]:
    if NP > 1:
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        return [
            shutil.which("mpirun") or "mpirun",
            *root,
            "--oversubscribe",
            "-np",
            str(NP),
            str(BIN / "maxwellhub"),
            *args,
        ]
    return [str(BIN / "maxwellhub"), *args]


def _kill(run: subprocess.Popen) -> None:
    """SIGKILL the run: the process, or under mpirun the ranks and mpirun (its session)."""
    if NP == 1:
        run.send_signal(signal.SIGKILL)
        return
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[3]) == run.pid:
                pids.append(int(entry))
    for pid in sorted(pids, key=lambda p: p == run.pid):  # the ranks, then mpirun
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _run(args: list[str]) -> tuple[dict, float]:
    t0 = time.perf_counter()
    done = subprocess.run(
        _command(args),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
        start_new_session=True,
    )
    if done.returncode != 0:
        sys.exit(f"maxwellhub {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return _summary(done.stdout), time.perf_counter() - t0


def _kill_at_random_step(config: Path, target: int) -> dict:
    """Start the checkpointed run, SIGKILL it once it has passed step ``target`` (chosen
    at random after the first checkpoint: killed earlier there is nothing to resume);
    returns its step from the control endpoint just before the kill. The endpoint is
    asked every 10 ms: nothing outside the run can await its step."""
    from maxwellhub.services import control

    run = subprocess.Popen(
        _command(["run", str(config)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    try:
        end = time.monotonic() + 120
        address = None
        stderr = run.stderr
        assert stderr is not None  # stderr=PIPE above
        while address is None:  # the run names its control endpoint when its hub is up
            ready, _, _ = select.select([stderr], [], [], max(0.0, end - time.monotonic()))
            line = stderr.readline() if ready else ""
            if not line:
                sys.exit("the checkpointed run did not start its hub in time")
            if "control endpoint:" in line:
                address = line.split("control endpoint:")[1].split()[0]
        while True:
            status = control.request(address, {"Status": None}, timeout=30)["Status"]
            if status["step"] >= target or time.monotonic() > end:
                break
            time.sleep(0.01)
        _kill(run)
        run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            _kill(run)
            run.communicate()
    for suffix in ("", ".token"):  # what a SIGKILLed run leaves in /tmp
        Path(str(address) + suffix).unlink(missing_ok=True)
    return {"returncode": run.returncode, "step_before_kill": status["step"]}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--every", type=int, default=100, help="run checkpoint every N steps")
    parser.add_argument(
        "--driver-every",
        type=int,
        default=10,
        help="driver checkpoints every K steps (N %% K == 0)",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--np",
        type=int,
        default=1,
        help="MPI ranks: every run under mpirun -np K (default 1: no mpirun)",
    )
    args = parser.parse_args()
    global NP
    NP = args.np
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="mxh_restart_"))
    name = f"mxh_acc_{os.getpid()}"
    try:
        import h5py

        ref_cfg = work / "reference.toml"
        ref_cfg.write_text(CONFIG.format(name=name, out=work / "reference"))
        ref, ref_wall = _run(["run", str(ref_cfg)])
        cfg = work / "restart.toml"
        cfg.write_text(
            CONFIG.format(name=name, out=work / "restart")
            + f'\n[checkpoint]\ndir = "{work / "ck"}"\nevery = {args.every}\n'
            f"driver_every = {args.driver_every}\n"
        )
        killed = _kill_at_random_step(cfg, rng.randrange(args.every + 1, ref["steps"] - 1))
        resumed, resume_wall = _run(["run", str(cfg), "--resume", str(work / "ck")])
        with (
            h5py.File(work / "reference" / "molecules.h5") as a,
            h5py.File(work / "restart" / "molecules.h5") as b,
        ):
            bitwise = sorted(a) == sorted(b) and all(
                np.array_equal(a[k][()], b[k][()], equal_nan=True) for k in a
            )
            dpe = float(np.max(np.abs(a["Pe"][()] - b["Pe"][()])))
            pe_final = b["Pe"][-1].tolist()
        report = {
            "seed": seed,
            "mpi_ranks": resumed.get("mpi_ranks"),
            "steps": resumed["steps"],
            "molecules": resumed["molecules"],
            "checkpoint_every": args.every,
            "driver_every": args.driver_every,
            "killed_returncode": killed["returncode"],
            "killed_at_step_about": killed["step_before_kill"],
            "resumed_at_step": resumed["resumed_at_step"],
            "max_abs_Pe_difference": dpe,
            "all_datasets_bitwise_equal": bitwise,
            "final_Pe_mean": float(np.mean(pe_final)),
            "uninterrupted_wall_s": round(ref_wall, 2),
            "resumed_run_wall_s": round(resume_wall, 2),
            "checkpoint_write_ms": resumed.get("checkpoint_write_ms"),
            "driver_exit_codes": resumed.get("driver_exit_codes"),
        }
        print(json.dumps(report))
        return 0 if bitwise else 1
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
