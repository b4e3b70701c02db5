"""The hub side of one driver connection, as a sans-I/O state machine.

Bytes from the driver go in (:meth:`Connection.receive_data`, or the zero-copy pair
:meth:`Connection.read_buffer` / :meth:`Connection.received`); each decoded message is
dispatched by the table :data:`TRANSITIONS`, keyed by ``(state, message type)``: a missing
entry is a protocol error naming the state and the message. Every method returns the bytes
to send (a list of buffers, to write in order); the caller writes them.

What the machine needs from outside comes through two explicit interfaces:

- :class:`HubCallbacks`, the hub's policy (binding, the barrier, replay), implemented by
  :class:`maxwellhub.hub.Hub` with public methods;
- :class:`Link`, the I/O layer's few non-byte actions (abort, close, one deadline timer),
  implemented by the asyncio adapter in :mod:`maxwellhub.hub` and by fakes in the tests.

This module must never import :mod:`asyncio`, a socket module or :mod:`maxwellhub.hub`.
"""

from __future__ import annotations

import enum
import logging
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ..errors import ProtocolError, UsageError
from . import params as params_json
from . import wire
from .auth import Secret, new_nonce
from .init import build_init

__all__ = [
    "EXPECTING",
    "TRANSITIONS",
    "Connection",
    "HubCallbacks",
    "Link",
    "State",
]

log = logging.getLogger("maxwellhub.hub")

Parts = list[Any]  # buffers (bytes, memoryview, arrays) to write in order
_UNBOUND_READ = 4096  # read room for a connection hosting no molecule (it grows if needed)


class State(enum.Enum):
    """What the hub waits for on a connection."""

    AUTH = "auth"  # MXHAUTH sent (hub has a secret); expect MXHPROOF
    PROBE = "probe"  # STATUS sent before binding; expect READY or NEEDINIT
    UNBOUND = "unbound"  # answered; waiting for a molecule to bind to
    BOUND = "bound"  # bound, INIT not sent yet (no payload known)
    INIT = "init"  # INIT + STATUS sent; expect READY (MXHRESUME first, maybe)
    REPLAY = "replay"  # a restored driver is replayed the steps it missed
    READY = "ready"  # initialised and idle
    BUSY = "busy"  # field sent; expect FORCEREADY
    PARAMS = "params"  # MXHPARAMS sent between steps; expect MXHPARAMSOK
    # Stock i-PI clients (ASE's SocketClient, i-PI's driver): see the notes above
    # Connection._ready_before_init.
    LEARNING = "learning"  # first field sent (not the fast path); expect FORCEREADY
    LEARN = "learn"  # STATUS sent after its first FORCEREADY; expect READY or NEEDINIT
    ASKED = "asked"  # STATUS (maybe INIT) sent before a step; expect READY or NEEDINIT
    STOCK_BUSY = "stock-busy"  # field sent after that; expect FORCEREADY
    CLOSING = "closing"  # STOP or EXIT sent; expect BYE or close
    CLOSED = "closed"


# Module constants for the states: in Python 3.11 State.X is a descriptor lookup, and the
# per-step path compares states several times per driver.
_AUTH = State.AUTH
_PROBE = State.PROBE
_UNBOUND = State.UNBOUND
_BOUND = State.BOUND
_INIT = State.INIT
_REPLAY = State.REPLAY
_READY = State.READY
_BUSY = State.BUSY
_PARAMS = State.PARAMS
_LEARNING = State.LEARNING
_LEARN = State.LEARN
_ASKED = State.ASKED
_STOCK_BUSY = State.STOCK_BUSY
_CLOSING = State.CLOSING
_CLOSED = State.CLOSED

EXPECTING = {
    State.AUTH: "waiting for MXHPROOF, the answer to the hub's MXHAUTH challenge",
    State.PROBE: "waiting for the answer to STATUS",
    State.UNBOUND: "waiting for molecules to bind to (nothing was asked)",
    State.BOUND: "bound and waiting for INIT (nothing was asked)",
    State.INIT: "waiting for READY after INIT",
    State.REPLAY: "waiting for the source of a replayed step",
    State.READY: "idle (nothing was asked)",
    State.BUSY: "waiting for its source(s)",
    State.PARAMS: "waiting for MXHPARAMSOK, the answer to a parameter change",
    State.LEARNING: "waiting for its source (its first step)",
    State.LEARN: "waiting for the answer to STATUS after its first source",
    State.ASKED: "waiting for the answer to STATUS before a step",
    State.STOCK_BUSY: "waiting for its source",
    State.CLOSING: "waiting for BYE",
    State.CLOSED: "closed",
}
EVENT_NAMES = {
    wire.Ready: "READY",
    wire.NeedInit: "NEEDINIT",
    wire.HaveData: "HAVEDATA",
    wire.ForceReady: "FORCEREADY",
    wire.Bye: "BYE",
    wire.Hello: "MXHHELLO",
    wire.SourcesBatch: "MXHSOURCES",
    wire.AuthProof: "MXHPROOF",
    wire.Resume: "MXHRESUME",
    wire.Claim: "MXHCLAIM",
    wire.ParamsAck: "MXHPARAMSOK",
    wire.ShmAnswer: "MXHSHMOK/MXHSHMNO",
}

_GETFORCE_HEADER = wire.encode_header(wire.GETFORCE)
# The SOURCEREADY of the EM profile: header, energy 0.0, nat 1 (12:24), dmu/dt (24:48),
# a zero virial (48:120), the extras length (120:124), then the extras.
_SR_HEADER = wire.encode_header(wire.FORCEREADY)
_SR_ENERGY_NAT = struct.pack("<di", 0.0, 1)
_ZERO_VIRIAL = bytes(72)
_SR_PREFIX = _SR_HEADER + _SR_ENERGY_NAT  # header, energy 0.0, nat 1: one comparison
_SR_TAIL = struct.Struct("<3d72xi")
_SR_SIZE = wire.SOURCE_READY_PREFIX_SIZE  # 124
FAST_READ = 1 << 16  # reads up to this size may be one SOURCEREADY for the fast path
_finite = math.isfinite

STOP_BYTES = wire.encode_header(wire.STOP)
EXIT_BYTES = wire.encode_header(wire.EXIT)
STATUS_BYTES = wire.encode_header(wire.STATUS)
EXIT_AFTER_STOP_S = 0.5  # EXIT to a peer that has not answered STOP by then


# ----------------------------------------------------------------------------- interfaces


class MoleculeSlot(Protocol):
    """A registered molecule as the connection sees it."""

    id: int
    payload: dict[str, Any] | None


class StepLayout(Protocol):
    """A step's molecule ids by row (see :class:`maxwellhub.hub.Hub`)."""

    generation: int
    row: dict[int, int]


class FrozenStep(Protocol):
    """A frozen barrier step: the fields to send."""

    fields: npt.NDArray[Any]
    field_bytes: bytes | None
    want_extras: bool
    want_dipoles: bool


class HubCallbacks(Protocol):
    """What a connection tells the hub, and the little it asks of it."""

    def source_ready(
        self, conn: Connection, sx: float, sy: float, sz: float, extras: bytes
    ) -> None: ...
    def sources_batch(self, conn: Connection, event: wire.SourcesBatch) -> None: ...
    def driver_available(self, conn: Connection) -> None: ...
    def driver_ready(self, conn: Connection) -> None: ...
    def driver_initialized(self, conn: Connection) -> None: ...
    def replay_offer(self, conn: Connection) -> tuple[int, int]: ...
    def pending_field(self, conn: Connection) -> npt.NDArray[Any] | None: ...
    def connection_lost(self, conn: Connection, previous: State, exc: Exception | None) -> None: ...
    def params_answered(self, conn: Connection, sequence: int, error: str | None) -> None: ...


class Link(Protocol):
    """The I/O layer: where the bytes the machine returns are written (by its caller,
    never by the machine), and the actions that are not bytes."""

    def write(self, parts: Parts) -> None: ...

    def abort(self) -> None: ...
    def close(self) -> None: ...
    def arm(self, seconds: float) -> None:
        """Call :meth:`Connection.expired` after ``seconds`` unless disarmed first."""

    def disarm(self) -> None: ...
    def later(self, seconds: float, callback: Callable[[], Parts]) -> None:
        """Call ``callback`` after ``seconds`` and send the bytes it returns."""

    def hosting(self, molecules: int) -> None:
        """The peer announced an ensemble of ``molecules`` (large frames ahead)."""

    def ended(self, said_bye: bool) -> None:
        """The session's end is settled (BYE, EXIT sent, or the connection closed)."""

    def offer_lane(self, parts: Parts, extras: int) -> Lane | None:
        """Write ``parts``, then answer the driver's shared-memory lane offer (MXHSHMLANE,
        with the segment's descriptors when the hub wants a lane); the lane, or None."""


class Lane(Protocol):
    """A shared-memory lane as the connection steps it (:mod:`maxwellhub.hub.shm`)."""

    active: bool

    def settle(self, accepted: bool) -> None: ...
    def post(self, fields: npt.NDArray[Any], flags: int) -> None: ...
    def close(self) -> None: ...


# ----------------------------------------------------------------------------- machine


class Connection:
    """One driver connection, hub side. A plain driver hosts one molecule; a driver that
    negotiated batched frames (MXHHELLO) hosts ``batch`` molecules and is stepped with one
    frame for all of them."""

    link: Link

    def __init__(
        self,
        hub: HubCallbacks,
        number: int,
        *,
        limits: wire.Limits,
        dialect: str = "maxwelllink",
        auth: Secret | None = None,
        handshake_timeout: float | None = None,
        step_timeout: float | None = None,
    ) -> None:
        self.hub = hub
        self.number = number
        self.limits = limits
        self.decoder = wire.Decoder("hub", limits)
        self.state = _PROBE
        self.molecules: list[Any] = []  # MoleculeSlot objects, in binding order
        self.batch: int | None = None
        self.row = -1  # (first) row in the layout, -1 if absent
        self.rows: npt.NDArray[Any] | slice | None = None  # all rows of an ensemble
        self.rows_generation = -1
        self.peer = f"driver#{number}"
        self.dialect = dialect
        self.auth = auth
        self.handshake_timeout = handshake_timeout
        self.step_timeout = step_timeout
        self.reported = False  # a drop was already logged for it
        self.resume_step: int | None = None  # from MXHRESUME, after INIT
        self.claim: list[int] | None = None  # from MXHCLAIM: the ids it asks for
        # still to replay, oldest first: a step's fields, or parameter ops (step, ops)
        self.replay: list[Any] = []
        self.params = False  # it accepted the parameter frames (MXHPARAMSOK 0 after INIT)
        self.params_sent = 0  # sequence number of the last MXHPARAMS sent
        self.params_due: int | None = None  # the MXHPARAMSOK awaited, if any
        # What this connection turned out to be (learned once, see _ready_before_init):
        self.stock = False  # a stock i-PI client: ends with EXIT, not STOP
        self.init_needed = True  # False: it said READY before any INIT (ASE)
        self.stock_steps = True  # send_step takes _stock_step (first step, or
        self.status_each_step = False  # a client that needs STATUS/INIT before each step)
        self.status_probes = 0  # STATUS sent after the INIT handshake (learning, steps)
        self.ending = False  # send_end was called; the end is not settled yet
        self.said_bye: bool | None = None  # how the end settled: politely (True) or not
        self._nonce: bytes | None = None
        self._init_msg = b""
        self._init_resent = False
        self._was_empty = True  # the decoder held nothing before this read
        self._out: Parts = []
        # The shared-memory lane (maxwellhub.hub.shm): the extras count the driver's
        # MXHHELLO offered it with (None: not offered), and the lane once offered.
        self.lane_extras: int | None = None
        self.lane: Lane | None = None

    @property
    def size(self) -> int:
        return self.batch or 1

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held."""
        return self.decoder.buffered

    def __str__(self) -> str:
        if not self.molecules:
            return self.peer
        if len(self.molecules) == 1:
            return f"{self.peer} molecule {self.molecules[0].id}"
        return (
            f"{self.peer} molecules {self.molecules[0].id}..{self.molecules[-1].id} "
            f"({len(self.molecules)})"
        )

    # -- output
    def data_to_send(self) -> Parts:
        """The buffers queued so far, in order; the queue is emptied."""
        out = self._out
        if out:
            self._out = []
        return out

    def _ended(self, said_bye: bool) -> None:
        self.said_bye = said_bye
        self.link.ended(said_bye)

    def _emit(self, *parts: Any) -> None:
        self._out.extend(parts)

    # -- opening and receiving
    def start(self) -> Parts:
        """The connection is open: the first bytes (STATUS, or the MXHAUTH challenge)."""
        if self.auth is not None:
            # Nothing but the challenge until the peer proves it holds the secret.
            self.state = _AUTH
            self._nonce = new_nonce()
            self._emit(wire.encode_auth_challenge(self._nonce))
        else:
            self._emit(STATUS_BYTES)
        self._arm(self.handshake_timeout)
        return self.data_to_send()

    def read_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next read lands (zero copy; see :meth:`received`); ``sizehint`` is
        asyncio's and ignored."""
        self._was_empty = not self.decoder.buffered
        if not self.molecules:
            # A peer hosting nothing yet sends only small messages; the default room
            # (256 KiB, then doubled with a byte held) made a flood of peers that send a
            # byte each cost the hub half a megabyte apiece.
            return self.decoder.read_buffer(_UNBOUND_READ)
        return self.decoder.read_buffer()

    def received(self, nbytes: int) -> Parts:
        """``nbytes`` were read into :meth:`read_buffer`; the bytes to send in reply."""
        if self.state is _BUSY and self._was_empty and nbytes <= FAST_READ:
            room = self.decoder.read_buffer(0)
            if self._source_ready_fast(bytes(room[:nbytes])):
                return self._out and self.data_to_send()  # consumed: nothing is left held
        self._handle(self.decoder.received, nbytes)
        return self.data_to_send()

    def receive_data(self, data: bytes) -> Parts:
        """Bytes from the driver; the bytes to send in reply."""
        if self.state is _BUSY and not self.decoder.buffered and self._source_ready_fast(data):
            return self.data_to_send()
        self._handle(self.decoder.feed, data)
        return self.data_to_send()

    def _handle(self, decode: Callable[[Any], list[wire.Event]], data: Any) -> None:
        try:
            for event in decode(data):
                if self.reported or self.state is _CLOSED:
                    return  # dropped by an earlier message of this read
                self.dispatch(event)
        except ProtocolError as exc:
            self.fail(str(exc))

    def dispatch(self, event: wire.Event) -> None:
        """Run the table's handler for (state, type of ``event``); none, or a handler
        that declines (returns False), is a protocol error."""
        handler = TRANSITIONS.get((self.state, type(event)))
        if handler is None or handler(self, event) is False:
            name = EVENT_NAMES.get(type(event), type(event).__name__)
            self.fail(f"unexpected {name} while {EXPECTING[self.state]} (state {self.state.name})")

    def _source_ready_fast(self, data: bytes) -> bool:
        """Fast path: exactly one SOURCEREADY of the EM profile (energy 0, nat 1, virial
        0) in one read with nothing held; anything else goes through the full decoder."""
        if data[:24] == _SR_PREFIX and len(data) >= _SR_SIZE and data[48:120] == _ZERO_VIRIAL:
            sx, sy, sz, m = _SR_TAIL.unpack_from(data, 24)
            if (
                m == len(data) - _SR_SIZE
                and m <= self.limits.max_extras_bytes
                and _finite(sx)
                and _finite(sy)
                and _finite(sz)
            ):
                self.state = _READY
                self.hub.source_ready(self, sx, sy, sz, data[_SR_SIZE:])
                return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The I/O layer lost the connection."""
        previous, self.state = self.state, _CLOSED
        if previous is _AUTH:
            log.error(
                "refusing %s before INIT: authentication failed: it closed the "
                "connection without answering MXHAUTH",
                self,
            )
        self.link.disarm()
        if self.lane is not None:
            self.lane.close()
        if self.ending:
            self.ending = False
            self._ended(False)
        self.hub.connection_lost(self, previous, exc)

    # -- failures and deadlines
    def fail(self, why: str) -> None:
        """Drop this connection for a protocol violation, with one log line naming it."""
        if self.state is _CLOSED or self.reported:
            return  # one line per peer, even when one read held several bad messages
        if self.state is _AUTH:
            self._refuse(why)
            return
        log.error("dropping %s: %s", self, why)
        self.reported = True
        self.link.abort()

    def _refuse(self, why: str) -> None:
        """Drop a peer that failed authentication, with one log line naming it."""
        log.error("refusing %s before INIT: authentication failed: %s", self, why)
        self.state = _CLOSED  # no second line from connection_lost or later events
        self.link.abort()

    def _arm(self, seconds: float | None) -> None:
        """Expect the answer within ``seconds`` (None: no deadline; a dead peer is then
        noticed by its connection, see :mod:`maxwellhub.liveness`)."""
        if seconds is not None:
            self.link.arm(seconds)

    def expired(self, seconds: float) -> None:
        """The deadline armed ``seconds`` ago passed (called by the I/O layer's timer)."""
        why = _DEADLINES.get(self.state)
        if why is not None:
            self.fail(why.format(s=seconds))

    # -- handlers: one per (state, message) entry of TRANSITIONS; False declines
    def _on_proof(self, event: wire.AuthProof) -> None:
        # AUTH is entered only when the hub has a secret, with a fresh nonce.
        auth, nonce = self.auth, self._nonce
        if auth is None or nonce is None or not auth.verify(nonce, event.proof):
            self._refuse("wrong MXHPROOF (the driver's secret differs from the hub's)")
            return
        self._nonce = None
        self.state = _PROBE
        self.link.disarm()
        log.debug("%s authenticated", self)
        if self.batch is not None:  # its MXHHELLO arrived before the proof
            self._emit(wire.encode_welcome(self.batch))
            self._offer_lane()
        self._emit(STATUS_BYTES)
        self._arm(self.handshake_timeout)

    def _on_hello(self, event: wire.Hello) -> bool:
        if self.batch is not None:
            return False
        self.batch = self.decoder.batch = event.molecules
        self.link.hosting(event.molecules)
        if event.flags & wire.HELLO_SHM_LANE:
            self.lane_extras = (event.flags >> wire.HELLO_EXTRAS_SHIFT) & wire.SHM_MAX_EXTRAS
        if self.state is _PROBE:  # authenticated (or no secret): welcome it now
            self._emit(wire.encode_welcome(event.molecules))
            self._offer_lane()
        # else an ensemble driver spoke first; MXHWELCOME waits for its proof
        return True

    def _offer_lane(self) -> None:
        """Right after MXHWELCOME: answer a lane offer (the I/O layer passes the segment's
        descriptors, so it writes what is queued first, in order)."""
        if self.lane_extras is not None:
            self.lane = self.link.offer_lane(self.data_to_send(), self.lane_extras)

    def _on_lane_answer(self, event: wire.ShmAnswer) -> bool:
        lane = self.lane
        if lane is None or lane.active:  # no lane was passed, or it was answered already
            return False
        lane.settle(event.accepted)
        return True

    def _on_probe_answer(self, event: wire.Ready | wire.NeedInit) -> None:
        self.state = _UNBOUND
        self.link.disarm()
        if isinstance(event, wire.Ready):
            self._ready_before_init()
        self.hub.driver_available(self)

    def _on_claim(self, event: wire.Claim) -> bool:
        if self.claim is not None:
            return False
        if event.molecules != self.size:
            self.fail(
                f"MXHCLAIM for {event.molecules} molecule(s); the connection hosts {self.size}"
            )
            return True
        self.claim = list(range(event.first, event.first + event.molecules))
        return True

    def _on_init_ready(self, _event: wire.Ready) -> None:
        self.link.disarm()
        self.hub.driver_ready(self)

    def _on_resume(self, event: wire.Resume) -> bool:
        if self.resume_step is not None:
            return False
        if event.molecules != self.size:
            self.fail(
                f"MXHRESUME for {event.molecules} molecule(s); the connection hosts {self.size}"
            )
            return True
        self.resume_step = event.step
        return True

    def _on_init_needinit(self, event: wire.NeedInit) -> bool:
        if self.init_needed:
            return False
        return self._on_needinit_again(event)

    def _on_replayed(self, event: wire.ForceReady | wire.SourcesBatch) -> None:
        if self.params_due is not None:
            self.fail(f"{EVENT_NAMES[type(event)]} while a replayed parameter change is unanswered")
            return
        if isinstance(event, wire.ForceReady) != (self.batch is None):
            self.fail(f"{EVENT_NAMES[type(event)]} while being replayed missed steps")
            return
        self._emit(*self.send_replay())

    def _on_params_accept(self, event: wire.ParamsAck) -> bool:
        if self.params or event.sequence != 0:
            return False
        error = params_json.parse_ack(event)
        if error is not None:
            log.info("%s declined parameter frames: %s", self, error)
        else:
            self.params = True
        return True

    def _params_answer(self, event: wire.ParamsAck) -> str | bool | None:
        """The error text of the awaited MXHPARAMSOK (None: ok); False if not awaited."""
        if self.params_due is None or event.sequence != self.params_due:
            return False
        self.params_due = None
        return params_json.parse_ack(event)

    def _on_params_ack(self, event: wire.ParamsAck) -> bool:
        error = self._params_answer(event)
        if error is False:
            return False
        self.state = _READY
        self.link.disarm()
        self.hub.params_answered(self, event.sequence, error if isinstance(error, str) else None)
        if self.state is _READY:
            self.hub.driver_initialized(self)  # a step begun meanwhile is sent now
        return True

    def _on_replayed_params(self, event: wire.ParamsAck) -> bool:
        error = self._params_answer(event)
        if error is False:
            return False
        if error:
            log.warning("%s refused a replayed parameter change: %s", self, error)
        self._emit(*self.send_replay())
        return True

    def _on_source(self, event: wire.ForceReady) -> bool:
        if self.batch is not None:
            return False
        if event.forces.shape[0] != 1:
            self.fail(f"SOURCEREADY carries nat = {event.forces.shape[0]}, the EM profile needs 1")
            return True
        self.state = _READY
        sx, sy, sz = event.forces[0].tolist()
        self.hub.source_ready(self, sx, sy, sz, event.extras)
        return True

    def _on_sources(self, event: wire.SourcesBatch) -> bool:
        if self.batch is None:
            return False
        self.state = _READY
        self.hub.sources_batch(self, event)
        return True

    def _on_bye(self, _event: wire.Bye) -> None:
        if self.ending:
            self.ending = False
            self._ended(True)
        self.link.close()

    def _ignore(self, _event: wire.Event) -> None:
        # A source owed for a field sent before STOP (a stop mid-step), or the answer to
        # a STATUS sent before STOP/EXIT: nobody needs it now.
        return

    # -- stock i-PI clients (ASE's SocketClient, i-PI's driver, ...)
    #
    # Learned per connection from what it answers, never by extra work per step for the
    # drivers that keep the fast path:
    # - READY to the connect STATUS (no INIT needed: ASE) marks a stock client; INIT is then
    #   not sent (ASE asserts on an INIT it did not ask for) unless it later says NEEDINIT.
    #   MaxwellLink's and maxwellhub's drivers say NEEDINIT until INIT.
    # - The first step of every plain connection goes through the full decoder; after its
    #   FORCEREADY the hub sends one STATUS. READY: the client stays READY, every later step
    #   is the fused POSDATA+GETFORCE block with the fast receive path. NEEDINIT (ASE before
    #   3.29): a stock client; every later step is STATUS, INIT + STATUS when it says
    #   NEEDINIT, then the block once it says READY.
    # - Extras that are not a JSON object in that first FORCEREADY ("nada", a zero byte)
    #   also mark a stock client: MaxwellLink's and maxwellhub's drivers always send one.
    # At the end a stock client gets EXIT. The rest get STOP (MaxwellLink's driver raises
    # on EXIT); one that has not said BYE after EXIT_AFTER_STOP_S gets EXIT too, which
    # ends an i-PI client that sends JSON extras (it ignores STOP) and reaches nobody else
    # (MaxwellLink's and our drivers stop reading after STOP).

    def _ready_before_init(self) -> None:
        self.init_needed = False
        self._mark_stock("it answered READY before any INIT")

    def _mark_stock(self, why: str) -> None:
        if not self.stock:
            self.stock = True
            log.info("%s is a stock i-PI client (%s): it will get EXIT at the end", self, why)

    def _on_stock_source(self, event: wire.ForceReady) -> None:
        """A stock client's FORCEREADY: its source; after its first, one STATUS to learn
        whether it stays READY."""
        if event.forces.shape[0] != 1:
            self.fail(
                f"FORCEREADY carries nat = {event.forces.shape[0]}, the EM "
                "profile needs 1 (the field is the one atom's position)"
            )
            return
        if self.state is _LEARNING:
            if not event.extras.startswith(b"{"):
                self._mark_stock(f"its extras {event.extras[:16]!r} are not JSON")
            self.state = _LEARN
            self.status_probes += 1
            self._emit(STATUS_BYTES)
        else:
            self.state = _READY
        sx, sy, sz = event.forces[0].tolist()
        self.hub.source_ready(self, sx, sy, sz, event.extras)

    def _on_learned(self, event: wire.Ready | wire.NeedInit) -> None:
        if isinstance(event, wire.NeedInit):
            self._mark_stock("it went back to NEEDINIT after FORCEREADY")
            self.status_each_step = True
            log.info("%s: STATUS (and INIT when asked) before every step", self)
        else:
            self.stock_steps = False
            log.debug("%s stays READY: fused steps from now on", self)
        self.state = _READY
        self.hub.driver_initialized(self)  # sends the step due meanwhile, if any

    def _on_asked_ready(self, _event: wire.Ready) -> None:
        field = self.hub.pending_field(self)
        if field is not None:
            self.state = _STOCK_BUSY
            self._emit(wire.encode_field_step(field))
        else:
            self.state = _READY

    def _on_needinit_again(self, _event: wire.NeedInit) -> bool:
        """It asks for INIT (again): the one built at binding, then STATUS."""
        if self._init_resent:
            return False
        self._init_resent = self.init_needed = True
        if self.state is _ASKED:
            self.status_probes += 1
        self._emit(self._init_msg, STATUS_BYTES)
        return True

    # -- what the hub asks of the connection; each returns the bytes to send
    def bind(self, molecules: Sequence[MoleculeSlot]) -> None:
        """Bound to ``molecules`` (one, or as many as the ensemble hosts)."""
        self.molecules = list(molecules)
        self.state = _BOUND
        self.rows_generation = -1

    def send_init(self) -> Parts:
        """INIT (unless a stock client that never asked) and STATUS."""
        mols = self.molecules
        first = mols[0]
        done, replayable = self.hub.replay_offer(self)
        body = build_init(
            [m.id for m in mols],
            [m.payload for m in mols],
            done,
            replayable,
            ensemble=self.batch is not None,
            params=params_json.offer(self.limits),
        )
        self.state = _INIT
        self.resume_step = None
        self._init_msg = wire.encode_init(first.id, body)
        self._init_resent = False
        if self.init_needed:
            self._emit(self._init_msg)
        self._emit(STATUS_BYTES)
        # The driver sets up its model before it answers (minutes for an SCF): as slow as
        # a step, so the step deadline applies, not the handshake's.
        self._arm(self.step_timeout)
        return self.data_to_send()

    def send_replay(self) -> Parts:
        """The next missed step (its answer will be discarded), or, when none is left,
        report the driver initialised."""
        if self.replay and self.stock:
            log.warning(
                "%s: a stock i-PI client is not replayed %d missed step(s)", self, len(self.replay)
            )
            self.replay = []
        if not self.replay:
            self.link.disarm()
            self.state = _READY
            self.hub.driver_initialized(self)
            return self.data_to_send()
        fields = self.replay.pop(0)
        self.state = _REPLAY
        if isinstance(fields, tuple):  # (step, ops): parameter changes at that step
            if not self.params:
                log.warning(
                    "%s does not speak parameter frames: a change made at step %d is not "
                    "replayed to it, so continuity is lost",
                    self,
                    fields[0],
                )
                return self.send_replay()
            self._emit(self._params_frame(*fields))
            self.link.disarm()
            self._arm(self.step_timeout)
            return self.data_to_send()
        if self.batch is None:
            self._emit(
                b"".join((wire.FIELD_STEP_HEAD, fields.astype("<f8").tobytes(), _GETFORCE_HEADER))
            )
        else:
            self._emit(*wire.fields_batch_parts(fields, 0), _GETFORCE_HEADER)
        self.link.disarm()
        self._arm(self.step_timeout)  # a replayed step is a step
        return self.data_to_send()

    def _params_frame(self, step: int, ops: Sequence[params_json.Op]) -> bytes:
        self.params_sent += 1
        self.params_due = self.params_sent
        body = params_json.build_payload(self.params_sent, ops, self.limits.max_params_bytes)
        return wire.encode_params(step, body)

    def send_params(self, step: int, ops: Sequence[params_json.Op]) -> Parts:
        """MXHPARAMS with ``ops`` at ``step`` (between steps, to a driver that accepted
        parameter frames); :meth:`HubCallbacks.params_answered` gets the answer."""
        if not self.params:
            raise UsageError(f"{self} does not speak maxwellhub's parameter frames")
        if self.state is not _READY:
            raise UsageError(f"{self} is not idle (state {self.state.name}); change between steps")
        frame = self._params_frame(step, ops)
        self.state = _PARAMS
        self._emit(frame)
        return self.data_to_send()

    def send_step(self, step: FrozenStep) -> Parts:
        """This driver's frozen field(s) of ``step`` with GETSOURCE."""
        if self.stock_steps:  # its first step, or a client needing STATUS before each
            return self._stock_step(step)
        self.state = _BUSY
        if self.batch is None:
            r = self.row
            fb = step.field_bytes
            if fb is None:
                fb = step.field_bytes = step.fields.astype("<f8").tobytes()
            block = b"".join((wire.FIELD_STEP_HEAD, fb[24 * r : 24 * r + 24], _GETFORCE_HEADER))
            if not self._out:  # the hot path: nothing queued before it
                return [block]
            self._out.append(block)
        else:
            flags = (wire.WANT_EXTRAS if step.want_extras else 0) | (
                wire.WANT_DIPOLES if step.want_dipoles else 0
            )
            lane = self.lane
            if lane is not None and lane.active:  # fields and sources through shared memory
                lane.post(step.fields[self.rows], flags)
                return self.data_to_send()
            self._emit(*wire.fields_batch_parts(step.fields[self.rows], flags), _GETFORCE_HEADER)
        return self.data_to_send()

    def direct_ready(self) -> bool:
        """Whether :meth:`send_step_direct` would take this step (nothing changes)."""
        return (
            self.state is _READY and self.batch is None and not self.stock_steps and not self._out
        )

    def send_step_direct(self) -> bool:
        """Whether this step's block may be written by the steady step's batched send
        (:mod:`maxwellhub.net.steadyio`) instead of :meth:`send_step`: a single molecule
        past its first step, with nothing queued before it. Then the connection is
        BUSY, as after :meth:`send_step`; its reply comes through :meth:`receive_data`
        or, taken whole by the batched read, through :meth:`answered_direct`."""
        if not self.direct_ready():
            return False
        self.state = _BUSY
        return True

    def answered_direct(self) -> None:
        """The batched read took this connection's SOURCEREADY (the fast path's shape)
        and gave the source to the hub: READY again."""
        self.state = _READY

    def _stock_step(self, step: FrozenStep) -> Parts:
        """send_step for a connection still learning or needing STATUS before each step."""
        if self.batch is not None:  # MXHHELLO: a maxwellhub ensemble, nothing to learn
            self.stock_steps = False
            return self.send_step(step)
        if self.status_each_step:
            self.state = _ASKED
            self._init_resent = False
            self.status_probes += 1
            self._emit(STATUS_BYTES)
        else:  # the first step: it said READY to the last STATUS, so POSDATA is due
            self.state = _LEARNING
            self._emit(wire.encode_field_step(step.fields[self.row]))
        return self.data_to_send()

    def place(self, layout: StepLayout) -> bool:
        """Find this driver's row(s) in ``layout`` (cached per layout); False if none of
        its molecules is in the step. An ensemble must be stepped whole."""
        if self.rows_generation == layout.generation:
            return self.row >= 0
        self.rows_generation = layout.generation
        found = [layout.row.get(m.id, -1) for m in self.molecules]
        inside = [r for r in found if r >= 0]
        if inside and len(inside) != len(found):
            raise UsageError(
                f"{self} hosts molecules {self.molecules[0].id}.."
                f"{self.molecules[-1].id} together: a step must include all of "
                "them or none"
            )
        self.row = found[0] if inside else -1
        self.rows = None
        if self.batch is not None and inside:
            first = found[0]
            # Consecutive rows (the usual case) index as a slice: views and memcpy, no
            # gather or scatter.
            if found == list(range(first, first + len(found))):
                self.rows = slice(first, first + len(found))
            else:
                self.rows = np.array(found, dtype=np.intp)
        return self.row >= 0

    def send_end(self) -> Parts:
        """STOP (MaxwellLink dialect, answered by BYE; EXIT follows if no BYE comes) or
        EXIT (a stock i-PI client, or the "ipi" dialect; no answer). The end is settled
        through :meth:`Link.ended`."""
        if self.state is _CLOSED:
            self._ended(False)
            return self.data_to_send()
        if self.state is _AUTH:  # never authenticated: it is told nothing, just closed
            self.state = _CLOSED
            self.link.abort()
            self._ended(False)
            return self.data_to_send()
        self.state = _CLOSING
        if self.dialect == "ipi" or self.stock:
            self._emit(EXIT_BYTES)
            self._ended(True)
        else:
            self._emit(STOP_BYTES)
            self.ending = True
            self.link.later(EXIT_AFTER_STOP_S, self.exit_after_stop)
        return self.data_to_send()

    def exit_after_stop(self) -> Parts:
        """EXIT to a peer that did not answer STOP (an i-PI client ignores STOP)."""
        if self.state is _CLOSING and self.ending:
            log.info("%s did not answer STOP: sent EXIT", self)
            self.ending = False
            self._emit(EXIT_BYTES)
            self._ended(True)
        return self.data_to_send()


_DEADLINES = {
    State.AUTH: "no MXHPROOF within {s:g} s",
    State.PROBE: "no answer to STATUS within {s:g} s",
    State.INIT: "no answer to STATUS within {s:g} s after INIT",
    State.REPLAY: "a replayed step not answered within {s:g} s",
}

_Handler = Callable[[Connection, Any], "bool | None"]
_S = State
#: Every message each state accepts, and what it does; a missing entry is a protocol error.
#: A handler may still decline (return False) when a guard fails (a second MXHHELLO, say).
TRANSITIONS: dict[tuple[State, type], _Handler] = {
    (_S.AUTH, wire.AuthProof): Connection._on_proof,
    (_S.AUTH, wire.Hello): Connection._on_hello,
    (_S.PROBE, wire.Ready): Connection._on_probe_answer,
    (_S.PROBE, wire.NeedInit): Connection._on_probe_answer,
    (_S.PROBE, wire.Claim): Connection._on_claim,
    (_S.PROBE, wire.Hello): Connection._on_hello,
    (_S.INIT, wire.Ready): Connection._on_init_ready,
    (_S.INIT, wire.Resume): Connection._on_resume,
    (_S.INIT, wire.NeedInit): Connection._on_init_needinit,
    (_S.INIT, wire.ParamsAck): Connection._on_params_accept,
    (_S.PARAMS, wire.ParamsAck): Connection._on_params_ack,
    (_S.REPLAY, wire.ParamsAck): Connection._on_replayed_params,
    (_S.REPLAY, wire.ForceReady): Connection._on_replayed,
    (_S.REPLAY, wire.SourcesBatch): Connection._on_replayed,
    (_S.BUSY, wire.ForceReady): Connection._on_source,
    (_S.BUSY, wire.SourcesBatch): Connection._on_sources,
    (_S.LEARNING, wire.ForceReady): Connection._on_stock_source,
    (_S.STOCK_BUSY, wire.ForceReady): Connection._on_stock_source,
    (_S.LEARN, wire.Ready): Connection._on_learned,
    (_S.LEARN, wire.NeedInit): Connection._on_learned,
    (_S.ASKED, wire.Ready): Connection._on_asked_ready,
    (_S.ASKED, wire.NeedInit): Connection._on_needinit_again,
    (_S.PROBE, wire.ShmAnswer): Connection._on_lane_answer,
    (_S.UNBOUND, wire.ShmAnswer): Connection._on_lane_answer,
    (_S.BOUND, wire.ShmAnswer): Connection._on_lane_answer,
    (_S.INIT, wire.ShmAnswer): Connection._on_lane_answer,
    (_S.CLOSING, wire.ShmAnswer): Connection._ignore,
    (_S.CLOSING, wire.Bye): Connection._on_bye,
    (_S.CLOSING, wire.ForceReady): Connection._ignore,
    (_S.CLOSING, wire.SourcesBatch): Connection._ignore,
    (_S.CLOSING, wire.Ready): Connection._ignore,
    (_S.CLOSING, wire.NeedInit): Connection._ignore,
    (_S.CLOSING, wire.ParamsAck): Connection._ignore,
}


def all_direct_ready(conns: Sequence[Connection]) -> bool:
    """:meth:`Connection.direct_ready` for every one of ``conns`` (the steady step checks a
    whole step's drivers at once; one loop here, no method call per driver)."""
    for c in conns:
        if c.state is not _READY or c.batch is not None or c.stock_steps or c._out:
            return False
    return True


def mark_sent_direct(conns: Sequence[Connection]) -> None:
    """Every one of ``conns`` (all :meth:`~Connection.direct_ready`) got its step's block."""
    for c in conns:
        c.state = _BUSY


def mark_answered_direct(conns: Sequence[Connection], which: Iterable[int]) -> None:
    """:meth:`Connection.answered_direct` for ``conns[k]``, k in ``which``."""
    for k in which:
        conns[k].state = _READY
