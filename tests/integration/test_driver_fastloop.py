"""The single-molecule driver's compiled steady loop (maxwellhub_drivers.fastloop) against
its pure-Python path: the same sessions, byte for byte, and the hand-back to the session
machine on anything that is not a steady step (STATUS, MXHPARAMS, a merged or partial
read, a field that is not finite, STOP, EOF, a signal)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import threading
from typing import Any

import numpy as np
import pytest
from _util import scaled

from maxwellhub import speedups
from maxwellhub.models import create_model
from maxwellhub.protocol import params as params_frames
from maxwellhub.protocol import wire
from maxwellhub_drivers import fastloop
from maxwellhub_drivers.client import (
    EXIT_CONNECTION,
    EXIT_OK,
    EXIT_PROTOCOL,
    DriverSide,
    serve,
)

DT = 0.5
#: The models the loop covers: their parameters and a change of mutable ones.
MODELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "tls": (
        {"pe_initial": 0.2, "e_phase_initial": 0.5, "orientation": 1},
        {"omega": 0.3, "mu12": 150.0},
    ),
    "sho": ({"p_initial": 0.05, "q_initial": 0.1, "orientation": 1}, {"omega": 0.3, "mu0": 150.0}),
}
COMPILED = fastloop.compiled() is not None
needs_compiled = pytest.mark.skipif(
    not COMPILED, reason="maxwellhub_drivers._driverc is not built (or MAXWELLHUB_PURE_PYTHON=1)"
)


def test_the_extension_is_built_where_a_compiler_is():
    """CI cannot lose the compiled loop silently: with a C compiler present it is built,
    unless the pure-Python path was asked for."""
    if speedups.pure_python():
        pytest.skip(f"{speedups.ENV} is set: the pure-Python path is under test")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here: the pure-Python path is the only one")
    assert COMPILED, (
        f"{fastloop.EXTENSION} is not built although a C compiler is present: "
        "rerun `pip install -e .` (./dev.sh setup) and read its compiler errors"
    )


def fields(count: int, seed: int = 7) -> list[list[float]]:
    """A varying field on all three axes, strong enough to turn the Bloch vector by up to
    about 3.5 rad a step (cos and sin over their whole range), with some exact zeros."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        e = 0.019 * math.sin(0.013 * k) + 1e-3 * rng.standard_normal()
        out.append([rng.standard_normal() * 1e-3, 0.0 if k % 50 == 0 else e, -e])
    return out


def init(molecule_id: int = 3, params: bool = False) -> bytes:
    body: dict = {"molecule_id": molecule_id, "dt_au": DT}
    if params:
        body[wire.PARAMS_KEY] = params_frames.offer(wire.Limits())
    return wire.encode_init(molecule_id, json.dumps(body).encode())


class Hub:
    """The hub's end of a socketpair: sends messages, keeps every byte the driver sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(scaled(20))
        self.decoder = wire.Decoder(reader="hub")
        self.raw = bytearray()
        self.events: list = []

    def ask(self, data: bytes, replies: int = 1) -> list:
        """Send ``data``; wait for ``replies`` messages."""
        self.sock.sendall(data)
        got: list = []
        while len(self.events) + len(got) < replies:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("the driver closed the connection")
            self.raw += chunk
            got.extend(self.decoder.feed(chunk))
        self.events.extend(got)
        out, self.events = self.events[:replies], self.events[replies:]
        return out


class Counted:
    """Counts the steps the compiled loop answered (DriverSide.fast_steps)."""

    def __init__(self, monkeypatch) -> None:
        self.committed = 0
        original = DriverSide.fast_steps

        def fast_steps(side, committed, sent):
            self.committed += committed
            original(side, committed, sent)

        monkeypatch.setattr(DriverSide, "fast_steps", fast_steps)


@pytest.fixture(params=sorted(MODELS))
def kind(request) -> str:
    """Each model the compiled loop steps."""
    return request.param


def make(kind: str):
    return create_model(kind, **MODELS[kind][0])


def stepped_alone(kind: str, steps) -> Any:
    """The model stepped in process, no socket: what both paths must leave."""
    model = make(kind)
    model.initialize(dt_au=DT, molecule_ids=[3])
    for field in steps:
        model.step([field])
    return model


def run_session(monkeypatch, pure: bool, script, kind: str):
    """Run ``script(hub)`` against ``serve`` in a thread, on the compiled or the pure path;
    (every byte the driver sent, the exit status, the model, steps answered in C)."""
    with monkeypatch.context() as patch:
        if pure:
            patch.setenv(speedups.ENV, "1")
        else:
            patch.delenv(speedups.ENV, raising=False)
        counted = Counted(patch)
        model = make(kind)
        hub_sock, driver_sock = socket.socketpair()
        result: list = []
        thread = threading.Thread(
            target=lambda: result.append(serve(driver_sock, model)), daemon=True
        )
        with hub_sock, driver_sock:
            thread.start()
            hub = Hub(hub_sock)
            script(hub)
            thread.join(scaled(20))
            assert not thread.is_alive()
        return bytes(hub.raw), result, model, counted.committed


def both(monkeypatch, script, kind: str):
    """The session on both paths; the compiled one must have answered steps in C."""
    pure = run_session(monkeypatch, True, script, kind)
    fast = run_session(monkeypatch, False, script, kind)
    assert pure[3] == 0
    assert fast[3] > 0
    return pure, fast


def same_model(a, b) -> None:
    sa, sb = a.get_state(), b.get_state()
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)
    assert a.time_au == b.time_au
    assert a.extras_of(0) == b.extras_of(0)


def open_session(hub: Hub, params: bool = False) -> None:
    hub.ask(wire.encode_header(wire.STATUS))
    hub.sock.sendall(init(params=params))
    expected = 2 if params else 1  # MXHPARAMSOK (the accept), READY
    hub.ask(wire.encode_header(wire.STATUS), expected)


@needs_compiled
def test_two_thousand_steps_are_byte_equal(monkeypatch, kind):
    """2000 steps under a varying field: every reply byte (sources, extras JSON) and the
    model's final state are the same on both paths, and equal a model stepped alone."""
    steps = fields(2000)

    def script(hub: Hub) -> None:
        open_session(hub)
        for field in steps:
            hub.ask(wire.encode_field_step(field))
        hub.ask(wire.encode_header(wire.STOP))

    (raw_p, res_p, model_p, _), (raw_f, res_f, model_f, in_c) = both(monkeypatch, script, kind)
    assert res_p == res_f == [EXIT_OK]
    assert raw_p == raw_f
    assert in_c == len(steps)
    same_model(model_p, model_f)
    same_model(stepped_alone(kind, steps), model_f)


@needs_compiled
def test_the_ufunc_calls_and_the_direct_loops_give_the_same_bytes(monkeypatch):
    """The TLS loop calls numpy's cos and sin loops directly when they checked out, else
    the ufuncs: 500 strong-field steps give the same bytes either way, and the pure path's."""
    steps = fields(500, seed=9)

    def script(hub: Hub) -> None:
        open_session(hub)
        for field in steps:
            hub.ask(wire.encode_field_step(field))
        hub.ask(wire.encode_header(wire.STOP))

    module = fastloop.compiled()
    assert module is not None
    loops = fastloop.trig_loops(module)
    ufuncs: tuple[Any, ...] = (np.cos, np.sin)
    for info, ufunc in zip(loops, ufuncs, strict=True):
        if info is not None:  # numpy >= 1.24 whose loop checked out
            assert [module.trig_loop(info, a) for a in (0.0, 0.5, -3.0)] == [
                float(ufunc(a)) for a in (0.0, 0.5, -3.0)
            ]
    pure = run_session(monkeypatch, True, script, "tls")
    direct = run_session(monkeypatch, False, script, "tls")
    monkeypatch.setattr(fastloop, "_TRIG_LOOPS", [(None, None)])
    called = run_session(monkeypatch, False, script, "tls")
    assert pure[0] == direct[0] == called[0]
    assert direct[3] == called[3] == len(steps)


@needs_compiled
def test_hand_back_on_other_messages_mid_run(monkeypatch, kind):
    """STATUS, MXHPARAMS (a change and a kick), a merged read of two steps and a step split
    in two reads, between runs of steady steps, then STOP: byte-equal on both paths."""
    steps = fields(60, seed=3)
    change = params_frames.build_payload(
        1, [params_frames.SetParams((3,), MODELS[kind][1])], 1 << 16
    )
    kick = params_frames.build_payload(2, [params_frames.Kick((3,), (0.0, 2e-3, 0.0))], 1 << 16)

    def script(hub: Hub) -> None:
        open_session(hub, params=True)
        for field in steps[:10]:
            hub.ask(wire.encode_field_step(field))
        hub.ask(wire.encode_header(wire.STATUS))
        for field in steps[10:20]:
            hub.ask(wire.encode_field_step(field))
        hub.ask(wire.encode_params(20, change))
        for field in steps[20:30]:
            hub.ask(wire.encode_field_step(field))
        hub.ask(wire.encode_params(30, kick))
        for field in steps[30:40]:
            hub.ask(wire.encode_field_step(field))
        hub.ask(b"".join(wire.encode_field_step(f) for f in steps[40:42]), 2)
        block = wire.encode_field_step(steps[42])
        hub.sock.sendall(block[:100])
        hub.ask(block[100:])
        for field in steps[43:]:
            hub.ask(wire.encode_field_step(field))
        hub.ask(wire.encode_header(wire.STOP))

    (raw_p, res_p, model_p, _), (raw_f, res_f, model_f, in_c) = both(monkeypatch, script, kind)
    assert res_p == res_f == [EXIT_OK]
    assert raw_p == raw_f
    assert in_c >= 40
    same_model(model_p, model_f)
    assert model_f.params["omega"][0] == 0.3


@needs_compiled
def test_eof_mid_run_keeps_every_committed_step(monkeypatch, kind):
    """The hub closes after 25 steps: both paths end with EXIT_CONNECTION and the model
    holds the 25 steps."""
    steps = fields(25, seed=5)

    def script(hub: Hub) -> None:
        open_session(hub)
        for field in steps:
            hub.ask(wire.encode_field_step(field))
        hub.sock.shutdown(socket.SHUT_WR)

    (raw_p, res_p, model_p, _), (raw_f, res_f, model_f, in_c) = both(monkeypatch, script, kind)
    assert res_p == res_f == [EXIT_CONNECTION]
    assert raw_p == raw_f
    assert in_c == 25
    same_model(model_p, model_f)
    assert model_f.time_au == 25 * DT


@needs_compiled
def test_a_field_that_is_not_finite_is_named_by_the_session(monkeypatch, kind):
    """The loop hands a NaN field back; the session machine refuses it as before."""

    def script(hub: Hub) -> None:
        open_session(hub)
        for field in fields(5):
            hub.ask(wire.encode_field_step(field))
        block = bytearray(wire.encode_field_step([0.0, 0.0, 0.0]))
        block[160 + 8 : 168 + 8] = np.array([math.nan]).tobytes()
        hub.sock.sendall(block)  # then serve returns EXIT_PROTOCOL

    (raw_p, res_p, model_p, _), (raw_f, res_f, model_f, _) = both(monkeypatch, script, kind)
    assert res_p == res_f == [EXIT_PROTOCOL]
    assert raw_p == raw_f
    same_model(model_p, model_f)


class Interrupted(Exception):
    pass


@needs_compiled
@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1")
def test_a_signal_handler_raising_ends_the_loop_with_the_state_kept(monkeypatch):
    """A signal while the loop waits in recv() runs the Python handler (EINTR); its
    exception leaves the loop, and the model holds every step answered."""
    monkeypatch.delenv(speedups.ENV, raising=False)
    steps = fields(30, seed=11)
    model = make("tls")
    hub_sock, driver_sock = socket.socketpair()
    done = threading.Event()

    def hub_side() -> None:
        hub = Hub(hub_sock)
        open_session(hub)
        for field in steps:
            hub.ask(wire.encode_field_step(field))
        # the driver now waits for the next step; signal until its handler has run
        # (a signal landing just before recv() is seen at the next EINTR)
        while not done.wait(scaled(0.05)):
            os.kill(os.getpid(), signal.SIGUSR1)

    raised: list[int] = []

    def handler(signum, frame):
        if not raised:  # once: a later signal must not land in the test's own code
            raised.append(signum)
            raise Interrupted

    previous = signal.signal(signal.SIGUSR1, handler)
    thread = threading.Thread(target=hub_side, daemon=True)
    try:
        with hub_sock, driver_sock:
            thread.start()
            with pytest.raises(Interrupted):
                serve(driver_sock, model)
            done.set()
            thread.join(scaled(20))
    finally:
        done.set()
        signal.signal(signal.SIGUSR1, previous)
    same_model(stepped_alone("tls", steps), model)


def test_the_loop_is_not_used_where_it_does_not_apply(monkeypatch):
    """Pure-Python asked for, another model (a subclass may step otherwise), n > 1, or a
    state kept per step: no compiled loop."""
    from maxwellhub.models.tls import TLSModel
    from maxwellhub_drivers.checkpoint import Continuity

    class Tuned(TLSModel):
        pass

    sock_a, sock_b = socket.socketpair()
    log = logging.getLogger("test")
    with sock_a, sock_b:
        monkeypatch.setenv(speedups.ENV, "1")
        assert DriverSide(sock_a, create_model("tls"), log).fast_loop() is None
        monkeypatch.delenv(speedups.ENV)
        assert DriverSide(sock_a, Tuned(), log).fast_loop() is None
        assert DriverSide(sock_a, create_model("tls", n=2), log).fast_loop() is None
        side = DriverSide(sock_a, create_model("tls"), log, continuity=Continuity(memory=True))
        loop = side.fast_loop()
        assert loop is None or not loop.usable()


def sample_floats(count: int, seed: int = 2) -> list[float]:
    """Floats as the extras hold them (probabilities, Bloch components, energies, times
    k dt) and over every magnitude and bit pattern."""
    rng = np.random.default_rng(seed)
    out = [
        *rng.uniform(-1.0, 1.0, count).tolist(),
        *(rng.uniform(0.0, 1.0, count) * 10.0 ** rng.integers(-30, 20, count)).tolist(),
        *(0.5 * rng.integers(0, 10**7, count)).tolist(),
        *np.round(rng.uniform(0, 1000, count), rng.integers(0, 15)).tolist(),
        *rng.integers(0, 2**64, count, dtype=np.uint64).view(np.float64).tolist(),
        *[0.0, -0.0, 0.5, 1.0, 1e-5, 1e16, 1.5e16, 1e17, 0.1 + 0.2, 5e-324, 2.0**-1022],
        *[1234567890123456.0, 12345678901234567.0, 0.0001, 0.00012345, 9.999999999999999e-5],
    ]
    return [v for v in out if math.isfinite(v)]


@needs_compiled
def test_the_loops_float_printing_is_repr():
    """The loop's own shortest-decimal printer prints what repr() prints, or leaves the
    value to Python's (it declines near a tie or an edge, and outside 1e-28 .. 1e17)."""
    module = fastloop.compiled()
    assert module is not None
    values = sample_floats(40_000)
    printed = [module.format_repr(v) for v in values]
    mismatches = [(v, p) for v, p in zip(values, printed, strict=True) if p not in (None, repr(v))]
    assert mismatches == []
    in_range = [p for v, p in zip(values, printed, strict=True) if 1e-27 < abs(v) < 1e16]
    assert sum(p is None for p in in_range) < 0.05 * len(in_range)  # the fast path is used
