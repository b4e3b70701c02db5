"""Every example runs as written (on a short duration), and `maxwellhub run` writes what it
promises: the HDF5 file with units, the plot, the JSON line, and on a dead driver a clear
message with the data so far."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _util import REPO_ROOT, scaled

from maxwellhub.run.launch import driver_command, driver_env, reap

h5py = pytest.importorskip("h5py")
pytestmark = pytest.mark.meep

EXAMPLES = REPO_ROOT / "examples"
BIN = Path(sys.executable).parent
TLS = {"omega": 0.242, "mu12": 187, "pe_initial": 1e-4}


def run_cli(*args, cwd, timeout=120):
    return subprocess.run(
        [str(BIN / "maxwellhub"), *args],
        capture_output=True,
        text=True,
        timeout=scaled(timeout),
        cwd=cwd,
    )


@pytest.mark.parametrize("config", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_example_config_runs(config, tmp_path):
    """`maxwellhub run` on each example config (until = 4): JSON line, HDF5, plot."""
    proc = run_cli(
        "run",
        str(EXAMPLES / config),
        "--set",
        "simulation.until=4",
        "--set",
        f'output.directory="{tmp_path}"',
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["steps"] > 0
    # what the run plots: a kicked real molecule's spectrum, molecular dynamics' IR
    # spectrum, or the populations of two-level systems with the golden-rule curve
    kind = (
        "spectrum"
        if "spectrum_peaks_ev" in summary
        else "ir"
        if "ir_peaks_cm1" in summary
        else "populations"
    )
    if kind == "populations":
        assert summary["golden_rule_rate"] > 0 and summary["fitted_rate"] > 0
    assert Path(summary["plot"]).stat().st_size > 10_000
    assert Path(summary["plot"]).name == f"{kind}.png"
    with h5py.File(summary["hdf5"]) as f:
        assert f.attrs["complete"]
        n = summary["molecules"]
        assert f["molecule_id"].shape == (n,)
        reported = f["Pe"] if kind == "populations" else f["muz_au"]
        assert reported.shape == (len(f["step"]), n)
        assert reported.attrs["units"].startswith("1" if kind == "populations" else "e a0")
        assert f["time_au"].attrs["units"] == "a.u. of time"
        assert f["time_meep"].shape == (len(f["step"]),)
        assert "simulation" in f.attrs["config"]


def test_api_mixed_example(tmp_path):
    """The plain-Python API example with an embedded and a socket molecule."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "api_mixed_2d.py"), "--until", "3"],
        capture_output=True,
        text=True,
        timeout=scaled(120),
        cwd=tmp_path,
        env=dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("final Pe")][-1]
    embedded, socket_ = json.loads(line.split(":", 1)[1])
    assert embedded == pytest.approx(socket_, rel=1e-12)


def test_tcp_drivers_started_by_hand(tcp_port, tmp_path):
    """The TCP example waits for drivers started by hand, then runs with them."""
    script = subprocess.Popen(
        [
            sys.executable,
            "-u",
            str(EXAMPLES / "tcp_drivers_by_hand.py"),
            "--port",
            str(tcp_port),
            "--until",
            "3",
            "--wait",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    drivers = []
    assert script.stdout is not None and script.stderr is not None
    try:
        seen = ""
        for _ in range(10):  # Meep may print its banner first
            seen += script.stdout.readline()
            if "hub listening" in seen:
                break
        assert f"127.0.0.1:{tcp_port}" in seen, seen + script.stderr.read()
        for _ in range(2):  # as a user would, from the printed command
            drivers.append(
                subprocess.Popen(
                    driver_command("tls", TLS, host="127.0.0.1", port=tcp_port),
                    env=driver_env(),
                    stdout=subprocess.DEVNULL,
                )
            )
        out, err = script.communicate(timeout=scaled(120))
    finally:
        reap([script], 1)
    assert script.returncode == 0, err[-3000:]
    assert "final Pe:" in out
    assert reap(drivers, scaled(10)) == [0, 0]


@pytest.mark.mpi
def test_mpi_example(tmp_path):
    """The mpirun example: 2 ranks, hub on rank 0, same result as run serially."""
    base = [sys.executable, str(EXAMPLES / "mpi_relax_2d.py"), "--until", "3"]
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("OMPI_MCA_ess_singleton_isolated", None)
    parallel = subprocess.run(
        ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", *base],
        capture_output=True,
        text=True,
        timeout=scaled(180),
        cwd=tmp_path,
        env=env,
    )
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    serial = subprocess.run(
        base, capture_output=True, text=True, timeout=scaled(120), cwd=tmp_path, env=env
    )
    assert serial.returncode == 0, serial.stderr[-3000:]

    def final(out):
        return json.loads(
            [x for x in out.splitlines() if x.startswith("final Pe")][-1].split(":", 1)[1]
        )

    assert final(parallel.stdout) == pytest.approx(final(serial.stdout), rel=1e-10)


def test_readme_hub_example(tmp_path):
    """The README's hub-and-two-drivers example runs and both drivers exit 0; run again
    with the compiled speedups off (hub and drivers: MAXWELLHUB_PURE_PYTHON=1), it prints
    the same numbers, so both paths run end to end in every test run. (Which driver binds
    molecule 0 depends on which connects first, so lines are compared without the id.)"""
    outputs = []
    for pure in ("0", "1"):
        proc = subprocess.run(
            [sys.executable, str(EXAMPLES / "hub_and_two_drivers.py")],
            capture_output=True,
            text=True,
            timeout=scaled(60),
            cwd=tmp_path,
            env=dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", MAXWELLHUB_PURE_PYTHON=pure),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("dmu/dt") == 6
        outputs.append(proc.stdout)

    def lines(out: str) -> list[tuple[str, str]]:
        step_id_rest = [line.split(" ", 2) for line in out.splitlines()]
        return sorted((step, rest) for step, _mid, rest in step_id_rest)

    assert lines(outputs[0]) == lines(outputs[1])


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def _await_hub_step(pid: int, step: int, deadline: float) -> None:
    """Ask the run's control endpoint for its step until it reaches ``step`` (each answer
    comes back at once: there is no event to await from outside the run's process)."""
    from maxwellhub.services.control import request

    address = f"/tmp/maxwellhub_control_mxh_run_{pid}"
    while time.monotonic() < deadline:
        try:
            if request(address, "Status", timeout=scaled(5))["Status"]["step"] >= step:
                return
        except OSError:
            pass  # the endpoint is not listening yet
        time.sleep(0.05)
    pytest.fail(f"the run did not reach step {step} in time")


def test_dead_driver_ends_run_with_data_written(tmp_path):
    """A driver killed mid-run ends `maxwellhub run` with a message naming its molecule,
    and the steps recorded so far are in the HDF5 file (marked incomplete)."""
    run = subprocess.Popen(
        [
            str(BIN / "maxwellhub"),
            "run",
            str(EXAMPLES / "relax_2d.toml"),
            "--set",
            "simulation.until=100000",
            "--set",
            f'output.directory="{tmp_path}"',
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + scaled(60)
        log = tmp_path / "drivers" / "molecule_0.log"
        driver = None
        while driver is None and time.monotonic() < deadline:
            kids = [
                k
                for k in _children(run.pid)
                if b"maxwellhub-driver" in Path(f"/proc/{k}/cmdline").read_bytes()
            ]
            if kids and log.exists():
                driver = kids[0]
            else:
                time.sleep(0.2)  # the driver is a grandchild we cannot await
        assert driver is not None, "the run never started its driver"
        _await_hub_step(run.pid, 20, deadline)  # the run has recorded steps to keep
        os.kill(driver, signal.SIGKILL)
        _, err = run.communicate(timeout=scaled(60))
    finally:
        reap([run], 1)
    assert run.returncode == 1, err[-3000:]
    assert "molecule" in err and "[0]" in err, err[-3000:]
    assert "data so far written to" in err
    with h5py.File(tmp_path / "molecules.h5") as f:
        assert not f.attrs["complete"]
        assert len(f["step"]) > 10


@pytest.mark.parametrize("config", ["relax_1d.toml", "relax_2d.toml"])
def test_main_job_validates_over_sockets(config, tmp_path):
    """The full 1D and 2D relaxations with socket drivers (`maxwellhub run`, UNIX transport)
    stay within std < 3e-3 and max < 8e-3 of the golden-rule curve (relative to P0)."""
    proc = run_cli(
        "run", str(EXAMPLES / config), "--set", f'output.directory="{tmp_path}"', cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["transport"] == "unix" and summary["steps"] == 1801
    print(
        f"\n{config}: std {summary['curve_std_over_p0']:.2e} max {summary['curve_max_over_p0']:.2e}"
    )
    assert summary["curve_std_over_p0"] < 3e-3 and summary["curve_max_over_p0"] < 8e-3
    assert summary["relative_error_kernel"] < 1e-2


def test_ensemble_drivers_in_main_job_match_embedded(tmp_path):
    """`transport.molecules_per_driver = 4`: ten molecules in three ensemble drivers
    (4 + 4 + 2) give the embedded superradiance trajectories to 1e-12."""
    runs = {}
    for kind, extra in (
        ("embedded", []),
        (
            "ensembles",
            ["--set", 'transport.kind="unix"', "--set", "transport.molecules_per_driver=4"],
        ),
    ):
        out = tmp_path / kind
        proc = run_cli(
            "run",
            str(EXAMPLES / "superradiance_2d.toml"),
            "--set",
            "simulation.until=20",
            "--set",
            f'output.directory="{out}"',
            *extra,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        with h5py.File(out / "molecules.h5") as f:
            runs[kind] = f["Pe"][()]
    assert sorted(p.name for p in (tmp_path / "ensembles" / "drivers").glob("*.log")) == [
        "molecule_0.log",
        "molecule_4.log",
        "molecule_8.log",
    ]
    assert runs["ensembles"].shape == runs["embedded"].shape == (401, 10)
    assert abs(runs["ensembles"] - runs["embedded"]).max() <= 1e-12


@pytest.mark.meep
def test_main_job_over_tcp_with_a_shared_secret(tmp_path):
    """`transport.secret_file`: the hub requires the secret, the drivers it starts get it in
    their environment, and the run matches the UNIX run; a file readable by others is
    refused before anything starts, naming the file."""
    secret = tmp_path / "hub.secret"
    secret.write_text("s3cret-for-the-test\n")
    secret.chmod(0o600)
    common = ["--set", "simulation.until=4", "--set", f'output.directory="{tmp_path}"']
    tcp = run_cli(
        "run",
        str(EXAMPLES / "relax_2d.toml"),
        *common,
        "--set",
        'transport.kind="tcp"',
        "--set",
        f'transport.secret_file="{secret}"',
        cwd=tmp_path,
    )
    assert tcp.returncode == 0, tcp.stderr[-3000:]
    unix = run_cli("run", str(EXAMPLES / "relax_2d.toml"), *common, cwd=tmp_path)
    assert unix.returncode == 0, unix.stderr[-3000:]
    a = json.loads(tcp.stdout.strip().splitlines()[-1])
    b = json.loads(unix.stdout.strip().splitlines()[-1])
    assert a["transport"] == "tcp" and a["steps"] == b["steps"]
    assert a["curve_max_over_p0"] == b["curve_max_over_p0"]
    assert "authentication failed" not in tcp.stderr
    secret.chmod(0o644)
    bad = run_cli(
        "run",
        str(EXAMPLES / "relax_2d.toml"),
        *common,
        "--set",
        'transport.kind="tcp"',
        "--set",
        f'transport.secret_file="{secret}"',
        cwd=tmp_path,
    )
    assert bad.returncode != 0 and str(secret) in bad.stderr, bad.stderr[-2000:]


@pytest.mark.meep
def test_main_job_with_external_drivers_through_the_address_file(tmp_path):
    """`transport.drivers = "external"`: the run starts no driver, publishes its address in
    the rendezvous file, and waits; a driver started separately with --address-file (as a
    second job would) finds it, and the run equals the one with its own drivers."""
    address = tmp_path / "hub.json"
    common = ["--set", "simulation.until=4", "--set", f'output.directory="{tmp_path}"']
    run = subprocess.Popen(
        [
            str(BIN / "maxwellhub"),
            "run",
            str(EXAMPLES / "relax_2d.toml"),
            *common,
            "--set",
            'transport.drivers="external"',
            "--set",
            f'transport.address_file="{address}"',
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    driver = subprocess.Popen(
        [
            str(BIN / "maxwellhub-driver"),
            "--address-file",
            str(address),
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
            "--timeout",
            str(scaled(60)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = run.communicate(timeout=scaled(120))
        assert driver.stderr is not None
        assert driver.wait(timeout=scaled(30)) == 0, driver.stderr.read()
    finally:
        for p in (run, driver):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert run.returncode == 0, err[-3000:]
    assert "external driver" in err
    assert not address.exists()  # removed when the hub stopped
    local = run_cli("run", str(EXAMPLES / "relax_2d.toml"), *common, cwd=tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    a = json.loads(out.strip().splitlines()[-1])
    b = json.loads(local.stdout.strip().splitlines()[-1])
    assert a["steps"] == b["steps"] and a["curve_max_over_p0"] == b["curve_max_over_p0"]
