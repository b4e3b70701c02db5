"""The asyncio hub and its synchronous facade, against in-process fake drivers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest
from _util import scaled
from fakes import FakeDriver, fake_source

from maxwellhub import (
    BarrierTimeout,
    Hub,
    SocketHub,
    UsageError,
    am_master,
    get_available_host_port,
    mpi_bcast_from_master,
    wire,
)
from maxwellhub.net.addresses import unix_socket_path

_T = TypeVar("_T")


@pytest.fixture
async def hub(unix_name):
    """A started async Hub on a fresh UNIX socket, stopped afterwards."""
    h = Hub(unixsocket=unix_name, timeout=scaled(10))
    await h.start()
    yield h
    await h.stop(wait=scaled(2))


def requests_for(ids, step):
    return {m: {"efield_au": np.array([0.1 * step, 0.01 * m, 1.0 + step])} for m in ids}


async def bind(hub, n, payload=None, **fake_kw):
    ids = [hub.register_molecule_return_id() for _ in range(n)]
    fakes = [FakeDriver(hub.address, **fake_kw).start() for _ in ids]
    payloads = {m: dict(payload or {"dt_au": 0.5}) for m in ids}
    assert await hub.wait_until_bound(payloads, timeout=scaled(10))
    return ids, fakes


def check_results(results, ids, step):
    assert sorted(results) == sorted(ids)
    for m in ids:
        field = requests_for(ids, step)[m]["efield_au"]
        assert tuple(results[m]["amp"]) == fake_source(m, field)


async def test_binding_in_connection_order_with_init_payload(hub):
    """Anonymous drivers bind to ids in order; INIT carries id, molecule_id, dt_au, user keys."""
    ids = [hub.register_molecule_return_id() for _ in range(3)]
    fakes = []
    for m in ids:
        fakes.append(FakeDriver(hub.address).start())
        assert await hub.wait_until_bound({m: {"dt_au": 0.25, "user": "x"}}, timeout=scaled(5))
    for m, fake in zip(ids, fakes, strict=True):
        assert fake.molecule_id == m
        # The resume offer (wire.RESUME_KEY) rides along: nothing completed, no history;
        # so does the offer of parameter frames (wire.PARAMS_KEY).
        assert fake.init_json == {
            "dt_au": 0.25,
            "user": "x",
            "molecule_id": m,
            "mxh_resume": {"version": 1, "step": 0, "history": 0},
            "mxh_params": {"version": 1, "max_bytes": 65536},
        }
        assert fake.messages[:2] == ["Status", "Init"]  # probed before binding


async def test_steps_deliver_sources_and_extras(hub):
    """Several steps: every molecule gets its own field and its source comes back."""
    ids, _fakes = await bind(hub, 4)
    for step in range(5):
        results = await hub.step(requests_for(ids, step), timeout=scaled(5))
        check_results(results, ids, step)
        assert all(json.loads(results[m]["extra"]) == {"n": step + 1} for m in ids)
    assert hub.step_index == 5


async def test_step_barrier_timeout_keeps_frozen_field(hub):
    """A silent driver makes step_barrier return {}; the retry reuses the frozen fields and
    does not ask the healthy drivers again."""
    ids, fakes = await bind(hub, 3)
    slow = fakes[1]
    slow.silent_after = 0  # answers nothing from the first field on
    assert await hub.step_barrier(requests_for(ids, 0), timeout=0.2) == {}
    assert await hub.step_barrier(requests_for(ids, 7), timeout=0.2) == {}  # new fields ignored
    assert [len(f.fields) for f in fakes] == [1, 1, 1]
    assert all(
        f.fields[0] == tuple(requests_for(ids, 0)[m]["efield_au"])
        for m, f in zip(ids, fakes, strict=True)
    )


async def test_replacement_gets_frozen_field_and_others_step_once(hub):
    """A driver lost mid-step is replaced; the replacement gets the same frozen field, the
    replies already received are kept and healthy drivers step exactly once."""
    ids, fakes = await bind(hub, 4)
    await hub.step(requests_for(ids, 0), timeout=scaled(5))
    victim = fakes[2]
    victim.close_after = 1  # closes on its second field, without answering
    step = asyncio.create_task(hub.step(requests_for(ids, 1), timeout=scaled(10)))
    await asyncio.wait_for(victim.closed.wait(), scaled(5))
    replacement = FakeDriver(hub.address).start()
    results = await asyncio.wait_for(step, scaled(10))
    check_results(results, ids, 1)
    assert replacement.molecule_id == ids[2]
    assert replacement.fields == [tuple(requests_for(ids, 1)[ids[2]]["efield_au"])]
    assert [len(f.fields) for i, f in enumerate(fakes) if i != 2] == [2, 2, 2]


async def test_step_barrier_returns_empty_when_a_driver_is_lost(hub):
    """step_barrier aborts with {} when a driver dies mid-step; the next call completes the
    same step once a replacement binds, without asking the others again."""
    ids, fakes = await bind(hub, 3, close_after=0)
    fakes[0].close_after = fakes[2].close_after = None
    assert await hub.step_barrier(requests_for(ids, 0), timeout=scaled(5)) == {}
    FakeDriver(hub.address).start()
    assert await hub.wait_until_bound(ids, timeout=scaled(5))
    results = await hub.step_barrier(requests_for(ids, 9), timeout=scaled(5))
    check_results(results, ids, 0)  # the frozen step-0 fields, not step 9's
    assert [len(fakes[0].fields), len(fakes[2].fields)] == [1, 1]


async def test_step_deadline_names_missing_molecules(hub):
    """When no replacement comes, step raises BarrierTimeout naming the missing molecule."""
    ids, fakes = await bind(hub, 3)
    fakes[1].close_after = 0
    with pytest.raises(BarrierTimeout) as info:
        await hub.step(requests_for(ids, 0), timeout=0.5)
    assert info.value.missing == [ids[1]]
    assert f"[{ids[1]}]" in str(info.value) and "no driver connected" in str(info.value)


def _bad_frames():
    ok = wire.encode_source_ready((1.0, 2.0, 3.0), b"{}")
    nan = bytearray(ok)
    struct.pack_into("<d", nan, 24, float("nan"))
    nat2 = bytearray(ok)
    struct.pack_into("<i", nat2, 20, 2)
    huge = bytearray(ok[:124])
    struct.pack_into("<i", huge, 120, 2**31 - 1)
    return {
        "wrong header": b"HELLO       " + bytes(112),
        "nat 2": bytes(nat2),
        "extras 2 GiB": bytes(huge),
        "NaN source": bytes(nan),
        "truncated then close": ok[:60],
    }


@pytest.mark.parametrize("kind", list(_bad_frames()))
async def test_bad_frame_drops_only_that_connection(hub, kind, caplog):
    """A bad frame from one driver drops it with a log line naming it; the other molecules
    keep stepping and the step completes once a replacement binds."""
    caplog.set_level(logging.WARNING, logger="maxwellhub.hub")
    ids, fakes = await bind(hub, 3)
    bad = fakes[1]
    bad.bad_reply = _bad_frames()[kind]
    assert await hub.step_barrier(requests_for(ids, 0), timeout=scaled(5)) == {}
    named = [r.getMessage() for r in caplog.records if f"molecule {ids[1]}" in r.getMessage()]
    assert named, caplog.text
    if kind != "truncated then close":
        assert any(
            r.levelno == logging.ERROR and "dropping" in r.getMessage() for r in caplog.records
        ), caplog.text
    FakeDriver(hub.address).start()
    results = await hub.step(requests_for(ids, 0), timeout=scaled(5))
    check_results(results, ids, 0)
    assert [len(fakes[0].fields), len(fakes[2].fields)] == [1, 1]
    results = await hub.step(requests_for(ids, 1), timeout=scaled(5))
    check_results(results, ids, 1)


async def test_garbage_from_unbound_peer_does_not_disturb(hub, caplog):
    """A peer that connects and sends garbage is dropped; bound molecules step on."""
    caplog.set_level(logging.ERROR, logger="maxwellhub.hub")
    ids, _fakes = await bind(hub, 2)
    reader, writer = await asyncio.open_unix_connection(hub.address)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), scaled(5)) == wire.encode_header(wire.STATUS)
    check_results(await hub.step(requests_for(ids, 0), timeout=scaled(5)), ids, 0)
    assert "unknown message header" in caplog.text


async def test_unexpected_message_is_a_protocol_error(hub, caplog):
    """A FORCEREADY nobody asked for drops the connection with a clear reason."""
    caplog.set_level(logging.ERROR, logger="maxwellhub.hub")
    _ids, _fakes = await bind(hub, 1)
    reader, writer = await asyncio.open_unix_connection(hub.address)
    await reader.readexactly(12)
    writer.write(wire.encode_header(wire.NEEDINIT) + wire.encode_source_ready((0, 0, 0)))
    assert await asyncio.wait_for(reader.read(), scaled(5)) == b""
    assert "unexpected FORCEREADY" in caplog.text


async def test_stale_unix_socket_is_replaced(unix_name):
    """A leftover socket file nobody listens on is removed after a probe."""
    path = unix_socket_path(unix_name)
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # file stays, nobody listens
    h = Hub(unixsocket=unix_name)
    await h.start()
    await h.stop()
    assert not os.path.exists(path)


async def test_absolute_unix_path_used_as_given(tmp_path):
    """An absolute path is used as given."""
    path = str(tmp_path / "hub.sock")
    h = Hub(unixsocket=path, timeout=scaled(5))
    await h.start()
    assert h.address == path and stat.S_ISSOCK(os.stat(path).st_mode)
    ids, _fakes = await bind(h, 2)
    check_results(await h.step(requests_for(ids, 0), timeout=scaled(5)), ids, 0)
    await h.stop()


@pytest.mark.parametrize("dialect,expected", [("maxwelllink", "Stop"), ("ipi", "Exit")])
async def test_shutdown_sends_stop_or_exit(unix_name, dialect, expected):
    """Shutdown sends STOP (answered by BYE) or, for stock i-PI peers, EXIT."""
    h = Hub(unixsocket=unix_name, timeout=scaled(5), dialect=dialect)
    await h.start()
    _ids, fakes = await bind(h, 2)
    await h.stop(wait=scaled(2))
    await asyncio.wait_for(asyncio.gather(*(f.closed.wait() for f in fakes)), scaled(5))
    assert all(f.messages[-1] == expected for f in fakes)
    assert h.status()["connections"] == 0


async def test_unknown_molecule_and_bad_field_are_usage_errors(hub):
    """Requests for unregistered ids or with non-finite fields name the molecule."""
    ids, _ = await bind(hub, 1)
    with pytest.raises(UsageError, match="molecule 99"):
        await hub.step({99: {"efield_au": [0, 0, 0]}})
    with pytest.raises(UsageError, match=f"molecule {ids[0]}.*not finite"):
        await hub.step({ids[0]: {"efield_au": [0, float("inf"), 0]}})
    with pytest.raises(ValueError, match="already registered"):
        hub.register_molecule(ids[0])


def _thread_driver(path, stop_after):
    """A blocking fake driver in a thread, for the synchronous facade."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    dec = wire.Decoder("driver")
    mid, field, init = None, None, False
    with s:
        while True:
            data = s.recv(4096)
            if not data:
                return
            for ev in dec.feed(data):
                if isinstance(ev, wire.Status):
                    s.sendall(wire.encode_header(wire.READY if init else wire.NEEDINIT))
                elif isinstance(ev, wire.Init):
                    mid, init = ev.ident, True
                elif isinstance(ev, wire.PosData):
                    field = ev.field
                elif isinstance(ev, wire.GetForce):
                    assert mid is not None, "GETSOURCE before INIT"
                    s.sendall(wire.encode_source_ready(fake_source(mid, field)))
                elif isinstance(ev, wire.Stop):
                    s.sendall(wire.encode_header(wire.BYE))
                    return


def test_sync_facade_runs_steps_and_cleans_up(unix_name):
    """SocketHub's synchronous API: bind, step_barrier, context-manager stop."""
    path = unix_socket_path(unix_name)
    with SocketHub(unixsocket=unix_name, timeout=scaled(10), latency=0.5) as hub:
        ids = [hub.register_molecule_return_id() for _ in range(2)]
        threads = [threading.Thread(target=_thread_driver, args=(path, 3)) for _ in ids]
        for t in threads:
            t.start()
        assert hub.wait_until_bound({m: {"dt_au": 1.0} for m in ids}, timeout=scaled(10))
        assert hub.all_bound(ids)
        loop_ran: list[int] = []
        run = hub._run

        def counted_run(coro: Coroutine[Any, Any, _T]) -> _T:
            loop_ran.append(1)
            return run(coro)

        with pytest.MonkeyPatch.context() as patch:  # count the loop's iterations
            patch.setattr(hub, "_run", counted_run)
            assert hub.all_bound(ids) and not loop_ran  # bound: read directly, no loop
            assert not hub.all_bound([*ids, 99]) and loop_ran == [1]  # not: one poll
        for step in range(3):
            check_results(hub.step_barrier(requests_for(ids, step)), ids, step)
    for t in threads:
        t.join(scaled(5))
        assert not t.is_alive()
    assert not os.path.exists(path)
    assert hub.step_barrier(requests_for(ids, 0)) == {}  # stopped: paused contract


async def test_sync_facade_refuses_running_loop(unix_name):
    """Calling the synchronous API inside a running event loop is a clear error."""
    with pytest.raises(UsageError, match="running event loop"):
        SocketHub(port=0)


def test_helpers_without_mpi(tmp_path):
    """am_master, mpi_bcast_from_master and get_available_host_port work on one process."""
    assert am_master()
    value = {"a": [1, 2.5], "b": None}
    assert mpi_bcast_from_master(value) == value
    arr = np.arange(6.0).reshape(2, 3)
    assert mpi_bcast_from_master(arr) is arr
    host, port = get_available_host_port(save_to_file=tmp_path / "addr")
    assert host == "127.0.0.1" and 0 < port < 65536
    assert (tmp_path / "addr").read_text().split() == [host, str(port)]


async def test_abort_policy_names_the_lost_molecule(hub):
    """With on_lost='abort', a driver lost mid-step raises DriverLost naming its molecule
    at once, and the step can still be completed later by a replacement."""
    from maxwellhub import DriverLost

    ids, fakes = await bind(hub, 3)
    fakes[2].close_after = 0
    with pytest.raises(DriverLost, match=rf"\[{ids[2]}\]"):
        await asyncio.wait_for(hub.step(requests_for(ids, 0), on_lost="abort"), scaled(5))
    FakeDriver(hub.address).start()
    check_results(await hub.step(requests_for(ids, 0), timeout=scaled(5)), ids, 0)
    assert [len(fakes[0].fields), len(fakes[1].fields)] == [1, 1]


# ------------------------------------------------------------------ ensemble drivers


async def test_ensemble_driver_binds_many_ids_and_steps_with_one_frame(hub):
    """An ensemble driver (MXHHELLO) takes M ids, gets one batched frame per step, and
    its sources and per-molecule extras arrays come back row for row."""
    from fakes import FakeEnsemble

    ids = [hub.register_molecule_return_id() for _ in range(7)]
    single = FakeDriver(hub.address).start()
    assert await hub.wait_until_bound({ids[0]: {"dt_au": 0.5}}, timeout=scaled(5))
    ens = FakeEnsemble(hub.address, 6).start()
    assert await hub.wait_until_bound({m: {"dt_au": 0.5, "k": m} for m in ids}, timeout=scaled(5))
    assert single.molecule_id == ids[0] and ens.molecule_ids == ids[1:]
    assert ens.init_json is not None and ens.init_json["dt_au"] == 0.5
    assert [p["k"] for p in ens.init_json["payloads"]] == ids[1:]  # they differ: all sent
    for step in range(3):
        req = requests_for(ids, step)
        fields = np.array([req[m]["efield_au"] for m in ids])
        result = await hub.step_arrays(np.array(ids), fields, timeout=scaled(5))
        want = np.array([fake_source(m, fields[i]) for i, m in enumerate(ids)])
        np.testing.assert_array_equal(result.sources, want)
        extras = result.extras()
        np.testing.assert_array_equal(extras["id"][1:], ids[1:])
        assert np.isnan(extras["id"][0]) and extras["n"].tolist() == [2 * step + 1] * 7
        check_results(await hub.step(requests_for(ids, step)), ids, step)
    assert len(ens.steps) == 6 and ens.messages.count("FieldsBatch") == 6
    assert ens.messages[:2] in (["Welcome", "Status"], ["Status", "Welcome"])


async def test_ensemble_replaced_mid_step_gets_frozen_fields(hub):
    """A dead ensemble driver's molecules go to its replacement with the frozen fields;
    the single driver beside it is not asked twice."""
    from fakes import FakeEnsemble

    ids = [hub.register_molecule_return_id() for _ in range(5)]
    single = FakeDriver(hub.address).start()
    assert await hub.wait_until_bound({ids[0]: {"dt_au": 0.5}}, timeout=scaled(5))
    ens = FakeEnsemble(hub.address, 4, close_after=1).start()
    assert await hub.wait_until_bound({m: {"dt_au": 0.5} for m in ids}, timeout=scaled(5))
    await hub.step(requests_for(ids, 0), timeout=scaled(5))
    step = asyncio.create_task(hub.step(requests_for(ids, 1), timeout=scaled(10)))
    await asyncio.wait_for(ens.closed.wait(), scaled(5))
    replacement = FakeEnsemble(hub.address, 4).start()
    check_results(await asyncio.wait_for(step, scaled(10)), ids, 1)
    frozen = np.array([requests_for(ids, 1)[m]["efield_au"] for m in ids[1:]])
    np.testing.assert_array_equal(replacement.steps[0], frozen)
    assert len(single.fields) == 2


async def test_batched_frame_with_wrong_count_is_dropped(hub, caplog):
    """An MXHSOURCES whose M differs from the negotiated one drops that driver, naming it."""
    caplog.set_level(logging.ERROR, logger="maxwellhub.hub")
    ids = [hub.register_molecule_return_id() for _ in range(3)]
    reader, writer = await asyncio.open_unix_connection(hub.address)
    writer.write(wire.encode_hello(3))
    dec = wire.Decoder("driver")
    events: list[wire.Event] = []
    while not any(isinstance(e, wire.Welcome) for e in events):
        events += dec.feed(await asyncio.wait_for(reader.read(1 << 16), scaled(5)))
    dec.batch = 3  # batched frames from here on, as a driver's decoder after MXHWELCOME

    async def until(kind: type) -> None:
        # the hub's next message of this kind: each answer goes out after what it answers
        got: list[wire.Event] = []
        while not any(isinstance(e, kind) for e in got):
            got += dec.feed(await asyncio.wait_for(reader.read(1 << 16), scaled(5)))

    writer.write(wire.encode_header(wire.NEEDINIT))
    task = asyncio.create_task(hub.step_barrier(requests_for(ids, 0), timeout=scaled(5)))
    await until(wire.Init)
    writer.write(wire.encode_header(wire.READY))
    await until(wire.FieldsBatch)
    writer.write(wire.encode_sources_batch(np.zeros((2, 3))))
    assert await asyncio.wait_for(task, scaled(10)) == {}
    assert "M = 2 molecules, negotiated 3" in caplog.text


def test_extras_arrays_skip_what_is_not_a_json_object():
    """Extras are the peer's: bytes that are not JSON, JSON that is not an object, and
    values that are not numbers are skipped, never raised on (a stock client's extras are
    one zero byte)."""
    from maxwellhub.hub import StepResult

    result = StepResult(
        np.array([4, 5, 6, 7]),
        np.zeros((4, 3)),
        {0: b"\x00", 1: b"[1, 2]", 2: b'{"Pe": 0.25, "s": "x", "b": true}', 3: b"17"},
        [],
    )
    out = result.extras()
    assert set(out) == {"Pe"}
    assert np.isnan(out["Pe"][[0, 1, 3]]).all() and out["Pe"][2] == 0.25
