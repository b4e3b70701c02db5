"""The driver side of one hub connection, as a sans-I/O state machine.

One machine serves a single molecule (i-PI frames: STATUS, INIT, FIELDDATA, GETSOURCE)
and an ensemble of M molecules (batched frames: MXHHELLO, MXHWELCOME, MXHFIELDS); the
blocking driver (:mod:`maxwellhub_drivers.client`) and the relay's upstream connection
(:mod:`maxwellhub.relay`) are thin I/O layers around it. Bytes from the hub go in
(:meth:`Session.receive_data`, or the zero-copy pair :meth:`Session.read_buffer` /
:meth:`Session.received`); each decoded message is dispatched by a table keyed by
``(state, message type)`` (:data:`SINGLE` or :data:`BATCHED`), where a missing entry is a
:class:`~maxwellhub.errors.ProtocolError` naming both; every method returns the buffers to
send, in order.

What the machine needs from outside is the :class:`SessionModel` interface: the proof of
an MXHAUTH challenge, the MXHCLAIM of a reconnecting driver, initialising, staging and
committing molecules. An answer may be deferred (the relay's local step is asynchronous):
``initialize`` or ``commit`` then return :data:`PENDING`, and the I/O layer later calls
:meth:`Session.initialized` or :meth:`Session.answered` for the bytes.

This module must never import :mod:`asyncio` or a socket module, never sleep and never
unpickle.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from ..errors import ProtocolError
from . import params as params_frames
from . import wire
from .init import parse_ensemble_init, parse_single_init

__all__ = [
    "BATCHED",
    "BYE",
    "PENDING",
    "SINGLE",
    "Binding",
    "ExtrasJSON",
    "Session",
    "SessionModel",
    "SessionState",
]

log = logging.getLogger("maxwellhub.driver")

Parts = list[Any]  # buffers (bytes, memoryview, arrays) to write in order


class SessionState(enum.Enum):
    """What the driver side waits for."""

    OPENING = "opening"  # nothing accepted yet (an ensemble: MXHHELLO sent)
    PROVING = "proving"  # MXHPROOF sent; the hub has not accepted it yet
    UNBOUND = "unbound"  # accepted (STATUS answered NEEDINIT, or MXHWELCOME); before INIT
    INITIALISING = "initialising"  # INIT taken; the model's answer is deferred
    READY = "ready"  # initialised, no field staged
    STAGED = "staged"  # a field staged, waiting for GETSOURCE
    STEPPING = "stepping"  # GETSOURCE taken; the model's answer is deferred
    ENDED = "ended"  # STOP or EXIT received; nothing more is read


_S = SessionState
_READY_STATE = SessionState.READY  # module constants: the fast path reads them per step
_ENDED = SessionState.ENDED

EXPECTING = {
    _S.OPENING: "before INIT (nothing accepted yet)",
    _S.PROVING: "after MXHPROOF, before the hub accepted it",
    _S.UNBOUND: "before INIT",
    _S.INITIALISING: "while the molecules initialise",
    _S.READY: "with no field staged",
    _S.STAGED: "with a field staged",
    _S.STEPPING: "during a step, before its source was sent",
    _S.ENDED: "after STOP or EXIT",
}

LABELS: dict[type, str] = {
    wire.Status: "STATUS",
    wire.Init: "INIT",
    wire.PosData: "POSDATA (field)",
    wire.GetForce: "GETFORCE (source request)",
    wire.Stop: "STOP",
    wire.Exit: "EXIT",
    wire.Welcome: "MXHWELCOME",
    wire.FieldsBatch: "MXHFIELDS",
    wire.AuthChallenge: "MXHAUTH",
    wire.Params: "MXHPARAMS",
    wire.ShmLane: "MXHSHMLANE",
}


class _Pending:
    """The type of :data:`PENDING`."""

    def __repr__(self) -> str:
        return "PENDING"


#: Returned by :meth:`SessionModel.initialize` or :meth:`SessionModel.commit` whose answer
#: comes later (through :meth:`Session.initialized` / :meth:`Session.answered`).
PENDING: Final = _Pending()

BYE = wire.encode_header(wire.BYE)
_NEEDINIT = wire.encode_header(wire.NEEDINIT)
_STATUS_REPLY = {
    _S.UNBOUND: _NEEDINIT,
    _S.OPENING: _NEEDINIT,
    _S.PROVING: _NEEDINIT,
    _S.READY: wire.encode_header(wire.READY),
    _S.STAGED: wire.encode_header(wire.HAVEDATA),
    _S.STEPPING: wire.encode_header(wire.HAVEDATA),
}


@dataclass(frozen=True, slots=True)
class Binding:
    """What an INIT bound this connection to: the molecule ids, the time step, each
    molecule's INIT object, the hub's resume offer (None: it made none) and the whole INIT
    JSON object (where the hub offers extensions)."""

    molecule_ids: list[int]
    dt_au: float
    payloads: list[dict[str, Any]]
    resume: dict[str, Any] | None
    data: dict[str, Any]


class SessionModel(Protocol):
    """What the machine asks of the driver's side (a model process, or the relay's local
    hub). Exceptions raised here propagate out of the machine's methods unchanged.

    1. ``answer_challenge(nonce)``: the 32-byte MXHPROOF for the hub's MXHAUTH nonce;
       raise :class:`ProtocolError` saying how to give the secret when there is none.
    2. ``claim()``: MXHCLAIM bytes (or b"") sent before the first NEEDINIT.
    3. ``initialize(binding)``: set the molecules up; return the step to announce with
       MXHRESUME, None, or :data:`PENDING`.
    4. ``stage(fields, flags)``: the (M, 3) fields of the next step (staging again before
       GETSOURCE replaces them), with the MXHFIELDS flags (WANT_EXTRAS for i-PI frames).
    5. ``commit()``: the staged step's ``(sources, extras)``: a single molecule's
       3-sequence and extras dict of floats; an ensemble's (M, 3) array and dict of (M,)
       arrays, or None; or :data:`PENDING`.
    6. ``unstaged()``: a single molecule's extras when GETSOURCE comes with no field
       staged (answered with a zero source).
    7. ``answered()``: a committed step's answer was sent (the I/O layer says so through
       :meth:`Session.sent`): checkpoints never run ahead of the hub.
    8. ``apply_params(event, molecule_ids)``: apply an MXHPARAMS (see
       :mod:`maxwellhub.protocol.params`) to the bound molecules; return the MXHPARAMSOK
       bytes, or :data:`PENDING` (then :meth:`Session.params_answered` with them).

    The shared-memory lane is not the model's: a session that offers it is given the
    lane's handler of MXHSHMLANE (``Session(lane_offer=...)``).
    """

    def answer_challenge(self, nonce: bytes) -> bytes: ...
    def claim(self) -> bytes: ...
    def initialize(self, binding: Binding) -> int | _Pending | None: ...
    def stage(self, fields: npt.NDArray[np.float64], flags: int) -> None: ...
    def commit(self) -> tuple[Any, Any] | _Pending: ...
    def unstaged(self) -> dict[str, float]: ...
    def answered(self) -> None: ...
    def apply_params(self, event: wire.Params, molecule_ids: list[int]) -> bytes | _Pending: ...


_F3 = struct.Struct("<3d")
_FIELD_AT = len(wire.FIELD_STEP_HEAD)  # 160: the field's offset in the fused block
_GETFORCE_AT = _FIELD_AT + _F3.size  # 184
_GETFORCE_HEADER = wire.encode_header(wire.GETFORCE)
_STEP_SIZE = wire.FIELD_STEP_SIZE  # 196
_REPLY = struct.Struct("<12sdi3d9di")  # SOURCEREADY up to its extras length
_SOURCE_HEAD = wire.encode_header(wire.SOURCEREADY)
_SOURCE_AT = 24  # header, energy, nat
_EXTRAS_LEN_AT = _REPLY.size - 4
_I32 = struct.Struct("<i")
_ZEROS9 = (0.0,) * 9


class Session:
    """The driver side of one connection (see the module docstring).

    ``model``: the :class:`SessionModel`. ``molecules``: M. ``batched``: speak batched
    frames (MXHHELLO) even for M = 1 (the relay does); default: M > 1. ``limits``: the
    decoder's caps. ``host``: how errors name this side ("this driver", "this relay").
    ``hello_flags``: the MXHHELLO flags word, passed through as given; when it offers the
    shared-memory lane (:data:`~maxwellhub.protocol.wire.HELLO_SHM_LANE`), ``lane_offer`` takes
    the hub's MXHSHMLANE (maps the lane and answers it, the lane's own I/O). Without that
    offer MXHSHMLANE is a :class:`ProtocolError`, whatever the model.
    """

    def __init__(
        self,
        model: SessionModel,
        molecules: int = 1,
        *,
        batched: bool | None = None,
        limits: wire.Limits | None = None,
        host: str = "this driver",
        hello_flags: int = 0,
        lane_offer: Callable[[wire.ShmLane], None] | None = None,
    ) -> None:
        if bool(hello_flags & wire.HELLO_SHM_LANE) != (lane_offer is not None):
            raise ValueError(
                "a session offering the shared-memory lane (hello_flags bit 0) needs its "
                "lane_offer handler, and only such a session takes one"
            )
        self.model = model
        self.lane_offer = lane_offer
        self.molecules = molecules
        self.batched = molecules > 1 if batched is None else batched
        self.host = host
        self.hello_flags = hello_flags
        self.decoder = wire.Decoder("driver", limits)
        self.table = BATCHED if self.batched else SINGLE
        self.state = _S.OPENING
        self.welcomed = False
        self.binding: Binding | None = None
        self.end: type | None = None  # wire.Stop or wire.Exit once ended
        self.steps = 0  # committed steps answered
        self.flags = wire.WANT_EXTRAS  # of the last MXHFIELDS
        self._key: Any = None  # what a repeated INIT must equal
        self._deferred_status = 0  # STATUS received while initialising
        self._unsent = 0  # committed answers not yet reported sent
        self._extras_json = ExtrasJSON()
        self._out: Parts = []
        # The fused FIELDDATA+GETSOURCE reply, packed in place every step.
        self._reply = bytearray(_REPLY.pack(_SOURCE_HEAD, 0.0, 1, 0.0, 0.0, 0.0, *_ZEROS9, 0))
        self._was_empty = True

    # -- output
    def _emit(self, *parts: Any) -> None:
        self._out.extend(parts)

    def data_to_send(self) -> Parts:
        """The buffers queued so far, in order; the queue is emptied."""
        out = self._out
        if out:
            self._out = []
        return out

    def start(self) -> Parts:
        """The connection is open: MXHHELLO when batched, else nothing (the hub speaks
        first)."""
        if self.batched:
            self._emit(wire.encode_hello(self.molecules, flags=self.hello_flags))
        return self.data_to_send()

    def sent(self) -> None:
        """The I/O layer sent what the machine returned: report committed answers."""
        while self._unsent:
            self._unsent -= 1
            self.model.answered()

    # -- input
    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held."""
        return self.decoder.buffered

    def read_buffer(self, size: int = 1 << 16) -> memoryview:
        """Room for at least ``size`` bytes to receive into (zero copy); then
        :meth:`received` with the count."""
        self._was_empty = not self.decoder.buffered
        return self.decoder.read_buffer(size)

    def received(self, nbytes: int) -> Parts:
        """``nbytes`` were written into :meth:`read_buffer`'s room; the bytes to send."""
        if self.state is _ENDED:
            return []  # the session is over: nothing more is read
        if (
            nbytes == _STEP_SIZE
            and self.state is _READY_STATE
            and self._was_empty
            and not self.batched
        ):
            out = self._fast_step(self.decoder.read_buffer(0))
            if out is not None:
                return out
        self._handle(self.decoder.received(nbytes))
        return self.data_to_send()

    def receive_data(self, data: Any) -> Parts:
        """Bytes from the hub (any split); the bytes to send in reply."""
        if self.state is _ENDED:
            return []  # the session is over: nothing more is read
        if (
            len(data) == _STEP_SIZE
            and self.state is _READY_STATE
            and not self.buffered
            and not self.batched
        ):
            out = self._fast_step(data)
            if out is not None:
                return out
        self._handle(self.decoder.feed(data))
        return self.data_to_send()

    def _handle(self, events: list[wire.Event]) -> None:
        for event in events:
            if self.state is _ENDED:
                return  # bytes after STOP or EXIT are not read
            self.dispatch(event)

    def dispatch(self, event: wire.Event) -> None:
        """Run the table's handler for (state, type of ``event``); a missing entry is a
        :class:`ProtocolError` naming the message and the state."""
        handler = self.table.get((self.state, type(event)))
        if handler is None:
            name = LABELS.get(type(event), type(event).__name__)
            raise ProtocolError(
                f"unexpected {name} {EXPECTING[self.state]} (state {self.state.name})"
            )
        handler(self, event)

    def _fast_step(self, buf: Any) -> Parts | None:
        """A fused FIELDDATA (identity cells, nat 1) + GETSOURCE block of 196 bytes, in
        READY: stage, commit and answer without building events. None when ``buf`` is not
        exactly that block (the decoder then reads it)."""
        if buf[:_FIELD_AT] != wire.FIELD_STEP_HEAD or buf[_GETFORCE_AT:_STEP_SIZE] != (
            _GETFORCE_HEADER
        ):
            return None
        ex, ey, ez = _F3.unpack_from(buf, _FIELD_AT)
        if not (math.isfinite(ex) and math.isfinite(ey) and math.isfinite(ez)):
            return None  # the decoder names it
        model = self.model
        model.stage(np.array(((ex, ey, ez),)), wire.WANT_EXTRAS)
        result = model.commit()
        self.steps += 1
        if result is PENDING:
            self.state = _S.STEPPING
            return []
        self._unsent += 1
        return self._source_ready(result)

    def _source_ready(self, result: Any) -> Parts:
        """SOURCEREADY in the preallocated reply (its constant fields written once): the
        source and the extras length packed in place, the extras text after it."""
        (sx, sy, sz), extras = result
        text = self._extras_json(extras)
        reply = self._reply
        _F3.pack_into(reply, _SOURCE_AT, sx, sy, sz)
        _I32.pack_into(reply, _EXTRAS_LEN_AT, len(text))
        return [reply + text]  # one buffer: one plain send, no gather list to build

    # -- deferred answers
    def initialized(self, step: int | None) -> Parts:
        """A deferred :meth:`SessionModel.initialize` finished: MXHRESUME when ``step``
        is given, then READY for every STATUS that came meanwhile."""
        if self.state is _ENDED:
            return []
        if self.state is not _S.INITIALISING:
            raise RuntimeError(f"initialized() in state {self.state.name}")
        self._ready(step)
        return self.data_to_send()

    def answered(self, sources: Any, extras: Any, *, counted: bool = True) -> Parts:
        """A deferred :meth:`SessionModel.commit` finished with ``sources`` and ``extras``
        (as ``commit`` returns them); ``counted``: False for a step replayed to catch up,
        which does not count as one of the session's steps."""
        if self.state is _ENDED:
            return []
        if self.state is not _S.STEPPING:
            raise RuntimeError(f"answered() in state {self.state.name}")
        self.state = _S.READY
        if not counted:
            self.steps -= 1
        self._unsent += 1
        self._emit(*self._encode(sources, extras))
        return self.data_to_send()

    def params_answered(self, ack: bytes) -> Parts:
        """A deferred :meth:`SessionModel.apply_params` finished with MXHPARAMSOK ``ack``."""
        return [] if self.state is _ENDED else [ack]

    def lane_step(self, fields: npt.NDArray[np.float64], flags: int) -> tuple[Any, Any]:
        """A step that came by the shared-memory lane instead of MXHFIELDS + GETFORCE:
        staged and committed as those would be; the ``(sources, extras)`` are returned
        for the caller to answer by the lane (or, when they do not fit it, with
        :meth:`encode_answer` on the socket), then :meth:`sent`."""
        if self.state is not _S.READY or not self.batched or self.binding is None:
            raise ProtocolError(
                f"a shared-memory lane step {EXPECTING[self.state]} (state {self.state.name})"
            )
        self.flags = flags
        self.model.stage(fields, flags)
        result = self.model.commit()
        if isinstance(result, _Pending):
            raise RuntimeError("a shared-memory lane step cannot be answered later")
        self.steps += 1
        self._unsent += 1
        return result

    def encode_answer(self, sources: Any, extras: Any) -> Parts:
        """The bytes of a committed step's answer (MXHSOURCES or SOURCEREADY)."""
        return self._encode(sources, extras)

    def _encode(self, sources: Any, extras: Any) -> Parts:
        if self.batched:
            return wire.sources_batch_parts(sources, extras)
        return [bytes(self._source_ready((sources, extras))[0])]

    def _ready(self, step: int | None) -> None:
        self.state = _S.READY
        binding = self.binding
        if binding is None:  # _ready follows INIT, which sets it
            raise RuntimeError("ready before INIT")
        if step is not None:
            self._emit(wire.encode_resume(step, len(binding.molecule_ids)))
        if params_frames.accepts(binding.data):  # after MXHRESUME, before READY
            self._emit(params_frames.ACCEPT)
        self._emit(*[_STATUS_REPLY[_S.READY]] * self._deferred_status)
        self._deferred_status = 0

    # -- handlers: one per (state, message) entry of the tables
    def _on_auth(self, event: wire.AuthChallenge) -> None:
        self._emit(wire.encode_auth_proof(self.model.answer_challenge(event.nonce)))
        self.state = _S.PROVING

    def _on_status(self, _event: wire.Status) -> None:
        state = self.state
        if state is _S.INITIALISING:
            self._deferred_status += 1  # READY once the molecules are initialised
            return
        if state is _S.PROVING or state is _S.OPENING:
            self._emit(self.model.claim())
            if not self.batched:
                self.state = _S.UNBOUND  # the hub moved on to STATUS: accepted
        elif state is _S.UNBOUND:
            self._emit(self.model.claim())
        self._emit(_STATUS_REPLY[state])

    def _on_welcome(self, event: wire.Welcome) -> None:
        if event.molecules != self.molecules:
            raise ProtocolError(
                f"MXHWELCOME for {event.molecules} molecules; {self.host} hosts {self.molecules}"
            )
        self.welcomed = True
        self.decoder.batch = event.molecules
        self.state = _S.UNBOUND

    def _on_init_unwelcomed(self, _event: wire.Init) -> None:
        raise ProtocolError(
            "INIT before MXHWELCOME: the hub did not accept batched frames (ensembles and "
            "relays need a maxwellhub hub)"
        )

    def _on_init(self, event: wire.Init) -> None:
        if self.batched:
            init = parse_ensemble_init(event.payload, self.molecules, self.host)
            binding = Binding(init.molecule_ids, init.dt_au, init.payloads, init.resume, init.data)
            key: Any = (init.molecule_ids, init.dt_au, init.payloads)
        else:
            one = parse_single_init(event.ident, event.payload)
            binding = Binding([event.ident], one.dt_au, [one.data], one.resume, one.data)
            key = (event.ident, one.dt_au)
        if self._key is not None:
            # Stock i-PI hubs may re-send INIT; the same one changes nothing.
            if key == self._key:
                log.debug("INIT repeated for molecule(s) %s; ignored", binding.molecule_ids[:4])
                return
            if self.batched:
                raise ProtocolError("a second INIT with other molecule ids, time step or payloads")
            raise ProtocolError(
                f"INIT again with molecule id {key[0]} and dt_au {key[1]!r} after molecule "
                f"id {self._key[0]} and dt_au {self._key[1]!r}"
            )
        self._key, self.binding = key, binding
        step = self.model.initialize(binding)
        if step is PENDING:
            self.state = _S.INITIALISING
        else:
            self._ready(step)  # type: ignore[arg-type]

    def _on_posdata(self, event: wire.PosData) -> None:
        nat = event.positions.shape[0]
        if nat != 1:
            raise ProtocolError(
                f"POSDATA with nat = {nat}; the EM profile sends the field as exactly one position"
            )
        self.model.stage(event.positions, wire.WANT_EXTRAS)
        self.state = _S.STAGED

    def _on_fields(self, event: wire.FieldsBatch) -> None:
        self.flags = event.flags
        self.model.stage(event.fields, event.flags)
        self.state = _S.STAGED

    def _on_getforce(self, _event: wire.GetForce) -> None:
        result = self.model.commit()
        self.steps += 1
        if result is PENDING:
            self.state = _S.STEPPING
            return
        self.state = _S.READY
        self._unsent += 1
        self._emit(*self._encode(*result))  # type: ignore[misc]

    def _on_unstaged_getforce(self, _event: wire.GetForce) -> None:
        log.warning("GETFORCE without a field since the last one; answering a zero source")
        self._emit(*self._encode((0.0, 0.0, 0.0), self.model.unstaged()))

    def _on_fields_stepping(self, _event: wire.FieldsBatch) -> None:
        raise ProtocolError(f"MXHFIELDS during step {self.steps}, before its MXHSOURCES")

    def _on_getforce_stepping(self, _event: wire.GetForce) -> None:
        raise ProtocolError(f"GETFORCE again during step {self.steps}")

    def _on_getforce_unstaged_batch(self, _event: wire.GetForce) -> None:
        raise ProtocolError("GETFORCE without MXHFIELDS since the last step")

    def _on_params(self, event: wire.Params) -> None:
        if self.binding is None:  # the tables admit MXHPARAMS only once initialised
            raise ProtocolError("MXHPARAMS before INIT")
        ack = self.model.apply_params(event, self.binding.molecule_ids)
        if not isinstance(ack, _Pending):
            self._emit(ack)

    def _on_lane(self, event: wire.ShmLane) -> None:
        # the one refusal of an unoffered lane (drivers, ensembles and relays alike)
        if self.lane_offer is None:  # __init__ ties it to the HELLO flags' lane bit
            raise ProtocolError(f"MXHSHMLANE, but {self.host} offered no shared-memory lane")
        self.lane_offer(event)

    def _on_end(self, event: wire.Stop | wire.Exit) -> None:
        self.end = type(event)
        self.state = _S.ENDED


Handler = Callable[[Session, Any], None]
_LIVE = (_S.OPENING, _S.PROVING, _S.UNBOUND, _S.INITIALISING, _S.READY, _S.STAGED, _S.STEPPING)
_INITIALISED = (_S.READY, _S.STAGED, _S.STEPPING)


def _common() -> dict[tuple[SessionState, type], Handler]:
    table: dict[tuple[SessionState, type], Handler] = {
        (_S.OPENING, wire.AuthChallenge): Session._on_auth,
    }
    for state in _LIVE:
        table[state, wire.Stop] = Session._on_end
        table[state, wire.Exit] = Session._on_end
        table[state, wire.Status] = Session._on_status
    for state in (_S.UNBOUND, _S.INITIALISING, *_INITIALISED):
        table[state, wire.Init] = Session._on_init  # the first, or a repeat
    for state in (_S.READY, _S.STAGED):  # not during a deferred step: its answer is owed
        table[state, wire.Params] = Session._on_params
    return table


#: (state, message type) -> handler for a single molecule (i-PI frames).
SINGLE: dict[tuple[SessionState, type], Handler] = {
    **_common(),
    (_S.OPENING, wire.Init): Session._on_init,  # a hub that sends INIT first
    (_S.READY, wire.PosData): Session._on_posdata,
    (_S.STAGED, wire.PosData): Session._on_posdata,  # a step re-sent before GETSOURCE
    (_S.READY, wire.GetForce): Session._on_unstaged_getforce,
    (_S.STAGED, wire.GetForce): Session._on_getforce,
}

#: (state, message type) -> handler for an ensemble or a relay (batched frames).
BATCHED: dict[tuple[SessionState, type], Handler] = {
    **_common(),
    (_S.OPENING, wire.Welcome): Session._on_welcome,
    (_S.UNBOUND, wire.ShmLane): Session._on_lane,  # right after MXHWELCOME
    (_S.PROVING, wire.Welcome): Session._on_welcome,
    (_S.OPENING, wire.Init): Session._on_init_unwelcomed,
    (_S.PROVING, wire.Init): Session._on_init_unwelcomed,
    (_S.READY, wire.FieldsBatch): Session._on_fields,
    (_S.STAGED, wire.FieldsBatch): Session._on_fields,
    (_S.STEPPING, wire.FieldsBatch): Session._on_fields_stepping,
    (_S.READY, wire.GetForce): Session._on_getforce_unstaged_batch,
    (_S.STAGED, wire.GetForce): Session._on_getforce,
    (_S.STEPPING, wire.GetForce): Session._on_getforce_stepping,
}


class ExtrasJSON:
    """Extras as MaxwellLink's driver writes them: ``json.dumps(extras, ensure_ascii=False,
    separators=(",", ":"), sort_keys=True)`` in UTF-8, from a template made once per key
    set (a model reports the same keys every step). Finite floats print as json prints
    them (``float.__repr__``); anything else goes through json itself."""

    def __init__(self) -> None:
        self._keys: tuple[str, ...] = ()
        self._order: list[str] = []
        self._template = "{}"

    def __call__(self, extras: dict[str, float]) -> bytes:
        order = self._order
        if len(extras) == len(order):
            # the steady state: the same keys as last time, all finite floats
            try:
                values = tuple(map(extras.__getitem__, order))
                if math.isfinite(sum(values)):
                    return (self._template % tuple(map(float.__repr__, values))).encode("utf-8")
            except (KeyError, TypeError):  # other keys, or not all floats
                pass
        keys = tuple(extras)
        if keys != self._keys:
            self._keys, self._order = keys, sorted(keys)
            self._template = (
                "{"
                + ",".join(
                    json.dumps(key, ensure_ascii=False).replace("%", "%%") + ":%s"
                    for key in self._order
                )
                + "}"
            )
        values = tuple(extras[key] for key in self._order)
        try:
            if math.isfinite(sum(values)):
                return (self._template % tuple(map(float.__repr__, values))).encode("utf-8")
        except TypeError:  # not all floats
            pass
        return json.dumps(extras, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode(
            "utf-8"
        )
