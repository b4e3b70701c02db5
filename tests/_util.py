"""Helpers shared by the tests: scaled deadlines, executables, socket names.

Every deadline in the tests is a number of seconds passed through `scaled()`, so a slow
machine sets MAXWELLHUB_TEST_TIMEOUT_FACTOR (say 3) instead of editing tests. Nothing here
asserts on wall time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from maxwellhub.net import addresses

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Environment variable holding a venv directory with MaxwellLink installed.
MXL_VENV_ENV = "MAXWELLHUB_MXL_VENV"

#: The peer venv ./dev.sh setup makes when it can.
DEFAULT_MXL_VENV = REPO_ROOT / ".peers" / "maxwelllink"


def timeout_factor() -> float:
    """Return the deadline scale factor from MAXWELLHUB_TEST_TIMEOUT_FACTOR (default 1.0)."""
    raw = os.environ.get("MAXWELLHUB_TEST_TIMEOUT_FACTOR", "").strip()
    if not raw:
        return 1.0
    try:
        factor = float(raw)
    except ValueError:
        raise ValueError(f"MAXWELLHUB_TEST_TIMEOUT_FACTOR={raw!r} is not a number") from None
    if not factor > 0:
        raise ValueError(f"MAXWELLHUB_TEST_TIMEOUT_FACTOR={raw!r} must be > 0")
    return factor


def scaled(seconds: float) -> float:
    """Return `seconds` times the test timeout factor."""
    return seconds * timeout_factor()


def unix_socket_path(name: str) -> Path:
    """Return the file a bare UNIX socket name maps to (MaxwellLink's convention)."""
    return Path(addresses.unix_socket_path(name))


def driver_executable() -> Path:
    """Return our `maxwellhub-driver` console script in the running venv."""
    return Path(sys.executable).parent / "maxwellhub-driver"


def mxl_venv() -> Path:
    """Return the venv directory expected to hold MaxwellLink (it may not exist)."""
    override = os.environ.get(MXL_VENV_ENV)
    return Path(override) if override else DEFAULT_MXL_VENV


def mxl_driver_executable() -> Path | None:
    """Return MaxwellLink's `mxl_driver`, or None when the peer is not installed."""
    path = mxl_venv() / "bin" / "mxl_driver"
    return path if os.access(path, os.X_OK) else None


def mxl_missing_reason() -> str:
    """Say why the MaxwellLink peer is unavailable, for pytest.skip()."""
    return (
        f"MaxwellLink peer not installed: no executable {mxl_venv() / 'bin' / 'mxl_driver'} "
        f"(./dev.sh setup installs it when it can, or set {MXL_VENV_ENV} to a venv with "
        "maxwelllink==0.5.0)"
    )


#: Environment variable holding a venv with the stock i-PI clients (ASE and i-PI).
STOCK_VENV_ENV = "MAXWELLHUB_STOCK_IPI_VENV"

#: The peer venv ./dev.sh setup makes when it can (ase==3.28.0, ipi==3.3.1).
DEFAULT_STOCK_VENV = REPO_ROOT / ".peers" / "stock-ipi"


def stock_venv() -> Path:
    """Return the venv directory expected to hold ASE and i-PI (it may not exist)."""
    override = os.environ.get(STOCK_VENV_ENV)
    return Path(override) if override else DEFAULT_STOCK_VENV


def stock_clients() -> tuple[Path, Path] | None:
    """Return (the peer venv's python, i-PI's `i-pi-py_driver`), or None when absent."""
    python, ipi = stock_venv() / "bin" / "python", stock_venv() / "bin" / "i-pi-py_driver"
    if os.access(python, os.X_OK) and os.access(ipi, os.X_OK):
        return python, ipi
    return None


def stock_missing_reason() -> str:
    """Say why the stock i-PI clients are unavailable, for pytest.skip()."""
    return (
        f"stock i-PI clients not installed: no {stock_venv() / 'bin' / 'i-pi-py_driver'} "
        f"(./dev.sh setup installs ase==3.28.0 and ipi==3.3.1 there when it can, or set "
        f"{STOCK_VENV_ENV} to a venv with both)"
    )


#: Environment variable holding a venv with Debian's Meep and maxwelllink==0.5.0.
MXL_MEEP_VENV_ENV = "MAXWELLHUB_MXL_MEEP_VENV"

#: The peer venv ./dev.sh setup makes when it can (--system-site-packages: Debian's Meep).
DEFAULT_MXL_MEEP_VENV = REPO_ROOT / ".peers" / "maxwelllink-meep"


def mxl_meep_venv() -> Path:
    """Return the venv directory expected to hold MaxwellLink with Debian's Meep."""
    override = os.environ.get(MXL_MEEP_VENV_ENV)
    return Path(override) if override else DEFAULT_MXL_MEEP_VENV


def mxl_meep_python() -> tuple[Path | None, str]:
    """Return (the Meep peer's python, "") when that venv was built, else (None, why).

    Built means its interpreter exists: dev.sh and benchmarks/meep_maxwelllink.py remove
    a venv whose install failed. A built venv that does not work is for the test to fail
    on, not to skip; only a venv never built (or recorded in .peers/NAME.failed) skips.
    """
    venv = mxl_meep_venv()
    python = venv / "bin" / "python"
    if os.access(python, os.X_OK):
        return python, ""
    failed = venv.parent / f"{venv.name}.failed"
    log = venv.parent / f"{venv.name}-install.log"
    if failed.exists():
        return None, (
            f"MaxwellLink+Meep peer could not be built (recorded in {failed}; see {log}; "
            f"rm -rf {venv}* and rerun ./dev.sh setup to retry)"
        )
    return None, (
        f"MaxwellLink+Meep peer not built: no {python} (./dev.sh setup builds it, or set "
        f"{MXL_MEEP_VENV_ENV} to a --system-site-packages venv with maxwelllink==0.5.0)"
    )
