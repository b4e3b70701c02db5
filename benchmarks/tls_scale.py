"""TLS model at scale: ms per ``step`` and per dipole read-out, embedded (no wire).

    .venv/bin/python benchmarks/tls_scale.py [--counts 1000,100000,1000000] [--seconds 1]

A cavity gives every molecule the same 3-vector field and wants back each molecule's
dmu/dt and dipole every step. Prints n, ms per ``model.step(fields)``, ms per
``model.dipoles()``, and molecule-steps/s of step + dipoles (medians over --seconds),
first with glibc's malloc defaults, then after ``maxwellhub.hub.keep_freed_memory``
(freed memory kept: no page faults for the new state and sources of every step).
Target: 3e7 molecule-steps/s at n = 10^6.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from maxwellhub.hub import keep_freed_memory
from maxwellhub.models import create_model


def _timed(call, seconds: float) -> float:
    """Median ms per call over about ``seconds``."""
    call()
    times = []
    t_end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() >= t_end and len(times) >= 5:
            return statistics.median(times) * 1e3


def measure(n: int, seconds: float) -> tuple[float, float]:
    model = create_model("tls", n=n, omega=0.242, mu12=187.0, pe_initial=0.1)
    model.initialize(dt_au=0.5)
    fields = np.broadcast_to(np.array([1e-4, -2e-4, 3e-4]), (n, 3))
    step = _timed(lambda: model.step(fields), seconds)
    dip = getattr(model, "dipoles", None)
    if dip is None:  # before dipoles() existed: the extras path

        def dip():
            e = model.extras()
            return np.stack([e["mux_au"], e["muy_au"], e["muz_au"]], axis=1)

    return step, _timed(dip, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="1000,100000,1000000")
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    table(counts, args.seconds, "glibc's defaults")
    keep_freed_memory(max(counts))  # irreversible in this process: the second table
    table(counts, args.seconds, "after maxwellhub.hub.keep_freed_memory()")


def table(counts: list[int], seconds: float, title: str) -> None:
    print(f"\n{title}\n{'n':>9} {'step ms':>10} {'dipoles ms':>11} {'mol-steps/s':>13}")
    for n in counts:
        step, dip = measure(n, seconds)
        rate = n / ((step + dip) * 1e-3)
        print(f"{n:>9} {step:>10.4f} {dip:>11.4f} {rate:>13.3e}", flush=True)


if __name__ == "__main__":
    main()
