"""Whole-run restart: ``maxwellhub run`` killed with SIGKILL at a random
step and resumed with ``--resume`` gives bit for bit the uninterrupted run's output, with
embedded molecules and with socket drivers; SIGTERM writes a checkpoint and exits 75; a
resume with a config that differs where it matters is refused, naming the key.

Real Meep, real driver processes, small 2D cells (600 steps). The kill lands a random
delay after a random periodic checkpoint, so at an arbitrary step (the seed is in every
assertion message)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from _util import scaled

from maxwellhub.run.config import ConfigError, parse_config_text

BIN = Path(sys.executable).parent
STOPPED_BY_SIGNAL = 75

CONFIG = """
[simulation]
dimensions = 2
cell = [6.0, 6.0]
resolution = 10
pml = 2.0
time_units_fs = 0.1
until = 30

[transport]
kind = "{kind}"
{name}

[[molecules]]
model = "tls"
positions = [[0.0, 0.0], [0.5, 0.2]]
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

CHECKPOINT = """
[checkpoint]
dir = "{dir}"
every = 50
driver_every = 10
"""


# Two RT-TDHF molecules (H2, STO-3G, PySCF) kicked at t = 0: the state a driver checkpoints
# is a complex density matrix with the Fock history of its propagator.
RT_CONFIG = CONFIG.replace('model = "tls"', 'model = "rttddft"').replace(
    "omega = 0.242\nmu12 = 187.0\npe_initial = 1e-2",
    'atoms = "H 0 0 0; H 0 0 0.74"\nkick_au = 1e-2\nkick_direction = [0.0, 0.0, 1.0]\n'
    "dt_substep_au = 0.1",
)

# The tls run with a parameter change at step 120 and a kick at step 330: a kill before,
# between or after them must resume with exactly the parameters and state the
# uninterrupted run has.
SCHEDULED_CONFIG = (
    CONFIG
    + """
[[schedule]]
step = 120
molecules = [1]
changes = {{ omega_eV = 7.0, mu12 = 150.0 }}

[[schedule]]
step = 330
kick = [0.0, 0.0, 2e-3]
"""
)


def _write_config(
    path: Path,
    kind: str,
    out: Path,
    unix_name: str | None,
    checkpoint_dir: Path | None,
    template: str = CONFIG,
) -> Path:
    text = template.format(kind=kind, out=out, name=f'name = "{unix_name}"' if unix_name else "")
    if checkpoint_dir is not None:
        text += CHECKPOINT.format(dir=checkpoint_dir)
    path.write_text(text)
    return path


def _env(tag: str) -> dict[str, str]:
    """The runs' environment; ``tag`` marks them and their drivers (see _wait_tagged)."""
    return dict(os.environ, MXH_RESTART_TEST=tag)


def _run(args: list[str], tag: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "maxwellhub"), *args],
        capture_output=True,
        text=True,
        env=_env(tag),
        timeout=scaled(timeout),
    )


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _tagged(tag: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if f"MXH_RESTART_TEST={tag}".encode() in env.split(b"\0"):
                found.append(int(entry))
    return found


def _wait_tagged(tag: str, seconds: float) -> None:
    """Wait (pidfd, no polling) for the drivers a SIGKILLed run left behind: they see
    the hub vanish and exit. Fails if any is still alive at the deadline."""
    poller, fds = select.poll(), []
    try:
        for pid in _tagged(tag):
            try:
                fds.append(os.pidfd_open(pid))
            except OSError:
                continue
            poller.register(fds[-1], select.POLLIN)
        pending, end = len(fds), time.monotonic() + seconds
        while pending and (left := end - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                pending -= 1
    finally:
        for fd in fds:
            os.close(fd)
    alive = [
        p
        for p in _tagged(tag)
        if Path(f"/proc/{p}").exists()
        and Path(f"/proc/{p}/stat").read_text().split(")")[-1].split()[0] != "Z"
    ]
    assert not alive, f"processes of the killed run still alive: {alive}"


def _await_checkpoints(run: subprocess.Popen, after: int, lines: list[str]) -> None:
    """Read the run's log (into ``lines``) until it has logged ``after`` checkpoints."""
    assert run.stderr is not None
    end = time.monotonic() + scaled(60)
    seen = 0
    while seen < after:
        ready, _, _ = select.select([run.stderr], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            pytest.fail(f"no {after} checkpoints logged in time:\n" + "".join(lines))
        line = run.stderr.readline()
        if not line:
            pytest.fail(f"the run ended before {after} checkpoints:\n" + "".join(lines))
        lines.append(line)
        seen += "maxwellhub.checkpoint: checkpoint at step" in line


def _run_and_signal(
    config: Path, tag: str, rng: random.Random, sig: int, after: int
) -> tuple[subprocess.Popen, str, str]:
    """Start ``maxwellhub -v run config``; ``after`` periodic checkpoints were logged plus
    a random 0-50 ms, send ``sig``. Returns the process (ended), stdout and stderr."""
    run = subprocess.Popen(
        [str(BIN / "maxwellhub"), "-v", "run", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tag),
    )
    lines: list[str] = []
    try:
        _await_checkpoints(run, after, lines)
        time.sleep(rng.uniform(0.0, 0.05))  # a random step after that checkpoint
        run.send_signal(sig)
        out, err = run.communicate(timeout=scaled(60))
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    return run, out, "".join(lines) + err


def _datasets(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    import h5py

    out: dict[str, np.ndarray] = {}
    with h5py.File(path) as f:  # every dataset, in groups too (an engine's records)
        f.visititems(
            lambda name, obj: out.update({name: obj[()]}) if hasattr(obj, "shape") else None
        )
        return out, dict(f.attrs)


def _assert_bitwise(reference: Path, resumed: Path, why: str) -> None:
    ref, _ = _datasets(reference)
    got, attrs = _datasets(resumed)
    assert attrs["complete"], why
    assert sorted(ref) == sorted(got), why
    for key in ref:
        assert ref[key].shape == got[key].shape, f"{key}: {why}"
        # bitwise: the same floats, NaN where the uninterrupted run has NaN
        assert np.array_equal(ref[key], got[key], equal_nan=True), (
            f"{key} differs by {np.nanmax(np.abs(ref[key] - got[key]))}: {why}"
        )


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted runs (no [checkpoint] table), embedded and over UNIX sockets."""
    base = tmp_path_factory.mktemp("reference")
    out = {}
    for kind in ("embedded", "unix"):
        name = f"mxhrs_{os.getpid()}_{uuid.uuid4().hex[:6]}" if kind == "unix" else None
        config = _write_config(base / f"{kind}.toml", kind, base / kind, name, None)
        done = _run(["run", str(config)], uuid.uuid4().hex)
        assert done.returncode == 0, done.stderr[-3000:]
        assert _summary(done.stdout)["steps"] == 601
        out[kind] = base / kind / "molecules.h5"
    return out


def _kill_and_resume(
    tmp_path: Path,
    kind: str,
    unix_name: str | None,
    reference: Path,
    ranks: int = 1,
    template: str = CONFIG,
) -> dict:
    """SIGKILL the run (under ``mpirun -np ranks`` when ranks > 1: the whole job) after a
    random number of checkpoints, resume it with the same number of ranks, and check the
    output is bitwise the uninterrupted run's."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    ckdir = tmp_path / "ck"
    config = _write_config(
        tmp_path / "run.toml", kind, tmp_path / "out", unix_name, ckdir, template
    )
    tag = uuid.uuid4().hex
    after = rng.randint(1, 8)
    if ranks == 1:
        run, _, err = _run_and_signal(config, tag, rng, signal.SIGKILL, after)
        killed = [run.pid]
    else:
        run, _, err, killed = _mpi_run_and_signal(ranks, config, tag, rng, signal.SIGKILL, after)
    why = f"seed {seed}, killed after checkpoint {after}"
    assert run.returncode == -signal.SIGKILL, f"{why}: {err[-3000:]}"
    if ranks > 1:
        assert len(killed) == ranks + 1, (
            f"{why}: expected mpirun and {ranks} ranks, killed {killed}"
        )
    _wait_tagged(tag, scaled(20))
    for pid in killed:  # the control socket and token file a killed run leaves
        _cleanup_control(pid)
    if ranks > 1:
        newest = json.loads((max(ckdir.glob("step_*")) / "manifest.json").read_text())
        assert newest["mpi_ranks"] == ranks, why
        assert {"coupling.npz", "coupling.rank1.npz", "fields.h5"} <= set(newest["files"]), why
    (ckdir / ".partial_9999999999_1").mkdir()  # as if killed while writing one
    args = ["run", str(config), "--resume", str(ckdir)]
    done = _run(args, tag) if ranks == 1 else _mpi_run(ranks, args, tag)
    assert done.returncode == 0, f"{why}: {done.stderr[-3000:]}"
    summary = _summary(done.stdout)
    assert summary["complete"] and summary["steps"] == 601, why
    if ranks > 1:
        assert summary["mpi_ranks"] == ranks, why
    assert summary["resumed_at_step"] >= 50 * after, why
    assert not (ckdir / ".partial_9999999999_1").exists(), "a stale partial checkpoint stayed"
    _assert_bitwise(
        reference,
        tmp_path / "out" / "molecules.h5",
        f"{why}, resumed at step {summary['resumed_at_step']}",
    )
    return summary


def _cleanup_control(pid: int) -> None:
    """A SIGKILLed run leaves its control socket and token file in /tmp."""
    for suffix in ("", ".token"):
        Path(f"/tmp/maxwellhub_control_mxh_run_{pid}{suffix}").unlink(missing_ok=True)


@pytest.mark.meep
def test_embedded_run_killed_and_resumed_is_bitwise(tmp_path, references):
    """Embedded molecules: SIGKILL at a random step, --resume: every dataset of the HDF5
    output is bitwise the uninterrupted run's (populations, dipoles, times, steps)."""
    _kill_and_resume(tmp_path, "embedded", None, references["embedded"])


@pytest.mark.meep
def test_run_with_a_schedule_killed_and_resumed_is_bitwise(tmp_path):
    """Embedded molecules with a scheduled parameter change and a kick: SIGKILL at a random
    step (before, between or after them), --resume: bitwise the uninterrupted run, so the
    changed parameters and the kicked state came back from the checkpoint and nothing was
    applied twice."""
    base = tmp_path / "reference"
    config = _write_config(
        tmp_path / "reference.toml", "embedded", base, None, None, SCHEDULED_CONFIG
    )
    done = _run(["run", str(config)], uuid.uuid4().hex)
    assert done.returncode == 0, done.stderr[-3000:]
    (tmp_path / "killed").mkdir()
    _kill_and_resume(
        tmp_path / "killed", "embedded", None, base / "molecules.h5", template=SCHEDULED_CONFIG
    )


@pytest.mark.meep
def test_socket_run_killed_and_resumed_is_bitwise(tmp_path, unix_name, references):
    """Two socket drivers (checkpoints every 10 steps, hub replay): SIGKILL of the EM
    process at a random step, --resume restarts the drivers from their checkpoints and the
    output is bitwise the uninterrupted socket run's."""
    summary = _kill_and_resume(tmp_path, "unix", unix_name, references["unix"])
    assert summary["driver_exit_codes"] == [0, 0]


@pytest.mark.meep
def test_rttddft_socket_run_killed_and_resumed_is_bitwise(tmp_path, unix_name):
    """Two RT-TDHF drivers (checkpoints every 10 steps: density matrices and Fock history):
    SIGKILL of the run at a random step, --resume: every dataset bitwise the uninterrupted
    run's (dipoles, energies, times)."""
    pytest.importorskip("pyscf")
    name = f"mxhrs_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    base = tmp_path / "reference"
    config = _write_config(tmp_path / "reference.toml", "unix", base, name, None, RT_CONFIG)
    done = _run(["run", str(config)], uuid.uuid4().hex)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _summary(done.stdout)["steps"] == 601
    (tmp_path / "killed").mkdir()
    _kill_and_resume(
        tmp_path / "killed", "unix", unix_name, base / "molecules.h5", template=RT_CONFIG
    )


@pytest.mark.meep
def test_sigterm_writes_checkpoint_and_exits_75(tmp_path, unix_name, references):
    """SIGTERM: a checkpoint at the current step boundary, drivers stopped (exit 0), the
    steps so far in the HDF5 file (incomplete), exit status 75; resuming it completes the
    run bitwise equal to the uninterrupted one."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    ckdir = tmp_path / "ck"
    config = _write_config(tmp_path / "run.toml", "unix", tmp_path / "out", unix_name, ckdir)
    tag = uuid.uuid4().hex
    run, out, err = _run_and_signal(config, tag, rng, signal.SIGTERM, rng.randint(1, 6))
    assert run.returncode == STOPPED_BY_SIGNAL, f"seed {seed}: {err[-3000:]}"
    summary = _summary(out)
    assert summary["stopped_by_signal"] == "SIGTERM" and not summary["complete"]
    assert summary["driver_exit_codes"] == [0, 0]
    step = summary["steps"] - 1  # the checkpoint's step: the last one the molecules did
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint == ckdir / f"step_{step:010d}"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["step"] == step and manifest["reason"] == "signal"
    assert {"fields.h5", "coupling.npz", "hub.npz"} <= set(manifest["files"])
    partial, attrs = _datasets(tmp_path / "out" / "molecules.h5")
    assert not attrs["complete"] and partial["step"][-1] == step
    ref, _ = _datasets(references["unix"])
    assert np.array_equal(partial["Pe"], ref["Pe"][: step + 1])
    done = _run(["run", str(config), "--resume", str(ckdir)], tag)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _summary(done.stdout)["resumed_at_step"] == step
    _assert_bitwise(references["unix"], tmp_path / "out" / "molecules.h5", f"seed {seed}")


@pytest.mark.meep
def test_resume_with_a_different_config_is_refused(tmp_path):
    """--resume refuses a config that differs where it matters (exit 2, naming the key and
    both values) and accepts changes that do not (output directory, simulation.until)."""
    ckdir = tmp_path / "ck"
    config = _write_config(tmp_path / "run.toml", "embedded", tmp_path / "out", None, ckdir)
    tag = uuid.uuid4().hex
    done = _run(
        ["run", str(config), "--set", "simulation.until=2", "--set", "checkpoint.every=10"], tag
    )
    assert done.returncode == 0, done.stderr[-3000:]
    changed = tmp_path / "changed.toml"
    changed.write_text(config.read_text().replace("pe_initial = 1e-2", "pe_initial = 2e-2"))
    bad = _run(["run", str(changed), "--resume", str(ckdir)], tag)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "molecules[0].params.pe_initial" in bad.stderr, bad.stderr
    assert "0.01" in bad.stderr and "0.02" in bad.stderr, bad.stderr
    bad = _run(
        ["run", str(config), "--resume", str(ckdir), "--set", "simulation.resolution=12"], tag
    )
    assert bad.returncode == 2 and "simulation.resolution" in bad.stderr, bad.stderr
    ok = _run(
        [
            "run",
            "--resume",
            str(ckdir),
            "--set",
            "simulation.until=3",
            "--set",
            f'output.directory="{tmp_path / "elsewhere"}"',
        ],
        tag,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    summary = _summary(ok.stdout)
    assert summary["resumed_at_step"] == 40 and summary["steps"] == 61


def test_checkpoint_config_is_validated():
    """[checkpoint] keys are checked before anything starts, naming the key."""
    base = CONFIG.format(kind="embedded", out="out", name="")
    good = parse_config_text(base + CHECKPOINT.format(dir="ck"))
    assert good.checkpoint is not None
    assert good.checkpoint.every == 50 and good.checkpoint.driver_every == 10
    for table, key in (
        ('dir = "ck"\nevery = 25\ndriver_every = 10', "checkpoint.every"),
        ('dir = "ck"\nevery = -1', "checkpoint.every"),
        ("every = 10", "checkpoint.dir"),
        ('dir = "ck"\nkeep = 0', "checkpoint.keep"),
        ('dir = "ck"\nevry = 10', "checkpoint.evry"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_config_text(base + "\n[checkpoint]\n" + table + "\n")


@pytest.mark.meep
def test_api_resume_beyond_float32_step_counts(tmp_path):
    """Python API in one process: checkpoint, then resume into a new Simulation at a step
    count above 2**24 (Meep 1.25 dumps its step counter as float32; the manifest's exact
    step is put back); the continued history is bitwise the uninterrupted one's."""
    import meep as mp

    from maxwellhub.em import MeepCoupling
    from maxwellhub.run.checkpoint import RunCheckpointer, load_checkpoint

    mp.verbosity(0)
    start = 2**24 + 2  # the checkpoint at start + 25 is odd: float32 cannot hold it

    def build():
        sim = mp.Simulation(
            cell_size=mp.Vector3(4, 4), resolution=10, boundary_layers=[mp.PML(1.0)]
        )
        sim.init_sim()
        sim.fields.t = start  # as if it had run that long
        coupling = MeepCoupling(sim, time_units_fs=0.1)
        coupling.add_molecules(
            "tls", centers=[(0, 0)], sigma=0.1, axis="z", omega=0.242, mu12=187.0, pe_initial=1e-2
        )
        return sim, coupling

    def until(n):
        return lambda sim: sim.fields.t >= start + n

    sim, coupling = build()
    sim.run(coupling.step_function(), until=until(60))
    reference = coupling.history()
    sim, coupling = build()
    with RunCheckpointer(tmp_path / "ck", sim, coupling) as ckpt:
        sim.run(coupling.step_function(), until=until(25))
        written = ckpt.write("test")
    assert load_checkpoint(tmp_path / "ck").path == written
    sim, coupling = build()
    with RunCheckpointer(tmp_path / "ck", sim, coupling) as ckpt:
        assert ckpt.resume() == start + 25
        assert sim.fields.t == start + 25  # not its float32, 2**24 + 26 or + 28
        sim.run(coupling.step_function(), ckpt.step_function(), until=until(60))
    resumed = coupling.history()
    assert sorted(resumed) == sorted(reference)
    for key, value in reference.items():
        assert np.array_equal(value, resumed[key], equal_nan=True), key


@pytest.mark.meep
def test_checkpoint_directory_is_locked(tmp_path):
    """A second checkpointer on the same directory is refused while the first holds it."""
    import meep as mp

    from maxwellhub.em import MeepCoupling
    from maxwellhub.run.checkpoint import CheckpointError, RunCheckpointer

    sim = mp.Simulation(cell_size=mp.Vector3(4, 4), resolution=10)
    coupling = MeepCoupling(sim)
    with (
        RunCheckpointer(tmp_path, sim, coupling),
        pytest.raises(CheckpointError, match="another run"),
    ):
        RunCheckpointer(tmp_path, sim, coupling)
    RunCheckpointer(tmp_path, sim, coupling).close()  # free again


DYING_MODEL = '''
"""A TLS whose process kills itself (SIGKILL) in the middle of step ``die_at``, once:
the marker file it creates keeps its replacement alive."""
import os
import signal

from maxwellhub.models.tls import TLSModel


class DyingTLS(TLSModel):
    def commit(self):
        if self.time_au >= float(os.environ["MXH_DYING_AT"]) * self.dt_au:
            try:   # O_EXCL: of the drivers reaching the step together, exactly one dies
                os.close(os.open(os.environ["MXH_DYING_MARKER"], os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().commit()
'''


def test_run_restarts_a_dead_driver_from_its_checkpoint(tmp_path, unix_name, references):
    """`maxwellhub run` with [checkpoint]: a socket driver SIGKILLed in the middle of a
    random step is restarted by the run (checkpoint.restart_drivers), restores its
    checkpoint, is replayed the missed steps, and the output is bitwise the
    uninterrupted run's; the summary counts the restart."""
    (tmp_path / "dying_tls.py").write_text(DYING_MODEL)
    die_at = random.randrange(60, 560)
    config = _write_config(
        tmp_path / "run.toml", "unix", tmp_path / "out", unix_name, tmp_path / "ck"
    )
    config.write_text(config.read_text().replace('model = "tls"', 'model = "dying_tls:DyingTLS"'))
    env = dict(
        os.environ,
        PYTHONPATH=f"{tmp_path}{os.pathsep}" + os.environ.get("PYTHONPATH", ""),
        MXH_DYING_AT=str(die_at),
        MXH_DYING_MARKER=str(tmp_path / "died"),
    )
    done = subprocess.run(
        [str(BIN / "maxwellhub"), "run", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=scaled(120),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "died").exists()  # one driver did die
    summary = _summary(done.stdout)
    assert summary["drivers_restarted"] == 1, summary
    assert sorted(summary["driver_exit_codes"]) == [-signal.SIGKILL, 0, 0], summary
    assert "restarting it from its checkpoint" in done.stderr
    _assert_bitwise(
        references["unix"], tmp_path / "out" / "molecules.h5", f"driver killed in step {die_at}"
    )


# ---------------------------------------------------------------------- under mpirun

MPIRUN = shutil.which("mpirun")
MPI_FLAGS = (["--allow-run-as-root"] if os.geteuid() == 0 else []) + ["--oversubscribe"]
#: the signal tests' runs: long enough (6,000 steps) that the run is still stepping when
#: Open MPI's mpirun passes SIGTERM on, a second or more after it got it
LONG_UNTIL = "300"


def _mpi_env(tag: str, **extra: str) -> dict[str, str]:
    """A job's environment: no inherited MPI world, the tag on every rank and driver."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    env.update(MXH_RESTART_TEST=tag, OPENBLAS_NUM_THREADS="1", **extra)
    return env


def _mpirun(np_: int, args: list[str]) -> list[str]:
    return [str(MPIRUN), *MPI_FLAGS, "-np", str(np_), str(BIN / "maxwellhub"), *args]


def _mpi_run(
    np_: int, args: list[str], tag: str, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``mpirun -np N maxwellhub ARGS`` in its own session; on timeout the whole session
    is killed and the test fails."""
    proc = subprocess.Popen(
        _mpirun(np_, args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_mpi_env(tag),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=scaled(timeout))
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"mpirun did not finish within {scaled(timeout):g} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _session(sid: int) -> list[int]:
    """Processes of session ``sid``: mpirun (its leader) and its ranks (Open MPI puts
    each rank in a process group of its own, in mpirun's session)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[3]) == sid:
                found.append(int(entry))
    return found


def _kill_session(sid: int) -> list[int]:
    """SIGKILL mpirun and every rank at once (a lost job): the ranks first, by pid."""
    pids = sorted(_session(sid), key=lambda p: p == sid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _mpi_run_and_signal(
    np_: int,
    config: Path,
    tag: str,
    rng: random.Random,
    sig: int,
    after: int,
    extra_env: dict | None = None,
) -> tuple[subprocess.Popen, str, str, list[int]]:
    """``mpirun -np N maxwellhub -v run config``; ``after`` periodic checkpoints were
    logged plus a random 0-50 ms, then SIGKILL to the whole job (mpirun and its ranks)
    or ``sig`` to mpirun alone. Returns the process (ended), stdout, stderr and the pids
    SIGKILLed."""
    run = subprocess.Popen(
        _mpirun(np_, ["-v", "run", str(config)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_mpi_env(tag, **(extra_env or {})),
        start_new_session=True,
    )
    lines: list[str] = []
    killed: list[int] = []
    try:
        _await_checkpoints(run, after, lines)
        time.sleep(rng.uniform(0.0, 0.05))  # a random step after that checkpoint
        if sig == signal.SIGKILL:
            killed = _kill_session(run.pid)
        else:
            run.send_signal(sig)
        out, err = run.communicate(timeout=scaled(60))
    finally:
        if run.poll() is None:
            _kill_session(run.pid)
            run.communicate()
    return run, out, "".join(lines) + err, killed


@pytest.fixture(scope="module")
def mpi_references(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted `mpirun -np 2` runs (no [checkpoint] table): embedded and over
    UNIX sockets, 600 steps, and over UNIX sockets with until = LONG_UNTIL."""
    assert MPIRUN is not None, "only mpi-marked tests use this (skipped without mpirun)"
    base = tmp_path_factory.mktemp("mpi_reference")
    out = {}
    for key, kind, until in (
        ("embedded", "embedded", None),
        ("unix", "unix", None),
        ("unix_long", "unix", LONG_UNTIL),
    ):
        name = f"mxhrm_{os.getpid()}_{uuid.uuid4().hex[:6]}" if kind == "unix" else None
        config = _write_config(base / f"{key}.toml", kind, base / key, name, None)
        args = ["run", str(config)] + (["--set", f"simulation.until={until}"] if until else [])
        done = _mpi_run(2, args, uuid.uuid4().hex)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = _summary(done.stdout)
        assert summary["mpi_ranks"] == 2 and summary["complete"], summary
        out[key] = base / key / "molecules.h5"
    return out


@pytest.mark.meep
@pytest.mark.mpi
def test_mpirun_embedded_run_killed_and_resumed_is_bitwise(tmp_path, mpi_references):
    """`mpirun -np 2`, embedded molecules: the whole job (mpirun and both ranks) SIGKILLed
    at a random step and resumed under `mpirun -np 2` gives every HDF5 dataset bit for bit
    as the uninterrupted `mpirun -np 2` run (each rank's own source amplitudes restored,
    Meep's fields from one parallel HDF5 file)."""
    _kill_and_resume(tmp_path, "embedded", None, mpi_references["embedded"], ranks=2)


@pytest.mark.meep
@pytest.mark.mpi
def test_mpirun_socket_run_killed_and_resumed_is_bitwise(tmp_path, unix_name, mpi_references):
    """`mpirun -np 2` with two socket drivers (started by rank 0, checkpoints every 10
    steps): the whole job SIGKILLed at a random step, resumed under `mpirun -np 2`
    (drivers restarted from their checkpoints, the hub replays): bitwise the uninterrupted
    `mpirun -np 2` socket run."""
    summary = _kill_and_resume(tmp_path, "unix", unix_name, mpi_references["unix"], ranks=2)
    assert summary["driver_exit_codes"] == [0, 0]


@pytest.mark.meep
@pytest.mark.mpi
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["TERM", "USR1"])
def test_mpirun_signal_writes_checkpoint(tmp_path, unix_name, mpi_references, sig):
    """A signal to mpirun under `mpirun -np 2` (socket drivers): both ranks stop at the
    same step boundary, write one checkpoint there, stop the drivers, write the HDF5 so
    far and exit 75; resuming it completes the run bitwise equal to the uninterrupted one.

    How Open MPI 4.1's mpirun passes signals on (measured): SIGUSR1/SIGUSR2 at once, and
    mpirun then exits with the ranks' status (75). SIGTERM/SIGINT start mpirun's own abort:
    SIGCONT to the ranks at once, SIGTERM `odls_base_sigkill_timeout` seconds later
    (default 1), SIGKILL as many seconds after that, and mpirun exits 1 whatever the ranks
    did. Here that timeout is 2 s, the margin a loaded 2-core machine needs."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    ckdir = tmp_path / "ck"
    config = _write_config(tmp_path / "run.toml", "unix", tmp_path / "out", unix_name, ckdir)
    config.write_text(config.read_text().replace("until = 30", f"until = {LONG_UNTIL}"))
    tag = uuid.uuid4().hex
    run, out, err, _ = _mpi_run_and_signal(
        2,
        config,
        tag,
        rng,
        sig,
        rng.randint(1, 4),
        extra_env={"OMPI_MCA_odls_base_sigkill_timeout": "2"},
    )
    why = f"{signal.Signals(sig).name}, seed {seed}: {err[-3000:]}"
    # mpirun's status: the ranks' 75 for SIGUSR1; 1 after its own SIGTERM abort
    assert run.returncode == (STOPPED_BY_SIGNAL if sig == signal.SIGUSR1 else 1), why
    summary = _summary(out)
    assert summary["stopped_by_signal"] == signal.Signals(sig).name, why
    assert not summary["complete"] and summary["driver_exit_codes"] == [0, 0], why
    step = summary["steps"] - 1
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint == ckdir / f"step_{step:010d}", why
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["step"] == step and manifest["reason"] == "signal", why
    assert manifest["mpi_ranks"] == 2, why
    if sig == signal.SIGTERM:  # both ranks exited 75 on their own (mpirun reports only 1)
        assert err.count("writing a checkpoint at the next step boundary") == 2, why
    assert not list(ckdir.glob(".partial_*")), why
    done = _mpi_run(2, ["run", str(config), "--resume", str(ckdir)], tag)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _summary(done.stdout)["resumed_at_step"] == step
    _assert_bitwise(mpi_references["unix_long"], tmp_path / "out" / "molecules.h5", why)


@pytest.mark.meep
@pytest.mark.mpi
def test_resume_with_a_different_number_of_ranks_is_refused(tmp_path):
    """A checkpoint written by `mpirun -np 2` is refused by a serial resume and by
    `mpirun -np 3` (exit status 2, naming both counts; Meep's field dump is per chunk and
    its chunks follow the ranks), and a serial checkpoint by `mpirun -np 2`."""
    tag = uuid.uuid4().hex
    for name, np_ in (("mpi", 2), ("serial", 1)):
        config = _write_config(
            tmp_path / f"{name}.toml",
            "embedded",
            tmp_path / f"out_{name}",
            None,
            tmp_path / f"ck_{name}",
        )
        args = ["run", str(config), "--set", "simulation.until=1", "--set", "checkpoint.every=10"]
        done = _mpi_run(np_, args, tag) if np_ > 1 else _run(args, tag)
        assert done.returncode == 0, done.stderr[-3000:]
    resume = ["run", str(tmp_path / "mpi.toml"), "--resume", str(tmp_path / "ck_mpi")]
    for np_, ranks in ((1, 2), (3, 2), (2, 1)):
        if np_ == 2:
            resume = ["run", str(tmp_path / "serial.toml"), "--resume", str(tmp_path / "ck_serial")]
        bad = _mpi_run(np_, resume, tag) if np_ > 1 else _run(resume, tag)
        assert bad.returncode == 2, bad.stderr[-3000:]
        assert f"written by {ranks} MPI rank(s) and this run has {np_}" in bad.stderr, bad.stderr[
            -3000:
        ]
