"""Parameter changes and kicks over the wire: the JSON of MXHPARAMS / MXHPARAMSOK, built
and parsed here for every party (the hub, the single and ensemble drivers, a relay's
upstream connection), and the driver's handling of one frame as a plain function.

MXHPARAMS carries (after the step it applies at, see :mod:`maxwellhub.protocol.wire`) a UTF-8 JSON
object ``{"sequence": k, "ops": [...]}``; each op is one of

- ``{"op": "set_params", "molecules": [[first, count], ...], "changes": {name: value}}``
- ``{"op": "kick", "molecules": [[first, count], ...], "impulse": [x, y, z]}``

applied in order (molecules as ranges of consecutive ids). MXHPARAMSOK answers with the
same ``k`` and ``{"ok": true}``, or ``{"error": "...", "molecule": id, "parameter": name}``
for the first op refused; ops before it stay applied (the hub sends one op per frame).

The negotiation: a maxwellhub hub offers ``"mxh_params": {"version": 1, "max_bytes": b}``
in the INIT JSON (:func:`offer`); a driver that speaks it answers :data:`ACCEPT` (an
MXHPARAMSOK with sequence 0) after INIT and before READY. Peers that do not know the key
ignore it, so plain i-PI and MaxwellLink drivers never see a parameter frame.

This module never touches a socket, never pickles and never converts units.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ProtocolError, UsageError
from . import wire

__all__ = [
    "ACCEPT",
    "Kick",
    "SetParams",
    "accepts",
    "answer",
    "answer_async",
    "build_payload",
    "id_ranges",
    "model_applier",
    "offer",
    "parse_ack",
    "parse_payload",
]

#: The driver's answer to the hub's offer: MXHPARAMSOK, sequence 0, ``{"ok": true}``.
ACCEPT = wire.encode_params_ack(0, b'{"ok":true}')
_OK = b'{"ok":true}'


@dataclass(frozen=True)
class SetParams:
    """Change model parameters of ``molecules`` (ids) from the next step on."""

    molecules: tuple[int, ...]
    changes: dict[str, Any]

    def restricted(self, keep: Iterable[int]) -> SetParams:
        kept = set(keep)
        return SetParams(tuple(m for m in self.molecules if m in kept), self.changes)

    def to_json(self) -> dict[str, Any]:
        return {"op": "set_params", "molecules": id_ranges(self.molecules), "changes": self.changes}


@dataclass(frozen=True)
class Kick:
    """Kick ``molecules`` with an impulsive field ``impulse`` delta(t) (a.u.)."""

    molecules: tuple[int, ...]
    impulse: tuple[float, float, float]

    def restricted(self, keep: Iterable[int]) -> Kick:
        kept = set(keep)
        return Kick(tuple(m for m in self.molecules if m in kept), self.impulse)

    def to_json(self) -> dict[str, Any]:
        return {"op": "kick", "molecules": id_ranges(self.molecules), "impulse": list(self.impulse)}


Op = SetParams | Kick


def offer(limits: wire.Limits) -> dict[str, Any]:
    """The value of :data:`maxwellhub.protocol.wire.PARAMS_KEY` in the hub's INIT JSON."""
    return {"version": wire.PARAMS_VERSION, "max_bytes": limits.max_params_bytes}


def accepts(init_data: Mapping[str, Any]) -> bool:
    """Whether an INIT JSON object offers a version of the parameter frames this side
    speaks (a driver then sends :data:`ACCEPT`)."""
    got = init_data.get(wire.PARAMS_KEY)
    return isinstance(got, dict) and got.get("version") == wire.PARAMS_VERSION


def id_ranges(ids: Iterable[int]) -> list[list[int]]:
    """Ids (in order) as ``[first, count]`` runs of consecutive ids."""
    out: list[list[int]] = []
    for mid in ids:
        if out and out[-1][0] + out[-1][1] == mid:
            out[-1][1] += 1
        else:
            out.append([int(mid), 1])
    return out


def _json_value(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{value!r} of type {type(value).__name__} is not JSON")


def build_payload(sequence: int, ops: Sequence[Op], max_bytes: int) -> bytes:
    """The MXHPARAMS JSON; a :class:`UsageError` naming its size when it exceeds
    ``max_bytes`` or a value is not JSON."""
    body = {"sequence": int(sequence), "ops": [op.to_json() for op in ops]}
    try:
        data = json.dumps(body, default=_json_value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"parameter change {body['ops']!r} cannot travel as JSON: {exc}") from None
    raw = data.encode("utf-8")
    if len(raw) > max_bytes:
        raise UsageError(
            f"parameter change of {len(raw)} bytes of JSON exceeds the {max_bytes}-byte cap "
            "of one MXHPARAMS frame (max_params_bytes); split it into smaller changes"
        )
    return raw


def _load(payload: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(
            f"{what} ({len(payload)} bytes): not UTF-8 JSON ({exc}): {payload[:80]!r}"
        ) from None
    if not isinstance(data, dict):
        raise ProtocolError(
            f"{what} ({len(payload)} bytes): JSON {type(data).__name__}, not an object"
        )
    return data


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _molecules(raw: object, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise ProtocolError(f"{where}: molecules = {raw!r}: expected a list of [first, count]")
    ids: list[int] = []
    for span in raw:
        if not isinstance(span, list) or len(span) != 2 or not all(_is_count(x) for x in span):
            raise ProtocolError(
                f"{where}: molecules entry {span!r}: expected [first, count], integers >= 0"
            )
        ids.extend(range(span[0], span[0] + span[1]))
    return tuple(ids)


def _op(raw: object, where: str) -> Op:
    if not isinstance(raw, dict):
        raise ProtocolError(f"{where}: {raw!r} is not an object")
    kind = raw.get("op")
    ids = _molecules(raw.get("molecules"), where)
    if kind == "set_params":
        changes = raw.get("changes")
        if not isinstance(changes, dict) or not changes:
            raise ProtocolError(f"{where}: changes = {changes!r}: expected a non-empty object")
        return SetParams(ids, changes)
    if kind == "kick":
        imp = raw.get("impulse")
        if (
            not isinstance(imp, list)
            or len(imp) != 3
            or not all(
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                for x in imp
            )
        ):
            raise ProtocolError(f"{where}: impulse = {imp!r}: expected 3 finite numbers")
        return Kick(ids, (float(imp[0]), float(imp[1]), float(imp[2])))
    raise ProtocolError(f"{where}: op = {kind!r}: expected 'set_params' or 'kick'")


def parse_payload(payload: bytes) -> tuple[int, list[Op]]:
    """(sequence number, ops) of an MXHPARAMS JSON; :class:`ProtocolError` naming the
    frame's size and the culprit."""
    what = f"MXHPARAMS ({len(payload)} bytes)"
    data = _load(payload, what)
    seq, ops = data.get("sequence"), data.get("ops")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise ProtocolError(f"{what}: sequence = {seq!r}: expected an integer >= 1")
    if not isinstance(ops, list):
        raise ProtocolError(f"{what}: ops = {ops!r}: expected a list")
    return seq, [_op(op, f"{what} op {k}") for k, op in enumerate(ops)]


def parse_ack(event: wire.ParamsAck) -> str | None:
    """None for ``{"ok": true}``, else the driver's error text (naming molecule and
    parameter); :class:`ProtocolError` for anything else."""
    what = f"MXHPARAMSOK ({len(event.payload)} bytes)"
    data = _load(event.payload, what)
    if data.get("ok") is True:
        return None
    error = data.get("error")
    if not isinstance(error, str):
        raise ProtocolError(f"{what}: expected {{'ok': true}} or {{'error': text}}, got {data!r}")
    return error


def _error(sequence: int, text: str, molecule: int | None, parameter: str | None) -> bytes:
    body: dict[str, Any] = {"error": text}
    if molecule is not None:
        body["molecule"] = molecule
    if parameter is not None:
        body["parameter"] = parameter
    return wire.encode_params_ack(sequence, json.dumps(body).encode("utf-8"))


class Refused(Exception):
    """An op refused by the model: the text names the molecule id and the parameter."""

    def __init__(self, text: str, molecule: int | None = None, parameter: str | None = None):
        super().__init__(text)
        self.molecule = molecule
        self.parameter = parameter


def answer(
    event: wire.Params,
    molecule_ids: Sequence[int],
    apply: Callable[[Op, list[int] | None], None],
) -> bytes:
    """The driver's handling of one MXHPARAMS: parse it, apply each op in order with
    ``apply(op, rows)`` (``rows``: the model's rows 0..n-1 of the op's molecules among
    ``molecule_ids``, None when the op names all of them in order), and return the
    MXHPARAMSOK bytes to send. ``apply`` raises :class:`Refused` (or a ``ValueError``)
    to refuse; a molecule the driver does not host is a :class:`ProtocolError`."""
    seq, ops = parse_payload(event.payload)
    row_of = {int(m): r for r, m in enumerate(molecule_ids)}
    for op in ops:
        missing = [m for m in op.molecules if m not in row_of]
        if missing:
            raise ProtocolError(
                f"MXHPARAMS names molecule {missing[0]}, which this driver does not host"
            )
        rows = [row_of[m] for m in op.molecules]
        try:
            apply(op, None if rows == list(range(len(molecule_ids))) else rows)
        except Refused as exc:
            return _error(seq, str(exc), exc.molecule, exc.parameter)
        except ValueError as exc:
            return _error(seq, f"molecule(s) {id_ranges(op.molecules)}: {exc}", None, None)
    return wire.encode_params_ack(seq, _OK)


async def answer_async(event: wire.Params, apply: Callable[[Op], Awaitable[None]]) -> bytes:
    """:func:`answer` for a party that applies ops by awaiting (a relay: its local hub's
    drivers): ``await apply(op)`` per op, in order; an exception (a refusal, a local
    driver that does not speak the extension, a timeout) answers its text."""
    seq, ops = parse_payload(event.payload)
    for op in ops:
        try:
            await apply(op)
        except Exception as exc:
            return _error(seq, str(exc), None, None)
    return wire.encode_params_ack(seq, _OK)


def model_applier(
    model: Any, molecule_ids: Sequence[int]
) -> Callable[[Op, list[int] | None], None]:
    """``apply`` for :func:`answer` on a ``maxwellhub_drivers`` model hosting
    ``molecule_ids`` (rows in that order): its ``set_params`` / ``apply_kick``, with a
    ``ParameterError`` turned into :class:`Refused` naming the molecule id and key."""

    def apply(op: Op, rows: list[int] | None) -> None:
        try:
            if isinstance(op, SetParams):
                model.set_params(op.changes, rows)
            else:
                model.apply_kick(op.impulse, rows)
        except ValueError as exc:  # ParameterError is one
            key = getattr(exc, "key", None)
            row = getattr(exc, "molecule", None)
            if row is not None and 0 <= row < len(molecule_ids):
                mid: int | None = int(molecule_ids[row])
            elif len(op.molecules) == 1:
                mid = op.molecules[0]
            else:
                mid = None
            who = f"molecule {mid}" if mid is not None else f"molecules {id_ranges(op.molecules)}"
            what = f"parameter {key}" if key else "change"
            raise Refused(f"{who}: {what} refused: {exc}", mid, key) from None

    return apply
