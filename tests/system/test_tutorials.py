"""The MaxwellLink tutorial scripts (examples/tutorials/) run on their short settings and
show the physics they claim; the full-run outputs the docs show (docs/tutorials/outputs/)
have the keys a run writes today, so the pages cannot go stale in shape."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from _util import REPO_ROOT, mxl_missing_reason, mxl_venv, scaled

SCRIPTS = REPO_ROOT / "examples" / "tutorials"
COMMITTED = REPO_ROOT / "docs" / "tutorials" / "outputs"
IMAGES = REPO_ROOT / "docs" / "images"
NAMES = (
    "mxl_tls_rabi",
    "mxl_hcn_esc",
    "mxl_hcn_qutip_mixed",
    "mxl_water_vsc",
    "many_molecules",
)


def run_short(name: str, out: Path) -> dict:
    """Run one tutorial with --short into ``out``; return its JSON summary, after checking
    the figure was written."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / f"{name}.py"), "--short", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=scaled(300),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / f"{name}.json").read_text())
    png = out / summary["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    committed = json.loads((COMMITTED / f"{name}.json").read_text())
    assert sorted(summary) == sorted(committed), "docs output has other keys: rerun full"
    assert (IMAGES / committed["plot"]).is_file()
    return summary


def test_committed_outputs_are_complete():
    """Every tutorial script has its committed full-run JSON and figure, and no stray
    output lingers without a script."""
    scripts = {p.stem for p in SCRIPTS.glob("*.py")} - {"_tutorial"}
    assert scripts == set(NAMES)
    assert {p.stem for p in COMMITTED.glob("*.json")} == set(NAMES)
    for name in NAMES:
        summary = json.loads((COMMITTED / f"{name}.json").read_text())
        assert (IMAGES / summary["plot"]).is_file(), name


def test_tls_rabi(tmp_path):
    """One TLS in a cavity mode: the fitted splitting is the exact linear normal modes'
    to 1e-3 (within 0.2% of the RWA 2g), and MaxwellLink's q_c(t) equals ours to 1e-9
    when MaxwellLink is installed."""
    s = run_short("mxl_tls_rabi", tmp_path)
    assert abs(s["relative_error_vs_exact"]) < 1e-3
    assert abs(s["rabi_splitting_au"] / s["rwa_splitting_au"] - 1) < 2e-3
    low, up = s["polaritons_au"]
    assert low < 0.242 < up
    if not (mxl_venv() / "bin" / "python").exists():
        pytest.skip(mxl_missing_reason())
    assert s["max_qc_difference_vs_maxwelllink"] < 1e-9
    assert math.isclose(s["maxwelllink_splitting_au"], s["rabi_splitting_au"], rel_tol=1e-6)


def _check_hcn(s: dict) -> None:
    """Polaritons either side of HCN's 21.43 eV excitation, each within 0.2 eV of the
    LR-TDHF coupled-mode model (the short run resolves 120 a.u.: a 1.4 eV bin)."""
    low, up = s["polaritons_ev"]
    assert low < 21.4311 < up
    for got, want in zip(s["polaritons_ev"], s["expected_polaritons_ev"], strict=True):
        assert abs(got - want) < 0.2, (got, want)
    assert abs(s["rabi_splitting_ev"] / s["expected_splitting_ev"] - 1) < 0.15


@pytest.mark.slow
def test_hcn_esc(tmp_path):
    """RT-TDHF HCN in a cavity at 21.43 eV: the lower and upper polariton bracket the
    excitation and sit where linear response puts them."""
    s = run_short("mxl_hcn_esc", tmp_path)
    assert abs(s["bare_excitation_ev"] - 21.4311) < 1e-3  # LR-TDHF, as MaxwellLink prints
    _check_hcn(s)


@pytest.mark.slow
def test_hcn_qutip_mixed(tmp_path):
    """Nine QuTiP and one RT-TDHF HCN at coupling 0.02/sqrt(10): the polaritons of the
    single molecule at 0.02 (the collective coupling is the same)."""
    s = run_short("mxl_hcn_qutip_mixed", tmp_path)
    assert s["molecules"] == {"qutip": 9, "rttddft": 1}
    assert s["expected_polaritons_ev"] == pytest.approx(s["single_molecule_expected_ev"], abs=1e-6)
    _check_hcn(s)


def test_water_vsc(tmp_path):
    """SPC/Fw waters in a cavity on the asymmetric OH stretch: the splitting is the
    harmonic normal modes' to 3%, each polariton within 30 cm^-1 (the velocity-Verlet
    shift at 0.5 fs is about +15), either side of the cavity."""
    s = run_short("mxl_water_vsc", tmp_path)
    low, up = s["polaritons_cm1"]
    assert low < s["cavity_cm1"] < up
    assert abs(s["rabi_splitting_cm1"] / s["expected_splitting_cm1"] - 1) < 0.03
    for got, want in zip(s["polaritons_cm1"], s["expected_polaritons_cm1"], strict=True):
        assert abs(got - want) < 30, (got, want)


def test_many_molecules(tmp_path):
    """1,000 resonant TLS in a cavity mode embedded, in two ensemble drivers and behind a
    relay: the three q_c(t) agree to 1e-12 and each fitted splitting is 2 g sqrt(N) to 1e-3."""
    s = run_short("many_molecules", tmp_path)
    assert s["molecules"] == 1000
    assert s["max_qc_relative_difference"] <= 1e-12
    for way in ("embedded", "ensembles", "relay"):
        assert abs(s[way]["relative_error_vs_expected"]) < 1e-3, way
        assert abs(s[way]["rabi_splitting_au"] / s["expected_splitting_au"] - 1) < 1e-3, way
        low, up = s[way]["polaritons_au"]
        assert low < 0.242 < up
