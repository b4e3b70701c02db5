"""Pulse shapes for drives and lasers: Gaussian, sin^2, linearly chirped, continuous wave.

Every pulse is a frozen dataclass; calling it on times gives the field

    E(t) = envelope(t) * cos(phase(t))

with ``phase(t) = omega t + phi`` (the carrier phase is referenced to t = 0, not to the
pulse centre), except the chirped pulse, whose phase is ``omega t + beta (t - t0)^2 / 2 +
phi``, so its instantaneous frequency d phase / dt is ``omega + beta (t - t0)``. The
functions :func:`gaussian_pulse`, :func:`sin2_pulse`, :func:`chirped_pulse` and
:func:`continuous_wave` evaluate the same fields in one call (arrays in, arrays out).

:func:`envelope_area` is the integral of the envelope (closed forms, no quadrature); a
two-level system with transition dipole ``mu12`` driven resonantly in the rotating-wave
regime by ``E(t)`` with coupling ``-E mu12 sigma_x`` turns its Bloch vector by the pulse
area ``mu12 * envelope_area(pulse)``: pi inverts it. :func:`scaled_to_area` rescales the
amplitude ``e0`` to a given area.

Units: atomic units throughout (time in a.u., angular frequencies in Hartree, fields in
a.u., ``beta`` in Hartree / a.u. of time). Pure numpy: no I/O, no plotting.

Example (a pi pulse for mu12 = 2 a.u.)::

    >>> import numpy as np
    >>> from maxwellhub.pulses import GaussianPulse, envelope_area, scaled_to_area
    >>> pulse = scaled_to_area(GaussianPulse(e0=1.0, omega=0.25, t0=600, sigma=100), np.pi / 2)
    >>> round(pulse.e0 * 100 * np.sqrt(2 * np.pi) * 2, 12) == round(np.pi, 12)
    True
    >>> round(2 * envelope_area(pulse), 12) == round(np.pi, 12)
    True
    >>> t = np.arange(0.0, 1200.0, 0.5)
    >>> field = pulse(t)
    >>> field.shape, bool(abs(field).max() <= pulse.e0)
    ((2400,), True)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ChirpedPulse",
    "ContinuousWave",
    "GaussianPulse",
    "Pulse",
    "Sin2Pulse",
    "chirped_pulse",
    "continuous_wave",
    "envelope_area",
    "gaussian_pulse",
    "scaled_to_area",
    "sin2_pulse",
]


def _times(t) -> np.ndarray:
    return np.asarray(t, dtype=np.float64)


class _Carrier:
    """Field = envelope * cos(phase); the phase is omega t + phi unless overridden."""

    e0: float
    omega: float
    phi: float

    def envelope(self, t) -> np.ndarray:  # pragma: no cover - every pulse overrides it
        raise NotImplementedError

    def phase(self, t) -> np.ndarray:
        """The carrier phase (rad) at times ``t``."""
        return self.omega * _times(t) + self.phi

    def instantaneous_frequency(self, t) -> np.ndarray:
        """d phase / dt (Hartree) at times ``t``."""
        return np.full_like(_times(t), self.omega)

    def __call__(self, t) -> np.ndarray:
        """The field E(t) (a.u.) at times ``t`` (a.u.)."""
        return self.envelope(t) * np.cos(self.phase(t))


@dataclass(frozen=True)
class GaussianPulse(_Carrier):
    """``e0 exp(-(t - t0)^2 / (2 sigma^2)) cos(omega t + phi)``; ``sigma`` is the standard
    deviation of the field envelope (the intensity FWHM is 2 sqrt(ln 2) sigma)."""

    e0: float  #: peak field (a.u.)
    omega: float  #: carrier angular frequency (Hartree)
    t0: float  #: centre (a.u.)
    sigma: float  #: envelope width (a.u.), > 0
    phi: float = 0.0  #: carrier phase at t = 0 (rad)

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"sigma = {self.sigma!r}: expected a width > 0 (a.u.)")

    def envelope(self, t) -> np.ndarray:
        """The envelope (a.u.) at times ``t``."""
        return self.e0 * np.exp(-0.5 * ((_times(t) - self.t0) / self.sigma) ** 2)


@dataclass(frozen=True)
class ChirpedPulse(GaussianPulse):
    """A Gaussian pulse with a linear chirp: phase ``omega t + beta (t - t0)^2 / 2 + phi``,
    instantaneous frequency ``omega + beta (t - t0)`` (up-chirp for ``beta > 0``)."""

    beta: float = 0.0  #: chirp rate (Hartree per a.u. of time)

    def phase(self, t) -> np.ndarray:
        """The carrier phase (rad) at times ``t``."""
        t = _times(t)
        return self.omega * t + 0.5 * self.beta * (t - self.t0) ** 2 + self.phi

    def instantaneous_frequency(self, t) -> np.ndarray:
        """d phase / dt = omega + beta (t - t0) (Hartree) at times ``t``."""
        return self.omega + self.beta * (_times(t) - self.t0)


@dataclass(frozen=True)
class Sin2Pulse(_Carrier):
    """``e0 sin^2(pi (t - t0) / duration) cos(omega t + phi)`` on ``[t0, t0 + duration]``,
    zero outside (the envelope FWHM is duration / 2)."""

    e0: float  #: peak field (a.u.), reached at t0 + duration / 2
    omega: float  #: carrier angular frequency (Hartree)
    t0: float  #: start (a.u.)
    duration: float  #: length T (a.u.), > 0
    phi: float = 0.0  #: carrier phase at t = 0 (rad)

    def __post_init__(self) -> None:
        if not self.duration > 0:
            raise ValueError(f"duration = {self.duration!r}: expected a length > 0 (a.u.)")

    def envelope(self, t) -> np.ndarray:
        """The envelope (a.u.) at times ``t``."""
        u = _times(t) - self.t0
        inside = (u >= 0) & (u <= self.duration)
        return np.where(inside, self.e0 * np.sin(math.pi * u / self.duration) ** 2, 0.0)


@dataclass(frozen=True)
class ContinuousWave(_Carrier):
    """``e0 cos(omega t + phi)`` at all times (a constant envelope)."""

    e0: float  #: amplitude (a.u.)
    omega: float  #: angular frequency (Hartree)
    phi: float = 0.0  #: phase at t = 0 (rad)

    def envelope(self, t) -> np.ndarray:
        """The envelope (a.u.) at times ``t``: ``e0`` everywhere."""
        return np.full_like(_times(t), self.e0)


Pulse = GaussianPulse | ChirpedPulse | Sin2Pulse | ContinuousWave


def envelope_area(pulse: Pulse, t_start: float = -math.inf, t_end: float = math.inf) -> float:
    """The integral of ``pulse.envelope`` from ``t_start`` to ``t_end`` (a.u. of field x
    time), in closed form: ``e0 sigma sqrt(2 pi)`` for a whole Gaussian (chirped or not),
    ``e0 duration / 2`` for a whole sin^2 pulse; a continuous wave needs finite limits.
    The RWA pulse area of a two-level system is ``mu12`` times this (pi: inversion)."""
    a, b = float(t_start), float(t_end)
    if not a <= b:
        raise ValueError(f"t_start = {t_start!r} > t_end = {t_end!r}")
    if isinstance(pulse, GaussianPulse):
        scale = pulse.sigma * math.sqrt(2.0)
        return (
            pulse.e0
            * pulse.sigma
            * math.sqrt(math.pi / 2.0)
            * (math.erf((b - pulse.t0) / scale) - math.erf((a - pulse.t0) / scale))
        )
    if isinstance(pulse, Sin2Pulse):
        length = pulse.duration

        def primitive(t: float) -> float:
            u = min(max(t - pulse.t0, 0.0), length)
            return u / 2.0 - length / (4.0 * math.pi) * math.sin(2.0 * math.pi * u / length)

        return pulse.e0 * (primitive(b) - primitive(a))
    if isinstance(pulse, ContinuousWave):
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(
                "a continuous wave has a finite envelope area only between finite times"
            )
        return pulse.e0 * (b - a)
    raise TypeError(f"envelope_area: not a pulse of this module: {pulse!r}")


def scaled_to_area(
    pulse: Pulse, area: float, t_start: float = -math.inf, t_end: float = math.inf
) -> Pulse:
    """A copy of ``pulse`` with ``e0`` scaled so that its envelope area (between ``t_start``
    and ``t_end``) is ``area``; for a pi pulse of a transition dipole ``mu12`` give
    ``area = pi / mu12``."""
    current = envelope_area(pulse, t_start, t_end)
    if current == 0:
        raise ValueError("the pulse has zero envelope area; it cannot be scaled")
    return dataclasses.replace(pulse, e0=pulse.e0 * area / current)


def gaussian_pulse(t, e0: float, omega: float, t0: float, sigma: float, phi: float = 0.0):
    """``e0 exp(-(t - t0)^2 / (2 sigma^2)) cos(omega t + phi)`` at times ``t`` (a.u.)."""
    return GaussianPulse(e0, omega, t0, sigma, phi)(t)


def chirped_pulse(
    t, e0: float, omega: float, t0: float, sigma: float, beta: float, phi: float = 0.0
):
    """``e0 exp(-(t - t0)^2 / (2 sigma^2)) cos(omega t + beta (t - t0)^2 / 2 + phi)``: the
    instantaneous frequency is ``omega + beta (t - t0)``."""
    return ChirpedPulse(e0, omega, t0, sigma, phi, beta)(t)


def sin2_pulse(t, e0: float, omega: float, t0: float, duration: float, phi: float = 0.0):
    """``e0 sin^2(pi (t - t0) / duration) cos(omega t + phi)`` on ``[t0, t0 + duration]``,
    zero elsewhere."""
    return Sin2Pulse(e0, omega, t0, duration, phi)(t)


def continuous_wave(t, e0: float, omega: float, phi: float = 0.0):
    """``e0 cos(omega t + phi)`` at times ``t`` (a.u.)."""
    return ContinuousWave(e0, omega, phi)(t)
