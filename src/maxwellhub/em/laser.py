"""A prescribed laser field as an EM engine: E(t) at every molecule, no back-action.

The field of molecule i during step n (t_n -> t_{n+1}, the molecule holding it constant)
is

    E_i = e_hat * E(t_mid - k_hat . r_i / c),   t_mid = t_n + dt/2

- ``E(t)``: ``pulse``, one of :mod:`maxwellhub.pulses`' shapes (Gaussian, sin^2,
  chirped, continuous wave) or any callable ``f(t_au)`` returning a float or a
  3-vector; or ``file``, a table of rows ``t_au E_au`` or ``t_au Ex Ey Ez``
  (whitespace or commas, ``#`` comments), linearly interpolated and zero outside its
  time range.
- ``e_hat``: ``polarization`` (normalised to unit length; default z) for a scalar
  E(t); a vector-valued E(t) (four-column table, 3-vector callable) gives the field
  itself and takes no polarization.
- ``k_hat``: ``direction`` (normalised), optional: a plane wave propagating along
  k_hat arrives at r_i after the delay k_hat . r_i / c (c = SPEED_OF_LIGHT_AU). Without
  it every molecule holds the same field (positions are not read; NaN is fine). With it
  a callable must accept an array of times (numpy style), and every molecule needs a
  finite position.

Time of evaluation: the midpoint t_n + dt/2. The molecule models hold the field
constant over the step (the TLS's symmetric split is then the exponential midpoint rule),
so sampling at the midpoint is second order in dt; sampling at t_n (MaxwellLink's
LaserDrivenSimulation) delays the drive by dt/2, a first-order error. Measured on a
resonant TLS (omega 0.25, Omega/omega 0.04, 150 a.u., against dt = 0.025): the largest Pe error
9.8e-7 at dt 0.1 and 4.1e-6 at dt 0.2 with the midpoint, 5.0e-4 and 9.9e-4 at t_n
(tests/integration/test_em_modes.py). The fitted Rabi frequency is insensitive to either (a delay
is only a carrier phase).

``record()`` gives ``efield_au``: the (3,) field at the time reached (t_{n+1}) at the
origin (no delay). The engine's state is its step count only.

This module never couples back (no dipoles read, needs_dipoles False), never writes a
file, and reads the table file once, at construction.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from ..errors import UsageError
from .engine import Engine
from .multimode import SPEED_OF_LIGHT_AU

__all__ = ["LaserField", "TabulatedField", "load_field_table"]

_SPLIT = re.compile(r"[\s,]+")


class TabulatedField:
    """E(t) from a table: linear interpolation between rows, zero outside the range."""

    def __init__(self, times: np.ndarray, values: np.ndarray) -> None:
        self.times = np.asarray(times, dtype=np.float64)
        self.values = np.asarray(values, dtype=np.float64)  # (K,) or (K, 3)

    def __call__(self, t: Any) -> np.ndarray:
        """The field at times ``t`` (a.u.): shape of t, or t's shape + (3,) for a vector."""
        t = np.asarray(t, dtype=np.float64)
        if self.values.ndim == 1:
            return np.interp(t, self.times, self.values, left=0.0, right=0.0)
        return np.stack(
            [np.interp(t, self.times, col, left=0.0, right=0.0) for col in self.values.T],
            axis=-1,
        )


def _bad_row(path: str, line_number: int, reason: str) -> UsageError:
    return UsageError(f"laser.file {path!r}, line {line_number}: {reason}")


def load_field_table(path: str | os.PathLike[str]) -> TabulatedField:
    """Read rows ``t E`` or ``t Ex Ey Ez`` (a.u.); times strictly increasing; an error
    names the file and the line of the first bad row."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise UsageError(f"laser.file {name!r}: cannot read it ({exc})") from None
    rows: list[list[float]] = []
    for number, raw in enumerate(lines, start=1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        cells = [cell for cell in _SPLIT.split(text) if cell]
        try:
            row = [float(cell) for cell in cells]
        except ValueError:
            raise _bad_row(name, number, f"not numbers: {raw.strip()!r}") from None
        if len(row) not in (2, 4):
            raise _bad_row(name, number, f"{len(row)} columns; expected 2 (t E) or 4 (t Ex Ey Ez)")
        if rows and len(row) != len(rows[0]):
            raise _bad_row(name, number, f"{len(row)} columns after rows of {len(rows[0])}")
        if not all(math.isfinite(v) for v in row):
            raise _bad_row(name, number, f"not finite: {raw.strip()!r}")
        if rows and not row[0] > rows[-1][0]:
            raise _bad_row(name, number, f"time {row[0]!r} does not increase")
        rows.append(row)
    if len(rows) < 2:
        raise UsageError(f"laser.file {name!r}: {len(rows)} data rows; expected at least 2")
    table = np.array(rows)
    values = table[:, 1] if table.shape[1] == 2 else table[:, 1:]
    return TabulatedField(table[:, 0], values)


def _unit_vector(key: str, value: Any) -> np.ndarray:
    try:
        vector = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise UsageError(f"{key} = {value!r}; expected a 3-vector") from None
    if vector.shape != (3,) or not np.isfinite(vector).all():
        raise UsageError(f"{key} = {value!r}; expected a finite 3-vector")
    norm = float(np.linalg.norm(vector))
    if norm == 0:
        raise UsageError(f"{key} = {value!r}; expected a nonzero 3-vector")
    return vector / norm


class LaserField(Engine):
    """A prescribed field E(t) at every molecule (see the module docstring)."""

    name = "laser"
    needs_dipoles = False

    def __init__(
        self,
        pulse: Callable[..., Any] | None = None,
        file: str | os.PathLike[str] | None = None,
        polarization: npt.ArrayLike | None = None,
        direction: npt.ArrayLike | None = None,
    ) -> None:
        super().__init__()
        if (pulse is None) == (file is None):
            raise UsageError("laser.pulse / laser.file: give exactly one of them")
        if pulse is not None and not callable(pulse):
            raise UsageError(f"laser.pulse = {pulse!r}; expected a pulse or a callable f(t_au)")
        self.source: Callable[..., Any] = (
            pulse if pulse is not None else load_field_table(cast("str | os.PathLike[str]", file))
        )
        try:
            probe = np.asarray(self.source(0.0), dtype=np.float64)
        except Exception as exc:
            raise UsageError(f"laser.pulse: calling it at t = 0 failed: {exc!r}") from None
        if probe.shape not in ((), (3,)):
            raise UsageError(
                f"laser.pulse returned shape {probe.shape} at t = 0; expected a float or a 3-vector"
            )
        self.vector_valued = probe.shape == (3,)
        if self.vector_valued and polarization is not None:
            raise UsageError(
                "laser.polarization: the field is already a 3-vector; give no polarization"
            )
        self.polarization = (
            _unit_vector("laser.polarization", polarization)
            if polarization is not None
            else np.array([0.0, 0.0, 1.0])
        )
        self.direction = None if direction is None else _unit_vector("laser.direction", direction)
        self.delays = np.zeros(0)

    def _setup(self, positions: np.ndarray, dt_au: float) -> None:
        if self.direction is None:
            return
        bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
        if bad.size:
            raise UsageError(
                f"laser.direction: molecule index {int(bad[0])} has no finite position "
                f"(got {positions[bad[0]].tolist()})"
            )
        self.delays = positions @ self.direction / SPEED_OF_LIGHT_AU
        try:
            probe = np.asarray(self.source(-self.delays), dtype=np.float64)
        except Exception as exc:
            raise UsageError(
                f"laser.pulse must accept an array of times with laser.direction: {exc!r}"
            ) from None
        expected = (len(positions), 3) if self.vector_valued else (len(positions),)
        if probe.shape != expected:
            raise UsageError(
                f"laser.pulse returned shape {probe.shape} for {len(positions)} times; "
                f"expected {expected} (it must accept an array of times with laser.direction)"
            )

    def field_at(self, t_au: float) -> np.ndarray:
        """The field at time ``t_au``: (3,) without a direction, else (M, 3) with delays."""
        if self.direction is None:
            value = np.asarray(self.source(t_au), dtype=np.float64)
            return value.copy() if self.vector_valued else float(value) * self.polarization
        values = np.asarray(self.source(t_au - self.delays), dtype=np.float64)
        if self.vector_valued:
            return values.reshape(len(self.delays), 3)
        return np.outer(values, self.polarization)

    def _field(self) -> np.ndarray:
        return self.field_at((self.step_index + 0.5) * self.dt_au)

    def _finish(
        self, sources: np.ndarray, dipoles: np.ndarray | None, dipoles_next: np.ndarray | None
    ) -> None:
        """No back-action: the molecules' answers are not used."""

    def restore(self, state: Mapping[str, Any]) -> None:
        """Back to :meth:`state` (the step count is the whole state)."""
        super().restore(state)

    def record(self) -> dict[str, Any]:
        """``efield_au``: the (3,) field at the time reached, at the origin."""
        value = np.asarray(self.source(self.time_au), dtype=np.float64)
        return {
            "efield_au": value.copy() if self.vector_valued else float(value) * self.polarization
        }
