"""Hostile input against a live hub while healthy drivers keep stepping: a small,
deterministic version of benchmarks/hostile.py.

Each attack runs in a thread (blocking sockets) while a barrier loop steps 4 healthy
FakeDrivers. Attacks run one at a time, so the hub's driver numbers accepted during an
attack belong to it, and its log lines can be matched to its connections (the hub's
summary of lines about peers is opened wide there, so that each peer's line is seen; the
summary itself is tested on its own below)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import threading

import pytest
from _util import REPO_ROOT, scaled
from fakes import FakeDriver, fake_source

from maxwellhub import Hub
from maxwellhub.net.listener import Listener
from maxwellhub.net.logsummary import PeerLog
from maxwellhub.protocol import wire
from maxwellhub_drivers.client import connect

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import hostile

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
            res = await hub.step(
                {m: {"efield_au": hostile.field_of(k, m)} for m in ids}, timeout=scaled(10)
            )
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
    assert hub.peer_log is not None
    hub.peer_log.burst = 10**9  # every line about a peer logged: attributable here
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
        res = await hub.step(
            {m: {"efield_au": hostile.field_of(k, m)} for m in [*ids, mid]}, timeout=scaled(10)
        )
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


def path_of(hub: Hub) -> str:
    """The hub's UNIX socket path."""
    assert isinstance(hub.address, str)
    return hub.address


def accepted_by(hub: Hub) -> int:
    """Connections the hub's listener accepted (served, or closed at once)."""
    return hub.status()["listeners"][0]["accepted"]


async def attack(live, caplog, fn, *args, **kw):
    """Run one attacker in a thread while the barrier steps; wait until the hub accepted
    and closed all its connections. Returns (attacker result, {driver number: lines})."""
    hub, stepping = live
    first, mark, steps = hub._accepted + 1, len(caplog.records), stepping.steps
    accepted = accepted_by(hub)
    result = await asyncio.to_thread(fn, hub.address, *args, **kw)
    await until(
        lambda: accepted_by(hub) - accepted >= result["connections"],
        scaled(10),
        "the hub to accept every attacker connection",
    )
    await until(
        lambda: len(hub._connections) == HEALTHY,
        scaled(10),
        "the connection count to return to the healthy drivers",
    )
    await until(lambda: stepping.steps > steps, scaled(10), "a barrier step")
    assert accepted_by(hub) - accepted == result["connections"]
    records = [(r.levelno, r.getMessage()) for r in caplog.records[mark:]]
    lines = hostile.lines_by_driver(records)
    assert set(lines) <= set(range(first, hub._accepted + 1)), records  # no healthy one
    assert all(len(v) == 1 for v in lines.values()), lines  # never two lines for one peer
    return result, lines


async def test_fuzz_frames_drop_each_bad_peer_with_one_line(live, caplog):
    """2,000 random and mutated frames: every peer the hub drops gets one ERROR line."""
    result, lines = await attack(
        live, caplog, hostile.attack_fuzz, 2000, 20, 5, scaled(30), wait=0.5 * HUB_TIMEOUT
    )
    assert result["frames"] == 2000
    # Every peer the hub dropped has its line; so has every peer that closed leaving half a
    # frame behind (the attacker cannot tell those apart from a clean close).
    dropped = [v for v in lines.values() if v[0][1].startswith("dropping driver#")]
    assert len(dropped) == result["dropped_by_hub"] > 0
    for [(level, msg)] in lines.values():
        assert (level == logging.ERROR and msg.startswith("dropping driver#")) or (
            level == logging.WARNING and "closed the connection in the middle of a message" in msg
        ), msg


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
    result, lines = await attack(
        live, caplog, hostile.attack_slowloris, scaled(10), scaled(0.3), connections=1
    )
    assert result["dropped_by_hub"] == 1
    assert result["bytes"] < 12
    [[(level, msg)]] = lines.values()
    assert level == logging.ERROR and "no answer to STATUS within" in msg, msg


async def test_connect_close_loop_leaves_no_trace(live, caplog):
    """500 connect-and-close peers: no log line, no connection left, the barrier steps on."""
    hub, _ = live
    result, lines = await attack(live, caplog, hostile.attack_connect_close, 500, scaled(30))
    assert result["connections"] == 500
    assert lines == {}
    counts = hub.status()["listeners"][0]
    # each was closed at once by the listener, or (when it was accepted before the peer
    # closed) served and closed without a line
    assert counts["closed_already"] + counts["admitted"] == counts["accepted"] >= 500


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
        hub._molecules[mid].driver.link.abort()  # its connection goes away ...
        await asyncio.wait_for(first.closed.wait(), scaled(10))
        assert await hub.wait_until_bound([mid], timeout=scaled(10))  # ... a spare binds
        res = await hub.step({mid: {"efield_au": [1.0, 2.0, 3.0]}}, timeout=scaled(10))
        assert tuple(res[mid]["amp"]) == fake_source(mid, (1.0, 2.0, 3.0))
    finally:
        await hub.stop(wait=scaled(2))


async def test_handshake_cap_evicts_the_peer_waiting_longest(unix_name, caplog):
    """With ``max_pending`` peers silent in the handshake, a new connection gets STATUS
    and the oldest silent one is dropped (one line), so silent peers cannot lock out a
    real driver, which still binds and steps."""
    caplog.set_level(logging.ERROR, logger="maxwellhub.hub")
    hub = Hub(unixsocket=unix_name, timeout=scaled(10), max_pending=3)
    await hub.start()
    silent = []
    try:
        mid = hub.register_molecule_return_id({"dt_au": 0.5})
        for _ in range(3):
            silent.append(await asyncio.open_unix_connection(path_of(hub)))
            await asyncio.wait_for(silent[-1][0].readexactly(12), scaled(10))  # STATUS
        reader, writer = await asyncio.open_unix_connection(path_of(hub))
        assert await asyncio.wait_for(reader.readexactly(12), scaled(10)) == wire.encode_header(
            wire.STATUS
        )
        assert await asyncio.wait_for(silent[0][0].read(100), scaled(10)) == b""  # evicted
        lines = [r.getMessage() for r in caplog.records if "max_pending" in r.getMessage()]
        assert len(lines) == 1 and "evicted before answering STATUS" in lines[0], lines
        assert "driver#1" in lines[0]  # the first silent peer, the one waiting longest
        silent.append((reader, writer))  # silent too from now on: 3 in the handshake
        FakeDriver(hub.address).start()  # evicts the second silent peer, then binds
        assert await hub.wait_until_bound([mid], timeout=scaled(10))
        assert await asyncio.wait_for(silent[1][0].read(100), scaled(10)) == b""
        for k in range(3):
            res = await hub.step({mid: {"efield_au": [k, 0.0, 0.0]}}, timeout=scaled(10))
            assert tuple(res[mid]["amp"]) == fake_source(mid, (k, 0.0, 0.0))
    finally:
        for _, w in silent:
            w.close()
        await hub.stop(wait=scaled(2))


def test_peer_log_summary_counts_exactly():
    """The first ``burst`` lines about peers per interval pass, the rest are held back and
    summarised with their exact counts by kind; other lines always pass."""
    logger = logging.getLogger("maxwellhub.test_summary")
    logger.propagate = False
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    now = [0.0]
    scheduled: list[float] = []
    peer_log = PeerLog(
        logger,
        lambda a: isinstance(a, str) and a.startswith("peer"),
        burst=2,
        interval=10.0,
        later=lambda s, cb: scheduled.append(s),
        clock=lambda: now[0],
    ).install()
    try:
        for i in range(7):
            logger.error("dropping %s: bad header %d", f"peer#{i}", i)
        logger.error("dropping %s: no answer within %d s", "peer#7", 5)
        logger.error("%s disconnected", "molecule 3")  # not about a peer: always passes
        assert seen == [
            "dropping peer#0: bad header 0",
            "dropping peer#1: bad header 1",
            "molecule 3 disconnected",
        ]
        assert scheduled == [10.0]  # one summary due at the end of the interval
        now[0] = 10.0
        logger.error("dropping %s: bad header %d", "peer#8", 8)  # a new interval
        assert seen[3] == (
            "6 more line(s) about peers were not logged (at most 2 per 10 s): "
            "5 x dropping <peer>: bad header N; "
            "1 x dropping <peer>: no answer within N s"
        )
        assert seen[4] == "dropping peer#8: bad header 8"
        assert peer_log.counts() == {
            "seen": 9,
            "logged": 3,
            "held_back": {
                "dropping <peer>: bad header N": 5,
                "dropping <peer>: no answer within N s": 1,
            },
        }
        peer_log.flush()  # nothing held back in this interval: no line
        assert len(seen) == 5
    finally:
        peer_log.remove()
        logger.removeHandler(handler)


async def test_flood_of_silent_peers_is_summarised(unix_name, caplog):
    """30 silent peers dropped at the handshake deadline: 3 lines name peers, and the
    summary line (at the end of the interval, here at stop) counts the other 27."""
    caplog.set_level(logging.WARNING, logger="maxwellhub.hub")
    hub = Hub(unixsocket=unix_name, timeout=scaled(HUB_TIMEOUT))
    await hub.start()
    assert hub.peer_log is not None
    hub.peer_log.burst = 3
    try:
        result = await asyncio.to_thread(hostile.attack_idle, path_of(hub), 30, scaled(10))
        assert result["dropped_by_hub"] == 30
        await until(lambda: hub.peer_log.seen == 30, scaled(10), "30 lines about peers")
    finally:
        await hub.stop(wait=scaled(2))
    lines = [r.getMessage() for r in caplog.records]
    named = [m for m in lines if m.startswith("dropping driver#")]
    assert len(named) == 3 and all("no answer to STATUS within" in m for m in named), lines
    [summary] = [m for m in lines if "about peers were not logged" in m]
    assert summary.startswith("27 more line(s)") and "27 x dropping <peer>: no answer" in summary
    assert hub.status()["peer_lines"]["held_back"] == {
        "dropping <peer>: no answer to STATUS within N s": 27
    }


class ConnectingDriver(FakeDriver):
    """A FakeDriver that connects as maxwellhub-driver does (maxwellhub_drivers.client)."""

    async def _open(self):
        sock = await asyncio.to_thread(connect, unix=self.address, timeout=scaled(30))
        return await asyncio.open_unix_connection(sock=sock)


def _hold_backlog(path: str, stop: threading.Event, made: list[int]) -> None:
    """Connect and close in a loop until ``stop`` (a blocking client: while the backlog is
    full the kernel holds the connect)."""
    while not stop.is_set():
        try:
            hostile._connect(path, scaled(10)).close()
        except OSError:
            continue
        made[0] += 1


async def test_replacement_driver_gets_in_while_attackers_hold_the_backlog(unix_name):
    """Three connect-and-close loops keep a backlog of 4 full while the barrier steps; a
    replacement driver (connecting as maxwellhub-driver does) is still accepted, binds and
    steps."""
    hub = Hub(unixsocket=unix_name, timeout=scaled(10), backlog=4)
    await hub.start()
    stop = threading.Event()
    made = [0]
    threads = [
        threading.Thread(target=_hold_backlog, args=(hub.address, stop, made)) for _ in range(3)
    ]
    try:
        ids = [hub.register_molecule_return_id() for _ in range(2)]
        for _ in ids:
            FakeDriver(hub.address).start()
        assert await hub.wait_until_bound({m: {"dt_au": 0.5} for m in ids}, timeout=scaled(10))
        stepping = Stepping(hub, ids)
        for t in threads:
            t.start()
        await until(lambda: made[0] >= 200, scaled(10), "the attackers to get going")
        mid = hub.register_molecule_return_id({"dt_au": 0.5})
        new = ConnectingDriver(hub.address).start()
        assert await hub.wait_until_bound([mid], timeout=scaled(30))
        assert not stop.is_set() and all(t.is_alive() for t in threads)  # still flooding
        await stepping.finish()
        k = hub.step_index
        res = await hub.step(
            {m: {"efield_au": hostile.field_of(k, m)} for m in [*ids, mid]}, timeout=scaled(10)
        )
        assert tuple(res[mid]["amp"]) == fake_source(mid, hostile.field_of(k, mid))
        assert len(new.fields) == 1
        assert hub.status()["listeners"][0]["closed_already"] > 0
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                await asyncio.to_thread(t.join, scaled(20))
        await hub.stop(wait=scaled(2))


async def test_several_bad_messages_in_one_read_give_one_line(unix_name, caplog):
    """A peer whose one packet holds several messages out of turn is dropped with one line
    (the 90-s benchmark once found a fuzz peer with four)."""
    caplog.set_level(logging.WARNING, logger="maxwellhub.hub")
    hub = Hub(unixsocket=unix_name, timeout=scaled(10))
    await hub.start()
    try:
        reader, writer = await asyncio.open_unix_connection(path_of(hub))
        await asyncio.wait_for(reader.readexactly(12), scaled(10))  # STATUS
        writer.write(wire.encode_source_ready((1.0, 2.0, 3.0)) + wire.encode_hello(2) * 3)
        assert await asyncio.wait_for(reader.read(100), scaled(10)) == b""
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "unexpected FORCEREADY" in lines[0], lines
        writer.close()
    finally:
        await hub.stop(wait=scaled(2))


async def test_listener_closes_departed_peers_in_paced_rounds(tmp_path):
    """Peers that connected and left are closed by the listener with no protocol made; a
    flood of them puts the listener on its timer (one connection per round with no time
    budget), shrinks the backlog, and a live peer is still served afterwards."""
    made: list[asyncio.Protocol] = []

    def factory() -> asyncio.Protocol:
        made.append(asyncio.Protocol())
        return made[-1]

    path = str(tmp_path / "listener.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    loop = asyncio.get_running_loop()
    listener = Listener(
        loop, sock, factory, lambda: True, lambda: 0, budget=0.0, pace=0.001, backlog=128
    )
    try:
        for _ in range(20):  # queued and gone before the listener runs
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
                peer.connect(path)
        await until(lambda: listener.counts["accepted"] == 20, scaled(10), "20 accepts")
        assert listener.counts["closed_already"] == 20 and made == []
        assert listener.counts["paced_rounds"] >= 19  # one per round: budget 0
        assert listener.counts["backlog_shrunk"] == 1
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
            peer.connect(path)
            await until(lambda: len(made) == 1, scaled(10), "the live peer served")
        assert listener.counts["admitted"] == 1 and not listener.paced
    finally:
        listener.close()
        await listener.wait_closed()


async def test_listener_admits_one_at_a_time_while_bad_peers_are_dropped(tmp_path):
    """While ``failures()`` keeps growing (peers hosting nothing being dropped), each round
    admits one connection and waits: five live peers queued at once are all served, one
    per round, and the backlog is shrunk meanwhile."""
    made: list[asyncio.Protocol] = []
    dropped = iter(range(1, 10**6))

    def factory() -> asyncio.Protocol:
        made.append(asyncio.Protocol())
        return made[-1]

    path = str(tmp_path / "listener.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    loop = asyncio.get_running_loop()
    listener = Listener(
        loop, sock, factory, lambda: True, lambda: 0, backlog=128, failures=lambda: next(dropped)
    )
    peers = []
    try:
        for _ in range(5):  # all queued before the listener runs
            peers.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            peers[-1].connect(path)
        await until(lambda: len(made) == 5, scaled(10), "the five peers served")
        assert listener.counts["hostile_paced"] == 5
        assert listener.counts["admitted"] == 5
        assert listener.counts["backlog_shrunk"] == 1
    finally:
        for p in peers:
            p.close()
        listener.close()
        await listener.wait_closed()
