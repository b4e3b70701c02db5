"""Every conversion between Meep units and atomic units, in one place.

Meep has c = 1 and epsilon0 = 1 and leaves the unit of time open; maxwellhub fixes it with
``time_units_fs`` (tau, in femtoseconds), and fixes the unit of energy to hbar/tau so that a
Meep angular frequency is an energy. Everything else follows (SI, CODATA 2018):

- time: 1 Meep = tau fs = tau / 0.024188843265857 a.u.; length: 1 Meep = c tau;
- dipole: mu_SI = mu_meep * c tau sqrt(hbar epsilon0 c) (the dipole whose interaction
  energy with a unit Meep field is hbar/tau), 0.1 Meep = 187.08 a.u. at tau = 0.1 fs;
- field: E_SI = E_meep * (hbar/tau) / (dipole unit), so E_au * mu_au equals
  E_meep * mu_meep * (hbar/tau in hartree); E_au = E_meep * 1.29295416e-6 / tau**2;
- source (dmu/dt): (dmu/dt)_meep = (dmu/dt)_au * 0.0022097998, whatever tau is.

This module never imports Meep and never holds state beyond the frozen tau: the Meep
adaptor, the CLI and the analysis all convert through :class:`MeepUnits`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["AU_TIME_FS", "MeepUnits"]

# CODATA 2018 (exact where the SI defines them).
_HBAR = 6.62607015e-34 / (2 * math.pi)  # J s (h is exact)
_EPSILON0 = 8.8541878128e-12  # F/m
_C = 299792458.0  # m/s
_E_CHARGE = 1.602176634e-19  # C
_BOHR = 5.29177210903e-11  # m
_HARTREE = 4.3597447222071e-18  # J

#: One atomic unit of time (hbar / E_h) in femtoseconds.
AU_TIME_FS = _HBAR / _HARTREE * 1e15

_AU_DIPOLE = _E_CHARGE * _BOHR  # C m
_AU_FIELD = _HARTREE / _AU_DIPOLE  # V/m


@dataclass(frozen=True)
class MeepUnits:
    """Meep <-> atomic-unit conversions for a Meep time unit of ``time_units_fs`` fs.

    Every ``*_to_au`` / ``*_to_meep`` method multiplies by a constant, so it accepts floats
    and numpy arrays alike. Angular frequencies and energies share one factor (hbar = 1).

    >>> u = MeepUnits(0.1)
    >>> round(u.frequency_meep_to_au(1.0), 6), round(u.dipole_meep_to_au(0.1), 2)
    (0.241888, 187.08)
    """

    time_units_fs: float = 0.1
    #: one Meep time unit in a.u. of time
    time_au: float = field(init=False)
    #: hbar/tau in hartree: a Meep angular frequency (or energy) in a.u.
    energy_au: float = field(init=False)
    #: one Meep dipole unit in a.u. (e bohr)
    dipole_au: float = field(init=False)
    #: one Meep field unit in a.u.
    efield_au: float = field(init=False)
    #: one a.u. of dmu/dt in Meep units
    source_meep: float = field(init=False)

    def __post_init__(self) -> None:
        tau_fs = self.time_units_fs
        if (
            isinstance(tau_fs, bool)
            or not isinstance(tau_fs, int | float)
            or not math.isfinite(tau_fs)
            or tau_fs <= 0
        ):
            raise ValueError(
                f"time_units_fs = {tau_fs!r} is not allowed; expected a "
                "finite number of femtoseconds > 0"
            )
        tau = tau_fs * 1e-15
        dipole_si = _C * tau * math.sqrt(_HBAR * _EPSILON0 * _C)
        set_ = object.__setattr__  # frozen dataclass: derived fields are set once, here
        set_(self, "time_au", tau_fs / AU_TIME_FS)
        set_(self, "energy_au", AU_TIME_FS / tau_fs)
        set_(self, "dipole_au", dipole_si / _AU_DIPOLE)
        set_(self, "efield_au", _HBAR / tau / dipole_si / _AU_FIELD)
        set_(self, "source_meep", self.time_au / self.dipole_au)

    # time
    def time_meep_to_au(self, t):
        return t * self.time_au

    def time_au_to_meep(self, t):
        return t / self.time_au

    # angular frequency and energy
    def frequency_meep_to_au(self, omega):
        return omega * self.energy_au

    def frequency_au_to_meep(self, omega):
        return omega / self.energy_au

    # dipole
    def dipole_meep_to_au(self, mu):
        return mu * self.dipole_au

    def dipole_au_to_meep(self, mu):
        return mu / self.dipole_au

    # electric field
    def efield_meep_to_au(self, e):
        return e * self.efield_au

    def efield_au_to_meep(self, e):
        return e / self.efield_au

    # source amplitude dmu/dt
    def source_au_to_meep(self, dmu_dt):
        return dmu_dt * self.source_meep

    def source_meep_to_au(self, dmu_dt):
        return dmu_dt / self.source_meep
