"""Parameter changes and kicks over the wire (MXHPARAMS / MXHPARAMSOK): the frames, the
negotiation, the hub awaiting every answer, refusals naming molecule and parameter, the
replay to a replacement driver, the control request and the couplings' schedule."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
from typing import Any

import numpy as np
import pytest
from _connection_fakes import READY, feed, ready_single
from _util import scaled
from fakes import FakeDriver

from maxwellhub import Hub, SocketHub
from maxwellhub.errors import BarrierTimeout, ProtocolError, UsageError
from maxwellhub.hub.params import Change, ParameterRefused
from maxwellhub.models import create_model, get_model_class
from maxwellhub.protocol import params as pp
from maxwellhub.protocol import wire
from maxwellhub.protocol.connection import State
from maxwellhub_drivers.checkpoint import Continuity
from maxwellhub_drivers.client import connect, run_client, serve

DT = 0.5
TLS: dict[str, Any] = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 0.1}


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


class _DiesOnChange(get_model_class("tls")):  # type: ignore[misc,valid-type]
    """A TLS whose driver dies when a change arrives, before it answers."""

    def set_params(self, changes, molecules=None):
        raise OSError("driver killed before it answered MXHPARAMS")


def _serve_thread(model, unix: str) -> tuple[socket.socket, threading.Thread]:
    """A driver in a thread on a socket the test can cut (as a killed process would)."""
    sock = connect(unix=unix, timeout=scaled(10))

    def session() -> None:
        serve(sock, model)
        with contextlib.suppress(OSError):  # the process ends: its connection closes
            sock.shutdown(socket.SHUT_RDWR)

    t = threading.Thread(target=session, daemon=True)
    t.start()
    return sock, t


def test_replacement_replays_changes_at_their_steps_bitwise(unix_name, caplog):
    """A driver dying before it answers, and one killed after changes: each replacement is
    replayed the fields and the changes at their steps; sources equal an uninterrupted run."""
    steps = 10
    fields = _fields(steps)
    changes: dict[int, list] = {3: [("set", {"omega": 0.3})], 5: [("kick", [2e-2, 0.0, 1e-2])]}
    ref = _reference(fields, changes)
    got = np.zeros_like(fields)
    cut: list[socket.socket] = []
    threads: list[threading.Thread] = []
    caplog.set_level("INFO", "maxwellhub.hub")
    with SocketHub(unixsocket=unix_name, timeout=scaled(10), history=steps) as hub:
        sock, t = _serve_thread(_DiesOnChange(n=1, **TLS), unix_name)
        threads.append(t)
        assert hub.wait_until_bound({0: {"dt_au": DT}}, timeout=scaled(10))
        cut.append(sock)
        threads.append(_driver_thread(_tls(1), unix_name))
        assert hub.wait_until_bound({1: {"dt_au": DT}}, timeout=scaled(10))
        for step in range(steps):
            for kind, value in changes.get(step, []):
                if kind == "set":
                    hub.set_params([0, 1], value)  # molecule 0's driver dies meanwhile
                    assert "lost before it answered a parameter change" in caplog.text
                    sock, t = _serve_thread(_tls(1), unix_name)  # its replacement
                    cut.append(sock)
                    threads.append(t)
                    assert hub.wait_until_bound([0], timeout=scaled(10))
                else:
                    hub.apply_kick([0, 1], value)
            got[step] = hub.step_arrays([0, 1], fields[step]).sources
            if step == 6:  # kill the replacement after both changes; a third one resumes
                cut[-1].shutdown(socket.SHUT_RDWR)
                threads.append(_driver_thread(_tls(1), unix_name))
        assert np.array_equal(got, ref)
        assert hub.molecule_steps([0, 1]).tolist() == [steps, steps]
    assert "replaying 3 missed step(s) 0..2" in caplog.text
    assert "replaying 7 missed step(s) 0..6" in caplog.text
    for sock in cut:
        sock.close()
    for t in threads:
        t.join(scaled(10))


def _cavity_run(where: str, unix_name: str) -> tuple[dict, Any]:
    """60 steps of 3 TLS in a cavity, a change of molecule 1 before step 15 and a kick of
    all before step 35, scheduled through the coupling API; embedded or in drivers."""
    from maxwellhub.em import EngineCoupling, SingleModeCavity

    cavity = SingleModeCavity(
        frequency_au=0.242, damping_au=0.0, coupling_strength=1e-3, coupling_axis="z"
    )

    def schedule(c) -> None:
        if c.step_index == 15:
            c.set_params([1], {"omega": 0.3})
        if c.step_index == 35:
            c.apply_kick([0, 1, 2], [0.0, 0.0, 2e-2])

    if where == "embedded":
        coupling = EngineCoupling(cavity, DT)
        coupling.add_molecules("tls", n=3, **TLS)
        coupling.run(schedule, steps=60)
        return coupling.history(), None
    hub = SocketHub(unixsocket=unix_name, timeout=scaled(10))
    coupling = EngineCoupling(cavity, DT, hub=hub, timeout=scaled(10))
    coupling.add_socket_molecules(n=3)
    threads = [_driver_thread(_tls(2), unix_name), _driver_thread(_tls(1), unix_name)]
    coupling.run(schedule, steps=60)
    return coupling.history(), (hub, coupling, threads)


def test_coupling_schedule_with_drivers_equals_embedded(unix_name, caplog):
    """EngineCoupling.set_params/apply_kick on socket molecules (an ensemble and a single
    driver) give the embedded run's records to 1e-12; a refusal at the step boundary is
    logged and kept, naming molecule and parameter, and the run goes on."""
    embedded, _ = _cavity_run("embedded", unix_name)
    got, (hub, coupling, threads) = _cavity_run("sockets", unix_name)
    try:
        for key in ("engine/qc_au", "Pe", "muz_au"):
            np.testing.assert_allclose(got[key], embedded[key], rtol=0, atol=1e-12, err_msg=key)
        assert not np.allclose(got["Pe"][40], got["Pe"][40, 0])  # the change split them
        coupling.set_params([2], {"omega": -1.0})  # checked by its driver, at the step
        before = coupling.step_index
        with caplog.at_level("ERROR", "maxwellhub.em"):
            coupling.step()  # the run goes on
        assert coupling.step_index == before + 1
        (refused,) = coupling.refused_changes
        assert "molecule 2: parameter omega refused" in refused
        assert "molecule 2: parameter omega refused" in caplog.text
    finally:
        hub.stop()
        for t in threads:
            t.join(scaled(10))


LASER_RUN = """
[em]
engine = "laser"

[em.laser]
pulse = {{ shape = "cw", e0 = 1e-4, omega = 0.242 }}
polarization = [0.0, 0.0, 1.0]

[simulation]
dt_au = 0.2
until = 10.0

[transport]
kind = "{kind}"
molecules_per_driver = 3

[[molecules]]
model = "tls"
count = 3
[molecules.params]
omega = 0.242
mu12 = 187.0
orientation = 2
pe_initial = [0.0, 0.1, 0.3]

[output]
directory = "{out}"
plot = false
record_every = 1

[[schedule]]
step = 10
molecules = [1]
changes = {{ omega = 0.3 }}

[[schedule]]
step = 30
kick = [0.0, 0.0, 1e-2]
"""


def test_run_schedule_with_socket_drivers_equals_embedded(tmp_path):
    """``maxwellhub run`` with a ``[[schedule]]`` and an ensemble driver gives the embedded
    run's populations and engine record to 1e-12."""
    import h5py

    from maxwellhub.run import runner
    from maxwellhub.run.config import load_config

    runs = {}
    for kind in ("embedded", "unix", "plain"):
        path = tmp_path / f"{kind}.toml"
        text = LASER_RUN.format(kind=kind.replace("plain", "embedded"), out=tmp_path / kind)
        path.write_text(text if kind != "plain" else text.split("[[schedule]]")[0])
        summary = runner.run(runner.validate_models(load_config(path)), echo=lambda line: None)
        assert summary["complete"] and summary["steps"] == 50
        with h5py.File(summary["hdf5"]) as f:
            runs[kind] = {key: f[key][()] for key in ("Pe", "muz_au")}
    ref, got = runs["embedded"], runs["unix"]
    plain = runs["plain"]["Pe"]
    assert np.array_equal(ref["Pe"][:10], plain[:10])
    assert not np.allclose(ref["Pe"][12:, 1], plain[12:, 1], rtol=0, atol=1e-9)
    for key in ("Pe", "muz_au"):
        np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-12, err_msg=key)


class _Held(Continuity):
    """Holds its driver after the first step's answer until ``go`` is set, so the hub's
    STATUS after that first step stays unanswered meanwhile."""

    def __init__(self, go: threading.Event) -> None:
        super().__init__()
        self.go = go

    def committed(self, model, state_before) -> None:
        super().committed(model, state_before)
        if self.step == 1:
            assert self.go.wait(scaled(10))


class _PythonTLS(get_model_class("tls")):  # type: ignore[misc,valid-type]
    """A TLS whose steps the compiled driver loop does not take (so _Held sees each)."""


async def test_change_right_after_a_first_step_waits_for_the_drivers_ready(unix_name):
    """A kick asked right after a driver's first step, while the hub's STATUS after that
    step is unanswered, reaches the driver once it says READY (it used to be logged and
    never sent): the sources equal in-process models kicked at the same step."""
    fields = _fields(4, 1)
    kick = [0.0, 0.0, 2e-2]
    go = threading.Event()
    hub = Hub(unixsocket=unix_name, timeout=scaled(10))
    await hub.start()
    t = threading.Thread(
        target=run_client,
        args=(_PythonTLS(n=1, **TLS),),
        kwargs={"unix": unix_name, "timeout": scaled(10), "continuity": _Held(go)},
        daemon=True,
    )
    t.start()
    try:
        assert await hub.wait_until_bound({0: {"dt_au": DT}}, timeout=scaled(10))
        got = np.zeros_like(fields)
        got[0] = (await hub.step_arrays([0], fields[0])).sources
        assert hub.registry.molecules[0].driver.state is State.LEARN
        hub.loop.call_soon(go.set)  # runs once apply_kick found the driver still learning
        await hub.apply_kick([0], kick)
        for step in range(1, len(fields)):
            got[step] = (await hub.step_arrays([0], fields[step])).sources
        assert np.array_equal(got, _reference(fields, {1: [("kick", kick)]}, 1))
    finally:
        go.set()
        await hub.stop()
        t.join(scaled(10))


@pytest.mark.parametrize("drop_after", [0, 1])
async def test_reconnected_driver_takes_a_kick_of_its_live_step_once(unix_name, drop_after):
    """A driver with --reconnect is kicked after step 2, and its connection drops before
    step 3 (or after it): it resumes from its live state (or the previous step's), as it
    was before the kick, and the hub replays the kick once; the sources equal in-process
    models kicked once."""
    fields = _fields(6, 1)
    kick = [0.0, 0.0, 2e-2]
    hub = Hub(unixsocket=unix_name, timeout=scaled(10), history=5)
    await hub.start()
    t = threading.Thread(
        target=run_client,
        args=(_PythonTLS(n=1, **TLS),),
        kwargs={"unix": unix_name, "timeout": scaled(10), "reconnect": True},
        daemon=True,
    )
    t.start()
    try:
        assert await hub.wait_until_bound({0: {"dt_au": DT}}, timeout=scaled(10))
        got = np.zeros_like(fields)
        for step in range(len(fields)):
            if step == 2:
                await hub.apply_kick([0], kick)
            if step == 2 + drop_after:
                hub.registry.molecules[0].driver.link.abort()  # a network hiccup
            got[step] = (await hub.step_arrays([0], fields[step])).sources
        assert np.array_equal(got, _reference(fields, {2: [("kick", kick)]}, 1))
    finally:
        await hub.stop()
        t.join(scaled(10))


async def test_relay_forwards_changes_to_its_local_drivers(unix_name):
    """A relay accepts the upstream's offer, applies each MXHPARAMS through its local hub
    and answers upstream; results equal in-process models, a refusal names the molecule."""
    from maxwellhub.relay import Relay

    fields = _fields(6, 2)
    changes: dict[int, list] = {2: [("set", {"omega": 0.3})], 4: [("kick", [1e-2, 0.0, 3e-2])]}
    hub = Hub(unixsocket=unix_name, timeout=scaled(10))
    await hub.start()
    local = f"{unix_name}_relay"
    relay = Relay(2, upstream_unix=unix_name, local_unix=local, timeout=scaled(10))
    running = asyncio.ensure_future(relay.run())
    threads = []
    try:
        threads = [_driver_thread(_tls(1), local), _driver_thread(_tls(1), local)]
        assert await hub.wait_until_bound({0: {"dt_au": DT}, 1: {"dt_au": DT}}, timeout=scaled(10))
        got = np.zeros_like(fields)
        for step in range(len(fields)):
            for kind, value in changes.get(step, []):
                if kind == "set":
                    await hub.set_params([0, 1], value)
                else:
                    await hub.apply_kick([0, 1], value)
            got[step] = (await hub.step_arrays([0, 1], fields[step])).sources
        assert np.array_equal(got, _reference(fields, changes, 2))
        with pytest.raises(ParameterRefused, match=r"molecule 1: parameter omega refused"):
            await hub.set_params([1], {"omega": -1.0})
        await hub.step_arrays([0, 1], fields[0])  # the run goes on
    finally:
        await hub.stop()
        await asyncio.wait_for(running, scaled(10))
        for t in threads:
            t.join(scaled(10))


async def test_control_set_params_needs_the_token_and_is_applied_at_the_boundary(unix_name):
    """SetParams on the control endpoint: refused without the token or with bad
    arguments (naming them), queued with it, and sent to the driver between steps."""
    from maxwellhub.services import control

    fields = _fields(4, 1)
    hub = Hub(unixsocket=unix_name, timeout=scaled(10), control=f"{unix_name}_ctl")
    await hub.start()
    threads = [_driver_thread(_tls(1), unix_name)]
    try:
        assert await hub.wait_until_bound({0: {"dt_au": DT}}, timeout=scaled(10))
        address = control.control_address(hub.control_address or "")
        token = control.read_token(address)

        async def ask(req: dict) -> dict:
            return await asyncio.to_thread(control.request, address, req, scaled(5))

        wrong = await ask({"SetParams": {"token": "0", "molecules": [0], "changes": {}}})
        assert wrong["code"] == control.AUTH_FAILED and "SetParams" in wrong["message"]
        bad = await ask({"SetParams": {"token": token, "molecules": [7], "changes": {"a": 1}}})
        assert bad["code"] == control.BAD_ARGUMENT and "molecule 7" in bad["message"]
        both = await ask({"SetParams": {"token": token, "molecules": [0], "kick": [0, 0, 1]}})
        assert both == {"Queued": {"requested": 1, "step": 0}}
        hub.params.requested.clear()
        got = np.zeros_like(fields)
        got[0] = (await hub.step_arrays([0], fields[0])).sources
        ok = {"SetParams": {"token": token, "molecules": [0], "changes": {"omega": 0.3}}}
        assert await ask(ok) == {"Queued": {"requested": 1, "step": 1}}
        assert hub.params.log == []  # queued, not applied during the request
        assert await hub.apply_requested_params() == 1
        for step in range(1, len(fields)):
            got[step] = (await hub.step_arrays([0], fields[step])).sources
        ref = _reference(fields, {1: [("set", {"omega": 0.3})]}, 1)
        assert np.array_equal(got, ref)
    finally:
        await hub.stop()
        for t in threads:
            t.join(scaled(10))


# ----------------------------------------------------------------------------- the machine


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_machine_accept_send_and_answer(how):
    """Accept after INIT, then MXHPARAMS out, MXHPARAMSOK in: PARAMS -> READY, the
    answer reported, any split of the bytes."""
    conn, hub, _ = ready_single()
    assert pp.offer(wire.Limits()) == {"version": 1, "max_bytes": 65536}
    assert pp.accepts(json.loads(conn._init_msg[20:]))
    feed(conn, pp.ACCEPT + READY, how)
    assert conn.params and hub.calls[-1] == ("ready",)
    conn.state = State.READY
    out = b"".join(bytes(p) for p in conn.send_params(4, [pp.Kick((3,), (1.0, 0.0, 0.0))]))
    (ev,) = wire.Decoder("driver").feed(out)
    assert isinstance(ev, wire.Params) and ev.step == 4 and conn.state is State.PARAMS
    assert pp.parse_payload(ev.payload)[0] == 1
    feed(conn, wire.encode_params_ack(1, b'{"error": "molecule 3: parameter kick"}'), how)
    assert conn.state is State.READY and hub.answers == [(1, "molecule 3: parameter kick")]
    assert hub.calls[-1] == ("initialized",)  # a step begun meanwhile would be sent now


@pytest.mark.parametrize(
    ("prepare", "frame", "why"),
    [
        ("ready", wire.encode_params_ack(1, b'{"ok":true}'), "unexpected MXHPARAMSOK while idle"),
        ("params", wire.encode_params_ack(2, b'{"ok":true}'), "while waiting for MXHPARAMSOK"),
        ("params", wire.encode_params_ack(1, b"[]"), r"JSON list, not an object"),
        ("init", wire.encode_params_ack(3, b'{"ok":true}'), "MXHPARAMSOK while waiting for READY"),
    ],
)
def test_machine_refuses_answers_out_of_turn(prepare, frame, why, caplog):
    """An answer nobody asked for, a wrong sequence number or bad JSON drops the driver."""
    conn, _, link = ready_single()
    if prepare != "init":
        conn.params, conn.state = True, State.READY
    if prepare == "params":
        conn.send_params(0, [pp.SetParams((3,), {"omega": 0.3})])
    with caplog.at_level("ERROR", "maxwellhub.hub"):
        conn.receive_data(frame)
    assert link.aborted
    assert re.search(why, caplog.text), caplog.text


def test_machine_refuses_to_send_to_a_peer_that_did_not_accept():
    """send_params to a connection that never accepted is a UsageError naming it."""
    conn, _, _ = ready_single()
    conn.state = State.READY
    with pytest.raises(UsageError, match="driver#1 molecule 3 does not speak"):
        conn.send_params(0, [pp.Kick((3,), (1.0, 0.0, 0.0))])


def test_the_log_travels_in_the_hub_snapshot():
    """Hub.snapshot holds the change log (plain arrays); restore brings it back."""
    hub = Hub(unixsocket=None)
    for m in range(3):
        hub.register_molecule(m)
    hub.params.log = [
        Change(pp.SetParams((0, 1), {"omega": 0.3}), {0: 2, 1: 2}),
        Change(pp.Kick((2,), (0.0, 0.0, 1e-3)), {2: 5}),
    ]
    snap = hub.snapshot()
    assert snap["params_log"].dtype.kind == "U"
    again = Hub(unixsocket=None)
    for m in range(3):
        again.register_molecule(m)
    again.restore(snap)
    assert again.params.log == hub.params.log


async def test_unanswered_change_times_out_naming_the_molecule(unix_name):
    """A driver that does not answer: BarrierTimeout naming its molecule after the hub's
    timeout (the change stays logged); a further change to it is refused meanwhile."""
    hub = Hub(unixsocket=unix_name, timeout=scaled(0.3))
    await hub.start()
    model = _tls(1)
    answered = threading.Event()
    slow = model.set_params

    def late(changes, molecules=None):
        answered.wait(scaled(10))  # the driver hangs until the test lets it go
        slow(changes, molecules)

    model.set_params = late  # type: ignore[method-assign]
    thread = _driver_thread(model, unix_name)
    try:
        assert await hub.wait_until_bound({4: {"dt_au": DT}}, timeout=scaled(10))
        with pytest.raises(BarrierTimeout, match=r"molecule\(s\) \[4\]"):
            await hub.set_params([4], {"omega": 0.3})
        assert len(hub.params.log) == 1
        with pytest.raises(UsageError, match=r"molecule 4: .* not answered an earlier"):
            await hub.set_params([4], {"omega": 0.31})
        answered.set()
        await hub.step_arrays([4], [[1e-3, 0.0, 0.0]])  # sent once the late answer came
        assert model.params["omega"].tolist() == [0.3]
    finally:
        answered.set()
        await hub.stop()
        thread.join(scaled(10))
