"""The shared-memory lane (maxwellhub.net.shm_lane): bitwise round trip across a forked
driver, dead peers seen in the poll, nothing left after close or SIGKILL, stale and torn
sequences refused. No timing is asserted."""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
from typing import Any

import numpy as np
import pytest

from maxwellhub.net import shm_lane
from maxwellhub.net.shm_lane import Barrier, LaneError, PeerGone
from maxwellhub.protocol import wire

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memfd/eventfd")

CONST = 0.5
BELLS = pytest.mark.parametrize("bell", ["eventfd", "socket"])


def _memfds(pid: int) -> list[str]:
    """The memfd lanes process ``pid`` holds open (descriptors or mappings)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "maxwellhub-lane" in target:
            found.append(target)
    with open(f"/proc/{pid}/maps") as maps:
        found += [line for line in maps if "maxwellhub-lane" in line]
    return found


def _fork_driver(steps: int, mode: str = "echo") -> tuple[int, socket.socket]:
    """A forked driver on a socketpair: accepts the lane, answers ``sources = fields *
    CONST`` for ``steps`` steps (``mode="stale"``: answers step 1 with sequence 0)."""
    hub_sock, drv_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            hub_sock.close()
            lane = shm_lane.accept(drv_sock)
            poller = lane.driver_poller()
            for _ in range(steps):
                f = lane.wait_fields(poller)
                if mode == "stale":
                    lane.step -= 1
                np.multiply(f, CONST, out=lane.sources)
                if lane.n_extras:
                    lane.extras[:, 0] = f[:, 0] + 1.0
                lane.post_sources()
            if mode == "hang":
                signal.pause()
        except BaseException:
            code = 1
        os._exit(code)
    drv_sock.close()
    return pid, hub_sock


def _reap(pid: int) -> int:
    return os.waitpid(pid, 0)[1]


@BELLS
def test_round_trip_is_bitwise_and_nothing_is_left_after_close(bell):
    pid, sock = _fork_driver(steps=3)
    lane = shm_lane.create(sock, molecules=5, extras=1, bell=bell)
    rng = np.random.default_rng(7)
    barrier = Barrier([lane])
    for step in (1, 2, 3):
        fields = rng.standard_normal((5, 3)) * 10.0 ** rng.integers(-300, 300, (5, 3))
        lane.fields[...] = fields
        barrier.step(step, timeout=5)
        assert lane.sources.tobytes() == (fields * CONST).tobytes()
        assert lane.extras[:, 0].tobytes() == (fields[:, 0] + 1.0).tobytes()
    assert _reap(pid) == 0
    assert _memfds(os.getpid())  # still mapped here
    barrier.close()
    lane.close()
    lane.close()  # idempotent
    assert _memfds(os.getpid()) == []


@BELLS
def test_killed_driver_is_seen_in_the_poll_and_its_lane_is_freed(bell):
    pid, sock = _fork_driver(steps=1, mode="hang")
    lane = shm_lane.create(sock, molecules=2, bell=bell)
    barrier = Barrier([lane])
    barrier.step(1, timeout=5)
    assert _memfds(pid)  # the driver maps the segment
    os.kill(pid, signal.SIGKILL)
    _reap(pid)
    lane.fields[...] = 1.0
    with pytest.raises(PeerGone, match="lane 0: driver closed its socket"):
        barrier.step(2, timeout=5)
    barrier.close()
    lane.close()
    assert _memfds(os.getpid()) == []  # the kernel freed the segment: no name, no leak
    assert not [n for n in os.listdir("/dev/shm") if "maxwellhub" in n]


@BELLS
def test_killed_hub_is_seen_by_the_driver(bell):
    hub_sock, drv_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the "hub"
        drv_sock.close()
        shm_lane.create(hub_sock, molecules=1, bell=bell)
        signal.pause()
        os._exit(0)
    hub_sock.close()
    lane = shm_lane.accept(drv_sock)
    os.kill(pid, signal.SIGKILL)
    _reap(pid)
    with pytest.raises(PeerGone, match="hub closed its socket"):
        lane.wait_fields(lane.driver_poller())
    lane.close()


@BELLS
def test_stale_sequence_is_refused(bell):
    pid, sock = _fork_driver(steps=1, mode="stale")
    lane = shm_lane.create(sock, molecules=1, bell=bell)
    barrier = Barrier([lane])
    with pytest.raises(LaneError, match="stale sources: sequence 0, expected step 1"):
        barrier.step(1, timeout=5)
    _reap(pid)
    barrier.close()
    lane.close()


def test_torn_and_out_of_order_sequences_are_refused():
    hub_sock, drv_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        hub_sock.close()
        shm_lane.accept(drv_sock).close()
        os._exit(0)
    drv_sock.close()
    lane = shm_lane.create(hub_sock, molecules=1)
    _reap(pid)
    lane.write_fields([[1.0, 2.0, 3.0]], step=1)
    with pytest.raises(LaneError, match="does not follow step 1"):
        lane.write_fields([[1.0, 2.0, 3.0]], step=1)
    assert lane._mm is not None
    struct.pack_into("<qq", lane._mm, 40, 1, 0)  # a writer died between begin and end
    os.eventfd_write(lane.to_hub, 1)
    with pytest.raises(LaneError, match="torn sources: sequence begin 1 != end 0"):
        lane.take_sources()
    lane.close()


def test_a_tcp_socket_stays_on_the_socket():
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s,
        pytest.raises(LaneError, match="needs a UNIX socket"),
    ):
        shm_lane.create(s, molecules=1)


def test_an_unsealed_segment_is_refused():
    """A segment that a peer could shrink under the mapping (SIGBUS) is not accepted."""
    hub_sock, drv_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    *_, size = shm_lane.layout(1)
    seg = os.memfd_create("maxwellhub-lane", os.MFD_CLOEXEC)
    os.ftruncate(seg, size)
    offer = wire.encode_shm_lane(1, 0, size, flags=shm_lane.BELL_ON_SOCKET)
    socket.send_fds(hub_sock, [offer], [seg])
    os.close(seg)
    with pytest.raises(LaneError, match="not sealed"):
        shm_lane.accept(drv_sock)
    hub_sock.close()
    drv_sock.close()
    assert _memfds(os.getpid()) == []


# ----------------------------------------------------------------------------- negotiated
# The lane inside the maxwellhub handshake: the connection machine with fakes, a hub with a
# raw peer, and real ensemble drivers (processes, and in-process threads for a decline).

TLS = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 0.1}
DT_AU = 0.5


class _Hub:
    """The callbacks the machine makes, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args[1:]))

    def replay_offer(self, conn):
        return 0, 0


class _Lane:
    def __init__(self) -> None:
        self.active = False
        self.settled: list[bool] = []
        self.posted: list[tuple] = []
        self.closed = False

    def settle(self, accepted):
        self.settled.append(accepted)
        self.active = accepted

    def post(self, fields, flags):
        self.posted.append((fields.copy(), flags))

    def close(self):
        self.closed = True


class _Link:
    def __init__(self, give_lane: bool) -> None:
        self.give_lane = give_lane
        self.offers: list[tuple[bytes, int]] = []
        self.lane: _Lane | None = None
        self.aborted = False

    def offer_lane(self, parts, extras):
        self.offers.append((b"".join(bytes(p) for p in parts), extras))
        self.lane = _Lane() if self.give_lane else None
        return self.lane

    def abort(self):
        self.aborted = True

    def __getattr__(self, name):
        return lambda *args: None


def _machine(give_lane: bool = True):
    from maxwellhub.protocol.connection import Connection

    hub, link = _Hub(), _Link(give_lane)
    conn = Connection(hub, 1, limits=wire.Limits(), handshake_timeout=5.0)
    conn.link = link
    conn.start()
    return conn, hub, link


def test_machine_offers_the_lane_after_welcome_and_steps_through_it():
    """MXHHELLO with bit 0 makes the machine hand MXHWELCOME to the I/O layer's offer (in
    order, with K from bits 8..15); after MXHSHMOK a step goes to the lane, not the socket,
    and the lane is released when the connection goes."""
    from maxwellhub.protocol.connection import State

    conn, _, link = _machine()
    hello = wire.encode_hello(3, flags=wire.hello_lane_flags(7))
    assert conn.receive_data(hello) == []
    assert link.offers == [(wire.encode_welcome(3), 7)]
    conn.receive_data(wire.encode_header(wire.NEEDINIT) + wire.encode_shm_answer(True))
    assert link.lane is not None and link.lane.settled == [True]

    class Mol:
        def __init__(self, mid):
            self.id, self.payload = mid, {"dt_au": DT_AU}

    class Step:
        fields = np.arange(9.0).reshape(3, 3)
        field_bytes = None
        want_extras, want_dipoles = False, True

    class Layout:
        def __init__(self) -> None:
            self.generation = 1
            self.row = {0: 0, 1: 1, 2: 2}

    conn.bind([Mol(0), Mol(1), Mol(2)])
    conn.send_init()
    conn.receive_data(wire.encode_header(wire.READY))
    conn.state = State.READY
    assert conn.place(Layout())
    assert conn.send_step(Step()) == []  # nothing on the socket
    assert conn.state is State.BUSY
    ((fields, flags),) = link.lane.posted
    assert fields.tobytes() == Step.fields.tobytes() and flags == wire.WANT_DIPOLES
    conn.connection_lost(None)
    assert link.lane.closed


def test_machine_without_the_flag_never_offers_and_refuses_a_stray_answer():
    """A plain MXHHELLO (flags 0) gets MXHWELCOME on the socket and no offer; MXHSHMOK
    that answers nothing, or a second one, is a protocol error that drops the peer."""
    conn, _, link = _machine()
    out = b"".join(bytes(p) for p in conn.receive_data(wire.encode_hello(2)))
    assert out == wire.encode_welcome(2) and link.offers == []
    conn.receive_data(wire.encode_shm_answer(True))
    assert link.aborted
    conn, _, link = _machine()
    conn.receive_data(wire.encode_hello(2, flags=wire.HELLO_SHM_LANE))
    conn.receive_data(wire.encode_shm_answer(True) + wire.encode_shm_answer(True))
    assert link.aborted and link.lane is not None and link.lane.settled == [True]


def test_machine_with_a_declined_lane_steps_on_the_socket():
    """MXHSHMNO: the lane is settled False (closed by the hub side) and the step is an
    MXHFIELDS frame as without a lane."""
    conn, _, link = _machine()
    conn.receive_data(wire.encode_hello(2, flags=wire.HELLO_SHM_LANE))
    conn.receive_data(wire.encode_shm_answer(False))
    assert link.lane is not None and link.lane.settled == [False] and not link.lane.active


async def _hello_answers(address, flags: int) -> list:
    """A raw peer opens with MXHHELLO(``flags``); the hub's messages until STATUS and
    MXHWELCOME came, plus anything else already sent."""
    import asyncio

    from _util import scaled

    if isinstance(address, tuple):
        reader, writer = await asyncio.open_connection(*address)
    else:
        reader, writer = await asyncio.open_unix_connection(address)
    writer.write(wire.encode_hello(2, flags=flags))
    dec = wire.Decoder("driver")
    events: list = []
    try:
        while not any(isinstance(e, wire.Welcome) for e in events) or (
            flags and not any(isinstance(e, wire.ShmLane) for e in events)
        ):
            data = await asyncio.wait_for(reader.read(4096), scaled(10))
            assert data, "the hub closed the connection"
            events += dec.feed(data)
    finally:
        writer.close()
    return events


@pytest.mark.parametrize("where", ["tcp", "unix-off"])
async def test_tcp_or_an_unwilling_hub_declines_with_size_zero(where, unix_name, tcp_port):
    """Over TCP (never a lane) or with Hub(shm_lane=False), an offer is answered with
    MXHSHMLANE of size 0; a plain MXHHELLO gets no MXHSHMLANE at all."""
    from maxwellhub import Hub

    if where == "tcp":
        hub = Hub(host="127.0.0.1", port=tcp_port)
    else:
        hub = Hub(unixsocket=unix_name, shm_lane=False)
    await hub.start()
    try:
        events = await _hello_answers(hub.address, wire.HELLO_SHM_LANE)
        lanes = [e for e in events if isinstance(e, wire.ShmLane)]
        assert [(e.molecules, e.size) for e in lanes] == [(2, 0)]
        plain = await _hello_answers(hub.address, 0)
        assert not any(isinstance(e, wire.ShmLane) for e in plain)
    finally:
        await hub.stop()


async def _until(predicate, seconds: float, what: str) -> None:
    """Wait until ``predicate()`` holds (the hub's side of closed connections has no event
    to await), failing after ``seconds``."""
    import asyncio

    end = asyncio.get_running_loop().time() + seconds
    while not predicate():
        assert asyncio.get_running_loop().time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _segments() -> int:
    """The lane segments this process (the hub) has mapped."""
    return sum(" rw-s " in line for line in _memfds(os.getpid()))


def _ensemble_thread(address: str):
    import threading

    from _util import scaled

    from maxwellhub.models import create_model
    from maxwellhub_drivers.client import run_client

    model = create_model("tls", n=2, **TLS)
    t = threading.Thread(
        target=run_client, args=(model,), kwargs={"unix": address, "timeout": scaled(10)}
    )
    t.start()
    return t


async def test_a_hello_flood_gets_at_most_the_cap_of_lanes_and_drivers_still_step(unix_name):
    """Connections that only say MXHHELLO offering the lane get at most MAX_PENDING_LANES
    segments; the rest are answered MXHSHMLANE of size 0, each counted in the hub's
    rate-limited peer lines. A real ensemble driver arriving meanwhile steps on its
    socket; once the flood is gone, the next one gets its lane."""
    import asyncio

    from _util import scaled

    from maxwellhub import Hub
    from maxwellhub.hub.shm import MAX_PENDING_LANES

    flood = MAX_PENDING_LANES + 16
    hub = Hub(unixsocket=unix_name, timeout=scaled(10))
    await hub.start()
    address = hub.address
    assert isinstance(address, str)
    mapped = _segments()
    writers, lanes, threads = [], [], []
    try:
        for _ in range(flood):
            reader, writer = await asyncio.open_unix_connection(address)
            writers.append(writer)
            writer.write(wire.encode_hello(2, flags=wire.HELLO_SHM_LANE))
            dec, events = wire.Decoder("driver"), list[wire.Event]()
            while not any(isinstance(e, wire.ShmLane) for e in events):
                data = await asyncio.wait_for(reader.read(4096), scaled(10))
                assert data, "the hub closed a flood connection"
                events += dec.feed(data)  # the descriptors are dropped by the kernel
            lanes += [e.size for e in events if isinstance(e, wire.ShmLane)]
        assert sum(size > 0 for size in lanes) == MAX_PENDING_LANES
        assert _segments() - mapped == MAX_PENDING_LANES
        assert hub.lanes.refused == flood - MAX_PENDING_LANES
        assert hub.peer_log is not None and hub.peer_log.seen >= flood - MAX_PENDING_LANES
        assert any("no shared-memory lane" in kind for kind in hub.peer_log.held)

        threads.append(_ensemble_thread(address))  # while the flood holds the lanes
        pair = {0: {"dt_au": DT_AU}, 1: {"dt_au": DT_AU}}
        assert await hub.wait_until_bound(pair, timeout=scaled(10))
        assert hub.lanes.refused == flood - MAX_PENDING_LANES + 1
        for writer in writers:
            writer.close()
        await _until(lambda: len(hub._connections) == 1, scaled(10), "the flood's end")
        assert _segments() == mapped  # every flood lane was released

        threads.append(_ensemble_thread(address))
        pair = {2: {"dt_au": DT_AU}, 3: {"dt_au": DT_AU}}
        assert await hub.wait_until_bound(pair, timeout=scaled(10))
        fields = 1e-3 * np.arange(12.0).reshape(4, 3)
        res = await hub.step_arrays([0, 1, 2, 3], fields)
        assert np.isfinite(res.sources).all()
        on_lane = [c for c in hub._connections if c.lane is not None and c.lane.active]
        assert [[m.id for m in c.molecules] for c in on_lane] == [[2, 3]]
    finally:
        for writer in writers:
            writer.close()
        await hub.stop()
        for t in threads:
            t.join(scaled(10))


def _lane_connections(hub) -> list:
    return [c for c in hub.hub._connections if c.lane is not None and c.lane.active]


def _run_ensembles(unix_name, steps, *, lane, kill_at=None, ckpt=None, dipoles=False):
    """Two ensemble drivers (2 molecules each) stepped ``steps`` times; the sources and the
    extras of every step, and how many lane steps the hub made."""
    from _util import scaled

    from maxwellhub import SocketHub
    from maxwellhub.run.launch import reap, start_driver

    rng = np.random.default_rng(5)
    fields = 2e-3 * rng.standard_normal((steps, 4, 3))
    args = ["--molecules", "2"]
    if ckpt is not None:
        args += ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "4"]
    hub = SocketHub(unixsocket=unix_name, timeout=scaled(30), history=5, shm_lane=lane)
    procs, sources, extras, lane_steps = [], [], [], 0
    with hub:
        ids = [hub.register_molecule_return_id() for _ in range(4)]
        for pair in (ids[:2], ids[2:]):
            procs.append(
                start_driver("tls", TLS, unix=unix_name, timeout=scaled(30), extra_args=args)
            )
            assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in pair}, timeout=scaled(30))
        for step in range(steps):
            if step == kill_at:
                procs[1].kill()
                procs[1].wait(timeout=scaled(10))
                procs.append(
                    start_driver("tls", TLS, unix=unix_name, timeout=scaled(30), extra_args=args)
                )
            res = hub.step_arrays(
                ids, fields[step], timeout=scaled(30), extras=not dipoles, dipoles=dipoles
            )
            sources.append(res.sources.copy())
            extras.append({k: v.copy() for k, v in res.extras().items()})
            lane_steps += len(_lane_connections(hub))
        hub.graceful_shutdown(wait=scaled(5))
    reap(procs, timeout=scaled(10))
    return np.array(sources), extras, lane_steps


def _same(a, b) -> None:
    (sa, ea, _), (sb, eb, _) = a, b
    assert sa.tobytes() == sb.tobytes(), np.abs(sa - sb).max()
    assert len(ea) == len(eb)
    for x, y in zip(ea, eb, strict=True):
        assert sorted(x) == sorted(y)
        for key in x:
            assert x[key].tobytes() == y[key].tobytes(), key


def test_ensembles_over_the_lane_equal_the_socket_bitwise(unix_name):
    """Hub.step_arrays with two ensemble drivers asking the dipoles only: through the
    negotiated lane (every step of both drivers) the sources and dipoles equal the socket
    run's bit for bit (all extras: the next test); nothing of the lanes is left in the
    hub's process after stop."""
    on = _run_ensembles(unix_name, 12, lane=None, dipoles=True)
    off = _run_ensembles(unix_name, 12, lane=False, dipoles=True)
    assert on[2] == 2 * 12 and off[2] == 0
    _same(on, off)
    assert sorted(on[1][0]) == sorted(wire.DIPOLE_KEYS)
    assert _memfds(os.getpid()) == []


def test_a_killed_lane_driver_is_replaced_with_exact_continuity(unix_name, tmp_path):
    """An ensemble driver on the lane, killed at step 11 (checkpoints every 4 steps): the
    hub sees its socket close, its replacement restores step 8, is replayed 8..10 with
    MXHFIELDS on the socket, then steps on a new lane; everything equals the
    uninterrupted socket run bit for bit, every extras array included."""
    want = _run_ensembles(unix_name, 16, lane=False, ckpt=tmp_path / "a")
    got = _run_ensembles(unix_name, 16, lane=None, ckpt=tmp_path / "b", kill_at=11)
    _same(got, want)
    assert got[2] == 2 * 16  # after every step both drivers are on a lane, the new one too
    assert _memfds(os.getpid()) == []


def test_a_driver_that_declines_stays_on_the_socket(unix_name, monkeypatch, caplog):
    """A driver whose segment does not check out answers MXHSHMNO and is stepped with
    batched frames; its answers equal those of a driver that never offered the lane."""
    import logging

    def refuse(offer, fds, sock):
        for fd in fds:
            os.close(fd)
        raise LaneError("refused by the test")

    monkeypatch.setattr(shm_lane, "map_offer", refuse)
    caplog.set_level(logging.INFO)
    declined, on_lane = _run_in_thread(unix_name, monkeypatch, "1")
    assert on_lane == 0
    assert any(
        "declining the shared-memory lane: refused by the test" in r.getMessage()
        for r in caplog.records
    )
    assert any("declined the shared-memory lane" in r.getMessage() for r in caplog.records)
    never, _ = _run_in_thread(unix_name, monkeypatch, "0")
    assert declined.tobytes() == never.tobytes()


def _run_in_thread(unix_name, monkeypatch, env: str, secret=None) -> tuple[np.ndarray, int]:
    """An ensemble session of 2 molecules in a thread of this process (environment
    MAXWELLHUB_SHM_LANE=``env``), stepped 6 times: the sources, and whether it was on
    a lane at the end."""
    import threading

    from _util import scaled

    from maxwellhub import SocketHub
    from maxwellhub.models import create_model
    from maxwellhub_drivers.client import EXIT_OK, serve

    monkeypatch.setenv("MAXWELLHUB_SHM_LANE", env)
    fields = 2e-3 * np.random.default_rng(2).standard_normal((6, 2, 3))
    status: list[int] = []
    out = []
    with SocketHub(unixsocket=unix_name, timeout=scaled(30), auth=secret) as hub:
        ids = [hub.register_molecule_return_id() for _ in range(2)]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(hub.address))
        model = create_model("tls", n=2, **TLS)
        thread = threading.Thread(target=lambda: status.append(serve(sock, model, secret=secret)))
        thread.start()
        assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=scaled(30))
        for step in range(6):
            out.append(hub.step_arrays(ids, fields[step], timeout=scaled(30)).sources)
        on_lane = len(_lane_connections(hub))
        hub.graceful_shutdown(wait=scaled(5))
        thread.join(scaled(10))
        sock.close()
    assert status == [EXIT_OK]
    return np.array(out), on_lane


def test_with_a_secret_the_lane_is_offered_after_the_proof(unix_name, monkeypatch):
    """A hub with a secret: the ensemble's MXHHELLO comes before its MXHPROOF, the lane is
    passed only after the proof, and the steps through it equal the socket's."""
    from maxwellhub.protocol.auth import Secret

    secret = Secret(b"k" * 32)
    lane, on_lane = _run_in_thread(unix_name, monkeypatch, "1", secret)
    assert on_lane == 1
    sock, _ = _run_in_thread(unix_name, monkeypatch, "0", secret)
    assert lane.tobytes() == sock.tobytes()


def test_a_driver_offers_the_lane_only_on_a_unix_socket(monkeypatch):
    """An ensemble session offers the lane on a UNIX socket, never on TCP, and not when
    MAXWELLHUB_SHM_LANE=0; the offer's K covers the model's extras and the dipoles."""
    from types import SimpleNamespace

    from maxwellhub_drivers.shm_driver import for_session

    model = SimpleNamespace(extras_keys=("Pe", "mux_au"), n=2)
    fake: Any = SimpleNamespace  # stands in for an EnsembleSession (sock, model, log)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix,
    ):
        assert for_session(fake(sock=tcp, model=model, log=None)) is None
        lane = for_session(fake(sock=unix, model=model, log=None))
        assert lane is not None
        assert lane.hello_flags() == wire.HELLO_SHM_LANE | 4 << wire.HELLO_EXTRAS_SHIFT
        monkeypatch.setenv("MAXWELLHUB_SHM_LANE", "0")
        assert for_session(fake(sock=unix, model=model, log=None)) is None


def test_a_cavity_run_over_the_lane_equals_the_socket_bitwise(unix_name, tmp_path):
    """EngineCoupling with a driven single-mode cavity (dipole gauge, DSE: the engine needs
    every molecule's dipole each step) and one ensemble driver of 4 TLS: 100 steps through
    the lane give the socket run's records bit for bit."""
    import json
    import math
    import subprocess

    from _util import scaled

    from maxwellhub import SocketHub
    from maxwellhub.em import EngineCoupling, SingleModeCavity
    from maxwellhub.run.launch import driver_command, driver_env, reap

    params = tmp_path / "tls.json"
    params.write_text(json.dumps(dict(TLS, pe_initial=0.05)))
    runs = []
    for lane in (None, False):
        hub = SocketHub(unixsocket=unix_name, shm_lane=lane)
        procs = []
        try:
            cavity = SingleModeCavity(
                frequency_au=0.242,
                damping_au=1e-4,
                coupling_strength=2e-4,
                coupling_axis="z",
                include_dse=True,
                drive=lambda t: 1e-3 * math.sin(0.2 * t),
            )
            coupling = EngineCoupling(cavity, DT_AU, hub=hub, record_every=5)
            coupling.add_socket_molecules(positions=np.linspace(100.0, 400.0, 4))
            for mid in range(4):
                hub.register_molecule(mid)
            cmd = driver_command(
                "tls", None, unix=unix_name, timeout=60,
                extra_args=["--molecules", "4", "--params-file", str(params)],
            )  # fmt: skip
            procs = [subprocess.Popen(cmd, env=driver_env())]
            assert hub.wait_until_bound(list(range(4)), require_init=False, timeout=scaled(60))
            coupling.run(steps=100)
            assert len(_lane_connections(hub)) == (1 if lane is None else 0)
            runs.append(coupling.history())
        finally:
            hub.stop()
            reap(procs, scaled(10))
    on, off = runs
    assert sorted(on) == sorted(off)
    for key in on:
        assert np.asarray(on[key]).tobytes() == np.asarray(off[key]).tobytes(), key
    assert np.ptp(on["engine/qc_au"]) > 0
