"""What a run leaves behind: the HDF5 file of per-step molecule data, the population plot,
and progress lines while it runs.

HDF5 layout (one dataset per quantity; rows are recorded steps, columns molecules)::

    /molecule_id   (M,)    int64
    /step          (T,)    int64     Meep time-step index of each record
    /time_meep     (T,)    float64   attrs: units = "Meep time (tau fs)"
    /<key>         (T, M)  float64   every extras key (Pe, Pg, time_au, energy_au, mux_au, ...)
    attrs on /: complete (bool), time_units_fs, config (TOML text), and the run summary

Each dataset carries a ``units`` attribute. The file is written to a temporary name and
renamed, so a reader never sees half a file; on failure the runner writes what exists.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["UNITS", "Progress", "plot_dipole_spectrum", "plot_populations", "write_history"]

log = logging.getLogger("maxwellhub.run")

UNITS = {
    "molecule_id": "1",
    "step": "1",
    "time_meep": "Meep time unit (tau fs)",
    "time_au": "a.u. of time",
    "energy_au": "Hartree",
    "mux_au": "e a0",
    "muy_au": "e a0",
    "muz_au": "e a0",
    "mux_m_au": "e a0",
    "muy_m_au": "e a0",
    "muz_m_au": "e a0",
    "Pe": "1 (population)",
    "Pg": "1 (population)",
    "Pge_real": "1",
    "Pge_imag": "1",
    "p_au": "a.u. of momentum (unit mass)",
    "q_au": "a.u. of length (unit mass)",
}


def write_history(
    path: str | os.PathLike, history: Mapping[str, np.ndarray], attrs: Mapping[str, object]
) -> Path:
    """Write ``history`` (from :meth:`MeepCoupling.history`) and ``attrs`` to HDF5."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as f:
        for key, value in history.items():
            ds = f.create_dataset(key, data=np.asarray(value))
            ds.attrs["units"] = UNITS.get(key, "see the model's documentation")
        for key, attr in attrs.items():
            f.attrs[key] = attr if isinstance(attr, (str, bool, int, float)) else json.dumps(attr)
    os.replace(tmp, path)
    return path


def plot_populations(
    path: str | os.PathLike,
    time_meep: np.ndarray,
    pe: np.ndarray,
    analytic: np.ndarray | None,
    title: str,
) -> Path:
    """Excited populations (one line per molecule, at most 20) against the analytic
    curve when there is one; PNG via matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    shown = pe[:, : min(pe.shape[1], 20)]
    for j in range(shown.shape[1]):
        ax.plot(
            time_meep,
            shown[:, j],
            lw=2.2 if j == 0 else 1.0,
            color="tab:blue",
            alpha=1.0 if j == 0 else 0.4,
            label="simulated (maxwellhub + Meep)" if j == 0 else None,
        )
    if analytic is not None:
        ax.plot(time_meep, analytic, "--", color="tab:red", lw=1.6, label="analytic (golden rule)")
    ax.set_xlabel("time (Meep units)")
    ax.set_ylabel("excited population $P_e$")
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_dipole_spectrum(
    path: str | os.PathLike,
    time_au: np.ndarray,
    dipole: np.ndarray,
    energy_ev: np.ndarray,
    spectrum: np.ndarray,
    peaks_ev: np.ndarray,
    title: str,
) -> Path:
    """Two panels: the dipole change of molecule 0 against time (a.u.), and the absorption
    spectrum with its peaks marked; PNG via matplotlib's Agg backend.

    ``dipole`` is (T, 3): mu(t) - mu(0) of the molecule; ``spectrum`` is S(E) on
    ``energy_ev`` (arbitrary units, >= 0 where the physics is right: it is not abs()'d).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.0), dpi=110)
    for k, (axis, color) in enumerate(
        zip("xyz", ("tab:blue", "tab:orange", "tab:green"), strict=True)
    ):
        top.plot(time_au, dipole[:, k], lw=1.0, color=color, label=f"$\\mu_{axis}$")
    top.set_xlabel("time (a.u.)")
    top.set_ylabel("$\\mu(t) - \\mu(0)$ (e $a_0$)")
    top.set_title(title, fontsize=10)
    top.legend(loc="upper right", fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(energy_ev, spectrum, color="black", lw=1.2, label="RT spectrum")
    for j, peak in enumerate(peaks_ev):
        bottom.axvline(peak, color="tab:red", lw=0.8, ls="--", label="peaks" if j == 0 else None)
    bottom.set_xlabel("photon energy (eV)")
    bottom.set_ylabel("absorption $S(E)$ (arb. units)")
    bottom.legend(loc="upper right", fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


class Progress:
    """Progress of a run: on an interactive terminal (``stream`` a TTY, default stderr) a
    live bar redrawn in place at most 5 times a second (steps, steps/s, time left); in
    batch jobs (no TTY) a log line every ``every`` seconds of wall time. One clock read per
    step either way; ``sim.run(..., progress.step_function(), ...)`` or :meth:`tick`."""

    def __init__(
        self, total_steps: int, every: float = 10.0, logger=log, stream=None, bar: bool = True
    ) -> None:
        self.total = max(int(total_steps), 1)
        self.every = every
        self.log = logger
        self.start: float | None = None
        self.next_report: float | None = None
        self.steps = 0
        self.last: float | None = None  # the clock at the last tick
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.live = bar and bool(isatty and isatty()) and os.environ.get("MAXWELLHUB_NO_BAR") != "1"
        if self.live:
            self.every = 0.2

    def step_function(self):
        """A plain function for ``sim.run`` (Meep inspects step functions' code)."""

        def maxwellhub_progress(sim) -> None:
            self.tick()

        return maxwellhub_progress

    def tick(self) -> None:
        now = self.last = time.monotonic()
        self.steps += 1
        if self.start is None or self.next_report is None:  # set together, at the first tick
            self.start, self.next_report = now, now + self.every
            return
        if now >= self.next_report or (self.live and self.steps >= self.total):
            self.next_report = now + self.every
            if self.live:
                self.draw(now)
            else:
                self.log.info("%s", self.line(now))

    def draw(self, now: float | None = None, width: int = 30) -> None:
        """Redraw the bar on the terminal (carriage return, no newline until the end)."""
        done = min(self.steps / self.total, 1.0)
        filled = round(width * done)
        bar = "#" * filled + "." * (width - filled)
        end = "\n" if self.steps >= self.total else ""
        self.stream.write(f"\r[{bar}] {self.line(now)}\033[K{end}")
        self.stream.flush()

    def line(self, now: float | None = None) -> str:
        """Steps, steps/s and time left, as of ``now`` (default: the last step)."""
        if now is None:
            now = self.last if self.last is not None else time.monotonic()
        elapsed = max(now - (self.start or now), 1e-9)
        rate = (self.steps - 1) / elapsed  # the clock starts at the end of the first step
        left = max(self.total - self.steps, 0) / rate if rate > 0 else float("inf")
        return (
            f"step {self.steps}/{self.total} ({100 * self.steps / self.total:.0f}%), "
            f"{rate:.0f} steps/s, about {left:.0f} s left"
        )
