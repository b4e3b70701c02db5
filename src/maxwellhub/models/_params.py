"""The parameter machinery behind :class:`~maxwellhub.models.base.Model`: plain functions.

What a model's parameters go through between the caller and ``self.params``: names mapped
(aliases, unit suffixes), values normalised and validated per kind (numbers, flags, text,
paths, 3-vectors), spread over the molecules a change names, turned into the arrays of
``get_state`` and back, and the generator state carried as JSON. Also the cheap checks of
the step path (finite fields, molecule indices) and of a state given to ``set_state``.

Implementers read :mod:`maxwellhub.models.base`, not this module: nothing here is API.
This module never imports :mod:`~maxwellhub.models.base` (the base class calls in, never
the other way), never touches a socket, never converts units beyond the suffixes it is
handed, and never unpickles: states are plain arrays and JSON.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

#: The kinds of parameter that hold text (a ``str`` or a file path).
TEXT_KINDS: tuple[Any, ...] = (str, "path")
# get_state() keys: "param.<name>" for each parameter, "rng.state" for a model's _rng
PARAM_PREFIX = "param."
RNG_KEY = "rng.state"

State = dict[str, np.ndarray]
Schema = dict[str, tuple[tuple[int, ...], np.dtype]]


class ParameterError(ValueError):
    """A parameter value is refused. ``key``: the parameter as the caller named it (an
    alias stays an alias), None for a check across parameters; ``molecule``: the molecule
    index (0..n-1) the error is about, or None."""

    def __init__(self, message: str, key: str | None = None, molecule: int | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.molecule = molecule


class Spec(Protocol):
    """What this module reads of a :class:`~maxwellhub.models.base.Parameter`."""

    @property
    def default(self) -> Any: ...
    @property
    def kind(self) -> Any: ...
    @property
    def valid(self) -> Callable[[np.ndarray], np.ndarray] | None: ...
    @property
    def allowed(self) -> str: ...
    @property
    def shared(self) -> bool: ...
    @property
    def mutable(self) -> bool: ...
    @property
    def choices(self) -> tuple[str, ...] | None: ...


# -------------------------------------------------------------------- names


def canonical_keys(
    label: str,
    parameters: Mapping[str, Spec],
    aliases: Mapping[str, tuple[str, Callable[[Any], Any] | None]],
    unit_key: Callable[[str], tuple[str, Callable[[Any], Any]] | None],
    params: Mapping[str, Any],
) -> dict[str, tuple[str, Any]]:
    """name -> (the name or alias given, the value, converted) for ``params``; ``unit_key``
    maps a name with a unit suffix to (the parameter, a converter) or None."""
    unknown = sorted(
        k for k in params if k not in parameters and k not in aliases and unit_key(k) is None
    )
    if unknown:
        named = "".join(f"; {a} for {t}" for a, (t, _) in aliases.items())
        raise ParameterError(
            f"{label}: unknown parameter(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(parameters) or '(none)'}{named}",
            unknown[0],
        )
    out: dict[str, tuple[str, Any]] = {}
    for name, value in params.items():
        convert: Callable[[Any], Any] | None
        if name in parameters:
            key, convert = name, None
        elif name in aliases:
            key, convert = aliases[name]
        else:
            key, convert = unit_key(name) or (name, None)
        if key in out:
            raise ParameterError(
                f"{label}: parameters {out[key][0]} and {name} both set {key}; give one of them",
                name,
            )
        if convert is not None:
            try:
                value = convert(value)
            except (TypeError, ValueError) as exc:
                raise ParameterError(
                    f"{label}: parameter {name} = {value!r} does not convert to {key}: {exc}",
                    name,
                ) from None
        out[key] = (name, value)
    return out


def molecule_rows(label: str, n: int, molecules: Sequence[int] | None) -> list[int] | None:
    """``molecules`` (indices 0..n-1, distinct; None: all) checked, as a list of ints."""
    if molecules is None:
        return None
    rows = list(molecules) if not isinstance(molecules, int | np.integer) else None
    if (
        not rows
        or any(
            isinstance(r, bool) or not isinstance(r, int | np.integer) or not 0 <= r < n
            for r in rows
        )
        or len(set(rows)) != len(rows)
    ):
        raise ParameterError(
            f"{label}: molecules = {molecules!r} is not allowed; "
            f"expected distinct indices 0..{n - 1}, or None for all"
        )
    return [int(r) for r in rows]


# -------------------------------------------------------------------- states


def schema_of(label: str, n: int, state: State) -> Schema:
    """The key set, shapes and dtypes of ``_initial_state()``'s ``state``, checked."""
    if "time_au" in state or any(k.startswith(("param.", "rng.")) for k in state):
        raise RuntimeError(f"{label}: state keys 'time_au', 'param.*' and 'rng.*' are reserved")
    schema = {}
    for key, value in state.items():
        if not isinstance(value, np.ndarray) or value.ndim < 1 or value.shape[0] != n:
            raise RuntimeError(
                f"{label}: _initial_state()[{key!r}] must be an ndarray with "
                f"leading dimension n = {n}"
            )
        schema[key] = (value.shape, value.dtype)
    return schema


def checked_arrays(
    label: str, schema: Schema, state: Mapping[str, Any], expected: set[str]
) -> tuple[State, float]:
    """(the model's arrays, copied, and the time) of a state given to ``set_state``:
    exactly the ``expected`` keys, the schema's shapes, finite values."""
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"{label}: state keys {sorted(state)} do not match the model's "
            f"{sorted(expected)} (missing: {', '.join(missing) or 'none'}; unexpected: "
            f"{', '.join(extra) or 'none'})"
        )
    new: State = {}
    for key, (shape, dtype) in schema.items():
        value = np.array(state[key], dtype=dtype, copy=True)
        if value.shape != shape:
            raise ValueError(f"{label}: state[{key!r}] has shape {value.shape}, expected {shape}")
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise ValueError(f"{label}: state[{key!r}] is not finite")
        new[key] = value
    time = np.asarray(state["time_au"], dtype=np.float64)
    if time.shape != () or not math.isfinite(float(time)):
        raise ValueError(
            f"{label}: state['time_au'] = {state['time_au']!r} is not allowed; "
            "expected a finite scalar"
        )
    return new, float(time)


def params_of_state(
    label: str,
    parameters: Mapping[str, Spec],
    params: Mapping[str, Any],
    n: int,
    state: Mapping[str, Any],
) -> dict[str, Any] | None:
    """The parameters ``state`` carries, each checked on its own (the checks across
    parameters are the caller's); None when they are ``params``. A value that differs
    from ``params`` is refused unless its parameter is mutable."""
    out = dict(params)
    changed = False
    for key, spec in parameters.items():
        where = f"state[{PARAM_PREFIX + key!r}]"
        array = state[PARAM_PREFIX + key]
        try:
            value = (
                None
                if _is_unset(spec, array)
                else normalise(label, key, spec, _from_array(spec, array, n), n, None)[0]
            )
        except (ParameterError, TypeError) as exc:
            raise ValueError(f"{label}: {where} is not allowed: {exc}") from None
        if _same(value, params[key]):
            continue
        if not spec.mutable:
            raise ValueError(
                f"{label}: {where} = {_brief(value)} differs from this model's {key} = "
                f"{_brief(params[key])}, which cannot change: make the model with "
                f"{key} = {_brief(value)} to continue this state"
            )
        out[key] = value
        changed = True
    return out if changed else None


# -------------------------------------------------------------------- values


def check_n(label: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"{label}: n = {n!r} is not allowed; expected an int >= 1")
    return int(n)


def all_finite(a: np.ndarray) -> bool:
    """Whether every value of an (n, 3) array is finite, without an (n, 3) temporary: a
    finite sum proves it (any NaN or inf makes the sum NaN or inf); only a sum that is not
    finite (one bad value, or an overflow) is checked value by value. Rows broadcast from
    one (stride 0) are that one row."""
    if a.ndim == 2 and a.strides[0] == 0:
        return bool(np.isfinite(a[0]).all())
    with np.errstate(over="ignore", invalid="ignore"):
        total = a.sum()
    return bool(np.isfinite(total)) or bool(np.isfinite(a).all())


def first_bad_row(a: np.ndarray) -> int:
    return int(np.flatnonzero(~np.isfinite(a).all(axis=1))[0])


def _is_list(value: Any) -> bool:
    return isinstance(value, list | tuple | np.ndarray) and np.ndim(value) > 0


def is_per_molecule(spec: Spec, value: Any) -> bool:
    """Whether a canonical value lists one entry per molecule (rather than one for all)."""
    if not _is_list(value):
        return False
    return spec.kind != "vector" or _is_list(next(iter(value)))


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool | np.bool_):
        return True
    if isinstance(value, np.ndarray):
        return value.dtype == np.bool_
    return isinstance(value, list | tuple) and any(_has_bool(v) for v in value)


def _item(value: Any, index: int | None) -> Any:
    if index is None or not _is_list(value):
        return value
    return (value.tolist() if isinstance(value, np.ndarray) else list(value))[index]


def _show(value: Any, index: int | None) -> str:
    """``value`` as an error shows it: the offending molecule's entry of a list."""
    if index is None or not _is_list(value):
        return repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return f"{_item(value, index)!r} (molecule index {index})"


def _brief(value: Any) -> str:
    return repr(value.tolist() if isinstance(value, np.ndarray) else value)


def _mask(spec: Spec, values: np.ndarray) -> np.ndarray:
    """``spec.valid`` of ``values`` (one row per molecule) as one bool per row."""
    if spec.valid is None:
        return np.ones(len(values), dtype=bool)
    ok = np.asarray(spec.valid(values), dtype=bool)
    if ok.ndim == 2:
        ok = ok.all(axis=1)
    return np.broadcast_to(ok, (len(values),))


def _refused(
    label: str,
    key: str,
    spec: Spec,
    value: Any,
    index: int | None,
    problem: str = "is not allowed",
) -> ParameterError:
    return ParameterError(
        f"{label}: parameter {key} = {_show(value, index)} {problem}; expected {spec.allowed}",
        key,
        index,
    )


def normalise(
    label: str, key: str, spec: Spec, value: Any, n: int, base_dir: str | os.PathLike | None
) -> tuple[Any, Any]:
    """(the value as stored in ``params``, its canonical JSON-able form) of ``value`` for
    the parameter ``spec`` named ``key`` by the caller, for ``n`` molecules."""
    if value is None and spec.default is None:
        return None, None  # a shared text parameter left unset
    if spec.kind in (float, int):
        return _numbers(label, key, spec, value, n)
    if spec.kind == "vector":
        return _vectors(label, key, spec, value, n)
    if spec.shared and _is_list(value):
        raise ParameterError(
            f"{label}: parameter {key} = {_show(value, None)} is a list, but {key} is shared "
            f"by all molecules: give one value ({spec.allowed})",
            key,
        )
    single = not _is_list(value)
    if not single and len(value) != n:
        raise ParameterError(
            f"{label}: parameter {key} = {_show(value, None)} has {len(value)} entries; "
            f"expected one value or a list of n = {n}",
            key,
        )
    items = [value] if single else list(value)
    if spec.kind is bool:
        out: list[Any] = []
        for i, item in enumerate(items):
            flag = _to_bool(item)
            if flag is None:
                raise _refused(label, key, spec, value, None if single else i, "is not a flag")
            out.append(flag)
        values = np.array(out, dtype=bool)
    else:
        out = [
            _text(label, key, spec, value, None if single else i, item, base_dir)
            for i, item in enumerate(items)
        ]
        values = np.array(out, dtype=str)
    ok = _mask(spec, values)
    if not ok.all():
        raise _refused(label, key, spec, value, None if single else int(np.flatnonzero(~ok)[0]))
    canonical = out[0] if single else list(out)
    if spec.shared:
        return out[0], canonical
    if spec.kind is bool:
        stored = np.full(n, out[0]) if single else values
        stored.setflags(write=False)
        return stored, canonical
    return (tuple(out) * n if single else tuple(out)), canonical


def _numbers(label: str, key: str, spec: Spec, value: Any, n: int) -> tuple[Any, Any]:
    if _has_bool(value):
        raise _refused(label, key, spec, value, None, "is a flag, not a number")
    try:
        raw = np.array(value, dtype=np.float64)  # a copy: the caller's array stays writable
    except (TypeError, ValueError):
        raise ParameterError(
            f"{label}: parameter {key} = {value!r} is not a number; expected {spec.allowed}", key
        ) from None
    if raw.ndim == 0:
        single = True
        raw = np.full(1 if spec.shared else n, float(raw))
    elif spec.shared:
        raise ParameterError(
            f"{label}: parameter {key} = {_show(value, None)} is a list, but {key} is shared "
            f"by all molecules: give one value ({spec.allowed})",
            key,
        )
    elif raw.shape != (n,):
        raise ParameterError(
            f"{label}: parameter {key} = {value!r} has shape {raw.shape}; expected a "
            f"scalar or a sequence of length n = {n}",
            key,
        )
    else:
        single = False
    if spec.kind is int:
        integral = np.isfinite(raw) & (raw == np.round(raw))
        if not integral.all():
            bad = int(np.flatnonzero(~integral)[0])
            raise _refused(label, key, spec, value, None if single else bad, "is not an integer")
        arr: np.ndarray = raw.astype(np.int64)
    else:
        arr = raw
    ok = _mask(spec, arr) & np.isfinite(raw)
    if not ok.all():
        raise _refused(label, key, spec, value, None if single else int(np.flatnonzero(~ok)[0]))
    canonical = arr[0].item() if single else arr.tolist()
    if spec.shared:
        return canonical, canonical
    arr.setflags(write=False)
    return arr, canonical


def _vectors(label: str, key: str, spec: Spec, value: Any, n: int) -> tuple[Any, Any]:
    if _has_bool(value):
        raise _refused(label, key, spec, value, None, "holds a flag, not numbers")
    try:
        raw = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _refused(label, key, spec, value, None, "is not numbers") from None
    single = raw.shape == (3,)
    if not single and (spec.shared or raw.shape != (n, 3)):
        more = "" if spec.shared else f", or n = {n} of them (one per molecule)"
        raise ParameterError(
            f"{label}: parameter {key} = {_show(value, None)} has shape "
            f"{raw.shape}; expected a 3-vector [x, y, z]{more}",
            key,
        )
    rows = raw.reshape(-1, 3)
    ok = _mask(spec, rows) & np.isfinite(rows).all(axis=1)
    if not ok.all():
        raise _refused(label, key, spec, value, None if single else int(np.flatnonzero(~ok)[0]))
    stored = raw if spec.shared or not single else np.tile(raw, (n, 1))
    stored.setflags(write=False)
    return stored, raw.tolist()


def _to_bool(item: Any) -> bool | None:
    if isinstance(item, bool | np.bool_):
        return bool(item)
    if isinstance(item, int | np.integer) and item in (0, 1):
        return bool(item)
    if isinstance(item, str) and item.strip().lower() in ("true", "false"):
        return item.strip().lower() == "true"
    return None


def _text(
    label: str,
    key: str,
    spec: Spec,
    value: Any,
    index: int | None,
    item: Any,
    base_dir: str | os.PathLike | None,
) -> str:
    """One str or path entry, checked (choices; a path resolved and existing)."""
    if isinstance(item, str):
        text = str(item)
    elif isinstance(item, int | np.integer) and not isinstance(item, bool | np.bool_):
        text = str(int(item))  # unambiguous: 1 can only have been "1"
    elif isinstance(item, float | np.floating):
        raise _refused(
            label,
            key,
            spec,
            value,
            index,
            "is a number, not text (1e-3 and 0.001 read alike: give text that "
            "looks like a number as a quoted string)",
        )
    else:
        raise _refused(label, key, spec, value, index, "is not text")
    if spec.choices is not None:
        spelling = {c.lower(): c for c in spec.choices}.get(text.lower())
        if spelling is None:
            raise _refused(label, key, spec, value, index)
        return spelling
    if spec.kind != "path":
        return text
    if not text:
        raise _refused(label, key, spec, value, index, "is empty")
    base = os.fspath(base_dir) if base_dir is not None else os.getcwd()
    resolved = os.path.abspath(os.path.join(base, os.path.expanduser(text)))
    if not os.path.exists(resolved):
        where = "" if resolved == text else f" (resolved against {base} to {resolved})"
        raise _refused(label, key, spec, value, index, f"does not exist{where}")
    return resolved


def spread(label: str, key: str, spec: Spec, value: Any, count: int) -> list[Any]:
    """``value`` for ``count`` listed molecules: one value each, or one for all."""
    one = np.ndim(value) <= 1 if spec.kind == "vector" else not _is_list(value)
    if one:
        return [value] * count
    items = value.tolist() if isinstance(value, np.ndarray) else list(value)
    if len(items) != count:
        raise ParameterError(
            f"{label}: parameter {key} = {_show(value, None)} has "
            f"{len(items)} entries for {count} molecules; expected one "
            "value or one per molecule listed",
            key,
        )
    return items


def current_values(spec: Spec, stored: Any) -> list[Any]:
    """A per-molecule parameter's stored values as a list to edit."""
    return stored.tolist() if isinstance(stored, np.ndarray) else list(stored)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(np.array_equal(a, b))
        )
    return type(a) is type(b) and a == b


def to_array(spec: Spec, stored: Any) -> np.ndarray:
    """A stored parameter value as get_state's array (text as numpy unicode)."""
    if spec.kind in TEXT_KINDS:
        if stored is None:
            return np.zeros(0, dtype="<U1")  # a shared text parameter left unset
        return np.array(stored if spec.shared else list(stored), dtype=str)
    if spec.shared and spec.kind in (float, int, bool):
        return np.array(stored, dtype={float: np.float64, int: np.int64, bool: np.bool_}[spec.kind])
    return np.array(stored)


def _is_unset(spec: Spec, array: Any) -> bool:
    return spec.shared and spec.kind in TEXT_KINDS and np.shape(array) == (0,)


def _from_array(spec: Spec, array: Any, n: int) -> Any:
    """get_state's array of a parameter as a value for :func:`normalise`."""
    arr = np.asarray(array)
    if spec.kind in TEXT_KINDS and arr.dtype.kind != "U":
        raise TypeError(f"expected text (a numpy unicode array), got dtype {arr.dtype}")
    if spec.kind not in TEXT_KINDS and arr.dtype.kind not in "biuf":
        raise TypeError(f"expected numbers, got dtype {arr.dtype}")
    expected = (
        (3,)
        if spec.kind == "vector" and spec.shared
        else ()
        if spec.shared
        else (n, 3)
        if spec.kind == "vector"
        else (n,)
    )
    if arr.shape != expected:
        raise TypeError(f"has shape {arr.shape}, expected {expected}")
    return arr.tolist()


def jsonable(obj: Any) -> Any:
    """JSON for what a bit generator's state holds besides ints (MT19937's key array)."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.integer):
        return int(obj)
    raise TypeError(f"{type(obj).__name__} in a generator state")


def _from_json(obj: dict) -> Any:
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    return obj


def checked_generator_state(label: str, rng: np.random.Generator, array: Any) -> dict:
    """``state['rng.state']`` decoded and tried on a spare generator of the same kind."""
    try:
        decoded = json.loads(str(np.asarray(array)[()]), object_hook=_from_json)
        type(rng.bit_generator)().state = decoded
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(
            f"{label}: state['rng.state'] is not a state of this model's "
            f"{type(rng.bit_generator).__name__} generator: {exc}"
        ) from None
    return decoded


def to_atomic_units(value: Any, factor: float) -> Any:
    """A number, or a (nested) list of numbers, times ``factor``; the same structure back
    (JSON-able). Anything else is refused (the caller names the key)."""
    if isinstance(value, bool | str):
        raise ValueError("expected a number or a list of numbers")
    array = np.asarray(value, dtype=np.float64) * factor
    return array.tolist() if array.ndim else float(array)
