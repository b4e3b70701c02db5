"""MaxwellLink's "Rabi splitting with TLS" tutorial, here and in MaxwellLink side by side.

One two-level system (omega = 0.242 Hartree, mu12 = 187 a.u.) on resonance with one cavity
mode (coupling_strength 5e-5, no dipole self-energy, q_c(0) = 1e-5 along z, dt 0.1 a.u.,
40,960 steps): the cavity coordinate beats between the two polaritons. The splitting is
fitted from q_c(t) and compared with the rotating-wave value 2g = eps mu12 sqrt(2/omega)
(the tutorial's dashed lines) and with the exact linear normal modes
sqrt(omega^2 -/+ eps mu12 sqrt(2 omega)) (no RWA). When MaxwellLink 0.5.0 is installed
(.peers/maxwelllink), its SingleModeSimulation runs the same case and both curves share
the figure.

    python examples/tutorials/mxl_tls_rabi.py [--short] [--out DIR]
"""

from __future__ import annotations

import math
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

NAME = "mxl_tls_rabi"
OMEGA, MU12, EPS, DT = 0.242, 187.0, 5e-5, 0.1
CAVITY: dict[str, Any] = {
    "frequency_au": OMEGA,
    "coupling_strength": EPS,
    "damping_au": 0.0,
    "coupling_axis": "z",
    "drive": 0.0,
    "qc_initial": [0.0, 0.0, 1e-5],
    "include_dse": False,
}
TLS: dict[str, Any] = {"omega": OMEGA, "mu12": MU12, "orientation": 2, "pe_initial": 0.0}

# MaxwellLink 0.5.0, as its tutorial calls it (non-socket TLS molecule)
MXL_SCRIPT = """
import json, sys
import numpy as np
import maxwelllink as mxl
spec = json.loads(sys.argv[1])
molecule = mxl.Molecule(driver="tls", driver_kwargs=spec["tls"])
sim = mxl.SingleModeSimulation(molecules=[molecule], dt_au=spec["dt"], record_history=True,
                               **spec["cavity"])
sim.run(steps=spec["steps"])
np.savez(spec["out"], qc=np.array(sim.qc_history)[:, 2], t=np.array(sim.time_history))
"""


def main() -> None:
    args = tut.parse_args(__doc__, f"out/tutorials/{NAME}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    steps = 8192 if args.short else 40960

    coupling = EngineCoupling(SingleModeCavity(**CAVITY), dt_au=DT, record_every=0)
    coupling.add_molecules("tls", n=1, **TLS)
    coupling.run(steps=steps)
    qc = coupling.history()["engine/qc_au"][:, 2]
    t = DT * np.arange(1, steps + 1)
    ours = rabi_splitting_from_trajectory(qc, DT)

    rwa = EPS * MU12 * math.sqrt(2.0 / OMEGA)  # the tutorial's analytic 2g
    c = EPS * MU12 * math.sqrt(2.0 * OMEGA)
    exact = (math.sqrt(OMEGA**2 - c), math.sqrt(OMEGA**2 + c))

    spec = {"tls": TLS, "cavity": CAVITY, "dt": DT, "steps": steps}
    mxl = tut.run_maxwelllink(MXL_SCRIPT, spec, out)
    theirs = rabi_splitting_from_trajectory(mxl["qc"], DT) if mxl is not None else None
    max_diff = float(np.abs(mxl["qc"] - qc).max() / np.abs(qc).max()) if mxl else None

    plot(out / f"{NAME}.png", t, qc, mxl, rwa, exact)
    tut.write_summary(
        out,
        NAME,
        {
            "steps": steps,
            "time_au": steps * DT,
            "rabi_splitting_au": ours.splitting,
            "polaritons_au": [ours.lower, ours.upper],
            "rwa_splitting_au": rwa,
            "exact_polaritons_au": list(exact),
            "exact_splitting_au": exact[1] - exact[0],
            "relative_error_vs_exact": (ours.splitting - (exact[1] - exact[0]))
            / (exact[1] - exact[0]),
            "maxwelllink_splitting_au": theirs.splitting if theirs else None,
            "maxwelllink_polaritons_au": [theirs.lower, theirs.upper] if theirs else None,
            "max_qc_difference_vs_maxwelllink": max_diff,
            "plot": f"{NAME}.png",
        },
        started,
    )


def plot(path: Path, t, qc, mxl, rwa: float, exact: tuple[float, float]) -> None:
    """q_c(t) and |spectrum| of both codes, with the RWA and exact polaritons."""
    plt = tut.figure()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6))
    top.plot(t, qc, lw=0.8, label="maxwellhub")
    if mxl is not None:
        top.plot(mxl["t"], mxl["qc"], "--", lw=0.8, label="MaxwellLink 0.5.0")
    top.set(xlabel="time (a.u.)", ylabel="$q_c$ (a.u.)", title="Single TLS in a cavity mode")
    top.legend(loc="upper right")
    for trace, style, label in ((qc, "-", "maxwellhub"), (mxl and mxl["qc"], "--", "MaxwellLink")):
        if trace is None:
            continue
        spec = ir_spectrum(trace, DT, form="dipole", window="none")
        keep = (spec.omega > 0.5 * OMEGA) & (spec.omega < 1.5 * OMEGA)
        amp = np.sqrt(spec.intensity[keep])
        bottom.plot(spec.omega[keep], amp / amp.max(), style, lw=1, label=label)
    for i, w in enumerate((OMEGA - rwa / 2, OMEGA + rwa / 2)):
        bottom.axvline(w, color="red", ls=":", label="RWA $\\omega \\pm g$" if i == 0 else None)
    for i, w in enumerate(exact):
        bottom.axvline(
            w, color="k", ls="-.", lw=0.7, label="exact normal modes" if i == 0 else None
        )
    bottom.set(xlabel="frequency (Hartree)", ylabel="|FFT($q_c$)| (normalised)")
    bottom.set_xlim(0.2, 0.285)
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
