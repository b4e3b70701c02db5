"""The rttddft model: cost per sub-step, ensemble throughput, and spectra against linear
response (not run by the tests; prints Markdown tables).

    .venv/bin/python benchmarks/rttddft.py [--quick]
        [--only fock,socket,ensemble,spectrum,open_shell]

- ``fock``: HCN/6-31G PBE at grids.level 3, the embedded model: microseconds per sub-step
  in total, in Fock builds and in the rest of our code (propagator, bookkeeping), for our
  numpy Fock builder and for PySCF's builders, next to one PySCF ``get_fock`` call.
- ``socket``: the same molecule behind ``maxwellhub-driver`` (UNIX socket, SocketHub in
  this process): milliseconds per EM step against the embedded model.
- ``ensemble``: molecule-steps per second of n = 1, 100, 10,000 copies of HeH+/STO-3G (HF)
  in one batched model against a loop over single-molecule models.
- ``spectrum``: water/STO-3G kicked along (1, 1, 1)/sqrt(3), T = 1000 a.u.: RT peak
  energies and oscillator-strength ratios against PySCF's full TDHF/TDDFT (HF, LDA, PBE),
  the peak error at dt = 0.2, 0.1, 0.05 a.u. (the dt² law).
- ``open_shell``: the same kick spectrum of H2O+ (UHF doublet) against UHF TDHF.

Wall times on a shared machine: medians of repeats; BLAS pinned to one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# One BLAS thread, set before numpy and PySCF load BLAS: they are imported inside the
# functions below, after this runs.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

REPO = Path(__file__).resolve().parent.parent
MOLECULES = REPO / "examples" / "molecules"
HCN = str(MOLECULES / "hcn.xyz")
WATER = str(MOLECULES / "water.xyz")
WATER_CATION = "O 0 0 0.1173; H 0 0.7572 -0.4692; H 0 -0.7572 -0.4692"
MODEL = "maxwellhub.models.rttddft:RTTDDFTModel"


def _timed_builds(model: Any) -> list[float]:
    """Wrap the model's Fock builder so that each build's wall time is recorded."""
    spent: list[float] = []
    build = model.core.build

    def timed(p, want_energy):
        t0 = time.perf_counter()
        out = build(p, want_energy)
        spent.append(time.perf_counter() - t0)
        return out

    model.core.build = timed  # type: ignore[method-assign]
    return spent


def bench_fock(quick: bool) -> None:
    import numpy as np

    from maxwellhub.models.rttddft import RTTDDFTModel

    steps = 5 if quick else 40
    print("### HCN/6-31G PBE, grids.level 3: microseconds per sub-step (embedded model)\n")
    print(
        "| Fock builder | propagator | total | in Fock builds | builds / sub-step | "
        "rest of our code | PySCF get_fock, one call |"
    )
    print("|---|---|---|---|---|---|---|")
    for builder in ("numpy", "pyscf"):
        for propagator in ("pc", "etrs"):
            model = RTTDDFTModel(
                xyz=HCN,
                basis="6-31g",
                xc="pbe",
                grid_level=3,
                fock_builder=builder,
                propagator=propagator,
                kick_au=1e-3,
                dt_substep_au=0.04,
            )
            model.initialize(dt_au=0.04)
            model.step(np.zeros((1, 3)))  # warm-up
            spent = _timed_builds(model)
            t0 = time.perf_counter()
            for _ in range(steps):
                model.step(np.zeros((1, 3)))
            total = (time.perf_counter() - t0) / steps
            builds = sum(spent) / steps
            mf = model.core.mf
            x = model.core.x
            dm = (x @ model.get_state()["P"][0, 0] @ x).real
            calls = []
            for _ in range(3 if quick else 10):
                t1 = time.perf_counter()
                mf.get_fock(dm=dm)
                calls.append(time.perf_counter() - t1)
            print(
                f"| {builder} | {propagator} | {total * 1e6:,.0f} | {builds * 1e6:,.0f} | "
                f"{len(spent) / steps:.2f} | {(total - builds) * 1e6:,.0f} | "
                f"{statistics.median(calls) * 1e6:,.0f} |"
            )
    print(
        "\nauto picks the numpy builder for this molecule (HF, LDA, GGA or global hybrid "
        "and N^4 dense integrals within 256 MiB).\n"
    )


def bench_socket(quick: bool) -> None:
    import numpy as np

    from maxwellhub import SocketHub
    from maxwellhub.models.rttddft import RTTDDFTModel
    from maxwellhub.run.launch import driver_command, driver_env

    steps = 5 if quick else 30
    params: dict[str, Any] = {
        "xyz": HCN,
        "basis": "6-31g",
        "xc": "pbe",
        "grid_level": 3,
        "kick_au": 1e-3,
        "dt_substep_au": 0.04,
    }
    print(
        "### HCN/6-31G PBE, grids.level 3: milliseconds per EM step of 0.04 a.u. (one sub-step)\n"
    )
    print("| where | ms per EM step |")
    print("|---|---|")
    embedded = RTTDDFTModel(**params)
    embedded.initialize(dt_au=0.04)
    embedded.step(np.zeros((1, 3)))
    t0 = time.perf_counter()
    for _ in range(steps):
        embedded.step(np.zeros((1, 3)))
    print(f"| embedded model | {(time.perf_counter() - t0) / steps * 1e3:.2f} |")

    name = f"bench_rt_{os.getpid()}"
    hub = SocketHub(unixsocket=name, timeout=120)
    hub.register_molecule(0)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(params, f)
    proc = subprocess.Popen(
        driver_command(MODEL, None, unix=name, timeout=120, extra_args=["--params-file", f.name]),
        env=driver_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not hub.wait_until_bound({0: {"dt_au": 0.04}}, timeout=120):
            print("| socket driver | not measured: the driver did not bind |")
            return
        ids = np.array([0])
        fields = np.zeros((1, 3))
        hub.step_arrays(ids, fields)
        t0 = time.perf_counter()
        for _ in range(steps):
            hub.step_arrays(ids, fields)
        print(
            f"| maxwellhub-driver over a UNIX socket (SocketHub.step_arrays) | "
            f"{(time.perf_counter() - t0) / steps * 1e3:.2f} |"
        )
    finally:
        hub.stop()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(f.name)
    print()


def bench_ensemble(quick: bool) -> None:
    import numpy as np

    from maxwellhub.models.rttddft import RTTDDFTModel

    counts = (1, 100, 1000) if quick else (1, 100, 10_000)
    print("### Ensemble: HeH+/STO-3G (HF, N = 2), EM step 0.1 a.u. = 2 sub-steps (pc)\n")
    print("| copies | batched: molecule-steps/s | per-molecule loop: molecule-steps/s | speed-up |")
    print("|---|---|---|---|")
    atoms = "He 0 0 0; H 0 0 0.772"
    single = RTTDDFTModel(atoms=atoms, charge=1, kick_au=1e-3, dt_substep_au=0.05)
    single.initialize(dt_au=0.1)
    loop_models = [single] + [
        RTTDDFTModel(atoms=atoms, charge=1, kick_au=1e-3, dt_substep_au=0.05) for _ in range(19)
    ]
    for m in loop_models:
        m.initialize(dt_au=0.1)
    field = np.full((1, 3), 1e-3)
    t0 = time.perf_counter()
    rounds = 5 if quick else 20
    for _ in range(rounds):
        for m in loop_models:
            m.step(field)
    loop_rate = rounds * len(loop_models) / (time.perf_counter() - t0)
    for n in counts:
        model = RTTDDFTModel(n=n, atoms=atoms, charge=1, kick_au=1e-3, dt_substep_au=0.05)
        model.initialize(dt_au=0.1)
        fields = np.full((n, 3), 1e-3)
        model.step(fields)
        reps = max(3, int(20_000 / n)) if not quick else 3
        t0 = time.perf_counter()
        for _ in range(reps):
            model.step(fields)
        rate = reps * n / (time.perf_counter() - t0)
        print(f"| {n:,} | {rate:,.0f} | {loop_rate:,.0f} | {rate / loop_rate:.1f}x |")
    print(
        "\nThe loop rate is measured over 20 single-molecule models (it does not depend on "
        "how many there are).\n"
    )


def _kick_run(model_params: dict, dt: float, t_end: float, kappa: float = 1e-4):
    import numpy as np

    from maxwellhub.models.rttddft import RTTDDFTModel
    from maxwellhub.spectrum import absorption_spectrum, fit_peaks

    e = np.ones(3) / np.sqrt(3.0)
    model = RTTDDFTModel(kick_au=kappa, kick_direction=e, dt_substep_au=dt, **model_params)
    model.initialize(dt_au=dt)
    steps = round(t_end / dt)
    dipoles = np.empty((steps + 1, 3))
    dipoles[0] = model.get_state()["dipole"][0]
    zero = np.zeros((1, 3))
    t0 = time.perf_counter()
    for k in range(steps):
        model.step(zero)
        dipoles[k + 1] = model.get_state()["dipole"][0]
    wall = time.perf_counter() - t0
    spectrum = absorption_spectrum(
        np.arange(steps + 1) * dt, dipoles, kick=kappa * e, omega_max=2.0
    )
    peaks = fit_peaks(spectrum, energy_range_au=(0.05, 1.6), min_relative=0.002)
    return model, peaks, wall, steps


def _lr(model: Any, hf: bool):
    import numpy as np
    from pyscf import tdscf

    from maxwellhub.spectrum import HARTREE_EV

    td = (tdscf.TDHF if hf else tdscf.TDDFT)(model.core.mf)
    td.nstates = 20
    td.verbose = 0
    td.kernel()
    f = np.asarray(td.oscillator_strength())
    e = np.asarray(td.e)
    # excitations closer than 0.15 eV are one line at the RT resolution (1/tau = 0.25 eV
    # at T = 1000 a.u.): one line with their summed strength at their weighted mean
    groups: list[list[int]] = []
    for i in np.argsort(e):
        if groups and (e[i] - e[groups[-1][-1]]) * HARTREE_EV < 0.15:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    f_all, e_all = f, e
    f = np.array([f_all[g].sum() for g in groups])
    e = np.array([(f_all[g] @ e_all[g]) / max(f_all[g].sum(), 1e-300) for g in groups])
    ev = e * HARTREE_EV
    chosen = [
        i
        for i in range(e.size)
        if f[i] >= 0.01 and not np.any((np.abs(ev - ev[i]) < 0.5) & (f > 10 * f[i]))
    ]
    return e[chosen[:3]], f[chosen[:3]]


def _compare(peaks, e_lr, f_lr):
    import numpy as np

    from maxwellhub.spectrum import HARTREE_EV

    rt_e = np.array(peaks.energy_au)
    idx = [int(np.argmin(np.abs(rt_e - e))) for e in e_lr]
    de = (rt_e[idx] - e_lr) * HARTREE_EV
    f_rt = np.array(peaks.strength)[idx]
    return rt_e[idx], de, f_rt / f_rt[0], f_lr / f_lr[0]


def bench_spectrum(quick: bool) -> None:
    from maxwellhub.spectrum import HARTREE_EV

    t_end = 300.0 if quick else 1000.0
    print(
        f"### Water/STO-3G kick spectrum, T = {t_end:g} a.u., dt = 0.05 (etrs) vs full "
        "TDHF/TDDFT (not TDA), same grid (level 0)\n"
    )
    print(
        "| method | LR energies (eV) | RT - LR (meV) | f ratios LR | f ratios RT | "
        "wall (s) | us / sub-step |"
    )
    print("|---|---|---|---|---|---|---|")
    methods = ("hf", "lda") if quick else ("hf", "lda", "pbe")
    for xc in methods:
        model, peaks, wall, steps = _kick_run(
            {"xyz": WATER, "xc": xc, "grid_level": 0, "propagator": "etrs"}, 0.05, t_end
        )
        e_lr, f_lr = _lr(model, xc == "hf")
        _, de, r_rt, r_lr = _compare(peaks, e_lr, f_lr)
        print(
            f"| {xc.upper()} | {', '.join(f'{e * HARTREE_EV:.4f}' for e in e_lr)} | "
            f"{', '.join(f'{d * 1e3:+.1f}' for d in de)} | "
            f"{', '.join(f'{r:.4f}' for r in r_lr[1:])} | "
            f"{', '.join(f'{r:.4f}' for r in r_rt[1:])} | {wall:.1f} | "
            f"{wall / steps * 1e6:.0f} |"
        )

    print(f"\n### dt² law: water/STO-3G HF, T = {t_end:g} a.u., peak error RT - LR (meV)\n")
    print(
        "| propagator | dt (a.u.) | peak 1 | peak 2 | peak 3 | error / dt² (meV/a.u.²), peaks 1-3 |"
    )
    print("|---|---|---|---|---|---|")
    for propagator in ("etrs", "pc"):
        for dt in (0.2, 0.1, 0.05):
            model, peaks, _, _ = _kick_run(
                {"xyz": WATER, "xc": "hf", "propagator": propagator}, dt, t_end
            )
            e_lr, f_lr = _lr(model, True)
            _, de, _, _ = _compare(peaks, e_lr, f_lr)
            print(
                f"| {propagator} | {dt} | {de[0] * 1e3:+.1f} | {de[1] * 1e3:+.1f} | "
                f"{de[2] * 1e3:+.1f} | "
                f"{', '.join(f'{d * 1e3 / dt**2:.0f}' for d in de)} |"
            )


def bench_open_shell(quick: bool) -> None:
    from maxwellhub.spectrum import HARTREE_EV

    t_end = 300.0 if quick else 1000.0
    print(
        f"### Open shell: H2O+/STO-3G UHF (doublet), T = {t_end:g} a.u., dt = 0.05 (etrs) "
        "vs UHF TDHF (excitations closer than 0.15 eV counted as one line)\n"
    )
    print("| LR energies (eV) | RT - LR (meV) | f ratios LR | f ratios RT |")
    print("|---|---|---|---|")
    model, peaks, _, _ = _kick_run(
        {"atoms": WATER_CATION, "charge": 1, "multiplicity": 2, "xc": "hf", "propagator": "etrs"},
        0.05,
        t_end,
    )
    e_lr, f_lr = _lr(model, True)
    _, de, r_rt, r_lr = _compare(peaks, e_lr, f_lr)
    print(
        f"| {', '.join(f'{e * HARTREE_EV:.4f}' for e in e_lr)} | "
        f"{', '.join(f'{d * 1e3:+.1f}' for d in de)} | "
        f"{', '.join(f'{r:.4f}' for r in r_lr[1:])} | "
        f"{', '.join(f'{r:.4f}' for r in r_rt[1:])} |\n"
    )


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, rough numbers")
    parser.add_argument(
        "--only",
        default="fock,socket,ensemble,spectrum,open_shell",
        help="comma-separated sections (default: all)",
    )
    args = parser.parse_args()
    print(
        f"rttddft benchmarks, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
        f"python {sys.version.split()[0]}, numpy {np.__version__}\n"
    )
    sections = {
        "open_shell": bench_open_shell,
        "fock": bench_fock,
        "socket": bench_socket,
        "ensemble": bench_ensemble,
        "spectrum": bench_spectrum,
    }
    for name in args.only.split(","):
        sections[name.strip()](args.quick)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
