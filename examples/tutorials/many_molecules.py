"""Many molecules three ways: embedded, in ensemble drivers, and behind a relay.

N resonant two-level systems (omega = 0.242 Hartree, mu12 = 187 a.u., along z, each
weakly excited, pe_initial = 1e-6) in one cavity mode (dipole gauge with the dipole
self-energy, no damping, dt 0.5 a.u., 4,000 steps), the coupling scaled as 1/sqrt(N) so
that g sqrt(N) = 0.05 omega_c whatever N: the cavity coordinate beats between the two
polaritons sqrt(omega^2 + g^2 N) -/+ g sqrt(N), split by exactly 2 g sqrt(N). The same run
is done (1) with the molecules embedded in this process, (2) through a SocketHub with two
ensemble driver processes of N/2 molecules each, and (3) with the same two ensemble
drivers behind one `maxwellhub relay`, which speaks to the hub over one connection. The
three q_c(t) agree to rounding; the JSON gives each way's wall time and ms per step.

    python examples/tutorials/many_molecules.py [--short] [--out DIR]
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tutorial as tut

from maxwellhub import SocketHub
from maxwellhub.em import EngineCoupling, SingleModeCavity
from maxwellhub.ir import ir_spectrum
from maxwellhub.rabi import rabi_splitting_from_trajectory
from maxwellhub.run.launch import driver_command, driver_env, reap

NAME = "many_molecules"
OMEGA, MU12, DT, STEPS, RATIO = 0.242, 187.0, 0.5, 4000, 0.05  # RATIO: g sqrt(N) / omega_c
TLS: dict[str, Any] = {"omega": OMEGA, "mu12": MU12, "orientation": 2, "pe_initial": 1e-6}
DRIVERS = 2  # ensemble driver processes, N/2 molecules each
TIMEOUT = 120.0  # s: drivers and the relay give up when the hub or the drivers never come
WAYS = ("embedded", "ensembles", "relay")


def cavity(n: int) -> SingleModeCavity:
    """The mode, with eps such that g sqrt(N) = RATIO omega_c (g = eps mu12 / sqrt(2 omega_c))."""
    eps = RATIO * OMEGA * math.sqrt(2 * OMEGA) / (MU12 * math.sqrt(n))
    return SingleModeCavity(
        frequency_au=OMEGA,
        damping_au=0.0,
        coupling_strength=eps,
        coupling_axis="z",
        include_dse=True,
        gauge="dipole",
    )


def ensembles(n: int, unix: str, params: Path) -> list[subprocess.Popen]:
    """DRIVERS `maxwellhub-driver --model tls --molecules M` processes hosting n molecules."""
    per = -(-n // DRIVERS)
    return [
        subprocess.Popen(
            driver_command(
                "tls",
                None,
                unix=unix,
                timeout=TIMEOUT,
                extra_args=["--molecules", str(min(per, n - k)), "--params-file", str(params)],
            ),
            env=driver_env(),
            stdin=subprocess.DEVNULL,
        )
        for k in range(0, n, per)
    ]


def relay(n: int, upstream: str, listen: str) -> subprocess.Popen:
    """`maxwellhub relay` hosting n molecules: local drivers on ``listen``, the hub on
    ``upstream``. Its drivers may be started at once (they retry until it listens)."""
    exe = Path(sys.executable).with_name("maxwellhub")
    argv = [str(exe), "relay", "--molecules", str(n), "--unix", upstream]
    return subprocess.Popen(
        [*argv, "--listen-unix", listen, "--timeout", str(TIMEOUT)],
        env=driver_env(),
        stdin=subprocess.DEVNULL,
    )


def run(way: str, n: int, out: Path) -> dict[str, Any]:
    """One way: q_c(t), the wall seconds of it all (drivers' start included) and the
    milliseconds per step of the stepping alone."""
    started = time.perf_counter()
    hub, procs = None, []
    try:
        if way != "embedded":
            params = out / "tls.json"
            params.write_text(json.dumps(TLS))
            unix = f"mxh_many_{os.getpid()}"
            hub = SocketHub(unixsocket=unix)
            if way == "relay":
                procs = [relay(n, unix, f"{unix}_r")]
                unix = f"{unix}_r"
            procs += ensembles(n, unix, params)
        coupling = EngineCoupling(cavity(n), DT, hub=hub, record_every=0)
        if hub is None:
            coupling.add_molecules("tls", n=n, **TLS)
        else:
            coupling.add_socket_molecules(n=n)
            coupling.run(steps=1)  # waits for the drivers: not part of ms per step
        stepping = time.perf_counter()
        coupling.run(steps=STEPS - coupling.step_index)
        per_step = (time.perf_counter() - stepping) / (STEPS - 1 if hub else STEPS)
    finally:
        if hub is not None:
            hub.stop()
        codes = reap(procs, 30.0)
    if any(codes):
        raise RuntimeError(f"{way}: driver or relay exit codes {codes}")
    qc = coupling.history()["engine/qc_au"][:, 2]
    return {"qc": qc, "wall_s": time.perf_counter() - started, "ms_per_step": 1e3 * per_step}


def main() -> None:
    args = tut.parse_args(__doc__, f"out/tutorials/{NAME}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    n = 1000 if args.short else 10000

    runs = {way: run(way, n, out) for way in WAYS}
    gn = RATIO * OMEGA
    centre = math.sqrt(OMEGA**2 + gn**2)
    ref = runs["embedded"]["qc"]
    summary: dict[str, Any] = {
        "molecules": n,
        "ensemble_drivers": DRIVERS,
        "steps": STEPS,
        "dt_au": DT,
        "g_sqrt_n_au": gn,
        "expected_splitting_au": 2 * gn,
        "expected_polaritons_au": [centre - gn, centre + gn],
    }
    for way, result in runs.items():
        fit = rabi_splitting_from_trajectory(result["qc"], DT)
        summary[way] = {
            "wall_s": round(result["wall_s"], 2),
            "ms_per_step": result["ms_per_step"],
            "rabi_splitting_au": fit.splitting,
            "polaritons_au": [fit.lower, fit.upper],
            "relative_error_vs_expected": fit.splitting / (2 * gn) - 1,
        }
    summary["max_qc_relative_difference"] = max(
        float(np.abs(runs[way]["qc"] - ref).max() / np.abs(ref).max()) for way in WAYS[1:]
    )
    summary["plot"] = f"{NAME}.png"
    plot(out / f"{NAME}.png", {way: r["qc"] for way, r in runs.items()}, n, centre, gn)
    tut.write_summary(out, NAME, summary, started)


def plot(path: Path, qcs: dict[str, np.ndarray], n: int, centre: float, gn: float) -> None:
    """q_c(t) of the three ways overlaid, and |spectrum| with the expected polaritons."""
    plt = tut.figure()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6))
    t = DT * np.arange(1, STEPS + 1)
    styles = {"embedded": "-", "ensembles": "--", "relay": ":"}
    for way, qc in qcs.items():
        top.plot(t, qc, styles[way], lw=1.0, label=way)
        spec = ir_spectrum(qc, DT, form="dipole", window="none")
        keep = (spec.omega > 0.6 * OMEGA) & (spec.omega < 1.4 * OMEGA)
        amp = np.sqrt(spec.intensity[keep])
        bottom.plot(spec.omega[keep], amp / amp.max(), styles[way], lw=1, label=way)
    top.set(xlabel="time (a.u.)", ylabel="$q_c$ (a.u.)", title=f"{n:,} TLS in a cavity mode")
    amax = max(float(np.abs(qc).max()) for qc in qcs.values())
    top.set_ylim(-1.1 * amax, 1.5 * amax)
    top.legend(loc="upper center", ncol=3, fontsize=8)
    for i, w in enumerate((centre - gn, centre + gn)):
        bottom.axvline(
            w,
            color="k",
            ls="-.",
            lw=0.7,
            label="$\\sqrt{\\omega^2+g^2N} \\mp g\\sqrt{N}$" if i == 0 else None,
        )
    bottom.set(xlabel="frequency (Hartree)", ylabel="|FFT($q_c$)| (normalised)")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
