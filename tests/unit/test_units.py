"""Meep <-> atomic-unit conversions against the reference numbers of docs/reference/units.md
(tau = 0.1 fs)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from maxwellhub.units import AU_TIME_FS, MeepUnits


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0, 2.5])
def test_field_factor_matches_reference(tau):
    """E_au = E_meep * 1.2929541569381223e-6 / tau**2 (to CODATA differences, 1e-8)."""
    assert MeepUnits(tau).efield_meep_to_au(1.0) == pytest.approx(
        1.2929541569381223e-6 / tau**2, rel=1e-8
    )


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0, 2.5])
def test_source_factor_is_independent_of_tau(tau):
    """(dmu/dt)_meep = (dmu/dt)_au * 0.002209799779149953 whatever tau is."""
    assert MeepUnits(tau).source_au_to_meep(1.0) == pytest.approx(0.002209799779149953, rel=1e-8)


def test_frequency_and_dipole_at_tenth_of_femtosecond():
    """At tau = 0.1 fs, omega = 1 is 0.241888 a.u. and a dipole of 0.1 is 187.08 a.u."""
    units = MeepUnits(0.1)
    assert units.frequency_meep_to_au(1.0) == pytest.approx(0.241888, abs=5e-7)
    assert units.dipole_meep_to_au(0.1) == pytest.approx(187.08, abs=5e-3)


@pytest.mark.parametrize("tau", [0.05, 0.1, 1.0])
def test_interaction_energy_is_consistent(tau):
    """E_au * mu_au == E_meep * mu_meep * (hbar/tau in hartree)."""
    units = MeepUnits(tau)
    e_meep, mu_meep = 0.37, 0.021
    lhs = units.efield_meep_to_au(e_meep) * units.dipole_meep_to_au(mu_meep)
    assert lhs == pytest.approx(e_meep * mu_meep * AU_TIME_FS / tau, rel=1e-14)


def test_time_and_source_units_agree():
    """dmu/dt converts as dipole / time, and the time unit is tau fs."""
    units = MeepUnits(0.2)
    assert units.time_meep_to_au(1.0) == pytest.approx(0.2 / 0.024188843265857, rel=1e-12)
    assert units.source_meep_to_au(1.0) == pytest.approx(units.dipole_au / units.time_au, rel=1e-14)


def test_round_trips_and_arrays():
    """Every *_to_meep undoes its *_to_au, element-wise on arrays."""
    units = MeepUnits(0.3)
    x = np.array([0.0, 1.5, -2.0])
    for name in ("time", "frequency", "dipole", "efield", "source"):
        to_au = getattr(units, f"{name}_meep_to_au")
        to_meep = getattr(units, f"{name}_au_to_meep")
        np.testing.assert_allclose(to_meep(to_au(x)), x, rtol=1e-15)


@pytest.mark.parametrize("bad", [0, -0.1, math.inf, math.nan, "0.1", True])
def test_bad_time_unit_is_refused(bad):
    """A non-positive or non-numeric time unit names the parameter."""
    with pytest.raises(ValueError, match="time_units_fs"):
        MeepUnits(bad)
