"""What ``maxwellhub run`` reports and plots for the non-Meep engines.

- ``cavity``: the spectrum of the cavity coordinate q_c(t) along its first coupled axis
  with the two polariton peaks fitted (:func:`maxwellhub.rabi.rabi_splitting_from_trajectory`)
  and, when every molecule is an identical ``tls`` or ``sho`` on resonance and on the
  cavity's axis, the expected splitting 2 g sqrt(N) (:func:`expected_cavity_splitting`;
  exact with the dipole self-energy and in the velocity gauge, to
  O((g sqrt(N)/omega_c)^2) without it).
  Written to ``cavity.png``; the summary line gets ``rabi_splitting_au``,
  ``expected_splitting_au``, ``polaritons_au``.
- ``multimode``: each mode's energy against time (``modes.png``).
- ``laser``: the field at the first molecule and the excited populations (``laser.png``).

Plots use matplotlib's Agg backend; the numbers come from :mod:`maxwellhub.rabi`. This
module reads the coupling's history and the config, nothing else.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["engine_summary", "expected_cavity_splitting"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def expected_cavity_splitting(config) -> float | None:
    """2 g sqrt(N) for N identical molecules on resonance with the cavity and on its
    coupled axis (rescaling 1): ``tls`` (g = eps mu12 / sqrt(2 omega_c)) or ``sho``
    (transition dipole mu0 / sqrt(2 omega_0), so g = eps mu0 / (2 omega_c)); else None."""
    from maxwellhub.models import get_model_class

    params = config.em.params
    axes = str(params.get("coupling_axis", "xy")).lower()
    omega_c = float(params["frequency_au"])
    eps = float(params.get("coupling_strength", 1.0))
    transition = {
        "tls": lambda p: float(p["mu12"]),
        "sho": lambda p: float(p["mu0"]) / math.sqrt(2.0 * float(p["omega"])),
    }
    dipoles = set()
    count = 0
    for g in config.molecules:
        cls = get_model_class(g.model)
        if cls.name not in transition or g.rescaling != 1.0:
            return None
        p = dict({k: q.default for k, q in cls.parameters.items()}, **g.params)
        keys = ("omega", "orientation", "mu12" if cls.name == "tls" else "mu0")
        if any(np.ndim(p[k]) for k in keys) or "xyz"[int(p["orientation"])] not in axes:
            return None
        if abs(float(p["omega"]) - omega_c) > 1e-12 * omega_c:  # off resonance
            return None
        dipoles.add(transition[cls.name](p))
        count += len(g.positions)
    if len(dipoles) != 1:
        return None
    g_one = eps * dipoles.pop() / math.sqrt(2.0 * omega_c)
    return 2.0 * g_one * math.sqrt(count)


def engine_summary(config, history: dict[str, np.ndarray], out_dir: Path, plot: bool) -> dict:
    """The engine's entries of the summary line (and its plot when ``plot``)."""
    engine = config.em.engine
    if engine == "cavity":
        return _cavity(config, history, out_dir, plot)
    if engine == "multimode":
        return _multimode(config, history, out_dir, plot)
    if engine == "laser":
        return _laser(config, history, out_dir, plot)
    return {}


def _cavity(config, history, out_dir: Path, plot: bool) -> dict[str, Any]:
    from ..ir import ir_spectrum
    from ..rabi import rabi_splitting_from_trajectory

    qc = history.get("engine/qc_au")
    if qc is None or len(qc) < 64:
        return {}
    dt = float(config.simulation.dt_au)
    axes = str(config.em.params.get("coupling_axis", "xy")).lower()
    k = "xyz".index(axes[0])
    trace = qc[:, k]
    out: dict[str, Any] = {}
    expected = expected_cavity_splitting(config)
    fit = None
    try:
        fit = rabi_splitting_from_trajectory(trace, dt)
    except (ValueError, RuntimeError) as exc:  # one peak, too short: no fit, still a plot
        out["rabi_fit_error"] = str(exc)
    if fit is not None:
        out["rabi_splitting_au"] = float(f"{fit.splitting:.8g}")
        out["polaritons_au"] = [float(f"{fit.lower:.8g}"), float(f"{fit.upper:.8g}")]
    if expected is not None:
        out["expected_splitting_au"] = float(f"{expected:.8g}")
        if fit is not None:
            out["splitting_relative_error"] = float(f"{abs(fit.splitting / expected - 1):.3e}")
    if not plot:
        return out
    # a gentle window for the picture (the fit uses its own, exact line shapes)
    fine = fit.splitting / 200 if fit is not None else None
    spec = ir_spectrum(
        trace, dt, form="dipole", window="exponential", tau=len(trace) * dt / 2, resolution=fine
    )
    omega_c = float(config.em.params["frequency_au"])
    if fit is not None:  # the polaritons and as much again either side
        span = max(fit.splitting, 1e-3 * omega_c)
        near = (spec.omega > fit.lower - 1.5 * span) & (spec.omega < fit.upper + 1.5 * span)
    else:
        near = (spec.omega > 0.5 * omega_c) & (spec.omega < 1.5 * omega_c)
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.4, 6.4), dpi=110)
    t = history["engine/time_au"]
    ax1.plot(t, trace, lw=0.8)
    ax1.set_xlabel("time (a.u.)")
    ax1.set_ylabel(f"cavity coordinate $q_c$ ({axes[0]})")
    ax2.plot(
        spec.omega[near],
        spec.intensity[near],
        lw=1.2,
        label="spectrum of $q_c$ (window $e^{-2t/T}$)",
    )
    ax2.axvline(omega_c, color="gray", ls=":", label=r"$\omega_c$")
    if fit is not None:
        for w, name in ((fit.lower, "LP"), (fit.upper, "UP")):
            ax2.axvline(w, color="tab:red", ls="--", lw=1.0)
            ax2.annotate(name, (w, 0.95), xycoords=("data", "axes fraction"), ha="center")
    title = f"{config.molecule_count} molecule(s) in a single-mode cavity"
    if fit is not None:
        title += f"\nfitted splitting {fit.splitting:.5g} a.u."
        if expected is not None:
            title += f", expected 2g$\\sqrt{{N}}$ = {expected:.5g}"
    ax2.set_title(title, fontsize=9)
    ax2.set_xlabel(r"$\omega$ (a.u.)")
    ax2.set_ylabel("intensity")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "cavity.png"
    fig.savefig(path)
    plt.close(fig)
    out["plot"] = str(path)
    return out


def _multimode(config, history, out_dir: Path, plot: bool) -> dict[str, Any]:
    energy = history.get("engine/mode_energy_au")
    if energy is None:
        return {}
    energy = np.asarray(energy)
    if energy.ndim == 3:  # (T, modes, axes): each mode's energy over its polarisations
        energy = energy.sum(axis=2)
    peaks = {"mode_energy_max_au": [float(f"{e:.6g}") for e in energy.max(axis=0)]}
    if not plot:
        return peaks
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    t = history["engine/time_au"]
    for k in range(min(energy.shape[1], 12)):
        ax.plot(t, energy[:, k], lw=1.0, label=f"mode {k + 1}")
    ax.set_xlabel("time (a.u.)")
    ax.set_ylabel("mode energy (Hartree)")
    ax.set_title(f"{config.molecule_count} molecule(s) in a multimode cavity", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out_dir / "modes.png"
    fig.savefig(path)
    plt.close(fig)
    return {**peaks, "plot": str(path)}


def _resonant_cw_rabi(config) -> float | None:
    """Omega = mu12 E0 |polarization . axis| for identical ``tls`` molecules starting in the
    ground state under a continuous wave at their frequency, else None."""
    from maxwellhub.models import get_model_class

    from ..pulses import ContinuousWave

    pulse = config.em.params.get("pulse")
    if not isinstance(pulse, dict) or pulse.get("shape") != "cw":
        return None
    wave = ContinuousWave(**{k: float(v) for k, v in pulse.items() if k != "shape"})
    pol = np.asarray(config.em.params.get("polarization", (0.0, 0.0, 1.0)), dtype=float)
    pol = pol / np.linalg.norm(pol)
    tls = get_model_class("tls")
    rates = set()
    for g in config.molecules:
        if get_model_class(g.model) is not tls:
            return None
        p = dict({k: q.default for k, q in tls.parameters.items()}, **g.params)
        if any(np.ndim(p[k]) for k in ("omega", "mu12", "orientation", "pe_initial")):
            return None
        if float(p["pe_initial"]) != 0.0 or abs(float(p["omega"]) - wave.omega) > 1e-12:
            return None
        rates.add(float(p["mu12"]) * wave.e0 * abs(pol[int(p["orientation"])]))
    return rates.pop() if len(rates) == 1 else None


def _laser(config, history, out_dir: Path, plot: bool) -> dict[str, Any]:
    field = history.get("engine/efield_au")
    out: dict[str, Any] = {}
    pe = history.get("Pe")
    if pe is not None and len(pe):
        out["final_mean_Pe"] = float(f"{np.nanmean(pe[-1]):.8g}")
    if field is None or not plot:
        return out
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.4, 5.6), dpi=110, sharex=True)
    t = history["engine/time_au"]
    field = np.asarray(field)
    shown = field if field.ndim == 2 and field.shape[1] == 3 else field.reshape(len(t), -1)[:, :3]
    for k in range(shown.shape[1]):
        if np.any(shown[:, k]):
            ax1.plot(t, shown[:, k], lw=0.8, label=f"$E_{'xyz'[k]}$")
    ax1.set_ylabel("field at molecule 0 (a.u.)")
    ax1.legend(fontsize=8)
    if pe is not None and len(pe):
        times = history.get("time_au")
        tt = (
            np.nanmax(times, axis=1)
            if times is not None
            else history["step"] * config.simulation.dt_au
        )
        for j in range(min(pe.shape[1], 10)):
            ax2.plot(tt, pe[:, j], lw=1.0, label="simulated" if j == 0 else None)
        omega_rabi = _resonant_cw_rabi(config)
        if omega_rabi is not None:  # rotating-wave result from the ground state
            ax2.plot(
                tt,
                np.sin(omega_rabi * tt / 2) ** 2,
                "--",
                color="tab:red",
                lw=1.2,
                label=r"$\sin^2(\Omega t/2)$, $\Omega = \mu_{12} E_0$",
            )
            out["rabi_frequency_au"] = float(f"{omega_rabi:.8g}")
        ax2.legend(fontsize=8)
    ax2.set_xlabel("time (a.u.)")
    ax2.set_ylabel("excited population $P_e$")
    ax1.set_title(f"{config.molecule_count} molecule(s) driven by a laser", fontsize=10)
    fig.tight_layout()
    path = out_dir / "laser.png"
    fig.savefig(path)
    plt.close(fig)
    out["plot"] = str(path)
    return out
