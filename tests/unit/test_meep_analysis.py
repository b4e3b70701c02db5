"""Kernels and the decay-rate analysis (no Meep needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from maxwellhub.analysis import compare_to_curve, fit_decay_rate, golden_rule_rate, relaxation_curve
from maxwellhub.em import kernel_weights
from maxwellhub.errors import UsageError


def _grid(d: int, dx: float = 0.1, half: int = 8) -> np.ndarray:
    axis = np.arange(-half, half + 1) * dx
    return np.stack(np.meshgrid(*[axis] * d, indexing="ij"), axis=-1).reshape(-1, d)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("sigma", [0.0, 0.1, 0.17])
def test_kernel_is_normalised_on_the_grid(d, sigma):
    """sum(w) dV is exactly 1 for Gaussian and point kernels in 1, 2 and 3 dimensions."""
    center = np.array([0.013, -0.027, 0.041])[:d]
    w = kernel_weights(_grid(d), center, sigma, 0.1)
    assert w.sum() * 0.1**d == pytest.approx(1.0, abs=1e-13)
    assert (w >= 0).all()


@pytest.mark.parametrize("d", [1, 2, 3])
def test_point_kernel_interpolates_linear_fields(d):
    """The point kernel reads a linear field exactly at the molecule's centre."""
    grid = _grid(d)
    center = np.array([0.013, -0.027, 0.041])[:d]
    slope = np.array([1.0, -2.0, 0.5])[:d]
    w = kernel_weights(grid, center, 0.0, 0.1)
    assert (w * (grid @ slope)).sum() * 0.1**d == pytest.approx(center @ slope, abs=1e-13)


def test_gaussian_kernel_is_centred():
    """The Gaussian kernel's discrete first moment is its centre (within the grid)."""
    grid = _grid(2)
    center = np.array([0.05, -0.02])
    w = kernel_weights(grid, center, 0.15, 0.1)
    np.testing.assert_allclose((w[:, None] * grid).sum(axis=0) * 0.01, center, atol=1e-3)


def test_kernel_off_the_grid_is_refused():
    """A kernel that covers no grid point is a usage error."""
    with pytest.raises(UsageError, match="covers no grid point"):
        kernel_weights(_grid(1), np.array([5.0]), 0.0, 0.1)


def test_golden_rule_rates():
    """1D mu^2 w, 2D mu^2 w^2 / 2, 3D mu^2 w^3 / (3 pi); sigma adds exp(-w^2 sigma^2)."""
    assert golden_rule_rate(1, 2.0, 0.1) == pytest.approx(0.02)
    assert golden_rule_rate(2, 2.0, 0.1) == pytest.approx(0.02)
    assert golden_rule_rate(3, 2.0, 0.1) == pytest.approx(0.08 / (3 * math.pi))
    assert golden_rule_rate(2, 1.0, 0.1, sigma=0.1) == pytest.approx(0.005 * math.exp(-0.01))
    with pytest.raises(ValueError, match="dimensions"):
        golden_rule_rate(4, 1.0, 0.1)


@pytest.mark.parametrize("p0", [1e-4, 0.1, 0.9])
def test_fit_recovers_the_rate_of_the_analytic_curve(p0):
    """The fit returns the gamma of an exact relaxation curve, and the curve compares to
    itself with zero deviation."""
    t = np.linspace(0, 90, 1801)
    p = relaxation_curve(t, 0.0123, p0)
    assert p[0] == pytest.approx(p0)
    assert fit_decay_rate(t, p) == pytest.approx(0.0123, rel=1e-10)
    assert compare_to_curve(t, p, 0.0123) == pytest.approx({"std": 0.0, "max": 0.0}, abs=1e-12)


def test_fit_averages_a_fast_ripple():
    """A 2-omega ripple of 0.3% (as non-RWA dynamics give) barely moves the fitted rate."""
    t = np.linspace(0, 90, 1801)
    p = relaxation_curve(t, 0.005, 1e-4) * (1 + 0.003 * np.sin(2.0 * t))
    assert fit_decay_rate(t, p) == pytest.approx(0.005, rel=2e-3)


def test_self_coulomb_vanishes_for_divergence_free_kernels():
    """Ez in 2D and any component in a 1D cell have no self Coulomb field; an in-plane or
    3D Gaussian has one ~ 1/(3 (2 pi)^(3/2) sigma^3) along its axis (continuum value)."""
    from maxwellhub.em.kernels import self_coulomb_matrices

    offsets = np.array([[0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]])  # Ex, Ey, Ez Yee shifts
    centers = np.array([[0.013, -0.02, 0.03]])
    sigma = np.array([0.1])
    ez_2d = self_coulomb_matrices(
        centers,
        sigma,
        np.array([[False, False, True]]),
        offsets * [1, 1, 0],
        np.array([True, True, False]),
        0.1,
    )
    assert np.abs(ez_2d).max() == 0.0
    x_3d = self_coulomb_matrices(
        centers, sigma, np.array([[True, False, False]]), offsets, np.array([True, True, True]), 0.1
    )[0]
    continuum = 1 / (3 * (2 * math.pi) ** 1.5 * 0.1**3 * 2**1.5)  # <w, Pi_L w>, Gaussian
    assert x_3d[0, 0] == pytest.approx(continuum, rel=0.15)
    assert np.abs(x_3d[1:, :]).max() == 0.0 and np.abs(x_3d[:, 1:]).max() == 0.0
