"""What a run reports at its end: the HDF5 file of the molecules' records (written also
for a failed run, with what exists), the plots, and the summary dict that ``maxwellhub
run`` prints as its last line, with the golden-rule reference where one applies.

Rank 0 only. It reads the coupling's history and never steps, restarts or stops
anything: the runner calls it once, after the run and before releasing the hub.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from ..parallel.mpi import rank_and_size
from .config import Config
from .output import Progress, plot_populations, write_history

__all__ = ["analytic_reference", "finish", "finish_engine"]

log = logging.getLogger("maxwellhub.run")


def analytic_reference(config: Config, units) -> dict | None:
    """Golden-rule rate and P0 when every molecule is an identical TLS at one point with
    rescaling 1 (single-molecule relaxation or superradiance); else None."""
    from maxwellhub.models import get_model_class

    from ..analysis import golden_rule_rate

    groups = config.molecules
    points = {p for g in groups for p in g.positions}
    if len(points) != 1 or any(g.rescaling != 1.0 or len(g.axis) != 1 for g in groups):
        return None
    try:
        classes = [get_model_class(g.model) for g in groups]
    except Exception:
        return None
    params = []
    for cls, g in zip(classes, groups, strict=True):
        p = dict({k: q.default for k, q in cls.parameters.items()}, **g.params)
        # QuTiP's TLS preset without Lindblad rates is the tls model's system exactly
        plain_qutip = (
            cls.name == "qutip"
            and p["preset"] == "tls"
            and p["module"] is None
            and not p["gamma_relax"]
            and not p["gamma_dephase"]
        )
        if cls.name != "tls" and not plain_qutip:
            return None
        params.append(p)
    keys = ("omega", "mu12", "pe_initial")
    if any(not all(np.ndim(p[k]) == 0 for k in keys) for p in params):
        return None
    first = params[0]
    if any(any(p[k] != first[k] for k in keys) for p in params[1:]):
        return None
    if len({g.sigma for g in groups}) != 1:
        return None
    n = config.molecule_count
    omega = units.frequency_au_to_meep(first["omega"])
    mu = units.dipole_au_to_meep(first["mu12"])
    dims = config.simulation.dimensions
    return {
        "gamma": n * golden_rule_rate(dims, omega, mu),
        "gamma_kernel": n * golden_rule_rate(dims, omega, mu, sigma=groups[0].sigma),
        "p0": float(first["pe_initial"]),
        "molecules": n,
    }


def finish(config: Config, coupling, failure, procs, t_start: float, progress: Progress) -> dict:
    """Write HDF5 (always, with what exists), then the plot and the summary."""
    from ..analysis import compare_to_curve, fit_decay_rate, relaxation_curve
    from .kick_spectrum import ir_response, kick_response, plot_ir, plot_kick_spectrum

    if config.em.engine != "meep":
        return finish_engine(config, coupling, failure, t_start, progress)
    out_dir = config.output.directory
    history = coupling.history()
    units = coupling.units
    records = len(history["step"])
    steps_done = int(history["step"][-1]) + 1 if records else 0
    if "time_au" in history:  # the molecules' own clock, the one the analytic curve uses
        time_meep = units.time_au_to_meep(np.nanmax(history["time_au"], axis=1))
        history["time_meep"] = time_meep
    ref = analytic_reference(config, units)
    summary: dict = {
        "complete": failure is None,
        "steps": steps_done,
        "molecules": config.molecule_count,
        "transport": config.transport.kind,
        "dimensions": config.simulation.dimensions,
        "mpi_ranks": rank_and_size()[1],
        "fitted_rate": None,
        "golden_rule_rate": None,
        "relative_error": None,
    }
    pe = history.get("Pe")
    analytic = None
    if ref is not None and pe is not None and records > 2:
        mean_pe = np.nanmean(pe, axis=1)
        fitted = fit_decay_rate(time_meep, mean_pe)
        errors = compare_to_curve(time_meep, mean_pe, ref["gamma"])
        analytic = relaxation_curve(time_meep, ref["gamma"], float(mean_pe[0]))
        summary.update(
            fitted_rate=round(fitted, 8),
            golden_rule_rate=round(ref["gamma"], 8),
            relative_error=round(abs(fitted - ref["gamma"]) / ref["gamma"], 6),
            golden_rule_rate_kernel=round(ref["gamma_kernel"], 8),
            relative_error_kernel=round(abs(fitted - ref["gamma_kernel"]) / ref["gamma_kernel"], 6),
            curve_std_over_p0=float(f"{errors['std']:.3e}"),
            curve_max_over_p0=float(f"{errors['max']:.3e}"),
        )
    summary["wall_time_s"] = round(time.perf_counter() - t_start, 3)
    attrs = {
        "complete": failure is None,
        "time_units_fs": config.simulation.time_units_fs,
        "config": config.text or (config.source.read_text() if config.source else ""),
        "summary": json.dumps(summary),
    }
    hdf5 = write_history(out_dir / "molecules.h5", history, attrs)
    summary["hdf5"] = str(hdf5)
    if config.output.plot and pe is not None and records and failure is None:
        title = (
            f"{config.simulation.dimensions}D, {config.molecule_count} molecule(s), "
            f"{config.transport.kind} transport"
        )
        summary["plot"] = str(
            plot_populations(out_dir / "populations.png", time_meep, pe, analytic, title)
        )
    response = kick_response(config, history) if config.output.plot and failure is None else None
    if response is not None:  # a kicked real molecule: its dipole and absorption spectrum
        title = (
            f"{config.simulation.dimensions}D Meep, {config.molecule_count} molecule(s), "
            f"{config.transport.kind} transport"
        )
        summary.update(plot_kick_spectrum(out_dir / "spectrum.png", response, title))
    motion = ir_response(config, history) if config.output.plot and failure is None else None
    if motion is not None:  # molecular dynamics: the IR spectrum of the total dipole
        title = (
            f"{config.simulation.dimensions}D Meep, {config.molecule_count} molecule(s), "
            f"{config.transport.kind} transport"
        )
        summary.update(plot_ir(out_dir / "ir.png", motion, title))
    if failure is None:
        log.info("%s", progress.line())
    return summary


def finish_engine(config: Config, coupling, failure, t_start: float, progress: Progress) -> dict:
    """A non-Meep engine's run: HDF5 (per-molecule records and ``engine/*`` every step),
    the engine's plot and numbers (:mod:`maxwellhub.engine_summary`), the summary."""
    from .engine_summary import engine_summary

    out_dir = config.output.directory
    history = coupling.history()
    summary: dict = {
        "complete": failure is None,
        "engine": config.em.engine,
        "steps": int(coupling.step_index),
        "time_au": round(float(coupling.time_au), 9),
        "molecules": config.molecule_count,
        "transport": config.transport.kind,
    }
    if failure is None:
        summary.update(engine_summary(config, history, out_dir, config.output.plot))
    summary["wall_time_s"] = round(time.perf_counter() - t_start, 3)
    attrs = {
        "complete": failure is None,
        "engine": config.em.engine,
        "dt_au": float(config.simulation.dt_au or 0.0),
        "config": config.text or (config.source.read_text() if config.source else ""),
        "summary": json.dumps(summary),
    }
    summary["hdf5"] = str(write_history(out_dir / "molecules.h5", history, attrs))
    if failure is None:
        log.info("%s", progress.line())
    return summary
