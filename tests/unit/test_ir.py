"""IR spectra: line positions and intensity ratios of synthetic dipoles, a harmonic
oscillator integrated by velocity Verlet, and the autocorrelation / Parseval identities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from maxwellhub.ir import (
    BOLTZMANN_HARTREE_PER_K,
    HARTREE_CM,
    dipole_autocorrelation,
    ir_spectrum,
)

W1, W2 = 1646 / HARTREE_CM, 3665 / HARTREE_CM  # Hartree
A1, A2 = 1.0, 0.6
DT, N, TAU = 10.0, 20000, 2e4  # a.u.: T = 2e5 = 10 tau


def _two_lines(components=1):
    t = np.arange(N) * DT
    decay = np.exp(-t / TAU)
    one, two = A1 * np.cos(W1 * t) * decay, A2 * np.cos(W2 * t + 0.4) * decay
    if components == 1:
        return one + two + 0.3  # a permanent dipole too
    mu = np.zeros((N, 3))
    mu[:, 0], mu[:, 2], mu[:, 1] = one, two, -1.5
    return mu


def _peak(spec, lo, hi):
    """Position of the highest point in (lo, hi), refined by a parabola through 3 points."""
    sel = np.flatnonzero((spec.omega > lo) & (spec.omega < hi))
    k = sel[np.argmax(spec.intensity[sel])]
    y0, y1, y2 = spec.intensity[k - 1 : k + 2]
    shift = 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2)
    return spec.omega[k] + shift * (spec.omega[1] - spec.omega[0])


def _area(spec, lo, hi):
    sel = (spec.omega > lo) & (spec.omega < hi)
    return float(spec.intensity[sel].sum() * (spec.omega[1] - spec.omega[0]))


@pytest.mark.parametrize("components", [1, 3])
@pytest.mark.parametrize("form", ["velocity", "dipole"])
def test_two_damped_cosines_positions_and_ratio(components, form):
    spec = ir_spectrum(_two_lines(components), DT, form=form, resolution=1e-6)
    mid = 0.5 * (W1 + W2)
    resolution = 2 * math.pi / (N * DT)  # 3.1e-5 Hartree, 6.9 cm^-1
    assert abs(_peak(spec, 0.2 * W1, mid) - W1) < 0.05 * resolution
    assert abs(_peak(spec, mid, 2 * W2) - W2) < 0.05 * resolution
    # equal damping: the line areas go as amplitude^2 (times omega^2 in the velocity form);
    # with the Hann window the tails of one line add < 1e-4 to the other's area
    expected = (A1 / A2) ** 2 * ((W1 / W2) ** 2 if form == "velocity" else 1.0)
    ratio = _area(spec, 0.2 * W1, mid) / _area(spec, mid, 2 * W2)
    assert ratio == pytest.approx(expected, rel=1e-3)
    # the permanent dipole drops out (the mean is subtracted)
    shifted = ir_spectrum(_two_lines(components) + 5.0, DT, form=form, resolution=1e-6)
    assert np.allclose(shifted.intensity, spec.intensity, rtol=0, atol=1e-9 * spec.intensity.max())


def test_no_window_is_the_exact_discrete_transform():
    """Without a window, P is |dt sum_k mu_k exp(-i omega t_k)|^2 / (N dt) of the closed-form
    geometric sums of the two damped cosines (negative-frequency images included)."""
    mu = _two_lines() - 0.3
    spec = ir_spectrum(mu, DT, form="dipole", window="none", subtract_mean=False)
    omega = spec.omega[::97]
    r = math.exp(-DT / TAU)
    total = np.zeros(omega.size, dtype=complex)
    for a, w, phase in ((A1, W1, 0.0), (A2, W2, 0.4)):
        for sign in (1.0, -1.0):
            z = r * np.exp(1j * (sign * w - omega) * DT)
            total += 0.5 * a * np.exp(1j * sign * phase) * (1 - z**N) / (1 - z)
    expected = np.abs(DT * total) ** 2 / (N * DT)
    assert np.allclose(spec.intensity[::97], expected, rtol=1e-8, atol=1e-12 * expected.max())


def test_units_of_the_grid():
    spec = ir_spectrum(_two_lines(), DT, resolution=1e-6, omega_max=0.05)
    assert spec.omega[-1] <= 0.05 < spec.omega[-1] + 1e-6
    assert np.allclose(spec.wavenumber_cm, spec.omega * 219474.6313632)
    assert np.allclose(spec.energy_ev, spec.omega * 27.211386245988)
    assert spec.omega[1] <= 1e-6


def _verlet(omega, dt, steps, q0=1.0, v0=0.0):
    q, v = np.empty(steps), v0
    q[0] = q0
    acc = -(omega**2) * q0
    for k in range(1, steps):
        half = v + 0.5 * dt * acc
        q[k] = q[k - 1] + dt * half
        acc = -(omega**2) * q[k]
        v = half + 0.5 * dt * acc
    return q


def test_harmonic_oscillator_by_velocity_verlet_peaks_at_omega():
    omega, dt, steps = 0.01, 10.0, 1 << 14  # 2195 cm^-1; omega dt = 0.1
    spec = ir_spectrum(_verlet(omega, dt, steps), dt, resolution=1e-6)
    resolution = 2 * math.pi / (steps * dt)  # 3.8e-5 Hartree
    peak = _peak(spec, 0.0, 0.1)
    assert abs(peak - omega) < resolution
    # the integrator's own frequency, (2 / dt) asin(omega dt / 2), to a tiny part of that
    assert abs(peak - 2 / dt * math.asin(omega * dt / 2)) < 0.02 * resolution
    # a single line: nothing beyond 10 resolutions from it above 1e-3 of the peak (Hann)
    far = np.abs(spec.omega - omega) > 10 * resolution
    assert spec.intensity[far].max() < 1e-3 * spec.intensity.max()


def test_spectrum_is_the_cosine_transform_of_the_autocorrelation():
    mu = _two_lines(3)[:2000]
    lags, corr = dipole_autocorrelation(mu, DT, window="hann")
    spec = ir_spectrum(mu, DT, form="dipole", window="hann", resolution=1e-4)
    for j in (0, 3, 17, 40, 111):
        w = spec.omega[j]
        expected = DT * (corr[0] + 2 * np.sum(corr[1:] * np.cos(w * lags[1:])))
        assert spec.intensity[j] == pytest.approx(expected, rel=1e-9, abs=1e-12 * corr[0] * DT)
    assert lags[1] == DT and lags.size == 2000


def test_parseval_and_the_biased_autocorrelation():
    rng = np.random.default_rng(7)
    mu = rng.normal(size=(999, 3)) + np.array([1.0, 2.0, 3.0])
    x = mu - mu.mean(axis=0)
    _, corr = dipole_autocorrelation(mu, 0.5)
    assert corr[0] == pytest.approx((x * x).sum(axis=1).mean(), rel=1e-12)
    assert corr[5] == pytest.approx((x[:-5] * x[5:]).sum() / 999, rel=1e-10)
    # one-sided integral of P d omega / pi over [0, pi / dt] = mean |x|^2 (ends half weight)
    spec = ir_spectrum(mu, 0.5, form="dipole", window="none", resolution=1e-3)
    weights = np.ones(spec.omega.size)
    weights[[0, -1]] = 0.5
    integral = float((weights * spec.intensity).sum() * (spec.omega[1] - spec.omega[0]) / math.pi)
    assert integral == pytest.approx(corr[0], rel=1e-10)


def test_velocity_form_and_quantum_correction():
    mu = _two_lines()[:4000]
    dipole = ir_spectrum(mu, DT, form="dipole")
    classical = ir_spectrum(mu, DT)
    assert np.allclose(classical.intensity, dipole.omega**2 * dipole.intensity)
    corrected = ir_spectrum(mu, DT, temperature_k=300.0)
    x = classical.omega[1:] / (BOLTZMANN_HARTREE_PER_K * 300.0)
    assert np.allclose(corrected.intensity[1:], classical.intensity[1:] * x / (1 - np.exp(-x)))
    assert corrected.intensity[0] == classical.intensity[0]
    # at W2 (3665 cm^-1, 300 K) the factor is beta hbar omega / (1 - exp(-.)) = 17.6
    j = int(np.argmin(np.abs(classical.omega - W2)))
    assert corrected.intensity[j] / classical.intensity[j] == pytest.approx(17.6, abs=0.1)


def test_exponential_window_gives_lorentzian_lines():
    omega, dt, steps, tau = 0.02, 5.0, 1 << 14, 5000.0
    t = np.arange(steps) * dt
    spec = ir_spectrum(np.cos(omega * t), dt, form="dipole", window="exponential", tau=tau)
    k = int(np.argmax(spec.intensity))
    half = spec.intensity >= spec.intensity[k] / 2
    width = (spec.omega[half].max() - spec.omega[half].min()) / 2  # HWHM
    assert width == pytest.approx(1 / tau, rel=0.05)


def test_bad_input():
    with pytest.raises(ValueError, match="dipoles"):
        ir_spectrum(np.zeros((10, 2)), 1.0)
    with pytest.raises(ValueError, match="dt"):
        ir_spectrum(np.zeros(10), 0.0)
    with pytest.raises(ValueError, match="window"):
        ir_spectrum(np.zeros(10), 1.0, window="kaiser")
    with pytest.raises(ValueError, match="form"):
        ir_spectrum(np.zeros(10), 1.0, form="raman")
    with pytest.raises(ValueError, match="temperature"):
        ir_spectrum(np.zeros(10), 1.0, temperature_k=-1.0)


def test_docstring_examples():
    import doctest

    import maxwellhub.ir

    assert doctest.testmod(maxwellhub.ir).failed == 0
