"""One barrier step as data: the layout of a step (ids by row), the frozen step (fields
sent, replies received), and its result. Pure numpy, no I/O; the hub's core drives them.

The frozen-step contract: a step *freezes* the fields it was given; until it completes,
every retry sends the same frozen field whatever a new request says; replies already
received are kept when another driver fails, and a replacement gets the frozen field.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import ProtocolError, UsageError
from ..net import steadyio
from ..protocol import wire

_finite = math.isfinite

__all__ = [
    "Barrier",
    "Layout",
    "StepResult",
    "as_step_arrays",
    "check_policy",
    "checked_dipoles",
    "fields_array",
    "ids_text",
]


class Layout:
    """The molecule ids of a step and their row in its arrays. Kept while consecutive
    steps ask for the same ids, so per-driver row indices are computed once."""

    __slots__ = ("generation", "ids", "index", "key", "pending", "row")

    def __init__(self, ids: npt.NDArray[Any], generation: int, index: npt.NDArray[Any]) -> None:
        self.ids = ids
        self.key = ids.tobytes()  # cheap equality test for the next step's ids
        self.row = {int(m): r for r, m in enumerate(ids.tolist())}
        self.generation = generation
        self.index = index  # each row's molecule slot in the history's counts
        self.pending = 0  # completed steps not yet added to the history's counts


class Barrier:
    """One frozen step: the fields sent and the replies received so far (by row). Per
    step the hub touches each connection once, never each molecule in Python."""

    __slots__ = (
        "abort_on_loss",
        "batch_extras",
        "deadline",
        "done",
        "extras",
        "field_bytes",
        "fields",
        "last",
        "layout",
        "lost",
        "report_at",
        "report_base",
        "reports",
        "single",
        "sources",
        "started",
        "timer",
        "waiter",
        "waiting",
        "want_dipoles",
        "want_extras",
    )

    def __init__(
        self,
        layout: Layout,
        fields: npt.NDArray[Any],
        want_extras: bool,
        want_dipoles: bool = False,
    ) -> None:
        n = len(layout.ids)
        self.layout = layout
        self.fields = fields
        self.field_bytes: bytes | None = None  # 24 bytes per row, made when first needed
        self.want_extras = want_extras
        self.want_dipoles = want_dipoles
        self.sources = np.zeros((n, 3))
        self.single: dict[int, tuple[float, float, float]] = {}  # row -> single reply
        self.done = np.zeros(n, dtype=bool)
        self.extras: dict[int, bytes] = {}  # row -> JSON bytes
        self.batch_extras: list[tuple[npt.NDArray[Any] | slice, dict[str, Any]]] = []
        self.waiting = n
        self.waiter: Any = None  # an asyncio.Future while the core waits on the step
        self.timer: Any = None  # the core's timer handle (deadline or report)
        self.abort_on_loss = False
        self.lost: list[int] = []
        self.started = time.monotonic()  # for status(): the step's duration
        self.last: Any = None  # the driver whose reply completed the step
        self.deadline: float | None = None  # loop time the current wait gives up, if any
        # When to say who is missing (loop time), from the first wait of the step on.
        self.reports: Iterator[float] | None = None
        self.report_base = 0.0
        self.report_at = 0.0

    def wake(self, why: str) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(why)

    def missing(self) -> list[int]:
        missing: list[int] = self.layout.ids[~self.done].tolist()
        return missing


class StepResult:
    """The outcome of one barrier step in array form (:meth:`Hub.step_arrays`).

    ``ids`` (N,) and ``sources`` (N, 3) dmu/dt in a.u., row for row with the request.
    :meth:`extras` gives the drivers' per-step data as ``{key: (N,) float64}`` (NaN where
    a molecule does not report a key); single drivers' JSON is parsed only when asked.
    """

    __slots__ = ("_batch_extras", "_extras", "_json", "ids", "sources")

    def __init__(
        self,
        ids: npt.NDArray[Any],
        sources: npt.NDArray[Any],
        json_rows: dict[int, bytes],
        batch_extras: list[tuple[npt.NDArray[Any] | slice, dict[str, Any]]],
    ) -> None:
        self.ids = ids
        self.sources = sources
        self._json = json_rows
        self._batch_extras = batch_extras
        self._extras: dict[str, npt.NDArray[Any]] | None = None

    def extra_bytes(self, row: int) -> bytes:
        """The extras of one row as MaxwellLink's JSON bytes."""
        raw = self._json.get(row)
        if raw is not None:
            return raw
        values = {k: float(v[row]) for k, v in self.extras().items() if v[row] == v[row]}
        return json.dumps(values, sort_keys=True, separators=(",", ":")).encode()

    def extras(self) -> dict[str, npt.NDArray[Any]]:
        if self._extras is None:
            n = len(self.ids)
            out: dict[str, npt.NDArray[Any]] = {}
            for r, raw in self._json.items():
                if raw:
                    try:
                        parsed = json.loads(raw)
                    except ValueError:
                        continue  # extras are informational; a bad one is skipped
                    if not isinstance(parsed, dict):
                        continue  # JSON, but not an object of values (e.g. [1, 2])
                    for key, value in parsed.items():
                        if isinstance(value, (int, float)) and not isinstance(value, bool):
                            out.setdefault(key, np.full(n, np.nan))[r] = value
            batches = self._batch_extras
            if not out and len(batches) == 1 and is_all_rows(batches[0][0], n):
                # one ensemble answered every row: its arrays (decoded copies) as they are
                out.update(batches[0][1])
                batches = []
            for rows, arrays in batches:
                for key, values in arrays.items():
                    out.setdefault(key, np.full(n, np.nan))[rows] = values
            self._extras = out
        return self._extras

    def as_dict(self) -> dict[int, dict[str, Any]]:
        """MaxwellLink's shape: ``{molid: {"amp": ndarray(3), "extra": bytes}}``."""
        if (
            not self._batch_extras
            and steadyio.result_dict is not None
            and self.ids.dtype == np.int64
            and self.ids.flags.c_contiguous
        ):
            result: dict[int, dict[str, Any]] = steadyio.result_dict(
                self.ids, self.sources, self._json
            )
            return result
        rows = list(self.sources)  # row views, made in C
        if self._batch_extras:
            extras = [self.extra_bytes(r) for r in range(len(rows))]
        else:
            extras = [self._json.get(r, b"") for r in range(len(rows))]
        return {
            m: {"amp": a, "extra": e}
            for m, a, e in zip(self.ids.tolist(), rows, extras, strict=True)
        }


def ids_text(ids: list[int], most: int = 20) -> str:
    """A list of ids for a message, shortened when long."""
    if len(ids) <= most:
        return str(ids)
    return f"{ids[:most]}... ({len(ids)} in all)"


def check_policy(on_lost: str) -> bool:
    if on_lost not in ("wait", "abort"):
        raise UsageError(f"on_lost must be 'wait' or 'abort', not {on_lost!r}")
    return on_lost == "abort"


def fields_array(ids: npt.NDArray[Any], efields: Any) -> npt.NDArray[Any]:
    """(N, 3) float64 fields, refusing a wrong shape or a non-finite value by molecule."""
    fields = _rows_of_vectors(efields)
    if fields is None:
        try:
            fields = np.array(efields, dtype=np.float64)
        except (TypeError, ValueError):
            fields = None
    if fields is None or fields.shape != (len(ids), 3):
        for mid, value in zip(ids.tolist(), efields, strict=True):
            if np.shape(value) != (3,):
                raise UsageError(f"molecule {mid}: efield_au must be 3 numbers, got {value!r}")
        raise UsageError(f"fields must have shape ({len(ids)}, 3)")
    if not _all_finite(fields):
        r = int(np.flatnonzero(~np.isfinite(fields).all(axis=1))[0])
        raise UsageError(f"molecule {int(ids[r])}: efield_au is not finite: {fields[r].tolist()}")
    return fields


def _rows_of_vectors(efields: Any) -> npt.NDArray[Any] | None:
    """The common case, fast: every field a float64 array of 3 (a view of the caller's
    array, say), joined as bytes (numpy's array-from-sequence cost 1 us a row, this
    0.3 us); None for anything else (lists, other dtypes or shapes)."""
    f8, ndarray = _F8, np.ndarray
    if isinstance(efields, ndarray):
        return None  # one array already (step_arrays): np.array copies it in one go
    try:
        if not all(type(e) is ndarray and e.dtype is f8 and e.ndim == 1 for e in efields):
            return None
    except TypeError:  # not a sequence
        return None
    raw = bytearray(b"".join([e.tobytes() for e in efields]))
    if len(raw) != 24 * len(efields):
        return None
    return np.frombuffer(raw, dtype=np.float64).reshape(len(efields), 3)


_F8 = np.dtype(np.float64)


def _all_finite(values: npt.NDArray[Any]) -> bool:
    """Whether no value is NaN or infinite. Small arrays in Python (a numpy reduction
    costs microseconds per call); large ones by min and max, which propagate NaN and show
    an infinity with no temporary array and no floating-point warning state to switch
    (np.errstate cost 10 us a step)."""
    if values.size <= _SMALL:
        return all(map(_finite, values.ravel().tolist()))
    if values.size <= _LARGE:
        return bool(np.isfinite(values).all())
    return _finite(float(values.min())) and _finite(float(values.max()))


_SMALL = 96  # values (32 molecules) checked in Python
_LARGE = 1 << 18  # values checked with a temporary array of booleans


def is_all_rows(rows: npt.NDArray[Any] | slice, n: int) -> bool:
    return isinstance(rows, slice) and rows == slice(0, n)


def checked_dipoles(result: StepResult, dipoles: bool) -> StepResult:
    """``result``, when dipoles were not asked or every molecule's came; else a
    :class:`ProtocolError` naming the molecules without them."""
    if not dipoles:
        return result
    extras = result.extras()
    missing = np.zeros(len(result.ids), dtype=bool)
    for key in wire.DIPOLE_KEYS:
        values = extras.get(key)
        if values is None:
            missing[:] = True
            break
        missing |= np.isnan(values)
    if missing.any():
        ids = result.ids[missing].tolist()
        raise ProtocolError(
            f"molecule {ids[0]}"
            + (f" (and {ids_text(ids[1:])})" if len(ids) > 1 else "")
            + f" sent no dipole ({', '.join(wire.DIPOLE_KEYS)}) although the step asked for "
            "it (dipoles=True): its driver ignores MXHFIELDS flag WANT_DIPOLES (a "
            "maxwellhub ensemble driver older than it) or its model does not report them"
        )
    return result


def as_step_arrays(ids: Any, fields: Any) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return ids, fields_array(ids, fields)
