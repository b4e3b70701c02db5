"""The model interface every maxwellhub driver model implements.

A model holds ``n`` molecules of one kind that are propagated together with numpy (``n = 1``
for a plain driver process, ``n = M`` for an ensemble driver or when embedded in the EM
process). The public methods here do the checking and the bookkeeping; a model only writes
a few private, side-effect-free functions (see :class:`Model`).

This module never touches a socket, never converts units (everything is atomic units) and
never imports scipy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = ["Model", "Parameter"]

State = dict[str, np.ndarray]


def _finite(a: np.ndarray) -> np.ndarray:
    return np.isfinite(a)


def _first_bad_row(a: np.ndarray) -> int:
    return int(np.flatnonzero(~np.isfinite(a).all(axis=1))[0])


@dataclass(frozen=True)
class Parameter:
    """One model parameter: its default, its kind and what values it allows.

    ``kind`` is ``float`` or ``int``. ``valid`` maps the broadcast (n,) array of values to a
    boolean mask; ``allowed`` says in words what ``valid`` accepts (it appears in errors).
    """

    default: float | int
    doc: str
    kind: type = float
    valid: Callable[[np.ndarray], np.ndarray] = _finite
    allowed: str = "a finite number"


class Model:
    """Base class of driver models: ``n`` molecules propagated together, one step at a time.

    Usage (atomic units throughout)::

        model = create_model("tls", n=2, pe_initial=[1e-4, 0.0])
        model.initialize(dt_au=0.5, molecule_ids=[0, 1])
        sources = model.stage(fields)  # (n, 3) fields -> (n, 3) dmu/dt; state unchanged
        model.commit()                 # the staged step becomes the current state
        sources = model.step(fields)   # stage + commit
        model.extras()                 # {"time_au": (n,), "energy_au": (n,), ...}

    ``stage`` computes from the committed state and keeps the result aside, so staging the
    same step again (a hub re-sending a field after a driver was replaced) is idempotent.

    Rules for implementers (a subclass provides these and nothing else):

    1. ``parameters``: a class-level mapping ``name -> Parameter``. The constructor accepts
       exactly these names as keyword arguments, each a scalar or a length-``n`` sequence,
       and stores them broadcast to read-only (n,) arrays in ``self.params``, after checking
       each value against the parameter's ``valid``/``allowed``.
    2. ``extras_keys``: a class-level tuple naming the keys ``_extras_impl`` returns, in
       addition to ``time_au`` which the base class adds. Peers read these keys; treat them
       as API.
    3. ``_initial_state(self) -> dict[str, ndarray]``: the state at time 0 from
       ``self.params``. Every array has leading dimension ``n``. It must not depend on the
       time step (which is unknown until :meth:`initialize`); the key set, shapes and dtypes
       it returns are the schema :meth:`set_state` enforces. ``"time_au"`` is reserved.
    4. ``_prepare(self, dt_au)`` (optional): precompute what depends on the time step, such
       as propagator factors. Called by :meth:`initialize`; must not change the state.
    5. ``_stage_impl(self, state, fields) -> (new_state, sources)``: one step of length
       ``self.dt_au`` under ``fields`` (n, 3), held constant over the step. Pure: it must not
       modify ``state`` or any attribute (scratch arrays it keeps for itself excepted);
       ``new_state`` has the same schema (shapes and dtypes; the memory order is free);
       ``sources`` is the (n, 3) float64 dmu/dt of the new state.
    6. ``_extras_impl(self, state) -> dict[str, ndarray]``: per-molecule (n,) float64 arrays
       of reported quantities of ``state``, keyed by ``extras_keys``. Pure as well. It may be
       called before :meth:`initialize`, when ``self.dt_au`` is None.
    7. ``_check_parameters(self)`` (optional): checks across parameters, raising
       ``ValueError`` naming the parameters, their values and what is allowed.
    8. ``_stage_one(self, state, field) -> (new_state, source)`` and
       ``_extras_one(self, state) -> dict[str, float]`` (optional, together): 5 and 6 for
       one molecule (used when n = 1) on Python floats, ``field`` and ``source`` being
       3 floats, ``state`` the usual arrays. A driver process steps one molecule, and
       numpy's per-call cost on (1, 3) arrays would be most of its step. They must give
       bit for bit what 5 and 6 give (share the formulas; test it).

    The base class checks inputs (shapes, finiteness), keeps the time (``t += dt`` on
    commit), the molecule ids and the staged step. Nothing here is thread-safe: one model
    belongs to one thread.
    """

    name: ClassVar[str] = ""
    parameters: ClassVar[Mapping[str, Parameter]] = {}
    extras_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, n: int = 1, **params: Any) -> None:
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"{self._label()}: n = {n!r} is not allowed; expected an int >= 1")
        self._n = int(n)
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            raise ValueError(
                f"{self._label()}: unknown parameter(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(self.parameters) or '(none)'}"
            )
        self.params: dict[str, np.ndarray] = {
            key: self._broadcast(key, spec, params.get(key, spec.default))
            for key, spec in self.parameters.items()
        }
        self._check_parameters()
        self._dt: float | None = None
        self._ids = np.arange(self._n, dtype=np.int64)
        self._time = 0.0
        self._staged: tuple[State, np.ndarray, float] | None = None
        self._one = self._n == 1 and type(self)._stage_one is not Model._stage_one
        state = self._initial_state()
        self._schema = self._schema_of(state)
        self._state = state

    # ---------------------------------------------------------------- public API

    @property
    def n(self) -> int:
        """Number of molecules this instance propagates."""
        return self._n

    @property
    def dt_au(self) -> float | None:
        """Time step in a.u. (None until :meth:`initialize`)."""
        return self._dt

    @property
    def molecule_ids(self) -> np.ndarray:
        """Ids of the molecules, (n,) int64 (0..n-1 until :meth:`initialize` sets them)."""
        return self._ids.copy()

    @property
    def time_au(self) -> float:
        """Time of the committed state in a.u. (shared by all n molecules)."""
        return self._time

    @property
    def initialized(self) -> bool:
        """Whether :meth:`initialize` has set a time step."""
        return self._dt is not None

    @property
    def staged(self) -> bool:
        """Whether a staged step waits for :meth:`commit`."""
        return self._staged is not None

    def initialize(self, dt_au: float, molecule_ids: Sequence[int] | None = None) -> None:
        """Set the time step (a.u., finite and > 0) and the molecule ids (n ints).

        The committed state is kept, so a re-initialisation does not restart the molecules;
        a staged step is dropped.
        """
        try:
            dt = float(dt_au)
        except (TypeError, ValueError):
            dt = math.nan
        if not (math.isfinite(dt) and dt > 0):
            raise ValueError(
                f"{self._label()}: dt_au = {dt_au!r} is not allowed; expected a finite "
                "number > 0 (the time step in atomic units)"
            )
        if molecule_ids is not None:
            ids = np.asarray(molecule_ids)
            if ids.shape != (self._n,) or (ids.size and ids.dtype.kind not in "iu"):
                raise ValueError(
                    f"{self._label()}: molecule_ids = {molecule_ids!r} is not allowed; "
                    f"expected {self._n} integer(s)"
                )
            self._ids = ids.astype(np.int64)
        self._prepare(dt)
        self._dt = dt
        self._staged = None

    def stage(self, fields: Any) -> np.ndarray:
        """Compute one step under ``fields`` (n, 3) from the committed state; return the
        sources dmu/dt (n, 3). The committed state is unchanged until :meth:`commit`."""
        if self._dt is None:
            raise RuntimeError(
                f"{self._label()}: call initialize(dt_au=...) before stage() or step()"
            )
        f = np.asarray(fields, dtype=np.float64)
        if f.shape != (self._n, 3):
            raise ValueError(
                f"{self._label()}: fields must have shape ({self._n}, 3) (one field vector "
                f"per molecule, a.u.); got shape {f.shape}"
            )
        if self._one:
            return self._stage_scalar(f.tolist()[0])
        if not np.isfinite(f).all():
            bad = _first_bad_row(f)
            raise ValueError(
                f"{self._label()}: field of molecule {self._ids[bad]} is not finite: "
                f"{f[bad].tolist()}"
            )
        new_state, sources = self._stage_impl(self._state, f)
        sources = np.asarray(sources, dtype=np.float64)
        if sources.shape != (self._n, 3):
            raise RuntimeError(
                f"{self._label()}: _stage_impl returned sources of shape {sources.shape}, "
                f"expected ({self._n}, 3)"
            )
        if not np.isfinite(sources).all():
            bad = _first_bad_row(sources)
            self._raise_bad_source(bad, sources[bad])
        self._staged = (new_state, sources, self._time + self._dt)
        return sources

    def _stage_scalar(self, field: list[float]) -> np.ndarray:
        """:meth:`stage` for one molecule through ``_stage_one``."""
        isfinite = math.isfinite
        if not (isfinite(field[0]) and isfinite(field[1]) and isfinite(field[2])):
            raise ValueError(
                f"{self._label()}: field of molecule {self._ids[0]} is not finite: {field}"
            )
        new_state, source = self._stage_one(self._state, tuple(field))
        if not (isfinite(source[0]) and isfinite(source[1]) and isfinite(source[2])):
            self._raise_bad_source(0, source)
        sources = np.array((source,), dtype=np.float64)
        self._staged = (new_state, sources, self._time + self._dt)
        return sources

    def _raise_bad_source(self, index: int, source: Any) -> None:
        raise FloatingPointError(
            f"{self._label()}: source of molecule {self._ids[index]} is not finite "
            f"({list(map(float, source))}) at t = {self._time + self._dt} a.u.; is the "
            "field or the time step too large?"
        )

    def commit(self) -> np.ndarray:
        """Make the staged step the current state; return its sources (n, 3)."""
        if self._staged is None:
            raise RuntimeError(f"{self._label()}: nothing staged; call stage(fields) first")
        self._state, sources, self._time = self._staged
        self._staged = None
        return sources

    def step(self, fields: Any) -> np.ndarray:
        """Stage and commit one step under ``fields`` (n, 3); return the sources (n, 3)."""
        self.stage(fields)
        return self.commit()

    def extras(self) -> dict[str, np.ndarray]:
        """Reported quantities of the committed state: key -> (n,) float64 array."""
        out = {"time_au": np.full(self._n, self._time)}
        out.update(self._extras_impl(self._state))
        return out

    def extras_of(self, index: int = 0) -> dict[str, float]:
        """Reported quantities of molecule ``index`` (0..n-1): key -> float."""
        if self._one and index == 0:
            out = {"time_au": self._time}
            out.update(self._extras_one(self._state))
            return out
        return {key: float(value[index]) for key, value in self.extras().items()}

    def get_state(self) -> dict[str, np.ndarray]:
        """A copy of the committed state as plain arrays (for checkpoints), with time_au."""
        state = {key: value.copy() for key, value in self._state.items()}
        state["time_au"] = np.array(self._time)
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Replace the committed state by one from :meth:`get_state`; drop a staged step."""
        expected = set(self._schema) | {"time_au"}
        if set(state) != expected:
            raise ValueError(
                f"{self._label()}: state keys {sorted(state)} do not match the model's "
                f"{sorted(expected)}"
            )
        new: State = {}
        for key, (shape, dtype) in self._schema.items():
            value = np.array(state[key], dtype=dtype, copy=True)
            if value.shape != shape:
                raise ValueError(
                    f"{self._label()}: state[{key!r}] has shape {value.shape}, expected {shape}"
                )
            if not np.isfinite(value).all():
                raise ValueError(f"{self._label()}: state[{key!r}] is not finite")
            new[key] = value
        time = np.asarray(state["time_au"], dtype=np.float64)
        if time.shape != () or not math.isfinite(float(time)):
            raise ValueError(
                f"{self._label()}: state['time_au'] = {state['time_au']!r} is not allowed; "
                "expected a finite scalar"
            )
        self._state = new
        self._time = float(time)
        self._staged = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} n={self._n} dt_au={self._dt} time_au={self._time}>"

    # ---------------------------------------------------------------- for implementers

    def _initial_state(self) -> State:
        raise NotImplementedError

    def _prepare(self, dt_au: float) -> None:
        """Precompute what depends on the time step (optional)."""

    def _stage_impl(self, state: State, fields: np.ndarray) -> tuple[State, np.ndarray]:
        raise NotImplementedError

    def _extras_impl(self, state: State) -> dict[str, np.ndarray]:
        return {}

    def _stage_one(
        self, state: State, field: tuple[float, float, float]
    ) -> tuple[State, tuple[float, float, float]]:
        raise NotImplementedError

    def _extras_one(self, state: State) -> dict[str, float]:
        raise NotImplementedError

    def _check_parameters(self) -> None:
        """Checks across parameters (optional)."""

    # ---------------------------------------------------------------- helpers

    def _label(self) -> str:
        return self.name or type(self).__name__

    def _broadcast(self, key: str, spec: Parameter, value: Any) -> np.ndarray:
        label = self._label()
        try:
            raw = np.array(value, dtype=np.float64)  # a copy: the caller's array stays writable
        except (TypeError, ValueError):
            raise ValueError(
                f"{label}: parameter {key} = {value!r} is not a number; expected {spec.allowed}"
            ) from None
        if raw.ndim == 0:
            raw = np.full(self._n, float(raw))
        elif raw.shape != (self._n,):
            raise ValueError(
                f"{label}: parameter {key} = {value!r} has shape {raw.shape}; expected a "
                f"scalar or a sequence of length n = {self._n}"
            )
        if spec.kind is int:
            integral = np.isfinite(raw) & (raw == np.round(raw))
            if not integral.all():
                bad = int(np.flatnonzero(~integral)[0])
                raise ValueError(
                    f"{label}: parameter {key} = {self._show(value, bad)} is not an integer; "
                    f"expected {spec.allowed}"
                )
            arr = raw.astype(np.int64)
        else:
            arr = raw
        ok = np.asarray(spec.valid(arr), dtype=bool) & np.isfinite(raw)
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise ValueError(
                f"{label}: parameter {key} = {self._show(value, bad)} is not allowed; "
                f"expected {spec.allowed}"
            )
        arr.setflags(write=False)
        return arr

    def _show(self, value: Any, index: int) -> str:
        if np.ndim(value) == 0:
            return repr(value)
        return f"{np.asarray(value)[index]!r} (molecule index {index})"

    def _schema_of(self, state: State) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        if "time_au" in state:
            raise RuntimeError(f"{self._label()}: state key 'time_au' is reserved")
        schema = {}
        for key, value in state.items():
            if not isinstance(value, np.ndarray) or value.ndim < 1 or value.shape[0] != self._n:
                raise RuntimeError(
                    f"{self._label()}: _initial_state()[{key!r}] must be an ndarray with "
                    f"leading dimension n = {self._n}"
                )
            schema[key] = (value.shape, value.dtype)
        return schema
