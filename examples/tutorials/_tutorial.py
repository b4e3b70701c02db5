"""Shared plumbing of the MaxwellLink tutorial scripts: the command line, the JSON summary,
the figure file, and MaxwellLink run in its own venv when that venv exists.

Every script takes ``--short`` (a few seconds: what the tests run) and ``--out DIR`` and
writes ``DIR/NAME.json`` (a flat summary) and ``DIR/NAME.png`` (the figure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

HARTREE_EV = 27.211386245988  # CODATA 2018
HARTREE_CM1 = 219474.6313632
REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_args(doc: str | None, default_out: str) -> argparse.Namespace:
    """``--short`` and ``--out`` (default ``out/tutorials/NAME``)."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="a few seconds (the tests)")
    parser.add_argument("--out", default=default_out, help="output directory")
    return parser.parse_args()


def rounded(value: Any, digits: int = 7) -> Any:
    """Floats (also inside lists and dicts) to ``digits`` significant figures for the
    JSON; numpy scalars to Python ones."""
    if isinstance(value, Mapping):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [rounded(v, digits) for v in value]
    if isinstance(value, np.integer | int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, np.floating | float):
        number = float(value)
        if number == 0.0 or not math.isfinite(number):
            return number
        return float(f"{number:.{digits}g}")
    return value


def write_summary(out: Path, name: str, summary: dict[str, Any], started: float) -> Path:
    """Write ``out/NAME.json`` (with ``wall_time_s``) and print it; return the path."""
    summary = {**summary, "wall_time_s": round(time.perf_counter() - started, 1)}
    path = out / f"{name}.json"
    path.write_text(json.dumps(rounded(summary), indent=1) + "\n")
    print(path.read_text(), end="")
    return path


def figure():
    """matplotlib's pyplot with the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def maxwelllink_python() -> Path | None:
    """The python of a venv with maxwelllink 0.5.0 (``MAXWELLHUB_MXL_VENV``, else
    ``.peers/maxwelllink``), or None when there is none."""
    venv = Path(os.environ.get("MAXWELLHUB_MXL_VENV") or REPO_ROOT / ".peers" / "maxwelllink")
    python = venv / "bin" / "python"
    return python if os.access(python, os.X_OK) else None


def run_maxwelllink(script: str, spec: dict[str, Any], out: Path) -> dict[str, np.ndarray] | None:
    """Run ``script`` (Python source reading ``json.loads(sys.argv[1])``) in MaxwellLink's
    venv with ``spec`` plus ``"out"`` (an .npz path it writes); return the arrays, or None
    when MaxwellLink is not installed. A failing run raises with its stderr."""
    python = maxwelllink_python()
    if python is None:
        print("MaxwellLink not installed: its curve is left out", file=sys.stderr)
        return None
    npz = out / "maxwelllink.npz"
    proc = subprocess.run(
        [str(python), "-c", script, json.dumps({**spec, "out": str(npz)})],
        capture_output=True,
        text=True,
        check=False,
        cwd=out,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"MaxwellLink run failed:\n{proc.stderr[-3000:]}")
    with np.load(npz) as data:
        arrays = {key: data[key] for key in data.files}
    npz.unlink()
    return arrays


def polaritons(stiffness: np.ndarray) -> tuple[float, float]:
    """The lower and upper polariton of a mass-weighted stiffness matrix whose coordinate
    0 is the cavity mode: of the normal modes below and above the cavity frequency, the
    one with the largest photon fraction (modes that do not couple have none)."""
    values, vectors = np.linalg.eigh(0.5 * (stiffness + stiffness.T))
    freqs, photon = np.sqrt(np.clip(values, 0.0, None)), vectors[0] ** 2
    omega_c = math.sqrt(stiffness[0, 0])
    below, above = freqs < omega_c, freqs > omega_c
    lower = freqs[below][np.argmax(photon[below])]
    upper = freqs[above][np.argmax(photon[above])]
    return float(lower), float(upper)


def cavity_stiffness(omega_c: float, eps: float, freqs, dipoles, dse: bool) -> np.ndarray:
    """Stiffness of one cavity mode (coordinate 0) coupled to harmonic modes of
    frequencies ``freqs`` whose dipole is ``sum_j dipoles_j x_j`` (x_j mass-weighted), on
    one axis: V = w_c^2 q^2/2 + sum_j w_j^2 x_j^2/2 + eps q M (+ eps^2 M^2 / (2 w_c^2))."""
    freqs, dipoles = np.asarray(freqs, float), np.asarray(dipoles, float)
    n = len(freqs)
    k = np.zeros((n + 1, n + 1))
    k[0, 0] = omega_c**2
    k[0, 1:] = k[1:, 0] = eps * dipoles
    k[1:, 1:] = np.diag(freqs**2)
    if dse:
        k[1:, 1:] += (eps / omega_c) ** 2 * np.outer(dipoles, dipoles)
    return k
