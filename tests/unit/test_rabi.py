"""Rabi-splitting fits: synthetic two-peak spectra (equal, unequal, overlapping, noisy)
and the normal modes of two coupled oscillators integrated by velocity Verlet."""

from __future__ import annotations

import math

import numpy as np
import pytest

from maxwellhub.rabi import fit_rabi_splitting, lorentzian, rabi_splitting_from_trajectory


def _spectrum(w, lines, b0=0.0, b1=0.0):
    s = b0 + b1 * (w - 0.5 * (w[0] + w[-1]))
    for centre, fwhm, height in lines:
        s = s + lorentzian(w, centre, fwhm, height)
    return s


@pytest.mark.parametrize(
    "lines",
    [
        [(0.45, 0.02, 1.0), (0.55, 0.02, 1.0)],  # equal, resolved
        [(0.45, 0.03, 1.0), (0.55, 0.015, 0.15)],  # unequal heights and widths
        [(0.48, 0.05, 1.0), (0.52, 0.04, 0.5)],  # overlapping: one maximum only
        [(0.49, 0.04, 0.3), (0.52, 0.05, 1.0)],  # a shoulder below the stronger line
    ],
)
def test_exact_two_peak_spectra(lines):
    w = np.linspace(0.3, 0.7, 1601)
    s = _spectrum(w, lines, b0=0.05, b1=-0.3)
    fit = fit_rabi_splitting(w, s)
    (c1, g1, h1), (c2, g2, h2) = lines
    assert fit.lower == pytest.approx(c1, abs=1e-9)
    assert fit.upper == pytest.approx(c2, abs=1e-9)
    assert fit.splitting == pytest.approx(c2 - c1, abs=1e-9)
    assert (fit.lower_width, fit.upper_width) == pytest.approx((g1, g2), abs=1e-8)
    assert (fit.lower_height, fit.upper_height) == pytest.approx((h1, h2), abs=1e-8)
    assert fit.background == pytest.approx((0.05, -0.3), abs=1e-8)
    assert fit.rms_residual < 1e-10


def test_single_maximum_start_for_overlapping_lines():
    w = np.linspace(0.3, 0.7, 801)
    s = _spectrum(w, [(0.49, 0.06, 1.0), (0.51, 0.06, 0.8)])
    inner = (s[1:-1] > s[:-2]) & (s[1:-1] >= s[2:])
    assert inner.sum() == 1  # the two lines merge into one maximum
    fit = fit_rabi_splitting(w, s)
    assert fit.splitting == pytest.approx(0.02, abs=1e-8)


def test_noisy_spectrum_errors_match_the_scatter():
    w = np.linspace(0.3, 0.7, 401)
    clean = _spectrum(w, [(0.46, 0.03, 1.0), (0.55, 0.04, 0.6)], b0=0.1)
    rng = np.random.default_rng(3)
    fits = [fit_rabi_splitting(w, clean + rng.normal(0, 0.01, w.size)) for _ in range(40)]
    splits = np.array([f.splitting for f in fits])
    reported = np.mean([f.splitting_error for f in fits])
    # the fitted splittings scatter about the truth as the reported one-sigma error says
    assert abs(splits.mean() - 0.09) < 3 * reported / math.sqrt(len(fits))
    assert 0.7 < splits.std(ddof=1) / reported < 1.4
    lowers = np.array([f.lower for f in fits])
    assert 0.7 < lowers.std(ddof=1) / np.mean([f.lower_error for f in fits]) < 1.4


def test_range_and_guess():
    w = np.linspace(0.0, 1.0, 2001)
    # a third, unrelated line outside the range must not matter
    s = _spectrum(w, [(0.45, 0.02, 1.0), (0.55, 0.03, 0.7), (0.9, 0.02, 3.0)])
    fit = fit_rabi_splitting(w, s, omega_range=(0.3, 0.7), guess=(0.57, 0.44))
    assert (fit.lower, fit.upper) == pytest.approx((0.45, 0.55), abs=1e-5)
    with pytest.raises(ValueError, match="at least 9"):
        fit_rabi_splitting(w, s, omega_range=(0.3, 0.302))
    with pytest.raises(ValueError, match="1-D"):
        fit_rabi_splitting(w, s[:-1])


def _coupled_verlet(k, dt, steps):
    """Velocity Verlet of q'' = -K q for two oscillators, started at q = (1, 0), v = 0."""
    (k11, k12), (k21, k22) = k
    q1, q2, v1, v2 = 1.0, 0.0, 0.0, 0.0
    out = np.empty(steps)
    out[0] = q1
    a1, a2 = -(k11 * q1 + k12 * q2), -(k21 * q1 + k22 * q2)
    for n in range(1, steps):
        v1 += 0.5 * dt * a1
        v2 += 0.5 * dt * a2
        q1 += dt * v1
        q2 += dt * v2
        a1, a2 = -(k11 * q1 + k12 * q2), -(k21 * q1 + k22 * q2)
        v1 += 0.5 * dt * a1
        v2 += 0.5 * dt * a2
        out[n] = q1
    return out


@pytest.mark.parametrize(("omega_c", "g"), [(0.0075, 4e-4), (0.0079, 2.5e-4)])
def test_coupled_oscillators_normal_mode_splitting(omega_c, g):
    """Cavity mode omega_c coupled to a molecular mode omega_0 = 0.0075 Hartree (1646 cm^-1)
    through K_12 = 2 g sqrt(omega_c omega_0): the exact polaritons are the square roots of
    the eigenvalues of K; the cavity coordinate's spectrum shows both."""
    omega_0, dt, steps = 0.0075, 10.0, 1 << 15
    coupling = 2 * g * math.sqrt(omega_c * omega_0)
    k = np.array([[omega_c**2, coupling], [coupling, omega_0**2]])
    exact = np.sqrt(np.linalg.eigvalsh(k))
    fit = rabi_splitting_from_trajectory(_coupled_verlet(k, dt, steps), dt)
    resolution = 2 * math.pi / (steps * dt)  # 1.9e-5 Hartree, 4.2 cm^-1
    assert fit.splitting == pytest.approx(exact[1] - exact[0], abs=0.1 * resolution)
    assert fit.lower == pytest.approx(exact[0], abs=0.2 * resolution)
    assert fit.upper == pytest.approx(exact[1], abs=0.2 * resolution)
    # what is left is the integrator's own dispersion: Verlet turns each normal mode at
    # (2 / dt) asin(Omega dt / 2), 2e-6 above Omega here; the fit finds that frequency
    verlet = 2 / dt * np.arcsin(exact * dt / 2)
    assert (fit.lower, fit.upper) == pytest.approx(tuple(verlet), abs=1e-3 * resolution)
    assert fit.splitting_error < 1e-3 * resolution
    # the exponential window makes lines of full width 2 / tau, tau = T / ln(1e4)
    tau = (steps - 1) * dt / math.log(1e4)
    assert (fit.lower_width, fit.upper_width) == pytest.approx((2 / tau, 2 / tau), rel=1e-3)
    # the heights: the cavity coordinate holds each mode with its eigenvector's weight^2
    weights = np.linalg.eigh(k)[1][0] ** 2
    assert fit.lower_height / fit.upper_height == pytest.approx(
        (weights[0] / weights[1]) ** 2, rel=1e-2
    )


def test_trajectory_needs_one_component():
    with pytest.raises(ValueError, match="one component"):
        rabi_splitting_from_trajectory(np.zeros((100, 3)), 1.0)


def test_docstring_examples():
    import doctest

    import maxwellhub.rabi

    assert doctest.testmod(maxwellhub.rabi).failed == 0
