"""The steady-state data path (maxwellhub.hub.fastpath): the same answers as the event-loop
path, and every fallback (a driver's death mid-step with replay, deadlines, a stop, a
new driver connecting while the synchronous hub steps) still works."""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
import pytest
from _util import scaled
from fakes import FakeDriver, FakeEnsemble, fake_source

from maxwellhub import BarrierTimeout, Hub, SocketHub
from maxwellhub.hub.core import StopRequested
from maxwellhub.hub.lane import Resume, SteadyLane
from maxwellhub.net import steadyio
from maxwellhub.net.addresses import unix_socket_path
from maxwellhub.protocol import wire


def requests_for(ids, step):
    return {
        m: {"efield_au": np.array([0.1 * step + 1e-17, 0.01 * m, 1.0 / (3 + step)])} for m in ids
    }


class ThreadDriver:
    """A blocking driver in a thread (the synchronous hub cannot host asyncio fakes):
    answers fake_source; ``close_after`` fields: closes on the next one (mid-step);
    ``silent``: never answers a GETSOURCE (``silent_after`` fields: from then on);
    ``split_at``: that step's reply (0-based) is written in two parts, the second once
    the hub has had time to read the first."""

    def __init__(
        self,
        path,
        close_after: int | None = None,
        silent: bool = False,
        silent_after: int | None = None,
        split_at: int | None = None,
    ) -> None:
        self.path = path
        self.close_after = close_after
        self.silent = silent
        self.silent_after = silent_after
        self.split_at = split_at
        self.fields: list[tuple[float, ...]] = []
        self.molecule_id: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ThreadDriver:
        self.thread.start()
        return self

    def join(self) -> None:
        self.thread.join(scaled(10))
        assert not self.thread.is_alive()

    def _run(self) -> None:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(self.path))
        dec = wire.Decoder("driver")
        field = None
        with s:
            while True:
                try:
                    data = s.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for ev in dec.feed(data):
                    if isinstance(ev, wire.Status):
                        ready = self.molecule_id is not None
                        s.sendall(wire.encode_header(wire.READY if ready else wire.NEEDINIT))
                    elif isinstance(ev, wire.Init):
                        self.molecule_id = ev.ident
                    elif isinstance(ev, wire.PosData):
                        if self.close_after is not None and len(self.fields) >= self.close_after:
                            return
                        field = tuple(float(x) for x in ev.field)
                        self.fields.append(field)
                    elif isinstance(ev, wire.GetForce):
                        if not self._mute():
                            assert self.molecule_id is not None and field is not None
                            src = fake_source(self.molecule_id, field)
                            self._reply(s, wire.encode_source_ready(src, b'{"k":1}'))
                    elif isinstance(ev, wire.Stop):
                        s.sendall(wire.encode_header(wire.BYE))
                        return
                    elif isinstance(ev, wire.Exit):
                        return

    def _mute(self) -> bool:
        after = self.silent_after
        return self.silent or (after is not None and len(self.fields) > after)

    def _reply(self, s: socket.socket, reply: bytes) -> None:
        if self.split_at is None or len(self.fields) != self.split_at + 1:
            s.sendall(reply)
            return
        s.sendall(reply[:40])
        time.sleep(scaled(0.05))  # not a wait: the hub must see the first part alone
        s.sendall(reply[40:])


def _expected(ids, step):
    return {m: fake_source(m, r["efield_au"]) for m, r in requests_for(ids, step).items()}


def _run_sync(unix_name, fast: bool, steps: int) -> list[dict]:
    path = unix_socket_path(unix_name)
    with SocketHub(unixsocket=unix_name, timeout=scaled(10), fast_path=fast) as hub:
        ids = [hub.register_molecule_return_id() for _ in range(3)]
        drivers = [ThreadDriver(path).start() for _ in ids]
        assert hub.wait_until_bound({m: {"dt_au": 0.5} for m in ids}, timeout=scaled(10))
        assert hub.hub is not None
        steady = hub.hub.steady
        # Step 0 first: what binding left for the loop (a driver's late answer to a
        # probe, say) may run it once, on a loaded machine; steady steps then may not.
        results = [hub.step(requests_for(ids, 0))]
        loop_runs: list[int] = []
        if steady is not None:
            assert len(steady) == len(ids)  # every initialised driver is read by the steady reader
            run_once = steady._run_loop_once

            def counted() -> None:
                loop_runs.append(1)
                run_once()

            steady._run_loop_once = counted  # type: ignore[method-assign]
        results += [hub.step(requests_for(ids, k)) for k in range(1, steps)]
        assert not loop_runs  # steady steps: not one event-loop iteration
    for d in drivers:
        d.join()
    return results


def test_sync_lane_answers_bitwise_as_the_loop_path(unix_name):
    """SocketHub with the steady reader gives the same sources and extras, bit for bit, as
    with every read through the event loop, without running the loop in a step."""
    fast = _run_sync(unix_name, True, 4)
    slow = _run_sync(unix_name + "b", False, 4)
    for k, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert sorted(a) == sorted(b) == [0, 1, 2]
        for m in a:
            assert a[m]["amp"].tobytes() == b[m]["amp"].tobytes()
            assert tuple(a[m]["amp"]) == _expected([0, 1, 2], k)[m]
            assert a[m]["extra"] == b[m]["extra"] == b'{"k":1}'


def test_sync_driver_death_mid_step_replays_to_a_replacement(unix_name):
    """A driver that dies mid-step is handed back to the loop; a waiting replacement
    is replayed the steps it missed, gets the frozen field, and the step completes."""
    path = unix_socket_path(unix_name)
    with SocketHub(unixsocket=unix_name, timeout=scaled(10), history=8) as hub:
        ids = [hub.register_molecule_return_id() for _ in range(2)]
        dying = ThreadDriver(path, close_after=2).start()
        steady = ThreadDriver(path).start()
        assert hub.wait_until_bound({m: {"dt_au": 0.5} for m in ids}, timeout=scaled(10))
        for k in range(2):
            res = hub.step(requests_for(ids, k))
            assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids, k)
        spare = ThreadDriver(path).start()  # waits unbound until a molecule frees up
        res = hub.step(requests_for(ids, 2), on_lost="wait")
        assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids, 2)
        lost = dying.molecule_id
        assert lost is not None and spare.molecule_id == lost
        # replayed steps 0 and 1, then the frozen field of step 2: bitwise the same
        sent = [tuple(requests_for(ids, k)[lost]["efield_au"].tolist()) for k in range(3)]
        assert spare.fields == sent
        assert len(steady.fields) == 3  # the healthy driver was asked once per step
        assert hub.molecule_steps(ids).tolist() == [3, 3]
        assert hub.hub is not None and hub.hub.steady is not None
        assert len(hub.hub.steady) == 2  # the replacement joined the steady reader
    for d in (dying, steady, spare):
        d.join()


def test_sync_hub_accepts_a_driver_while_stepping(unix_name):
    """A driver that connects while the synchronous hub steps is accepted, bound and
    initialised by the loop runs between the steady reader's waits, with no other call."""
    path = unix_socket_path(unix_name)
    with SocketHub(unixsocket=unix_name, timeout=scaled(10)) as hub:
        assert hub.hub is not None
        ids = [hub.register_molecule_return_id()]
        first = ThreadDriver(path).start()
        assert hub.wait_until_bound({ids[0]: {"dt_au": 0.5}}, timeout=scaled(10))
        ids.append(hub.register_molecule_return_id({"dt_au": 0.5}))
        late = ThreadDriver(path).start()
        deadline = hub.hub.loop.time() + scaled(10)
        k = 0
        while not hub.hub.all_bound([ids[1]]) and hub.hub.loop.time() < deadline:
            res = hub.step(requests_for(ids[:1], k))
            assert tuple(res[ids[0]]["amp"]) == _expected(ids[:1], k)[ids[0]]
            k += 1
        assert hub.hub.all_bound([ids[1]]) and k >= 1  # bound by the steps' loop runs
        res = hub.step(requests_for(ids, k))
        assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids, k)
    first.join()
    late.join()


def test_sync_lane_deadline_and_stop(unix_name):
    """In the steady reader's wait the step deadline fires (BarrierTimeout, the step stays
    frozen) and a stop requested by a loop callback ends the step."""
    path = unix_socket_path(unix_name)
    with SocketHub(unixsocket=unix_name) as hub:
        assert hub.hub is not None and hub._loop is not None
        mid = hub.register_molecule_return_id()
        mute = ThreadDriver(path, silent=True).start()
        assert hub.wait_until_bound({mid: {}}, timeout=scaled(10))
        with pytest.raises(BarrierTimeout, match=str(mid)):
            hub.step(requests_for([mid], 0), timeout=scaled(0.2))
        assert hub.hub.in_step
        hub._loop.call_later(scaled(0.1), hub.hub.request_stop, "by the test")
        with pytest.raises(StopRequested, match="by the test"):
            hub.step(requests_for([mid], 1), timeout=scaled(10))
        assert len(mute.fields) == 1  # the frozen field was sent once
    mute.join()


async def test_async_lane_with_ensembles_matches_the_loop_path(unix_name):
    """The async Hub with the steady reader (ensemble frames read into the decoder, single
    drivers as bytes) returns bit for bit what the loop path returns."""
    out = []
    for fast in (True, False):
        hub = Hub(unixsocket=f"{unix_name}{int(fast)}", timeout=scaled(10), fast_path=fast)
        await hub.start()
        try:
            ens = FakeEnsemble(hub.address, 4).start()
            single = FakeDriver(hub.address).start()
            ids = list(range(5))
            for m in ids:
                hub.register_molecule(m)
            assert await hub.wait_until_bound({m: {"dt_au": 0.5} for m in ids}, timeout=scaled(10))
            if fast:
                assert hub.steady is not None and len(hub.steady) == 2
            else:
                assert hub.steady is None
            fields = np.array([[0.1 * m, -0.2, 1 / 3 + m] for m in ids])
            res = await hub.step_arrays(ids, fields)
            out.append((res.sources.copy(), res.extras()))
        finally:
            await hub.stop(wait=scaled(2))
        assert ens.steps and single.fields
    (a, ea), (b, eb) = out
    assert a.tobytes() == b.tobytes()
    assert a.tolist() == [list(fake_source(m, f)) for m, f in zip(ids, fields, strict=True)]
    assert sorted(ea) == sorted(eb)
    for key in ea:
        assert np.array_equal(ea[key], eb[key], equal_nan=True)


def test_sync_steps_are_direct_and_reuse_their_plan(unix_name):
    """Steady steps of single drivers go through the batched send and read
    (maxwellhub.net.steadyio): every reply lands without the protocol machine, and a step
    with the same drivers as the last reuses its arrays; a driver that joins drops it."""
    path = unix_socket_path(unix_name)
    with SocketHub(unixsocket=unix_name, timeout=scaled(10)) as hub:
        assert hub.hub is not None and hub.hub.steady is not None
        steady = hub.hub.steady
        ids = [hub.register_molecule_return_id() for _ in range(3)]
        drivers = [ThreadDriver(path).start() for _ in ids]
        assert hub.wait_until_bound({m: {"dt_au": 0.5} for m in ids}, timeout=scaled(10))
        # The first step is each driver's learning step (STATUS after its first reply,
        # answered during the second): through the machine, as for every peer.
        for k in range(2):
            hub.step(requests_for(ids, k))
        machine_replies: list[int] = []
        for conn in hub.hub._connections:  # a reply through the machine would call this
            conn.hub = _Spy(conn.hub, machine_replies)  # type: ignore[assignment]
        plans = []
        for k in range(2, 6):
            res = hub.step(requests_for(ids, k))
            assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids, k)
            assert {r["extra"] for r in res.values()} == {b'{"k":1}'}
            plans.append(steady.plan)
        assert machine_replies == []  # every reply was taken by the batched read
        assert plans[0] is not None and all(p is plans[0] for p in plans)
        assert sorted(plans[0].rows) == [0, 1, 2]
        ids.append(hub.register_molecule_return_id({"dt_au": 0.5}))
        drivers.append(ThreadDriver(path).start())
        assert hub.wait_until_bound({m: {"dt_au": 0.5} for m in ids}, timeout=scaled(10))
        for k in range(6, 9):  # its learning steps, then a new plan with all four
            res = hub.step(requests_for(ids, k))
            assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids, k)
        assert steady.plan is not None and steady.plan is not plans[0]
        assert len(steady.plan.fds) == 4
    for d in drivers:
        d.join()


class _Spy:
    """A hub facade that counts source_ready calls (the protocol machine's reply path)."""

    def __init__(self, hub, calls: list[int]) -> None:
        self._hub = hub
        self._calls = calls

    def source_ready(self, *args):
        self._calls.append(1)
        return self._hub.source_ready(*args)

    def __getattr__(self, name):
        return getattr(self._hub, name)


async def test_async_steps_wait_inline_on_the_stdlib_loop(unix_name, monkeypatch):
    """With the stdlib's selector loop and drivers in other threads, the async Hub completes
    a steady step inside the coroutine (the batched read, watching the loop's selector),
    and the loop still serves what comes meanwhile (a driver that connects)."""
    path = unix_socket_path(unix_name)
    hub = Hub(unixsocket=unix_name, timeout=scaled(10))
    await hub.start()
    drivers = []
    try:
        assert hub.steady is not None
        ids = [hub.register_molecule_return_id() for _ in range(2)]
        drivers = [ThreadDriver(path).start() for _ in ids]
        assert await hub.wait_until_bound({m: {"dt_au": 0.5} for m in ids}, timeout=scaled(10))
        inline: list[bool] = []
        wait_inline = hub.steady.wait_inline

        def counted(outer_fd: int, deadline: float) -> bool:
            inline.append(wait_inline(outer_fd, deadline))
            return inline[-1]

        hub.steady.wait_inline = counted  # type: ignore[method-assign]
        lane: list[bool] = []  # steps the lane took whole (maxwellhub.hub.lane)
        lane_step = SteadyLane.step

        def counted_lane(self, requests, timeout):
            out = lane_step(self, requests, timeout)
            lane.append(type(out) is dict)
            return out

        monkeypatch.setattr(SteadyLane, "step", counted_lane)
        for k in range(6):
            res = await hub.step(requests_for(ids, k))
            assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids, k)
        # each step waited inline or went whole through the lane; one may meet a late callback
        assert len(inline) + lane.count(True) == 6
        assert inline.count(True) + lane.count(True) >= 5
        assert lane.count(True) >= 3  # once the drivers are steady, the lane takes the steps
        ids.append(hub.register_molecule_return_id({"dt_au": 0.5}))
        drivers.append(ThreadDriver(path).start())
        k = 6
        deadline = hub.loop.time() + scaled(10)
        while not hub.all_bound([ids[-1]]) and hub.loop.time() < deadline:
            res = await hub.step(requests_for(ids[:2], k))
            assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids[:2], k)
            k += 1
        assert hub.all_bound([ids[-1]])
        res = await hub.step(requests_for(ids, k))
        assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids, k)
    finally:
        await hub.stop(wait=scaled(2))
    for d in drivers:
        d.join()


# ---------------------------------------------------------------- the steady lane


def _lane_spy(monkeypatch) -> list[str]:
    """What each SteadyLane step (dict or array form) returned: "whole", "resumed" or
    "declined"."""
    seen: list[str] = []

    def spied(name):
        real = getattr(SteadyLane, name)

        def spy(self, *args):
            out = real(self, *args)
            kind = "declined" if out is None else "resumed" if isinstance(out, Resume) else "whole"
            seen.append(kind)
            return out

        monkeypatch.setattr(SteadyLane, name, spy)

    spied("step")
    spied("step_arrays")
    return seen


def _bound_hub(unix_name, drivers_args, **hub_kw):
    """A SocketHub (context manager), its molecule ids and ThreadDrivers, all bound."""
    path = unix_socket_path(unix_name)
    hub = SocketHub(unixsocket=unix_name, timeout=scaled(10), **hub_kw)
    ids = [hub.register_molecule_return_id() for _ in drivers_args]
    drivers = [ThreadDriver(path, **kw).start() for kw in drivers_args]
    assert hub.wait_until_bound({m: {"dt_au": 0.5} for m in ids}, timeout=scaled(10))
    return hub, ids, drivers


def test_steady_steps_go_whole_through_the_lane(unix_name, monkeypatch):
    """Once the drivers are steady, a step (dict or array form) goes out and back in one
    pass of the lane (no barrier object, no loop): the same sources and extras, the step
    counted, its time kept, the replay history fed."""
    seen = _lane_spy(monkeypatch)
    hub, ids, drivers = _bound_hub(unix_name, [{}, {}, {}], history=4)
    with hub:
        assert hub.hub is not None
        for k in range(10):
            requests = requests_for(ids, k)
            if k % 3 == 2:  # the array form: ids and fields as arrays, a StepResult back
                fields = np.array([requests[m]["efield_au"] for m in ids])
                out = hub.step_arrays(ids, fields)
                res = {
                    m: {"amp": out.sources[r], "extra": out.extra_bytes(r)}
                    for r, m in enumerate(out.ids.tolist())
                }
            else:
                res = hub.step(requests) if k % 3 else hub.step_barrier(requests)
            assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids, k)
            assert {r["extra"] for r in res.values()} == {b'{"k":1}'}
        assert seen.count("whole") >= 6 and "resumed" not in seen
        assert hub.hub.step_index == 10 and len(hub.hub.stepper.step_ms) == 10
        assert hub.molecule_steps(ids).tolist() == [10, 10, 10]
        assert hub.hub.stepper.barrier is None
        assert sum(hub.hub.stepper.last_to_answer.values()) == 10
    for d in drivers:
        d.join()


def test_driver_death_in_a_lane_step_hands_the_step_over(unix_name, monkeypatch):
    """A driver that dies in a lane step: the step is handed over frozen, a replacement
    is replayed what it missed and the frozen field, and the step completes."""
    seen = _lane_spy(monkeypatch)
    hub, ids, drivers = _bound_hub(unix_name, [{"close_after": 6}, {}], history=8)
    with hub:
        path = unix_socket_path(unix_name)
        for k in range(6):
            res = hub.step(requests_for(ids, k))
            assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids, k)
        assert seen[-1] == "whole"
        spare = ThreadDriver(path).start()  # waits unbound until a molecule frees up
        res = hub.step(requests_for(ids, 6))
        assert seen[-1] == "resumed"
        assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids, 6)
        lost = drivers[0].molecule_id
        assert lost is not None and spare.molecule_id == lost
        sent = [tuple(requests_for(ids, k)[lost]["efield_au"].tolist()) for k in range(7)]
        assert spare.fields == sent  # replayed 0..5, then the frozen field of step 6
        assert hub.molecule_steps(ids).tolist() == [7, 7]
    for d in [*drivers, spare]:
        d.join()


def test_split_reply_in_a_lane_step_goes_to_the_machine(unix_name, monkeypatch):
    """A reply that arrives in two reads is handed to the driver's protocol machine; the
    step completes with the right source and later steps take the lane again."""
    seen = _lane_spy(monkeypatch)
    hub, ids, drivers = _bound_hub(unix_name, [{"split_at": 5}, {}])
    with hub:
        for k in range(9):
            res = hub.step(requests_for(ids, k))
            assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids, k)
            assert {r["extra"] for r in res.values()} == {b'{"k":1}'}
        assert seen.count("resumed") == 1 and seen[-1] == "whole"
    for d in drivers:
        d.join()


def test_deadline_in_a_lane_step_keeps_the_step_frozen(unix_name, monkeypatch):
    """A driver that stops answering: the lane's wait ends at the step's deadline, the
    step raises BarrierTimeout naming the molecule and stays frozen."""
    seen = _lane_spy(monkeypatch)
    hub, ids, drivers = _bound_hub(unix_name, [{"silent_after": 5}, {}])
    with hub:
        assert hub.hub is not None
        for k in range(5):
            hub.step(requests_for(ids, k))
        mute = drivers[0].molecule_id
        with pytest.raises(BarrierTimeout, match=rf"molecule\(s\) \[{mute}\] within"):
            hub.step(requests_for(ids, 5), timeout=scaled(0.2))
        assert seen[-1] == "resumed" and hub.hub.in_step
        assert len(drivers[0].fields) == 6
    for d in drivers:
        d.join()


def test_interrupt_in_a_lane_step_keeps_the_step_frozen(unix_name, monkeypatch):
    """Ctrl-C in the lane's wait: the step stays frozen, and the next call completes it
    with the fields first sent, not the new ones."""
    seen = _lane_spy(monkeypatch)
    hub, ids, drivers = _bound_hub(unix_name, [{}, {}])
    with hub:
        for k in range(5):
            hub.step(requests_for(ids, k))
        collect = steadyio.collect

        def interrupted(*args):
            monkeypatch.setattr(steadyio, "collect", collect)
            raise KeyboardInterrupt

        monkeypatch.setattr(steadyio, "collect", interrupted)
        with pytest.raises(KeyboardInterrupt):
            hub.step(requests_for(ids, 5))
        assert hub.hub is not None and hub.hub.in_step
        res = hub.step(requests_for(ids, 99))  # continues the frozen step 5
        assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids, 5)
        res = hub.step(requests_for(ids, 6))
        assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids, 6)
        assert seen[-1] == "whole" and hub.molecule_steps(ids).tolist() == [7, 7]
    for d in drivers:
        d.join()


def test_short_write_in_a_lane_step_is_queued(unix_name, monkeypatch):
    """A block a socket took only part of is queued on its transport (which keeps the
    order), and the step completes."""
    seen = _lane_spy(monkeypatch)
    hub, ids, drivers = _bound_hub(unix_name, [{}, {}])
    with hub:
        for k in range(5):
            hub.step(requests_for(ids, k))
        send = steadyio.send

        def short(fds, rows, fields):
            monkeypatch.setattr(steadyio, "send", send)
            rest = send(fds[1:], rows[1:], fields)
            block = wire.encode_field_step(fields[rows[0]])
            os.write(int(fds[0]), block[:50])
            return [(0, 50)] + [(k + 1, n) for k, n in rest]

        monkeypatch.setattr(steadyio, "send", short)
        res = hub.step(requests_for(ids, 5))
        assert seen[-1] == "resumed"
        assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids, 5)
        for k in range(6, 9):
            res = hub.step(requests_for(ids, k))
            assert {m: tuple(r["amp"]) for m, r in res.items()} == _expected(ids, k)
        assert seen[-1] == "whole"
    for d in drivers:
        d.join()
