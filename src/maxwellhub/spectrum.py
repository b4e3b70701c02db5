"""Absorption spectra from dipole trajectories after a kick (real-time TDDFT and alike).

A weak impulsive kick ``E(t) = kappa delta(t) e`` at t = 0 starts the induced dipole
``delta mu(t) = kappa alpha(t) e`` (linear response). For the projection on the kick,
``alpha_ee(t) = e . delta mu(t) / kappa`` (``e`` a unit vector), and

    alpha(omega) = integral_0^T alpha(t) exp(+i omega t) exp(-t / tau) dt
    S(omega) = (2 omega / pi) Im alpha(omega)

``S`` is the dipole strength function along ``e``: each excitation n is a Lorentzian of
half-width ``1/tau`` whose area is its oscillator strength ``f_n,ee = 2 omega_n
|<0|mu.e|n>|^2``. With the kick along (1, 1, 1)/sqrt(3) in the molecule's principal frame,
``e.alpha.e`` is the isotropic average, so the areas are the oscillator strengths that
linear-response codes print (PySCF's ``oscillator_strength()``). In exact arithmetic
``alpha(t) = sum_n (f_n / omega_n) sin(omega_n t)``, and the sampled, damped transform of
each term has ``Im alpha(omega) >= 0`` at every ``omega`` below the Nyquist frequency (the
cosine sum of the exponential window falls monotonically with frequency): with the kick
sign and ``exp(+i omega t)`` right, the spectrum comes out non-negative without taking an
absolute value. Only the truncation at ``T`` (where the window has fallen to
``exp(-T/tau)``, 1e-4 by default) can push ``S`` below zero, far above the peaks, where
the factor ``omega`` amplifies the truncation ripple (water after a kick, T = 1000 a.u.:
nowhere below 2 Hartree; at most 3e-6 of the highest peak, near the Nyquist frequency).

Units: atomic units (time in a.u., frequencies in Hartree, ``alpha`` in a.u.); energies
are also given in eV. Pure numpy: no I/O, no plotting, no scipy.

Example (a synthetic dipole with two excitations, kick 1e-3 along z)::

    >>> import numpy as np
    >>> from maxwellhub.spectrum import absorption_spectrum, fit_peaks
    >>> t = np.arange(0, 1000, 0.1)
    >>> f, w = np.array([0.3, 0.1]), np.array([0.35, 0.52])   # oscillator strengths, Hartree
    >>> mu_z = 1.2 + 1e-3 * (f / w * np.sin(np.outer(t, w))).sum(axis=1)
    >>> spectrum = absorption_spectrum(t, mu_z, kick=1e-3)
    >>> bool(spectrum.strength.min() >= -1e-4 * spectrum.strength.max())
    True
    >>> peaks = fit_peaks(spectrum, energy_range_au=(0.1, 1.0))
    >>> [round(e, 6) for e in peaks.energy_au], [round(s, 4) for s in peaks.strength]
    ([0.35, 0.52], [0.3, 0.1])
    >>> [round(r, 4) for r in peaks.relative]
    [1.0, 0.3333]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["HARTREE_EV", "Peaks", "Spectrum", "absorption_spectrum", "fit_peaks"]

#: CODATA 2018 Hartree energy in eV.
HARTREE_EV = 27.211386245988


@dataclass(frozen=True)
class Spectrum:
    """``alpha(omega)`` and ``S(omega)`` on a uniform grid ``omega`` (Hartree) from 0."""

    omega: np.ndarray  #: angular frequencies (Hartree), uniform from 0
    alpha: np.ndarray  #: damped Fourier transform of alpha(t) (complex, a.u.)
    strength: np.ndarray  #: S(omega) = (2 omega / pi) Im alpha(omega) (1/Hartree)
    dt: float  #: sampling interval of the trajectory (a.u.)
    samples: int  #: samples of alpha(t) used, t = 0 .. (samples - 1) dt
    tau: float  #: damping time of the window exp(-t / tau) (a.u.)

    @property
    def energy_ev(self) -> np.ndarray:
        """``omega`` in eV."""
        return self.omega * HARTREE_EV


@dataclass(frozen=True)
class Peaks:
    """Fitted excitations, lowest first: energies, strengths (areas of S, the oscillator
    strengths along the kick) and strengths relative to the strongest."""

    energy_au: list[float]
    strength: list[float]
    relative: list[float]

    @property
    def energy_ev(self) -> list[float]:
        return [e * HARTREE_EV for e in self.energy_au]


def _polarizability(times, dipoles, kick) -> tuple[np.ndarray, float]:
    t = np.asarray(times, dtype=np.float64)
    mu = np.asarray(dipoles, dtype=np.float64)
    if t.ndim != 1 or t.size < 3:
        raise ValueError(f"times: expected a 1-D array of >= 3 samples, got shape {t.shape}")
    if mu.shape[0] != t.size or mu.ndim not in (1, 2) or (mu.ndim == 2 and mu.shape[1] != 3):
        raise ValueError(
            f"dipoles: expected shape ({t.size},) or ({t.size}, 3) to match times, got {mu.shape}"
        )
    steps = np.diff(t)
    dt = float(steps.mean())
    if not (dt > 0 and np.abs(steps - dt).max() <= 1e-6 * dt):
        raise ValueError("times: expected uniform, increasing samples (one per step)")
    k = np.asarray(kick, dtype=np.float64)
    delta = mu - mu[0]  # the induced dipole; the kick is at times[0]
    if mu.ndim == 1:
        if k.ndim != 0 or k == 0:
            raise ValueError(
                "kick: with one dipole component, give the kick strength kappa (a non-zero number)"
            )
        return delta / float(k), dt
    if k.shape != (3,) or not k.any():
        raise ValueError(
            "kick: with (T, 3) dipoles, give the kick vector kappa e (3 numbers, not all zero)"
        )
    # e . delta mu / kappa with e = k / |k|, kappa = |k|
    return delta @ k / float(k @ k), dt


def absorption_spectrum(
    times,
    dipoles,
    kick,
    *,
    tau: float | None = None,
    omega_max: float | None = None,
    resolution: float = 1e-4,
) -> Spectrum:
    """The damped Fourier transform of the kick response.

    ``times`` (T,) uniform, the kick at ``times[0]``; ``dipoles`` (T,) the component along
    the kick, with ``kick`` its strength kappa (a.u. of field x time), or (T, 3) with
    ``kick`` the vector kappa e. The induced dipole is ``dipoles - dipoles[0]``.
    ``tau``: damping time of the window ``exp(-t/tau)``, by default ``t_max / ln(1e4)``
    (the window ends at 1e-4). ``omega_max``: highest frequency returned (Hartree; default
    the Nyquist frequency pi / dt). ``resolution``: grid spacing in omega (Hartree), reached
    by zero padding.
    """
    alpha_t, dt = _polarizability(times, dipoles, kick)
    n = alpha_t.size
    t_max = (n - 1) * dt
    if tau is None:
        tau = t_max / math.log(1e4)
    if not tau > 0:
        raise ValueError(f"tau = {tau!r}: expected a damping time > 0 (a.u.)")
    nyquist = math.pi / dt
    omega_max = nyquist if omega_max is None else min(float(omega_max), nyquist)
    size = 1 << max(math.ceil(math.log2(2 * math.pi / (resolution * dt))), math.ceil(math.log2(n)))
    windowed = alpha_t * np.exp(-np.arange(n) * dt / tau)
    # sum_k x_k exp(+i omega_j t_k) dt = dt * size * ifft(x)_j, omega_j = 2 pi j / (size dt)
    alpha_w = np.fft.ifft(windowed, n=size) * (size * dt)
    count = int(omega_max / (2 * math.pi / (size * dt))) + 1
    omega = np.arange(count) * (2 * math.pi / (size * dt))
    alpha_w = alpha_w[:count]
    strength = (2.0 / math.pi) * omega * alpha_w.imag
    return Spectrum(omega, alpha_w, strength, dt, n, float(tau))


def _line_shapes(spectrum: Spectrum, omega: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Im of the damped, sampled, truncated transform of sin(w_n t) (exact), (len, peaks)."""
    dt, n = spectrum.dt, spectrum.samples
    r = math.exp(-dt / spectrum.tau)
    out = np.empty((omega.size, centres.size))
    for j, w in enumerate(centres):
        total = np.zeros(omega.size, dtype=np.complex128)
        for sign in (1.0, -1.0):
            z = r * np.exp(1j * (omega + sign * w) * dt)
            total += sign * (1.0 - z**n) / (1.0 - z)
        out[:, j] = (dt * total / 2j).imag
    return out


def _design(
    spectrum: Spectrum, omega: np.ndarray, centres: np.ndarray, middle: float
) -> np.ndarray:
    """Columns: the line shape of each centre, then a linear background."""
    return np.column_stack(
        [_line_shapes(spectrum, omega, centres), np.ones_like(omega), omega - middle]
    )


def _residual(spectrum, omega, target, centres):
    basis = _design(spectrum, omega, centres, float(omega.mean()))
    coef = np.linalg.lstsq(basis, target, rcond=None)[0]
    return target - basis @ coef, coef


def _refine(
    spectrum: Spectrum, omega: np.ndarray, target: np.ndarray, centres: np.ndarray
) -> np.ndarray:
    """Levenberg-Marquardt on the peak positions; amplitudes and a linear background are
    solved exactly at every step (variable projection)."""
    step = 1e-6
    damping = 1e-3
    res = _residual(spectrum, omega, target, centres)[0]
    cost = float(res @ res)
    for _ in range(50):
        jac = np.empty((res.size, centres.size))
        for j in range(centres.size):
            moved = centres.copy()
            moved[j] += step
            jac[:, j] = (_residual(spectrum, omega, target, moved)[0] - res) / step
        jtj = jac.T @ jac
        grad = jac.T @ res
        while True:
            delta = np.linalg.solve(jtj + damping * np.diag(np.diag(jtj) + 1e-30), -grad)
            trial = centres + delta
            new_res = _residual(spectrum, omega, target, trial)[0]
            new_cost = float(new_res @ new_res)
            if new_cost < cost:
                centres, res, damping = trial, new_res, damping / 3
                break
            damping *= 10
            if damping > 1e12:
                return centres
        if abs(cost - new_cost) <= 1e-14 * cost or np.abs(delta).max() < 1e-10:
            return centres
        cost = new_cost
    return centres


def fit_peaks(
    spectrum: Spectrum,
    *,
    energy_range_au: tuple[float, float] | None = None,
    min_relative: float = 0.01,
) -> Peaks:
    """Find the peaks of ``S`` in ``energy_range_au`` (Hartree; default the whole
    spectrum above zero) at least ``min_relative`` times the highest there, and fit them
    all at once with the exact line shape of the transform (damping, sampling and
    truncation included) plus a linear background: positions by least squares, strengths
    as the fitted amplitudes times the frequency (the peak areas of ``S``). Lines that are
    no local maximum of ``S`` (a shoulder on a stronger line) are found in what the fit
    leaves over, above the same threshold, and fitted with the rest."""
    omega = spectrum.omega
    lo, hi = energy_range_au if energy_range_au is not None else (omega[1], omega[-1])
    sel = np.flatnonzero((omega >= lo) & (omega <= hi))
    if sel.size < 5:
        raise ValueError(f"energy_range_au = {energy_range_au!r}: fewer than 5 grid points")
    s = spectrum.strength[sel]
    inner = (s[1:-1] > s[:-2]) & (s[1:-1] >= s[2:]) & (s[1:-1] >= min_relative * s.max())
    found = sel[1:-1][inner]
    if not found.size:
        return Peaks([], [], [])
    # fit on a grid about four points per half-width: fast, and enough to pin the shapes
    stride = max(1, int((1.0 / spectrum.tau) / (4 * (omega[1] - omega[0]))))
    grid = sel[::stride]
    target = spectrum.alpha.imag[grid]
    centres = omega[found].astype(np.float64)
    threshold = min_relative * s.max()
    for _ in range(6):
        centres = _refine(spectrum, omega[grid], target, centres)
        # a weak line on a strong one's flank is no local maximum of S: find the largest
        # maximum of what the fit leaves over, add it and fit again (one at a time, so the
        # misfit lobes of a line still missing are not taken for lines)
        coef = _residual(spectrum, omega[grid], target, centres)[1]
        model = _design(spectrum, omega[sel], centres, float(omega[grid].mean())) @ coef
        left = (2.0 / math.pi) * omega[sel] * (spectrum.alpha.imag[sel] - model)
        inner = (left[1:-1] > left[:-2]) & (left[1:-1] >= left[2:]) & (left[1:-1] >= threshold)
        if not inner.any():
            break
        best = int(np.argmax(np.where(inner, left[1:-1], -np.inf)))
        centres = np.append(centres, omega[sel][1:-1][best])
    amplitudes = _residual(spectrum, omega[grid], target, centres)[1][: centres.size]
    # a line the fit gave (almost) nothing is no line: drop it and fit the rest again
    weak = np.abs(amplitudes * centres) < 0.5 * min_relative * np.abs(amplitudes * centres).max()
    if weak.any():
        centres = _refine(spectrum, omega[grid], target, centres[~weak])
        amplitudes = _residual(spectrum, omega[grid], target, centres)[1][: centres.size]
    order = np.argsort(centres)
    energies = centres[order]
    strengths = amplitudes[order] * energies
    top = float(np.abs(strengths).max())
    return Peaks(
        [float(e) for e in energies],
        [float(f) for f in strengths],
        [float(f) / top for f in strengths],
    )
