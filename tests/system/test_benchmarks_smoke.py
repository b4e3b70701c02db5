"""Smoke tests of the benchmark scripts: each runs with tiny parameters and prints its
tables. Nothing here looks at the numbers (tests never assert on wall time)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from _util import REPO_ROOT, scaled

BENCH = REPO_ROOT / "benchmarks"
TINY = ["--seconds", "0.02", "--repeats", "1", "--min-steps", "5"]

needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="no C compiler for the benchmarks' C programs",
)


def run(script: str, *args: str, timeout: float = 120) -> str:
    """Run a benchmark script with this Python; return its stdout, failing on exit != 0."""
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=scaled(timeout),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def measured_row(out: str, label: str, n: int | None = None) -> str:
    """The table row starting with `label` (and N), checked to hold numbers."""
    start = f"| {label} |" + (f" {n} |" if n is not None else "")
    rows = [line for line in out.splitlines() if line.startswith(start)]
    assert rows, f"no row {start!r} in:\n{out}"
    assert "not measured" not in rows[0], rows[0]
    return rows[0]


@needs_cc
def test_hub_throughput_prints_tables_and_targets():
    """hub_throughput.py with N = 1, 2 over UNIX and TCP prints both tables and the targets."""
    out = run(
        "hub_throughput.py",
        "--hubs",
        "maxwellhub-async,maxwellhub-sync,c-epoll",
        "--transports",
        "unix,tcp",
        "--counts",
        "1,2",
        *TINY,
    )
    for transport in ("UNIX", "TCP"):
        assert f"### Hub barrier throughput, {transport}" in out
    for label in (
        "maxwellhub Hub.step (async)",
        "maxwellhub SocketHub.step (sync)",
        "minimal C hub with epoll (the limit)",
    ):
        for n in (1, 2):
            measured_row(out, label, n)
    assert "### Targets" in out
    assert "sync minus async" in out


@needs_cc
@pytest.mark.peer
def test_hub_throughput_measures_maxwelllink():
    """MaxwellLink's SocketHub gets a row and a ratio line when its venv is present."""
    out = run(
        "hub_throughput.py",
        "--hubs",
        "maxwellhub-sync,maxwelllink",
        "--transports",
        "unix",
        "--counts",
        "1",
        *TINY,
    )
    measured_row(out, "MaxwellLink 0.5.0 SocketHub.step_barrier", 1)
    assert "maxwellhub-sync / MaxwellLink" in out


@needs_cc
def test_drivers_prints_table_and_target():
    """drivers.py measures our tls and sho drivers and the I/O floor, and prints the target."""
    out = run("drivers.py", "--drivers", "maxwellhub,loadgen", *TINY)
    measured_row(out, "maxwellhub-driver --model tls")
    measured_row(out, "maxwellhub-driver --model sho")
    measured_row(out, "C loadgen, no physics (the I/O floor)")
    assert "tls driver CPU per step" in out


@pytest.mark.peer
def test_drivers_measures_maxwelllink():
    """drivers.py measures MaxwellLink's mxl_driver when its venv is present."""
    out = run("drivers.py", "--drivers", "maxwelllink", *TINY)
    measured_row(out, "MaxwellLink mxl_driver -m tls")
    measured_row(out, "MaxwellLink mxl_driver -m sho")


@needs_cc
def test_relay_prints_direct_and_relayed_side_by_side():
    """relay.py with 8 drivers, direct and behind 2 relays, prints both rows and the ratio."""
    out = run("relay.py", "--drivers", "8", "--relays", "2", "--steps", "20", "--warmup", "5")
    measured_row(out, "8 direct connections")
    measured_row(out, "8 drivers behind 2 relays (4 each)")
    measured_row(out, "ratio relays / direct")


def test_run_all_help():
    """run_all.py parses its options (the full run is too long for a test)."""
    assert "--quick" in run("run_all.py", "--help")


@pytest.mark.meep
@pytest.mark.peer
def test_meep_maxwelllink_side_by_side():
    """meep_maxwelllink.py prints our and MaxwellLink's ms per Meep step for N = 1 (it makes
    .peers/maxwelllink-meep if missing; skips if that cannot be made)."""
    out = run("meep_maxwelllink.py", "--counts", "1", "--steps", "10", "--repeat", "1")
    if "MaxwellLink not measured:" in out:
        pytest.skip(out.split("MaxwellLink not measured:", 1)[1].splitlines()[0])
    measured_row(out, "0 (plain source)")
    measured_row(out, "1")


def test_cavity_benchmarks_print_tables():
    """cavity_scale.py and cavity_rabi.py at tiny sizes print their tables (numbers are
    not checked: tests never assert on wall time)."""
    out = run("cavity_scale.py", "--counts", "20", "--mxl-counts", "", "--seconds", "0.2")
    assert "embedded /s" in out and "targets at 10^6" in out
    row = [line for line in out.splitlines() if line.strip().startswith("20 ")]
    assert row and float(row[0].split()[1]) > 0
    out = run("cavity_rabi.py", "--counts", "4", "--steps", "2000", "--where", "embedded,hub")
    assert out.count("| 4 |") == 4  # two gauges, embedded and hub
