"""Hostile input against a live hub while healthy drivers keep stepping: a small,
deterministic version of benchmarks/hostile.py (issue 5, item 3).

Each attack runs in a thread (blocking sockets) while a barrier loop steps 4 healthy
FakeDrivers. Attacks run one at a time, so the hub's driver numbers accepted during an
attack belong to it, and its log lines can be matched to its connections."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import pytest
from _util import REPO_ROOT, scaled
from fakes import FakeDriver, fake_source

from maxwellhub import Hub, wire

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import hostile  # noqa: E402

HEALTHY = 4
HUB_TIMEOUT = 1.0


class Stepping:
    """Steps the barrier in the background, checking every source and extras count."""

    def __init__(self, hub: Hub, ids: list[int]) -> None:
        self.hub, self.ids = hub, ids
        self.steps = 0
        self.stop = False
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        hub, ids = self.hub, self.ids
        while not self.stop:
            k = hub.step_index
            res = await hub.step({m: {"efield_au": hostile.field_of(k, m)} for m in ids},
                                 timeout=scaled(10))
            for m in ids:
                assert tuple(res[m]["amp"]) == fake_source(m, hostile.field_of(k, m))
                assert json.loads(res[m]["extra"]) == {"n": k + 1}
            self.steps += 1
            await asyncio.sleep(0)

    async def finish(self) -> None:
        self.stop = True
        await asyncio.wait_for(self.task, scaled(10))


@pytest.fixture
async def live(unix_name, caplog):
    """A hub (timeout 1 s) with 4 healthy FakeDrivers stepping; checks them afterwards."""
    caplog.set_level(logging.WARNING, logger="maxwellhub.hub")
    hub = Hub(unixsocket=unix_name, timeout=scaled(HUB_TIMEOUT))
    await hub.start()
    ids = [hub.register_molecule_return_id() for _ in range(HEALTHY)]
    fakes = [FakeDriver(hub.address).start() for _ in ids]
    assert await hub.wait_until_bound({m: {"dt_au": 0.5} for m in ids}, timeout=scaled(10))
    stepping = Stepping(hub, ids)
    try:
        yield hub, stepping
        await stepping.finish()
        # Every healthy molecule stepped exactly once per step.
        assert [len(f.fields) for f in fakes] == [hub.step_index] * HEALTHY
        # A new healthy driver still binds and steps.
        new = FakeDriver(hub.address).start()
        mid = hub.register_molecule_return_id({"dt_au": 0.5})
        assert await hub.wait_until_bound([mid], timeout=scaled(10))
        k = hub.step_index
        res = await hub.step({m: {"efield_au": hostile.field_of(k, m)} for m in [*ids, mid]},
                             timeout=scaled(10))
        assert tuple(res[mid]["amp"]) == fake_source(mid, hostile.field_of(k, mid))
        assert len(new.fields) == 1
    finally:
        stepping.stop = True
        await hub.stop(wait=scaled(2))


async def until(predicate, seconds: float, what: str) -> None:
    """Wait until ``predicate()`` holds, failing after ``seconds``."""
    end = asyncio.get_running_loop().time() + seconds
    while not predicate():
        assert asyncio.get_running_loop().time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def attack(live, caplog, fn, *args, **kw):
    """Run one attacker in a thread while the barrier steps; wait until the hub accepted
    and closed all its connections. Returns (attacker result, {driver number: lines})."""
    hub, stepping = live
    first, mark, steps = hub._accepted + 1, len(caplog.records), stepping.steps
    result = await asyncio.to_thread(fn, hub.address, *args, **kw)
    await until(lambda: hub._accepted - first + 1 >= result["connections"], scaled(10),
                "the hub to accept every attacker connection")
    await until(lambda: len(hub._connections) == HEALTHY, scaled(10),
                "the connection count to return to the healthy drivers")
    await until(lambda: stepping.steps > steps, scaled(10), "a barrier step")
    assert hub._accepted - first + 1 == result["connections"]
    records = [(r.levelno, r.getMessage()) for r in caplog.records[mark:]]
    lines = hostile.lines_by_driver(records)
    assert set(lines) <= set(range(first, hub._accepted + 1)), records  # no healthy one
    assert all(len(v) == 1 for v in lines.values()), lines  # never two lines for one peer
    return result, lines


async def test_fuzz_frames_drop_each_bad_peer_with_one_line(live, caplog):
    """2,000 random and mutated frames: every peer the hub drops gets one ERROR line."""
    result, lines = await attack(live, caplog, hostile.attack_fuzz, 2000, 20, 5, scaled(30),
                                 wait=0.5 * HUB_TIMEOUT)
    assert result["frames"] == 2000
    # Every peer the hub dropped has its line; so has every peer that closed leaving half a
    # frame behind (the attacker cannot tell those apart from a clean close).
    dropped = [v for v in lines.values() if v[0][1].startswith("dropping driver#")]
    assert len(dropped) == result["dropped_by_hub"] > 0
    for [(level, msg)] in lines.values():
        assert (level == logging.ERROR and msg.startswith("dropping driver#")) or (
            level == logging.WARNING and "closed the connection in the middle of a message"
            in msg), msg


async def test_idle_connections_dropped_after_timeout(live, caplog):
    """100 silent connections are each dropped after the hub timeout with one line."""
    result, lines = await attack(live, caplog, hostile.attack_idle, 100, scaled(10))
    assert result["dropped_by_hub"] == 100
    assert result["last_drop_s"] >= HUB_TIMEOUT
    assert len(lines) == 100
    for [(level, msg)] in lines.values():
        assert level == logging.ERROR and "no answer to STATUS within" in msg, msg


async def test_slowloris_dropped_with_one_line(live, caplog):
    """A peer sending one byte every 0.3 s is dropped at the timeout, header unfinished."""
    result, lines = await attack(live, caplog, hostile.attack_slowloris, scaled(10), scaled(0.3),
                                 connections=1)
    assert result["dropped_by_hub"] == 1
    assert result["bytes"] < 12
    [[(level, msg)]] = lines.values()
    assert level == logging.ERROR and "no answer to STATUS within" in msg, msg


async def test_connect_close_loop_leaves_no_trace(live, caplog):
    """500 connect-and-close peers: no log line, no connection left, the barrier steps on."""
    result, lines = await attack(live, caplog, hostile.attack_connect_close, 500, scaled(30))
    assert result["connections"] == 500
    assert lines == {}


async def test_truncated_frame_then_close_gets_one_line(live, caplog):
    """50 peers send a truncated frame and close: each gets one line naming it."""
    result, lines = await attack(live, caplog, hostile.attack_truncated, 50, 5, scaled(30))
    assert result["connections"] == 50
    assert len(lines) == 50


async def test_spare_drivers_are_capped_with_one_line_each(unix_name, caplog):
    """Drivers with no molecule to bind wait as spares, at most ``max_spare``; one more
    is dropped with one line saying why, and a spare still takes over a freed molecule."""
    caplog.set_level(logging.WARNING, logger="maxwellhub.hub")
    hub = Hub(unixsocket=unix_name, timeout=scaled(10), max_spare=2)
    await hub.start()
    try:
        mid = hub.register_molecule_return_id({"dt_au": 0.5})
        first = FakeDriver(hub.address).start()
        assert await hub.wait_until_bound([mid], timeout=scaled(10))
        spares = [FakeDriver(hub.address).start() for _ in range(2)]
        extra = FakeDriver(hub.address).start()
        await asyncio.wait_for(extra.closed.wait(), scaled(10))
        lines = [r.getMessage() for r in caplog.records if "max_spare" in r.getMessage()]
        assert len(lines) == 1 and "no free molecule" in lines[0], lines
        assert not any(s.closed.is_set() for s in spares)
        hub._molecules[mid].driver.link.abort()   # its connection goes away ...
        await asyncio.wait_for(first.closed.wait(), scaled(10))
        assert await hub.wait_until_bound([mid], timeout=scaled(10))   # ... a spare binds
        res = await hub.step({mid: {"efield_au": [1.0, 2.0, 3.0]}}, timeout=scaled(10))
        assert tuple(res[mid]["amp"]) == fake_source(mid, (1.0, 2.0, 3.0))
    finally:
        await hub.stop(wait=scaled(2))


async def test_connections_beyond_the_handshake_cap_are_refused(unix_name, caplog):
    """With ``max_pending`` peers silent in the handshake, the next connection is closed
    at once (one summary line), and the healthy driver keeps stepping."""
    caplog.set_level(logging.ERROR, logger="maxwellhub.hub")
    hub = Hub(unixsocket=unix_name, timeout=scaled(10), max_pending=3)
    await hub.start()
    silent = []
    try:
        mid = hub.register_molecule_return_id({"dt_au": 0.5})
        FakeDriver(hub.address).start()
        assert await hub.wait_until_bound([mid], timeout=scaled(10))
        for _ in range(3):
            silent.append(await asyncio.open_unix_connection(hub.address))
        reader, writer = await asyncio.open_unix_connection(hub.address)
        assert await asyncio.wait_for(reader.read(100), scaled(10)) == b""   # refused
        writer.close()
        lines = [r.getMessage() for r in caplog.records if "max_pending" in r.getMessage()]
        assert len(lines) == 1 and "3 peers are still in the handshake" in lines[0], lines
        for k in range(3):
            res = await hub.step({mid: {"efield_au": [k, 0.0, 0.0]}}, timeout=scaled(10))
            assert tuple(res[mid]["amp"]) == fake_source(mid, (k, 0.0, 0.0))
    finally:
        for _, w in silent:
            w.close()
        await hub.stop(wait=scaled(2))


async def test_several_bad_messages_in_one_read_give_one_line(unix_name, caplog):
    """A peer whose one packet holds several messages out of turn is dropped with one line
    (the 90-s benchmark once found a fuzz peer with four)."""
    caplog.set_level(logging.WARNING, logger="maxwellhub.hub")
    hub = Hub(unixsocket=unix_name, timeout=scaled(10))
    await hub.start()
    try:
        reader, writer = await asyncio.open_unix_connection(hub.address)
        await asyncio.wait_for(reader.readexactly(12), scaled(10))   # STATUS
        writer.write(wire.encode_source_ready((1.0, 2.0, 3.0)) + wire.encode_hello(2) * 3)
        assert await asyncio.wait_for(reader.read(100), scaled(10)) == b""
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "unexpected FORCEREADY" in lines[0], lines
        writer.close()
    finally:
        await hub.stop(wait=scaled(2))
