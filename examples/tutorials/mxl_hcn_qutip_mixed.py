"""MaxwellLink's "Collective, heterogeneous coupling of QuTiP + RT-TDDFT HCN molecules".

Nine QuTiP "HCN" molecules (the ``qutip`` model's ``nlevel`` preset built from HCN's
LR-TDHF/STO-3G excitation energies and z transition dipoles, as the tutorial builds them
from LR-TDDFT) and one RT-TDHF HCN (``rttddft``, permanent dipole removed) in the cavity of
the HCN tutorial, with coupling_strength 0.02/sqrt(10): the collective coupling equals the
single molecule's, so the polaritons must sit where the single RT-TDHF HCN put them. Both
kinds of molecule run in this process, each kind as one batched model.

    python examples/tutorials/mxl_hcn_qutip_mixed.py [--short] [--out DIR]
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tutorial as tut
import mxl_hcn_esc as esc

from maxwellhub.em import EngineCoupling, SingleModeCavity

NAME = "mxl_hcn_qutip_mixed"
N = 10


def main() -> None:
    args = tut.parse_args(__doc__, f"out/tutorials/{NAME}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    steps, dt = (1500, 0.08) if args.short else (10000, esc.DT)

    energies, mu_z = esc.lr_tdhf()
    eps = esc.EPS / math.sqrt(N)
    expected = esc.expected_polaritons(energies, mu_z, eps=eps, n=N)
    single = esc.expected_polaritons(energies, mu_z)

    cavity = SingleModeCavity(**{**esc.CAVITY, "coupling_strength": eps})
    coupling = EngineCoupling(cavity, dt_au=dt, record_every=0)
    # z dipoles only, as the tutorial's model; the states without one never couple (the
    # cavity is along z and the preset has no excited-excited dipoles), so they are left
    # out: 9 levels instead of 25, the same dynamics
    bright = np.abs(mu_z) > 1e-6
    dipoles = [[0.0, 0.0, float(m)] for m in mu_z[bright]]
    coupling.add_molecules(
        "qutip",
        n=N - 1,
        preset="nlevel",
        energies=json.dumps(energies[bright].tolist()),
        dipoles=json.dumps(dipoles),
    )
    coupling.add_molecules(
        "rttddft", n=1, **{**esc.RTTDDFT, "dt_substep_au": dt}, remove_permanent_dipole=True
    )
    qc = esc.run(coupling, steps)
    fit = esc.analyse(qc, dt, expected)
    esc.plot(
        out / f"{NAME}.png",
        qc,
        dt,
        expected,
        f"{N - 1} QuTiP + 1 RT-TDHF HCN, coupling 0.02/$\\sqrt{{{N}}}$",
    )

    ev = tut.HARTREE_EV
    tut.write_summary(
        out,
        NAME,
        {
            "steps": steps,
            "time_au": steps * dt,
            "molecules": {"qutip": N - 1, "rttddft": 1},
            "qutip_levels": int(bright.sum()) + 1,
            "coupling_strength": eps,
            "polaritons_ev": [fit.lower * ev, fit.upper * ev],
            "rabi_splitting_ev": fit.splitting * ev,
            "expected_polaritons_ev": [expected[0] * ev, expected[1] * ev],
            "expected_splitting_ev": (expected[1] - expected[0]) * ev,
            "single_molecule_expected_ev": [single[0] * ev, single[1] * ev],
            "polariton_errors_ev": [(fit.lower - expected[0]) * ev, (fit.upper - expected[1]) * ev],
            "maxwelllink_published_polaritons_ev": list(esc.MXL_PUBLISHED_EV),
            "plot": f"{NAME}.png",
        },
        started,
    )


if __name__ == "__main__":
    main()
