"""Events into bytes: one ``encode_*`` function per frame of
:mod:`maxwellhub.protocol.frames`, the buffer lists a large batched frame is sent as
(``fields_batch_parts``, ``sources_batch_parts``: views, no concatenation copy) and
:func:`encode`, which takes any event.

Every function checks the shapes it is given and raises :class:`ValueError` naming the
argument; none of them touches a socket, converts units or keeps state between calls.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .frames import (
    _3F64,
    _AUTH_FRAME,
    _F64,
    _H,
    _I32,
    _INIT_HEAD,
    _PARAMS_HEAD,
    _RESUME_FRAME,
    _SHM_ANSWER,
    _SHM_OFFER,
    _SIMPLE_NAME,
    _SOURCE_READY,
    _ZEROS9,
    AUTH_NONCE_SIZE,
    AUTH_VERSION,
    BATCH_VERSION,
    FIELD_STEP_HEAD,
    FIELDS_FLAGS,
    FORCEREADY,
    GETFORCE,
    HELLO_EXTRAS_SHIFT,
    HELLO_SHM_LANE,
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
    PARAMS_VERSION,
    POSDATA,
    RESUME_VERSION,
    SHM_MAX_EXTRAS,
    SHM_VERSION,
    WANT_EXTRAS,
    AuthChallenge,
    AuthProof,
    Claim,
    Event,
    FieldsBatch,
    ForceReady,
    Hello,
    Init,
    Params,
    ParamsAck,
    PosData,
    Resume,
    ShmAnswer,
    ShmLane,
    SourcesBatch,
    Welcome,
)

__all__ = [
    "encode",
    "encode_auth_challenge",
    "encode_auth_proof",
    "encode_claim",
    "encode_field_step",
    "encode_fields_batch",
    "encode_forceready",
    "encode_hello",
    "encode_init",
    "encode_params",
    "encode_params_ack",
    "encode_posdata",
    "encode_resume",
    "encode_shm_answer",
    "encode_shm_lane",
    "encode_source_ready",
    "encode_sources_batch",
    "encode_welcome",
    "fields_batch_parts",
    "hello_lane_flags",
    "sources_batch_parts",
]


def _matrix_bytes(name: str, m: npt.ArrayLike) -> bytes:
    a = np.asarray(m, dtype=np.float64)
    if a.shape != (3, 3):
        raise ValueError(f"{name} must be 3x3, got shape {a.shape}")
    return np.ascontiguousarray(a.T, dtype="<f8").tobytes()


def _rows3(name: str, v: npt.ArrayLike) -> npt.NDArray[np.float64]:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{name} must have shape (nat, 3), got {np.shape(v)}")
    return a


def encode_init(ident: int, payload: bytes = b"") -> bytes:
    """INIT with ``ident`` and the raw init string."""
    return _H[INIT] + _INIT_HEAD.pack(int(ident), len(payload)) + bytes(payload)


def encode_posdata(cell: npt.ArrayLike, inverse: npt.ArrayLike, positions: npt.ArrayLike) -> bytes:
    """POSDATA; ``cell``/``inverse`` with lattice vectors as columns, positions (nat, 3)."""
    pos = _rows3("positions", positions)
    return (
        _H[POSDATA]
        + _matrix_bytes("cell", cell)
        + _matrix_bytes("inverse cell", inverse)
        + _I32.pack(pos.shape[0])
        + np.ascontiguousarray(pos, dtype="<f8").tobytes()
    )


def encode_forceready(
    energy: float, forces: npt.ArrayLike, virial: npt.ArrayLike | None = None, extras: bytes = b""
) -> bytes:
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


def encode_field_step(field3: Iterable[float]) -> bytes:
    """The 196-byte FIELDDATA (identity cells, nat 1, the field) + GETSOURCE block."""
    ex, ey, ez = field3
    return b"".join((FIELD_STEP_HEAD, _3F64.pack(float(ex), float(ey), float(ez)), _H[GETFORCE]))


def encode_source_ready(source3: Iterable[float], extras: bytes = b"") -> bytes:
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


def fields_batch_parts(fields: npt.ArrayLike, flags: int = WANT_EXTRAS) -> list[bytes | memoryview]:
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


def encode_fields_batch(fields: npt.ArrayLike, flags: int = WANT_EXTRAS) -> bytes:
    """MXHFIELDS for (M, 3) fields (send GETFORCE right after it)."""
    return b"".join(fields_batch_parts(fields, flags))


def sources_batch_parts(
    sources: npt.ArrayLike, extras: Mapping[str, npt.ArrayLike] | None = None
) -> list[bytes | memoryview]:
    """MXHSOURCES as a list of buffers (for ``sendmsg``/``writelines``): views of the
    arrays where they are contiguous already (a column-major ``sources``, (M,) extras),
    so a large frame is not copied before the socket takes it."""
    a = np.asarray(sources, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"sources must have shape (M, 3), got {a.shape}")
    m = a.shape[0]
    blocks = np.ascontiguousarray(a.T, dtype="<f8")  # x of every molecule, then y, then z
    parts: list[bytes | memoryview] = [
        _H[MXHSOURCES],
        _I32.pack(m),
        _bytes_view(blocks),
        _I32.pack(len(extras or {})),
    ]
    for key, values in (extras or {}).items():
        name = key.encode("ascii")
        v = np.ascontiguousarray(values, dtype="<f8")
        if v.shape != (m,):
            raise ValueError(f"extras {key!r} must have shape ({m},), got {v.shape}")
        parts += [_I32.pack(len(name)), name, _bytes_view(v)]
    return parts


def _bytes_view(a: npt.NDArray[Any]) -> memoryview:
    return a.data.cast("B")


def encode_sources_batch(
    sources: npt.ArrayLike, extras: Mapping[str, npt.ArrayLike] | None = None
) -> bytes:
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
