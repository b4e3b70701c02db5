"""The INIT JSON of the EM profile, built by the hub and parsed by every driver party (the
single driver, the ensemble driver, a relay's upstream connection), here and nowhere else.

An INIT string is a UTF-8 JSON object (an empty string means ``{}``). The hub writes the
molecule's user payload (``dt_au`` and the model's keys), ``molecule_id``, its resume offer
(:data:`maxwellhub.protocol.wire.RESUME_KEY`) and, for an ensemble, ``molecule_id_range``
``[first, count]`` or ``molecule_ids``, plus ``payloads`` (one object per molecule) when the
molecules' payloads differ.

Parsing is strict, because the bytes come from a peer: molecule ids are integers (not
``true``) >= 0, ``dt_au`` is a finite number > 0, and every error is a
:class:`~maxwellhub.errors.ProtocolError` naming the key, the molecule and the INIT's size
in bytes. This module never converts units and never touches a socket.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ProtocolError
from .frames import PARAMS_KEY, RESUME_KEY, RESUME_VERSION

__all__ = [
    "ENSEMBLE_KEYS",
    "EnsembleInit",
    "SingleInit",
    "build_init",
    "parse_ensemble_init",
    "parse_single_init",
]

#: Keys an ensemble INIT carries about the ensemble itself, not about one molecule.
ENSEMBLE_KEYS = (
    "molecule_id_range",
    "molecule_ids",
    "payloads",
    "molecule_id",
    RESUME_KEY,
    PARAMS_KEY,
)


@dataclass(frozen=True)
class SingleInit:
    """A parsed INIT of a single-molecule connection."""

    molecule_id: int
    dt_au: float
    data: dict[str, Any]  # the whole JSON object, the user's keys included
    resume: dict[str, Any] | None  # the hub's resume offer, checked, or None


@dataclass(frozen=True)
class EnsembleInit:
    """A parsed INIT of an ensemble connection (one frame for many molecules)."""

    molecule_ids: list[int]
    dt_au: float  # the ensemble's time step (top-level dt_au, else the first molecule's)
    payloads: list[dict[str, Any]]  # per molecule, without ENSEMBLE_KEYS
    data: dict[str, Any]
    resume: dict[str, Any] | None


# ----------------------------------------------------------------------------- building


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"INIT payload value {obj!r} of type {type(obj).__name__} is not JSON")


def build_init(
    ids: Sequence[int],
    payloads: Sequence[Mapping[str, Any] | None],
    done: int,
    replayable: int,
    *,
    ensemble: bool,
    params: Mapping[str, Any] | None = None,
) -> bytes:
    """The INIT JSON (UTF-8 bytes) the hub sends a connection hosting molecules ``ids``
    (their user ``payloads``, None meaning ``{}``), offering to resume after ``done``
    completed steps of which the last ``replayable`` can be replayed, and the parameter
    frames when ``params`` (see :func:`maxwellhub.protocol.params.offer`) is given."""
    first = ids[0]
    payload = dict(payloads[0] or {})
    if ensemble:
        # Compact for large ensembles: a range when the ids are consecutive (as binding
        # makes them), per-molecule payloads only when they differ.
        ids = list(ids)
        if ids == list(range(ids[0], ids[0] + len(ids))):
            payload["molecule_id_range"] = [ids[0], len(ids)]
        else:
            payload["molecule_ids"] = ids
        each = [p or {} for p in payloads]
        if any(p != each[0] for p in each):
            payload["payloads"] = each
    payload[RESUME_KEY] = {"version": RESUME_VERSION, "step": done, "history": replayable}
    if params is not None:
        payload[PARAMS_KEY] = dict(params)
    return json.dumps({**payload, "molecule_id": first}, default=_json_default).encode()


# ----------------------------------------------------------------------------- parsing


def _load(payload: bytes) -> dict[str, Any]:
    try:
        text = payload.decode("utf-8")
        data = json.loads(text) if text.strip() else {}
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(
            f"INIT ({len(payload)} bytes): the init string is not UTF-8 JSON ({exc}): "
            f"{payload[:80]!r}"
        ) from None
    if not isinstance(data, dict):
        raise ProtocolError(
            f"INIT ({len(payload)} bytes): the init string is JSON {type(data).__name__}, "
            "not an object"
        )
    return data


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _dt_au(data: Mapping[str, Any], where: str, size: int) -> float:
    if "dt_au" not in data:
        raise ProtocolError(
            f"INIT ({size} bytes): {where}dt_au = None: no 'dt_au' (the time step in atomic "
            f"units) in the init JSON; keys: {sorted(data)[:20]}"
        )
    dt = data["dt_au"]
    if isinstance(dt, bool) or not isinstance(dt, int | float) or not 0 < dt < math.inf:
        raise ProtocolError(
            f"INIT ({size} bytes): {where}dt_au = {dt!r} is not allowed; expected a finite "
            "number > 0"
        )
    return float(dt)


def _resume(data: Mapping[str, Any], size: int) -> dict[str, Any] | None:
    offer = data.get(RESUME_KEY)
    if offer is None:
        return None
    if not isinstance(offer, dict) or offer.get("version") != RESUME_VERSION:
        raise ProtocolError(
            f"INIT ({size} bytes): {RESUME_KEY} = {offer!r}: expected an object with "
            f"version {RESUME_VERSION}"
        )
    for key in ("step", "history"):
        value = offer.get(key)
        if not _is_id(value):
            raise ProtocolError(
                f"INIT ({size} bytes): {RESUME_KEY}.{key} = {value!r}: expected an integer >= 0"
            )
    return offer


def parse_single_init(ident: int, payload: bytes) -> SingleInit:
    """The INIT of one molecule: ``ident`` from the INIT header, ``payload`` its string."""
    size = len(payload)
    if not _is_id(ident):
        raise ProtocolError(f"INIT ({size} bytes): molecule id {ident!r}: expected an integer >= 0")
    data = _load(payload)
    return SingleInit(ident, _dt_au(data, "", size), data, _resume(data, size))


def _ensemble_ids(data: Mapping[str, Any], size: int) -> list[int]:
    if "molecule_id_range" in data:
        span = data["molecule_id_range"]
        if not isinstance(span, list) or len(span) != 2 or not all(_is_id(x) for x in span):
            raise ProtocolError(
                f"INIT ({size} bytes): molecule_id_range = {span!r}: expected "
                "[first, count], two integers >= 0"
            )
        return list(range(span[0], span[0] + span[1]))
    if "molecule_ids" in data:
        ids = data["molecule_ids"]
        if not isinstance(ids, list):
            raise ProtocolError(
                f"INIT ({size} bytes): molecule_ids is JSON {type(ids).__name__}, not a list"
            )
        for k, mid in enumerate(ids):
            if not _is_id(mid):
                raise ProtocolError(
                    f"INIT ({size} bytes): molecule_ids[{k}] = {mid!r}: expected an integer >= 0"
                )
        return list(ids)
    raise ProtocolError(
        f"INIT ({size} bytes) of an ensemble needs molecule_id_range or molecule_ids; "
        f"keys: {sorted(data)[:20]}"
    )


def parse_ensemble_init(payload: bytes, molecules: int, host: str = "this driver") -> EnsembleInit:
    """The INIT of an ensemble of ``molecules`` molecules (``host`` names the receiver in
    errors): the ids, each molecule's payload (the shared keys, or its entry of
    ``payloads``) with a valid ``dt_au``, and the resume offer."""
    size = len(payload)
    data = _load(payload)
    ids = _ensemble_ids(data, size)
    if len(ids) != molecules or len(set(ids)) != len(ids):
        raise ProtocolError(
            f"INIT names {len(ids)} molecule ids ({len(set(ids))} distinct); "
            f"{host} hosts {molecules} (an init string of {size} bytes)"
        )
    each = data.get("payloads")
    if each is None:
        shared = {k: v for k, v in data.items() if k not in ENSEMBLE_KEYS}
        payloads = [shared] * len(ids)
    elif (
        not isinstance(each, list)
        or len(each) != len(ids)
        or not all(isinstance(p, dict) for p in each)
    ):
        raise ProtocolError(
            f"INIT ({size} bytes): 'payloads' must be a list of {len(ids)} JSON objects"
        )
    else:
        payloads = [{k: v for k, v in p.items() if k not in ENSEMBLE_KEYS} for p in each]
    dts = [_dt_au(p, f"molecule {mid}: ", size) for mid, p in zip(ids, payloads, strict=True)]
    dt = _dt_au(data, "", size) if "dt_au" in data else dts[0] if dts else math.nan
    if not dts and "dt_au" not in data:
        _dt_au(data, "", size)  # an empty ensemble still needs its time step
    return EnsembleInit(ids, dt, payloads, data, _resume(data, size))
