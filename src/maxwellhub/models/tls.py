"""Two-level system (TLS) model: a density matrix driven by the field along one axis.

Conventions are MaxwellLink's TLS driver (same parameter names and defaults), so the same
field sequence gives the same sources to round-off:

- H0 = diag(0, omega); dipole operator mu12 * sigma_x along axis ``orientation``;
  H(t) = H0 - E_axis(t) mu12 sigma_x.
- Initial pure state C = [sqrt(1 - pe), sqrt(pe) exp(i phase)], rho = C C^dagger.
- One step with the field E held constant: the symmetric split
  U = exp(-i H0 dt/2) exp(+i dt E mu12 sigma_x) exp(-i H0 dt/2), rho <- U rho U^dagger.
- Source: dmu/dt = -2 omega mu12 Im(rho_01) on the axis; dipole 2 mu12 Re(rho_01);
  energy Tr(H0 rho); Pe = rho_11, Pg = rho_00.

The state is the Bloch vector ``bloch`` = (x, y, z) = (2 Re rho_01, 2 Im rho_01,
rho_00 - rho_11) of the unit-trace rho, and every factor of U acts on it in closed form:
the H0 halves turn (x, y) by omega dt/2, the sigma_x factor turns (z, y) by 2 dt E mu12.
So rho stays exactly Hermitian with unit trace and |bloch| stays 1 to round-off; at E = 0
the populations do not drift. Only real arithmetic: numpy's complex multiply can differ by
an ulp with memory alignment (SIMD), which would make re-staging not bit-reproducible.

Never uses a general matrix exponential (no scipy).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from .base import Model, Parameter

__all__ = ["TLSModel"]

_AXES = ("mux_au", "muy_au", "muz_au")


def _bloch_step(x, y, z, angle, turn_cos, turn_sin, cos, sin):
    """One step of the Bloch vector: turn (x, y) by the first H0 half step, rotate (z, y)
    by ``angle`` (= 2 dt E mu12), turn (x, y) again. Plain arithmetic and the given
    ``cos``/``sin``, so it runs on floats (math) and on arrays (numpy) alike."""
    c, s = cos(angle), sin(angle)
    x, y = x * turn_cos - y * turn_sin, x * turn_sin + y * turn_cos
    z, y = c * z + s * y, c * y - s * z
    return x * turn_cos - y * turn_sin, x * turn_sin + y * turn_cos, z


# The float path takes numpy's cos/sin (0.4 us each), not math's: numpy's SIMD versions
# differ from libm's in the last bit for about half of all angles, and one molecule must
# follow the very trajectory it follows in a batch.
def _cos(angle: float) -> float:
    return float(np.cos(angle))


def _sin(angle: float) -> float:
    return float(np.sin(angle))


def _constant(column: np.ndarray) -> bool:
    """Whether all values of a 1-d array are equal (a broadcast one is, at no cost)."""
    if column.strides[0] == 0 or len(column) < 2:
        return True
    return bool(column[0] == column[-1]) and bool((column == column[0]).all())


def _reported(x, y, z, omega, mu12):
    """Dipole along the axis and the other extras of Bloch vectors (floats or arrays)."""
    pe = 0.5 * (1.0 - z)
    return mu12 * x, {
        "energy_au": omega * pe,
        "Pe": pe,
        "Pg": 0.5 * (1.0 + z),
        "Pge_real": 0.5 * x,
        "Pge_imag": 0.5 * y,
    }


class TLSModel(Model):
    """Two-level systems (n of them), propagated by the exact symmetric split."""

    name = "tls"
    parameters: ClassVar[Mapping[str, Parameter]] = {
        "omega": Parameter(
            0.24188843,
            "transition frequency (a.u.; omega_eV in eV)",
            valid=lambda a: a > 0,
            allowed="a finite number > 0",
            mutable=True,
            unit="energy",
        ),
        "mu12": Parameter(
            187.0819866,
            "transition dipole moment (a.u.; mu12_debye in debye)",
            mutable=True,
            unit="dipole",
        ),
        "orientation": Parameter(
            2,
            "dipole axis: 0 (x), 1 (y) or 2 (z)",
            kind=int,
            valid=lambda a: (a >= 0) & (a <= 2),
            allowed="0 (x), 1 (y) or 2 (z)",
        ),
        "pe_initial": Parameter(
            0.0,
            "initial excited-state population",
            valid=lambda a: (a >= 0) & (a <= 1),
            allowed="a number in [0, 1]",
        ),
        "e_phase_initial": Parameter(0.0, "initial phase of the excited amplitude (rad)"),
    }
    extras_keys = ("energy_au", "mux_au", "muy_au", "muz_au", "Pe", "Pg", "Pge_real", "Pge_imag")
    scratch_attributes = ("_scratch", "_last_one")  # work space; the last state made, as floats
    example_params: ClassVar[dict[str, Any]] = {
        "pe_initial": 0.2,
        "e_phase_initial": 0.5,
        "orientation": 1,
    }

    def _configure(self) -> None:
        axis = self.params["orientation"]
        self._axis = axis
        # where each molecule's field and source sit in the (n, 3) arrays: a column view
        # when all share one axis (the usual case), else a gather
        self._pick = (
            (slice(None), int(axis[0])) if (axis == axis[0]).all() else (np.arange(self.n), axis)
        )
        omega, mu12 = self.params["omega"], self.params["mu12"]
        self._source_per_y = -omega * mu12  # dmu/dt per Bloch y
        self._scratch = np.empty((4, self.n))  # work space of _stage_impl
        if self.n == 1:  # the constants of _extras_one, as floats
            self._one_params = (int(axis[0]), float(omega[0]), float(mu12[0]))

    def _initial_state(self):
        pe = self.params["pe_initial"]
        phase = self.params["e_phase_initial"]
        # rho_01 = C_0 C_1^* = sqrt((1 - pe) pe) exp(-i phase)
        amplitude = 2.0 * ((1.0 - pe) ** 0.5 * pe**0.5)
        bloch = np.empty((self.n, 3), order="F")
        bloch[:, 0], bloch[:, 1] = amplitude * np.cos(phase), -amplitude * np.sin(phase)
        bloch[:, 2] = (1.0 - pe) - pe
        return {"bloch": bloch}

    def _prepare(self, dt_au: float) -> None:
        # exp(-i H0 dt/2) = diag(1, exp(-i omega dt/2)) turns rho_01 by exp(+i omega dt/2);
        # exp(+i theta sigma_x) with theta = dt E mu12 turns (z, y) by 2 theta.
        half = 0.5 * dt_au * self.params["omega"]
        self._turn_cos, self._turn_sin = np.cos(half), np.sin(half)
        self._angle_per_field = 2.0 * dt_au * self.params["mu12"]
        # the same constants for every molecule (one omega, mu12 and axis): the common case,
        # stepped with scalars instead of (n,) arrays of equal values (same products)
        self._uniform = None
        if self.n > 1 and isinstance(self._pick[0], slice):
            consts = (self._angle_per_field, self._turn_cos, self._turn_sin, self._source_per_y)
            if all((a == a[0]).all() for a in consts):
                self._uniform = tuple(float(a[0]) for a in consts)
        if self.n == 1:  # the constants of _stage_one, as floats
            self._one_consts = (
                int(self._axis[0]),
                float(self._angle_per_field[0]),
                float(self._turn_cos[0]),
                float(self._turn_sin[0]),
                float(self._source_per_y[0]),
            )

    def _stage_impl(self, state, fields):
        # _bloch_step's arithmetic, operation for operation (so bit for bit), into
        # preallocated arrays: at n = 10^4 the temporaries of the plain expressions made
        # malloc hand pages back and fault them in again every step (5x slower). The Bloch
        # vectors are stored column-major so that x, y and z are contiguous.
        x, y, z = state["bloch"].T
        new = np.empty_like(state["bloch"], order="F")
        new_x, new_y, new_z = new.T
        angle, tmp, c, s = self._scratch
        column = fields[self._pick]
        uniform = self._uniform
        if uniform is not None and _constant(column):
            # one field for all (a cavity mode): one angle, so cos and sin once (on a
            # one-element array: the very loop, and value, of the per-molecule path)
            angle_per_field, turn_cos, turn_sin, source_per_y = uniform
            one = np.array((angle_per_field * float(column[0]),))
            c, s = float(np.cos(one)[0]), float(np.sin(one)[0])
        else:
            turn_cos, turn_sin = self._turn_cos, self._turn_sin
            source_per_y = self._source_per_y
            np.multiply(self._angle_per_field, column, out=angle)
            np.cos(angle, out=c)
            np.sin(angle, out=s)
        y1 = angle  # the angle is no longer needed
        np.multiply(x, turn_cos, out=new_x)  # first half turn: (new_x, y1)
        np.multiply(y, turn_sin, out=tmp)
        new_x -= tmp
        np.multiply(x, turn_sin, out=y1)
        np.multiply(y, turn_cos, out=tmp)
        y1 += tmp
        np.multiply(c, z, out=new_z)  # rotation of (z, y1): (new_z, new_y)
        np.multiply(s, y1, out=tmp)
        new_z += tmp
        np.multiply(c, y1, out=new_y)
        np.multiply(s, z, out=tmp)
        new_y -= tmp
        np.multiply(new_x, turn_sin, out=y1)  # second half turn of (new_x, new_y)
        np.multiply(new_y, turn_sin, out=tmp)
        new_x *= turn_cos
        new_x -= tmp
        new_y *= turn_cos
        new_y += y1
        # column-major like the fields MXHFIELDS decodes to: each axis is one block
        sources = np.zeros((self.n, 3), order="F")
        if isinstance(self._pick[0], slice):
            np.multiply(source_per_y, new_y, out=sources[self._pick])
        else:
            sources[self._pick] = source_per_y * new_y
        return {"bloch": new}, sources

    def _stage_one(self, state, field):
        axis, angle_per_field, turn_cos, turn_sin, source_per_y = self._one_consts
        x, y, z = self._floats(state["bloch"])
        x, y, z = _bloch_step(
            x, y, z, angle_per_field * field[axis], turn_cos, turn_sin, _cos, _sin
        )
        source = [0.0, 0.0, 0.0]
        source[axis] = source_per_y * y
        bloch = np.array(((x, y, z),))
        self._last_one = (bloch, (x, y, z))
        return {"bloch": bloch}, source

    def _floats(self, bloch: np.ndarray) -> tuple[float, float, float]:
        """The one molecule's Bloch vector as floats: those of the array this model made
        last (a state array is never written in place), else read from ``bloch``."""
        last = self.__dict__.get("_last_one")
        if last is not None and last[0] is bloch:
            return last[1]
        x, y, z = bloch.tolist()[0]
        return x, y, z

    # -- the compiled driver loop (maxwellhub_drivers.fastloop) steps one molecule in C
    def scalar_loop_inputs(
        self,
    ) -> tuple[tuple[float, ...], tuple[float, float, float, float]] | None:
        """What a compiled step loop needs to step this one molecule as :meth:`stage` and
        :meth:`commit` would: the constants ``(axis, angle_per_field, turn_cos, turn_sin,
        source_per_y, omega, mu12, dt)`` and the committed ``(x, y, z, time)``. None when
        that loop does not apply: n > 1, not initialised, a step staged."""
        if self.n != 1 or self.dt_au is None or self.staged:
            return None
        axis, angle_per_field, turn_cos, turn_sin, source_per_y = self._one_consts
        _, omega, mu12 = self._one_params
        x, y, z = self._floats(self._state["bloch"])
        constants = (float(axis), angle_per_field, turn_cos, turn_sin, source_per_y)
        return (*constants, omega, mu12, self.dt_au), (x, y, z, self.time_au)

    def scalar_loop_done(self, x: float, y: float, z: float, time_au: float) -> None:
        """The compiled loop committed steps up to the Bloch vector ``(x, y, z)`` at
        ``time_au``: the model as the last :meth:`commit` of :meth:`stage` would leave it."""
        bloch = np.array(((x, y, z),))
        self._last_one = (bloch, (x, y, z))
        self._state = {"bloch": bloch}
        self._time = time_au
        self._staged = None

    def _kick_impl(self, state, impulses):
        # exp(+i kappa mu12 sigma_x), the field factor of a step with dt E -> kappa: it
        # turns (z, y) by 2 kappa mu12, as _bloch_step does for a field held over dt
        bloch = state["bloch"]
        angle = 2.0 * self.params["mu12"] * impulses[self._pick]
        c, s = np.cos(angle), np.sin(angle)
        new = np.array(bloch, order="F", copy=True)
        z, y = bloch[:, 2], bloch[:, 1]
        new[:, 2] = c * z + s * y
        new[:, 1] = c * y - s * z
        return {"bloch": new}

    def _extras_impl(self, state):
        bloch = state["bloch"]
        dipole, out = _reported(
            bloch[:, 0], bloch[:, 1], bloch[:, 2], self.params["omega"], self.params["mu12"]
        )
        out.update({key: np.where(self._axis == k, dipole, 0.0) for k, key in enumerate(_AXES)})
        return out

    def dipoles(self) -> np.ndarray:
        """The committed dipoles (n, 3), column-major: mu12 x on each molecule's axis."""
        x = self._state["bloch"][:, 0]
        out = np.zeros((self.n, 3), order="F")
        if isinstance(self._pick[0], slice):
            np.multiply(self.params["mu12"], x, out=out[self._pick])
        else:
            out[self._pick] = self.params["mu12"] * x
        return out

    def _extras_one(self, state):
        x, y, z = self._floats(state["bloch"])
        axis, omega, mu12 = self._one_params
        dipole, out = _reported(x, y, z, omega, mu12)
        for k, key in enumerate(_AXES):
            out[key] = dipole if k == axis else 0.0
        return out
