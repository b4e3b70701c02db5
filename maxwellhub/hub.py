"""The coupling hub: driver connections over TCP or UNIX sockets, molecule binding, and
barrier steps (send every molecule its field, gather every molecule's source).

Two faces, one implementation:

- :class:`Hub` is the asyncio core. It runs on the caller's event loop; one
  :class:`asyncio.Protocol` per connection feeds :class:`maxwellhub.wire.Decoder`.
  ``await hub.step(requests)`` is the async barrier.
- :class:`SocketHub` is MaxwellLink's synchronous API (``step_barrier``,
  ``wait_until_bound``, ...) for plain functions such as Meep's step callback. It owns a
  private event loop (uvloop when installed) and runs it *in the calling thread* only while
  one of its methods is waiting, so there is no thread, no lock and no polling. Between
  calls, new connections wait in the kernel's listen backlog.

Barrier contract (kept from MaxwellLink, with its holes closed):

- a step *freezes* the fields it was given; until the step completes, every retry sends
  the same frozen field, whatever the new request says;
- replies already received are kept when another driver fails; a replacement driver bound
  to the same molecule gets the frozen field; healthy drivers are never asked twice;
- ``step_barrier`` returns ``{}`` when paused (stopped), aborted (a driver was lost) or
  incomplete (timeout), and the next call continues the same frozen step;
- ``step`` waits for replacements itself and raises :class:`BarrierTimeout` naming the
  missing molecules when its deadline passes.

This module never converts units and never interprets the extras a driver sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import math
import os
import socket
import stat
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from . import wire
from .addresses import DEFAULT_PORT, unix_socket_path
from .auth import Secret, is_loopback, new_nonce
from .errors import BarrierTimeout, DriverLost, MaxwellHubError, ProtocolError, UsageError
from .liveness import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    check_timeout,
    keepalive,
    report_delays,
    within,
)
from .mpi import am_master

if TYPE_CHECKING:
    from .control import ControlServer

__all__ = ["Hub", "SocketHub", "StepResult", "StopRequested", "new_event_loop"]

log = logging.getLogger("maxwellhub.hub")

# Connection states. Each names what the hub waits for on that connection.
_AUTH = "auth"  # MXHAUTH sent (hub has a secret); expect MXHPROOF
_PROBE = "probe"  # STATUS sent before binding; expect READY or NEEDINIT
_UNBOUND = "unbound"  # answered; waiting for a molecule to bind to
_BOUND = "bound"  # bound, INIT not sent yet (no payload known)
_INIT = "init"  # INIT + STATUS sent; expect READY (MXHRESUME first, maybe)
_REPLAY = "replay"  # a restored driver is replayed the steps it missed
_READY = "ready"  # initialised and idle
_BUSY = "busy"  # field sent; expect FORCEREADY
# Stock i-PI clients (ASE's SocketClient, i-PI's driver): see _Driver._on_stock_event.
_LEARNING = "learning"  # first field sent (not the fast path); expect FORCEREADY
_LEARN = "learn"  # STATUS sent after its first FORCEREADY; expect READY or NEEDINIT
_ASKED = "asked"  # STATUS (maybe INIT) sent before a step; expect READY or NEEDINIT
_STOCK_BUSY = "stock-busy"  # field sent after that; expect FORCEREADY
_CLOSING = "closing"  # STOP or EXIT sent; expect BYE or close
_CLOSED = "closed"

_GETFORCE_HEADER = wire.encode_header(wire.GETFORCE)
# The SOURCEREADY of the EM profile: header, energy 0.0, nat 1 (12:24), dmu/dt (24:48),
# a zero virial (48:120), the extras length (120:124), then the extras.
_SR_HEADER = wire.encode_header(wire.FORCEREADY)
_SR_ENERGY_NAT = struct.pack("<di", 0.0, 1)
_ZERO_VIRIAL = bytes(72)
_SR_TAIL = struct.Struct("<3d72xi")
_SR_SIZE = wire.SOURCE_READY_PREFIX_SIZE  # 124
_FAST_READ = 1 << 16  # reads up to this size may be one SOURCEREADY for the fast path
_finite = math.isfinite


_STOP_BYTES = wire.encode_header(wire.STOP)
_EXIT_BYTES = wire.encode_header(wire.EXIT)
_STATUS_BYTES = wire.encode_header(wire.STATUS)
_STOCK_STATES = frozenset((_LEARNING, _LEARN, _ASKED, _STOCK_BUSY))
_EXIT_AFTER_STOP_S = 0.5  # EXIT to a peer that has not answered STOP by then


class StopRequested(MaxwellHubError):
    """The run was asked to stop (:meth:`Hub.request_stop`, e.g. by the control endpoint);
    raised by ``step``/``step_arrays``, while ``step_barrier`` returns ``{}``."""


_STEP_TIMES = 10_000  # per-step durations kept for status() (last, mean, p99)
_LAST_TO_ANSWER_CAP = 4096  # molecule ids counted as "last to answer" before trimming


def new_event_loop(kind: str | None = None) -> asyncio.AbstractEventLoop:
    """A new event loop: ``"uvloop"`` (when installed), ``"asyncio"`` (the stdlib's), or
    ``None`` for the environment variable MAXWELLHUB_LOOP, else uvloop when installed."""
    kind = kind or os.environ.get("MAXWELLHUB_LOOP") or "uvloop"
    if kind not in ("uvloop", "asyncio"):
        raise UsageError(f"event loop kind {kind!r}: expected 'uvloop' or 'asyncio'")
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"INIT payload value {obj!r} of type {type(obj).__name__} is not JSON")


class _Molecule:
    """A registered molecule id and the driver (if any) bound to it."""

    __slots__ = ("driver", "id", "index", "initialized", "payload")

    def __init__(self, mid: int, index: int) -> None:
        self.id = mid
        self.index = index  # registration order: its slot in Hub._counts
        self.driver: _Driver | None = None
        self.payload: dict | None = None
        self.initialized = False


class _Layout:
    """The molecule ids of a step and their row in its arrays. Kept while consecutive
    steps ask for the same ids, so per-driver row indices are computed once."""

    __slots__ = ("generation", "ids", "index", "key", "pending", "row")

    def __init__(self, ids: np.ndarray, generation: int, index: np.ndarray) -> None:
        self.ids = ids
        self.key = ids.tobytes()  # cheap equality test for the next step's ids
        self.row = {int(m): r for r, m in enumerate(ids.tolist())}
        self.generation = generation
        self.index = index  # each row's molecule slot in Hub._counts
        self.pending = 0  # completed steps not yet added to Hub._counts


class _Replay:
    """A completed step kept for replay: its layout, its fields and how many steps each
    of its molecules had completed before it."""

    __slots__ = ("before", "fields", "layout")

    def __init__(self, layout: _Layout, fields: np.ndarray, before: np.ndarray) -> None:
        self.layout = layout
        self.fields = fields
        self.before = before


class _Barrier:
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
        self, layout: _Layout, fields: np.ndarray, want_extras: bool, want_dipoles: bool = False
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
        self.batch_extras: list[tuple[np.ndarray | slice, dict]] = []
        self.waiting = n
        self.waiter: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.abort_on_loss = False
        self.lost: list[int] = []
        self.started = time.monotonic()  # for status(): the step's duration
        self.last: _Driver | None = None  # the driver whose reply completed the step
        self.deadline: float | None = None  # loop time the current wait gives up, if any
        # When to say who is missing (loop time), from the first wait of the step on.
        self.reports: Iterator[float] | None = None
        self.report_base = 0.0
        self.report_at = 0.0

    def wake(self, why: str) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(why)

    def missing(self) -> list[int]:
        return self.layout.ids[~self.done].tolist()


class StepResult:
    """The outcome of one barrier step in array form (:meth:`Hub.step_arrays`).

    ``ids`` (N,) and ``sources`` (N, 3) dmu/dt in a.u., row for row with the request.
    :meth:`extras` gives the drivers' per-step data as ``{key: (N,) float64}`` (NaN where
    a molecule does not report a key); single drivers' JSON is parsed only when asked.
    """

    __slots__ = ("_batch_extras", "_extras", "_json", "ids", "sources")

    def __init__(
        self,
        ids: np.ndarray,
        sources: np.ndarray,
        json_rows: dict[int, bytes],
        batch_extras: list[tuple[np.ndarray | slice, dict]],
    ) -> None:
        self.ids = ids
        self.sources = sources
        self._json = json_rows
        self._batch_extras = batch_extras
        self._extras: dict[str, np.ndarray] | None = None

    def extra_bytes(self, row: int) -> bytes:
        """The extras of one row as MaxwellLink's JSON bytes."""
        raw = self._json.get(row)
        if raw is not None:
            return raw
        values = {k: float(v[row]) for k, v in self.extras().items() if v[row] == v[row]}
        return json.dumps(values, sort_keys=True, separators=(",", ":")).encode()

    def extras(self) -> dict[str, np.ndarray]:
        if self._extras is None:
            n = len(self.ids)
            out: dict[str, np.ndarray] = {}
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
            if not out and len(batches) == 1 and _is_all_rows(batches[0][0], n):
                # one ensemble answered every row: its arrays (decoded copies) as they are
                out.update(batches[0][1])
                batches = []
            for rows, arrays in batches:
                for key, values in arrays.items():
                    out.setdefault(key, np.full(n, np.nan))[rows] = values
            self._extras = out
        return self._extras

    def as_dict(self) -> dict[int, dict]:
        """MaxwellLink's shape: ``{molid: {"amp": ndarray(3), "extra": bytes}}``."""
        rows = list(self.sources)  # row views, made in C
        if self._batch_extras:
            extras = [self.extra_bytes(r) for r in range(len(rows))]
        else:
            extras = [self._json.get(r, b"") for r in range(len(rows))]
        return {
            m: {"amp": a, "extra": e}
            for m, a, e in zip(self.ids.tolist(), rows, extras, strict=True)
        }


class _Driver(asyncio.BufferedProtocol):
    """One driver connection: feeds bytes to the codec and reports events to the hub.

    A plain driver hosts one molecule; a driver that negotiated batched frames
    (MXHHELLO) hosts ``batch`` molecules and is stepped with one frame for all of them.
    """

    #: Set by connection_made, which the event loop calls before any other method.
    transport: asyncio.Transport

    def __init__(self, hub: Hub, number: int) -> None:
        self.hub = hub
        self.loop = hub.loop  # made only by a started hub's listener
        self.number = number
        self.decoder = wire.Decoder("hub", hub.limits)
        self.state = _PROBE
        self.molecules: list[_Molecule] = []
        self.batch: int | None = None
        self.row = -1  # (first) row in the layout, -1 if absent
        self.rows: np.ndarray | slice | None = None  # all rows of an ensemble
        self._was_empty = True  # the decoder held nothing before this read
        self.rows_generation = -1
        self.peer = f"driver#{number}"
        self.dialect = hub.dialect
        self.bye: asyncio.Future | None = None
        self.reported = False  # a drop was already logged for it
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.resume_step: int | None = None  # from MXHRESUME, after INIT
        self.claim: list[int] | None = None  # from MXHCLAIM: the ids it asks for
        self.replay: list[np.ndarray] = []  # fields still to replay, oldest first
        # What this connection turned out to be (learned once, see _on_stock_event):
        self.stock = False  # a stock i-PI client: ends with EXIT, not STOP
        self.init_needed = True  # False: it said READY before any INIT (ASE)
        self.stock_steps = True  # send_step takes _send_stock_step (first step, or
        self.status_each_step = False  # a client that needs STATUS/INIT before each step)
        self.status_probes = 0  # STATUS sent after the INIT handshake (learning, steps)
        self._init_msg = b""
        self._init_resent = False

    @property
    def molecule(self) -> _Molecule | None:
        return self.molecules[0] if self.molecules else None

    @property
    def size(self) -> int:
        return self.batch or 1

    # -- naming, for log lines that point at the culprit
    def __str__(self) -> str:
        if not self.molecules:
            return self.peer
        if len(self.molecules) == 1:
            return f"{self.peer} molecule {self.molecules[0].id}"
        return (
            f"{self.peer} molecules {self.molecules[0].id}..{self.molecules[-1].id} "
            f"({len(self.molecules)})"
        )

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport (asyncio's or uvloop's) is an asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"driver#{self.number} ({peer[0]}:{peer[1]})"
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                keepalive(sock)  # a vanished host is noticed in LOST_HOST_SECONDS
        self.hub._connections.add(self)
        self.hub._handshaking.add(self)
        self._nonce: bytes | None = None
        if self.hub.auth is not None:
            # Nothing but the challenge until the peer proves it holds the secret.
            self.state = _AUTH
            self._nonce = new_nonce()
            self.transport.write(wire.encode_auth_challenge(self._nonce))
        else:
            self.transport.write(_STATUS_BYTES)
        self._arm(self.hub.handshake_timeout)

    # asyncio receives straight into the decoder's buffer (BufferedProtocol): a batched
    # frame of 10^6 molecules is 48 MB, and copying it read by read cost as much again.
    def get_buffer(self, sizehint: int) -> memoryview:
        self._was_empty = not self.decoder.buffered
        return self.decoder.read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.state == _BUSY and self._was_empty and nbytes <= _FAST_READ:
            room = self.decoder.read_buffer(0)
            if self._source_ready_fast(bytes(room[:nbytes])):
                return  # consumed: nothing is left held
        self._handle(self.decoder.received, nbytes)

    def data_received(self, data: bytes) -> None:
        """The same as a buffered read (for callers that hand bytes in)."""
        if self.state == _BUSY and not self.decoder.buffered and self._source_ready_fast(data):
            return
        self._handle(self.decoder.feed, data)

    def _handle(self, decode: Callable[[Any], list[wire.Event]], data: Any) -> None:
        try:
            for event in decode(data):
                if self.reported:  # dropped by an earlier message of this read
                    return
                self._on_event(event)
        except ProtocolError as exc:
            self.fail(str(exc))

    def _source_ready_fast(self, data: bytes) -> bool:
        """Fast path: exactly one SOURCEREADY of the EM profile (energy 0, nat 1, virial
        0) in one read with nothing held; anything else goes through the full decoder."""
        if (
            data.startswith(_SR_HEADER)
            and len(data) >= _SR_SIZE
            and data[12:24] == _SR_ENERGY_NAT
            and data[48:120] == _ZERO_VIRIAL
        ):
            sx, sy, sz, m = _SR_TAIL.unpack_from(data, 24)
            if (
                m == len(data) - _SR_SIZE
                and m <= self.hub.limits.max_extras_bytes
                and _finite(sx)
                and _finite(sy)
                and _finite(sz)
            ):
                self.state = _READY
                self.hub._source_ready(self, sx, sy, sz, data[_SR_SIZE:])
                return True
        return False

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        previous, self.state = self.state, _CLOSED
        if previous == _AUTH:
            log.error(
                "refusing %s before INIT: authentication failed: it closed the "
                "connection without answering MXHAUTH",
                self,
            )
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self.bye is not None and not self.bye.done():
            self.bye.set_result(False)
        self.hub._connection_lost(self, previous, exc)

    # -- protocol
    def fail(self, why: str) -> None:
        """Drop this connection for a protocol violation, with one log line naming it."""
        if self.state == _CLOSED or self.reported:
            return  # one line per peer, even when one read held several bad messages
        if self.state == _AUTH:
            self._refuse(why)
            return
        log.error("dropping %s: %s", self, why)
        self.reported = True
        if self.transport is not None:
            self.transport.abort()

    def _refuse(self, why: str) -> None:
        """Drop a peer that failed authentication, with one log line naming it."""
        log.error("refusing %s before INIT: authentication failed: %s", self, why)
        self.state = _CLOSED  # no second line from connection_lost or later events
        if self.transport is not None:
            self.transport.abort()

    def _authenticated(self, proof: bytes) -> None:
        # _AUTH is entered only when the hub has a secret, with a fresh nonce.
        auth, nonce = self.hub.auth, self._nonce
        if auth is None or nonce is None or not auth.verify(nonce, proof):
            self._refuse("wrong MXHPROOF (the driver's secret differs from the hub's)")
            return
        self._nonce = None
        self.state = _PROBE
        self._cancel_handshake()
        log.debug("%s authenticated", self)
        if self.batch is not None:  # its MXHHELLO arrived before the proof
            self.transport.write(wire.encode_welcome(self.batch))
        self.transport.write(_STATUS_BYTES)
        self._arm(self.hub.handshake_timeout)

    def _arm(self, seconds: float | None) -> None:
        """Expect the answer within ``seconds`` (None: no deadline; a dead peer is then
        noticed by its connection, see :mod:`maxwellhub.liveness`)."""
        if seconds is not None:
            self._handshake_timer = self.loop.call_later(seconds, self._expired, seconds)

    def _expired(self, seconds: float) -> None:
        if self.state == _AUTH:
            self.fail(f"no MXHPROOF within {seconds:g} s")
        elif self.state == _PROBE:
            self.fail(f"no answer to STATUS within {seconds:g} s")
        elif self.state == _INIT:
            self.fail(f"no answer to STATUS within {seconds:g} s after INIT")
        elif self.state == _REPLAY:
            self.fail(f"a replayed step not answered within {seconds:g} s")

    def _on_event(self, event: wire.Event) -> None:
        """Dispatch one decoded message by the state this connection is in; a message
        the state does not expect drops the connection."""
        handler = _BY_STATE.get(self.state)
        if handler is None or not handler(self, event):
            self._unexpected(event)

    def _unexpected(self, event: wire.Event) -> None:
        name = _EVENT_NAMES.get(type(event), type(event).__name__)
        self.fail(f"unexpected {name} while {_EXPECTING[self.state]}")

    # Each _on_<state> returns False for a message that state does not expect.

    def _on_busy(self, event: wire.Event) -> bool:
        if isinstance(event, wire.ForceReady) and self.batch is None:
            if event.forces.shape[0] != 1:
                self.fail(
                    f"SOURCEREADY carries nat = {event.forces.shape[0]}, the EM profile needs 1"
                )
                return True
            self.state = _READY
            sx, sy, sz = event.forces[0].tolist()
            self.hub._source_ready(self, sx, sy, sz, event.extras)
        elif isinstance(event, wire.SourcesBatch) and self.batch is not None:
            self.state = _READY
            self.hub._sources_batch(self, event)
        else:
            return False
        return True

    def _on_init(self, event: wire.Event) -> bool:
        if isinstance(event, wire.Ready):
            self._cancel_handshake()
            self.hub._driver_ready(self)
        elif isinstance(event, wire.Resume) and self.resume_step is None:
            if event.molecules != self.size:
                self.fail(
                    f"MXHRESUME for {event.molecules} molecule(s); the connection hosts {self.size}"
                )
                return True
            self.resume_step = event.step
        elif isinstance(event, wire.NeedInit) and not self.init_needed:
            return self._on_stock_event(event)
        else:
            return False
        return True

    def _on_replay(self, event: wire.Event) -> bool:
        if not isinstance(event, wire.ForceReady | wire.SourcesBatch):
            return False
        if isinstance(event, wire.ForceReady) != (self.batch is None):
            self.fail(f"{_EVENT_NAMES[type(event)]} while being replayed missed steps")
            return True
        self.send_replay()
        return True

    def _on_probe(self, event: wire.Event) -> bool:
        if isinstance(event, wire.Ready | wire.NeedInit):
            self.state = _UNBOUND
            self._cancel_handshake()
            if isinstance(event, wire.Ready):
                self._ready_before_init()
            self.hub._driver_available(self)
        elif isinstance(event, wire.Claim) and self.claim is None:
            if event.molecules != self.size:
                self.fail(
                    f"MXHCLAIM for {event.molecules} molecule(s); the connection hosts {self.size}"
                )
                return True
            self.claim = list(range(event.first, event.first + event.molecules))
        elif isinstance(event, wire.Hello) and self.batch is None:
            self.batch = self.decoder.batch = event.molecules
            keep_freed_memory(event.molecules)
            widen_socket_buffers(self.transport.get_extra_info("socket"), event.molecules)
            self.transport.write(wire.encode_welcome(event.molecules))
        else:
            return False
        return True

    def _on_auth(self, event: wire.Event) -> bool:
        if isinstance(event, wire.AuthProof):
            self._authenticated(event.proof)
        elif isinstance(event, wire.Hello) and self.batch is None:
            # An ensemble driver speaks first; MXHWELCOME waits for its proof.
            self.batch = self.decoder.batch = event.molecules
            keep_freed_memory(event.molecules)
            widen_socket_buffers(self.transport.get_extra_info("socket"), event.molecules)
        else:
            return False
        return True

    def _on_closing(self, event: wire.Event) -> bool:
        if isinstance(event, wire.Bye):
            if self.bye is not None and not self.bye.done():
                self.bye.set_result(True)
            self.transport.close()
        # A source owed for a field sent before STOP (a stop mid-step), or the answer to
        # a STATUS sent before STOP/EXIT: nobody needs it now.
        return isinstance(
            event, wire.Bye | wire.ForceReady | wire.SourcesBatch | wire.Ready | wire.NeedInit
        )

    def _cancel_handshake(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def send_init(self) -> None:
        mols = self.molecules
        first = mols[0]
        payload = dict(first.payload or {})
        if self.batch is not None:
            # Compact for large ensembles: a range when the ids are consecutive (as binding
            # makes them), per-molecule payloads only when they differ.
            ids = [m.id for m in mols]
            if ids == list(range(ids[0], ids[0] + len(ids))):
                payload["molecule_id_range"] = [ids[0], len(ids)]
            else:
                payload["molecule_ids"] = ids
            payloads = [m.payload or {} for m in mols]
            if any(p != payloads[0] for p in payloads):
                payload["payloads"] = payloads
        done, replayable = self.hub._replay_offer(first)
        payload[wire.RESUME_KEY] = {
            "version": wire.RESUME_VERSION,
            "step": done,
            "history": replayable,
        }
        body = json.dumps({**payload, "molecule_id": first.id}, default=_json_default).encode()
        self.state = _INIT
        self.resume_step = None
        self._init_msg = wire.encode_init(first.id, body)
        self._init_resent = False
        self.transport.write((self._init_msg if self.init_needed else b"") + _STATUS_BYTES)
        # The driver sets up its model before it answers (minutes for an SCF): as slow as
        # a step, so the step deadline applies, not the handshake's.
        self._arm(self.hub.timeout)

    def send_replay(self) -> None:
        """Send the next missed step (its answer will be discarded), or, when none is
        left, report the driver initialised."""
        if self.replay and self.stock:
            log.warning(
                "%s: a stock i-PI client is not replayed %d missed step(s)", self, len(self.replay)
            )
            self.replay = []
        if not self.replay:
            self._cancel_handshake()
            self.state = _READY
            self.hub._driver_initialized(self)
            return
        fields = self.replay.pop(0)
        self.state = _REPLAY
        if self.batch is None:
            self.transport.write(
                b"".join((wire.FIELD_STEP_HEAD, fields.astype("<f8").tobytes(), _GETFORCE_HEADER))
            )
        else:
            self.transport.writelines([*wire.fields_batch_parts(fields, 0), _GETFORCE_HEADER])
        self._cancel_handshake()
        self._arm(self.hub.timeout)  # a replayed step is a step

    def send_step(self, barrier: _Barrier) -> None:
        """Send this driver its frozen field(s) of ``barrier`` with GETSOURCE."""
        if self.stock_steps:  # its first step, or a client needing STATUS before each
            self._send_stock_step(barrier)
            return
        self.state = _BUSY
        if self.batch is None:
            r = self.row
            fb = barrier.field_bytes
            if fb is None:
                fb = barrier.field_bytes = barrier.fields.astype("<f8").tobytes()
            self.transport.write(
                b"".join((wire.FIELD_STEP_HEAD, fb[24 * r : 24 * r + 24], _GETFORCE_HEADER))
            )
            return
        flags = (wire.WANT_EXTRAS if barrier.want_extras else 0) | (
            wire.WANT_DIPOLES if barrier.want_dipoles else 0
        )
        self.transport.writelines(
            [*wire.fields_batch_parts(barrier.fields[self.rows], flags), _GETFORCE_HEADER]
        )

    def place(self, layout: _Layout) -> bool:
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
    # on EXIT); one that has not said BYE after _EXIT_AFTER_STOP_S gets EXIT too, which
    # ends an i-PI client that sends JSON extras (it ignores STOP) and reaches nobody else
    # (MaxwellLink's and our drivers stop reading after STOP).

    def _ready_before_init(self) -> None:
        self.init_needed = False
        self._mark_stock("it answered READY before any INIT")

    def _mark_stock(self, why: str) -> None:
        if not self.stock:
            self.stock = True
            log.info("%s is a stock i-PI client (%s): it will get EXIT at the end", self, why)

    def _send_stock_step(self, barrier: _Barrier) -> None:
        """send_step for a connection still learning or needing STATUS before each step."""
        if self.batch is not None:  # MXHHELLO: a maxwellhub ensemble, nothing to learn
            self.stock_steps = False
            self.send_step(barrier)
        elif self.status_each_step:
            self.state = _ASKED
            self._init_resent = False
            self.status_probes += 1
            self.transport.write(_STATUS_BYTES)
        else:  # the first step: it said READY to the last STATUS, so POSDATA is due
            self.state = _LEARNING
            self.transport.write(wire.encode_field_step(barrier.fields[self.row]))

    def _on_stock_event(self, event: wire.Event) -> bool:
        state = self.state
        if isinstance(event, wire.ForceReady) and state in (_LEARNING, _STOCK_BUSY):
            self._stock_source(event)
        elif isinstance(event, wire.Ready | wire.NeedInit) and state == _LEARN:
            if isinstance(event, wire.NeedInit):
                self._mark_stock("it went back to NEEDINIT after FORCEREADY")
                self.status_each_step = True
                log.info("%s: STATUS (and INIT when asked) before every step", self)
            else:
                self.stock_steps = False
                log.debug("%s stays READY: fused steps from now on", self)
            self.state = _READY
            self.hub._driver_initialized(self)  # sends the step due meanwhile, if any
        elif isinstance(event, wire.Ready) and state == _ASKED:
            hub, barrier = self.hub, self.hub._barrier
            if barrier is not None and self.place(barrier.layout) and hub._pending(self, barrier):
                self.state = _STOCK_BUSY
                self.transport.write(wire.encode_field_step(barrier.fields[self.row]))
            else:
                self.state = _READY
        elif (
            isinstance(event, wire.NeedInit) and state in (_ASKED, _INIT) and not self._init_resent
        ):
            # It asks for INIT (again): the one the hub built at binding, then STATUS.
            self._init_resent = self.init_needed = True
            if state == _ASKED:
                self.status_probes += 1
            self.transport.write(self._init_msg + _STATUS_BYTES)
        else:
            return False
        return True

    def _stock_source(self, event: wire.ForceReady) -> None:
        """A stock client's FORCEREADY: its source; after its first, one STATUS to learn
        whether it stays READY."""
        if event.forces.shape[0] != 1:
            self.fail(
                f"FORCEREADY carries nat = {event.forces.shape[0]}, the EM "
                "profile needs 1 (the field is the one atom's position)"
            )
            return
        if self.state == _LEARNING:
            if not event.extras.startswith(b"{"):
                self._mark_stock(f"its extras {event.extras[:16]!r} are not JSON")
            self.state = _LEARN
            self.status_probes += 1
            self.transport.write(_STATUS_BYTES)
        else:
            self.state = _READY
        sx, sy, sz = event.forces[0].tolist()
        self.hub._source_ready(self, sx, sy, sz, event.extras)

    def _exit_after_stop(self) -> None:
        if self.state == _CLOSING and self.bye is not None and not self.bye.done():
            log.info("%s did not answer STOP: sent EXIT", self)
            self.transport.write(_EXIT_BYTES)
            self.bye.set_result(True)

    def send_end(self) -> asyncio.Future:
        """STOP (MaxwellLink dialect, answered by BYE; EXIT follows if no BYE comes) or
        EXIT (a stock i-PI client, or ``Hub(dialect="ipi")``; no answer)."""
        self.bye = self.loop.create_future()
        if self.state == _CLOSED:
            self.bye.set_result(False)
            return self.bye
        if self.state == _AUTH:  # never authenticated: it is told nothing, just closed
            self.state = _CLOSED
            self.transport.abort()
            self.bye.set_result(False)
            return self.bye
        self.state = _CLOSING
        if self.dialect == "ipi" or self.stock:
            self.transport.write(_EXIT_BYTES)
            self.bye.set_result(True)
        else:
            self.transport.write(_STOP_BYTES)
            self.loop.call_later(_EXIT_AFTER_STOP_S, self._exit_after_stop)
        return self.bye


_EVENT_NAMES = {
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
}
_EXPECTING = {
    _AUTH: "waiting for MXHPROOF, the answer to the hub's MXHAUTH challenge",
    _PROBE: "waiting for the answer to STATUS",
    _UNBOUND: "waiting for molecules to bind to (nothing was asked)",
    _BOUND: "bound and waiting for INIT (nothing was asked)",
    _INIT: "waiting for READY after INIT",
    _REPLAY: "waiting for the source of a replayed step",
    _READY: "idle (nothing was asked)",
    _BUSY: "waiting for its source(s)",
    _LEARNING: "waiting for its source (its first step)",
    _LEARN: "waiting for the answer to STATUS after its first source",
    _ASKED: "waiting for the answer to STATUS before a step",
    _STOCK_BUSY: "waiting for its source",
    _CLOSING: "waiting for BYE",
    _CLOSED: "closed",
}
# What each state accepts (see _Driver._on_event); states not listed accept nothing.
_BY_STATE: dict[str, Callable[[_Driver, wire.Event], bool]] = {
    _BUSY: _Driver._on_busy,
    _INIT: _Driver._on_init,
    _REPLAY: _Driver._on_replay,
    _PROBE: _Driver._on_probe,
    _AUTH: _Driver._on_auth,
    _CLOSING: _Driver._on_closing,
    **dict.fromkeys(_STOCK_STATES, _Driver._on_stock_event),
}


class Hub:
    """The asyncio hub. Create it, ``await start()``, register molecules, ``await step()``.

    Parameters mirror :class:`SocketHub`. All coroutines must run on one event loop (the
    one ``start`` ran on). ``auth``: a :class:`maxwellhub.auth.Secret` (see
    :func:`maxwellhub.auth.load_secret`); every driver must then prove it holds the same
    secret (MXHAUTH/MXHPROOF) before STATUS and INIT. ``None`` (default): no
    authentication, and the wire is exactly MaxwellLink's. ``address_file``: a path where
    ``start`` publishes the address (:mod:`maxwellhub.rendezvous`; removed by ``stop``)
    for drivers started with ``maxwellhub-driver --address-file``. ``dialect``: how
    sessions end. ``"maxwelllink"`` (default) decides per connection: EXIT to stock i-PI
    clients (ASE, i-PI), STOP to the others (see the notes above ``_Driver._on_stock_event``);
    ``"ipi"`` sends EXIT to every driver.

    ``timeout`` (default None: no deadline) bounds each step and a driver's INIT; a
    driver that dies is noticed by its connection, not by a deadline
    (:mod:`maxwellhub.liveness`). ``handshake_timeout`` bounds how long a new connection
    may take to authenticate and answer its first STATUS; by default
    :data:`~maxwellhub.liveness.DEFAULT_HANDSHAKE_TIMEOUT` (60 s), or ``timeout`` when that
    is shorter.
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = DEFAULT_PORT,
        unixsocket: str | os.PathLike | None = None,
        timeout: float | None = None,
        *,
        limits: wire.Limits | None = None,
        dialect: str = "maxwelllink",
        backlog: int = 4096,
        auth: Secret | None = None,
        control: str | os.PathLike | None = None,
        history: int = 0,
        max_pending: int | None = None,
        max_spare: int = 256,
        address_file: str | os.PathLike | None = None,
        handshake_timeout: float | None = None,
    ) -> None:
        if dialect not in ("maxwelllink", "ipi"):
            raise UsageError(f"dialect must be 'maxwelllink' or 'ipi', not {dialect!r}")
        self.timeout = check_timeout(timeout)
        handshake = check_timeout(handshake_timeout, "handshake_timeout")
        if handshake is None:
            handshake = min(DEFAULT_HANDSHAKE_TIMEOUT, self.timeout or math.inf)
        #: Seconds a new connection has to authenticate and answer its first STATUS.
        self.handshake_timeout = handshake
        self.host = host or "127.0.0.1"
        self.port = DEFAULT_PORT if port is None else int(port)
        self.unixsocket = None if unixsocket is None else unix_socket_path(unixsocket)
        self.limits = limits or wire.Limits()
        self.dialect = dialect
        self.backlog = backlog
        if auth is not None and not isinstance(auth, Secret):
            raise UsageError(
                "auth must be a maxwellhub.auth.Secret (from load_secret), not "
                f"{type(auth).__name__}"
            )
        self.auth = auth
        self.step_index = 0
        self.paused = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: _Listener | None = None
        self._unix_inode: tuple[int, int] | None = None
        self._molecules: dict[int, _Molecule] = {}
        self._driverless: set[int] = set()  # registered ids with no driver bound
        self._next_id = 0
        self._unbound: deque[_Driver] = deque()
        self._connections: set[_Driver] = set()
        self._handshaking: set[_Driver] = set()  # connected, not yet answered STATUS
        self._accepted = 0
        self._barrier: _Barrier | None = None
        self._layout: _Layout | None = None
        self._generation = 0
        self._changed: asyncio.Future | None = None
        self.control = control  # where to serve maxwellhub.control, or None
        self._control: ControlServer | None = None
        # maxwellhub.rendezvous: written once listening, removed at stop
        self.address_file = None if address_file is None else os.fspath(address_file)
        self._address_run_id: str | None = None
        self._stop_reason: str | None = None
        self._step_ms: deque[float] = deque(maxlen=_STEP_TIMES)
        self._last_to_answer: Counter[int] = Counter()
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise UsageError(f"history must be a whole number of steps >= 0, not {history!r}")
        self.history = history
        self.max_pending = max_pending  # None: max(4096, 2 x registered molecules)
        self.max_spare = max_spare
        self._counts = np.zeros(64, dtype=np.int64)  # completed steps, by molecule slot
        self._replays: deque[_Replay] = deque(maxlen=history or 1)
        self._watched: Iterable[Any] | Callable[[], Iterable[Any]] = ()  # watch_processes

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str | tuple[str, int]:
        """The UNIX socket path, or ``(host, port)`` for TCP."""
        return self.unixsocket if self.unixsocket else (self.host, self.port)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop ``start`` ran on; a :class:`UsageError` before ``start``."""
        if self._loop is None:
            raise UsageError("this Hub is not started: await hub.start() first")
        return self._loop

    async def start(self) -> None:
        """Bind and listen. A live hub already on the same UNIX path is an error."""
        self._loop = asyncio.get_running_loop()
        server: _Listener
        if self.unixsocket:
            path = self.unixsocket
            _clear_stale_unix_socket(path)
            old_umask = os.umask(0o177)  # the socket file is born owner-only (0600)
            try:
                server = self._server = _Listener.unix(self, path)
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
            st = os.stat(path)
            self._unix_inode = (st.st_dev, st.st_ino)
            log.info(
                "hub listening on UNIX socket %s (drivers on this node only; to open it to "
                "other nodes use TCP: host='0.0.0.0' or this node's address, with "
                "auth=load_secret(...))",
                path,
            )
        else:
            server = self._server = _Listener.tcp(self, self.host, self.port)
            self.port = server.sockets[0].getsockname()[1]
            log.info(
                "hub listening on TCP %s:%d (a loopback address serves this node only; to "
                "open it to other nodes bind host='0.0.0.0' or this node's address, with "
                "auth=load_secret(...))",
                self.host,
                self.port,
            )
            if self.auth is None and not is_loopback(self.host):
                log.warning(
                    "hub listening on TCP %s:%d without authentication: any host "
                    "that can reach it may connect (give a secret: auth=load_secret"
                    "(...))",
                    self.host,
                    self.port,
                )
        if self.control is not None:
            from .control import ControlServer  # here: maxwellhub.control imports this module

            control = ControlServer(self, self.control)
            try:
                await control.start()
            except BaseException:
                server.close()
                self._remove_unix_path()
                raise
            self._control = control
        if self.address_file is not None:
            try:
                self._write_address_file()
            except BaseException:
                if self._control is not None:
                    await self._control.close()
                    self._control = None
                server.close()
                self._remove_unix_path()
                raise

    def _write_address_file(self) -> None:
        """Publish the address (and the secret file's location) for drivers started with
        ``--address-file``; see :mod:`maxwellhub.rendezvous`."""
        from .rendezvous import write_address_file

        if self.address_file is None:
            return
        source = self.auth.source if self.auth is not None else None
        info = write_address_file(
            self.address_file,
            address=self.address,
            auth=self.auth is not None,
            secret_file=source if source and os.path.isfile(source) else None,
        )
        self._address_run_id = info.run_id
        log.info("hub address written to %s (run %s)", self.address_file, info.run_id)

    def _new_driver(self) -> _Driver:
        self._accepted += 1
        return _Driver(self, self._accepted)

    def _room_for(self) -> bool:
        """Whether another connection may start its handshake (see ``max_pending``)."""
        cap = self.max_pending or max(_MIN_PENDING_CAP, 2 * len(self._molecules))
        return len(self._handshaking) < cap

    async def graceful_shutdown(self, reason: str | None = None, wait: float = 2.0) -> None:
        """Send STOP (or EXIT) to every driver and wait up to ``wait`` s for their BYE."""
        if reason:
            log.info("shutting down: %s", reason)
        self.paused = True
        if self._server is not None:
            self._server.close()
        byes = [d.send_end() for d in list(self._connections) if d.state != _CLOSING]
        if byes:
            _, pending = await asyncio.wait(byes, timeout=wait)
            if pending:
                names = sorted(str(d) for d in self._connections if d.state == _CLOSING)
                log.warning("no BYE within %.1f s from: %s", wait, ", ".join(names))

    async def stop(self, wait: float = 2.0) -> None:
        """Stop accepting, end every driver politely, close every socket, remove the path."""
        if self._loop is None:
            return
        if self._address_run_id is not None and self.address_file is not None:
            # first, so no new driver is sent here
            from .rendezvous import remove_address_file

            remove_address_file(self.address_file, self._address_run_id)
            self._address_run_id = None
        if self._control is not None:
            control, self._control = self._control, None
            await control.close()
        if not self.paused or any(d.state != _CLOSING for d in self._connections):
            await self.graceful_shutdown(wait=wait)
        for d in list(self._connections):
            if d.transport is not None:
                d._exit_after_stop()  # STOP unanswered: EXIT (an i-PI client ignores STOP)
                d.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # Let connection_lost callbacks run so nothing refers to a dead transport.
        await asyncio.sleep(0)
        self._remove_unix_path()
        if self._barrier is not None:
            self._barrier.wake("stopped")

    def _remove_unix_path(self) -> None:
        if not self.unixsocket or self._unix_inode is None:
            return
        try:
            st = os.stat(self.unixsocket)
            if (st.st_dev, st.st_ino) == self._unix_inode:
                os.unlink(self.unixsocket)
        except FileNotFoundError:
            pass
        self._unix_inode = None

    # ------------------------------------------------------------------ molecules

    def register_molecule(self, molecule_id: int, init: Mapping | None = None) -> None:
        """Reserve a slot for ``molecule_id`` (its driver may connect later)."""
        mid = int(molecule_id)
        if mid in self._molecules:
            raise ValueError(f"Molecule ID {mid} already registered!")
        index = len(self._molecules)
        if index == len(self._counts):
            self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
        mol = self._molecules[mid] = _Molecule(mid, index)
        self._driverless.add(mid)
        if init is not None:
            mol.payload = dict(init)
        self._progress_binds()

    def register_molecule_return_id(self, init: Mapping | None = None) -> int:
        """Reserve a slot with the next free id and return it."""
        while self._next_id in self._molecules:
            self._next_id += 1
        mid = self._next_id
        self.register_molecule(mid, init)
        return mid

    def all_bound(self, molecule_ids: Iterable[int], require_init: bool = True) -> bool:
        """True when every id has a driver (that completed INIT, if ``require_init``)."""
        for mid in molecule_ids:
            mol = self._molecules.get(int(mid))
            if mol is None or mol.driver is None:
                return False
            if require_init and not mol.initialized:
                return False
        return True

    def missing(self, molecule_ids: Iterable[int]) -> list[int]:
        """The ids among ``molecule_ids`` that have no initialised driver."""
        return [
            int(m)
            for m in molecule_ids
            if (mol := self._molecules.get(int(m))) is None or not mol.initialized
        ]

    async def wait_until_bound(
        self,
        init_payloads: Mapping[int, Mapping] | Iterable[int],
        require_init: bool = True,
        timeout: float | None = None,
    ) -> bool:
        """Wait until every id in ``init_payloads`` is bound (and initialised); ids not
        registered yet are registered. True when they are; False when ``timeout`` passed,
        a stop was requested (:meth:`request_stop`) or a process given to
        :meth:`watch_processes` exited.

        ``timeout`` None (the default, as in MaxwellLink) waits until the drivers come,
        however long: who is missing is logged after 30 s, then at doubling intervals up
        to 30 min."""
        payloads = (
            dict(init_payloads)
            if isinstance(init_payloads, Mapping)
            else {int(m): None for m in init_payloads}
        )
        timeout = check_timeout(timeout)
        for mid, payload in payloads.items():
            mol = self._molecules.get(int(mid))
            if mol is None:
                self.register_molecule(int(mid), payload)
            elif payload is not None:
                mol.payload = dict(payload)
        self._progress_binds()
        for mid in payloads:
            self._ensure_init(self._molecules[int(mid)].driver)
        loop = self.loop
        deadline = None if timeout is None else loop.time() + timeout
        ids = list(payloads)
        reports = _Reports(loop, lambda elapsed: self._report_unbound(ids, require_init, elapsed))
        watch = _ExitWatch(self, self._watched() if callable(self._watched) else self._watched)
        try:
            while not self.all_bound(ids, require_init):
                if watch.exited() or not await self._wait_change(deadline):
                    return self.all_bound(ids, require_init)
            return True
        finally:
            reports.cancel()
            watch.close()

    def watch_processes(
        self, processes: Iterable[Any] | Callable[[], Iterable[Any]] | None
    ) -> None:
        """Local driver processes (``subprocess.Popen``, or anything with ``pid`` and
        ``poll()``) whose exit ends every bind wait at once, so a driver that dies before
        it binds or initialises is noticed without a deadline: a collection, or a function
        giving the ones to watch when a wait starts (say, without those already replaced);
        None watches nothing. A process that dies after binding needs no watch: its
        connection closes."""
        self._watched = () if processes is None else processes

    def _report_unbound(self, ids: list[int], require_init: bool, elapsed: float) -> None:
        """One line on who a bind wait still waits for: a WARNING while some molecule has
        no driver, INFO while the drivers are only initialising."""
        absent, starting = [], []
        for mid in ids:
            mol = self._molecules[int(mid)]
            if mol.driver is None:
                absent.append(mid)
            elif require_init and not mol.initialized:
                starting.append(mid)
        if not absent and not starting:
            return
        parts = [f"no driver connected for molecule(s) {_ids_text(absent)}"] if absent else []
        if starting:
            parts.append(f"the drivers of {_ids_text(starting)} are initialising")
        log.log(
            logging.WARNING if absent else logging.INFO,
            "still waiting after %.0f s: %s",
            elapsed,
            "; ".join(parts),
        )

    async def _wait_change(self, deadline: float | None) -> bool:
        """Wait for any binding change until ``deadline`` (loop time; None: no deadline);
        False if the deadline passed or the hub is paused (a stop was requested)."""
        if self.paused:
            return False
        loop = self.loop
        if self._changed is None or self._changed.done():
            self._changed = loop.create_future()
        fut = self._changed
        # shield: a cancelled waiter (Ctrl-C in SocketHub) must not cancel the shared future
        if deadline is None:
            return await asyncio.shield(fut)
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        timer = loop.call_later(remaining, _resolve, fut, False)
        try:
            return await asyncio.shield(fut)
        finally:
            timer.cancel()

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(True)

    # ------------------------------------------------------------------ binding

    def _driver_available(self, driver: _Driver) -> None:
        self._handshaking.discard(driver)
        if len(self._unbound) >= self.max_spare and len(self._driverless) < driver.size:
            # Spare drivers wait for a molecule to free up; a bounded number of them.
            driver.fail(
                f"no free molecule for it and {len(self._unbound)} spare "
                f"driver(s) already waiting (max_spare = {self.max_spare})"
            )
            return
        self._unbound.append(driver)
        self._progress_binds()

    def _progress_binds(self) -> None:
        """Bind waiting anonymous drivers, in connection order, to free molecule ids in
        registration order; an ensemble driver takes as many ids as it hosts. A driver
        that claimed its molecules back (MXHCLAIM) gets them once they are registered and
        free; if another driver holds one of them, it is bound as the others are."""
        if any(d.claim for d in self._unbound):
            self._bind_claims()
        while self._unbound:
            driver = self._unbound[0]
            if driver.state != _UNBOUND:
                self._unbound.popleft()
                continue
            if driver.claim and self._claim_pending(driver.claim):
                self._unbound.rotate(-1)  # its molecules may still be registered
                if all(d.claim and self._claim_pending(d.claim) for d in self._unbound):
                    return
                continue
            free = []
            for mol in self._molecules.values():
                if mol.driver is None:
                    free.append(mol)
                    if len(free) == driver.size:
                        break
            if len(free) < driver.size:
                return
            self._unbound.popleft()
            self._bind(driver, free)

    def _claim_pending(self, claim: list[int]) -> bool:
        """Whether a claim may still be honoured: none of its ids is held by another
        driver, and some is not registered yet."""
        mols = [self._molecules.get(m) for m in claim]
        return any(m is None for m in mols) and all(m is None or m.driver is None for m in mols)

    def _bind_claims(self) -> None:
        for driver in list(self._unbound):
            if driver.state != _UNBOUND or not driver.claim:
                continue
            found = [self._molecules.get(m) for m in driver.claim]
            mols = [m for m in found if m is not None and m.driver is None]
            if len(mols) == len(found):
                self._unbound.remove(driver)
                self._bind(driver, mols)

    def _bind(self, driver: _Driver, mols: list[_Molecule]) -> None:
        for mol in mols:
            mol.driver, mol.initialized = driver, False
            self._driverless.discard(mol.id)
        driver.molecules, driver.state = mols, _BOUND
        driver.rows_generation = -1
        log.info("%s bound%s", driver, " (claimed)" if driver.claim else "")
        self._ensure_init(driver)
        self._notify()

    def _ensure_init(self, driver: _Driver | None) -> None:
        """Send INIT once the payload of every molecule of ``driver`` is known (or a
        step needs it now: then a missing payload is sent as ``{}``)."""
        if driver is None or driver.state != _BOUND:
            return
        barrier = self._barrier
        for mol in driver.molecules:
            if mol.payload is None:
                if barrier is None or mol.id not in barrier.layout.row:
                    return
                mol.payload = {}
        driver.send_init()

    # ------------------------------------------------------------------ continuity

    def _flush_counts(self) -> None:
        """Add the current layout's completed steps to the per-molecule counts (kept as
        one integer per layout while steps run, so a step costs no array operation)."""
        layout = self._layout
        if layout is not None and layout.pending:
            self._counts[layout.index] += layout.pending
            layout.pending = 0

    def _replay_offer(self, mol: _Molecule) -> tuple[int, int]:
        """(steps ``mol`` completed, how many of the latest of them can be replayed)."""
        self._flush_counts()
        done = int(self._counts[mol.index])
        kept = sum(1 for rep in self._replays if mol.id in rep.layout.row)
        return done, min(kept, done)

    def _replay_fields(self, driver: _Driver, start: int, done: int) -> list[np.ndarray] | None:
        """The fields of steps ``start`` .. ``done - 1`` of ``driver``'s molecules (one array
        per step, oldest first), or None if the history does not reach back that far."""
        mols = driver.molecules
        out: list[np.ndarray] = []
        for rep in self._replays:
            row = rep.layout.row
            r = row.get(mols[0].id)
            if r is None or rep.before[r] < start:
                continue
            if driver.batch is None:
                out.append(rep.fields[r : r + 1])
            else:
                rows = [row.get(m.id, -1) for m in mols]
                if min(rows) < 0:
                    return None
                out.append(rep.fields[rows])
        return out if len(out) == done - start else None

    def _driver_ready(self, driver: _Driver) -> None:
        """INIT acknowledged: bring a restored driver to the molecules' current step by
        replaying the steps it missed, then serve it (see the module's continuity notes)."""
        first = driver.molecules[0]
        self._flush_counts()
        done = int(self._counts[first.index])
        start = driver.resume_step
        reported = start is not None
        start = start or 0
        if start > done:
            driver.fail(
                f"MXHRESUME says its state belongs to step {start}, but the hub "
                f"has completed only {done} step(s) of molecule {first.id}"
            )
            return
        if start < done:
            fields = self._replay_fields(driver, start, done)
            if fields is None:
                self._unreplayable(driver, start, done, reported)
            else:
                log.info(
                    "%s: replaying %d missed step(s) %d..%d from the hub's history",
                    driver,
                    len(fields),
                    start,
                    done - 1,
                )
                driver.replay = fields
                driver.send_replay()
                return
        driver.state = _READY
        self._driver_initialized(driver)

    def _unreplayable(self, driver: _Driver, start: int, done: int, reported: bool) -> None:
        """A driver's state is behind and the history does not reach back to it: the
        documented policy is to go on from that state, saying so once."""
        log.warning(
            "%s resumes from step %d (%s) but the hub is at step %d and keeps fields for "
            "replay only from step %d: it continues from its state of step %d, so "
            "continuity is lost for %s",
            driver,
            start,
            "its checkpoint"
            if reported and start
            else "its initial state"
            if reported
            else "it sent no MXHRESUME, so its initial state is assumed",
            done,
            done - self._replay_offer(driver.molecules[0])[1],
            start,
            "it" if driver.batch is None else "these molecules",
        )

    def set_molecule_steps(self, molecule_ids: Iterable[int], step: int) -> None:
        """Declare that the molecules have completed ``step`` steps elsewhere (a relay
        passing on its upstream hub's count): drivers binding them are offered that step."""
        self._flush_counts()
        for m in molecule_ids:
            self._counts[self._molecules[int(m)].index] = int(step)

    def molecule_steps(self, molecule_ids: Iterable[int]) -> np.ndarray:
        """How many steps each molecule has completed (int64 array)."""
        self._flush_counts()
        return np.array(
            [self._counts[self._molecules[int(m)].index] for m in molecule_ids], dtype=np.int64
        )

    def snapshot(self) -> dict[str, np.ndarray]:
        """The hub's part of a run checkpoint, as plain arrays (``np.savez`` them; load
        with ``allow_pickle=False``): the step counter, every molecule's completed steps
        and the replay history. Take it between steps."""
        if self._barrier is not None:
            raise UsageError("snapshot() in the middle of a step; take it between steps")
        self._flush_counts()
        ids = np.fromiter(self._molecules, dtype=np.int64, count=len(self._molecules))
        out = {
            "step_index": np.array(self.step_index, dtype=np.int64),
            "molecule_ids": ids,
            "molecule_steps": self._counts[: len(ids)].copy(),
            "history": np.array(self.history, dtype=np.int64),
            "replays": np.array(len(self._replays), dtype=np.int64),
        }
        for j, rep in enumerate(self._replays):
            out[f"replay{j}_ids"] = rep.layout.ids
            out[f"replay{j}_fields"] = rep.fields
            out[f"replay{j}_before"] = rep.before
        return out

    def restore(self, snapshot: Mapping[str, np.ndarray]) -> None:
        """Continue from :meth:`snapshot`: call it after registering the same molecules and
        before any step. Drivers that then bind are told each molecule's step (INIT) and
        replayed what their checkpoints miss."""
        if self._barrier is not None or self.step_index:
            raise UsageError("restore() must come before the first step")
        try:
            ids = np.asarray(snapshot["molecule_ids"], dtype=np.int64)
            steps = np.asarray(snapshot["molecule_steps"], dtype=np.int64)
            count = int(snapshot["replays"])
            step_index = int(snapshot["step_index"])
        except KeyError as exc:
            raise UsageError(f"hub snapshot lacks {exc.args[0]!r}") from None
        unknown = [int(m) for m in ids.tolist() if int(m) not in self._molecules]
        if unknown or len(ids) != len(self._molecules) or steps.shape != ids.shape:
            raise UsageError(
                f"hub snapshot is of molecules {_ids_text(sorted(ids.tolist()))}; this hub "
                f"registered {_ids_text(sorted(self._molecules))}"
            )
        self._flush_counts()
        for mid, n in zip(ids.tolist(), steps.tolist(), strict=True):
            self._counts[self._molecules[mid].index] = n
        self._replays.clear()
        for j in range(max(0, count - (self.history or 0)), count):
            rids = np.asarray(snapshot[f"replay{j}_ids"], dtype=np.int64)
            fields = np.asarray(snapshot[f"replay{j}_fields"], dtype=np.float64)
            before = np.asarray(snapshot[f"replay{j}_before"], dtype=np.int64)
            if (
                fields.shape != (len(rids), 3)
                or before.shape != rids.shape
                or any(int(m) not in self._molecules for m in rids.tolist())
            ):
                raise UsageError(
                    f"hub snapshot: replay entry {j} is inconsistent "
                    f"(ids {rids.shape}, fields {fields.shape}, "
                    f"before {before.shape})"
                )
            self._generation += 1
            index = np.fromiter(
                (self._molecules[m].index for m in rids.tolist()), dtype=np.intp, count=len(rids)
            )
            self._replays.append(_Replay(_Layout(rids, self._generation, index), fields, before))
        self.step_index = step_index

    def _driver_initialized(self, driver: _Driver) -> None:
        for mol in driver.molecules:
            mol.initialized = True
        barrier = self._barrier
        if barrier is not None and driver.place(barrier.layout) and self._pending(driver, barrier):
            driver.send_step(barrier)  # a replacement gets the frozen field(s)
        self._notify()

    @staticmethod
    def _pending(driver: _Driver, barrier: _Barrier) -> bool:
        """Whether ``driver`` (placed in the barrier's layout) still owes sources."""
        if driver.batch is None:
            return not barrier.done[driver.row]
        return not barrier.done[driver.rows].all()

    def _connection_lost(self, driver: _Driver, previous: str, exc: Exception | None) -> None:
        self._connections.discard(driver)
        self._handshaking.discard(driver)
        mols = [m for m in driver.molecules if m.driver is driver]
        if not mols:
            buffered = driver.decoder.buffered
            if buffered and previous not in (_CLOSING, _CLOSED) and not driver.reported:
                # A peer that leaves half a message behind gets its one line (a peer that
                # merely connects and closes is not worth one).
                log.warning(
                    "%s closed the connection in the middle of a message (%d bytes of it received)",
                    driver,
                    buffered,
                )
            return
        for mol in mols:
            mol.driver = None
            mol.initialized = False
            self._driverless.add(mol.id)
        barrier = self._barrier
        if previous != _CLOSING:
            pending: list[int] = []
            if barrier is not None and driver.place(barrier.layout):
                rows = driver.rows if driver.batch is not None else [driver.row]
                ids, done = barrier.layout.ids[rows], barrier.done[rows]
                pending = ids[~done].tolist()
            log.warning(
                "%s disconnected%s%s",
                driver,
                " in the middle of a step" if pending else "",
                f" ({exc})" if exc else "",
            )
            if pending and barrier is not None:
                barrier.lost.extend(pending)
                if barrier.abort_on_loss:
                    barrier.wake("lost")
        self._progress_binds()
        self._notify()

    def _source_ready(
        self, driver: _Driver, sx: float, sy: float, sz: float, extras: bytes
    ) -> None:
        barrier = self._barrier
        r = driver.row
        if barrier is None or r < 0 or barrier.done[r]:
            driver.fail("SOURCEREADY for a step that was not asked")
            return
        barrier.single[r] = (sx, sy, sz)
        if extras:
            barrier.extras[r] = extras
        barrier.done[r] = True
        barrier.waiting -= 1
        if barrier.waiting == 0:
            barrier.last = driver
            barrier.wake("done")

    def _sources_batch(self, driver: _Driver, event: wire.SourcesBatch) -> None:
        barrier = self._barrier
        rows = driver.rows
        if (
            barrier is None
            or rows is None
            or driver.rows_generation != barrier.layout.generation
            or barrier.done[rows].all()
        ):
            driver.fail("MXHSOURCES for a step that was not asked")
            return
        fresh = int(np.count_nonzero(~barrier.done[rows]))
        barrier.sources[rows] = event.sources
        barrier.done[rows] = True
        if event.extras:
            barrier.batch_extras.append((rows, event.extras))
        barrier.waiting -= fresh
        if barrier.waiting == 0:
            barrier.last = driver
            barrier.wake("done")

    # ------------------------------------------------------------------ barrier

    def _freeze(
        self, ids: np.ndarray, fields: np.ndarray, want_extras: bool, want_dipoles: bool = False
    ) -> _Barrier:
        layout = self._layout
        if layout is None or layout.key != ids.tobytes():
            unknown = [int(m) for m in ids.tolist() if int(m) not in self._molecules]
            if unknown:
                raise UsageError(
                    f"molecule {unknown[0]} is not registered with this hub"
                    + (f" (nor {_ids_text(unknown[1:])})" if len(unknown) > 1 else "")
                )
            if len(set(ids.tolist())) != len(ids):
                raise UsageError("a step names the same molecule twice")
            self._flush_counts()
            self._generation += 1
            index = np.fromiter(
                (self._molecules[m].index for m in ids.tolist()), dtype=np.intp, count=len(ids)
            )
            layout = self._layout = _Layout(ids.copy(), self._generation, index)
        return _Barrier(layout, fields, want_extras, want_dipoles)

    def _begin(
        self,
        ids: np.ndarray | None,
        fields: np.ndarray | None,
        timeout: float | None,
        abort_on_loss: bool,
        want_extras: bool = True,
        want_dipoles: bool = False,
    ) -> _Barrier | None:
        """Freeze (or continue) the step, send what is due; the barrier, or None when
        paused. Synchronous: the caller then waits on ``barrier.waiter`` if set."""
        if self.paused:
            return None
        barrier = self._barrier
        if barrier is None:
            if ids is None or fields is None:
                raise UsageError("no step to continue: give the molecule ids and fields")
            barrier = self._barrier = self._freeze(ids, fields, want_extras, want_dipoles)
        barrier.abort_on_loss = abort_on_loss
        barrier.lost.clear()
        self._progress_binds()
        layout = barrier.layout
        for driver in list(self._connections):  # per connection, not per molecule
            state = driver.state
            if state == _READY:
                if driver.place(layout) and self._pending(driver, barrier):
                    driver.send_step(barrier)
            elif state == _BOUND:
                self._ensure_init(driver)
        if abort_on_loss:
            row, done = layout.row, barrier.done
            barrier.lost.extend(
                m for m in self._driverless if (r := row.get(m)) is not None and not done[r]
            )
        if barrier.waiting and not (abort_on_loss and barrier.lost):
            loop = self.loop
            barrier.waiter = loop.create_future()
            wait = self.timeout if timeout is None else timeout
            now = loop.time()
            barrier.deadline = None if wait is None else now + wait
            if barrier.reports is None:  # the first wait of this step starts the schedule
                barrier.reports = report_delays()
                barrier.report_base = now
                barrier.report_at = now + next(barrier.reports)
            self._arm_step(barrier)
        return barrier

    def _arm_step(self, barrier: _Barrier) -> None:
        """One timer per waiting step: its deadline, or the next report of who is missing
        if that comes first (a step without a deadline only ever reports)."""
        if barrier.deadline is not None and barrier.deadline <= barrier.report_at:
            barrier.timer = self.loop.call_at(barrier.deadline, barrier.wake, "timeout")
        else:
            barrier.timer = self.loop.call_at(barrier.report_at, self._report_step, barrier)

    def _report_step(self, barrier: _Barrier) -> None:
        """Say which molecules a long step waits for: WARNING for those without a driver
        (a replacement is awaited), INFO when their drivers are computing."""
        missing = barrier.missing()
        unbound = [m for m in missing if self._molecules[m].driver is None]
        elapsed = self.loop.time() - barrier.report_base
        if unbound:
            log.warning(
                "step %d: still waiting after %.0f s; no driver connected for molecule(s) %s",
                self.step_index,
                elapsed,
                _ids_text(unbound),
            )
        else:
            log.info(
                "step %d: still waiting after %.0f s for the source of molecule(s) %s "
                "(their drivers are computing)",
                self.step_index,
                elapsed,
                _ids_text(missing),
            )
        if barrier.reports is not None:
            barrier.report_at = barrier.report_base + next(barrier.reports)
        self._arm_step(barrier)

    @staticmethod
    def _disarm(barrier: _Barrier) -> None:
        """Stop waiting on ``barrier`` (its step stays frozen for the next call)."""
        if barrier.timer is not None:
            barrier.timer.cancel()
            barrier.timer = None
        barrier.waiter = None

    def _end(self, barrier: _Barrier | None) -> StepResult | None:
        """After waiting: the result when the step is complete, else None."""
        if barrier is None:
            return None
        self._disarm(barrier)
        if barrier.waiting:
            return None
        self._barrier = None
        self.step_index += 1
        layout = barrier.layout
        if self.history:
            self._flush_counts()
            self._replays.append(
                _Replay(layout, np.array(barrier.fields, np.float64), self._counts[layout.index])
            )
        layout.pending += 1  # added to _counts when they are read (see _flush_counts)
        self._step_ms.append((time.monotonic() - barrier.started) * 1e3)
        if barrier.last is not None and barrier.last.molecules:
            self._note_last(barrier.last.molecules[0].id)
        sources = barrier.sources
        if barrier.single:
            sources[list(barrier.single)] = list(barrier.single.values())
        return StepResult(barrier.layout.ids, sources, barrier.extras, barrier.batch_extras)

    async def _run(
        self, ids, fields, timeout, abort_on_loss, want_extras: bool = True, dipoles: bool = False
    ) -> StepResult | None:
        barrier = self._begin(ids, fields, timeout, abort_on_loss, want_extras, dipoles)
        if barrier is not None and barrier.waiter is not None:
            try:
                await barrier.waiter
            except BaseException:  # cancelled: no timer of this wait may fire into the next
                self._disarm(barrier)
                raise
        return self._end(barrier)

    def _arrays(
        self, requests: Mapping[int, Mapping]
    ) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
        """ids and fields from MaxwellLink's request dict (and INIT payloads it carries)."""
        if self._barrier is not None:
            return None, None  # a frozen step is continued; its fields stay
        ids = np.fromiter((int(k) for k in requests), dtype=np.int64, count=len(requests))
        try:
            efields = [req["efield_au"] for req in requests.values()]
        except (KeyError, TypeError):
            bad = next(
                k
                for k, req in requests.items()
                if not isinstance(req, Mapping) or "efield_au" not in req
            )
            raise UsageError(f"molecule {int(bad)}: request lacks 'efield_au'") from None
        for mid, req in requests.items():
            init = req.get("init")
            mol = self._molecules.get(int(mid))
            if init is not None and mol is not None and mol.payload is None:
                mol.payload = dict(init)
        return ids, _fields_array(ids, efields)

    async def step_barrier(
        self, requests: Mapping[int, Mapping], timeout: float | None = None
    ) -> dict[int, dict]:
        """MaxwellLink's barrier: ``{molid: {"amp": ndarray(3), "extra": bytes}}``, or ``{}``
        when paused, aborted by a lost driver, or incomplete at ``timeout``."""
        ids, fields = self._arrays(requests)
        result = await self._run(ids, fields, timeout, abort_on_loss=True)
        return result.as_dict() if result is not None else {}

    async def step(
        self, requests: Mapping[int, Mapping], timeout: float | None = None, on_lost: str = "wait"
    ) -> dict[int, dict]:
        """The barrier with a deadline. ``on_lost`` is the policy when a molecule has no
        driver: ``"wait"`` for a replacement until ``timeout``, then raise
        :class:`BarrierTimeout` naming the missing molecules; ``"abort"`` raise
        :class:`DriverLost` at once, naming them (the frozen step is kept either way)."""
        abort = _check_policy(on_lost)
        ids, fields = self._arrays(requests)  # validated here, once
        result = await self._run(ids, fields, timeout, abort)
        return self._outcome(result, abort, timeout).as_dict()

    async def step_arrays(
        self,
        ids,
        fields,
        timeout: float | None = None,
        on_lost: str = "wait",
        extras: bool = True,
        dipoles: bool = False,
    ) -> StepResult:
        """The barrier in array form: ``ids`` (N,), ``fields`` (N, 3) a.u. -> a
        :class:`StepResult` (sources row for row). Same policies as :meth:`step`.

        ``extras=False`` tells ensemble drivers not to send their extras arrays;
        ``dipoles=True`` asks them for the dipole arrays at least (``mux_au``, ``muy_au``,
        ``muz_au``, and ``mux_m_au``... when reported; MXHFIELDS flag WANT_DIPOLES), so
        ``extras=False, dipoles=True`` gives the dipoles alone in ``result.extras()``.
        Single drivers send all their extras every step, dipoles included. When dipoles
        were asked and a molecule's did not come (an ensemble driver older than
        WANT_DIPOLES, a model without them), the step is complete (the hub moved on) and
        :class:`ProtocolError` names the molecules."""
        result = await self._step_arrays(ids, fields, timeout, on_lost, extras, dipoles)
        return _checked_dipoles(result, dipoles)

    async def _step_arrays(
        self, ids, fields, timeout: float | None, on_lost: str, extras: bool, dipoles: bool
    ) -> StepResult:
        """:meth:`step_arrays` without the check that the dipoles came (a relay passes
        them upstream as they are; the upstream hub checks)."""
        abort = _check_policy(on_lost)
        if self._barrier is None and ids is not None:
            ids, fields = _as_step_arrays(ids, fields)
        result = await self._run(ids, fields, timeout, abort, extras, dipoles)
        return self._outcome(result, abort, timeout)

    def _outcome(self, result: StepResult | None, abort: bool, timeout: float | None) -> StepResult:
        if result is not None:
            return result
        barrier = self._barrier
        if self._stop_reason is not None:
            raise StopRequested(f"step {self.step_index}: stopped {self._stop_reason}")
        if barrier is None or self.paused:
            raise BarrierTimeout("the hub is stopped; no step can complete")
        if abort and barrier.lost:
            lost = sorted(set(barrier.lost))
            raise DriverLost(
                f"step {self.step_index}: the driver of molecule(s) {lost} is "
                "gone and the policy is to abort",
                lost,
            )
        missing = barrier.missing()
        unbound = [m for m in missing if self._molecules[m].driver is None]
        wait = self.timeout if timeout is None else timeout
        raise BarrierTimeout(
            f"step {self.step_index}: no source from molecule(s) {_ids_text(missing)} "
            f"{within(wait)}"
            + (f"; no driver connected for {_ids_text(unbound)}" if unbound else ""),
            missing,
        )

    def status(self, most: int | None = None) -> dict:
        """A snapshot for humans and the control endpoint. ``most`` caps the ``bound`` and
        ``missing`` id lists (their full lengths are in ``bound_count``/``missing_count``).
        ``time_per_step_ms`` is over the last 10,000 completed steps (first field sent to
        last source received); ``slowest_molecules`` are the ids whose reply most often
        completed a step."""
        bound = sorted(m.id for m in self._molecules.values() if m.initialized)
        missing = sorted(m.id for m in self._molecules.values() if not m.initialized)
        times = self._step_ms
        timing: dict[str, float | None] = {"last": None, "mean": None, "p99": None}
        timing["steps"] = len(times)
        if times:
            arr = np.fromiter(times, dtype=np.float64, count=len(times))
            timing.update(
                last=round(times[-1], 4),
                mean=round(float(arr.mean()), 4),
                p99=round(float(np.percentile(arr, 99)), 4),
            )
        return {
            "step": self.step_index,
            "molecules": len(self._molecules),
            "bound_count": len(bound),
            "missing_count": len(missing),
            "bound": bound if most is None else bound[:most],
            "missing": missing if most is None else missing[:most],
            "connections": len(self._connections),
            # stock i-PI clients (EXIT at the end) and those of them served with STATUS
            # before every step instead of the fused fast path
            "stock_clients": sum(d.stock for d in self._connections),
            "status_each_step": sum(d.status_each_step for d in self._connections),
            "in_step": self._barrier is not None,
            "time_per_step_ms": timing,
            "slowest_molecules": [
                {"id": m, "times_last": n} for m, n in self._last_to_answer.most_common(5)
            ],
        }

    def _note_last(self, mid: int) -> None:
        counts = self._last_to_answer
        counts[mid] += 1
        if len(counts) > _LAST_TO_ANSWER_CAP:  # bounded: keep the leaders
            self._last_to_answer = Counter(dict(counts.most_common(_LAST_TO_ANSWER_CAP // 4)))

    # ------------------------------------------------------------------ control

    @property
    def stop_requested(self) -> str | None:
        """Why a stop was requested (:meth:`request_stop`), or None."""
        return self._stop_reason

    @property
    def control_address(self) -> str | None:
        """The control endpoint as ``maxwellhub status`` takes it, or None."""
        return self._control.describe() if self._control is not None else None

    def request_stop(self, reason: str = "on request") -> None:
        """End the run politely: the current and every later barrier call ends (``step``
        and ``step_arrays`` raise :class:`StopRequested`, ``step_barrier`` returns ``{}``,
        ``wait_until_bound`` returns False). Drivers are left to :meth:`stop`."""
        if self._stop_reason is None:
            self._stop_reason = reason
            log.warning("stop requested %s at step %d", reason, self.step_index)
        self.paused = True
        if self._barrier is not None:
            self._barrier.wake("stopped")
        self._notify()


_ACCEPT_BATCH = 16  # connections accepted per event-loop wake-up
_MIN_PENDING_CAP = 4096  # connections in the handshake before new ones are refused
_REFUSAL_LOG_EVERY = 10.0  # seconds between summary lines about refused connections


class _Listener:
    """The hub's listening socket. It accepts at most ``_ACCEPT_BATCH`` connections per
    wake-up of the event loop (asyncio's own server accepts up to ``backlog`` at once, so
    a connect-and-close flood queued thousands of callbacks ahead of the barrier's
    replies), and closes new connections at once while too many peers are still in the
    handshake (``Hub.max_pending``), with one summary line per 10 s. Same ``close``,
    ``wait_closed`` and ``sockets`` as an ``asyncio.Server``."""

    def __init__(self, hub: Hub, sock: socket.socket) -> None:
        self.hub = hub
        self.sock = sock
        self.sockets = [sock]
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._refused = 0
        self._refused_since = 0.0
        self._paused: asyncio.TimerHandle | None = None
        sock.setblocking(False)
        self.loop = hub.loop
        self.loop.add_reader(sock.fileno(), self._accept)

    @classmethod
    def unix(cls, hub: Hub, path: str) -> _Listener:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(hub.backlog)
        except BaseException:
            sock.close()
            raise
        return cls(hub, sock)

    @classmethod
    def tcp(cls, hub: Hub, host: str, port: int) -> _Listener:
        family, _, _, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(hub.backlog)
        except BaseException:
            sock.close()
            raise
        return cls(hub, sock)

    def _accept(self) -> None:
        hub, loop = self.hub, self.loop
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of descriptors or memory: back off a little
                log.error("accepting connections failed (%s); retrying in 0.1 s", exc)
                loop.remove_reader(self.sock.fileno())
                self._paused = loop.call_later(0.1, self._resume)
                return
            if not hub._room_for():
                conn.close()
                self._note_refusal()
                continue
            conn.setblocking(False)
            task = loop.create_task(loop.connect_accepted_socket(hub._new_driver, conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resume(self) -> None:
        self._paused = None
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _note_refusal(self) -> None:
        now = time.monotonic()
        self._refused += 1
        if now - self._refused_since >= _REFUSAL_LOG_EVERY:
            log.error(
                "refused %d connection(s): %d peers are still in the handshake (max_pending)",
                self._refused,
                len(self.hub._handshaking),
            )
            self._refused, self._refused_since = 0, now

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._paused is not None:
            self._paused.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    async def wait_closed(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class _Reports:
    """Calls ``say(seconds waited)`` on the schedule of
    :func:`maxwellhub.liveness.report_delays` until cancelled (one timer at a time)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, say: Callable[[float], None]) -> None:
        self.loop, self.say = loop, say
        self.start = loop.time()
        self._delays = report_delays()
        self._timer = loop.call_at(self.start + next(self._delays), self._fire)

    def _fire(self) -> None:
        self.say(self.loop.time() - self.start)
        self._timer = self.loop.call_at(self.start + next(self._delays), self._fire)

    def cancel(self) -> None:
        self._timer.cancel()


class _ExitWatch:
    """Wakes a hub's waits (:meth:`Hub._notify`) when one of ``processes`` exits: a pidfd
    per live process, read by the event loop, so nothing polls. Where pidfds are missing
    (not Linux >= 5.3) the exit is still seen by :meth:`exited` at the next wake-up."""

    def __init__(self, hub: Hub, processes: Iterable[Any]) -> None:
        self.hub = hub
        self.processes = list(processes)
        self._fds: list[int] = []
        for proc in self.processes:
            if proc.poll() is not None:
                continue
            try:
                fd = os.pidfd_open(proc.pid)
            except (OSError, AttributeError):  # gone meanwhile, or no pidfd here
                continue
            self._fds.append(fd)
            hub.loop.add_reader(fd, self._exited, fd)

    def _exited(self, fd: int) -> None:
        self.hub.loop.remove_reader(fd)  # a pidfd stays readable once its process exited
        self.hub._notify()

    def exited(self) -> bool:
        return any(proc.poll() is not None for proc in self.processes)

    def close(self) -> None:
        for fd in self._fds:
            self.hub.loop.remove_reader(fd)
            os.close(fd)
        self._fds = []


def _resolve(fut: asyncio.Future, value: object) -> None:
    """Set ``fut``'s result unless it is done already (a timer racing another wake-up)."""
    if not fut.done():
        fut.set_result(value)


def _ids_text(ids: list[int], most: int = 20) -> str:
    """A list of ids for a message, shortened when long."""
    if len(ids) <= most:
        return str(ids)
    return f"{ids[:most]}... ({len(ids)} in all)"


def _check_policy(on_lost: str) -> bool:
    if on_lost not in ("wait", "abort"):
        raise UsageError(f"on_lost must be 'wait' or 'abort', not {on_lost!r}")
    return on_lost == "abort"


def _fields_array(ids: np.ndarray, efields) -> np.ndarray:
    """(N, 3) float64 fields, refusing a wrong shape or a non-finite value by molecule."""
    try:
        fields = np.array(efields, dtype=np.float64)
    except (TypeError, ValueError):
        fields = None
    if fields is None or fields.shape != (len(ids), 3):
        for mid, value in zip(ids.tolist(), efields, strict=True):
            if np.shape(value) != (3,):
                raise UsageError(f"molecule {mid}: efield_au must be 3 numbers, got {value!r}")
        raise UsageError(f"fields must have shape ({len(ids)}, 3)")
    with np.errstate(over="ignore", invalid="ignore"):
        total = fields.sum()  # finite only if every value is: no (N, 3) temporary
    if not np.isfinite(total) and not np.isfinite(fields).all():
        r = int(np.flatnonzero(~np.isfinite(fields).all(axis=1))[0])
        raise UsageError(f"molecule {int(ids[r])}: efield_au is not finite: {fields[r].tolist()}")
    return fields


def widen_socket_buffers(sock: socket.socket | None, molecules: int) -> None:
    """Ask for 4 MB socket buffers (the kernel caps them at net.core.wmem_max/rmem_max)
    on a connection exchanging frames of ``molecules`` >= 10^4 molecules: a 48 MB frame
    then moves in a few large reads instead of hundreds of 200 kB ones."""
    if sock is None or molecules < _KEEP_MEMORY_FROM:
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)


def _is_all_rows(rows: np.ndarray | slice, n: int) -> bool:
    return isinstance(rows, slice) and rows == slice(0, n)


def keep_freed_memory(molecules: int) -> None:
    """Let glibc keep freed memory in a process that exchanges frames of ``molecules``
    molecules, instead of handing it back to the system: every step of a large ensemble
    allocates frames and arrays of tens of MB, and faulting their pages in again each
    step cost more than the model (10^6 TLS molecules: 2 to 3 times slower, in the hub
    and in the driver alike). Applied once the first ensemble of at least 10^4 molecules
    appears; freed memory up to 1 GB then stays with the process (arrays up to 32 MB come
    from the heap instead of fresh mappings). Nothing changes without glibc or with the
    environment variable ``MAXWELLHUB_KEEP_MEMORY=0``."""
    global _kept_memory
    if _kept_memory or molecules < _KEEP_MEMORY_FROM:
        return
    _kept_memory = True
    if os.environ.get("MAXWELLHUB_KEEP_MEMORY", "1") == "0":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    log.debug("glibc keeps freed memory (ensembles of %d molecules)", molecules)


_kept_memory = False
_KEEP_MEMORY_FROM = 10_000
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _checked_dipoles(result: StepResult, dipoles: bool) -> StepResult:
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
            + (f" (and {_ids_text(ids[1:])})" if len(ids) > 1 else "")
            + f" sent no dipole ({', '.join(wire.DIPOLE_KEYS)}) although the step asked for "
            "it (dipoles=True): its driver ignores MXHFIELDS flag WANT_DIPOLES (a "
            "maxwellhub ensemble driver older than it) or its model does not report them"
        )
    return result


def _as_step_arrays(ids, fields) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return ids, _fields_array(ids, fields)


def _clear_stale_unix_socket(path: str) -> None:
    """Remove a leftover socket file only after a probe shows nobody listens on it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise UsageError(f"cannot probe existing socket {path}: {exc}") from exc
        log.info("removing stale socket file %s (nobody listens)", path)
        os.unlink(path)
    else:
        raise UsageError(
            f"another hub is listening on {path}; choose another name or stop that hub first"
        )
    finally:
        probe.close()


class SocketHub:
    """MaxwellLink's synchronous ``SocketHub`` API on top of :class:`Hub`.

    Parameters
    ----------
    host : TCP address to bind (default ``127.0.0.1``); ignored with ``unixsocket``.
    port : TCP port (default 31415; 0 picks a free one, see :attr:`port`).
    unixsocket : a bare name (``/tmp/socketmxl_<name>``) or a path for a UNIX socket.
    timeout : seconds a step may take before ``step_barrier`` returns ``{}`` (``step``
        raises :class:`BarrierTimeout`); None (default) waits as long as the drivers
        compute. A driver that dies is noticed by its connection at once, a vanished host
        within 2 minutes (TCP keepalive, :mod:`maxwellhub.liveness`); a step or bind that
        waits long logs who it waits for. ``wait_until_bound(timeout=None)`` waits until
        the drivers come, whatever this is (as MaxwellLink's does). Every wait ends at
        Ctrl-C (KeyboardInterrupt) and at the control endpoint's stop.
    handshake_timeout : seconds a new connection may take to authenticate and answer its
        first STATUS (default 60, or ``timeout`` when shorter).
    latency : accepted for compatibility with MaxwellLink and ignored: this hub waits on
        events, it never sleeps between polls.
    loop : ``"asyncio"`` (default, or env MAXWELLHUB_LOOP) or ``"uvloop"``: the event loop
        run in the calling thread during each call. uvloop re-creates its signal wake-up
        socket pair on every ``run_until_complete`` in the main thread (measured +35 us per
        step), which is why this facade defaults to the stdlib loop; the async
        :class:`Hub` runs on whatever loop you run it on (``uvloop.run`` recommended).

    control : a name (``/tmp/maxwellhub_control_<name>``), a path, or ``host:port``: serve
        the control endpoint (:mod:`maxwellhub.control`: status, ping, authenticated stop).
        It is served while a method of this object waits, i.e. during every step and bind.

    address_file : a path where the hub publishes its address once listening (a
        :mod:`maxwellhub.rendezvous` file, removed at :meth:`stop`), for drivers started
        with ``maxwellhub-driver --address-file PATH`` (another job, an array job, MPMD).

    On MPI ranks other than 0 the object is inert (no socket, ``step_barrier`` returns
    ``{}``): only rank 0 talks to drivers. Use it as a context manager, or call
    :meth:`stop`.
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = DEFAULT_PORT,
        unixsocket: str | os.PathLike | None = None,
        timeout: float | None = None,
        latency: float = 0.01,
        loop: str | None = None,
        address_file: str | os.PathLike | None = None,
        **options: Any,
    ) -> None:
        self.latency = latency
        self.timeout = timeout
        self._is_master = am_master()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.hub: Hub | None = None
        if not self._is_master:
            return
        self.hub = Hub(host, port, unixsocket, timeout, address_file=address_file, **options)
        self._loop = new_event_loop(loop or os.environ.get("MAXWELLHUB_LOOP") or "asyncio")
        try:
            self._run(self.hub.start())
        except BaseException:
            self._loop.close()
            self._loop = None
            raise

    def _check_no_running_loop(self) -> None:
        if asyncio._get_running_loop() is not None:
            raise UsageError(
                "SocketHub's synchronous methods cannot run inside a running "
                "event loop; use maxwellhub.Hub and await its methods"
            )

    def _run(self, coro):
        loop = self._loop
        if loop is None:
            coro.close()
            raise UsageError("this SocketHub is stopped (or not on MPI rank 0)")
        try:
            self._check_no_running_loop()
        except UsageError:
            coro.close()
            raise
        task = loop.create_task(coro)
        try:
            return loop.run_until_complete(task)
        except BaseException:
            # Interrupted (Ctrl-C raises KeyboardInterrupt out of the loop): end the wait
            # here, so that it does not resume inside a later call.
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(task)
            raise

    # -- attributes
    @property
    def port(self) -> int | None:
        return self.hub.port if self.hub else None

    @property
    def address(self):
        return self.hub.address if self.hub else None

    @property
    def step_index(self) -> int:
        return self.hub.step_index if self.hub else 0

    @property
    def paused(self) -> bool:
        return self.hub.paused if self.hub else True

    @property
    def stop_requested(self) -> str | None:
        return self.hub.stop_requested if self.hub else None

    @property
    def control_address(self) -> str | None:
        return self.hub.control_address if self.hub else None

    # --- MaxwellLink compatibility ---
    # Attributes MaxwellLink 0.5.0's own code reads on its hub, with the same meaning.
    @property
    def unixsocket_path(self) -> str | None:
        """The UNIX socket file the hub listens on (None for TCP), as MaxwellLink's."""
        return self.hub.unixsocket if self.hub else None

    @property
    def expected(self) -> set[int]:
        """The registered molecule ids (a copy: register with ``register_molecule``)."""
        return set(self.hub._molecules) if self.hub else set()

    @property
    def host(self) -> str | None:
        """The TCP address bound (None for a UNIX socket or off rank 0)."""
        return self.hub.host if self.hub and not self.hub.unixsocket else None

    # --- end MaxwellLink compatibility ---

    # -- API
    def register_molecule(self, molecule_id: int, init: Mapping | None = None) -> None:
        if self.hub:
            self.hub.register_molecule(molecule_id, init)

    def register_molecule_return_id(self, init: Mapping | None = None) -> int:
        if self.hub:
            return self.hub.register_molecule_return_id(init)
        raise UsageError("register_molecule_return_id is only available on MPI rank 0")

    def all_bound(self, molecule_ids: Iterable[int], require_init: bool = True) -> bool:
        if self.hub is None:
            return False
        if self._loop is not None and not self._loop.is_closed():
            self._run(asyncio.sleep(0))  # let pending connections and replies be read
        return self.hub.all_bound(molecule_ids, require_init)

    def wait_until_bound(
        self,
        init_payloads,
        require_init: bool = True,
        timeout: float | None = None,
    ) -> bool:
        """See :meth:`Hub.wait_until_bound`: ``timeout`` None waits until the drivers
        come (not the hub's ``timeout``), logging who is missing; it ends early, with
        False, at a stop request or when a watched process exits."""
        if self.hub is None:
            return False
        return self._run(self.hub.wait_until_bound(init_payloads, require_init, timeout))

    def watch_processes(
        self, processes: Iterable[Any] | Callable[[], Iterable[Any]] | None
    ) -> None:
        """See :meth:`Hub.watch_processes` (nothing on ranks other than 0)."""
        if self.hub is not None:
            self.hub.watch_processes(processes)

    def _barrier(
        self, ids, fields, timeout, abort: bool, want_extras: bool = True, dipoles: bool = False
    ):
        """One barrier attempt without a Task: dispatch synchronously, then run the loop
        only until this step's waiter resolves (the hot path of Meep's step callback)."""
        self._check_no_running_loop()
        hub, loop = self._live()
        barrier = hub._begin(ids, fields, timeout, abort, want_extras, dipoles)
        if barrier is not None and barrier.waiter is not None:
            try:
                loop.run_until_complete(barrier.waiter)
            except BaseException:  # Ctrl-C: the step stays frozen, its timer must not fire
                hub._disarm(barrier)
                raise
        return hub._end(barrier)

    def _live(self) -> tuple[Hub, asyncio.AbstractEventLoop]:
        """The hub and its loop; a :class:`UsageError` when stopped or not on rank 0."""
        if self.hub is None or self._loop is None:
            raise UsageError("this SocketHub is stopped (or not on MPI rank 0)")
        return self.hub, self._loop

    def step_barrier(
        self, requests: Mapping[int, Mapping], timeout: float | None = None
    ) -> dict[int, dict]:
        if self.hub is None or self._loop is None:
            return {}  # not rank 0, or stopped: the "paused" case of the contract
        ids, fields = self.hub._arrays(requests)
        result = self._barrier(ids, fields, timeout, True)
        return result.as_dict() if result is not None else {}

    def step(
        self, requests: Mapping[int, Mapping], timeout: float | None = None, on_lost: str = "wait"
    ) -> dict[int, dict]:
        """The barrier with a deadline; see :meth:`Hub.step` (raises instead of ``{}``)."""
        if self.hub is None:
            raise UsageError("step is only available on MPI rank 0")
        abort = _check_policy(on_lost)
        ids, fields = self.hub._arrays(requests)  # validated here, once
        result = self._barrier(ids, fields, timeout, abort)
        return self.hub._outcome(result, abort, timeout).as_dict()

    def step_arrays(
        self,
        ids,
        fields,
        timeout: float | None = None,
        on_lost: str = "wait",
        extras: bool = True,
        dipoles: bool = False,
    ) -> StepResult:
        """The barrier in array form; see :meth:`Hub.step_arrays` (``dipoles`` too)."""
        if self.hub is None or self._loop is None:
            raise UsageError("step_arrays is only available on MPI rank 0 of a running hub")
        abort = _check_policy(on_lost)
        if self.hub._barrier is None and ids is not None:
            ids, fields = _as_step_arrays(ids, fields)
        result = self._barrier(ids, fields, timeout, abort, extras, dipoles)
        return _checked_dipoles(self.hub._outcome(result, abort, timeout), dipoles)

    def status(self) -> dict:
        return self.hub.status() if self.hub else {}

    def molecule_steps(self, molecule_ids: Iterable[int]) -> np.ndarray:
        """See :meth:`Hub.molecule_steps` (an empty array on ranks other than 0)."""
        if self.hub is None:
            return np.zeros(0, dtype=np.int64)
        return self.hub.molecule_steps(molecule_ids)

    def snapshot(self) -> dict[str, np.ndarray]:
        """See :meth:`Hub.snapshot` (``{}`` on ranks other than 0)."""
        return self.hub.snapshot() if self.hub is not None else {}

    def restore(self, snapshot: Mapping[str, np.ndarray]) -> None:
        """See :meth:`Hub.restore` (nothing on ranks other than 0)."""
        if self.hub is not None:
            self.hub.restore(snapshot)

    def graceful_shutdown(self, reason: str | None = None, wait: float = 2.0) -> None:
        if self.hub is not None and self._loop is not None:
            self._run(self.hub.graceful_shutdown(reason, wait))

    def stop(self) -> None:
        """Stop accepting, end drivers (STOP/EXIT, short wait for BYE), close everything."""
        if self.hub is None or self._loop is None:
            return
        loop = self._loop
        try:
            self._run(self.hub.stop())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            self._loop = None
            loop.close()

    def __enter__(self) -> SocketHub:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __del__(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed() and not loop.is_running():
            # Best effort at garbage collection: an error here has nowhere to go.
            with contextlib.suppress(Exception):
                self.stop()
