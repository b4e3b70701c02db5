"""Parameter changes and kicks over the wire (MXHPARAMS / MXHPARAMSOK): the frames, the
negotiation, the hub awaiting every answer, refusals naming molecule and parameter, the
replay to a replacement driver, the control request and the couplings' schedule."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest
from _util import scaled
from fakes import FakeDriver

from maxwellhub import Hub, wire
from maxwellhub.errors import ProtocolError, UsageError
from maxwellhub.hub.params import ParameterRefused
from maxwellhub.protocol import params as pp
from maxwellhub_drivers.client import run_client
from maxwellhub_drivers.models import create_model

DT = 0.5
TLS = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 0.1}


# ----------------------------------------------------------------------------- frames


def test_params_frame_round_trip_whole_and_byte_by_byte():
    """MXHPARAMS and MXHPARAMSOK decode from the whole buffer, byte by byte, with trailing data."""
    body = pp.build_payload(3, [pp.Kick((4, 5, 6), (1e-3, 0.0, -2.0))], 1 << 16)
    frame = wire.encode_params(17, body)
    assert len(frame) == 28 + len(body)
    dec = wire.Decoder("driver")
    (ev,) = dec.feed(frame)
    assert ev == wire.Params(1, 17, body)
    dec = wire.Decoder("driver")
    got = [e for b in frame + wire.encode_header(wire.STATUS) for e in dec.feed(bytes([b]))]
    assert got == [ev, wire.Status()]
    ack = wire.encode_params_ack(3, b'{"ok":true}')
    (back,) = wire.Decoder("hub").feed(ack)
    assert back == wire.ParamsAck(1, 3, b'{"ok":true}')
    seq, ops = pp.parse_payload(body)
    assert seq == 3 and ops == [pp.Kick((4, 5, 6), (1e-3, 0.0, -2.0))]
    assert json.loads(body)["ops"][0]["molecules"] == [[4, 3]]


def test_params_decoder_limits_name_the_byte_count():
    """An oversize or negative JSON length, or a wrong version, is a ProtocolError naming it."""
    big = wire.encode_params(0, b"x" * 100)
    with pytest.raises(ProtocolError, match=r"100 bytes is outside 0..64 \(max_params_bytes\)"):
        wire.Decoder("driver", wire.Limits(max_params_bytes=64)).feed(big)
    with pytest.raises(ProtocolError, match="version 2"):
        wire.Decoder("driver").feed(wire.encode_params(0, b"{}", version=2))
    with pytest.raises(ProtocolError, match="not valid from the hub"):
        wire.Decoder("driver").feed(wire.encode_params_ack(1, b"{}"))
    with pytest.raises(ProtocolError, match=r"MXHPARAMS \(2 bytes\): sequence = None"):
        pp.parse_payload(b"{}")
    with pytest.raises(ProtocolError, match="not UTF-8 JSON"):
        pp.parse_payload(b"\xff")
    with pytest.raises(ProtocolError, match="op 0: op = 'pickle'"):
        pp.parse_payload(b'{"sequence":1,"ops":[{"op":"pickle","molecules":[]}]}')
    with pytest.raises(UsageError, match=r"\d+ bytes of JSON exceeds the 16-byte cap"):
        pp.build_payload(1, [pp.SetParams((0,), {"omega": 0.3})], 16)


def _ack(data: bytes) -> wire.ParamsAck:
    (ev,) = wire.Decoder("hub").feed(data)
    assert isinstance(ev, wire.ParamsAck)
    return ev


def test_driver_answer_applies_and_names_the_refused_parameter():
    """The sans-I/O driver handler applies ops to the model and names molecule and key."""
    model = create_model("tls", n=2, **TLS)
    model.initialize(dt_au=DT, molecule_ids=[7, 8])
    apply = pp.model_applier(model, [7, 8])
    body = pp.build_payload(1, [pp.SetParams((8,), {"omega": 0.3})], 1 << 16)
    ack = _ack(pp.answer(wire.Params(1, 0, body), [7, 8], apply))
    assert pp.parse_ack(ack) is None and ack.sequence == 1
    assert model.params["omega"].tolist() == [0.242, 0.3]
    bad = pp.build_payload(2, [pp.SetParams((7,), {"omega": -1.0})], 1 << 16)
    ack = _ack(pp.answer(wire.Params(1, 0, bad), [7, 8], apply))
    error = pp.parse_ack(ack)
    assert error is not None and "molecule 7" in error and "omega" in error
    with pytest.raises(ProtocolError, match="molecule 9, which this driver does not host"):
        body = pp.build_payload(3, [pp.Kick((9,), (1.0, 0, 0))], 1 << 16)
        pp.answer(wire.Params(1, 0, body), [7, 8], apply)


# ----------------------------------------------------------------------------- end to end


def _driver_thread(model, unix: str) -> threading.Thread:
    t = threading.Thread(
        target=run_client, args=(model,), kwargs={"unix": unix, "timeout": scaled(10)}, daemon=True
    )
    t.start()
    return t


def _tls(n: int = 1):
    return create_model("tls", n=n, **TLS)


def _reference(fields: np.ndarray, changes: dict, n: int = 2) -> np.ndarray:
    """Sources from in-process models with the same changes at the same steps."""
    model = _tls(n)
    model.initialize(dt_au=DT, molecule_ids=list(range(n)))
    out = np.zeros_like(fields)
    for step in range(len(fields)):
        for kind, value in changes.get(step, []):
            model.set_params(value) if kind == "set" else model.apply_kick(value)
        model.stage(fields[step])
        out[step] = model.commit()
    return out


def _fields(steps: int, n: int = 2) -> np.ndarray:
    rng = np.random.default_rng(5)
    return 1e-3 * rng.standard_normal((steps, n, 3))


async def test_hub_set_params_reaches_single_and_ensemble_drivers(unix_name):
    """Hub.set_params / apply_kick await every answer; results equal in-process models."""
    fields = _fields(6, 3)
    changes: dict[int, list] = {2: [("set", {"omega": 0.3})], 4: [("kick", [1e-2, 0.0, 3e-2])]}
    hub = Hub(unixsocket=unix_name, timeout=scaled(10))
    await hub.start()
    threads = [_driver_thread(_tls(1), unix_name)]
    try:
        assert await hub.wait_until_bound({0: {"dt_au": DT}}, timeout=scaled(10))
        threads.append(_driver_thread(_tls(2), unix_name))
        assert await hub.wait_until_bound({1: {"dt_au": DT}, 2: {"dt_au": DT}}, timeout=scaled(10))
        got = np.zeros_like(fields)
        for step in range(len(fields)):
            for kind, value in changes.get(step, []):
                if kind == "set":
                    await hub.set_params([0, 1, 2], value)
                else:
                    await hub.apply_kick([0, 1, 2], value)
            got[step] = (await hub.step_arrays([0, 1, 2], fields[step])).sources
        ref = _reference(fields, changes, 3)
        assert np.array_equal(got, ref)
        assert not np.array_equal(got, _reference(fields, {}, 3))
        assert [c.steps for c in hub.params.log] == [{0: 2, 1: 2, 2: 2}, {0: 4, 1: 4, 2: 4}]
        with pytest.raises(ParameterRefused, match=r"molecule 1: parameter omega refused"):
            await hub.set_params([1], {"omega": -1.0})
        assert len(hub.params.log) == 2  # the refused change is not replayed to anyone
        got = (await hub.step_arrays([0, 1, 2], fields[0])).sources  # the run goes on
        assert np.isfinite(got).all()
    finally:
        await hub.stop()
        for t in threads:
            t.join(scaled(10))


async def test_plain_ipi_driver_never_sees_the_frame(unix_name):
    """A plain i-PI-style peer is offered nothing it answers; asking it raises naming it."""
    hub = Hub(unixsocket=unix_name, timeout=scaled(10))
    await hub.start()
    fake = FakeDriver(hub.address).start()
    try:
        assert await hub.wait_until_bound({3: {"dt_au": DT}}, timeout=scaled(10))
        await hub.step_arrays([3], [[1e-3, 0, 0]])
        with pytest.raises(UsageError, match=r"molecule 3: its driver .* does not speak"):
            await hub.set_params([3], {"omega": 0.3})
        with pytest.raises(UsageError, match="molecule 3"):
            await hub.apply_kick(3, [1e-3, 0, 0])
        assert hub.params.log == []
        await hub.step_arrays([3], [[1e-3, 0, 0]])
        assert "Params" not in fake.messages
    finally:
        await hub.stop()
        await asyncio.wait_for(fake.closed.wait(), scaled(10))
