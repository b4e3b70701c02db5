"""The driver-side session machine (maxwellhub.protocol.session) with plain bytes: no
socket, no event loop. Every conversation is fed whole, one byte at a time and with
trailing data; every (state, message) pair missing from the tables is a protocol error."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from maxwellhub.errors import ProtocolError
from maxwellhub.protocol import params as params_frames
from maxwellhub.protocol import wire
from maxwellhub.protocol.session import (
    BATCHED,
    LABELS,
    PENDING,
    SINGLE,
    Binding,
    Session,
    SessionState,
    _Pending,
)

STATUS = wire.encode_header(wire.STATUS)
GETFORCE = wire.encode_header(wire.GETFORCE)
STOP = wire.encode_header(wire.STOP)
READY = wire.encode_header(wire.READY)
NEEDINIT = wire.encode_header(wire.NEEDINIT)
HAVEDATA = wire.encode_header(wire.HAVEDATA)


class FakeModel:
    """Sources are twice the fields; records what the machine asked."""

    def __init__(self, secret: bytes | None = None, deferred: bool = False) -> None:
        self.secret = secret
        self.deferred = deferred
        self.calls: list[tuple] = []
        self.staged: np.ndarray | None = None

    def answer_challenge(self, nonce: bytes) -> bytes:
        if self.secret is None:
            raise ProtocolError("no secret given")
        return bytes(a ^ b for a, b in zip(nonce, self.secret.ljust(32, b"\0"), strict=True))

    def claim(self) -> bytes:
        return b""

    def initialize(self, binding: Binding) -> int | _Pending | None:
        self.calls.append(("init", binding.molecule_ids, binding.dt_au))
        if self.deferred:
            return PENDING
        return None if binding.resume is None else binding.resume["step"]

    def stage(self, fields: npt.NDArray[np.float64], flags: int) -> None:
        self.staged = np.array(fields, dtype=np.float64)
        self.calls.append(("stage", self.staged.tolist(), flags))

    def commit(self) -> tuple[Any, Any] | _Pending:
        fields, self.staged = self.staged, None
        self.calls.append(("commit",))
        if self.deferred:
            return PENDING
        assert fields is not None
        if len(fields) == 1:
            return (2 * fields[0]).tolist(), {"e": float(fields[0, 2])}
        return 2 * fields, {"e": fields[:, 2].copy()}

    def unstaged(self) -> dict[str, float]:
        return {"e": 0.0}

    def answered(self) -> None:
        self.calls.append(("answered",))

    def apply_params(self, event: wire.Params, molecule_ids: list[int]) -> bytes | _Pending:
        self.calls.append(("params", event.payload, molecule_ids))
        return PENDING if self.deferred else wire.encode_params_ack(7, b'{"ok":true}')


def feed(session: Session, data: bytes, how: str) -> bytes:
    """Feed ``data`` whole, one byte at a time, or through the zero-copy pair; return
    everything the machine answered, concatenated."""
    out: list = []
    if how == "whole":
        out += session.receive_data(data)
    elif how == "bytewise":
        for k in range(len(data)):
            out += session.receive_data(data[k : k + 1])
    else:  # read_buffer / received, in reads of 50 bytes
        for k in range(0, len(data), 50):
            chunk = data[k : k + 50]
            room = session.read_buffer(len(chunk))
            room[: len(chunk)] = chunk
            out += session.received(len(chunk))
    session.sent()
    return b"".join(bytes(p) for p in out)


def init_single(mid: int, *, dt: float = 0.5, **extra: Any) -> bytes:
    return wire.encode_init(mid, json.dumps({"dt_au": dt, **extra}).encode())


SINGLE_TALK = (
    STATUS
    + init_single(3)
    + STATUS
    + wire.encode_field_step([0.0, 0.0, 1e-3])  # the fused block (fast path)
    + wire.encode_posdata(np.eye(3), np.eye(3), [[1.0, 2.0, 3.0]])
    + STATUS
    + GETFORCE
    + STOP
)


def single_reply(extras_z: float, source) -> bytes:
    text = json.dumps({"e": extras_z}, separators=(",", ":")).encode()
    return wire.encode_source_ready(source, text)


EXPECTED_SINGLE = (
    NEEDINIT
    + READY
    + single_reply(1e-3, [0.0, 0.0, 2e-3])
    + HAVEDATA
    + single_reply(3.0, [2.0, 4.0, 6.0])
)


@pytest.mark.parametrize("how", ["whole", "bytewise", "zero-copy"])
def test_single_conversation_any_split(how):
    """A single molecule's session gives the same answers however the bytes are split."""
    model = FakeModel()
    session = Session(model)
    assert session.start() == []
    assert feed(session, SINGLE_TALK, how) == EXPECTED_SINGLE
    assert session.state is SessionState.ENDED and session.end is wire.Stop
    assert session.steps == 2
    assert model.calls.count(("answered",)) == 2


def test_single_trailing_data_is_held_then_ignored_after_stop():
    """An incomplete message after complete ones is held; bytes after STOP are not read."""
    session = Session(FakeModel())
    assert feed(session, STATUS + init_single(3)[:7], "whole") == NEEDINIT
    assert session.buffered == 7
    rest = init_single(3)[7:] + STATUS + STOP + STATUS + GETFORCE
    assert feed(session, rest, "whole") == READY
    assert session.state is SessionState.ENDED
    assert session.receive_data(b"GARBAGE!!!!!") == []
    session.read_buffer(12)[:12] = b"GARBAGE!!!!!"
    assert session.received(12) == []


def test_fused_block_with_trailing_bytes_takes_the_decoder():
    """The fused block followed by more bytes is decoded normally, with the same answer."""
    fast, slow = Session(FakeModel()), Session(FakeModel())
    for s in (fast, slow):
        feed(s, init_single(1), "whole")
    block = wire.encode_field_step([1e-3, 0.0, 0.0])
    a = feed(fast, block, "whole")
    b = feed(slow, block + STATUS, "whole")
    assert b == a + READY
    assert fast.steps == slow.steps == 1


def test_resume_offer_is_answered_with_mxhresume():
    """An INIT offering a resume is answered with MXHRESUME for the model's step."""
    session = Session(FakeModel())
    offer = {"version": 1, "step": 7, "history": 3}
    out = feed(session, init_single(4, mxh_resume=offer), "whole")
    assert out == wire.encode_resume(7, 1)


def test_repeated_init_same_is_ignored_other_is_an_error():
    """A stock hub may re-send the same INIT; another one is a protocol error."""
    model = FakeModel()
    session = Session(model)
    feed(session, init_single(2) + init_single(2), "whole")
    assert [c for c in model.calls if c[0] == "init"] == [("init", [2], 0.5)]
    with pytest.raises(ProtocolError, match="INIT again with molecule id 5"):
        feed(session, init_single(5), "whole")


def test_unstaged_getforce_answers_a_zero_source():
    """GETFORCE with no field staged (single molecule) answers a zero source."""
    session = Session(FakeModel())
    feed(session, init_single(0), "whole")
    assert feed(session, GETFORCE, "whole") == single_reply(0.0, [0.0, 0.0, 0.0])
    assert session.steps == 0


def test_auth_challenge_and_missing_secret():
    """MXHAUTH is answered with the model's proof; without one the model's error rises."""
    nonce = bytes(range(32))
    session = Session(FakeModel(secret=b"k"))
    out = feed(session, wire.encode_auth_challenge(nonce), "whole")
    assert out == wire.encode_auth_proof(FakeModel(secret=b"k").answer_challenge(nonce))
    assert session.state is SessionState.PROVING
    feed(session, STATUS, "whole")
    assert session.state is SessionState.UNBOUND
    with pytest.raises(ProtocolError, match="no secret given"):
        feed(Session(FakeModel()), wire.encode_auth_challenge(nonce), "whole")


def batched_talk(m: int, fields: np.ndarray, flags: int = wire.WANT_EXTRAS) -> list[bytes]:
    """The hub's turns: it waits for the answer to its last STATUS before stepping (the
    decoder reads MXHFIELDS only once MXHWELCOME was handled)."""
    init = json.dumps({"molecule_id_range": [10, m], "dt_au": 0.25}).encode()
    handshake = STATUS + wire.encode_welcome(m) + STATUS + wire.encode_init(10, init) + STATUS
    step = (
        wire.encode_fields_batch(fields, flags) + STATUS + GETFORCE + wire.encode_header(wire.EXIT)
    )
    return [handshake, step]


@pytest.mark.parametrize("how", ["whole", "bytewise", "zero-copy"])
def test_batched_conversation_any_split(how):
    """An ensemble's session says MXHHELLO and answers one MXHSOURCES per step."""
    fields = np.arange(9.0).reshape(3, 3) * 1e-3
    model = FakeModel()
    session = Session(model, 3, hello_flags=4)
    assert b"".join(session.start()) == wire.encode_hello(3, flags=4)
    out = b"".join(feed(session, turn, how) for turn in batched_talk(3, fields, wire.WANT_DIPOLES))
    expected = (
        NEEDINIT
        + NEEDINIT
        + READY
        + HAVEDATA
        + wire.encode_sources_batch(2 * fields, {"e": fields[:, 2]})
    )
    assert out == expected
    assert session.end is wire.Exit and session.flags == wire.WANT_DIPOLES
    assert ("init", [10, 11, 12], 0.25) in model.calls


def test_deferred_init_and_step_answer_later():
    """With answers deferred, STATUS while initialising is answered READY once the model
    says so, and the step's MXHSOURCES comes from answered()."""
    model = FakeModel(deferred=True)
    session = Session(model, 2, batched=True)
    init = json.dumps(
        {
            "molecule_ids": [4, 9],
            "dt_au": 1.0,
            "mxh_resume": {"version": 1, "step": 2, "history": 0},
        }
    )
    out = feed(session, wire.encode_welcome(2) + wire.encode_init(4, init.encode()), "whole")
    assert out == b""
    assert feed(session, STATUS + STATUS, "whole") == b""
    assert session.state is SessionState.INITIALISING
    out = b"".join(bytes(p) for p in session.initialized(1))
    assert out == wire.encode_resume(1, 2) + READY + READY
    fields = np.ones((2, 3))
    assert feed(session, wire.encode_fields_batch(fields) + GETFORCE + STATUS, "whole") == HAVEDATA
    assert session.state is SessionState.STEPPING
    with pytest.raises(ProtocolError, match="GETFORCE again during step 1"):
        session.dispatch(wire.GetForce())
    out = b"".join(bytes(p) for p in session.answered(3 * fields, None))
    assert out == wire.encode_sources_batch(3 * fields, None)
    assert session.state is SessionState.READY and session.steps == 1


def test_ensemble_init_before_welcome_names_the_remedy():
    """INIT before MXHWELCOME: the hub does not speak batched frames."""
    session = Session(FakeModel(), 2)
    with pytest.raises(ProtocolError, match="INIT before MXHWELCOME"):
        feed(session, STATUS + init_single(0), "whole")


def test_welcome_for_another_size_is_an_error():
    """MXHWELCOME for another number of molecules than the session hosts."""
    with pytest.raises(ProtocolError, match="MXHWELCOME for 3 molecules; this driver hosts 2"):
        feed(Session(FakeModel(), 2), wire.encode_welcome(3), "whole")


@pytest.mark.parametrize("host", ["this driver", "this relay"])
def test_only_a_session_that_offered_the_lane_takes_mxhshmlane(host):
    """MXHSHMLANE after MXHWELCOME goes to the lane handler of a session whose MXHHELLO
    offered the lane; every other session refuses it naming itself (the one check, for
    drivers, ensembles and relays alike); flags and handler come together."""
    frames = wire.encode_welcome(2) + wire.encode_shm_lane(2, 0, 0)
    plain = Session(FakeModel(), 2, host=host)
    with pytest.raises(ProtocolError, match=f"MXHSHMLANE, but {host} offered no shared-memory"):
        feed(plain, frames, "bytewise")
    offers: list[wire.ShmLane] = []
    offered = Session(
        FakeModel(), 2, host=host, hello_flags=wire.hello_lane_flags(3), lane_offer=offers.append
    )
    assert feed(offered, frames, "bytewise") == b""
    assert offers == [wire.ShmLane(wire.SHM_VERSION, 2, 0, 0, 0)]
    assert offered.state is SessionState.UNBOUND
    for bad in ({"hello_flags": wire.HELLO_SHM_LANE}, {"lane_offer": offers.append}):
        with pytest.raises(ValueError, match="lane_offer"):
            Session(FakeModel(), 2, **bad)  # type: ignore[arg-type]


EVENTS: dict[type, Any] = {
    wire.Status: wire.Status(),
    wire.Init: wire.Init(0, b'{"dt_au": 1}'),
    wire.PosData: wire.PosData(np.eye(3), np.eye(3), np.zeros((1, 3))),
    wire.GetForce: wire.GetForce(),
    wire.Stop: wire.Stop(),
    wire.Exit: wire.Exit(),
    wire.Welcome: wire.Welcome(1, 2),
    wire.FieldsBatch: wire.FieldsBatch(np.zeros((2, 3))),
    wire.AuthChallenge: wire.AuthChallenge(1, bytes(32)),
    wire.Params: wire.Params(1, 0, b'{"sequence": 1, "ops": []}'),
    wire.ShmLane: wire.ShmLane(1, 2, 0, 0, 0),
}


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_every_missing_transition_is_a_protocol_error(batched):
    """Each (state, hub message) pair absent from the table is a ProtocolError naming the
    message and the state; the state does not change."""
    table = BATCHED if batched else SINGLE
    assert set(LABELS) == set(EVENTS)
    missing = 0
    for state in SessionState:
        for kind, event in EVENTS.items():
            if (state, kind) in table:
                continue
            session = Session(FakeModel(), 2 if batched else 1)
            session.state = state
            with pytest.raises(ProtocolError) as info:
                session.dispatch(event)
            message = str(info.value)
            assert f"unexpected {LABELS[kind]} " in message
            assert f"(state {state.name})" in message
            assert session.state is state
            missing += 1
    assert missing > 20  # the tables are sparse: most pairs are errors


def test_parameter_frames_offered_accepted_and_answered():
    """An INIT offering parameter frames is accepted (after MXHRESUME, before READY);
    MXHPARAMS then reaches the model, whose MXHPARAMSOK is sent, at once or later."""
    offer: dict[str, Any] = {wire.PARAMS_KEY: params_frames.offer(wire.Limits())}
    resume = {"version": 1, "step": 3, "history": 0}
    for deferred in (False, True):
        model = FakeModel(deferred=deferred)
        session = Session(model, 1)
        out = feed(session, STATUS + init_single(6, mxh_resume=resume, **offer) + STATUS, "whole")
        if deferred:
            assert out == NEEDINIT
            out += b"".join(bytes(p) for p in session.initialized(3))
        assert out == NEEDINIT + wire.encode_resume(3, 1) + params_frames.ACCEPT + READY
        frame = wire.encode_params(0, b'{"sequence": 7, "ops": []}')
        got = feed(session, frame, "bytewise")
        assert ("params", b'{"sequence": 7, "ops": []}', [6]) in model.calls
        ack = wire.encode_params_ack(7, b'{"ok":true}')
        if deferred:
            assert got == b""
            got = b"".join(bytes(p) for p in session.params_answered(ack))
        assert got == ack
