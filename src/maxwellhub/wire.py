"""Sans-I/O codec for the i-PI family of socket protocols (i-PI, MaxwellLink's EM profile).

Bytes go in with :meth:`Decoder.feed`, events come out; ``encode_*`` functions turn events
into bytes. This module never touches a socket, never converts units and never trusts a
length field: every count read off the wire is checked against :class:`Limits` *before*
any payload is buffered, so a peer cannot make us allocate more than the caps.

Layouts (all little-endian, ``<i4`` integers and ``<f8`` reals; see docs/reference/wire.md):

=============  ==================================================================  ============
message        payload after the 12-byte space-padded header                       bytes
=============  ==================================================================  ============
STATUS         none (reply READY / NEEDINIT / HAVEDATA)                            12
INIT           int32 id, int32 n, n bytes init string                              20 + n
POSDATA        9 f64 cell, 9 f64 inverse cell, int32 nat, 3*nat f64 positions      160 + 24 nat
GETFORCE       none                                                                12
FORCEREADY     f64 energy, int32 nat, 3*nat f64 forces, 9 f64 virial, int32 m, m   100 + 24 nat + m
STOP/BYE/EXIT  none                                                                12
=============  ==================================================================  ============

Cell and virial travel transposed (i-PI keeps lattice vectors as columns): the wire holds
``h.T`` row-major. Events carry the matrices the way i-PI holds them (``h``).

In the EM profile FIELDDATA = POSDATA (identity cells, nat = 1, the position is the field),
GETSOURCE = GETFORCE and SOURCEREADY = FORCEREADY (energy 0, nat 1, the force is dmu/dt).

maxwellhub's own batched frames (version 1), for one driver hosting M molecules. A plain
i-PI or MaxwellLink peer never sees them: only a driver that opens with MXHHELLO is
answered with MXHWELCOME, and only then are batched frames exchanged. Parallel arrays,
one block per quantity, lengths checked against the negotiated M:

==========  =========  ====================================================  ===========
message     direction  payload after the header                              bytes
==========  =========  ====================================================  ===========
MXHHELLO    d -> hub   int32 version, int32 M, int32 flags (0)               24
MXHWELCOME  hub -> d   int32 version, int32 M                                20
MXHFIELDS   hub -> d   int32 M, int32 flags, M f64 Ex, M f64 Ey, M f64 Ez   20 + 24 M
MXHSOURCES  d -> hub   int32 M, M f64 dmux/dt, M f64 dmuy/dt, M f64 dmuz/dt,  20 + 24 M
                       int32 K, K x (int32 n, n bytes ASCII key, M f64)      + sum(4+n+8M)
==========  =========  ====================================================  ===========

A step is MXHFIELDS + GETFORCE (one write); the driver stages on MXHFIELDS and commits
on GETFORCE, answering MXHSOURCES, so a re-sent step is idempotent as with POSDATA.
MXHFIELDS flags (any other bit set is a :class:`ProtocolError` naming the value):

- bit 0, WANT_EXTRAS (1): answer every extras array the model reports;
- bit 1, WANT_DIPOLES (2): answer at least the dipole arrays ``mux_au``, ``muy_au``,
  ``muz_au`` (:data:`DIPOLE_KEYS`), plus ``mux_m_au``, ``muy_m_au``, ``muz_m_au``
  (:data:`DIPOLE_M_KEYS`) when the model reports them; alone, only these (an EM engine
  that needs each molecule's dipole every step, without the cost of all extras);
- neither: K = 0.

An ensemble driver older than WANT_DIPOLES ignores bit 1 and answers K = 0 (or all
extras); the hub then names the molecules whose dipoles did not come (see
:meth:`maxwellhub.hub.Hub.step_arrays`).

maxwellhub's authentication frames (version 1, see :mod:`maxwellhub.auth`). Only a hub
given a secret sends MXHAUTH, as its first message instead of STATUS; nothing else is
exchanged until the driver's MXHPROOF checks out:

==========  =========  ====================================================  ===========
message     direction  payload after the header                              bytes
==========  =========  ====================================================  ===========
MXHAUTH     hub -> d   int32 version, 32 bytes random nonce                  48
MXHPROOF    d -> hub   int32 version, 32 bytes HMAC-SHA256(secret,           48
                       b"maxwellhub-auth-v1" + nonce)
==========  =========  ====================================================  ===========

maxwellhub's resume frame (version 1), for exact continuity when a driver is replaced.
A maxwellhub hub puts ``"mxh_resume": {"version": 1, "step": c, "history": h}`` in the
INIT JSON: ``c`` is how many steps the molecule(s) completed at the hub, ``h`` how many of
the latest steps' fields the hub can replay. Peers that do not know the key ignore it
(MaxwellLink's driver reads only ``dt_au``). A driver that knows it answers, after INIT
and before READY:

==========  =========  ====================================================  ===========
message     direction  payload after the header                              bytes
==========  =========  ====================================================  ===========
MXHRESUME   d -> hub   int32 version, int32 M (molecules), int64 s           28
==========  =========  ====================================================  ===========

A driver that reconnects to a hub that made it that offer before may claim its molecules
back, answering the STATUS probe with MXHCLAIM before NEEDINIT; the hub binds it to them
if they are free (else as usual), so a driver resuming from memory meets its own state:

==========  =========  ====================================================  ===========
MXHCLAIM    d -> hub   int32 version, int32 M (molecules), int64 first id     28
==========  =========  ====================================================  ===========

``s`` is the step its restored state belongs to (0: the initial state, no checkpoint),
``c - h <= s <= c``. The hub then replays the fields of steps s .. c-1 (FIELDDATA or
MXHFIELDS + GETFORCE each, the answers discarded) before the step in flight. A driver
that sends no MXHRESUME is taken to start from its initial state.

maxwellhub's parameter frames (version 1), for model parameter changes and kicks between
steps (see :mod:`maxwellhub.protocol.params` for the JSON). A maxwellhub hub offers them
with ``"mxh_params": {"version": 1, "max_bytes": b}`` in the INIT JSON; a driver that
speaks them answers, after INIT and before READY, MXHPARAMSOK with sequence number 0 and
``{"ok": true}``. Only then does the hub send MXHPARAMS; every MXHPARAMS is answered by
one MXHPARAMSOK with its sequence number:

===========  =========  ===================================================  ===========
message      direction  payload after the header                             bytes
===========  =========  ===================================================  ===========
MXHPARAMS    hub -> d   int32 version, int64 step, int32 n, n bytes JSON     28 + n
MXHPARAMSOK  d -> hub   int32 version, int64 sequence, int32 n, n bytes JSON  28 + n
===========  =========  ===================================================  ===========

``n`` is at most :attr:`Limits.max_params_bytes` (64 KiB by default); the JSON is UTF-8.

maxwellhub's shared-memory lane (version 1, see :mod:`maxwellhub.net.shm_lane`), for an
ensemble driver on the same node as the hub, over a UNIX socket only. The driver offers
it in its MXHHELLO flags: bit 0 (:data:`HELLO_SHM_LANE`), with bits 8..15 the number K of
extras arrays per molecule it may answer (:data:`HELLO_EXTRAS_SHIFT`). The hub answers,
right after MXHWELCOME, with one MXHSHMLANE: ``size > 0`` passes the segment and its two
doorbells as three descriptors (``SCM_RIGHTS``, attached to the frame's first byte);
``size == 0`` (no descriptors) means the hub declines (TCP, or its option off). The driver
maps the segment and answers MXHSHMOK, or MXHSHMNO and stays on batched frames:

==========  =========  ====================================================  ===========
MXHSHMLANE  hub -> d   int32 version, int32 M, int32 K, int32 flags (0),     36
                       int64 segment size (0: declined)
MXHSHMOK    d -> hub   int32 version                                         16
MXHSHMNO    d -> hub   int32 version                                         16
==========  =========  ====================================================  ===========

Once accepted, a step's fields, sources and extras go through the segment and its
doorbells; the socket stays open for everything else (STOP, EXIT, replayed steps) and its
EOF is how either side learns the other died. A plain i-PI or MaxwellLink peer, or an
ensemble driver that does not set bit 0, never sees any of it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ProtocolError

__all__ = [
    "BYE",
    "EXIT",
    "FIELDDATA",
    "FIELD_STEP_HEAD",
    "FIELD_STEP_SIZE",
    "FORCEREADY",
    "GETFORCE",
    "GETSOURCE",
    "HAVEDATA",
    "HEADER_SIZE",
    "INIT",
    "NEEDINIT",
    "POSDATA",
    "READY",
    "SOURCEREADY",
    "SOURCE_READY_PREFIX_SIZE",
    "STATUS",
    "STOP",
    "Bye",
    "Decoder",
    "Event",
    "Exit",
    "ForceReady",
    "GetForce",
    "HaveData",
    "Init",
    "Limits",
    "NeedInit",
    "PosData",
    "ProtocolError",
    "Ready",
    "Status",
    "Stop",
    "encode",
    "encode_field_step",
    "encode_forceready",
    "encode_header",
    "encode_init",
    "encode_posdata",
    "encode_source_ready",
]

HEADER_SIZE = 12

STATUS = b"STATUS"
READY = b"READY"
NEEDINIT = b"NEEDINIT"
HAVEDATA = b"HAVEDATA"
INIT = b"INIT"
POSDATA = b"POSDATA"
GETFORCE = b"GETFORCE"
FORCEREADY = b"FORCEREADY"
STOP = b"STOP"
BYE = b"BYE"
EXIT = b"EXIT"

FIELDDATA = POSDATA
GETSOURCE = GETFORCE
SOURCEREADY = FORCEREADY

MXHHELLO = b"MXHHELLO"
MXHWELCOME = b"MXHWELCOME"
MXHFIELDS = b"MXHFIELDS"
MXHSOURCES = b"MXHSOURCES"
BATCH_VERSION = 1
WANT_EXTRAS = 1
WANT_DIPOLES = 2
FIELDS_FLAGS = WANT_EXTRAS | WANT_DIPOLES  # every MXHFIELDS flag bit this side knows
DIPOLE_KEYS = ("mux_au", "muy_au", "muz_au")
DIPOLE_M_KEYS = ("mux_m_au", "muy_m_au", "muz_m_au")

MXHAUTH = b"MXHAUTH"
MXHPROOF = b"MXHPROOF"
AUTH_VERSION = 1
AUTH_NONCE_SIZE = 32  # also the size of a proof (an HMAC-SHA256 digest)
_AUTH_FRAME = struct.Struct("<12si32s")

MXHRESUME = b"MXHRESUME"
MXHCLAIM = b"MXHCLAIM"
RESUME_VERSION = 1
RESUME_KEY = "mxh_resume"  # the INIT JSON key that offers MXHRESUME
_RESUME_FRAME = struct.Struct("<12siiq")

MXHPARAMS = b"MXHPARAMS"
MXHPARAMSOK = b"MXHPARAMSOK"
PARAMS_VERSION = 1
PARAMS_KEY = "mxh_params"  # the INIT JSON key that offers MXHPARAMS
_PARAMS_HEAD = struct.Struct("<12siqi")
MXHSHMLANE = b"MXHSHMLANE"
MXHSHMOK = b"MXHSHMOK"
MXHSHMNO = b"MXHSHMNO"
SHM_VERSION = 1
HELLO_SHM_LANE = 1  # MXHHELLO flags bit 0: the driver offers the shared-memory lane
HELLO_EXTRAS_SHIFT = 8  # MXHHELLO flags bits 8..15: extras arrays it may answer (K)
SHM_MAX_EXTRAS = 255
_SHM_OFFER = struct.Struct("<12siiiiq")  # version, M, K, flags, segment size
_SHM_ANSWER = struct.Struct("<12si")

_I32 = struct.Struct("<i")
_MIN_BUFFER = 1 << 16
_F64 = struct.Struct("<d")
_3F64 = struct.Struct("<3d")
_MAT = struct.Struct("<9d")
_INIT_HEAD = struct.Struct("<ii")
# FIELDDATA (identity cell and inverse, nat = 1, field) fused with GETSOURCE: 196 bytes.
# SOURCEREADY fixed part: header, energy, nat = 1, dmu/dt, virial, extras length: 124 bytes.
_SOURCE_READY = struct.Struct("<12sdi3d9di")
SOURCE_READY_PREFIX_SIZE = _SOURCE_READY.size

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_IDENTITY_CELLS = _MAT.pack(*_IDENTITY) * 2  # cell and inverse of the EM profile
_EYE = np.eye(3)
_EYE.flags.writeable = False  # shared by every FIELDDATA event
_ZEROS9 = (0.0,) * 9
_MiB = 1 << 20


def encode_header(name: bytes) -> bytes:
    """The 12-byte space-padded header of message ``name``."""
    if len(name) > HEADER_SIZE:
        raise ValueError(f"message name {name!r} is longer than {HEADER_SIZE} bytes")
    return name.ljust(HEADER_SIZE, b" ")


_H = {
    name: encode_header(name)
    for name in (
        STATUS,
        READY,
        NEEDINIT,
        HAVEDATA,
        INIT,
        POSDATA,
        GETFORCE,
        FORCEREADY,
        STOP,
        BYE,
        EXIT,
        MXHHELLO,
        MXHWELCOME,
        MXHFIELDS,
        MXHSOURCES,
        MXHAUTH,
        MXHPROOF,
        MXHRESUME,
        MXHCLAIM,
        MXHPARAMS,
        MXHPARAMSOK,
        MXHSHMLANE,
        MXHSHMOK,
        MXHSHMNO,
    )
}


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps on what a peer may make us read. Violations are :class:`ProtocolError`."""

    max_nat: int = 1
    max_init_bytes: int = _MiB
    max_extras_bytes: int = _MiB
    max_batch: int = 1 << 20  # molecules in one batched frame
    max_extras_keys: int = 64  # extras arrays in one MXHSOURCES
    max_key_bytes: int = 64  # length of one extras key
    max_params_bytes: int = 1 << 16  # JSON of one MXHPARAMS / MXHPARAMSOK


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Status:
    """Hub asks the driver for its state."""


@dataclass(frozen=True, slots=True)
class Ready:
    """Driver is initialised and idle."""


@dataclass(frozen=True, slots=True)
class NeedInit:
    """Driver waits for INIT."""


@dataclass(frozen=True, slots=True)
class HaveData:
    """Driver holds a computed result (between POSDATA and GETFORCE)."""


@dataclass(frozen=True, slots=True)
class GetForce:
    """Hub asks for the result (GETSOURCE in the EM profile)."""


@dataclass(frozen=True, slots=True)
class Stop:
    """MaxwellLink's end of session; the driver answers BYE."""


@dataclass(frozen=True, slots=True)
class Bye:
    """Driver acknowledges STOP."""


@dataclass(frozen=True, slots=True)
class Exit:
    """Stock i-PI end of session; no reply."""


@dataclass(frozen=True, slots=True)
class Init:
    """INIT: an id (molecule id or bead index) and the init string (MaxwellLink: JSON)."""

    ident: int
    payload: bytes = b""


@dataclass(frozen=True, slots=True, eq=False)
class PosData:
    """POSDATA / FIELDDATA. ``cell`` and ``inverse`` are (3, 3) with lattice vectors as
    columns; ``positions`` is (nat, 3). In the EM profile ``positions[0]`` is the field."""

    cell: np.ndarray
    inverse: np.ndarray
    positions: np.ndarray

    @property
    def field(self) -> np.ndarray:
        """The field vector of the EM profile (the first position)."""
        return self.positions[0]


@dataclass(frozen=True, slots=True, eq=False)
class ForceReady:
    """FORCEREADY / SOURCEREADY. ``forces`` is (nat, 3), ``virial`` (3, 3); in the EM
    profile ``forces[0]`` is dmu/dt and ``extras`` the per-step JSON."""

    energy: float
    forces: np.ndarray
    virial: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    extras: bytes = b""

    @property
    def source(self) -> np.ndarray:
        """dmu/dt of the EM profile (the first force)."""
        return self.forces[0]


@dataclass(frozen=True, slots=True)
class Hello:
    """MXHHELLO: a driver offers batched frames for ``molecules`` molecules."""

    version: int
    molecules: int
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Welcome:
    """MXHWELCOME: the hub accepts batched frames for ``molecules`` molecules."""

    version: int
    molecules: int


@dataclass(frozen=True, slots=True, eq=False)
class FieldsBatch:
    """MXHFIELDS: the (M, 3) fields of a batched driver's molecules, a.u.; ``flags``
    bit 0 (WANT_EXTRAS) asks for the extras arrays with the sources, bit 1
    (WANT_DIPOLES) for the dipole arrays at least."""

    fields: np.ndarray
    flags: int = WANT_EXTRAS


@dataclass(frozen=True, slots=True, eq=False)
class SourcesBatch:
    """MXHSOURCES: (M, 3) dmu/dt and per-molecule extras arrays, keyed by name."""

    sources: np.ndarray
    extras: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuthChallenge:
    """MXHAUTH: the hub asks the driver to prove it holds the shared secret."""

    version: int
    nonce: bytes


@dataclass(frozen=True, slots=True)
class AuthProof:
    """MXHPROOF: the driver's HMAC-SHA256 of the challenge (see :mod:`maxwellhub.auth`)."""

    version: int
    proof: bytes


@dataclass(frozen=True, slots=True)
class Resume:
    """MXHRESUME: the restored state of a driver's ``molecules`` belongs to ``step``."""

    version: int
    molecules: int
    step: int


@dataclass(frozen=True, slots=True)
class ShmLane:
    """MXHSHMLANE: the hub's answer to a lane offer; ``size == 0`` declines it, else the
    segment for ``molecules`` molecules and ``extras`` arrays came with the frame."""

    version: int
    molecules: int
    extras: int
    flags: int
    size: int


@dataclass(frozen=True, slots=True)
class ShmAnswer:
    """MXHSHMOK (``accepted``) or MXHSHMNO: the driver's answer to MXHSHMLANE."""

    version: int
    accepted: bool


@dataclass(frozen=True, slots=True)
class Claim:
    """MXHCLAIM: a reconnecting driver asks for molecules ``first .. first+molecules-1``."""

    version: int
    molecules: int
    first: int


@dataclass(frozen=True, slots=True)
class Params:
    """MXHPARAMS: parameter changes and kicks (UTF-8 JSON, see
    :mod:`maxwellhub.protocol.params`) to apply after ``step`` completed steps."""

    version: int
    step: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ParamsAck:
    """MXHPARAMSOK: the answer to the MXHPARAMS numbered ``sequence`` (0: the driver
    accepts the hub's offer of parameter frames), JSON ``{"ok": true}`` or
    ``{"error": "..."}``."""

    version: int
    sequence: int
    payload: bytes


Event = (
    Status
    | Ready
    | NeedInit
    | HaveData
    | GetForce
    | Stop
    | Bye
    | Exit
    | Init
    | PosData
    | ForceReady
    | Hello
    | Welcome
    | FieldsBatch
    | SourcesBatch
    | AuthChallenge
    | AuthProof
    | Resume
    | Claim
    | Params
    | ParamsAck
    | ShmLane
    | ShmAnswer
)

_SIMPLE = {
    STATUS: Status(),
    READY: Ready(),
    NEEDINIT: NeedInit(),
    HAVEDATA: HaveData(),
    GETFORCE: GetForce(),
    STOP: Stop(),
    BYE: Bye(),
    EXIT: Exit(),
}
_SIMPLE_NAME = {type(ev): name for name, ev in _SIMPLE.items()}

# ----------------------------------------------------------------------------- encoding


def _matrix_bytes(name: str, m) -> bytes:
    a = np.asarray(m, dtype=np.float64)
    if a.shape != (3, 3):
        raise ValueError(f"{name} must be 3x3, got shape {a.shape}")
    return np.ascontiguousarray(a.T, dtype="<f8").tobytes()


def _rows3(name: str, v) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{name} must have shape (nat, 3), got {np.shape(v)}")
    return a


def encode_init(ident: int, payload: bytes = b"") -> bytes:
    """INIT with ``ident`` and the raw init string."""
    return _H[INIT] + _INIT_HEAD.pack(int(ident), len(payload)) + bytes(payload)


def encode_posdata(cell, inverse, positions) -> bytes:
    """POSDATA; ``cell``/``inverse`` with lattice vectors as columns, positions (nat, 3)."""
    pos = _rows3("positions", positions)
    return (
        _H[POSDATA]
        + _matrix_bytes("cell", cell)
        + _matrix_bytes("inverse cell", inverse)
        + _I32.pack(pos.shape[0])
        + np.ascontiguousarray(pos, dtype="<f8").tobytes()
    )


def encode_forceready(energy: float, forces, virial=None, extras: bytes = b"") -> bytes:
    """FORCEREADY with forces (nat, 3), virial (3, 3) (zeros if omitted) and extras."""
    f = _rows3("forces", forces)
    vir = _matrix_bytes("virial", np.zeros((3, 3)) if virial is None else virial)
    return (
        _H[FORCEREADY]
        + _F64.pack(float(energy))
        + _I32.pack(f.shape[0])
        + np.ascontiguousarray(f, dtype="<f8").tobytes()
        + vir
        + _I32.pack(len(extras))
        + bytes(extras)
    )


#: The constant first 160 bytes of the 196-byte FIELDDATA+GETSOURCE block: the POSDATA
#: header, identity cell and inverse, nat = 1. Then come the field (24 bytes) and GETSOURCE.
FIELD_STEP_HEAD = _H[POSDATA] + _IDENTITY_CELLS + _I32.pack(1)
FIELD_STEP_SIZE = len(FIELD_STEP_HEAD) + _3F64.size + HEADER_SIZE  # 196


def encode_field_step(field3) -> bytes:
    """The 196-byte FIELDDATA (identity cells, nat 1, the field) + GETSOURCE block."""
    ex, ey, ez = field3
    return b"".join((FIELD_STEP_HEAD, _3F64.pack(float(ex), float(ey), float(ez)), _H[GETFORCE]))


def encode_source_ready(source3, extras: bytes = b"") -> bytes:
    """SOURCEREADY: energy 0, nat 1, dmu/dt, zero virial, then ``extras``."""
    sx, sy, sz = source3
    return _SOURCE_READY.pack(
        _H[FORCEREADY], 0.0, 1, float(sx), float(sy), float(sz), *_ZEROS9, len(extras)
    ) + bytes(extras)


def encode_hello(molecules: int, version: int = BATCH_VERSION, flags: int = 0) -> bytes:
    """MXHHELLO offering batched frames for ``molecules`` molecules."""
    return _H[MXHHELLO] + struct.pack("<iii", version, molecules, flags)


def encode_welcome(molecules: int, version: int = BATCH_VERSION) -> bytes:
    """MXHWELCOME accepting batched frames for ``molecules`` molecules."""
    return _H[MXHWELCOME] + struct.pack("<ii", version, molecules)


def _auth_frame(name: bytes, value: bytes, version: int) -> bytes:
    if len(value) != AUTH_NONCE_SIZE:
        raise ValueError(f"{name.decode()} carries {AUTH_NONCE_SIZE} bytes, not {len(value)}")
    return _AUTH_FRAME.pack(_H[name], version, bytes(value))


def encode_auth_challenge(nonce: bytes, version: int = AUTH_VERSION) -> bytes:
    """MXHAUTH with a 32-byte ``nonce``."""
    return _auth_frame(MXHAUTH, nonce, version)


def encode_resume(step: int, molecules: int = 1, version: int = RESUME_VERSION) -> bytes:
    """MXHRESUME: the driver's restored state of ``molecules`` belongs to ``step``."""
    return _RESUME_FRAME.pack(_H[MXHRESUME], version, molecules, step)


def encode_claim(first: int, molecules: int = 1, version: int = RESUME_VERSION) -> bytes:
    """MXHCLAIM: a reconnecting driver asks for molecules ``first .. first+molecules-1``."""
    return _RESUME_FRAME.pack(_H[MXHCLAIM], version, molecules, first)


def _params_frame(name: bytes, number: int, payload: bytes, version: int) -> bytes:
    payload = bytes(payload)
    return _PARAMS_HEAD.pack(_H[name], version, number, len(payload)) + payload


def encode_params(step: int, payload: bytes, version: int = PARAMS_VERSION) -> bytes:
    """MXHPARAMS: the JSON ``payload`` (changes and kicks) to apply after ``step`` steps."""
    return _params_frame(MXHPARAMS, step, payload, version)


def encode_params_ack(sequence: int, payload: bytes, version: int = PARAMS_VERSION) -> bytes:
    """MXHPARAMSOK: the answer (JSON) to the MXHPARAMS numbered ``sequence``."""
    return _params_frame(MXHPARAMSOK, sequence, payload, version)


def encode_shm_lane(
    molecules: int, extras: int, size: int, flags: int = 0, version: int = SHM_VERSION
) -> bytes:
    """MXHSHMLANE (``size == 0``: the hub declines the lane; send no descriptors)."""
    return _SHM_OFFER.pack(_H[MXHSHMLANE], version, molecules, extras, flags, size)


def encode_shm_answer(accepted: bool, version: int = SHM_VERSION) -> bytes:
    """MXHSHMOK (``accepted``) or MXHSHMNO."""
    return _SHM_ANSWER.pack(_H[MXHSHMOK if accepted else MXHSHMNO], version)


def hello_lane_flags(extras: int) -> int:
    """MXHHELLO flags offering the lane, with ``extras`` arrays per molecule."""
    if not 0 <= extras <= SHM_MAX_EXTRAS:
        raise ValueError(f"a lane carries 0..{SHM_MAX_EXTRAS} extras arrays, not {extras}")
    return HELLO_SHM_LANE | extras << HELLO_EXTRAS_SHIFT


def encode_auth_proof(proof: bytes, version: int = AUTH_VERSION) -> bytes:
    """MXHPROOF with a 32-byte ``proof``."""
    return _auth_frame(MXHPROOF, proof, version)


def _blocks(name: str, rows) -> bytes:
    a = np.asarray(rows, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{name} must have shape (M, 3), got {a.shape}")
    # One block per component: x of every molecule, then y, then z.
    return _I32.pack(a.shape[0]) + np.ascontiguousarray(a.T, dtype="<f8").tobytes()


def fields_batch_parts(fields, flags: int = WANT_EXTRAS) -> list:
    """MXHFIELDS as a list of buffers (for ``writelines``, no concatenation copy)."""
    a = np.asarray(fields, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"fields must have shape (M, 3), got {a.shape}")
    if flags & ~FIELDS_FLAGS:
        raise ValueError(
            f"MXHFIELDS flags {flags} has bits other than WANT_EXTRAS (1) and WANT_DIPOLES (2)"
        )
    # one copy into blocks (x of every molecule, then y, then z), always a fresh array:
    # a transport may keep the view until it is sent
    blocks = np.array(a.T, dtype="<f8", order="C")
    return [_H[MXHFIELDS], struct.pack("<ii", a.shape[0], flags), _bytes_view(blocks)]


def encode_fields_batch(fields, flags: int = WANT_EXTRAS) -> bytes:
    """MXHFIELDS for (M, 3) fields (send GETFORCE right after it)."""
    return b"".join(fields_batch_parts(fields, flags))


def sources_batch_parts(sources, extras=None) -> list:
    """MXHSOURCES as a list of buffers (for ``sendmsg``/``writelines``): views of the
    arrays where they are contiguous already (a column-major ``sources``, (M,) extras),
    so a large frame is not copied before the socket takes it."""
    a = np.asarray(sources, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"sources must have shape (M, 3), got {a.shape}")
    m = a.shape[0]
    blocks = np.ascontiguousarray(a.T, dtype="<f8")  # x of every molecule, then y, then z
    parts: list = [_H[MXHSOURCES], _I32.pack(m), _bytes_view(blocks), _I32.pack(len(extras or {}))]
    for key, values in (extras or {}).items():
        name = key.encode("ascii")
        v = np.ascontiguousarray(values, dtype="<f8")
        if v.shape != (m,):
            raise ValueError(f"extras {key!r} must have shape ({m},), got {v.shape}")
        parts += [_I32.pack(len(name)), name, _bytes_view(v)]
    return parts


def _bytes_view(a: np.ndarray) -> memoryview:
    return a.data.cast("B")


def encode_sources_batch(sources, extras=None) -> bytes:
    """MXHSOURCES for (M, 3) dmu/dt and ``{key: (M,) array}`` extras."""
    return b"".join(sources_batch_parts(sources, extras))


# Each event with a payload -> its encoder (the events without one are in _SIMPLE_NAME).
_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    Init: lambda e: encode_init(e.ident, e.payload),
    PosData: lambda e: encode_posdata(e.cell, e.inverse, e.positions),
    ForceReady: lambda e: encode_forceready(e.energy, e.forces, e.virial, e.extras),
    Hello: lambda e: encode_hello(e.molecules, e.version, e.flags),
    Welcome: lambda e: encode_welcome(e.molecules, e.version),
    FieldsBatch: lambda e: encode_fields_batch(e.fields, e.flags),
    SourcesBatch: lambda e: encode_sources_batch(e.sources, e.extras),
    AuthChallenge: lambda e: encode_auth_challenge(e.nonce, e.version),
    AuthProof: lambda e: encode_auth_proof(e.proof, e.version),
    Resume: lambda e: encode_resume(e.step, e.molecules, e.version),
    Claim: lambda e: encode_claim(e.first, e.molecules, e.version),
    Params: lambda e: encode_params(e.step, e.payload, e.version),
    ParamsAck: lambda e: encode_params_ack(e.sequence, e.payload, e.version),
    ShmLane: lambda e: encode_shm_lane(e.molecules, e.extras, e.size, e.flags, e.version),
    ShmAnswer: lambda e: encode_shm_answer(e.accepted, e.version),
}


def encode(event: Event) -> bytes:
    """Bytes of any event."""
    name = _SIMPLE_NAME.get(type(event))
    if name is not None:
        return _H[name]
    encoder = _ENCODERS.get(type(event))
    if encoder is None:
        raise TypeError(f"not a wire event: {event!r}")
    return encoder(event)


# ----------------------------------------------------------------------------- decoding

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


def _all_finite(values) -> bool:
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

    def feed(self, data) -> list[Event]:
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
    def _parse(self, buf: memoryview, pos: int):
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

    def _params(self, buf: memoryview, pos: int, name: bytes):
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

    def _resume(self, buf: memoryview, pos: int, name: bytes):
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

    def _shm(self, buf: memoryview, pos: int, name: bytes):
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

    def _auth(self, buf: memoryview, pos: int, name: bytes):
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

    def _hello(self, buf: memoryview, pos: int, name: bytes):
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

    def _batch(self, buf: memoryview, pos: int, name: bytes):
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
            end = self._extras_keys(buf, pos, at, m, label, keys)
            if end is None:
                return None, 0
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
        (nat,) = _I32.unpack_from(buf, at)
        if nat < 0 or nat > self._limits.max_nat:
            raise ProtocolError(
                f"{message}: nat = {nat} is outside 0..{self._limits.max_nat} (max_nat)"
            )
        return nat

    def _forceready(self, buf: memoryview, pos: int):
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

    def _posdata(self, buf: memoryview, pos: int):
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

    def _init(self, buf: memoryview, pos: int):
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
