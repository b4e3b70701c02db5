"""The hub's pure parts with no socket at all: binding order and claims (registry), the
replay window (history), and the frozen-step contract (the core driven by sans-I/O
connections)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import pytest
from _events import as_kind

from maxwellhub.errors import UsageError
from maxwellhub.hub import Hub
from maxwellhub.hub.barrier import Layout
from maxwellhub.hub.history import History
from maxwellhub.hub.registry import Registry
from maxwellhub.protocol import wire
from maxwellhub.protocol.connection import Connection, Lane, Parts, State

STATUS = wire.encode_header(wire.STATUS)
READY = wire.encode_header(wire.READY)
NEEDINIT = wire.encode_header(wire.NEEDINIT)


class Conn:
    """What the registry needs of a connection."""

    def __init__(self, size: int = 1, claim: list[int] | None = None) -> None:
        self.state, self.size, self.claim = State.UNBOUND, size, claim
        self.molecules: list = []

    def bind(self, mols) -> None:
        self.molecules, self.state = list(mols), State.BOUND


# ---------------------------------------------------------------- registry


def test_binding_order_is_arrival_then_registration():
    """Connections bind in arrival order to free ids in registration order."""
    reg = Registry()
    for mid in (5, 2, 9):
        reg.register(mid)
    a, b = Conn(), Conn()
    reg.offer(a)
    reg.offer(b)
    assert reg.progress() == [a, b]
    assert [m.id for m in a.molecules] == [5] and [m.id for m in b.molecules] == [2]
    assert reg.driverless == {9} and reg.missing([5, 2, 9]) == [5, 2, 9]


def test_ensemble_takes_as_many_ids_as_it_hosts_or_waits():
    """An ensemble of 3 waits while only 2 ids are free, then takes 3 at once."""
    reg = Registry()
    reg.register(0)
    reg.register(1)
    ens = Conn(size=3)
    reg.offer(ens)
    assert reg.progress() == [] and reg.waiting_molecules() == 3
    reg.register(2)
    assert reg.progress() == [ens] and [m.id for m in ens.molecules] == [0, 1, 2]


def test_claim_waits_for_registration_and_lets_others_pass():
    """A claim for unregistered ids waits; an anonymous connection behind it binds."""
    reg = Registry()
    reg.register(0)
    claimer, anon = Conn(claim=[7]), Conn()
    reg.offer(claimer)
    reg.offer(anon)
    assert reg.progress() == [anon] and anon.molecules[0].id == 0
    reg.register(7)
    assert reg.progress() == [claimer] and claimer.molecules[0].id == 7


def test_claim_of_a_held_id_binds_as_anonymous():
    """A claim for an id another connection holds is bound like any other."""
    reg = Registry()
    reg.register(0)
    reg.register(1)
    first = Conn()
    reg.offer(first)
    reg.progress()
    late = Conn(claim=[0])
    reg.offer(late)
    assert reg.progress() == [late] and late.molecules[0].id == 1


def test_release_frees_molecules_and_spares_are_bounded():
    """A lost connection's molecules are free again; spares beyond max_spare are refused."""
    reg = Registry(max_spare=1)
    reg.register(0)
    a = Conn()
    reg.offer(a)
    reg.progress()
    assert [m.id for m in reg.release(a)] == [0] and reg.driverless == {0}
    reg.offer(Conn())  # binds later
    assert "max_spare = 1" in (reg.offer(Conn(size=2)) or "")
    with pytest.raises(ValueError, match="already registered"):
        reg.register(0)


# ---------------------------------------------------------------- history


def _layout(ids, generation=1):
    ids = np.asarray(ids, dtype=np.int64)
    return Layout(ids, generation, np.arange(len(ids), dtype=np.intp))


def test_counts_are_lazy_and_exact():
    """Completed steps of one layout are counted once read, then per molecule."""
    hist = History(0)
    lay = _layout([10, 11])
    hist.follow(lay)
    for _ in range(5):
        hist.completed(lay, np.zeros((2, 3)))
    assert lay.pending == 5 and hist.steps(0) == 5 and lay.pending == 0
    assert hist.offer(1, 11) == (5, 0)  # depth 0: nothing to replay


def test_replay_window_keeps_the_last_depth_steps():
    """With depth 3, a driver restored at step 2 of 6 cannot be replayed; at step 3 it
    gets steps 3, 4, 5, oldest first."""
    hist = History(3)
    lay = _layout([4])
    hist.follow(lay)
    for k in range(6):
        hist.completed(lay, np.full((1, 3), float(k)))
    assert hist.offer(0, 4) == (6, 3)
    assert hist.fields([4], False, 2, 6) is None
    got = hist.fields([4], False, 3, 6)
    assert got is not None and [f[0, 0] for f in got] == [3.0, 4.0, 5.0]


def test_snapshot_restore_round_trip():
    """snapshot() then restore() into a fresh history gives the same counts and window."""
    hist = History(2)
    lay = _layout([0, 1])
    hist.follow(lay)
    for k in range(3):
        hist.completed(lay, np.full((2, 3), float(k)))
    snap = hist.snapshot(np.array([0, 1]))
    again = History(2)
    again.restore(snap, {0: 0, 1: 1}, lambda ids, index: Layout(ids, 9, index))
    assert again.steps(0) == 3 and again.offer(1, 1) == (3, 2)
    with pytest.raises(UsageError, match="this hub registered"):
        History(2).restore(snap, {0: 0}, lambda ids, index: Layout(ids, 9, index))


def test_history_depth_must_be_a_whole_number():
    """A depth of True or -1 is a usage error."""
    for bad in (True, -1, 1.5):
        with pytest.raises(UsageError):
            History(bad)  # type: ignore[arg-type]  # 1.5 on purpose: the run-time check


# ---------------------------------------------------------------- the frozen step


class Link:
    """A connection's I/O layer that records what the hub writes; it declines every
    shared-memory lane offer."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.aborted = False

    def write(self, parts: Parts) -> None:
        if parts:
            self.sent.append(b"".join(bytes(p) for p in parts))

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        pass

    def arm(self, seconds: float) -> None:
        pass

    def disarm(self) -> None:
        pass

    def later(self, seconds: float, callback: Callable[[], Parts]) -> None:
        pass

    def hosting(self, molecules: int) -> None:
        pass

    def ended(self, said_bye: bool) -> None:
        pass

    def offer_lane(self, parts: Parts, extras: int) -> Lane | None:
        self.write(parts)
        return None  # no lane: steps go over the socket


@pytest.fixture
def hub():
    """A Hub with an event loop that never runs and no listening socket."""
    h = Hub(port=0)
    loop = asyncio.new_event_loop()
    h._loop = loop  # what start() sets; nothing here listens or waits
    yield h
    loop.close()


def connect(hub: Hub, number: int) -> tuple[Connection, Link]:
    """A driver that connects, answers NEEDINIT, takes its INIT and says READY."""
    conn = Connection(hub, number, limits=hub.limits)
    conn.link = link = Link()
    hub._connection_made(conn)
    link.write(conn.start())
    link.write(conn.receive_data(NEEDINIT))
    link.write(conn.receive_data(READY))
    return conn, link


def field_sent(data: bytes) -> list[float]:
    return as_kind(wire.Decoder("driver").feed(data)[0], wire.PosData).positions[0].tolist()


def test_frozen_step_survives_a_lost_driver_and_a_new_request(hub):
    """A step freezes its fields: a replacement for a lost driver gets the frozen field
    (not the new request's), a driver that answered is not asked again, and the result
    holds both sources."""
    hub.register_molecule(0, {"dt_au": 1})
    hub.register_molecule(1, {"dt_au": 1})
    a, a_link = connect(hub, 1)
    b, _b_link = connect(hub, 2)
    assert hub.all_bound([0, 1]) and a.state is State.READY
    ids, first = np.array([0, 1]), np.array([[1.0, 0, 0], [2.0, 0, 0]])
    barrier = hub.begin_step(ids, first, None, abort_on_loss=True)
    assert barrier is not None and field_sent(a_link.sent[-1]) == [1.0, 0, 0]
    a.receive_data(wire.encode_source_ready((10.0, 0, 0), b"{}"))
    b.connection_lost(None)  # b dies before answering
    assert barrier.lost == [1] and hub.finish_step(barrier) is None  # incomplete
    c, c_link = connect(hub, 3)  # the replacement binds molecule 1
    assert hub.all_bound([1])
    asked = len(a_link.sent)
    again = hub.begin_step(np.array([0, 1]), np.array([[9.0, 9, 9]] * 2), None, True)
    assert again is barrier and len(a_link.sent) == asked  # a is not asked twice
    assert field_sent(c_link.sent[-1]) == [2.0, 0, 0]  # the frozen field, not 9
    c.receive_data(wire.encode_source_ready((20.0, 0, 0), b"{}"))
    result = hub.finish_step(barrier)
    assert result is not None and result.sources[:, 0].tolist() == [10.0, 20.0]
    assert hub.step_index == 1 and not hub.in_step and hub.molecule_steps([0, 1]).tolist() == [1, 1]


def test_new_event_loop_is_the_stdlib_selector_loop_by_default(monkeypatch) -> None:
    """The default loop lets a steady step wait inside the coroutine (it has a selector to
    watch); uvloop only when asked, by argument or MAXWELLHUB_LOOP."""
    from maxwellhub import new_event_loop
    from maxwellhub.hub.fastpath import can_wait_detached

    monkeypatch.delenv("MAXWELLHUB_LOOP", raising=False)
    loop = new_event_loop()
    try:
        assert isinstance(loop, asyncio.SelectorEventLoop) and can_wait_detached(loop)
    finally:
        loop.close()
    import uvloop

    monkeypatch.setenv("MAXWELLHUB_LOOP", "uvloop")
    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop) and not can_wait_detached(loop)
    finally:
        loop.close()
    with pytest.raises(UsageError, match="event loop kind"):
        new_event_loop("trio")


class _Transport:
    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False


class _Conn:
    def __init__(self) -> None:
        self.sent = 0
        self.buffered = 0

    def send_step_direct(self) -> bool:
        self.sent += 1
        return True


class _Proto:
    def __init__(self) -> None:
        self.transport = _Transport()
        self.conn = _Conn()


def test_a_direct_step_takes_only_sockets_the_steady_reader_holds() -> None:
    """A driver the steady reader gave back to the loop (its socket may be closed and the
    number reused by the next connection) never enters a step's batched send, even while
    its machine still looks idle; one the reader holds does."""
    from maxwellhub.hub.barrier import Barrier
    from maxwellhub.hub.fastpath import DirectStep

    ids = np.array([7, 8])
    barrier = Barrier(Layout(ids, 1, np.arange(2, dtype=np.intp)), np.zeros((2, 3)), True)
    held, given_back = _Proto(), _Proto()
    members: dict[int, Any] = {5: held}
    direct = DirectStep(barrier, 1 << 20, None, members)
    assert not direct.add(cast(Any, given_back), 6, 1)
    assert not direct.add(cast(Any, given_back), 5, 1)  # fd 5 is another driver's
    assert given_back.conn.sent == 0  # its machine was not touched
    assert direct.add(cast(Any, held), 5, 0)
    assert direct.fds == [5] and direct.rows == [0] and held.conn.sent == 1


def test_a_reused_plan_starts_each_step_with_every_driver_on_the_batched_read() -> None:
    """A driver whose read went to its protocol machine mid-frame is read by it for the
    rest of that step only: the plan's flags are cleared before the plan is reused."""
    from maxwellhub.hub.barrier import Barrier
    from maxwellhub.hub.fastpath import DirectStep, _Plan

    class Split(_Proto):  # its machine now holds part of a frame
        def data_received(self, data: bytes) -> None:
            self.conn.buffered = len(data)

    ids = np.array([7, 8])
    barrier = Barrier(Layout(ids, 1, np.arange(2, dtype=np.intp)), np.zeros((2, 3)), True)
    raw = np.zeros(2, dtype=np.uint8)
    protos: list[Any] = [_Proto(), Split()]
    plan = _Plan(1, protos, [p.conn for p in protos], [5, 6], [0, 1],
                 np.array([5, 6], np.int32), np.array([0, 1], np.int64),
                 np.array([-1] * 5 + [0, 1], np.int32), raw)  # fmt: skip
    direct = DirectStep(barrier, 1 << 20, plan, {})
    direct.protos, direct.raw = protos, plan.raw
    direct.hand_over(1, b"FORCEREADY  ")
    assert raw.tolist() == [0, 1] and plan.dirty
    assert plan.clean_raw().tolist() == [0, 0] and not plan.dirty
