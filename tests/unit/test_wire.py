"""Tests of the sans-I/O codec, :mod:`maxwellhub.protocol.wire`.

Golden bytes are written by hand from docs/reference/wire.md with ``struct.pack`` and
literal headers, never with the functions under test. Every decoder is fed whole, one byte
at a time, split at every index, and with trailing partial data.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from _events import as_kind, one
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maxwellhub.errors import ProtocolError
from maxwellhub.protocol import wire
from maxwellhub.protocol.wire import (
    Bye,
    Decoder,
    Exit,
    ForceReady,
    GetForce,
    HaveData,
    Init,
    Limits,
    NeedInit,
    PosData,
    Ready,
    Status,
    Stop,
)

# ----------------------------------------------------------------------------- golden bytes

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
ZEROS9 = (0.0,) * 9
FIELD = (0.125, -2.5, 3.0e-7)
SOURCE = (-1.5e-3, 4.25, 0.0625)
EXTRAS = json.dumps(
    {
        "time_au": 0.5,
        "energy_au": -0.25,
        "mux_au": 0.1,
        "muy_au": 0.0,
        "muz_au": -0.2,
        "Pe": 0.3,
        "Pg": 0.7,
        "Pge_real": 0.01,
        "Pge_imag": -0.02,
    }
).encode()

# The fused FIELDDATA + GETSOURCE block of MaxwellLink's hub (wire.md, session step 3).
FIELD_BLOCK = (
    b"POSDATA     "
    + struct.pack("<9d", *IDENTITY)
    + struct.pack("<9d", *IDENTITY)
    + struct.pack("<i", 1)
    + struct.pack("<3d", *FIELD)
    + b"GETFORCE    "
)

# SOURCEREADY: FORCEREADY with energy 0, nat 1, dmu/dt, zero virial, then the extras.
SOURCE_PREFIX = (
    b"FORCEREADY  "
    + struct.pack("<d", 0.0)
    + struct.pack("<i", 1)
    + struct.pack("<3d", *SOURCE)
    + struct.pack("<9d", *ZEROS9)
    + struct.pack("<i", len(EXTRAS))
)
SOURCE_MSG = SOURCE_PREFIX + EXTRAS

# A non-symmetric cell h (lattice vectors as columns) and what the wire holds: h.T
# row-major, i.e. h read column by column, written out by hand.
CELL = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 10.0]])
CELL_WIRE = (1.0, 4.0, 7.0, 2.0, 5.0, 8.0, 3.0, 6.0, 10.0)
INVERSE = np.array([[0.5, -1.0, 0.25], [2.0, 0.75, -3.0], [1.5, 0.0, 9.0]])
INVERSE_WIRE = (0.5, 2.0, 1.5, -1.0, 0.75, 0.0, 0.25, -3.0, 9.0)
VIRIAL = np.array([[0.1, 0.2, 0.3], [-0.4, -0.5, -0.6], [7.0, 8.0, 9.5]])
VIRIAL_WIRE = (0.1, -0.4, 7.0, 0.2, -0.5, 8.0, 0.3, -0.6, 9.5)
POSITIONS = np.array([[0.5, 1.5, -2.5], [3.0, -4.0, 5.0], [6.5, 7.5, -8.5]])
FORCES = np.array([[-0.5, 0.25, 1.0], [2.0, -3.0, 0.125], [4.0, 5.5, -6.0]])

SIMPLE = [  # (literal header, event, the side that sends it)
    (b"STATUS      ", Status(), "hub"),
    (b"READY       ", Ready(), "driver"),
    (b"NEEDINIT    ", NeedInit(), "driver"),
    (b"HAVEDATA    ", HaveData(), "driver"),
    (b"GETFORCE    ", GetForce(), "hub"),
    (b"STOP        ", Stop(), "hub"),
    (b"BYE         ", Bye(), "driver"),
    (b"EXIT        ", Exit(), "hub"),
]
OTHER_SIDE = {"hub": "driver", "driver": "hub"}

SMALL = Limits(max_nat=3, max_init_bytes=64, max_extras_bytes=64)


def posdata_bytes(cell_wire, inverse_wire, positions) -> bytes:
    """POSDATA written by hand: header, cell, inverse, nat, positions."""
    flat = [x for row in positions for x in row]
    return (
        b"POSDATA     "
        + struct.pack("<9d", *cell_wire)
        + struct.pack("<9d", *inverse_wire)
        + struct.pack("<i", len(positions))
        + struct.pack(f"<{len(flat)}d", *flat)
    )


def forceready_bytes(energy, forces, virial_wire, extras: bytes) -> bytes:
    """FORCEREADY written by hand: header, energy, nat, forces, virial, m, extras."""
    flat = [x for row in forces for x in row]
    return (
        b"FORCEREADY  "
        + struct.pack("<d", energy)
        + struct.pack("<i", len(forces))
        + struct.pack(f"<{len(flat)}d", *flat)
        + struct.pack("<9d", *virial_wire)
        + struct.pack("<i", len(extras))
        + extras
    )


def init_bytes(ident: int, payload: bytes) -> bytes:
    """INIT written by hand: header, id, n, the string."""
    return b"INIT        " + struct.pack("<ii", ident, len(payload)) + payload


# ----------------------------------------------------------------------------- helpers


def same_event(a, b) -> bool:
    """Events equal, arrays compared element-wise."""
    if type(a) is not type(b):
        return False
    if isinstance(a, PosData):
        return (
            np.array_equal(a.cell, b.cell)
            and np.array_equal(a.inverse, b.inverse)
            and np.array_equal(a.positions, b.positions)
        )
    if isinstance(a, ForceReady):
        return (
            a.energy == b.energy
            and np.array_equal(a.forces, b.forces)
            and np.array_equal(a.virial, b.virial)
            and a.extras == b.extras
        )
    return a == b


def assert_same_events(got, expected) -> None:
    assert len(got) == len(expected), (got, expected)
    for g, e in zip(got, expected, strict=True):
        assert same_event(g, e), (g, e)


def feed_chunks(reader: str, chunks, limits: Limits | None = None) -> list:
    decoder = Decoder(reader, limits)
    events = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    assert decoder.buffered == 0
    return events


def check_every_split(reader: str, data: bytes, expected, limits: Limits | None = None):
    """Decode ``data`` whole, byte by byte, split at every index, and with trailing data."""
    assert_same_events(feed_chunks(reader, [data], limits), expected)
    assert_same_events(
        feed_chunks(reader, [data[i : i + 1] for i in range(len(data))], limits), expected
    )
    for i in range(len(data) + 1):
        assert_same_events(feed_chunks(reader, [data[:i], data[i:]], limits), expected)
    # A complete stream followed by a partial copy of itself: the partial part stays
    # buffered, byte for byte, and completes on the next feed.
    for i in range(1, len(data)):
        decoder = Decoder(reader, limits)
        got = decoder.feed(data + data[:i])
        assert decoder.buffered <= i
        got += decoder.feed(data[i:])
        assert decoder.buffered == 0
        assert_same_events(got, list(expected) * 2)


# ----------------------------------------------------------------------------- EM profile


def test_field_block_offsets_by_hand():
    """The hand-built 196-byte FIELDDATA+GETSOURCE block has every field at its offset."""
    assert len(FIELD_BLOCK) == 196
    assert FIELD_BLOCK[0:12] == b"POSDATA     "
    assert struct.unpack("<9d", FIELD_BLOCK[12:84]) == IDENTITY
    assert struct.unpack("<9d", FIELD_BLOCK[84:156]) == IDENTITY
    assert FIELD_BLOCK[156:160] == b"\x01\x00\x00\x00"
    assert struct.unpack("<3d", FIELD_BLOCK[160:184]) == FIELD
    assert FIELD_BLOCK[184:196] == b"GETFORCE    "


def test_field_block_encodes_to_golden_bytes():
    """encode_field_step and encode(PosData)+encode(GetForce) give the golden block."""
    assert wire.encode_field_step(FIELD) == FIELD_BLOCK
    event = PosData(np.eye(3), np.eye(3), np.array([FIELD]))
    assert wire.encode(event) + wire.encode(GetForce()) == FIELD_BLOCK
    assert wire.FIELD_STEP_SIZE == 196


def test_field_block_decodes_to_posdata_and_getforce():
    """The driver decodes the block into PosData (identity cells, the field) and GetForce."""
    events = Decoder("driver").feed(FIELD_BLOCK)
    assert len(events) == 2
    posdata, getforce = events
    assert isinstance(posdata, PosData) and isinstance(getforce, GetForce)
    assert np.array_equal(posdata.cell, np.eye(3))
    assert np.array_equal(posdata.inverse, np.eye(3))
    assert posdata.positions.shape == (1, 3)
    assert tuple(posdata.field) == FIELD


def test_field_block_every_split():
    """The field block decodes the same whole, byte by byte, split anywhere, with trailing data."""
    expected = [PosData(np.eye(3), np.eye(3), np.array([FIELD])), GetForce()]
    check_every_split("driver", FIELD_BLOCK, expected)


def test_source_ready_offsets_by_hand():
    """The hand-built SOURCEREADY has its 124-byte prefix at the documented offsets."""
    assert len(SOURCE_PREFIX) == 124 == wire.SOURCE_READY_PREFIX_SIZE
    assert SOURCE_MSG[0:12] == b"FORCEREADY  "
    assert SOURCE_MSG[12:20] == b"\x00" * 8
    assert SOURCE_MSG[20:24] == b"\x01\x00\x00\x00"
    assert struct.unpack("<3d", SOURCE_MSG[24:48]) == SOURCE
    assert SOURCE_MSG[48:120] == b"\x00" * 72
    assert struct.unpack("<i", SOURCE_MSG[120:124]) == (len(EXTRAS),)
    assert SOURCE_MSG[124:] == EXTRAS


def test_source_ready_encodes_to_golden_bytes():
    """encode_source_ready and encode(ForceReady) give the golden SOURCEREADY."""
    assert wire.encode_source_ready(SOURCE, EXTRAS) == SOURCE_MSG
    assert wire.encode(ForceReady(0.0, np.array([SOURCE]), extras=EXTRAS)) == SOURCE_MSG


def test_source_ready_decodes():
    """The hub decodes SOURCEREADY into energy 0, the source, a zero virial and the extras."""
    (event,) = Decoder("hub").feed(SOURCE_MSG)
    assert isinstance(event, ForceReady)
    assert event.energy == 0.0
    assert event.forces.shape == (1, 3)
    assert tuple(event.source) == SOURCE
    assert np.array_equal(event.virial, np.zeros((3, 3)))
    assert event.extras == EXTRAS
    assert json.loads(event.extras)["mux_au"] == 0.1


def test_source_ready_every_split():
    """SOURCEREADY decodes the same whole, byte by byte, split anywhere, with trailing data."""
    expected = [ForceReady(0.0, np.array([SOURCE]), np.zeros((3, 3)), EXTRAS)]
    check_every_split("hub", SOURCE_MSG, expected)


def test_source_ready_without_extras():
    """SOURCEREADY with m = 0 is exactly the 124-byte prefix."""
    data = SOURCE_PREFIX[:120] + struct.pack("<i", 0)
    check_every_split("hub", data, [ForceReady(0.0, np.array([SOURCE]), np.zeros((3, 3)))])
    assert wire.encode_source_ready(SOURCE) == data


# ----------------------------------------------------------------------------- INIT


@pytest.mark.parametrize(
    ("ident", "payload"),
    [(3, b'{"molecule_id": 3, "dt_au": 0.5}'), (7, b""), (0, b"\x00")],
    ids=["json", "empty", "ase-zero-byte"],
)
def test_init_golden(ident, payload):
    """INIT with JSON, with n = 0 and ASE's one zero byte: golden bytes both ways."""
    data = b"INIT        " + struct.pack("<i", ident) + struct.pack("<i", len(payload)) + payload
    assert len(data) == 20 + len(payload)
    assert data[16:20] == len(payload).to_bytes(4, "little")
    assert wire.encode_init(ident, payload) == data
    assert wire.encode(Init(ident, payload)) == data
    check_every_split("driver", data, [Init(ident, payload)])


def test_init_json_payload_parses():
    """The JSON init string arrives byte for byte and parses back to the dict."""
    payload = b'{"molecule_id": 3, "dt_au": 0.5}'
    event = one(Decoder("driver").feed(init_bytes(3, payload)), Init)
    assert event.ident == 3
    assert json.loads(event.payload) == {"molecule_id": 3, "dt_au": 0.5}


# ----------------------------------------------------------------------------- transpose


@pytest.mark.parametrize("nat", [0, 1, 2, 3])
def test_posdata_non_symmetric_cell(nat):
    """POSDATA holds cell.T row-major on the wire; the event holds the cell itself."""
    data = posdata_bytes(CELL_WIRE, INVERSE_WIRE, POSITIONS[:nat].tolist())
    assert len(data) == 160 + 24 * nat
    event = PosData(CELL, INVERSE, POSITIONS[:nat])
    assert wire.encode(event) == data
    assert wire.encode_posdata(CELL, INVERSE, POSITIONS[:nat]) == data
    got = one(Decoder("driver", Limits(max_nat=3)).feed(data), PosData)
    assert np.array_equal(got.cell, CELL)
    assert np.array_equal(got.inverse, INVERSE)
    assert got.cell[0, 1] == 2.0 and got.cell[1, 0] == 4.0
    check_every_split("driver", data, [event], Limits(max_nat=3))


@pytest.mark.parametrize("nat", [0, 1, 2, 3])
def test_forceready_non_symmetric_virial(nat):
    """FORCEREADY holds virial.T row-major on the wire; the event holds the virial itself."""
    data = forceready_bytes(-1.25, FORCES[:nat].tolist(), VIRIAL_WIRE, b"xyz")
    assert len(data) == 100 + 24 * nat + 3
    event = ForceReady(-1.25, FORCES[:nat], VIRIAL, b"xyz")
    assert wire.encode(event) == data
    got = one(Decoder("hub", Limits(max_nat=3)).feed(data), ForceReady)
    assert np.array_equal(got.virial, VIRIAL)
    assert got.virial[0, 1] == 0.2 and got.virial[1, 0] == -0.4
    assert np.array_equal(got.forces, FORCES[:nat])
    check_every_split("hub", data, [event], Limits(max_nat=3))


# ----------------------------------------------------------------------------- simple messages


@pytest.mark.parametrize(
    ("header", "event", "sender"), SIMPLE, ids=[h.strip().decode() for h, _, _ in SIMPLE]
)
def test_simple_message(header, event, sender):
    """Each bodiless message is 12 space-padded bytes, read only by the side it is sent to."""
    assert len(header) == 12
    assert wire.encode(event) == header
    check_every_split(OTHER_SIDE[sender], header, [event])
    wrong = Decoder(sender)
    with pytest.raises(ProtocolError, match=header.strip().decode()):
        wrong.feed(header)


@pytest.mark.parametrize(
    ("reader", "data"),
    [("hub", init_bytes(1, b"{}")), ("hub", FIELD_BLOCK[:184]), ("driver", SOURCE_MSG)],
    ids=["INIT-to-hub", "POSDATA-to-hub", "FORCEREADY-to-driver"],
)
def test_payload_message_from_wrong_side(reader, data):
    """INIT and POSDATA from a driver, FORCEREADY from a hub, are protocol errors."""
    with pytest.raises(ProtocolError, match="not valid"):
        Decoder(reader).feed(data[:12])


# ----------------------------------------------------------------------------- streams


DRIVER_STREAM = (
    b"STATUS      "
    + init_bytes(3, b'{"molecule_id": 3, "dt_au": 0.5}')
    + b"STATUS      "
    + FIELD_BLOCK
    + b"STOP        "
    + b"EXIT        "
)
DRIVER_EVENTS = [
    Status(),
    Init(3, b'{"molecule_id": 3, "dt_au": 0.5}'),
    Status(),
    PosData(np.eye(3), np.eye(3), np.array([FIELD])),
    GetForce(),
    Stop(),
    Exit(),
]
HUB_STREAM = (
    b"NEEDINIT    "
    + b"READY       "
    + b"HAVEDATA    "
    + SOURCE_MSG
    + b"READY       "
    + SOURCE_PREFIX[:120]
    + struct.pack("<i", 0)
    + b"BYE         "
)
HUB_EVENTS = [
    NeedInit(),
    Ready(),
    HaveData(),
    ForceReady(0.0, np.array([SOURCE]), np.zeros((3, 3)), EXTRAS),
    Ready(),
    ForceReady(0.0, np.array([SOURCE]), np.zeros((3, 3))),
    Bye(),
]


@pytest.mark.parametrize(
    ("reader", "data", "expected"),
    [("driver", DRIVER_STREAM, DRIVER_EVENTS), ("hub", HUB_STREAM, HUB_EVENTS)],
    ids=["driver", "hub"],
)
def test_several_messages_in_one_feed(reader, data, expected):
    """A whole session's stream decodes the same in one feed, byte by byte and split anywhere."""
    check_every_split(reader, data, expected)


@pytest.mark.parametrize(
    ("reader", "message"),
    [
        ("driver", FIELD_BLOCK[:184]),
        ("driver", init_bytes(9, b"abc")),
        ("hub", SOURCE_MSG),
        ("hub", b"READY       "),
    ],
    ids=["posdata", "init", "forceready", "ready"],
)
def test_trailing_partial_stays_buffered(reader, message):
    """A partial message after a whole one stays buffered, exactly, and completes later."""
    for i in range(1, len(message)):
        decoder = Decoder(reader)
        first = decoder.feed(message + message[:i])
        assert len(first) == 1
        assert decoder.buffered == i
        second = decoder.feed(message[i:])
        assert decoder.buffered == 0
        assert_same_events(second, first)


def test_feed_accepts_bytearray_and_memoryview():
    """feed() takes any bytes-like object, as sockets and protocols hand them over."""
    decoder = Decoder("driver")
    events = decoder.feed(bytearray(FIELD_BLOCK[:100]))
    events += decoder.feed(memoryview(FIELD_BLOCK)[100:])
    assert [type(e) for e in events] == [PosData, GetForce]


def test_empty_feed_is_harmless():
    """Feeding no bytes returns no events and changes nothing."""
    decoder = Decoder("hub")
    assert decoder.feed(b"") == []
    assert decoder.feed(b"REA") == []
    assert decoder.feed(b"") == []
    assert decoder.buffered == 3


def test_decoder_rejects_unknown_reader():
    """A reader other than 'hub' or 'driver' is local misuse: ValueError, not ProtocolError."""
    with pytest.raises(ValueError, match="reader") as info:
        Decoder("peer")
    assert not isinstance(info.value, ProtocolError)


# ----------------------------------------------------------------------------- byte order


def test_little_endian_integers_and_reals():
    """Integers and reals are little-endian whatever the machine's native order."""
    data = wire.encode_init(0x01020304, b"")
    assert data[12:16] == b"\x04\x03\x02\x01"
    posdata = wire.encode_field_step((1.0, 0.0, 0.0))
    assert posdata[160:168] == b"\x00\x00\x00\x00\x00\x00\xf0\x3f"
    event = one(Decoder("driver").feed(data), Init)
    assert event.ident == 0x01020304


def test_big_endian_nat_is_refused():
    """A big-endian nat = 1 reads as 16777216 and is refused, naming nat."""
    data = FIELD_BLOCK[:156] + struct.pack(">i", 1) + FIELD_BLOCK[160:]
    with pytest.raises(ProtocolError, match=r"nat.*16777216"):
        Decoder("driver").feed(data)


def test_big_endian_field_decodes_differently():
    """A field written big-endian does not decode to the same values."""
    data = FIELD_BLOCK[:160] + struct.pack(">3d", *FIELD) + FIELD_BLOCK[184:]
    (posdata, _) = Decoder("driver").feed(data)
    assert tuple(as_kind(posdata, PosData).field) != FIELD


# ----------------------------------------------------------------------------- limits


def test_nat_two_with_default_limits_posdata():
    """POSDATA with nat = 2 under default limits names nat, 2 and the cap 1, on 160 bytes."""
    data = posdata_bytes(IDENTITY, IDENTITY, POSITIONS[:2].tolist())
    decoder = Decoder("driver")
    with pytest.raises(ProtocolError, match="nat") as info:
        decoder.feed(data[:160])
    assert "2" in str(info.value) and "1" in str(info.value)
    assert decoder.buffered == 0


def test_nat_two_with_default_limits_forceready():
    """FORCEREADY with nat = 2 under default limits names nat, 2 and the cap 1, on 24 bytes."""
    data = forceready_bytes(0.0, FORCES[:2].tolist(), ZEROS9, b"")
    with pytest.raises(ProtocolError, match="nat") as info:
        Decoder("hub").feed(data[:24])
    assert "2" in str(info.value) and "1" in str(info.value)


def test_extras_of_two_gib_refused_without_buffering():
    """An extras length of 2**31 - 1 is refused as soon as the length field arrives."""
    prefix = SOURCE_PREFIX[:120] + struct.pack("<i", 2**31 - 1)
    decoder = Decoder("hub")
    assert decoder.feed(prefix[:123]) == []
    with pytest.raises(ProtocolError, match="extras length") as info:
        decoder.feed(prefix[123:])
    assert str(2**31 - 1) in str(info.value)
    assert str(1 << 20) in str(info.value)
    assert decoder.buffered == 0


def test_extras_at_cap_accepted_and_one_over_refused():
    """Extras of exactly max_extras_bytes decode; one byte more is refused on the prefix."""
    limits = Limits(max_extras_bytes=16)
    ok = SOURCE_PREFIX[:120] + struct.pack("<i", 16) + b"x" * 16
    event = one(Decoder("hub", limits).feed(ok), ForceReady)
    assert event.extras == b"x" * 16
    over = SOURCE_PREFIX[:120] + struct.pack("<i", 17)
    with pytest.raises(ProtocolError, match=r"extras length 17.*16"):
        Decoder("hub", limits).feed(over)


@pytest.mark.parametrize(
    ("reader", "data", "what"),
    [
        ("hub", SOURCE_PREFIX[:120] + struct.pack("<i", -1), "extras length"),
        ("driver", b"INIT        " + struct.pack("<ii", 0, -1), "init string length"),
        ("driver", FIELD_BLOCK[:156] + struct.pack("<i", -1), "nat"),
        ("hub", SOURCE_PREFIX[:20] + struct.pack("<i", -5), "nat"),
        ("hub", SOURCE_PREFIX[:120] + struct.pack("<i", -(2**31)), "extras length"),
    ],
    ids=["extras", "init", "posdata-nat", "forceready-nat", "extras-min-int"],
)
def test_negative_lengths(reader, data, what):
    """Negative nat, init string and extras lengths are protocol errors naming the field."""
    with pytest.raises(ProtocolError, match=what) as info:
        Decoder(reader).feed(data)
    assert "-" in str(info.value)


def test_init_string_over_cap():
    """An INIT string over max_init_bytes is refused on its length field, naming both numbers."""
    limits = Limits(max_init_bytes=16)
    event = one(Decoder("driver", limits).feed(init_bytes(1, b"y" * 16)), Init)
    assert event.payload == b"y" * 16
    with pytest.raises(ProtocolError, match=r"init string length 17.*16"):
        Decoder("driver", limits).feed(b"INIT        " + struct.pack("<ii", 1, 17))


def test_init_string_over_default_cap():
    """The default INIT cap is 1 MiB: 1 MiB + 1 is refused on the 20-byte head."""
    with pytest.raises(ProtocolError, match=str((1 << 20) + 1)):
        Decoder("driver").feed(b"INIT        " + struct.pack("<ii", 1, (1 << 20) + 1))


BAD = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_non_finite_field(bad, axis):
    """A NaN or infinite field component is a protocol error naming the field."""
    field3 = list(FIELD)
    field3[axis] = bad
    data = FIELD_BLOCK[:160] + struct.pack("<3d", *field3) + FIELD_BLOCK[184:]
    decoder = Decoder("driver")
    with pytest.raises(ProtocolError, match="field"):
        decoder.feed(data)


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_non_finite_source(bad, axis):
    """A NaN or infinite source component is a protocol error naming the source."""
    source3 = list(SOURCE)
    source3[axis] = bad
    data = SOURCE_PREFIX[:24] + struct.pack("<3d", *source3) + SOURCE_MSG[48:]
    with pytest.raises(ProtocolError, match="source"):
        Decoder("hub").feed(data)


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
def test_non_finite_energy(bad):
    """A NaN or infinite energy is a protocol error naming the energy."""
    data = SOURCE_MSG[:12] + struct.pack("<d", bad) + SOURCE_MSG[20:]
    with pytest.raises(ProtocolError, match="energy"):
        Decoder("hub").feed(data)


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
def test_non_finite_cell_virial_and_forces(bad):
    """Non-finite cells, virials and multi-atom forces are protocol errors too."""
    cell = list(CELL_WIRE)
    cell[5] = bad
    with pytest.raises(ProtocolError, match="cell"):
        Decoder("driver").feed(posdata_bytes(cell, INVERSE_WIRE, [[0.0, 0.0, 0.0]]))
    virial = list(VIRIAL_WIRE)
    virial[7] = bad
    with pytest.raises(ProtocolError, match="virial"):
        Decoder("hub").feed(forceready_bytes(0.0, [SOURCE], virial, b""))
    forces = FORCES.tolist()
    forces[2][1] = bad
    with pytest.raises(ProtocolError, match="force"):
        Decoder("hub", Limits(max_nat=3)).feed(forceready_bytes(0.0, forces, ZEROS9, b""))


@pytest.mark.parametrize("reader", ["hub", "driver"])
def test_unknown_header(reader):
    """An unknown header is refused as soon as its 12 bytes arrive."""
    decoder = Decoder(reader)
    assert decoder.feed(b"HELLO    ") == []
    with pytest.raises(ProtocolError, match="HELLO"):
        decoder.feed(b"   ")


@pytest.mark.parametrize(
    "header", [b"status      ", b"STATUS\x00\x00\x00\x00\x00\x00", b"  STATUS    ", b"STATUSX     "]
)
def test_header_must_be_exact(header):
    """Lower case, NUL padding, leading spaces and suffixes are not the STATUS header."""
    with pytest.raises(ProtocolError, match="unknown"):
        Decoder("driver").feed(header)


@pytest.mark.parametrize(
    ("reader", "bad", "good"),
    [
        ("driver", b"HELLO       ", b"STATUS      "),
        ("hub", SOURCE_PREFIX[:120] + struct.pack("<i", 2**31 - 1), b"READY       "),
    ],
    ids=["driver", "hub"],
)
def test_decoder_refuses_input_after_error(reader, bad, good):
    """After a protocol error every further feed raises, even of valid bytes."""
    decoder = Decoder(reader)
    with pytest.raises(ProtocolError):
        decoder.feed(bad)
    for _ in range(2):
        with pytest.raises(ProtocolError):
            decoder.feed(good)
    assert decoder.buffered == 0


def test_error_after_good_messages_in_one_feed_raises():
    """A bad message after good ones in the same feed raises; the decoder is then closed."""
    decoder = Decoder("driver")
    with pytest.raises(ProtocolError):
        decoder.feed(b"STATUS      " + b"HELLO       ")


# ----------------------------------------------------------------------------- hypothesis

LIMITS = Limits(max_nat=3, max_init_bytes=64, max_extras_bytes=64)
# The largest legal message under LIMITS: a complete message is never left buffered, so
# what stays buffered after a feed is always shorter than this.
LARGEST = max(
    20 + LIMITS.max_init_bytes,
    160 + 24 * LIMITS.max_nat,
    100 + 24 * LIMITS.max_nat + LIMITS.max_extras_bytes,
)

# No subnormals: once Meep is imported (other tests), the process flushes them to zero.
finite = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False)
matrix = st.lists(finite, min_size=9, max_size=9).map(lambda v: np.array(v).reshape(3, 3))
rows = st.integers(0, LIMITS.max_nat).flatmap(
    lambda nat: st.lists(finite, min_size=3 * nat, max_size=3 * nat).map(
        lambda v: np.array(v, dtype=np.float64).reshape(nat, 3)
    )
)
int32 = st.integers(-(2**31), 2**31 - 1)

hub_events = st.one_of(
    st.sampled_from([Status(), GetForce(), Stop(), Exit()]),
    st.builds(Init, int32, st.binary(max_size=LIMITS.max_init_bytes)),
    st.builds(PosData, matrix, matrix, rows),
)
driver_events = st.one_of(
    st.sampled_from([Ready(), NeedInit(), HaveData(), Bye()]),
    st.builds(ForceReady, finite, rows, matrix, st.binary(max_size=LIMITS.max_extras_bytes)),
    st.builds(
        wire.Resume,
        st.just(wire.RESUME_VERSION),
        st.integers(1, LIMITS.max_batch),
        st.integers(0, 2**63 - 1),
    ),
    st.builds(
        wire.Claim,
        st.just(wire.RESUME_VERSION),
        st.integers(1, LIMITS.max_batch),
        st.integers(0, 2**63 - 1),
    ),
)
# (reader, events sent to it)
sessions = st.one_of(
    st.tuples(st.just("driver"), st.lists(hub_events, max_size=8)),
    st.tuples(st.just("hub"), st.lists(driver_events, max_size=8)),
)


def split_at(data: bytes, cuts) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(sessions, st.lists(st.integers(0, 10**6), max_size=20))
def test_round_trip(session, cuts):
    """Random valid messages, encoded, joined and split anywhere, decode to equal events."""
    reader, events = session
    data = b"".join(wire.encode(e) for e in events)
    decoder = Decoder(reader, LIMITS)
    got = []
    for chunk in split_at(data, cuts):
        got += decoder.feed(chunk)
        assert decoder.buffered < LARGEST
    assert decoder.buffered == 0
    assert_same_events(got, events)
    # Bit-exact too (signed zeros): re-encoding the decoded events gives the same bytes.
    assert b"".join(wire.encode(e) for e in got) == data


HEADERS = [
    b"STATUS      ",
    b"READY       ",
    b"NEEDINIT    ",
    b"HAVEDATA    ",
    b"INIT        ",
    b"POSDATA     ",
    b"GETFORCE    ",
    b"FORCEREADY  ",
    b"STOP        ",
    b"BYE         ",
    b"EXIT        ",
    b"MXHRESUME   ",
    b"MXHHELLO    ",
    b"MXHAUTH     ",
    b"MXHPROOF    ",
    b"MXHCLAIM    ",
]

noise = st.one_of(
    st.binary(max_size=400),
    # A valid header followed by random bytes reaches the length checks.
    st.lists(st.tuples(st.sampled_from(HEADERS), st.binary(max_size=300)), max_size=4).map(
        lambda parts: b"".join(h + body for h, body in parts)
    ),
)


@st.composite
def mutated_frames(draw):
    """A valid stream with some bytes overwritten by random ones."""
    _, events = draw(sessions)
    data = bytearray(b"".join(wire.encode(e) for e in events))
    if data:
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(noise, mutated_frames()),
    st.lists(st.integers(0, 10**6), max_size=30),
    st.sampled_from(["hub", "driver"]),
)
def test_fuzz_only_protocol_errors_and_bounded_buffer(data, cuts, reader):
    """Garbage fed in random chunks raises only ProtocolError and never buffers a whole message."""
    decoder = Decoder(reader, LIMITS)
    for chunk in split_at(data, cuts):
        try:
            decoder.feed(chunk)
        except ProtocolError:
            assert decoder.buffered == 0
            with pytest.raises(ProtocolError):
                decoder.feed(b"STATUS      ")
            return
        assert decoder.buffered < LARGEST


@settings(deadline=None, max_examples=100)
@given(
    st.sampled_from(["hub", "driver"]),
    st.sampled_from(HEADERS),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(0, 200),
)
def test_fuzz_length_fields_never_buffer_past_caps(reader, header, value, at):
    """Any int32 in any length position is checked before its payload is buffered."""
    body = bytearray(b"\x00" * 200)
    body[at % 197 : at % 197 + 4] = struct.pack("<i", value)
    decoder = Decoder(reader, LIMITS)
    try:
        for i in range(0, len(body), 7):
            decoder.feed(header + bytes(body[i : i + 7]) if i == 0 else bytes(body[i : i + 7]))
            assert decoder.buffered < LARGEST
    except ProtocolError:
        assert decoder.buffered == 0


# ---------------------------------------------------------------- batched frames (v1)


def test_batched_frames_golden_bytes():
    """MXHHELLO/MXHWELCOME/MXHFIELDS/MXHSOURCES match the layout in protocol/frames.py, by hand."""
    import struct as _s

    from maxwellhub.protocol.wire import (
        FieldsBatch,
        Hello,
        SourcesBatch,
        Welcome,
        encode_fields_batch,
        encode_hello,
        encode_sources_batch,
        encode_welcome,
    )

    assert encode_hello(5) == b"MXHHELLO    " + _s.pack("<iii", 1, 5, 0)
    assert encode_welcome(5) == b"MXHWELCOME  " + _s.pack("<ii", 1, 5)
    fields = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    golden = b"MXHFIELDS   " + _s.pack("<ii6d", 2, 1, 1.0, 4.0, 2.0, 5.0, 3.0, 6.0)
    assert encode_fields_batch(fields) == golden
    src = -fields
    extras = {"Pe": np.array([0.25, 0.5])}
    golden_src = (
        b"MXHSOURCES  "
        + _s.pack("<i6d", 2, -1.0, -4.0, -2.0, -5.0, -3.0, -6.0)
        + _s.pack("<ii", 1, 2)
        + b"Pe"
        + _s.pack("<2d", 0.25, 0.5)
    )
    assert encode_sources_batch(src, extras) == golden_src
    hub_side, driver_side = Decoder("hub"), Decoder("driver")
    assert hub_side.feed(encode_hello(2)) == [Hello(1, 2, 0)]
    assert driver_side.feed(encode_welcome(2)) == [Welcome(1, 2)]
    hub_side.batch = driver_side.batch = 2
    for cut in range(len(golden)):
        d = Decoder("driver")
        d.batch = 2
        (ev,) = d.feed(golden[:cut]) + d.feed(golden[cut:])
        assert isinstance(ev, FieldsBatch) and np.array_equal(ev.fields, fields)
    for cut in range(len(golden_src)):
        d = Decoder("hub")
        d.batch = 2
        (ev,) = d.feed(golden_src[:cut]) + d.feed(golden_src[cut:])
        assert isinstance(ev, SourcesBatch) and np.array_equal(ev.sources, src)
        assert np.array_equal(ev.extras["Pe"], extras["Pe"])


def test_batched_frames_are_checked():
    """Batched frames before negotiation, with the wrong M, a NaN, or too many or too
    long extras keys are protocol errors naming the field."""
    from maxwellhub.protocol.wire import encode_fields_batch, encode_hello, encode_sources_batch

    with pytest.raises(ProtocolError, match="before batched frames were negotiated"):
        Decoder("driver").feed(encode_fields_batch(np.zeros((2, 3))))
    d = Decoder("driver")
    d.batch = 3
    with pytest.raises(ProtocolError, match="M = 2 molecules, negotiated 3"):
        d.feed(encode_fields_batch(np.zeros((2, 3))))
    d = Decoder("hub")
    d.batch = 2
    bad = np.zeros((2, 3))
    bad[1, 2] = np.nan
    with pytest.raises(ProtocolError, match="molecule index 1 is not finite"):
        d.feed(encode_sources_batch(bad))
    d = Decoder("hub", Limits(max_extras_keys=1))
    d.batch = 1
    with pytest.raises(ProtocolError, match="max_extras_keys"):
        d.feed(encode_sources_batch(np.zeros((1, 3)), {"a": [1.0], "b": [2.0]}))
    with pytest.raises(ProtocolError, match="max_batch"):
        Decoder("hub", Limits(max_batch=4)).feed(encode_hello(5))


# ---------------------------------------------------------------- resume frame (v1)


def test_resume_frame_golden_bytes_and_checks():
    """MXHRESUME: header, int32 version 1, int32 M, int64 step; 28 bytes; checked."""
    frame = wire.encode_resume(2**40 + 5, 3)
    assert frame == b"MXHRESUME   " + struct.pack("<iiq", 1, 3, 2**40 + 5)
    assert len(frame) == 28
    dec = Decoder("hub")
    assert dec.feed(frame[:13]) == [] and dec.feed(frame[13:]) == [wire.Resume(1, 3, 2**40 + 5)]
    for bad, why in (
        (b"MXHRESUME   " + struct.pack("<iiq", 2, 1, 0), "version 2"),
        (b"MXHRESUME   " + struct.pack("<iiq", 1, 0, 0), "M = 0"),
        (b"MXHRESUME   " + struct.pack("<iiq", 1, 1, -1), "step -1"),
    ):
        with pytest.raises(ProtocolError, match=why):
            Decoder("hub").feed(bad)
    with pytest.raises(ProtocolError, match="not valid from the hub"):
        Decoder("driver").feed(frame)  # only drivers send it


def test_claim_frame_golden_bytes():
    """MXHCLAIM: header, int32 version 1, int32 M, int64 first molecule id; 28 bytes."""
    frame = wire.encode_claim(12, 4)
    assert frame == b"MXHCLAIM    " + struct.pack("<iiq", 1, 4, 12)
    assert Decoder("hub").feed(frame) == [wire.Claim(1, 4, 12)]
    with pytest.raises(ProtocolError, match="first id -3 is negative"):
        Decoder("hub").feed(b"MXHCLAIM    " + struct.pack("<iiq", 1, 1, -3))
