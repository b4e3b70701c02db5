"""Shared fixtures: scaled deadlines, socket names and ports, driver executables, and a
session-end check that no process started by the tests is still alive.

Deadlines: use the `deadline` fixture (or `_util.scaled`) for every timeout, never a bare
number, so MAXWELLHUB_TEST_TIMEOUT_FACTOR scales them all.
"""

from __future__ import annotations

import itertools
import os
import select
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest
from _util import (
    driver_executable,
    mxl_driver_executable,
    mxl_missing_reason,
    scaled,
    stock_clients,
    stock_missing_reason,
    timeout_factor,
    unix_socket_path,
)

# Set before any driver subprocess starts so that all of them inherit it: one BLAS thread
# per driver process, or a few drivers oversubscribe the cores.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"
# Importing Meep's MPI build in a plain process makes Open MPI start an `orted` helper that
# outlives the test that imported it; a singleton that needs no helper is what we want.
os.environ.setdefault("OMPI_MCA_ess_singleton_isolated", "1")

# Every process the tests start inherits this marker, so the session-end check also finds
# grandchildren and orphans that were re-parented away from pytest.
SESSION_MARKER = "MAXWELLHUB_TEST_SESSION"
os.environ[SESSION_MARKER] = str(os.getpid())

_socket_names = itertools.count()


# ---------------------------------------------------------------- collection


def pytest_report_header(config: pytest.Config) -> list[str]:
    mxl = mxl_driver_executable()
    return [
        f"maxwellhub: timeout factor {timeout_factor():g}, "
        f"meep {'available' if find_spec('meep') else 'absent'}, "
        f"MaxwellLink peer {mxl if mxl else 'absent'}, "
        f"stock i-PI clients {stock[0].parent.parent if (stock := stock_clients()) else 'absent'}"
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `meep`, `peer`, `stock` and `mpi` tests, with the reason, when what they need is
    missing."""
    skip_meep = pytest.mark.skip(reason="Meep not importable (Debian's python3-meep-mpi-default)")
    skip_peer = pytest.mark.skip(reason=mxl_missing_reason())
    have_meep = find_spec("meep") is not None
    have_peer = mxl_driver_executable() is not None
    skip_stock = pytest.mark.skip(reason=stock_missing_reason())
    have_stock = stock_clients() is not None
    skip_mpi = pytest.mark.skip(reason="mpirun (Open MPI) not installed")
    have_mpi = shutil.which("mpirun") is not None
    for item in items:
        if "mpi" in item.keywords and not have_mpi:
            item.add_marker(skip_mpi)
        if "meep" in item.keywords and not have_meep:
            item.add_marker(skip_meep)
        if "peer" in item.keywords and not have_peer:
            item.add_marker(skip_peer)
        if "stock" in item.keywords and not have_stock:
            item.add_marker(skip_stock)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session", name="timeout_factor")
def _timeout_factor_fixture() -> float:
    """The MAXWELLHUB_TEST_TIMEOUT_FACTOR scale for deadlines."""
    return timeout_factor()


@pytest.fixture(scope="session")
def deadline() -> Callable[[float], float]:
    """A function seconds -> seconds times the timeout factor."""
    return scaled


@pytest.fixture
def unix_name() -> Iterator[str]:
    """A bare UNIX socket name unique to this test; its /tmp/socketmxl_ file is removed after."""
    name = f"mxhtest_{os.getpid()}_{next(_socket_names)}"
    path = unix_socket_path(name)
    path.unlink(missing_ok=True)
    yield name
    path.unlink(missing_ok=True)


@pytest.fixture
def tcp_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def driver_exe() -> Path:
    """Our `maxwellhub-driver` console script in the running venv."""
    path = driver_executable()
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} missing: run ./dev.sh setup (pip install -e '.[test]')")
    return path


@pytest.fixture(scope="session")
def mxl_driver() -> Path:
    """MaxwellLink's `mxl_driver`; skips the test when the peer is not installed."""
    path = mxl_driver_executable()
    if path is None:
        pytest.skip(mxl_missing_reason())
    return path


# ---------------------------------------------------------------- leak check


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:  # the process went away, or is not ours to read
        return None


def _is_zombie(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    # The state follows the parenthesised command name, which may itself contain ')'.
    return stat is None or stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] == "Z"


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        text = _read(f"/proc/{pid}/task/{tid}/children") or ""
        found.update(int(tok) for tok in text.split())
    return found


def _marked_processes(marker: str) -> set[int]:
    """Processes whose environment carries SESSION_MARKER=marker (our descendants)."""
    wanted = f"{SESSION_MARKER}={marker}"
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            env = _read(f"/proc/{entry}/environ")
            if env and wanted in env.split("\0"):
                found.add(int(entry))
    return found


def _leftover_processes() -> set[int]:
    me = os.getpid()
    pids = _children(me) | _marked_processes(str(me))
    pids.discard(me)
    return {pid for pid in pids if not _is_zombie(pid)}


def _wait_for_exit(pids: set[int], seconds: float) -> None:
    """Wait up to `seconds` for processes that are exiting right now (pidfd, no polling)."""
    poller = select.poll()
    fds: list[int] = []
    try:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # already gone
                continue
            fds.append(fd)
            poller.register(fd, select.POLLIN)
        pending = len(fds)
        end = time.monotonic() + seconds
        while pending and (left := end - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)  # a pidfd stays readable once its process exited
                pending -= 1
    finally:
        for fd in fds:
            os.close(fd)


def _describe(pid: int) -> str:
    cmdline = (_read(f"/proc/{pid}/cmdline") or "").replace("\0", " ").strip()
    return f"pid {pid}: {cmdline or '?'}"


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """At session end, fail if any process started by the tests is still alive."""
    yield
    leftover = _leftover_processes()
    if leftover:
        _wait_for_exit(leftover, scaled(2.0))
        leftover = _leftover_processes()
    if not leftover:
        return
    described = [_describe(pid) for pid in sorted(leftover)]
    for pid in leftover:  # do not let one leaky test leave drivers running on the machine
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    pytest.fail(
        "processes started by the tests are still alive at session end (now killed):\n  "
        + "\n  ".join(described),
        pytrace=False,
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    """Keep pytest's summary the last line: Meep registers an atexit print of its run time."""
    import atexit
    import sys

    meep = sys.modules.get("meep")
    if meep is not None and hasattr(meep, "report_elapsed_time"):
        atexit.unregister(meep.report_elapsed_time)
