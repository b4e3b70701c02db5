"""The model interface every maxwellhub driver model implements: what an implementer reads.

A model holds ``n`` molecules of one kind that are propagated together with numpy (``n = 1``
for a plain driver process, ``n = M`` for an ensemble driver or when embedded in the EM
process). The public methods here do the checking and the bookkeeping; a model only writes
a few private, side-effect-free functions (the numbered rules of :class:`Model`) and
declares its parameters (:class:`Parameter`). How values are normalised, spread over
molecules and carried in states is plain functions in ``maxwellhub.models._params``.

This module never touches a socket, never converts units (everything is atomic units but
the :data:`UNIT_SUFFIXES` a caller may use) and never imports scipy.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ._params import (
    PARAM_PREFIX,
    RNG_KEY,
    TEXT_KINDS,
    ParameterError,
    State,
    all_finite,
    canonical_keys,
    check_n,
    checked_arrays,
    checked_generator_state,
    current_values,
    first_bad_row,
    is_per_molecule,
    jsonable,
    molecule_rows,
    normalise,
    params_of_state,
    schema_of,
    spread,
    to_array,
    to_atomic_units,
)

__all__ = [
    "DIPOLE_KEYS",
    "KINDS",
    "REQUIRED",
    "UNIT_SUFFIXES",
    "Model",
    "Parameter",
    "ParameterError",
]

#: The kinds of :class:`Parameter`: numbers, flags, text, file paths and 3-vectors.
KINDS: tuple[Any, ...] = (float, int, bool, str, "path", "vector")

#: The units chemists think in, accepted in place of atomic units: a parameter ``omega``
#: (or ``dt_substep_au``) that declares ``unit="energy"`` (``"time"``) may be given as
#: ``omega_eV`` (``dt_substep_fs``) and is stored in atomic units. Suffix -> (the quantity,
#: atomic units per unit): CODATA 2018 Hartree energy 27.211386245988 eV, atomic unit of
#: time 0.024188843265857 fs; 1 debye = 1e-21 / c C m = 0.3934303 e a0.
UNIT_SUFFIXES: dict[str, tuple[str, float]] = {
    "_eV": ("energy", 1.0 / 27.211386245988),
    "_fs": ("time", 1.0 / 0.024188843265857),
    "_debye": ("dipole", 0.393430307),
}
_UNITS = {quantity for quantity, _ in UNIT_SUFFIXES.values()}
_DEFAULT_ALLOWED: dict[Any, str] = {
    float: "a finite number",
    int: "an integer",
    bool: "true or false",
    str: "a string",
    "path": "the path of an existing file",
    "vector": "a 3-vector [x, y, z] of finite numbers",
}
#: The extras keys of the dipole (a.u.) that every model reports, x, y, z.
DIPOLE_KEYS = ("mux_au", "muy_au", "muz_au")
# names the constructor and validate_params take themselves
_RESERVED_NAMES = frozenset({"n", "base_dir"})


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: The default of a parameter that has none: leaving it out is an error.
REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Parameter:
    """One model parameter: its default, its kind and what values it allows.

    ``kind``: ``float``, ``int``, ``bool``, ``str``, ``"path"`` (a file: made absolute and
    checked to exist) or ``"vector"`` (3 floats). ``valid`` maps the values, one row per
    molecule (``(n,)``, ``(n, 3)`` for vectors, a numpy unicode array for text; a shared
    parameter has one row), to a boolean mask of the same rows; ``allowed`` says in words
    what is accepted (it appears in errors; the default names the kind). ``shared``: one
    value for the whole ensemble, never given or sliced per molecule. ``mutable``: may be
    changed between steps by :meth:`Model.set_params`. ``choices``: for ``str``, the
    allowed values, matched case-insensitively and stored in the spelling given here.
    ``default``: a value of the kind, :data:`REQUIRED` (must be given), or None for a
    shared ``str``/``"path"`` that may stay unset; a ``"path"`` default is REQUIRED or None
    (a relative default would depend on the current directory). ``unit``: the physical
    quantity of a float or vector parameter (``"energy"``, ``"time"``, ``"dipole"``); the
    value is in atomic units, and the name with a suffix of :data:`UNIT_SUFFIXES`
    (``omega_eV``; ``dt_substep_fs`` for ``dt_substep_au``) takes it in eV, fs or debye.
    """

    default: Any
    doc: str
    kind: Any = float
    valid: Callable[[np.ndarray], np.ndarray] | None = None
    allowed: str = ""
    shared: bool = False
    mutable: bool = False
    choices: tuple[str, ...] | None = None
    unit: str | None = None

    def __post_init__(self) -> None:
        if self.unit is not None and (
            self.unit not in _UNITS or self.kind not in (float, "vector")
        ):
            raise ValueError(
                f"Parameter unit {self.unit!r} needs kind float or 'vector' and one of "
                f"{', '.join(sorted(_UNITS))}"
            )
        if self.kind not in KINDS:
            raise ValueError(
                f"Parameter kind {self.kind!r} is not one of float, int, bool, "
                "str, 'path', 'vector'"
            )
        if self.choices is not None:
            if self.kind is not str:
                raise ValueError(f"Parameter choices {self.choices!r} need kind=str")
            object.__setattr__(self, "choices", tuple(str(c) for c in self.choices))
        if not self.allowed:
            text = (
                f"one of {', '.join(self.choices)}" if self.choices else _DEFAULT_ALLOWED[self.kind]
            )
            object.__setattr__(self, "allowed", text)
        if self.default is None and not (self.shared and self.kind in TEXT_KINDS):
            raise ValueError(
                "a Parameter default of None (unset) is only for shared str and 'path' parameters"
            )
        if self.kind == "path" and self.default is not None and self.default is not REQUIRED:
            raise ValueError(
                f"a 'path' Parameter's default must be REQUIRED or None, not {self.default!r}"
            )
        if self.kind == "vector" and self.default is not REQUIRED:
            object.__setattr__(self, "default", tuple(float(x) for x in self.default))


class Model:
    """Base class of driver models: ``n`` molecules propagated together, one step at a time.

    Usage (atomic units throughout)::

        model = create_model("tls", n=2, pe_initial=[1e-4, 0.0])
        model.initialize(dt_au=0.5, molecule_ids=[0, 1])
        sources = model.stage(fields)  # (n, 3) fields -> (n, 3) dmu/dt; state unchanged
        model.commit()                 # the staged step becomes the current state
        sources = model.step(fields)   # stage + commit
        model.extras()                 # {"time_au": (n,), "energy_au": (n,), ...}
        model.set_params({"omega": 0.25})  # a mutable parameter, from the next step on

    ``stage`` computes from the committed state and keeps the result aside, so staging the
    same step again (a hub re-sending a field after a driver was replaced) is idempotent.

    Rules for implementers (a subclass provides these and nothing else):

    1. ``parameters``: a class-level mapping ``name -> Parameter``. The constructor and
       :meth:`validate_params` accept exactly these names (and the ``aliases``) as keyword
       arguments. A per-molecule parameter (``shared=False``) takes one value for all n
       molecules (for ``"vector"``: one 3-vector) or a length-n list (n 3-vectors); a
       shared one takes one value, and a list for a shared scalar or string is refused.
       ``self.params[name]`` then holds, per-molecule: a read-only (n,) float64 or int64
       array for float/int, a read-only (n,) bool array for bool, a tuple of n str for
       str/path, a read-only (n, 3) float64 array for vector; shared: a Python float, int,
       bool or str (None when unset), an absolute path str, or a read-only (3,) float64
       array. Paths are resolved against ``base_dir`` (default: the current directory) and
       must exist. ``n`` and ``base_dir`` are not parameter names. A ``mutable`` parameter
       may change between steps (:meth:`set_params`; a state carrying another value takes
       it over); any other is fixed for the model's life (a state with another value is
       refused). The constructor validates exactly as :meth:`validate_params` does.
    2. ``aliases`` (optional): a class-level mapping ``other name -> (name, converter or
       None)``, e.g. MaxwellLink's spelling. The converter maps the value given under the
       alias to one for ``name``. Giving an alias and its name, or two aliases of one name,
       is an error naming both.
    3. ``_validate(cls, params, n)`` (optional classmethod): checks across parameters, on
       the stored values of rule 1 (defaults filled in), raising :class:`ParameterError`
       (or ValueError) naming the parameters, their values and what is allowed. It must be
       cheap: ``maxwellhub run`` calls it before any driver starts, in the EM process (it
       may read a small input file; it must not run an SCF). The older instance hook
       ``_check_parameters(self)`` still runs after it, on a bare instance that has only
       ``self.n``, ``self.params`` and ``self.name``; new models use ``_validate``.
    4. ``_configure(self)`` (optional): derive from ``self.params`` what does not depend on
       the time step (per-axis picks, constants of the float path, a basis or a molecule
       object). Called by the constructor before ``_initial_state``, and again after every
       change of parameters (:meth:`set_params`, :meth:`set_state` with other parameters).
       It must assign attributes, not change objects it made earlier in place: a change
       that fails is rolled back by restoring the instance's attribute dict.
    5. ``_initial_state(self) -> dict[str, ndarray]``: the state at time 0 from
       ``self.params``. Every array has leading dimension ``n``. It must not depend on the
       time step (which is unknown until :meth:`initialize`); the key set, shapes and dtypes
       it returns are the schema :meth:`set_state` enforces, and a mutable parameter must
       not change them. ``"time_au"`` and keys starting ``param.`` or ``rng.`` are reserved.
    6. ``_prepare(self, dt_au)`` (optional): precompute what depends on the time step, such
       as propagator factors. Called by :meth:`initialize` and after every change of
       parameters once initialised; must not change the state; assigns attributes as 4.
    7. ``_stage_impl(self, state, fields) -> (new_state, sources)``: one step of length
       ``self.dt_au`` under ``fields`` (n, 3), held constant over the step. Pure: it must not
       modify ``state`` or any attribute (scratch arrays named in ``scratch_attributes``
       excepted; caches a library fills on first use count as attributes: fill them in 4
       or 6); ``new_state`` has the same schema (shapes and dtypes; the memory order is
       free); ``sources`` is the (n, 3) float64 dmu/dt of the new state.
    8. ``_extras_impl(self, state) -> dict[str, ndarray]``: per-molecule (n,) float64 arrays
       of reported quantities of ``state``, keyed by ``extras_keys``. Pure as well. It may be
       called before :meth:`initialize`, when ``self.dt_au`` is None.
    9. ``extras_keys``: a tuple naming the keys ``_extras_impl`` returns, in addition to
       ``time_au`` which the base class adds. Peers read these keys; treat them as API. The
       class attribute is the default; a model whose keys depend on its parameters assigns
       ``self.extras_keys`` in ``_configure`` (which ``super().__init__`` runs) or in its
       ``__init__`` after ``super().__init__()``: the base class reads it only after the
       constructor. Keys must not change with a mutable parameter (peers record them).
    10. ``_stage_one(self, state, field) -> (new_state, source)`` and
        ``_extras_one(self, state) -> dict[str, float]`` (optional, together): 7 and 8 for
        one molecule (used when n = 1) on Python floats, ``field`` and ``source`` being
        3 floats, ``state`` the usual arrays. A driver process steps one molecule, and
        numpy's per-call cost on (1, 3) arrays would be most of its step. They must give
        bit for bit what 7 and 8 give (share the formulas; test it).
    11. Randomness: a model that draws random numbers keeps one ``numpy.random.Generator``
        in ``self._rng``, made once in ``__init__`` after ``super().__init__()`` (say from a
        shared int ``seed`` parameter), and draws only from it in 7 and 10. The base class
        puts the generator back after :meth:`stage` (so staging stays pure and idempotent),
        advances it on :meth:`commit`, and carries its state in :meth:`get_state`.
    12. ``example_params``: small, fast parameters for the conformance test
        (``tests/integration/test_model_conformance.py``), run at n = 1 and n = 3;
        ``conformance_rtol``: how far n batched molecules may differ from n single ones
        (0: bit for bit).
    13. ``_kick_impl(self, state, impulses) -> new_state`` (optional): the committed state
        after an impulsive field ``E(t) = impulse delta(t)`` now, ``impulses`` (n, 3) in
        a.u. of field times time (rows of zeros: that molecule is not kicked). Pure, same
        schema. Models without it refuse :meth:`apply_kick`.

    The base class checks inputs (shapes, finiteness), keeps the time (``t += dt`` on
    commit), the molecule ids, the staged step, and the parameters and the generator's
    state inside :meth:`get_state` (``param.<name>`` arrays, text as numpy unicode, and
    ``rng.state``), so checkpoints (``.npz`` read with ``allow_pickle=False``) carry them.
    Nothing here is thread-safe: one model belongs to one thread.
    """

    name: ClassVar[str] = ""
    parameters: ClassVar[Mapping[str, Parameter]] = {}
    aliases: ClassVar[Mapping[str, tuple[str, Callable[[Any], Any] | None]]] = {}
    extras_keys: tuple[str, ...] = ()
    scratch_attributes: ClassVar[tuple[str, ...]] = ()
    example_params: ClassVar[dict[str, Any]] = {}
    conformance_rtol: ClassVar[float] = 0.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for key, spec in cls.parameters.items():
            if not isinstance(spec, Parameter):
                raise TypeError(f"{cls.__qualname__}.parameters[{key!r}] is not a Parameter")
            if key in _RESERVED_NAMES or key.startswith(("param.", "rng.")):
                raise TypeError(f"{cls.__qualname__}: {key!r} cannot be a parameter name")
        for alias, target in cls.aliases.items():
            if alias in cls.parameters or target[0] not in cls.parameters:
                raise TypeError(
                    f"{cls.__qualname__}.aliases[{alias!r}] = {target!r}: an "
                    "alias must be a new name for a declared parameter"
                )

    def __init__(self, n: int = 1, **params: Any) -> None:
        self._n = check_n(type(self)._label(), n)
        self.params: dict[str, Any] = self._checked_params(self._n, None, params)[0]
        self._param_state = self._params_as_arrays()  # get_state's param.* arrays
        self._dt: float | None = None
        self._ids = np.arange(self._n, dtype=np.int64)
        self._time = 0.0
        self._staged: tuple[State, np.ndarray, float, Mapping[str, Any] | None] | None = None
        self._one = self._n == 1 and type(self)._stage_one is not Model._stage_one
        self._configure()
        state = self._initial_state()
        self._schema = schema_of(self._label(), self._n, state)
        self._state = state

    # ---------------------------------------------------------------- parameters

    @classmethod
    def validate_params(
        cls, n: int = 1, base_dir: str | os.PathLike | None = None, **params: Any
    ) -> dict[str, Any]:
        """Check ``params`` for ``n`` molecules without building the model, cheaply.

        Maps aliases, refuses unknown names, checks kinds, shapes, ``valid``, choices and
        the cross checks (rule 3), resolves paths against ``base_dir`` (default: the current
        directory) and checks they exist. Returns the parameters given, under their own
        names, as plain JSON-able values (absolute paths, canonical spellings; one value
        for all molecules stays one value, a per-molecule list stays a list): what
        ``maxwellhub run`` hands to drivers. Raises :class:`ParameterError` naming the
        model, the key, the molecule index where it is per molecule, and what is allowed.
        """
        return cls._checked_params(check_n(cls._label(), n), base_dir, params)[1]

    @classmethod
    def slice_params(cls, params: Mapping[str, Any], start: int, stop: int) -> dict[str, Any]:
        """The parameters of molecules ``start..stop-1`` out of :meth:`validate_params`'s
        result: per-molecule lists are cut, shared values and values given once for all
        molecules (a single 3-vector included) stay whole; for one molecule a cut list
        becomes its single value."""
        out = {}
        for key, value in params.items():
            spec = cls.parameters.get(key)
            if spec is not None and not spec.shared and is_per_molecule(spec, value):
                part = list(value)[start:stop]
                value = part[0] if stop - start == 1 else part
            out[key] = value
        return out

    def set_params(
        self, changes: Mapping[str, Any], molecules: Sequence[int] | None = None
    ) -> None:
        """Change mutable parameters from the next step on.

        ``changes``: name (or alias) -> value, as for the constructor; ``molecules``:
        indices 0..n-1 the change applies to (None: all; a shared parameter only with
        None), each value one for all of them or one per listed molecule. Validates
        everything first (ParameterError naming the key and the molecule), re-runs the
        cross checks, ``_configure`` and, once initialised, ``_prepare``, and drops a
        staged step; if anything fails the model is left as it was.
        """
        self._apply_params(self.check_params(changes, molecules))

    @classmethod
    def check_changes(cls, changes: Mapping[str, Any], n: int = 1) -> dict[str, Any]:
        """A cheap check of a parameter change for ``n`` molecules, without a model (what
        ``maxwellhub run`` does with its ``[[schedule]]`` before anything starts): names
        (aliases and unit suffixes too), mutability and each value on its own; the checks
        across parameters need the model and run in :meth:`set_params`. Returns canonical
        name -> JSON-able value; ParameterError naming the key."""
        label = cls._label()
        out = {}
        for key, (name, value) in cls._canonical_keys(changes).items():
            spec = cls._mutable_spec(key, name)
            out[key] = normalise(label, name, spec, value, 1 if spec.shared else n, None)[1]
        return out

    @classmethod
    def _mutable_spec(cls, key: str, name: str) -> Parameter:
        """The spec of parameter ``key`` (named ``name`` by the caller) if it may change
        during a run, else ParameterError naming it and the ones that may."""
        spec = cls.parameters[key]
        if not spec.mutable:
            mutable = [k for k, p in cls.parameters.items() if p.mutable]
            raise ParameterError(
                f"{cls._label()}: parameter {name} cannot be changed after the model is made; "
                f"mutable: {', '.join(mutable) or '(none)'}",
                name,
            )
        return spec

    @classmethod
    def takes_kicks(cls) -> bool:
        """Whether :meth:`apply_kick` works for this model (rule 13)."""
        return cls._kick_impl is not Model._kick_impl

    def check_params(
        self,
        changes: Mapping[str, Any],
        molecules: Sequence[int] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """:meth:`set_params` without applying: the complete new ``self.params`` it would
        set. ``params``: check against these stored parameters instead of the current
        ones (for a change queued behind others)."""
        label = self._label()
        base = dict(self.params if params is None else params)
        rows = molecule_rows(self._label(), self._n, molecules)
        for key, (name, value) in self._canonical_keys(changes).items():
            spec = self._mutable_spec(key, name)
            if spec.shared:
                if rows is not None:
                    raise ParameterError(
                        f"{label}: parameter {name} is shared by all molecules; change it "
                        "for all of them (molecules=None)",
                        name,
                    )
                base[key] = normalise(label, name, spec, value, self._n, None)[0]
                continue
            full = current_values(spec, base[key])
            if rows is None:
                full = value
            else:
                given = spread(label, name, spec, value, len(rows))
                for row, item in zip(rows, given, strict=True):
                    full[row] = item
            base[key] = normalise(label, name, spec, full, self._n, None)[0]
        self._cross_check(base, self._n)
        return base

    def _apply_params(self, params: dict[str, Any]) -> None:
        """Make ``params`` (complete and checked) current: ``_configure``, ``_prepare``
        once initialised, drop a staged step; all or nothing."""
        saved = dict(self.__dict__)
        try:
            self.params = params
            self._param_state = self._params_as_arrays()
            self._staged = None
            self._configure()
            if self._dt is not None:
                self._prepare(self._dt)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    @classmethod
    def _checked_params(
        cls, n: int, base_dir: str | os.PathLike | None, params: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(stored values of every parameter, canonical JSON-able values of those given)."""
        label = cls._label()
        given = cls._canonical_keys(params)
        stored: dict[str, Any] = {}
        canonical: dict[str, Any] = {}
        for key, spec in cls.parameters.items():
            if key in given:
                name, value = given[key]
                stored[key], canonical[key] = normalise(label, name, spec, value, n, base_dir)
            elif spec.default is REQUIRED:
                raise ParameterError(
                    f"{label}: parameter {key} is required ({spec.doc}); expected {spec.allowed}",
                    key,
                )
            elif spec.default is None:
                stored[key] = None
            else:
                stored[key] = normalise(label, key, spec, spec.default, n, base_dir)[0]
        cls._cross_check(stored, n)
        return stored, canonical

    @classmethod
    def _cross_check(cls, stored: dict[str, Any], n: int) -> None:
        cls._validate(stored, n)
        if cls._check_parameters is not Model._check_parameters:
            probe = object.__new__(cls)  # rule 3: the old hook sees n and params only
            probe._n = n
            probe.params = stored
            probe._check_parameters()

    @classmethod
    def _canonical_keys(cls, params: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
        """name -> (the name or alias given, the value, converted) for ``params``."""
        return canonical_keys(cls._label(), cls.parameters, cls.aliases, cls._unit_key, params)

    @classmethod
    def _unit_key(cls, name: str) -> tuple[str, Callable[[Any], Any]] | None:
        """(the parameter, a converter to atomic units) for a name with a unit suffix of
        :data:`UNIT_SUFFIXES` (``omega_eV``), or None."""
        for suffix, (quantity, factor) in UNIT_SUFFIXES.items():
            if not name.endswith(suffix):
                continue
            stem = name[: -len(suffix)]
            for key in (stem, f"{stem}_au"):
                spec = cls.parameters.get(key)
                if spec is not None and spec.unit == quantity:
                    return key, functools.partial(to_atomic_units, factor=factor)
        return None

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
            return self._stage_scalar(f.tolist()[0], self._dt)
        if not all_finite(f):
            bad = first_bad_row(f)
            raise ValueError(
                f"{self._label()}: field of molecule {self._ids[bad]} is not finite: "
                f"{f[bad].tolist()}"
            )
        rng = self._generator() if "_rng" in self.__dict__ else None
        if rng is None:
            new_state, sources = self._stage_impl(self._state, f)
            drawn = None
        else:
            new_state, sources, drawn = self._with_generator(rng, self._stage_impl, f)
        sources = np.asarray(sources, dtype=np.float64)
        if sources.shape != (self._n, 3):
            raise RuntimeError(
                f"{self._label()}: _stage_impl returned sources of shape {sources.shape}, "
                f"expected ({self._n}, 3)"
            )
        if not all_finite(sources):
            bad = first_bad_row(sources)
            self._raise_bad_source(bad, sources[bad])
        self._staged = (new_state, sources, self._time + self._dt, drawn)
        return sources

    def _stage_scalar(self, field: list[float], dt: float) -> np.ndarray:
        """:meth:`stage` for one molecule through ``_stage_one``."""
        isfinite = math.isfinite
        if not (isfinite(field[0]) and isfinite(field[1]) and isfinite(field[2])):
            raise ValueError(
                f"{self._label()}: field of molecule {self._ids[0]} is not finite: {field}"
            )
        one = (field[0], field[1], field[2])
        rng = self._generator() if "_rng" in self.__dict__ else None
        if rng is None:
            new_state, source = self._stage_one(self._state, one)
            drawn = None
        else:
            new_state, source, drawn = self._with_generator(rng, self._stage_one, one)
        if not (isfinite(source[0]) and isfinite(source[1]) and isfinite(source[2])):
            self._raise_bad_source(0, source)
        sources = np.array((source,), dtype=np.float64)
        self._staged = (new_state, sources, self._time + dt, drawn)
        return sources

    def _with_generator(
        self, rng: np.random.Generator, impl: Callable, field: Any
    ) -> tuple[State, Any, Mapping[str, Any]]:
        """Run a step that may draw from ``rng``; return its result and the generator's
        state after the draws, with the generator put back as it was (rule 11)."""
        before = rng.bit_generator.state
        try:
            new_state, sources = impl(self._state, field)
            return new_state, sources, rng.bit_generator.state
        finally:
            rng.bit_generator.state = before

    def _raise_bad_source(self, index: int, source: Any) -> None:
        raise FloatingPointError(
            f"{self._label()}: source of molecule {self._ids[index]} is not finite "
            f"({list(map(float, source))}) at t = {self._time + (self._dt or 0.0)} a.u.; is "
            "the field or the time step too large?"
        )

    def commit(self) -> np.ndarray:
        """Make the staged step the current state; return its sources (n, 3)."""
        if self._staged is None:
            raise RuntimeError(f"{self._label()}: nothing staged; call stage(fields) first")
        self._state, sources, self._time, drawn = self._staged
        if drawn is not None:
            rng = self._generator()
            if rng is not None:
                rng.bit_generator.state = drawn
        self._staged = None
        return sources

    def apply_kick(self, impulse: Any, molecules: Sequence[int] | None = None) -> None:
        """Kick the committed state with an impulsive field ``E(t) = impulse delta(t)`` at
        the current time (rule 13): ``impulse`` = kappa e in a.u. of field times time, one
        3-vector for every listed molecule or one row per listed molecule; ``molecules``:
        indices 0..n-1 (None: all). A staged step is dropped. ParameterError (naming the
        model and the molecule) for a model without kicks or an impulse that is not
        finite."""
        label = self._label()
        if not self.takes_kicks():
            raise ParameterError(f"{label}: this model takes no kicks", "kick")
        rows = molecule_rows(self._label(), self._n, molecules)
        count = self._n if rows is None else len(rows)
        try:
            given = np.broadcast_to(np.asarray(impulse, dtype=np.float64), (count, 3))
        except (TypeError, ValueError):
            raise ParameterError(
                f"{label}: kick impulse {impulse!r} is not allowed; expected a 3-vector "
                f"(a.u.) or {count} of them",
                "kick",
            ) from None
        bad = np.flatnonzero(~np.isfinite(given).all(axis=1))
        if bad.size:
            row = int(bad[0]) if rows is None else rows[int(bad[0])]
            raise ParameterError(
                f"{label}: kick impulse of molecule {self._ids[row]} is not finite",
                "kick",
                row,
            )
        impulses = np.zeros((self._n, 3))
        impulses[slice(None) if rows is None else rows] = given
        new = self._kick_impl(self._state, impulses)
        if set(new) != set(self._schema) or any(
            new[k].shape != shape for k, (shape, _) in self._schema.items()
        ):
            raise RuntimeError(f"{label}: _kick_impl changed the state's schema")
        self._state = new
        self._staged = None

    def step(self, fields: Any) -> np.ndarray:
        """Stage and commit one step under ``fields`` (n, 3); return the sources (n, 3)."""
        self.stage(fields)
        return self.commit()

    def extras(self) -> dict[str, np.ndarray]:
        """Reported quantities of the committed state: key -> (n,) float64 array."""
        out = {"time_au": np.full(self._n, self._time)}
        out.update(self._extras_impl(self._state))
        return out

    def dipoles(self) -> np.ndarray:
        """The committed dipoles (n, 3) in a.u.: the extras ``mux_au``, ``muy_au``,
        ``muz_au`` as columns (every model reports them). A new array each call; models
        override it with a cheaper path giving the same values."""
        extras = self.extras()
        out = np.empty((self._n, 3), order="F")
        for k, key in enumerate(DIPOLE_KEYS):
            out[:, k] = extras[key]
        return out

    def extras_of(self, index: int = 0) -> dict[str, float]:
        """Reported quantities of molecule ``index`` (0..n-1): key -> float."""
        if self._one and index == 0:
            out = {"time_au": self._time}
            out.update(self._extras_one(self._state))
            return out
        return {key: float(value[index]) for key, value in self.extras().items()}

    def get_state(self) -> dict[str, np.ndarray]:
        """A copy of the committed state as plain arrays (for checkpoints): the model's
        arrays, ``time_au``, ``param.<name>`` for every parameter and, for a model with a
        generator, ``rng.state``. Nothing needs pickling."""
        state = {key: value.copy() for key, value in self._state.items()}
        state["time_au"] = np.array(self._time)
        for key, value in self._param_state.items():
            state[key] = value.copy()
        rng = self._generator()
        if rng is not None:
            state[RNG_KEY] = np.array(json.dumps(rng.bit_generator.state, default=jsonable))
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Replace the committed state by one from :meth:`get_state`; drop a staged step.

        Refuses (ValueError naming them) wrong or missing keys, shapes, non-finite values
        and parameters that are not valid, and an immutable parameter that differs from
        this model's (make the model with it instead). Mutable parameters that differ are
        taken over (re-running ``_configure`` and ``_prepare``); the model is unchanged if
        anything is refused.
        """
        new, time, params, drawn = self._checked_state(state)
        if params is not None:
            self._apply_params(params)
        self._state = new
        self._time = time
        rng = self._generator()
        if drawn is not None and rng is not None:
            rng.bit_generator.state = drawn
        self._staged = None

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise what :meth:`set_state` would raise for ``state``; change nothing."""
        self._checked_state(state)

    def _checked_state(
        self, state: Mapping[str, Any]
    ) -> tuple[State, float, dict[str, Any] | None, dict | None]:
        label = self._label()
        rng = self._generator()
        expected = set(self._schema) | {"time_au"} | {PARAM_PREFIX + key for key in self.parameters}
        if rng is not None:
            expected.add(RNG_KEY)
        new, time = checked_arrays(label, self._schema, state, expected)
        params = params_of_state(label, self.parameters, self.params, self._n, state)
        if params is not None:
            self._cross_check(params, self._n)
        return (
            new,
            time,
            params,
            None if rng is None else checked_generator_state(label, rng, state[RNG_KEY]),
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} n={self._n} dt_au={self._dt} time_au={self._time}>"

    # ---------------------------------------------------------------- for implementers

    @classmethod
    def _validate(cls, params: dict[str, Any], n: int) -> None:
        """Checks across parameters, cheap (rule 3; optional)."""

    def _check_parameters(self) -> None:
        """The older form of :meth:`_validate` (rule 3; optional)."""

    def _configure(self) -> None:
        """Derive what depends on the parameters only (rule 4; optional)."""

    def _initial_state(self) -> State:
        raise NotImplementedError

    def _prepare(self, dt_au: float) -> None:
        """Precompute what depends on the time step (rule 6; optional)."""

    def _stage_impl(self, state: State, fields: np.ndarray) -> tuple[State, np.ndarray]:
        raise NotImplementedError

    def _kick_impl(self, state: State, impulses: np.ndarray) -> State:
        raise NotImplementedError

    def _extras_impl(self, state: State) -> dict[str, np.ndarray]:
        return {}

    def _stage_one(
        self, state: State, field: tuple[float, float, float]
    ) -> tuple[State, tuple[float, float, float]]:
        raise NotImplementedError

    def _extras_one(self, state: State) -> dict[str, float]:
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers

    @classmethod
    def _label(cls) -> str:
        return cls.name or cls.__name__

    def _params_as_arrays(self) -> dict[str, np.ndarray]:
        return {
            PARAM_PREFIX + key: to_array(spec, self.params[key])
            for key, spec in self.parameters.items()
        }

    def _generator(self) -> np.random.Generator | None:
        rng = self.__dict__.get("_rng")
        return rng if isinstance(rng, np.random.Generator) else None
