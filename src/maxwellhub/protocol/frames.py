"""The frames of the i-PI family of socket protocols (i-PI, MaxwellLink's EM profile) and
of maxwellhub's extensions: message names, the 12-byte header, versions and flag bits, the
byte layouts, the caps on what a peer may make us read (:class:`Limits`) and the events.

:mod:`maxwellhub.protocol.decoder` turns bytes into these events and
:mod:`maxwellhub.protocol.encoder` events into bytes; :mod:`maxwellhub.protocol.wire` gathers
the three in one namespace (``maxwellhub.wire`` is its old path). The C extensions get the
constants they need from here through Python (:mod:`maxwellhub.net.steadyio` and the
driver's fast loop pass them), so a layout is written down once.

This module only defines: it never touches a socket, never converts units and never parses
or encodes a payload (the one helper, :func:`encode_header`, pads a name).

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

maxwellhub's authentication frames (version 1, see :mod:`maxwellhub.protocol.auth`). Only a hub
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

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import ProtocolError

__all__ = [
    "AUTH_NONCE_SIZE",
    "AUTH_VERSION",
    "BATCH_VERSION",
    "BYE",
    "DIPOLE_KEYS",
    "DIPOLE_M_KEYS",
    "EXIT",
    "FIELDDATA",
    "FIELDS_FLAGS",
    "FIELD_STEP_HEAD",
    "FIELD_STEP_SIZE",
    "FORCEREADY",
    "GETFORCE",
    "GETSOURCE",
    "HAVEDATA",
    "HEADER_SIZE",
    "HELLO_EXTRAS_SHIFT",
    "HELLO_SHM_LANE",
    "INIT",
    "MXHAUTH",
    "MXHCLAIM",
    "MXHFIELDS",
    "MXHHELLO",
    "MXHPARAMS",
    "MXHPARAMSOK",
    "MXHPROOF",
    "MXHRESUME",
    "MXHSHMLANE",
    "MXHSHMNO",
    "MXHSHMOK",
    "MXHSOURCES",
    "MXHWELCOME",
    "NEEDINIT",
    "PARAMS_KEY",
    "PARAMS_VERSION",
    "POSDATA",
    "READY",
    "RESUME_KEY",
    "RESUME_VERSION",
    "SHM_MAX_EXTRAS",
    "SHM_VERSION",
    "SOURCEREADY",
    "SOURCE_READY_PREFIX_SIZE",
    "STATUS",
    "STOP",
    "WANT_DIPOLES",
    "WANT_EXTRAS",
    "AuthChallenge",
    "AuthProof",
    "Bye",
    "Claim",
    "Event",
    "Exit",
    "FieldsBatch",
    "ForceReady",
    "GetForce",
    "HaveData",
    "Hello",
    "Init",
    "Limits",
    "NeedInit",
    "Params",
    "ParamsAck",
    "PosData",
    "ProtocolError",
    "Ready",
    "Resume",
    "ShmAnswer",
    "ShmLane",
    "SourcesBatch",
    "Status",
    "Stop",
    "Welcome",
    "encode_header",
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


#: The constant first 160 bytes of the 196-byte FIELDDATA+GETSOURCE block: the POSDATA
#: header, identity cell and inverse, nat = 1. Then come the field (24 bytes) and GETSOURCE.
FIELD_STEP_HEAD = _H[POSDATA] + _IDENTITY_CELLS + _I32.pack(1)
FIELD_STEP_SIZE = len(FIELD_STEP_HEAD) + _3F64.size + HEADER_SIZE  # 196


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

    cell: npt.NDArray[Any]
    inverse: npt.NDArray[Any]
    positions: npt.NDArray[Any]

    @property
    def field(self) -> npt.NDArray[Any]:
        """The field vector of the EM profile (the first position)."""
        row: npt.NDArray[Any] = self.positions[0]
        return row


@dataclass(frozen=True, slots=True, eq=False)
class ForceReady:
    """FORCEREADY / SOURCEREADY. ``forces`` is (nat, 3), ``virial`` (3, 3); in the EM
    profile ``forces[0]`` is dmu/dt and ``extras`` the per-step JSON."""

    energy: float
    forces: npt.NDArray[Any]
    virial: npt.NDArray[Any] = field(default_factory=lambda: np.zeros((3, 3)))
    extras: bytes = b""

    @property
    def source(self) -> npt.NDArray[Any]:
        """dmu/dt of the EM profile (the first force)."""
        row: npt.NDArray[Any] = self.forces[0]
        return row


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

    fields: npt.NDArray[Any]
    flags: int = WANT_EXTRAS


@dataclass(frozen=True, slots=True, eq=False)
class SourcesBatch:
    """MXHSOURCES: (M, 3) dmu/dt and per-molecule extras arrays, keyed by name."""

    sources: npt.NDArray[Any]
    extras: dict[str, npt.NDArray[Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuthChallenge:
    """MXHAUTH: the hub asks the driver to prove it holds the shared secret."""

    version: int
    nonce: bytes


@dataclass(frozen=True, slots=True)
class AuthProof:
    """MXHPROOF: the driver's HMAC-SHA256 of the challenge (see :mod:`maxwellhub.protocol.auth`)."""

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

_SIMPLE: dict[bytes, Event] = {
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
