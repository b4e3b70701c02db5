"""A cavity's step through the hub: one field for all, every molecule's source and dipole.

    .venv/bin/python benchmarks/ensemble_dipoles.py [--counts 1000,100000,1000000]
                                                    [--drivers 1,2] [--seconds 2]
                                                    [--repeats 3] [--record-every 100]

M TLS molecules hosted by K `maxwellhub-driver --molecules M/K` ensemble processes
(batched frames, UNIX socket), stepped by `SocketHub.step_arrays` with one 3-vector field
broadcast to (M, 3) and ``extras=False, dipoles=True`` (MXHFIELDS flag WANT_DIPOLES: the
sources and the mux/muy/muz arrays only), every --record-every'th step with all extras
(what a run records). The dipoles are read off every result, as a cavity mode would.
The hub runs in this process pinned to core 0, the drivers on core 1. Reports
molecule-steps/s, ms per step, and CPU ms per step of the hub and of the drivers
(medians of --repeats). Target: at least 1e7 molecule-steps/s at M = 10^6.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

import numpy as np
from _common import can_pin, cpu_seconds, median, pin_to

from maxwellhub import SocketHub
from maxwellhub.run.launch import driver_command, driver_env, reap

TARGET = 1e7
DIPOLE_KEYS = ("mux_au", "muy_au", "muz_au")


def measure(m: int, k: int, seconds: float, repeats: int, record_every: int) -> dict:
    name = f"bench_dip_{os.getpid()}"
    hub = SocketHub(unixsocket=name, timeout=120)
    ids = np.arange(m)
    for mid in ids.tolist():
        hub.register_molecule(mid)
    per = m // k
    procs = []
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as params:
        json.dump({"omega": 0.242, "mu12": 187.0, "pe_initial": 0.1}, params)
    try:
        for _ in range(k):
            argv = driver_command(
                "tls",
                None,
                unix=name,
                timeout=60,
                extra_args=["--molecules", str(per), "--params-file", params.name],
            )
            procs.append(subprocess.Popen(argv, env=driver_env(), preexec_fn=pin_to(1)))
        if not hub.wait_until_bound({int(i): {"dt_au": 0.5} for i in ids}, timeout=120):
            raise SystemExit(f"ensemble drivers for M = {m} did not bind")
        steps = 0
        mu = 0.0

        def step() -> None:
            nonlocal steps, mu
            e = 1e-3 * np.sin(0.05 * steps) * np.array([0.0, 0.3, 1.0])
            record = steps % record_every == 0
            result = hub.step_arrays(ids, np.broadcast_to(e, (m, 3)), extras=record, dipoles=True)
            extras = result.extras()
            mu = float(sum(extras[key].sum() for key in DIPOLE_KEYS))  # the cavity's sum
            steps += 1

        for _ in range(3):
            step()
        rates, walls, hub_cpu, drv_cpu = [], [], [], []
        for _ in range(repeats):
            d0 = sum(cpu_seconds(p.pid) for p in procs)
            h0 = time.process_time()
            t0 = time.perf_counter()
            s0 = steps
            while True:
                step()
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds and steps - s0 >= 3:
                    break
            done = steps - s0
            rates.append(done * m / elapsed)
            walls.append(elapsed / done * 1e3)
            hub_cpu.append((time.process_time() - h0) / done * 1e3)
            drv_cpu.append((sum(cpu_seconds(p.pid) for p in procs) - d0) / done * 1e3)
        assert np.isfinite(mu)
    finally:
        hub.stop()
        reap(procs, 10)
        os.unlink(params.name)
    return {
        "rate": median(rates),
        "wall": median(walls),
        "hub": median(hub_cpu),
        "drivers": median(drv_cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,100000,1000000")
    parser.add_argument("--drivers", default="1,2")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record-every", type=int, default=100)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.counts, args.drivers, args.seconds, args.repeats = "1000,100000", "1", 0.3, 1
    if can_pin():
        os.sched_setaffinity(0, {0})  # the hub on core 0, the drivers on core 1
    print(
        "| M molecules | drivers | molecule-steps/s | ms/step | hub CPU ms/step "
        "| drivers CPU ms/step |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    at_max = 0.0
    counts = [int(c) for c in args.counts.split(",")]
    for m in counts:
        for k in [int(d) for d in args.drivers.split(",")]:
            r = measure(m, k, args.seconds, args.repeats, args.record_every)
            if m == max(counts):
                at_max = max(at_max, r["rate"])
            print(
                f"| {m:,} | {k} | {r['rate']:.3g} | {r['wall']:.3f} | {r['hub']:.3f} | "
                f"{r['drivers']:.3f} |",
                flush=True,
            )
    verdict = "met" if at_max >= TARGET else "NOT met"
    print(
        f"\n- at M = {max(counts):,}: {at_max:.3g} molecule-steps/s, target >= "
        f"{TARGET:.0e}: {verdict} (ratio {at_max / TARGET:.2f})"
    )


if __name__ == "__main__":
    main()
