"""Pulse shapes: envelope areas against quadrature, the chirp's instantaneous frequency
from the field itself, and a pi pulse inverting the repository's two-level system."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.signal import hilbert

from maxwellhub.pulses import (
    ChirpedPulse,
    ContinuousWave,
    GaussianPulse,
    Sin2Pulse,
    chirped_pulse,
    continuous_wave,
    envelope_area,
    gaussian_pulse,
    scaled_to_area,
    sin2_pulse,
)


def _trapezoid(y, x):
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


def test_gaussian_area_matches_quadrature_and_closed_form():
    pulse = GaussianPulse(e0=0.03, omega=0.2, t0=400.0, sigma=70.0, phi=0.3)
    t = np.linspace(400.0 - 12 * 70, 400.0 + 12 * 70, 200001)
    numeric = _trapezoid(pulse.envelope(t), t)
    assert numeric == pytest.approx(0.03 * 70.0 * math.sqrt(2 * math.pi), rel=1e-10)
    assert envelope_area(pulse) == pytest.approx(numeric, rel=1e-10)
    # a partial window: from the centre on, half the area
    assert envelope_area(pulse, 400.0) == pytest.approx(numeric / 2, rel=1e-12)
    part = np.linspace(400.0 - 12 * 70, 330.0, 100001)
    assert envelope_area(pulse, -math.inf, 330.0) == pytest.approx(
        _trapezoid(pulse.envelope(part), part), rel=1e-8
    )


def test_sin2_area_matches_quadrature_and_closed_form():
    pulse = Sin2Pulse(e0=0.5, omega=1.0, t0=-20.0, duration=300.0)
    t = np.linspace(-50.0, 320.0, 370001)
    numeric = _trapezoid(pulse.envelope(t), t)
    assert numeric == pytest.approx(0.5 * 300.0 / 2, rel=1e-8)
    assert envelope_area(pulse) == pytest.approx(75.0, rel=1e-14)
    part = np.linspace(0.0, 100.0, 100001)
    assert envelope_area(pulse, 0.0, 100.0) == pytest.approx(
        _trapezoid(pulse.envelope(part), part), rel=1e-8
    )
    assert pulse.envelope(np.array([-20.0 - 1e-9, 280.0 + 1e-9])).tolist() == [0.0, 0.0]
    assert float(pulse.envelope(130.0)) == pytest.approx(0.5)


def test_continuous_wave_area_needs_finite_limits():
    cw = ContinuousWave(e0=2.0, omega=0.1)
    assert envelope_area(cw, 1.0, 4.0) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="finite"):
        envelope_area(cw)


def test_function_forms_equal_the_classes():
    t = np.linspace(0, 500, 777)
    assert np.array_equal(
        gaussian_pulse(t, 1.0, 0.3, 250, 40, 0.1), GaussianPulse(1.0, 0.3, 250, 40, 0.1)(t)
    )
    assert np.array_equal(sin2_pulse(t, 1.0, 0.3, 50, 300), Sin2Pulse(1.0, 0.3, 50, 300)(t))
    assert np.array_equal(continuous_wave(t, 0.2, 0.3, 1.0), 0.2 * np.cos(0.3 * t + 1.0))
    expected = np.exp(-0.5 * ((t - 250) / 40) ** 2) * np.cos(0.3 * t + 2e-4 * (t - 250) ** 2 / 2)
    assert np.allclose(chirped_pulse(t, 1.0, 0.3, 250, 40, 2e-4), expected, rtol=0, atol=1e-14)


def test_chirp_instantaneous_frequency_from_the_field():
    omega, beta, t0, sigma = 1.0, 1e-3, 500.0, 60.0
    pulse = ChirpedPulse(e0=1.0, omega=omega, t0=t0, sigma=sigma, beta=beta, phi=0.7)
    t = np.arange(0.0, 1000.0, 0.05)
    # the phase of the analytic signal of the field, differentiated numerically
    phase = np.unwrap(np.angle(hilbert(pulse(t))))
    measured = np.gradient(phase, t)
    core = np.abs(t - t0) <= 2 * sigma
    expected = omega + beta * (t[core] - t0)
    assert np.abs(measured[core] - expected).max() < 1e-3  # the chirp spans +-0.12
    assert np.allclose(pulse.instantaneous_frequency(t), omega + beta * (t - t0))
    assert np.allclose(np.gradient(pulse.phase(t), t)[1:-1], omega + beta * (t[1:-1] - t0))


def test_scaled_to_area_and_bad_parameters():
    pulse = scaled_to_area(Sin2Pulse(1.0, 0.2, 0.0, 100.0), math.pi)
    assert pulse.e0 == pytest.approx(2 * math.pi / 100.0)
    with pytest.raises(ValueError, match="sigma"):
        GaussianPulse(1.0, 0.2, 0.0, 0.0)
    with pytest.raises(ValueError, match="duration"):
        Sin2Pulse(1.0, 0.2, 0.0, -1.0)
    with pytest.raises(ValueError, match="zero envelope area"):
        scaled_to_area(GaussianPulse(0.0, 0.2, 0.0, 10.0), 1.0)


def _drive_tls(pulse, omega, mu12, dt, t_end):
    from maxwellhub.models import create_model

    model = create_model("tls", n=1, omega=omega, mu12=mu12, orientation=2)
    model.initialize(dt_au=dt)
    steps = round(t_end / dt)
    # the field held over each step is the pulse at the step's midpoint
    field = pulse((np.arange(steps) + 0.5) * dt)
    for value in field:
        model.step(np.array([[0.0, 0.0, value]]))
    return model.extras_of(0)["Pe"]


@pytest.mark.parametrize(
    ("area", "expected"), [(math.pi, 1.0), (math.pi / 2, 0.5), (2 * math.pi, 0.0)]
)
def test_tls_pulse_area_sets_the_final_population(area, expected):
    omega, mu12, sigma = 0.25, 2.0, 150.0
    # the peak Rabi frequency mu12 e0 = area / (sigma sqrt(2 pi)) <= 0.017 << omega: RWA
    pulse = scaled_to_area(
        GaussianPulse(e0=1.0, omega=omega, t0=6 * sigma, sigma=sigma), area / mu12
    )
    assert mu12 * envelope_area(pulse) == pytest.approx(area)
    pe = _drive_tls(pulse, omega, mu12, dt=0.1, t_end=12 * sigma)
    assert pe == pytest.approx(expected, abs=1e-2)


def test_docstring_examples():
    import doctest

    import maxwellhub.pulses

    assert doctest.testmod(maxwellhub.pulses).failed == 0
