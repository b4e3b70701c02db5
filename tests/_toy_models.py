"""A toy model with every kind of parameter and a random generator, for the tests of the
model interface, the conformance test and ``maxwellhub run``'s parameter handling.

Oscillators whose coordinate q lies along a per-molecule ``direction``, all kicked by one
common random number per step (a shared bath) of amplitude ``noise`` from the model's
generator: one draw per step whatever n is, so n molecules in one model follow n
one-molecule models bit for bit, and the generator's state matters to the trajectory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from maxwellhub.models import Model, Parameter, ParameterError

_AXES = {"x": [1.0, 0.0, 0.0], "y": [0.0, 1.0, 0.0], "z": [0.0, 0.0, 1.0]}


def _axis_vector(value):
    """MaxwellLink-style kick direction: "x", "y" or "z" as a unit 3-vector."""
    if isinstance(value, str):
        if value.lower() not in _AXES:
            raise ValueError(f"{value!r} is not x, y or z")
        return _AXES[value.lower()]
    return value


class ToyKicked(Model):
    """Toy oscillators: every parameter kind, aliases, a generator, per-instance extras."""

    name = "toy_kicked"
    parameters: ClassVar[Mapping[str, Parameter]] = {
        "omega": Parameter(
            0.3,
            "frequency (a.u.)",
            valid=lambda a: a > 0,
            allowed="a finite number > 0",
            mutable=True,
        ),
        "gain": Parameter(2.0, "dipole per coordinate (a.u.)", mutable=True),
        "direction": Parameter(
            (0.0, 0.0, 1.0),
            "dipole direction",
            kind="vector",
            valid=lambda v: (v * v).sum(axis=1) > 0,
            allowed="a nonzero 3-vector",
        ),
        "kick": Parameter(
            (0.0, 0.0, 0.0), "initial displacement (a.u.)", kind="vector", shared=True
        ),
        "noise": Parameter(
            0.0,
            "noise amplitude per step",
            shared=True,
            mutable=True,
            valid=lambda a: a >= 0,
            allowed="a finite number >= 0",
        ),
        "seed": Parameter(7, "seed of the generator", kind=int, shared=True),
        "damped": Parameter(False, "damping on", kind=bool, mutable=True),
        "scheme": Parameter(
            "symplectic", "integrator", kind=str, shared=True, choices=("symplectic", "Euler")
        ),
        "label": Parameter("mol", "a name per molecule", kind=str),
        "geometry": Parameter(
            None, "an optional input file (must not be empty)", kind="path", shared=True
        ),
    }
    aliases: ClassVar[Mapping[str, tuple[str, Callable[[Any], Any] | None]]] = {
        "molecule_xyz": ("geometry", None),
        "kick_direction": ("kick", _axis_vector),
    }
    example_params: ClassVar[dict[str, Any]] = {
        "kick": [0.1, 0.0, 0.2],
        "direction": [1.0, 0.5, 0.25],
        "label": "a",
        "damped": True,
        "noise": 1e-3,
    }

    def __init__(self, n: int = 1, **params) -> None:
        super().__init__(n, **params)
        self._rng = np.random.default_rng(self.params["seed"])

    @classmethod
    def _validate(cls, params, n):
        path = params["geometry"]
        if path is not None and Path(path).stat().st_size == 0:
            raise ParameterError(
                f"{cls.name}: parameter geometry = {path!r} is an empty "
                "file; expected an input file",
                "geometry",
            )

    def _configure(self) -> None:
        d = self.params["direction"]
        self._unit = d / np.sqrt((d * d).sum(axis=1))[:, None]
        self._omega2 = self.params["omega"] ** 2
        self._damping = np.where(self.params["damped"], 0.01, 0.0)
        # keys that depend on an (immutable) parameter: set per instance
        euler = self.params["scheme"] == "Euler"
        self.extras_keys = ("energy_au", "mu_au") + (("p_au",) if euler else ())

    def _initial_state(self):
        u = self._unit
        kick = self.params["kick"]
        q = u[:, 0] * kick[0] + u[:, 1] * kick[1] + u[:, 2] * kick[2]
        return {"q": q, "p": np.zeros(self.n)}

    def _stage_impl(self, state, fields):
        u, dt = self._unit, self.dt_au
        q, p = state["q"], state["p"]
        e = fields[:, 0] * u[:, 0] + fields[:, 1] * u[:, 1] + fields[:, 2] * u[:, 2]
        kicks = self.params["noise"] * self._rng.standard_normal()
        a = -self._omega2 * q + self.params["gain"] * e - self._damping * p
        new_p = p + dt * a + kicks
        new_q = q + dt * (p if self.params["scheme"] == "Euler" else new_p)
        sources = (self.params["gain"] * new_p)[:, None] * u
        return {"q": new_q, "p": new_p}, sources

    def _extras_impl(self, state):
        q, p = state["q"], state["p"]
        out = {
            "energy_au": 0.5 * p * p + 0.5 * self._omega2 * q * q,
            "mu_au": self.params["gain"] * q,
        }
        if "p_au" in self.extras_keys:
            out["p_au"] = p.copy()
        return out
