"""Infrared spectra from dipole trajectories: the dipole autocorrelation and its transform.

For a dipole trajectory ``mu(t_k)``, ``t_k = k dt`` (k = 0 .. N-1; (N,) or (N, 3)), let
``x_k = w_k (mu_k - <mu>)`` (the fluctuation, times a window ``w``). The spectrum is the
windowed periodogram, summed over the components::

    P(omega) = |dt sum_k x_k exp(-i omega t_k)|^2 / T_w,    T_w = dt sum_k w_k^2

which is the cosine transform of the (biased, windowed) autocorrelation
``C(t_k) = sum_j x_j . x_(j+k) / (sum_j w_j^2)`` of :func:`dipole_autocorrelation`, ::

    P(omega) = dt [C(0) + 2 sum_(k>=1) C(t_k) cos(omega t_k)]

the estimate of ``integral C(t) exp(-i omega t) dt`` (Wiener-Khinchin); with no window,
``integral_0^inf P d omega / pi`` is the mean of ``|mu - <mu>|^2`` (Parseval).

``form="velocity"`` (the default) returns ``omega^2 P(omega)``, the power spectrum of
``dmu/dt`` (exactly so for the continuous transform of an unwindowed, untruncated
signal; no finite difference is taken): the classical absorption line shape. The
absorption coefficient times the refractive index is then (Gaussian = atomic units,
isotropic sample of volume ``V`` at inverse temperature ``beta``; e.g. Ramirez et al.,
J. Chem. Phys. 121, 3973 (2004)) ::

    n(omega) alpha(omega) = (2 pi beta / (3 c V)) omega^2 P(omega)

This module returns ``omega^2 P(omega)`` without the constant ``2 pi beta / (3 c V)``.
No quantum correction is applied unless ``temperature_k`` is given: then the line shape is
multiplied by the harmonic correction ``beta omega / (1 - exp(-beta omega))`` (hbar = 1),
which tends to 1 as omega -> 0. ``form="dipole"`` returns ``P(omega)`` itself.

Windows (on the signal, t from 0 to T = (N-1) dt): ``"hann"`` sin^2(pi t / T) (default),
``"none"``, and ``"exponential"`` exp(-t / tau) (tau by default T / ln(1e4)), which turns
each undamped line into a Lorentzian of half-width 1/tau. Zero padding sets the grid
spacing in omega to ``resolution`` (default 2 pi / (4 N dt)); it interpolates, the true
resolution stays about 2 pi / T.

Units: atomic units (time in a.u., omega in Hartree, dipole in e a0); the frequency grid
is also given in cm^-1 and eV. Pure numpy: no I/O, no plotting.

Example (two damped cosines at 1646 and 3665 cm^-1, the second half as strong)::

    >>> import numpy as np
    >>> from maxwellhub.ir import ir_spectrum, HARTREE_CM
    >>> dt, t = 10.0, np.arange(20000) * 10.0
    >>> w1, w2 = 1646 / HARTREE_CM, 3665 / HARTREE_CM
    >>> mu = (np.cos(w1 * t) + 0.5 * np.cos(w2 * t)) * np.exp(-t / 2e4)
    >>> spec = ir_spectrum(mu, dt, form="dipole", resolution=1e-6)
    >>> low = spec.wavenumber_cm < 2500
    >>> int(round(spec.wavenumber_cm[low][np.argmax(spec.intensity[low])]))
    1646
    >>> int(round(spec.wavenumber_cm[~low][np.argmax(spec.intensity[~low])]))
    3665
    >>> ratio = spec.intensity[low].sum() / spec.intensity[~low].sum()
    >>> round(float(ratio), 1)
    4.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BOLTZMANN_HARTREE_PER_K",
    "HARTREE_CM",
    "HARTREE_EV",
    "IRSpectrum",
    "dipole_autocorrelation",
    "ir_spectrum",
]

#: CODATA 2018 Hartree energy in eV.
HARTREE_EV = 27.211386245988
#: CODATA 2018 Hartree energy in cm^-1.
HARTREE_CM = 219474.6313632
#: CODATA 2018 Boltzmann constant in Hartree per kelvin.
BOLTZMANN_HARTREE_PER_K = 3.166811563e-6

_WINDOWS = ("hann", "none", "exponential")
_FORMS = ("velocity", "dipole")


@dataclass(frozen=True)
class IRSpectrum:
    """An IR spectrum on a uniform grid ``omega`` (Hartree) from 0 (see the module)."""

    omega: np.ndarray  #: angular frequencies (Hartree), uniform from 0
    intensity: np.ndarray  #: omega^2 P(omega) ("velocity") or P(omega) ("dipole")
    dt: float  #: sampling interval of the trajectory (a.u.)
    samples: int  #: N, samples of the trajectory used
    form: str  #: "velocity" or "dipole"
    window: str  #: "hann", "none" or "exponential"

    @property
    def wavenumber_cm(self) -> np.ndarray:
        """``omega`` in cm^-1."""
        return self.omega * HARTREE_CM

    @property
    def energy_ev(self) -> np.ndarray:
        """``omega`` in eV."""
        return self.omega * HARTREE_EV


def _fluctuation(dipoles, dt, subtract_mean: bool) -> tuple[np.ndarray, float]:
    mu = np.asarray(dipoles, dtype=np.float64)
    if mu.ndim == 1:
        mu = mu[:, None]
    if mu.ndim != 2 or mu.shape[1] not in (1, 3) or mu.shape[0] < 4:
        raise ValueError(
            f"dipoles: expected shape (T,) or (T, 3) with T >= 4 samples, got {np.shape(dipoles)}"
        )
    step = float(dt)
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"dt = {dt!r}: expected a finite sampling interval > 0 (a.u.)")
    if subtract_mean:
        mu = mu - mu.mean(axis=0)
    return mu, step


def _window(name: str, n: int, dt: float, tau: float | None) -> np.ndarray:
    if name == "none":
        return np.ones(n)
    if name == "hann":
        return np.sin(math.pi * np.arange(n) / (n - 1)) ** 2
    if name == "exponential":
        t_max = (n - 1) * dt
        tau = t_max / math.log(1e4) if tau is None else float(tau)
        if not tau > 0:
            raise ValueError(f"tau = {tau!r}: expected a damping time > 0 (a.u.)")
        return np.exp(-np.arange(n) * dt / tau)
    raise ValueError(f"window = {name!r}: expected one of {', '.join(_WINDOWS)}")


def dipole_autocorrelation(
    dipoles, dt: float, *, window: str = "none", tau: float | None = None, subtract_mean=True
) -> tuple[np.ndarray, np.ndarray]:
    """The biased autocorrelation ``C(t_k) = sum_j x_j . x_(j+k) / sum_j w_j^2`` of the
    windowed fluctuation ``x = w (mu - <mu>)`` at lags ``t_k = k dt``, k = 0 .. N-1.

    Returns ``(lags, C)`` (a.u., (e a0)^2). With ``window="none"``, ``C(0)`` is the mean
    of ``|mu - <mu>|^2`` and ``C`` tapers linearly to 0 at the last lag (the biased
    estimator; divide by ``(N - k) / N`` for the unbiased one). Computed by FFT.
    """
    x, step = _fluctuation(dipoles, dt, subtract_mean)
    n = x.shape[0]
    w = _window(window, n, step, tau)
    xw = x * w[:, None]
    size = 1 << math.ceil(math.log2(2 * n))
    spectrum = np.fft.rfft(xw, n=size, axis=0)
    corr = np.fft.irfft((spectrum * spectrum.conj()).real.sum(axis=1), n=size)[:n]
    return np.arange(n) * step, corr / float(w @ w)


def ir_spectrum(
    dipoles,
    dt: float,
    *,
    form: str = "velocity",
    window: str = "hann",
    tau: float | None = None,
    resolution: float | None = None,
    omega_max: float | None = None,
    subtract_mean: bool = True,
    temperature_k: float | None = None,
) -> IRSpectrum:
    """The IR spectrum of a dipole trajectory (see the module for the conventions).

    ``dipoles``: (T,) or (T, 3) at a uniform interval ``dt`` (a.u.); the components' spectra
    are summed (the isotropic trace). ``form``: ``"velocity"`` for ``omega^2 P`` (the
    classical line shape, default) or ``"dipole"`` for ``P``. ``window``: ``"hann"``,
    ``"none"`` or ``"exponential"`` (with damping time ``tau``, a.u.). ``resolution``: grid
    spacing in omega (Hartree), reached by zero padding (default 2 pi / (4 N dt)).
    ``omega_max``: highest frequency returned (Hartree; default and at most pi / dt).
    ``subtract_mean``: remove the mean dipole first (the permanent dipole gives a line at
    0). ``temperature_k``: apply the harmonic quantum correction at that temperature.
    """
    if form not in _FORMS:
        raise ValueError(f"form = {form!r}: expected one of {', '.join(_FORMS)}")
    x, step = _fluctuation(dipoles, dt, subtract_mean)
    n = x.shape[0]
    w = _window(window, n, step, tau)
    if resolution is None:
        resolution = 2 * math.pi / (4 * n * step)
    if not resolution > 0:
        raise ValueError(f"resolution = {resolution!r}: expected a spacing > 0 (Hartree)")
    size = 1 << max(
        math.ceil(math.log2(2 * math.pi / (resolution * step))), math.ceil(math.log2(n))
    )
    transform = np.fft.rfft(x * w[:, None], n=size, axis=0) * step
    power = (np.abs(transform) ** 2).sum(axis=1) / (step * float(w @ w))
    omega = np.arange(power.size) * (2 * math.pi / (size * step))
    if omega_max is not None:
        keep = omega <= float(omega_max)
        omega, power = omega[keep], power[keep]
    intensity = omega**2 * power if form == "velocity" else power
    if temperature_k is not None:
        if not temperature_k > 0:
            raise ValueError(f"temperature_k = {temperature_k!r}: expected a temperature > 0")
        x_b = omega / (BOLTZMANN_HARTREE_PER_K * float(temperature_k))
        # x / (1 - exp(-x)) = x / -expm1(-x), 1 at x = 0
        safe = np.where(x_b > 0, x_b, 1.0)
        intensity = intensity * np.where(x_b > 0, safe / -np.expm1(-safe), 1.0)
    return IRSpectrum(omega, intensity, step, n, form, window)
