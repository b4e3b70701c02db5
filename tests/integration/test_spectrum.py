"""The absorption-spectrum tool: on synthetic kick responses with known excitations, and
on rttddft trajectories against PySCF's full linear-response TDHF/TDDFT (not TDA)."""

from __future__ import annotations

import numpy as np
import pytest
from _util import REPO_ROOT
from pyscf import tdscf

from maxwellhub.models.rttddft import RTTDDFTModel
from maxwellhub.spectrum import HARTREE_EV, absorption_spectrum, fit_peaks

WATER = str(REPO_ROOT / "examples" / "molecules" / "water.xyz")


def _response(t, energies, strengths):
    """alpha(t) = sum_n (f_n / w_n) sin(w_n t): the exact linear kick response."""
    return (strengths / energies * np.sin(np.outer(t, energies))).sum(axis=1)


def test_synthetic_peaks_are_recovered_exactly():
    """Close and weak excitations (0.54 eV apart, 1:10; the lines' half-width is 0.25 eV)
    from a short trajectory: fitted energies to 1e-7 Hartree and strengths to 1e-5, with a
    permanent dipole offset."""
    energies = np.array([0.30, 0.32, 0.45, 0.9])
    strengths = np.array([0.5, 0.05, 0.2, 0.05])
    t = np.arange(0.0, 1000.0, 0.2)
    kappa = 1e-3
    dipole = 0.7 + kappa * _response(t, energies, strengths)
    spectrum = absorption_spectrum(t, dipole, kick=kappa, omega_max=2.0)
    assert spectrum.strength.min() >= 0.0  # no abs() anywhere
    peaks = fit_peaks(spectrum, energy_range_au=(0.1, 1.2), min_relative=0.01)
    np.testing.assert_allclose(peaks.energy_au, energies, atol=1e-7)
    np.testing.assert_allclose(peaks.strength, strengths, atol=1e-5)
    np.testing.assert_allclose(peaks.relative, strengths / strengths.max(), atol=1e-4)


def test_area_of_the_strength_function_is_the_oscillator_strength():
    """Integrated S(omega) over a peak is its oscillator strength (f-sum of one line)."""
    t = np.arange(0.0, 2000.0, 0.1)
    spectrum = absorption_spectrum(
        t,
        1e-4 * _response(t, np.array([0.5]), np.array([0.8])),
        kick=1e-4,
        tau=100.0,
        omega_max=3.0,
    )
    d_omega = spectrum.omega[1] - spectrum.omega[0]
    assert spectrum.strength.sum() * d_omega == pytest.approx(0.8, rel=2e-2)
    # the maximum of S = (2 omega / pi) Im alpha sits gamma² / omega above the line
    peak = spectrum.omega[np.argmax(spectrum.strength)]
    assert peak == pytest.approx(0.5 + 0.01**2 / 0.5, abs=2 * d_omega)


def test_kick_vector_projects_the_dipole():
    """(T, 3) dipoles with a kick vector kappa e give e . alpha . e: a response only along
    x seen by a kick along (1, 1, 0)/sqrt(2) carries half its strength."""
    t = np.arange(0.0, 800.0, 0.2)
    kick = 1e-3 * np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    alpha_xx = _response(t, np.array([0.4]), np.array([0.6]))
    dipoles = np.zeros((t.size, 3))
    dipoles[:, 0] = alpha_xx * kick[0]  # delta mu = alpha . kick, alpha = diag(alpha_xx, 0, 0)
    peaks = fit_peaks(absorption_spectrum(t, dipoles, kick=kick), energy_range_au=(0.1, 1.0))
    assert peaks.energy_au == pytest.approx([0.4], abs=1e-7)
    assert peaks.strength == pytest.approx([0.3], abs=1e-5)


def test_bad_input_is_named():
    t = np.arange(0.0, 10.0, 0.1)
    with pytest.raises(ValueError, match="times: expected uniform"):
        absorption_spectrum(np.r_[t, 20.0], np.zeros(t.size + 1), kick=1e-3)
    with pytest.raises(ValueError, match=r"dipoles: expected shape \(100,\)"):
        absorption_spectrum(t, np.zeros((t.size, 2)), kick=1e-3)
    with pytest.raises(ValueError, match=r"kick: with \(T, 3\) dipoles"):
        absorption_spectrum(t, np.zeros((t.size, 3)), kick=1e-3)
    with pytest.raises(ValueError, match="kick: with one dipole component"):
        absorption_spectrum(t, np.zeros(t.size), kick=0.0)


def _reference_peaks(f, e, count=3):
    """The ``count`` lowest LR excitations with f >= 0.01 and no excitation 10x stronger
    within 0.5 eV (a weak line on a strong one's flank cannot be fitted to 0.02 eV)."""
    ev = e * HARTREE_EV
    chosen = [
        i
        for i in range(e.size)
        if f[i] >= 0.01 and not np.any((np.abs(ev - ev[i]) < 0.5) & (f > 10 * f[i]))
    ]
    return chosen[:count]


@pytest.mark.slow
@pytest.mark.parametrize("xc", ["hf", "lda"])
def test_kick_spectrum_matches_linear_response(xc):
    """Water/STO-3G in its principal frame (C2v axes along x, y, z), one kick of 1e-4 along
    (1, 1, 1)/sqrt(3), ETRS at dt = 0.05 a.u. for T = 1000 a.u.: the three lowest bright
    excitations lie within 0.02 eV of PySCF's full TDHF/TDDFT on the same grid (measured
    2-4 meV), their strength ratios within 5% (measured < 1%), and S(omega) >= 0 without
    any abs() up to 2 Hartree (far above the valence peaks, near the Nyquist frequency, the
    truncation ripple reaches -8e-8 (HF) and -3e-6 (LDA) of the highest peak)."""
    kappa, dt, t_end = 1e-4, 0.05, 1000.0
    e = np.ones(3) / np.sqrt(3.0)
    model = RTTDDFTModel(
        xyz=WATER,
        xc=xc,
        grid_level=0,
        kick_au=kappa,
        kick_direction=e,
        propagator="etrs",
        dt_substep_au=dt,
    )
    model.initialize(dt_au=dt)
    steps = round(t_end / dt)
    dipoles = np.empty((steps + 1, 3))
    dipoles[0] = model.get_state()["dipole"][0]
    no_field = np.zeros((1, 3))
    for k in range(steps):
        model.step(no_field)
        extras = model.extras_of(0)
        dipoles[k + 1] = extras["mux_au"], extras["muy_au"], extras["muz_au"]
    spectrum = absorption_spectrum(
        np.arange(steps + 1) * dt, dipoles, kick=kappa * e, omega_max=2.0
    )
    assert spectrum.strength.min() >= 0.0  # no abs() anywhere
    peaks = fit_peaks(spectrum, energy_range_au=(0.05, 1.6), min_relative=0.002)

    td = (tdscf.TDHF if xc == "hf" else tdscf.TDDFT)(model.core.mf)
    td.nstates = 12
    td.verbose = 0
    td.kernel()
    f = np.asarray(td.oscillator_strength())
    chosen = _reference_peaks(f, np.asarray(td.e))
    assert len(chosen) == 3
    rt_energy = np.array(peaks.energy_au)
    matched = [int(np.argmin(np.abs(rt_energy - td.e[i]))) for i in chosen]
    for i, j in zip(chosen, matched, strict=True):
        assert abs(rt_energy[j] - td.e[i]) * HARTREE_EV < 0.02
    rt_strength = np.array(peaks.strength)[matched]
    ratios_rt = rt_strength[1:] / rt_strength[0]
    ratios_lr = f[chosen][1:] / f[chosen][0]
    np.testing.assert_allclose(ratios_rt, ratios_lr, rtol=0.05)
