"""Start and reap local ``maxwellhub-driver`` subprocesses.

Used by ``maxwellhub run``, the demo and the tests, so that every place starts drivers the
same way: BLAS pinned to one thread, MPI variables of the parent removed (a driver must
never join the EM side's MPI world by accident), and every process reaped with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..protocol.auth import Secret

__all__ = ["driver_command", "driver_env", "reap", "start_driver"]

_THREAD_VARS = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
_MPI_PREFIXES = ("OMPI_", "PMIX_", "PMI_", "MPI_LOCALRANKID", "HYDRA_", "I_MPI_")


def driver_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a driver: one BLAS thread, no inherited MPI world."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_MPI_PREFIXES)}
    env.update({k: "1" for k in _THREAD_VARS})
    if extra:
        env.update(extra)
    return env


def driver_command(
    model: str,
    params: Mapping[str, object] | None = None,
    *,
    unix: str | None = None,
    host: str | None = None,
    port: int | None = None,
    timeout: float | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The argv of ``maxwellhub-driver`` for one molecule."""
    exe = Path(sys.executable).with_name("maxwellhub-driver")
    found = shutil.which("maxwellhub-driver")
    argv = (
        [str(exe)]
        if exe.exists()
        else ([found] if found else [sys.executable, "-m", "maxwellhub_drivers.cli"])
    )
    if unix is not None:
        argv += ["--unix", unix]
    else:
        argv += ["--host", host or "127.0.0.1", "--port", str(port)]
    argv += ["--model", model]
    for key, value in (params or {}).items():
        argv += ["--param", f"{key}={value}"]
    if timeout is not None:
        argv += ["--timeout", str(timeout)]
    return argv + list(extra_args)


def start_driver(
    model: str,
    params: Mapping[str, object] | None = None,
    *,
    log_path: str | os.PathLike | None = None,
    secret: Secret | None = None,
    new_session: bool = False,
    **where,
) -> subprocess.Popen:
    """Start one driver subprocess (arguments as :func:`driver_command`). ``secret`` is
    handed over in the environment (MAXWELLHUB_SECRET), never on the command line.
    ``new_session``: in its own session, so a Ctrl-C at the terminal reaches only the
    parent (which then stops the driver itself)."""
    env = driver_env(secret.environ() if secret is not None else None)
    with contextlib.ExitStack() as files:
        out: Any = files.enter_context(open(log_path, "ab")) if log_path else subprocess.DEVNULL
        return subprocess.Popen(
            driver_command(model, params, **where),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log_path else None,
            start_new_session=new_session,
        )


def reap(processes: Sequence[subprocess.Popen], timeout: float = 5.0) -> list[int | None]:
    """Wait for every process until ``timeout`` (shared), then SIGTERM, then SIGKILL.

    Returns the exit codes (negative for a signal), in order.
    """
    deadline = time.monotonic() + timeout
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        for p in processes:
            if p.poll() is None and sig is not None:
                p.send_signal(sig)
        for p in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        if all(p.poll() is not None for p in processes):
            break
        deadline = time.monotonic() + 2.0
    return [p.poll() for p in processes]
