"""Vacuum Rabi splitting of N TLS in the single-mode cavity, at sizes too large for the
tests, in both gauges: expected 2 g sqrt(N), measured, error, and ms per step.

    .venv/bin/python benchmarks/cavity_rabi.py [--counts 1000,100000] [--steps 4000]
                                        [--where embedded,hub]

N identical TLS (omega = omega_c = 0.242 a.u., mu12 = 187 a.u.) on the x axis, in their
ground state; the mode starts with p_c = 1e-3 (far below one photon: the linear regime)
and g sqrt(N) / omega_c = 0.05 with g = eps mu12 / sqrt(2 omega_c). The dipole gauge
includes the dipole self-energy, so both gauges have the polaritons at
sqrt(omega_c^2 + g^2 N) -+ g sqrt(N) exactly; the splitting is fitted to q_c,x(t) by
:func:`maxwellhub.rabi.rabi_splitting_from_trajectory`. Stepped by ``EngineCoupling``
(dt = 0.5 a.u.), embedded and through the hub (two ensemble drivers, the dipoles every
step).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402  (the thread pinning above must come first)
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from maxwellhub import SocketHub  # noqa: E402
from maxwellhub.em import EngineCoupling  # noqa: E402
from maxwellhub.em.cavity import SingleModeCavity  # noqa: E402
from maxwellhub.rabi import rabi_splitting_from_trajectory  # noqa: E402
from maxwellhub.run.launch import reap, start_driver  # noqa: E402

WC, MU12, DT = 0.242, 187.0, 0.5


def run(gauge: str, n: int, steps: int, where: str) -> tuple[float, float, float]:
    """(expected splitting, measured splitting, ms per step) of one run, embedded or
    through the hub (two ensemble drivers behind a UNIX socket, dipoles every step)."""
    g_sqrt_n = 0.05 * WC
    eps = g_sqrt_n / math.sqrt(n) * math.sqrt(2 * WC) / MU12
    engine = SingleModeCavity(
        frequency_au=WC,
        damping_au=0.0,
        coupling_strength=eps,
        coupling_axis="x",
        include_dse=gauge == "dipole",
        gauge=gauge,
        pc_initial=[1e-3, 0.0, 0.0],
    )
    tls: dict[str, Any] = {"omega": WC, "mu12": MU12, "orientation": 0}
    hub, procs = None, []
    try:
        if where == "hub":
            name = f"bench_rabi_{os.getpid()}"
            hub = SocketHub(unixsocket=name)
            coupling = EngineCoupling(engine, DT, hub=hub, record_every=0)
            coupling.add_socket_molecules(n=n)
            per = (n + 1) // 2 if n > 1 else 1
            for first in range(0, n, per):
                args = ["--molecules", str(min(per, n - first))]
                procs.append(start_driver("tls", tls, unix=name, extra_args=args))
        else:
            coupling = EngineCoupling(engine, DT, record_every=0)
            coupling.add_molecules("tls", n=n, **tls)
        coupling.run(steps=1)  # set-up and binding, outside the timing
        start = time.perf_counter()
        coupling.run(steps=steps - 1)
        elapsed = time.perf_counter() - start
    finally:
        if hub is not None:
            hub.stop()
        reap(procs, 10.0)
    qc = coupling.history()["engine/qc_au"][:, 0]
    fit = rabi_splitting_from_trajectory(qc, DT)
    return 2 * g_sqrt_n, fit.splitting, 1e3 * elapsed / (steps - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,100000", help="comma-separated N")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--where", default="embedded,hub", help="embedded and/or hub")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    print(f"### Vacuum Rabi splitting, {args.steps} steps of {DT} a.u.\n")
    print("| gauge | N | molecules | expected 2g sqrt(N) | measured | error | ms/step |")
    print("|---|---|---|---|---|---|---|")
    for gauge in ("dipole", "velocity"):
        for n in counts:
            for where in args.where.split(","):
                expected, measured, ms = run(gauge, n, args.steps, where)
                print(
                    f"| {gauge} | {n} | {where} | {expected:.6f} | {measured:.6f} | "
                    f"{measured / expected - 1:+.2e} | {ms:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
