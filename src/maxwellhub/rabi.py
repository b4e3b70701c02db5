"""Rabi splitting of cavity runs: two Lorentzians on a linear background, fitted by least
squares to a spectrum or to the spectrum of a trajectory.

The model (all frequencies in the units of ``omega``; Hartree for trajectories) is

    S(omega) = sum_(i = lower, upper) h_i (g_i / 2)^2 / ((omega - w_i)^2 + (g_i / 2)^2)
               + b0 + b1 (omega - omega_mid)

with centres ``w_i``, full widths at half maximum ``g_i``, heights ``h_i`` and
``omega_mid`` the middle of the fitted range. The splitting is ``w_upper - w_lower``.
The fit is ``scipy.optimize.least_squares`` (trust-region reflective, widths bounded
> 0) from a start found in the data: the two highest local maxima, or, when the peaks
overlap into one maximum, two lines a quarter of its width either side of it.

Uncertainties are one standard deviation from the linearised covariance
``(J^T J)^-1 s^2`` with ``s^2`` the residual variance per degree of freedom: right for
independent, equal errors on the points. Points of a zero-padded spectrum are correlated
(neighbours within the true resolution 2 pi / T share information), so there the errors
are a lower bound; the resolution itself bounds how well a trajectory pins a centre.

For a trajectory, :func:`rabi_splitting_from_trajectory` starts from that fit to the
dipole-form spectrum of :func:`maxwellhub.ir.ir_spectrum` with the exponential window
(which makes each undamped normal mode a Lorentzian of half-width 1 / tau), then refits
the complex transform with exact damped-exponential lines, free of the cross terms that
the power spectrum of a single trajectory carries.

Pure numpy and scipy: no I/O, no plotting.

Example (two overlapping polaritons of unequal height on a sloped background)::

    >>> import numpy as np
    >>> from maxwellhub.rabi import lorentzian, fit_rabi_splitting
    >>> w = np.linspace(0.3, 0.7, 801)
    >>> s = lorentzian(w, 0.47, 0.04, 1.0) + lorentzian(w, 0.53, 0.05, 0.4) + 0.1 + 0.2 * w
    >>> fit = fit_rabi_splitting(w, s)
    >>> round(fit.lower, 6), round(fit.upper, 6), round(fit.splitting, 6)
    (0.47, 0.53, 0.06)
    >>> round(fit.lower_width, 6), round(fit.upper_width, 6)
    (0.04, 0.05)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .ir import ir_spectrum

__all__ = [
    "RabiFit",
    "fit_rabi_splitting",
    "lorentzian",
    "rabi_splitting_from_trajectory",
]


@dataclass(frozen=True)
class RabiFit:
    """Lower and upper polariton of a two-Lorentzian fit (units of the fitted ``omega``)."""

    lower: float  #: centre of the lower polariton
    upper: float  #: centre of the upper polariton
    splitting: float  #: upper - lower
    lower_width: float  #: FWHM of the lower line
    upper_width: float  #: FWHM of the upper line
    lower_height: float  #: peak height of the lower line above the background
    upper_height: float  #: peak height of the upper line above the background
    background: tuple[float, float]  #: (b0, b1): b0 + b1 (omega - omega_mid)
    omega_mid: float  #: middle of the fitted range
    lower_error: float  #: one standard deviation of ``lower``
    upper_error: float  #: one standard deviation of ``upper``
    splitting_error: float  #: of ``splitting`` (with the centres' covariance)
    lower_width_error: float  #: of ``lower_width``
    upper_width_error: float  #: of ``upper_width``
    rms_residual: float  #: root mean square of the fit residual


def lorentzian(omega, centre: float, fwhm: float, height: float) -> np.ndarray:
    """``height (fwhm / 2)^2 / ((omega - centre)^2 + (fwhm / 2)^2)``: peak ``height`` at
    ``centre``, area ``pi height fwhm / 2``."""
    half = 0.5 * fwhm
    return height * half**2 / ((np.asarray(omega, dtype=np.float64) - centre) ** 2 + half**2)


def _model(p: np.ndarray, omega: np.ndarray, mid: float) -> np.ndarray:
    return (
        lorentzian(omega, p[0], p[2], p[4])
        + lorentzian(omega, p[1], p[3], p[5])
        + p[6]
        + p[7] * (omega - mid)
    )


def _half_width_points(omega: np.ndarray, s: np.ndarray, k: int) -> float:
    """Full width at half maximum of the hump at index ``k`` (over a zero background)."""
    half = 0.5 * s[k]
    left = k
    while left > 0 and s[left] > half:
        left -= 1
    right = k
    while right < s.size - 1 and s[right] > half:
        right += 1
    return float(max(omega[right] - omega[left], 2 * (omega[1] - omega[0])))


def _start(omega: np.ndarray, s: np.ndarray) -> np.ndarray:
    """A start: the highest maximum and the highest one clearly apart from it (a dip to
    below 90% of the lower of the two between them), found on a lightly smoothed copy (so
    noise makes no maxima); or two lines either side of a single maximum."""
    base = float(min(s[0], s[-1]))
    size = max(1, s.size // 100) | 1
    above = np.convolve(s - base, np.ones(size) / size, mode="same")
    k1 = int(np.argmax(above))
    inner = np.flatnonzero((above[1:-1] > above[:-2]) & (above[1:-1] >= above[2:])) + 1
    apart = [
        int(k)
        for k in inner
        if above[k] > 0.02 * above[k1] and above[min(k, k1) : max(k, k1) + 1].min() < 0.9 * above[k]
    ]
    if apart:
        k2 = max(apart, key=lambda k: above[k])
        k1, k2 = min(k1, k2), max(k1, k2)
        gap = omega[k2] - omega[k1]
        w1 = min(_half_width_points(omega, above, k1), gap)
        w2 = min(_half_width_points(omega, above, k2), gap)
        return np.array([omega[k1], omega[k2], w1, w2, above[k1], above[k2], base, 0.0])
    width = _half_width_points(omega, above, k1)
    return np.array(
        [
            omega[k1] - width / 4,
            omega[k1] + width / 4,
            width / 2,
            width / 2,
            0.7 * above[k1],
            0.7 * above[k1],
            base,
            0.0,
        ]
    )


def fit_rabi_splitting(
    omega,
    spectrum,
    *,
    omega_range: tuple[float, float] | None = None,
    guess: tuple[float, float] | None = None,
) -> RabiFit:
    """Fit two Lorentzians on a linear background to ``spectrum`` on the grid ``omega``
    (any units; at least 9 points in ``omega_range``, default all). ``guess``: start
    centres (lower, upper) instead of the ones found in the data."""
    w = np.asarray(omega, dtype=np.float64)
    s = np.asarray(spectrum, dtype=np.float64)
    if w.ndim != 1 or s.shape != w.shape:
        raise ValueError(
            "omega and spectrum: expected two 1-D arrays of one length, got "
            f"{w.shape} and {s.shape}"
        )
    if omega_range is not None:
        keep = (w >= omega_range[0]) & (w <= omega_range[1])
        w, s = w[keep], s[keep]
    if w.size < 9 or not np.all(np.isfinite(s)):
        raise ValueError(f"need at least 9 finite points to fit 8 parameters, got {w.size}")
    mid = 0.5 * float(w[0] + w[-1])
    p0 = _start(w, s)
    if guess is not None:
        p0[0], p0[1] = sorted(float(g) for g in guess)
        p0[4:6] = np.interp(p0[:2], w, s) - p0[6]
    span = float(w[-1] - w[0])
    lower = np.array([w[0], w[0], 1e-9 * span, 1e-9 * span, -np.inf, -np.inf, -np.inf, -np.inf])
    upper = np.array([w[-1], w[-1], 2 * span, 2 * span, np.inf, np.inf, np.inf, np.inf])
    p0 = np.clip(p0, lower + 1e-12 * span, upper - 1e-12 * span)
    from scipy.optimize import least_squares  # here: importing analysis stays light

    result = least_squares(
        lambda p: _model(p, w, mid) - s,
        p0,
        bounds=(lower, upper),
        x_scale="jac",
        xtol=1e-14,
        ftol=1e-14,
        gtol=1e-14,
        max_nfev=2000,
    )
    p, jac, res = result.x, result.jac, result.fun
    dof = max(w.size - p.size, 1)
    variance = float(res @ res) / dof
    cov = np.linalg.pinv(jac.T @ jac) * variance
    lo, hi = (0, 1) if p[0] <= p[1] else (1, 0)
    err = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    split_var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    return RabiFit(
        lower=float(p[lo]),
        upper=float(p[hi]),
        splitting=float(p[hi] - p[lo]),
        lower_width=float(p[2 + lo]),
        upper_width=float(p[2 + hi]),
        lower_height=float(p[4 + lo]),
        upper_height=float(p[4 + hi]),
        background=(float(p[6]), float(p[7])),
        omega_mid=mid,
        lower_error=float(err[lo]),
        upper_error=float(err[hi]),
        splitting_error=float(math.sqrt(max(split_var, 0.0))),
        lower_width_error=float(err[2 + lo]),
        upper_width_error=float(err[2 + hi]),
        rms_residual=float(math.sqrt(float(res @ res) / w.size)),
    )


def _line_basis(omega, centres, rates, dt: float, n: int) -> np.ndarray:
    """Columns: the exact transform dt sum_k exp(-(rate - i w) t_k) exp(-i omega t_k) of a
    sampled, truncated damped exponential at +w and at -w (its image) for each line, then a
    complex constant and slope (what is left of the mean and the far lines)."""
    cols = []
    for w, rate in zip(centres, rates, strict=True):
        for sign in (1.0, -1.0):
            z = np.exp(-(rate + 1j * (omega - sign * w)) * dt)
            cols.append(dt * (1.0 - z**n) / (1.0 - z))
    mid = 0.5 * (omega[0] + omega[-1])
    cols += [np.ones_like(omega, dtype=complex), (omega - mid).astype(complex)]
    return np.column_stack(cols)


def _complex_fit(omega, transform, start: np.ndarray, dt: float, n: int):
    """Variable projection: least squares over (w1, w2, rate1, rate2); the complex
    amplitudes are solved exactly at every step."""

    def amplitudes(p):
        basis = _line_basis(omega, p[:2], p[2:], dt, n)
        return basis, np.linalg.lstsq(basis, transform, rcond=None)[0]

    def residual(p):
        basis, coef = amplitudes(p)
        diff = basis @ coef - transform
        return np.concatenate([diff.real, diff.imag])

    span = float(omega[-1] - omega[0])
    lower = [omega[0], omega[0], 1e-9 * span, 1e-9 * span]
    upper = [omega[-1], omega[-1], span, span]
    start = np.clip(start, np.array(lower) + 1e-12 * span, np.array(upper) - 1e-12 * span)
    from scipy.optimize import least_squares

    result = least_squares(
        residual, start, bounds=(lower, upper), x_scale="jac", xtol=1e-15, ftol=1e-15
    )
    return result, amplitudes(result.x)[1]


def rabi_splitting_from_trajectory(
    dipoles,
    dt: float,
    *,
    omega_range: tuple[float, float] | None = None,
    tau: float | None = None,
    resolution: float | None = None,
    guess: tuple[float, float] | None = None,
) -> RabiFit:
    """The two polaritons of a trajectory: one dipole component (or field, or cavity
    coordinate) of shape (T,), sampled at interval ``dt`` (a.u.); frequencies in Hartree.

    The power spectrum of one trajectory is not a sum of Lorentzians: the transform is a
    sum of complex lines and its square carries their cross terms (dispersive, of relative
    size about width / splitting times the amplitude ratio), which pull Lorentzian centres
    by a fraction of the resolution. So after a start from :func:`fit_rabi_splitting` on
    the dipole-form power spectrum (exponential window ``exp(-t / tau)``, default
    ``tau = T / ln(1e4)``; ``guess`` goes to that fit), the complex transform
    ``X(omega) = dt sum_k x_k exp(-i omega t_k)`` of the mean-free, windowed trajectory is
    fitted by two exact sampled, truncated damped exponentials (each with its
    negative-frequency image) and a complex linear background, over ``omega_range``
    (default: where the power spectrum exceeds 1% of its maximum, widened by half its span
    on either side). Centres are then exact for damped sinusoids, to round-off.

    Widths are each line's FWHM in the windowed power spectrum, ``2 (gamma + 1 / tau)``
    for a mode of intrinsic damping rate ``gamma``; heights its peak there (the units of
    :func:`maxwellhub.ir.ir_spectrum` with ``form="dipole"``); the background is the one
    of the start fit. A (T, 3) trajectory is refused: give the component that shows both
    modes (the components' cross terms do not add up to one spectrum's)."""
    mu = np.asarray(dipoles, dtype=np.float64)
    if mu.ndim == 2:
        mu = mu[:, 0] if mu.shape[1] == 1 else mu
    if mu.ndim != 1:
        raise ValueError(
            "dipoles: give the one component that shows both modes, shape (T,), not "
            f"{np.shape(dipoles)} (cross terms between components do not add)"
        )
    spec = ir_spectrum(mu, dt, form="dipole", window="exponential", tau=tau, resolution=resolution)
    if omega_range is None:
        strong = spec.omega[spec.intensity >= 0.01 * spec.intensity.max()]
        span = float(strong.max() - strong.min())
        omega_range = (float(strong.min()) - span / 2, float(strong.max()) + span / 2)
    first = fit_rabi_splitting(spec.omega, spec.intensity, omega_range=omega_range, guess=guess)
    n, step = mu.size, float(dt)
    window_tau = (n - 1) * step / math.log(1e4) if tau is None else float(tau)
    window = np.exp(-np.arange(n) * step / window_tau)
    x = (mu - mu.mean()) * window
    size = 1 << max(math.ceil(math.log2(n)), round(math.log2(spec.omega.size - 1)) + 1)
    transform = np.fft.rfft(x, n=size) * step
    grid = np.arange(transform.size) * (2 * math.pi / (size * step))
    # the window's decay is in the transform; fit the total rate, then report the widths
    start = np.array([first.lower, first.upper, first.lower_width / 2, first.upper_width / 2])
    # about eight points per half-width are plenty for the exact line shapes
    stride = max(1, int(min(start[2:]) / (8 * (grid[1] - grid[0]))))
    keep = np.flatnonzero((grid >= omega_range[0]) & (grid <= omega_range[1]))[::stride]
    omega, transform = grid[keep], transform[keep]
    result, coef = _complex_fit(omega, transform, start, step, n)
    p, jac, res = result.x, result.jac, result.fun
    dof = max(res.size - p.size - 2 * coef.size, 1)
    cov = np.linalg.pinv(jac.T @ jac) * float(res @ res) / dof
    err = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    lo, hi = (0, 1) if p[0] <= p[1] else (1, 0)
    norm = step * float(window @ window)
    peak = [
        abs(coef[2 * i]) ** 2 * step**2 / abs(1 - math.exp(-p[2 + i] * step)) ** 2 / norm
        for i in (0, 1)
    ]
    return RabiFit(
        lower=float(p[lo]),
        upper=float(p[hi]),
        splitting=float(p[hi] - p[lo]),
        lower_width=float(2 * p[2 + lo]),
        upper_width=float(2 * p[2 + hi]),
        lower_height=float(peak[lo]),
        upper_height=float(peak[hi]),
        background=first.background,
        omega_mid=first.omega_mid,
        lower_error=float(err[lo]),
        upper_error=float(err[hi]),
        splitting_error=float(math.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0))),
        lower_width_error=float(2 * err[2 + lo]),
        upper_width_error=float(2 * err[2 + hi]),
        rms_residual=float(math.sqrt(float(res @ res) / omega.size)),
    )
