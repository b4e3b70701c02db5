"""MaxwellLink's "Electronic strong coupling with HCN" tutorial.

One HCN molecule, RT-TDHF/STO-3G on PySCF (MaxwellLink runs its own RT-TDDFT on Psi4
integrals), in one cavity mode tuned to HCN's strongest excitation (0.7876 Hartree,
21.43 eV, along the molecular axis z): coupling_strength 0.02, dipole self-energy on,
q_c(0) = 1e-3, dt 0.04 a.u., 10,000 steps. The spectrum of q_c(t) shows the lower and
upper polariton either side of 21.43 eV (and, weakly, HCN's other z-polarised
excitations). The expectation is the linear response of the same model: the cavity mode
coupled to every z-polarised LR-TDHF excitation (PySCF's TDHF energies and transition
dipoles, each an oscillator of dipole mu_j sqrt(2 omega_j)), with the dipole self-energy;
its normal modes are the polaritons the fit should find.

    python examples/tutorials/mxl_hcn_esc.py [--short] [--out DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tutorial as tut

from maxwellhub.em import EngineCoupling, SingleModeCavity
from maxwellhub.ir import ir_spectrum
from maxwellhub.rabi import rabi_splitting_from_trajectory

NAME = "mxl_hcn_esc"
XYZ = str(tut.REPO_ROOT / "examples" / "molecules" / "hcn.xyz")
OMEGA_C, EPS, DT = 0.7876, 2e-2, 0.04
CAVITY: dict[str, Any] = {
    "frequency_au": OMEGA_C,
    "coupling_strength": EPS,
    "damping_au": 0.0,
    "coupling_axis": "z",
    "drive": 0.0,
    "qc_initial": [0.0, 0.0, 1e-3],
    "include_dse": True,
}
RTTDDFT: dict[str, Any] = {"xyz": XYZ, "basis": "sto-3g", "xc": "hf", "dt_substep_au": DT}
# MaxwellLink's published figure (04_singlemode_esc.ipynb, "Photonic Spectrum"): the two
# polariton peaks read off the plot's pixels (eV, +-0.06, one pixel): not printed there
MXL_PUBLISHED_EV = (20.68, 22.15)


def lr_tdhf(n_states: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """HCN's LR-TDHF/STO-3G excitation energies (Hartree) and z transition dipoles (a.u.)
    from PySCF, the reference the coupled-mode model is built from."""
    from pyscf import gto, scf, tdscf

    mol = gto.M(atom=XYZ, basis="sto-3g", verbose=0)
    mf = scf.RHF(mol).run(conv_tol=1e-12)
    td = tdscf.TDHF(mf)
    td.nstates = n_states
    td.kernel()
    return np.asarray(td.e), np.asarray(td.transition_dipole())[:, 2]


def expected_polaritons(energies, mu_z, eps: float = EPS, n: int = 1) -> tuple[float, float]:
    """The polaritons of the cavity coupled to n copies of every excitation (their bright
    combination: dipole times sqrt(n))."""
    dipoles = np.abs(mu_z) * np.sqrt(2.0 * energies) * np.sqrt(n)
    return tut.polaritons(tut.cavity_stiffness(OMEGA_C, eps, energies, dipoles, dse=True))


def run(coupling: EngineCoupling, steps: int) -> np.ndarray:
    """Step and return q_c,z(t)."""
    coupling.run(steps=steps)
    return coupling.history()["engine/qc_au"][:, 2]


def analyse(qc: np.ndarray, dt: float, guess: tuple[float, float]):
    """The two-polariton fit of q_c in a +-0.06 Hartree window around the cavity."""
    return rabi_splitting_from_trajectory(
        qc, dt, omega_range=(OMEGA_C - 0.06, OMEGA_C + 0.06), guess=guess
    )


def spectrum_plot(ax, qc: np.ndarray, dt: float, label: str, style: str = "-") -> None:
    """|FFT(q_c)| against eV, normalised, on ``ax``."""
    spec = ir_spectrum(qc, dt, form="dipole", window="hann", resolution=2e-4)
    ev = spec.omega * tut.HARTREE_EV
    keep = (ev > 5) & (ev < 30)
    amp = np.sqrt(spec.intensity[keep])
    ax.plot(ev[keep], amp / amp.max(), style, lw=1, label=label)


def plot(path: Path, qc: np.ndarray, dt: float, expected, title: str) -> None:
    """q_c(t) and its spectrum with the expected and MaxwellLink's polaritons."""
    plt = tut.figure()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6))
    top.plot(dt * np.arange(1, len(qc) + 1), qc, lw=0.6)
    top.set(xlabel="time (a.u.)", ylabel="$q_c$ (a.u.)", title=title)
    spectrum_plot(bottom, qc, dt, "maxwellhub $q_c$")
    for i, w in enumerate(expected):
        bottom.axvline(
            w * tut.HARTREE_EV,
            color="k",
            ls="-.",
            lw=0.8,
            label="LR-TDHF coupled modes" if i == 0 else None,
        )
    for i, w in enumerate(MXL_PUBLISHED_EV):
        bottom.axvline(
            w,
            color="tab:orange",
            ls=":",
            lw=1.2,
            label="MaxwellLink's figure (read off)" if i == 0 else None,
        )
    bottom.axvline(
        OMEGA_C * tut.HARTREE_EV, color="red", ls="--", lw=0.8, label="cavity / excitation 21.43 eV"
    )
    bottom.set(xlabel="energy (eV)", ylabel="|FFT($q_c$)| (normalised)", xlim=(5, 30))
    bottom.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = tut.parse_args(__doc__, f"out/tutorials/{NAME}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # short: 120 a.u. in 1,500 steps of 0.08 (the full run's dt is MaxwellLink's)
    steps, dt = (1500, 0.08) if args.short else (10000, DT)

    energies, mu_z = lr_tdhf()
    bright = int(np.argmin(np.abs(energies - OMEGA_C) + (np.abs(mu_z) < 0.1)))
    expected = expected_polaritons(energies, mu_z)

    coupling = EngineCoupling(SingleModeCavity(**CAVITY), dt_au=dt, record_every=0)
    coupling.add_molecules("rttddft", n=1, **{**RTTDDFT, "dt_substep_au": dt})
    qc = run(coupling, steps)
    fit = analyse(qc, dt, expected)
    plot(out / f"{NAME}.png", qc, dt, expected, "HCN (RT-TDHF/STO-3G) in a cavity")

    ev = tut.HARTREE_EV
    tut.write_summary(
        out,
        NAME,
        {
            "steps": steps,
            "time_au": steps * dt,
            "bare_excitation_ev": energies[bright] * ev,
            "transition_dipole_z_au": abs(mu_z[bright]),
            "polaritons_ev": [fit.lower * ev, fit.upper * ev],
            "rabi_splitting_ev": fit.splitting * ev,
            "expected_polaritons_ev": [expected[0] * ev, expected[1] * ev],
            "expected_splitting_ev": (expected[1] - expected[0]) * ev,
            "polariton_errors_ev": [(fit.lower - expected[0]) * ev, (fit.upper - expected[1]) * ev],
            "maxwelllink_published_polaritons_ev": list(MXL_PUBLISHED_EV),
            "plot": f"{NAME}.png",
        },
        started,
    )


if __name__ == "__main__":
    main()
