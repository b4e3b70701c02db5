"""The spectra a ``maxwellhub run`` plots from its recorded dipoles: the absorption
spectrum of a kicked molecule (which molecule, which kick, the dipole trajectory the
spectrum tool needs, read off the config and the history) and the IR spectrum of
molecular dynamics (the total dipole of the ``ase`` molecules); then the plot and the
summary figures.

A run records the molecules after every step, so its first record is at the end of the
first EM step ``D``, not at the kick (t = 0). The dipole before the kick is the quadratic
extrapolation of the first three records to t = 0: the induced dipole of a kick is a sum
of sines, so this costs an error of order ``D^3`` in the induced dipole, far below what
the plot shows (a kick at the start of the first step, as MaxwellLink's field kick, is
covered the same way).

This module reads configs and histories and writes one PNG; it never builds a model and
never runs a propagation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..spectrum import absorption_spectrum, fit_peaks
from .config import Config

__all__ = ["ir_response", "kick_response", "plot_ir", "plot_kick_spectrum"]

_KICKED_MODELS = ("rttddft",)


def kick_response(config: Config, history: dict[str, np.ndarray]) -> tuple[Any, ...] | None:
    """``(times, dipoles, kick)`` of the first kicked molecule of the run, or None.

    ``times`` (T + 1,) a.u. from the kick at 0, ``dipoles`` (T + 1, 3) a.u. with the
    extrapolated pre-kick dipole first, ``kick`` the impulse vector kappa e (a.u.): the
    model's ``kick_au`` (an impulse at t = 0) or ``kick_field_au`` held over the first
    step (an impulse of ``kick_field_au D``), along ``kick_direction``."""
    keys = ("time_au", "mux_au", "muy_au", "muz_au")
    if any(k not in history for k in keys) or len(history.get("step", ())) < 4:
        return None
    column = 0
    for group in config.molecules:
        size = len(group.positions)
        if group.model in _KICKED_MODELS:
            kick = _kick_vector(group.params, history["time_au"][:, column])
            if kick is not None:
                return _with_kick_time(history, column, kick)
        column += size
    return None


def _kick_vector(params: dict[str, Any], times: np.ndarray) -> np.ndarray | None:
    direction = np.asarray(params.get("kick_direction", (1.0, 1.0, 1.0)), dtype=np.float64)
    if direction.shape != (3,):  # one direction per molecule: take the first molecule's
        direction = direction.reshape(-1, 3)[0]
    impulse = float(np.ravel(params.get("kick_au", 0.0))[0])
    if impulse == 0.0:
        step = float(times[1] - times[0])
        impulse = float(np.ravel(params.get("kick_field_au", 0.0))[0]) * step
    if impulse == 0.0 or not direction.any():
        return None
    return impulse * direction


def _with_kick_time(history: dict[str, np.ndarray], column: int, kick: np.ndarray):
    times = np.asarray(history["time_au"][:, column], dtype=np.float64)
    dipoles = np.stack([history[k][:, column] for k in ("mux_au", "muy_au", "muz_au")], axis=1)
    step = float(times[1] - times[0])
    # quadratic extrapolation to t = times[0] - step = 0 from the first three records
    before = 3.0 * dipoles[0] - 3.0 * dipoles[1] + dipoles[2]
    return (
        np.concatenate(([times[0] - step], times)),
        np.concatenate((before[None, :], dipoles)),
        kick,
    )


def plot_kick_spectrum(path: str | os.PathLike, response: tuple[Any, ...], title: str) -> dict:
    """Compute the spectrum of ``response`` (from :func:`kick_response`), plot the dipole
    change and the spectrum with its fitted peaks, and return the summary figures:
    ``plot`` (the PNG path) and ``spectrum_peaks_ev`` / ``spectrum_relative_strengths``
    (the fitted lines between 1 and 40 eV with at least 1% of the strongest)."""
    from .output import plot_dipole_spectrum

    times, dipoles, kick = response
    spectrum = absorption_spectrum(times, dipoles, kick, omega_max=2.0)
    window = (1.0 / 27.211386245988, 40.0 / 27.211386245988)
    try:
        peaks = fit_peaks(spectrum, energy_range_au=window)
        energies, relative = peaks.energy_ev, peaks.relative
    except ValueError:  # a trajectory too short to resolve anything in the window
        energies, relative = [], []
    shown = spectrum.energy_ev <= 40.0
    plot = plot_dipole_spectrum(
        Path(path),
        times,
        dipoles - dipoles[0],
        spectrum.energy_ev[shown],
        spectrum.strength[shown],
        np.asarray(energies),
        title,
    )
    return {
        "plot": str(plot),
        "spectrum_peaks_ev": [round(e, 4) for e in energies],
        "spectrum_relative_strengths": [round(r, 4) for r in relative],
    }


_MD_MODELS = ("ase",)


def ir_response(config: Config, history: dict[str, np.ndarray]) -> tuple[Any, ...] | None:
    """``(dt, dipoles)`` of the run's molecular-dynamics molecules: the step (a.u.) and
    their total dipole (T, 3) per record, or None when the run has none (or too few
    records for a spectrum)."""
    keys = ("time_au", "mux_au", "muy_au", "muz_au")
    if any(k not in history for k in keys) or len(history.get("step", ())) < 16:
        return None
    columns: list[int] = []
    first = 0
    for group in config.molecules:
        size = len(group.positions)
        if group.model in _MD_MODELS:
            columns.extend(range(first, first + size))
        first += size
    if not columns:
        return None
    times = np.asarray(history["time_au"][:, columns[0]], dtype=np.float64)
    dipoles = np.stack([np.asarray(history[k])[:, columns].sum(axis=1) for k in keys[1:]], axis=1)
    return float(times[1] - times[0]), dipoles


def plot_ir(path: str | os.PathLike, response: tuple[Any, ...], title: str) -> dict:
    """The IR spectrum (velocity form, Hann window) of ``response`` (from
    :func:`ir_response`) between 400 and 4,500 cm^-1, its local maxima of at least 10% of
    the highest marked; returns ``plot`` and ``ir_peaks_cm1``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..ir import ir_spectrum

    dt, dipoles = response
    spectrum = ir_spectrum(dipoles, dt)
    k = spectrum.wavenumber_cm
    shown = (k >= 400.0) & (k <= 4500.0)
    k, y = k[shown], spectrum.intensity[shown]
    inner = (y[1:-1] > y[:-2]) & (y[1:-1] >= y[2:]) & (y[1:-1] >= 0.1 * y.max())
    peaks = k[1:-1][inner]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot(k, y / y.max(), color="black", lw=1.2, label="total dipole, velocity form")
    for j, peak in enumerate(peaks):
        ax.axvline(peak, color="tab:red", lw=0.8, ls="--", label="peaks" if j == 0 else None)
    ax.set_xlabel("wavenumber (cm$^{-1}$)")
    ax.set_ylabel("IR intensity (normalised)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return {"plot": str(out), "ir_peaks_cm1": [round(float(p), 1) for p in peaks]}
