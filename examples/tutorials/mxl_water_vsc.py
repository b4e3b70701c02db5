"""MaxwellLink's "Vibrational strong coupling with liquid water" tutorial, in the form
that runs here.

MaxwellLink's tutorial couples 216 TIP4P-style waters (LAMMPS, 300 K liquid, through a
socket) to one cavity mode at 3550 cm^-1 (coupling_strength 4e-4, dipoles rescaled by
0.73, dipole self-energy on, 0.5 fs steps, 10 ps) and shows the OH-stretch band split into
a lower and an upper polariton in the spectrum of q_c. LAMMPS is not available here; the
``ase`` model's flexible SPC/Fw water is. So: N identical waters at rest in the force
field's minimum (the yz plane, bisector along z), one cavity mode along y on resonance
with their asymmetric OH stretch, the same collective coupling per axis as the
tutorial's isotropic liquid (eps sqrt(N) = 4e-4 x 0.73 x sqrt(216 / 3)), q_c(0) kicked.
The polaritons are fitted from q_c(t) and compared with the normal modes of the harmonic
model (the SPC/Fw Hessian by finite differences, the cavity, the dipole self-energy).

    python examples/tutorials/mxl_water_vsc.py [--short] [--out DIR]
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms, units

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tutorial as tut

from maxwellhub.em import EngineCoupling, SingleModeCavity
from maxwellhub.ir import ir_spectrum
from maxwellhub.models._water import FlexibleWater, water_geometry
from maxwellhub.rabi import rabi_splitting_from_trajectory

NAME = "mxl_water_vsc"
DT = 0.5 * 1e-15 / units._aut  # 0.5 fs in a.u.
COLLECTIVE = 4e-4 * 0.73 * math.sqrt(216 / 3)  # eps sqrt(N) of the tutorial, per axis
AXIS = 1  # y: the asymmetric stretch's dipole derivative
# MaxwellLink's published figure (06_singlemode_vsc.ipynb, "Photonic Spectrum"): the two
# polariton peaks read off the plot's pixels (cm^-1, +-16, one pixel)
MXL_PUBLISHED_CM1 = (3273.0, 4088.0)


def harmonic_water() -> tuple[np.ndarray, np.ndarray]:
    """SPC/Fw water's normal-mode frequencies (Hartree; the six rigid-body modes at 0)
    and the dipole derivatives d mu / d Q_j (a.u., (9, 3)) along the mass-weighted modes,
    from a central-difference Hessian of the calculator's forces."""
    atoms = Atoms("OHH", positions=water_geometry())
    calc = FlexibleWater()
    charges = np.array([calc.parameters["q_oxygen"]] + 2 * [calc.parameters["q_hydrogen"]])
    x0, h = atoms.get_positions().ravel(), 1e-4  # Å
    hessian = np.zeros((9, 9))
    for k in range(9):
        forces = []
        for sign in (1, -1):
            probe = Atoms("OHH", positions=(x0 + sign * h * np.eye(9)[k]).reshape(3, 3))
            probe.calc = FlexibleWater()
            forces.append(probe.get_forces().ravel())
        hessian[k] = -(forces[0] - forces[1]) / (2 * h)
    hessian *= units.Bohr**2 / units.Hartree  # eV/Å² -> Hartree/bohr²
    masses = np.repeat(atoms.get_masses() * units._amu / units._me, 3)
    weighted = hessian / np.sqrt(np.outer(masses, masses))
    values, modes = np.linalg.eigh(0.5 * (weighted + weighted.T))
    freqs = np.sqrt(np.clip(values, 0.0, None))
    freqs[freqs < 1e-4] = 0.0  # the rigid-body modes (round-off of order 1e-5)
    cartesian = modes / np.sqrt(masses)[:, None]  # d r / d Q_j, (9, modes)
    dmu = np.einsum("a,akj->jk", charges, cartesian.reshape(3, 3, 9))
    return freqs, dmu


def main() -> None:
    args = tut.parse_args(__doc__, f"out/tutorials/{NAME}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    n, steps = (2, 1000) if args.short else (6, 8000)

    freqs, dmu = harmonic_water()
    stretch = int(np.argmax(np.abs(dmu[:, AXIS]) * (freqs > 0.01)))
    omega_c = float(freqs[stretch])
    eps = COLLECTIVE / math.sqrt(n)
    expected = tut.polaritons(
        tut.cavity_stiffness(omega_c, eps, freqs, dmu[:, AXIS] * math.sqrt(n), dse=True)
    )

    cavity = SingleModeCavity(
        frequency_au=omega_c,
        damping_au=0.0,
        coupling_strength=eps,
        coupling_axis="y",
        qc_initial=[0.0, 1e-2, 0.0],
        include_dse=True,
    )
    coupling = EngineCoupling(cavity, dt_au=DT, record_every=0)
    coupling.add_molecules("ase", n=n, calculator="water", initial_temperature_K=0.0)
    coupling.run(steps=steps)
    qc = coupling.history()["engine/qc_au"][:, AXIS]
    fit = rabi_splitting_from_trajectory(qc, DT, guess=expected)

    cm = tut.HARTREE_CM1
    plot(out / f"{NAME}.png", qc, n, [w * cm for w in expected], omega_c * cm)
    tut.write_summary(
        out,
        NAME,
        {
            "steps": steps,
            "time_fs": steps * 0.5,
            "molecules": n,
            "coupling_strength": eps,
            "normal_modes_cm1": sorted(float(w * cm) for w in freqs if w > 0),
            "cavity_cm1": omega_c * cm,
            "polaritons_cm1": [fit.lower * cm, fit.upper * cm],
            "rabi_splitting_cm1": fit.splitting * cm,
            "expected_polaritons_cm1": [expected[0] * cm, expected[1] * cm],
            "expected_splitting_cm1": (expected[1] - expected[0]) * cm,
            "polariton_errors_cm1": [
                (fit.lower - expected[0]) * cm,
                (fit.upper - expected[1]) * cm,
            ],
            "maxwelllink_published_polaritons_cm1": list(MXL_PUBLISHED_CM1),
            "maxwelllink_published_splitting_cm1": MXL_PUBLISHED_CM1[1] - MXL_PUBLISHED_CM1[0],
            "plot": f"{NAME}.png",
        },
        started,
    )


def plot(path: Path, qc: np.ndarray, n: int, expected: list[float], cavity: float) -> None:
    """q_c(t) and its spectrum with the harmonic and MaxwellLink's polaritons."""
    plt = tut.figure()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6))
    top.plot(0.5 * np.arange(1, len(qc) + 1), qc, lw=0.6)
    top.set(
        xlabel="time (fs)",
        ylabel="$q_c$ (a.u.)",
        title=f"{n} SPC/Fw waters in an IR cavity mode (asymmetric OH stretch)",
    )
    spec = ir_spectrum(qc, DT, form="dipole", window="hann", resolution=2e-6)
    cm1 = spec.omega * tut.HARTREE_CM1
    keep = (cm1 > 500) & (cm1 < 6000)
    amp = np.sqrt(spec.intensity[keep])
    bottom.plot(cm1[keep], amp / amp.max(), lw=1, label="maxwellhub $q_c$ (SPC/Fw, 0 K)")
    for i, w in enumerate(expected):
        bottom.axvline(
            w, color="k", ls="-.", lw=0.8, label="harmonic normal modes" if i == 0 else None
        )
    for i, w in enumerate(MXL_PUBLISHED_CM1):
        bottom.axvline(
            w,
            color="tab:orange",
            ls=":",
            lw=1.2,
            label="MaxwellLink's figure (liquid, 300 K)" if i == 0 else None,
        )
    bottom.axvline(cavity, color="red", ls="--", lw=0.8, label=f"cavity {cavity:.0f} cm$^{{-1}}$")
    bottom.set(xlabel="frequency (cm$^{-1}$)", ylabel="|FFT($q_c$)| (normalised)")
    bottom.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
