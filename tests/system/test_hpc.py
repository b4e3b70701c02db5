"""examples/hpc really runs: mpirun with drivers found through the rendezvous file (as a
separate process group and as MPMD), and the SLURM scripts' bodies with the SLURM variables
set by hand; every run's populations equal the serial run's (real Meep, real drivers)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _util import REPO_ROOT

pytest.importorskip("meep")
pytestmark = [pytest.mark.meep, pytest.mark.slow]

HPC = REPO_ROOT / "examples" / "hpc"
BIN = Path(sys.executable).parent
UNTIL = "20"  # 401 steps: the molecules' populations change by ~30 %
NDRIVERS = 8
TLS = [
    "--model",
    "tls",
    "--param",
    "omega=0.242",
    "--param",
    "mu12=187",
    "--param",
    "orientation=2",
    "--param",
    "pe_initial=1e-4",
]
KEYS = ("Pe", "Pg", "Pge_real", "Pge_imag")
ROOT_FLAGS = "--allow-run-as-root --oversubscribe" if os.geteuid() == 0 else "--oversubscribe"


def _env(**extra: str) -> dict[str, str]:
    """The environment of a job: no inherited MPI world, this venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=sys.executable,
        MPIRUN_FLAGS=ROOT_FLAGS,
        OPENBLAS_NUM_THREADS="1",
        **extra,
    )
    return env


def _run_group(
    argv: list[str], env: dict, timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run argv in its own session; on timeout kill the whole group and fail."""
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{argv[0]} did not finish within {timeout:g} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _summary(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary in:\n{stdout[-2000:]}"
    return json.loads(lines[-1])


def _max_difference(a: Path, b: Path) -> float:
    x, y = np.load(a), np.load(b)
    assert x["Pe"].shape == y["Pe"].shape == (401, NDRIVERS)
    return max(float(np.abs(x[k] - y[k]).max()) for k in KEYS)


def _drivers(address_file: Path, env: dict, logs: Path) -> list[subprocess.Popen]:
    """NDRIVERS drivers in their own sessions (a 'separate job'), waiting for the file."""
    procs = []
    for i in range(NDRIVERS):
        with open(logs / f"driver_{i}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        str(BIN / "maxwellhub-driver"),
                        "--address-file",
                        str(address_file),
                        "--timeout",
                        "120",
                        *TLS,
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
    return procs


def _reap(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


@pytest.fixture(scope="module")
def serial(tmp_path_factory, deadline) -> Path:
    """The serial run (plain python, no mpirun) with 8 drivers through the address file."""
    run = tmp_path_factory.mktemp("serial")
    env = _env(OMPI_MCA_ess_singleton_isolated="1")
    drivers = _drivers(run / "hub.addr", env, run)
    try:
        done = _run_group(
            [
                sys.executable,
                str(HPC / "em_relax_2d.py"),
                "--address-file",
                str(run / "hub.addr"),
                "--until",
                UNTIL,
                "--wait",
                "60",
                "--out",
                str(run / "populations.npz"),
            ],
            env,
            deadline(120),
        )
    finally:
        codes = _reap(drivers, deadline(20))
    assert done.returncode == 0, done.stderr[-3000:]
    assert codes == [0] * NDRIVERS
    pe = np.load(run / "populations.npz")["Pe"]
    assert np.all(pe[-1] < 0.8 * pe[0]), "the molecules did not relax"
    return run / "populations.npz"


@pytest.mark.mpi
def test_mpirun_two_ranks_separate_drivers_equal_serial(serial, tmp_path, deadline):
    """Acceptance: mpirun_job.sh, Meep on 2 ranks, 8 drivers as a separate process group
    through the rendezvous file: the serial populations, and the file is gone after."""
    env = _env(NP="2", NDRIVERS=str(NDRIVERS), UNTIL=UNTIL, RUN_DIR=str(tmp_path))
    done = _run_group(["bash", str(HPC / "mpirun_job.sh"), "separate"], env, deadline(180))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _summary(done.stdout)
    assert (summary["em_ranks"], summary["meep_ranks"]) == (2, 2)
    worst = _max_difference(serial, tmp_path / "populations.npz")
    print(f"\nmpirun -np 2 + 8 separate drivers vs serial: max difference {worst:.1e}")
    assert worst < 1e-10
    assert not (tmp_path / "hub.addr").exists()


@pytest.mark.mpi
def test_mpmd_keeps_drivers_out_of_the_em_world(serial, tmp_path, deadline):
    """mpirun -np 2 EM : -np 8 drivers (through python -m maxwellhub.mpmd): MPI's world
    has 10 ranks, Meep and the hub use 2, and the populations equal the serial run's."""
    env = _env(NP="2", NDRIVERS=str(NDRIVERS), UNTIL=UNTIL, RUN_DIR=str(tmp_path))
    done = _run_group(["bash", str(HPC / "mpirun_job.sh"), "mpmd"], env, deadline(180))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _summary(done.stdout)
    assert summary["world_ranks"] == 2 + NDRIVERS
    assert (summary["em_ranks"], summary["meep_ranks"]) == (2, 2)
    worst = _max_difference(serial, tmp_path / "populations.npz")
    print(f"\nMPMD 2 + 8 vs serial: max difference {worst:.1e}")
    assert worst < 1e-10


PROBE_EM = """
from maxwellhub.parallel.mpmd import split_world
from mpi4py import MPI
comm = split_world()
print(f"EM {MPI.COMM_WORLD.Get_size()} {comm.Get_size()}", flush=True)
"""
# Each probe writes its line with one write: two drivers share mpirun's stdout, and a
# line printed piecewise (print with several arguments, unbuffered) can interleave.
PROBE_DRIVER = """
import json, os, sys
found = json.dumps(sorted(k for k in os.environ if k.startswith(("OMPI_", "PMIX_", "PMI_"))))
os.write(1, f"DRIVER {found} {'mpi4py' in sys.modules}\\n".encode())
"""


@pytest.mark.mpi
def test_mpmd_driver_side_has_no_mpi_environment(tmp_path, deadline):
    """Under python -m maxwellhub.mpmd the driver process sees no MPI variable and no
    mpi4py; the EM side's communicator has K ranks of the K + M world."""
    (tmp_path / "em.py").write_text(PROBE_EM)
    (tmp_path / "drv.py").write_text(PROBE_DRIVER)
    done = _run_group(
        [
            "mpirun",
            *ROOT_FLAGS.split(),
            "-np",
            "1",
            sys.executable,
            str(tmp_path / "em.py"),
            ":",
            "-np",
            "2",
            sys.executable,
            "-m",
            "maxwellhub.mpmd",
            sys.executable,
            str(tmp_path / "drv.py"),
        ],
        _env(),
        deadline(60),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = sorted(done.stdout.split("\n"))
    assert "EM 3 1" in lines, done.stdout
    assert lines.count("DRIVER [] False") == 2, done.stdout


@pytest.mark.mpi
def test_plain_mpmd_with_a_non_mpi_driver_is_refused_by_open_mpi(tmp_path, deadline):
    """What happens without the wrapper (documented in src/maxwellhub/parallel/mpmd.py): the EM side
    stays inside MPI_Init while the driver lives, and when the driver exits mpirun says it
    'did not call "init"' and aborts the job -- or, as that very message warns, leaves the
    EM side hanging in MPI_Init (Open MPI does either, by timing). Never does the EM side
    initialise."""
    em = [
        "-np",
        "1",
        sys.executable,
        "-c",
        "from mpi4py import MPI; print('EM initialised', flush=True)",
    ]
    driver = ["-np", "1", str(BIN / "maxwellhub-driver")]
    # what the driver itself prints before it exits, and what mpirun says if it aborts
    for args, driver_says, aborted_says in (
        (
            ["--address-file", str(tmp_path / "never.addr"), "--timeout", "3"],
            "never.addr",
            "non-zero status",
        ),
        (["--help"], "usage: maxwellhub-driver", 'did not call "init"'),
    ):
        ended, out, err = _run_group_or_kill(
            ["mpirun", *ROOT_FLAGS.split(), *em, ":", *driver, *args], _env(), deadline(20)
        )
        assert "EM initialised" not in out, f"{args}: the EM side initialised"
        assert driver_says in out + err, f"{args}: {err[-3000:]}"
        if ended is not None:  # aborted rather than hung
            assert ended != 0, f"{args}: mpirun exited 0"
            assert aborted_says in out + err, f"{args}: {err[-3000:]}"


def _run_group_or_kill(argv: list[str], env: dict, timeout: float) -> tuple[int | None, str, str]:
    """Run argv in its own session; at ``timeout`` kill the whole group. Returns the exit
    status (None when it was killed: it hung), stdout and stderr."""
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def test_driver_never_imports_mpi4py_even_inside_an_mpi_job(tmp_path, deadline):
    """A driver started with an MPI launcher's variables in its environment runs to its
    deadline without importing mpi4py (so it cannot join any MPI world)."""
    code = (
        "import sys\nfrom maxwellhub_drivers.cli import main\n"
        f"status = main(['--address-file', {str(tmp_path / 'none.addr')!r}, "
        "'--timeout', '0.3'])\n"
        "print(status, 'mpi4py' in sys.modules)\n"
    )
    env = _env(OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="3", PMIX_RANK="3")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=deadline(30)
    )
    assert done.stdout.split() == ["1", "False"], done.stdout + done.stderr
    assert "none.addr" in done.stderr


def test_slurm_scripts_parse():
    """bash -n accepts every script of examples/hpc."""
    scripts = sorted(HPC.glob("*.sh")) + sorted(HPC.glob("*.sbatch"))
    assert len(scripts) == 3
    for script in scripts:
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script.name}: {done.stderr}"


SBATCH_SHIM = """#!/bin/sh
# records what the main job submits, as sbatch would accept it
printf '%s\\n' "$@" > "$SBATCH_RECORD.tmp" && mv "$SBATCH_RECORD.tmp" "$SBATCH_RECORD"
echo "Submitted batch job 1002"
"""


@pytest.mark.mpi
def test_slurm_scripts_run_with_slurm_variables_by_hand(serial, tmp_path, deadline):
    """slurm_main.sbatch (2 tasks, no srun here: its mpirun fallback, sbatch a recording
    shim) and slurm_drivers.sbatch as array tasks 0-7 with SLURM variables set by hand:
    authenticated TCP, the serial populations."""
    if shutil.which("srun"):
        pytest.skip("srun exists here: these scripts would submit real job steps")
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "sbatch").write_text(SBATCH_SHIM)
    (shims / "sbatch").chmod(0o755)
    record = tmp_path / "sbatch.args"
    env = _env(
        SLURM_JOB_ID="1001",
        SLURM_SUBMIT_DIR=str(tmp_path),
        SLURM_NTASKS="2",
        SLURM_CPUS_PER_TASK="1",
        SLURM_JOB_NAME="mxh-em",
        HPC_DIR=str(HPC),
        NDRIVERS=str(NDRIVERS),
        UNTIL=UNTIL,
        HUB_HOST="127.0.0.1",
        SBATCH_RECORD=str(record),
    )
    env["PATH"] = f"{shims}{os.pathsep}{env['PATH']}"
    main = subprocess.Popen(
        ["bash", str(HPC / "slurm_main.sbatch")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        # The array job: submitted by the main job, started here by hand once recorded.
        addr = tmp_path / "run_1001" / "hub.addr"
        drivers = []
        try:
            _wait_for(record, deadline(60), main)
            args = record.read_text().split("\n")
            assert "--array=0-7" in args
            assert f"--export=ALL,ADDRESS_FILE={addr}" in args
            assert args[-2].endswith("slurm_drivers.sbatch")
            for task in range(NDRIVERS):
                task_env = dict(
                    env,
                    SLURM_ARRAY_JOB_ID="1002",
                    SLURM_ARRAY_TASK_ID=str(task),
                    SLURM_JOB_ID=str(1003 + task),
                    ADDRESS_FILE=str(addr),
                    DRIVER_TIMEOUT="120",
                )
                with open(tmp_path / f"driver_{task}.out", "wb") as log:
                    drivers.append(
                        subprocess.Popen(
                            ["bash", str(HPC / "slurm_drivers.sbatch")],
                            env=task_env,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
            _, err = main.communicate(timeout=deadline(180))
        finally:
            codes = _reap(drivers, deadline(20))
    finally:
        if main.poll() is None:
            os.killpg(main.pid, signal.SIGKILL)
            main.wait()
    assert main.returncode == 0, err[-3000:]
    assert codes == [0] * NDRIVERS, [
        (tmp_path / f"driver_{i}.out").read_text() for i in range(NDRIVERS)
    ]
    assert "driver 3 of array job 1002" in (tmp_path / "driver_3.out").read_text()
    secret = tmp_path / "run_1001" / "hub.secret"
    assert secret.stat().st_mode & 0o077 == 0
    worst = _max_difference(serial, tmp_path / "run_1001" / "populations.npz")
    print(f"\nSLURM scripts (2 tasks + array of 8, by hand) vs serial: max difference {worst:.1e}")
    assert worst < 1e-10


def _wait_for(path: Path, timeout: float, proc: subprocess.Popen) -> None:
    """Wait for the shim's record (a file written once by another process); bounded
    backoff as in maxwellhub.rendezvous, failing early if the main job died."""
    end, delay = time.monotonic() + timeout, 0.05
    assert proc.stderr is not None
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"the main job exited ({proc.returncode}) before submitting the "
                f"drivers:\n{proc.stderr.read()[-3000:]}"
            )
        if time.monotonic() > end:
            pytest.fail(f"the main job did not call sbatch within {timeout:g} s")
        time.sleep(delay)
        delay = min(1.5 * delay, 1.0)
