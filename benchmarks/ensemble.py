"""Ensemble throughput: molecule-steps per second through the hub and ensemble drivers.

    .venv/bin/python benchmarks/ensemble.py [--counts 1000,10000,100000,1000000]
                                            [--drivers 1,2] [--seconds 2] [--repeats 3]

M TLS molecules hosted by K `maxwellhub-driver --molecules M/K` processes (batched frames,
UNIX socket), stepped by `SocketHub.step_arrays` with extras off (what a Meep run does
between recorded steps) and, in a second row, with every step's extras arrays. The hub
runs in this process pinned to core 0, the drivers on core 1. Reports molecule-steps/s,
ms per step, and CPU ms per step of the hub and of the drivers (medians of --repeats).
Target: at least 1e7 molecule-steps/s on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from _common import can_pin, cpu_seconds, median, pin_to

from maxwellhub import SocketHub
from maxwellhub.run.launch import driver_command, driver_env, reap

TARGET = 1e7


def measure(m: int, k: int, seconds: float, repeats: int, extras: bool) -> dict:
    import subprocess

    name = f"bench_ens_{os.getpid()}"
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
        rng = np.random.default_rng(0)
        fields = [1e-3 * rng.standard_normal((m, 3)) for _ in range(4)]
        for s in range(3):
            hub.step_arrays(ids, fields[s % 4], extras=extras)
        rates, walls, hub_cpu, drv_cpu = [], [], [], []
        for _ in range(repeats):
            d0 = sum(cpu_seconds(p.pid) for p in procs)
            h0 = time.process_time()
            t0 = time.perf_counter()
            steps = 0
            while True:
                hub.step_arrays(ids, fields[steps % 4], extras=extras)
                steps += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds and steps >= 3:
                    break
            rates.append(steps * m / elapsed)
            walls.append(elapsed / steps * 1e3)
            hub_cpu.append((time.process_time() - h0) / steps * 1e3)
            drv_cpu.append((sum(cpu_seconds(p.pid) for p in procs) - d0) / steps * 1e3)
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
    parser.add_argument("--counts", default="1000,10000,100000,1000000")
    parser.add_argument("--drivers", default="1,2")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.counts, args.drivers, args.seconds, args.repeats = "1000,100000", "1", 0.3, 1
    if can_pin():
        os.sched_setaffinity(0, {0})  # the hub on core 0, the drivers on core 1
    print(
        "| M molecules | drivers | extras | molecule-steps/s | ms/step | hub CPU ms/step "
        "| drivers CPU ms/step |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|")
    best = 0.0
    for m in [int(c) for c in args.counts.split(",")]:
        for k in [int(d) for d in args.drivers.split(",")]:
            for extras in (False, True):
                r = measure(m, k, args.seconds, args.repeats, extras)
                best = max(best, r["rate"])
                print(
                    f"| {m:,} | {k} | {'every step' if extras else 'off'} | "
                    f"{r['rate']:.3g} | {r['wall']:.3f} | {r['hub']:.3f} | "
                    f"{r['drivers']:.3f} |",
                    flush=True,
                )
    verdict = "met" if best >= TARGET else "NOT met"
    print(
        f"\n- best throughput {best:.3g} molecule-steps/s, target >= {TARGET:.0e}: "
        f"{verdict} (ratio {best / TARGET:.2f})"
    )


if __name__ == "__main__":
    main()
