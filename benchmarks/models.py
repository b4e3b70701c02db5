"""Milliseconds per EM step of every model, embedded and behind a socket driver.

    .venv/bin/python benchmarks/models.py [--steps 200]

Each row is one molecule (n = 1) with small parameters, stepped under a weak oscillating
field: embedded (``model.step`` in this process) and through ``maxwellhub-driver`` over a
UNIX socket (``SocketHub.step_arrays``, extras every step, as ``maxwellhub run`` records
them). The EM step is the model's natural one: 0.2067 a.u. (2D Meep, resolution 10, tau =
0.1 fs) for the electronic and spin models, 20.67 a.u. (tau = 10 fs) for molecular
dynamics. Medians of three runs; the first ten steps of each run are a warm-up.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402  (the thread pinning above must come first)
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from maxwellhub import SocketHub  # noqa: E402
from maxwellhub.models import create_model  # noqa: E402
from maxwellhub.run.launch import reap, start_driver  # noqa: E402

H2O = "O 0 0 0.1173; H 0 0.7572 -0.4692; H 0 -0.7572 -0.4692"
BUILD_TLS = str(ROOT / "examples" / "models" / "build_tls.py")
CASES: list[tuple[str, str, dict, float]] = [
    ("tls", "tls", {}, 0.2067),
    ("sho", "sho", {}, 0.2067),
    (
        "rttddft H2O/STO-3G HF (2 sub-steps)",
        "rttddft",
        {"atoms": H2O, "dt_substep_au": 0.1},
        0.2067,
    ),
    (
        "rttddft H2O/STO-3G LDA grid 0",
        "rttddft",
        {"atoms": H2O, "xc": "lda", "grid_level": 0, "dt_substep_au": 0.1},
        0.2067,
    ),
    ("qutip TLS preset", "qutip", {"preset": "tls"}, 0.2067),
    (
        "qutip build_model file + dephasing",
        "qutip",
        {"preset": "custom", "module": BUILD_TLS, "gamma_dephase": 1e-3},
        0.2067,
    ),
    (
        "ase Morse diatomic",
        "ase",
        {"calculator": "morse", "charges": "0.3 -0.3", "initial_temperature_K": 0.0},
        20.67,
    ),
    ("ase flexible water", "ase", {"calculator": "water", "initial_temperature_K": 300.0}, 20.67),
]


def fields(steps: int) -> np.ndarray:
    t = np.arange(steps)
    return 1e-4 * np.stack([np.sin(0.1 * t), np.cos(0.07 * t), np.sin(0.05 * t)], axis=1)


def embedded_ms(model: str, params: dict, dt: float, steps: int) -> float:
    runs = []
    for _ in range(3):
        m = create_model(model, **params)
        m.initialize(dt_au=dt)
        f = fields(steps + 10)
        for k in range(10):
            m.step(f[k : k + 1])
        t0 = time.perf_counter()
        for k in range(10, steps + 10):
            m.step(f[k : k + 1])
            m.extras_of(0)
        runs.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(runs)


def socket_ms(model: str, params: dict, dt: float, steps: int) -> float:
    runs = []
    for _ in range(3):
        name = f"mxhbench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        hub = SocketHub(unixsocket=name)
        driver = start_driver(model, params, unix=name)
        try:
            hub.watch_processes([driver])
            if not hub.wait_until_bound({0: {"dt_au": dt}}):
                raise RuntimeError(f"the {model} driver did not bind")
            f = fields(steps + 10)
            ids = np.array([0])
            for k in range(10):
                hub.step_arrays(ids, f[k : k + 1])
            t0 = time.perf_counter()
            for k in range(10, steps + 10):
                hub.step_arrays(ids, f[k : k + 1])
            runs.append((time.perf_counter() - t0) / steps * 1e3)
        finally:
            hub.stop()
            reap([driver], 10.0)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per run")
    args = parser.parse_args()
    print(
        f"models, ms per EM step, n = 1, {args.steps} steps, median of 3; "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores\n"
    )
    print("| model | EM step (a.u.) | embedded (ms) | socket driver (ms) |")
    print("|---|---:|---:|---:|")
    for label, model, params, dt in CASES:
        emb = embedded_ms(model, params, dt, args.steps)
        sock = socket_ms(model, params, dt, args.steps)
        print(f"| {label} | {dt:g} | {emb:.3f} | {sock:.3f} |", flush=True)


if __name__ == "__main__":
    main()
