"""A flexible water force field as an ASE calculator (SPC/Fw intramolecular terms).

Per molecule (atoms in the order O, H, H; any number of molecules, no intermolecular
terms): two harmonic O-H bonds ``k_b/2 (r - r0)**2`` and a harmonic H-O-H angle
``k_theta/2 (theta - theta0)**2``, with fixed point charges on the three atoms. Defaults
are SPC/Fw (Wu, Tepper and Voth, J. Chem. Phys. 124, 024503 (2006)): k_b = 1059.162
kcal/mol/Å², r0 = 1.012 Å, k_theta = 75.90 kcal/mol/rad², theta0 = 113.24°, q_O = -0.82,
q_H = +0.41. ASE units: eV, Å; charges in e. Positions are used as given (no wrapping).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import units
from ase.calculators.calculator import Calculator, all_changes

__all__ = ["FlexibleWater", "water_geometry"]

_KCAL_MOL = units.kcal / units.mol  # eV


class FlexibleWater(Calculator):
    """Harmonic bonds and angle with fixed charges (see the module docstring)."""

    implemented_properties = ["energy", "forces", "charges"]  # noqa: RUF012
    default_parameters: dict[str, Any] = {  # noqa: RUF012
        "k_bond": 1059.162 * _KCAL_MOL,  # eV/Å², E = k/2 (r - r0)**2
        "r0": 1.012,  # Å
        "k_angle": 75.90 * _KCAL_MOL,  # eV/rad², E = k/2 (theta - theta0)**2
        "theta0": 113.24,  # degrees
        "q_oxygen": -0.82,
        "q_hydrogen": 0.41,
    }

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        assert self.atoms is not None
        numbers = self.atoms.get_atomic_numbers()
        if len(numbers) % 3 or any(
            tuple(numbers[i : i + 3]) != (8, 1, 1) for i in range(0, len(numbers), 3)
        ):
            raise ValueError("FlexibleWater needs atoms in the order O, H, H per molecule")
        p = self.parameters
        pos = self.atoms.get_positions()
        forces = np.zeros_like(pos)
        energy = 0.0
        theta0 = np.radians(p["theta0"])
        for o in range(0, len(pos), 3):
            e, f = _one_water(pos[o : o + 3], p["k_bond"], p["r0"], p["k_angle"], theta0)
            energy += e
            forces[o : o + 3] = f
        charges = np.tile([p["q_oxygen"], p["q_hydrogen"], p["q_hydrogen"]], len(pos) // 3)
        self.results = {"energy": energy, "forces": forces, "charges": charges}


def _one_water(pos, k_bond, r0, k_angle, theta0):
    """(energy, forces (3, 3)) of one O, H, H."""
    u, w = pos[1] - pos[0], pos[2] - pos[0]
    ru, rw = float(np.linalg.norm(u)), float(np.linalg.norm(w))
    cos = float(u @ w) / (ru * rw)
    theta = float(np.arccos(np.clip(cos, -1.0, 1.0)))
    sin = max(np.sqrt(1.0 - cos * cos), 1e-12)
    energy = (
        0.5 * k_bond * ((ru - r0) ** 2 + (rw - r0) ** 2) + 0.5 * k_angle * (theta - theta0) ** 2
    )
    f1 = -k_bond * (ru - r0) * u / ru
    f2 = -k_bond * (rw - r0) * w / rw
    # d theta / d u = -(w / (ru rw) - cos u / ru**2) / sin theta, and likewise for w
    dtheta_du = -(w / (ru * rw) - cos * u / ru**2) / sin
    dtheta_dw = -(u / (ru * rw) - cos * w / rw**2) / sin
    f1 = f1 - k_angle * (theta - theta0) * dtheta_du
    f2 = f2 - k_angle * (theta - theta0) * dtheta_dw
    return energy, np.array([-(f1 + f2), f1, f2])


def water_geometry(r0: float = 1.012, theta0: float = 113.24) -> np.ndarray:
    """O, H, H positions (Å) at the bond length ``r0`` and angle ``theta0`` (degrees), in
    the yz plane with the bisector along +z."""
    half = np.radians(theta0) / 2
    return np.array(
        [
            [0.0, 0.0, 0.0],
            [0.0, r0 * np.sin(half), r0 * np.cos(half)],
            [0.0, -r0 * np.sin(half), r0 * np.cos(half)],
        ]
    )
