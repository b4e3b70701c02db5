"""A damped classical dipole oscillator: the smallest useful maxwellhub model.

    PYTHONPATH=docs/howto/code maxwellhub-driver --unix run1 \
        --model damped_oscillator:DampedOscillator --param omega=0.242 --param gamma=1e-3

(the module must be importable: on PYTHONPATH, or installed). Semi-implicit Euler with an
exact friction factor: p <- (p + dt (-omega^2 q + mu0 E)) exp(-gamma dt); q <- q + dt p.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from maxwellhub.models import Model, Parameter


class DampedOscillator(Model):
    """n damped oscillators whose dipole mu0 q points along z."""

    name = "damped_oscillator"
    # rule 1: every parameter, its default, what it means and what is allowed
    parameters: ClassVar[Mapping[str, Parameter]] = {
        "omega": Parameter(
            0.242,
            "angular frequency (a.u.; omega_eV in eV)",
            valid=lambda a: a > 0,
            allowed="a finite number > 0",
            mutable=True,
            unit="energy",
        ),
        "gamma": Parameter(
            0.0, "friction rate (a.u.)", valid=lambda a: a >= 0, allowed="a finite number >= 0"
        ),
        "mu0": Parameter(187.0, "dipole per unit coordinate (a.u.)"),
        "q_initial": Parameter(0.0, "initial coordinate (a.u.)"),
    }
    extras_keys = ("energy_au", "muz_au")  # rule 9: the reported quantities
    example_params: ClassVar[dict[str, Any]] = {"q_initial": 0.1, "gamma": 1e-3}  # rule 12

    def _initial_state(self):  # rule 5: arrays with leading dimension n
        return {"q": self.params["q_initial"].copy(), "p": np.zeros(self.n)}

    def _stage_impl(self, state, fields):  # rule 7: pure, one step of self.dt_au
        omega, mu0, dt = self.params["omega"], self.params["mu0"], self.dt_au
        damping = np.exp(-self.params["gamma"] * dt)
        p = (state["p"] + dt * (-omega * omega * state["q"] + mu0 * fields[:, 2])) * damping
        q = state["q"] + dt * p
        sources = np.zeros((self.n, 3))
        sources[:, 2] = mu0 * p  # dmu/dt of the new state
        return {"q": q, "p": p}, sources

    def _extras_impl(self, state):  # rule 8: pure, (n,) float64 arrays
        omega, q, p = self.params["omega"], state["q"], state["p"]
        return {
            "energy_au": 0.5 * p * p + 0.5 * omega * omega * q * q,
            "muz_au": self.params["mu0"] * q,
        }


if __name__ == "__main__":  # a quick look: free decay of one oscillator
    model = DampedOscillator(n=1, q_initial=0.1, gamma=1e-3)
    model.initialize(dt_au=0.5, molecule_ids=[0])
    for _ in range(2000):
        model.step(np.zeros((1, 3)))
    energy = float(model.extras()["energy_au"][0])
    print(
        f"energy after 1000 a.u.: {energy:.6e} (start {0.5 * 0.242**2 * 0.01:.6e}, "
        f"exp(-gamma t) would give {0.5 * 0.242**2 * 0.01 * math.exp(-1.0):.6e})"
    )
