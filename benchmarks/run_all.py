"""Run every benchmark and print all their tables (see benchmarks/README.md).

    .venv/bin/python benchmarks/run_all.py [--quick]

In order: hub barrier throughput (hub_throughput.py), real drivers (drivers.py),
ensemble throughput (ensemble.py), relays vs direct connections (relay.py), Meep
coupling (meep_coupling.py), and Meep coupling side by side with MaxwellLink's adaptor
(meep_maxwelllink.py). Each script runs as
its own process with BLAS pinned to one thread; its output is passed through as it
comes. --quick makes every part smaller and shorter (rough numbers, for checking that
everything runs). Exit status 1 if a part fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from _common import HERE, child_env, machine

FULL: dict[str, list[str]] = {
    "hub_throughput.py": [],
    "drivers.py": [],
    "ensemble.py": [],
    "relay.py": [],
    "meep_coupling.py": [],
    "meep_maxwelllink.py": [],
}
QUICK = {
    "hub_throughput.py": ["--quick"],
    "drivers.py": ["--quick"],
    "ensemble.py": ["--quick"],
    "relay.py": ["--quick"],
    "meep_coupling.py": [
        "--counts",
        "0,1,100",
        "--sigmas",
        "0.1",
        "--socket-counts",
        "1",
        "--ensemble-counts",
        "1000",
        "--steps",
        "100",
        "--repeat",
        "1",
    ],
    "meep_maxwelllink.py": ["--counts", "1,10", "--steps", "50", "--repeat", "1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and short (rough numbers)")
    args = parser.parse_args()
    parts = QUICK if args.quick else FULL
    print(f"# maxwellhub benchmarks{' (--quick)' if args.quick else ''}\n")
    print(f"- machine: {machine()}")
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(
        f"- command: {sys.executable} benchmarks/run_all.py{' --quick' if args.quick else ''}",
        flush=True,
    )
    failed = []
    for script, extra in parts.items():
        print(f"\n## {script} {' '.join(extra)}\n", flush=True)
        t0 = time.monotonic()
        code = subprocess.call([sys.executable, str(HERE / script), *extra], env=child_env())
        print(f"\n({script}: {time.monotonic() - t0:.0f} s, exit status {code})", flush=True)
        if code != 0:
            failed.append(script)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
