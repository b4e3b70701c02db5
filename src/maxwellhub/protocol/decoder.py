"""Bytes into events: the incremental :class:`Decoder` of one direction of a connection.

Bytes go in with :meth:`Decoder.feed` (or straight into :meth:`Decoder.read_buffer` and
:meth:`Decoder.received`), the events of :mod:`maxwellhub.protocol.frames` come out, for
any split of the byte stream. It never touches a socket, never converts units and never
trusts a length field: every count read off the wire is checked against :class:`Limits`
*before* any payload is buffered, so a peer cannot make us allocate more than the caps. A
violation is a :class:`ProtocolError` naming the message and the value; the decoder then
refuses further input. It never unpickles or evaluates what it reads.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable

import numpy as np

from .frames import (
    _3F64,
    _AUTH_FRAME,
    _F64,
    _I32,
    _IDENTITY_CELLS,
    _INIT_HEAD,
    _MAT,
    _PARAMS_HEAD,
    _RESUME_FRAME,
    _SHM_ANSWER,
    _SHM_OFFER,
    _SIMPLE,
    AUTH_VERSION,
    BATCH_VERSION,
    BYE,
    EXIT,
    FIELDS_FLAGS,
    FORCEREADY,
    GETFORCE,
    HAVEDATA,
    HEADER_SIZE,
    INIT,
    MXHAUTH,
    MXHCLAIM,
    MXHFIELDS,
    MXHHELLO,
    MXHPARAMS,
    MXHPARAMSOK,
    MXHPROOF,
    MXHRESUME,
    MXHSHMLANE,
    MXHSHMNO,
    MXHSHMOK,
    MXHSOURCES,
    MXHWELCOME,
    NEEDINIT,
    PARAMS_VERSION,
    POSDATA,
    READY,
    RESUME_VERSION,
    SHM_MAX_EXTRAS,
    SHM_VERSION,
    STATUS,
    STOP,
    AuthChallenge,
    AuthProof,
    Claim,
    Event,
    FieldsBatch,
    ForceReady,
    Hello,
    Init,
    Limits,
    Params,
    ParamsAck,
    PosData,
    ProtocolError,
    Resume,
    ShmAnswer,
    ShmLane,
    SourcesBatch,
    Welcome,
)

__all__ = ["Decoder"]

_Parsed = tuple[Event | None, int]  # an event and the bytes it used, or (None, 0): incomplete

_MIN_BUFFER = 1 << 16
_EYE = np.eye(3)
_EYE.flags.writeable = False  # shared by every FIELDDATA event
# Which messages each side may receive. A missing entry is a protocol error.
_FROM_HUB = frozenset(
    {
        STATUS,
        INIT,
        POSDATA,
        GETFORCE,
        STOP,
        EXIT,
        MXHWELCOME,
        MXHFIELDS,
        MXHAUTH,
        MXHPARAMS,
        MXHSHMLANE,
    }
)
_FROM_DRIVER = frozenset(
    {
        READY,
        NEEDINIT,
        HAVEDATA,
        FORCEREADY,
        BYE,
        MXHHELLO,
        MXHSOURCES,
        MXHPROOF,
        MXHRESUME,
        MXHCLAIM,
        MXHPARAMSOK,
        MXHSHMOK,
        MXHSHMNO,
    }
)
_READERS = {"driver": (_FROM_HUB, "hub"), "hub": (_FROM_DRIVER, "driver")}
_KNOWN = {name.ljust(HEADER_SIZE, b" "): name for name in _FROM_HUB | _FROM_DRIVER}


def _all_finite(values: Iterable[float]) -> bool:
    return all(math.isfinite(x) for x in values)


class Decoder:
    """Incremental decoder of one direction of a connection.

    ``reader="hub"`` decodes what drivers send (READY, NEEDINIT, HAVEDATA, FORCEREADY, BYE);
    ``reader="driver"`` what hubs send (STATUS, INIT, POSDATA, GETFORCE, STOP, EXIT).
    :meth:`feed` accepts any split of the byte stream and returns the complete events. A
    violation raises :class:`ProtocolError`; the decoder then refuses further input.
    """

    __slots__ = ("_accepts", "_buf", "_error", "_len", "_limits", "_sender", "batch")

    def __init__(self, reader: str = "hub", limits: Limits | None = None) -> None:
        if reader not in _READERS:
            raise ValueError(f"reader must be 'hub' or 'driver', not {reader!r}")
        self._accepts, self._sender = _READERS[reader]
        self._limits = limits or Limits()
        # Received bytes are ``_buf[:_len]``. The buffer grows by doubling and is kept:
        # appending a 48 MB frame read by read to a bytearray cost 90 ms (reallocations),
        # copying into room already there costs one memcpy.
        self._buf = bytearray(_MIN_BUFFER)
        self._len = 0
        self._error: ProtocolError | None = None
        #: Molecules per batched frame once negotiated (MXHHELLO/MXHWELCOME); None before.
        self.batch: int | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete message."""
        return self._len

    @property
    def limits(self) -> Limits:
        return self._limits

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Add received bytes; return the events they complete (possibly none)."""
        if self._error is not None:
            raise self._error
        n = len(data)
        self.read_buffer(n)[:n] = data
        return self.received(n)

    def read_buffer(self, size: int = 1 << 18) -> memoryview:
        """Writable room for at least ``size`` bytes after those held, to receive into
        (``recv_into``, asyncio's ``BufferedProtocol.get_buffer``) with no copy; then
        :meth:`received` with the count. The room is valid until that call."""
        start = self._len
        if start + size > len(self._buf):
            grown = bytearray(max(start + size, 2 * len(self._buf)))
            grown[:start] = memoryview(self._buf)[:start]
            self._buf = grown
        return memoryview(self._buf)[start:]

    def received(self, nbytes: int) -> list[Event]:
        """``nbytes`` were written at the start of :meth:`read_buffer`'s room; return
        the events they complete, as :meth:`feed` does."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        end = self._len + nbytes
        view = memoryview(buf)[:end]
        events: list[Event] = []
        pos = 0
        try:
            while end - pos >= HEADER_SIZE:
                ev, used = self._parse(view, pos)
                if ev is None:
                    break
                events.append(ev)
                pos += used
        except ProtocolError as exc:
            self._error = exc
            self._len = 0
            raise
        if pos:  # same length on both sides: a move, never a resize
            buf[: end - pos] = buf[pos:end]
        self._len = end - pos
        return events

    # One parser per message; each returns (event, bytes used) or (None, 0) if incomplete.
    def _parse(self, buf: memoryview, pos: int) -> _Parsed:
        raw = bytes(buf[pos : pos + HEADER_SIZE])
        name = _KNOWN.get(raw)
        if name is None:
            raise ProtocolError(f"unknown message header {raw!r} from the {self._sender}")
        if name not in self._accepts:
            raise ProtocolError(f"message {name.decode()} is not valid from the {self._sender}")
        simple = _SIMPLE.get(name)
        if simple is not None:
            return simple, HEADER_SIZE
        if name == FORCEREADY:
            return self._forceready(buf, pos)
        if name == POSDATA:
            return self._posdata(buf, pos)
        if name == INIT:
            return self._init(buf, pos)
        if name in (MXHHELLO, MXHWELCOME):
            return self._hello(buf, pos, name)
        if name in (MXHAUTH, MXHPROOF):
            return self._auth(buf, pos, name)
        if name in (MXHRESUME, MXHCLAIM):
            return self._resume(buf, pos, name)
        if name in (MXHPARAMS, MXHPARAMSOK):
            return self._params(buf, pos, name)
        if name in (MXHSHMLANE, MXHSHMOK, MXHSHMNO):
            return self._shm(buf, pos, name)
        return self._batch(buf, pos, name)

    def _params(self, buf: memoryview, pos: int, name: bytes) -> _Parsed:
        if len(buf) - pos < _PARAMS_HEAD.size:
            return None, 0
        _, version, number, n = _PARAMS_HEAD.unpack_from(buf, pos)
        label = name.decode()
        if version != PARAMS_VERSION:
            raise ProtocolError(
                f"{label}: parameter-frame version {version}; this side speaks version "
                f"{PARAMS_VERSION}"
            )
        cap = self._limits.max_params_bytes
        if n < 0 or n > cap:
            raise ProtocolError(
                f"{label}: JSON length {n} bytes is outside 0..{cap} (max_params_bytes)"
            )
        if number < 0:
            what = "step" if name == MXHPARAMS else "sequence number"
            raise ProtocolError(f"{label}: {what} {number} is negative")
        total = _PARAMS_HEAD.size + n
        if len(buf) - pos < total:
            return None, 0
        payload = bytes(buf[pos + _PARAMS_HEAD.size : pos + total])
        if name == MXHPARAMS:
            return Params(version, number, payload), total
        return ParamsAck(version, number, payload), total

    def _resume(self, buf: memoryview, pos: int, name: bytes) -> _Parsed:
        if len(buf) - pos < _RESUME_FRAME.size:
            return None, 0
        _, version, m, value = _RESUME_FRAME.unpack_from(buf, pos)
        label = name.decode()
        if version != RESUME_VERSION:
            raise ProtocolError(
                f"{label}: resume version {version}; this side speaks version {RESUME_VERSION}"
            )
        if m < 1 or m > self._limits.max_batch:
            raise ProtocolError(
                f"{label}: M = {m} molecules is outside 1..{self._limits.max_batch} (max_batch)"
            )
        if value < 0:
            raise ProtocolError(
                f"{label}: {'step' if name == MXHRESUME else 'first id'} {value} is negative"
            )
        event = Resume(version, m, value) if name == MXHRESUME else Claim(version, m, value)
        return event, _RESUME_FRAME.size

    def _shm(self, buf: memoryview, pos: int, name: bytes) -> _Parsed:
        frame = _SHM_OFFER if name == MXHSHMLANE else _SHM_ANSWER
        if len(buf) - pos < frame.size:
            return None, 0
        _, version, *rest = frame.unpack_from(buf, pos)
        label = name.decode()
        if version != SHM_VERSION:
            raise ProtocolError(f"{label}: lane version {version}; this side speaks {SHM_VERSION}")
        if name != MXHSHMLANE:
            return ShmAnswer(version, name == MXHSHMOK), frame.size
        m, k, flags, size = rest
        if m < 1 or m > self._limits.max_batch or not 0 <= k <= SHM_MAX_EXTRAS or size < 0:
            raise ProtocolError(f"{label}: M = {m}, K = {k}, size {size} out of range")
        return ShmLane(version, m, k, flags, size), frame.size

    def _auth(self, buf: memoryview, pos: int, name: bytes) -> _Parsed:
        if len(buf) - pos < _AUTH_FRAME.size:
            return None, 0
        _, version, value = _AUTH_FRAME.unpack_from(buf, pos)
        if version != AUTH_VERSION:
            raise ProtocolError(
                f"{name.decode()}: authentication version {version}; this "
                f"side speaks version {AUTH_VERSION}"
            )
        if name == MXHAUTH:
            return AuthChallenge(version, value), _AUTH_FRAME.size
        return AuthProof(version, value), _AUTH_FRAME.size

    def _hello(self, buf: memoryview, pos: int, name: bytes) -> _Parsed:
        size = 24 if name == MXHHELLO else 20
        if len(buf) - pos < size:
            return None, 0
        version, m = struct.unpack_from("<ii", buf, pos + 12)
        if version != BATCH_VERSION:
            raise ProtocolError(
                f"{name.decode()}: batched-frame version {version}; this "
                f"side speaks version {BATCH_VERSION}"
            )
        if m < 1 or m > self._limits.max_batch:
            raise ProtocolError(
                f"{name.decode()}: M = {m} molecules is outside "
                f"1..{self._limits.max_batch} (max_batch)"
            )
        if name == MXHHELLO:
            (flags,) = _I32.unpack_from(buf, pos + 20)
            return Hello(version, m, flags), size
        return Welcome(version, m), size

    def _batch(self, buf: memoryview, pos: int, name: bytes) -> _Parsed:
        avail = len(buf) - pos
        if avail < 16:
            return None, 0
        (m,) = _I32.unpack_from(buf, pos + 12)
        label = name.decode()
        if self.batch is None:
            raise ProtocolError(f"{label} before batched frames were negotiated")
        if m != self.batch:
            raise ProtocolError(f"{label}: M = {m} molecules, negotiated {self.batch}")
        head = 20 if name == MXHFIELDS else 16  # MXHFIELDS carries int32 flags after M
        at = head + 24 * m
        if avail < at:
            return None, 0
        keys: list[tuple[int, int]] = []  # (offset of the key name, its length)
        if name == MXHSOURCES:
            found = self._extras_keys(buf, pos, at, m, label, keys)
            if found is None:
                return None, 0
            end = found
        if name == MXHFIELDS:
            (flags,) = _I32.unpack_from(buf, pos + 16)
            if flags & ~FIELDS_FLAGS:
                raise ProtocolError(
                    f"{label}: flags {flags} has bits other than "
                    "WANT_EXTRAS (1) and WANT_DIPOLES (2)"
                )
        arr = np.frombuffer(buf, "<f8", 3 * m, pos + head).reshape(3, m).T.astype(np.float64)
        if not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
            raise ProtocolError(
                f"{label}: value of molecule index {bad} is not finite {arr[bad].tolist()!r}"
            )
        if name == MXHFIELDS:
            return FieldsBatch(arr, flags), at
        extras = {}
        for offset, n in keys:
            raw = bytes(buf[pos + offset : pos + offset + n])
            try:
                key = raw.decode("ascii")
            except UnicodeDecodeError:
                raise ProtocolError(f"{label}: extras key {raw!r} is not ASCII") from None
            extras[key] = np.frombuffer(buf, "<f8", m, pos + offset + n).astype(np.float64)
        at = end
        return SourcesBatch(arr, extras), at

    def _extras_keys(
        self, buf: memoryview, pos: int, at: int, m: int, label: str, keys: list[tuple[int, int]]
    ) -> int | None:
        """Walk the extras headers of the MXHSOURCES at ``pos`` (its arrays end at
        ``at``), appending (offset, length) of each key to ``keys``: the frame's length,
        or None until the whole frame is here. Nothing is decoded before, so a frame
        arriving in many reads costs one decode, not one per read."""
        avail = len(buf) - pos
        if avail < at + 4:
            return None
        (k,) = _I32.unpack_from(buf, pos + at)
        if k < 0 or k > self._limits.max_extras_keys:
            raise ProtocolError(
                f"{label}: {k} extras arrays is outside "
                f"0..{self._limits.max_extras_keys} (max_extras_keys)"
            )
        end = at + 4
        for _ in range(k):
            if avail < end + 4:
                return None
            (n,) = _I32.unpack_from(buf, pos + end)
            if n < 1 or n > self._limits.max_key_bytes:
                raise ProtocolError(
                    f"{label}: extras key length {n} bytes is outside "
                    f"1..{self._limits.max_key_bytes} (max_key_bytes)"
                )
            keys.append((end + 4, n))
            end += 4 + n + 8 * m
        return None if avail < end else end

    def _nat(self, buf: memoryview, at: int, message: str) -> int:
        nat: int
        (nat,) = _I32.unpack_from(buf, at)
        if nat < 0 or nat > self._limits.max_nat:
            raise ProtocolError(
                f"{message}: nat = {nat} is outside 0..{self._limits.max_nat} (max_nat)"
            )
        return nat

    def _forceready(self, buf: memoryview, pos: int) -> _Parsed:
        avail = len(buf) - pos
        if avail < 24:
            return None, 0
        nat = self._nat(buf, pos + 20, "FORCEREADY")
        m_at = 24 + 24 * nat + 72
        if avail < m_at + 4:
            return None, 0
        (m,) = _I32.unpack_from(buf, pos + m_at)
        if m < 0 or m > self._limits.max_extras_bytes:
            raise ProtocolError(
                f"FORCEREADY: extras length {m} bytes is outside "
                f"0..{self._limits.max_extras_bytes} (max_extras_bytes)"
            )
        total = m_at + 4 + m
        if avail < total:
            return None, 0
        (energy,) = _F64.unpack_from(buf, pos + 12)
        if not math.isfinite(energy):
            raise ProtocolError(f"FORCEREADY: energy is not finite ({energy!r})")
        if nat == 1:
            f = _3F64.unpack_from(buf, pos + 24)
            if not _all_finite(f):
                raise ProtocolError(f"FORCEREADY: source/force is not finite {f!r}")
            forces = np.array((f,), dtype=np.float64)
        else:
            forces = np.frombuffer(buf, "<f8", 3 * nat, pos + 24).astype(np.float64)
            if not np.isfinite(forces).all():
                raise ProtocolError("FORCEREADY: forces are not all finite")
            forces = forces.reshape(nat, 3)
        v = _MAT.unpack_from(buf, pos + m_at - 72)
        if not _all_finite(v):
            raise ProtocolError("FORCEREADY: virial is not finite")
        virial = np.array(v, dtype=np.float64).reshape(3, 3).T.copy()
        extras = bytes(buf[pos + m_at + 4 : pos + total])
        return ForceReady(energy, forces, virial, extras), total

    def _posdata(self, buf: memoryview, pos: int) -> _Parsed:
        avail = len(buf) - pos
        if avail < 160:
            return None, 0
        nat = self._nat(buf, pos + 156, "POSDATA")
        total = 160 + 24 * nat
        if avail < total:
            return None, 0
        if nat == 1 and buf[pos + 12 : pos + 156] == _IDENTITY_CELLS:
            # The EM profile's FIELDDATA: identity cells, one "position" (the field).
            f = _3F64.unpack_from(buf, pos + 160)
            if not _all_finite(f):
                raise ProtocolError(f"POSDATA: field/positions are not finite {list(f)!r}")
            return PosData(_EYE, _EYE, np.array((f,), dtype=np.float64)), total
        mats = np.frombuffer(buf, "<f8", 18, pos + 12).astype(np.float64)
        if not np.isfinite(mats).all():
            raise ProtocolError("POSDATA: cell or inverse cell is not finite")
        positions = np.frombuffer(buf, "<f8", 3 * nat, pos + 160).astype(np.float64)
        if not np.isfinite(positions).all():
            raise ProtocolError(f"POSDATA: field/positions are not finite {positions.tolist()!r}")
        cell = mats[:9].reshape(3, 3).T.copy()
        inverse = mats[9:].reshape(3, 3).T.copy()
        return PosData(cell, inverse, positions.reshape(nat, 3)), total

    def _init(self, buf: memoryview, pos: int) -> _Parsed:
        avail = len(buf) - pos
        if avail < 20:
            return None, 0
        ident, n = _INIT_HEAD.unpack_from(buf, pos + 12)
        if n < 0 or n > self._limits.max_init_bytes:
            raise ProtocolError(
                f"INIT: init string length {n} bytes is outside "
                f"0..{self._limits.max_init_bytes} (max_init_bytes)"
            )
        if avail < 20 + n:
            return None, 0
        return Init(ident, bytes(buf[pos + 20 : pos + 20 + n])), 20 + n
