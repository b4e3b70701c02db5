"""A hub and a few local drivers exchanging fields and sources, with no Meep involved.

``maxwellhub demo`` runs it: it shows that the transport works on this machine and prints
what went over the wire each step.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import numpy as np

from .hub import SocketHub
from .run.launch import reap, start_driver

__all__ = ["run_demo"]


def run_demo(
    molecules: int = 2,
    steps: int = 5,
    transport: str = "unix",
    dt_au: float = 0.5,
    amplitude: float = 1e-3,
    out=print,
) -> dict:
    """Start a hub and ``molecules`` TLS drivers, run ``steps`` barrier steps with a
    sinusoidal field, print the exchanged values and return a summary."""
    omega = 0.242
    if transport == "unix":
        name = f"demo_{os.getpid()}"
        hub = SocketHub(unixsocket=name, timeout=30)
        where: dict[str, Any] = {"unix": name}
    elif transport == "tcp":
        hub = SocketHub(host="127.0.0.1", port=0, timeout=30)
        where = {"host": "127.0.0.1", "port": hub.port}
    else:
        raise ValueError(f"transport must be 'unix' or 'tcp', not {transport!r}")
    procs = []
    t0 = time.perf_counter()
    with hub:
        ids = [hub.register_molecule_return_id() for _ in range(molecules)]
        for _ in ids:
            procs.append(
                start_driver(
                    "tls", {"omega": omega, "mu12": 187.0, "pe_initial": 0.1}, timeout=30, **where
                )
            )
        if not hub.wait_until_bound({m: {"dt_au": dt_au} for m in ids}, timeout=30):
            reap(procs, 2)
            raise SystemExit("demo: drivers did not connect within 30 s")
        out(f"hub on {hub.address}; {molecules} tls drivers bound as molecules {ids}")
        out(
            f"{'step':>4} {'mol':>3} {'Ez sent (a.u.)':>15} {'dmu_z/dt back (a.u.)':>21} {'Pe':>10}"
        )
        last = {}
        for step in range(steps):
            ez = amplitude * math.sin(omega * dt_au * step)
            results = hub.step({m: {"efield_au": np.array([0.0, 0.0, ez])} for m in ids})
            for m in ids:
                extra = json.loads(results[m]["extra"])
                out(
                    f"{step:>4} {m:>3} {ez:>15.6e} {results[m]['amp'][2]:>21.9e} "
                    f"{extra['Pe']:>10.7f}"
                )
                last[m] = extra
    codes = reap(procs, 5)
    summary = {
        "molecules": molecules,
        "steps": steps,
        "transport": transport,
        "driver_exit_codes": codes,
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    out(json.dumps(summary))
    return summary
