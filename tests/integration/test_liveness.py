"""Slow is not dead: the default waits have no deadline, deaths are told by connections.

- a driver slower than a deadline (the handshake's, made small) at INIT and at a step is
  not dropped; a silent connection at the same time is;
- a killed driver is noticed at once, with the default (no deadline) settings;
- wait_until_bound(timeout=None) says who is missing and ends at the control endpoint's
  stop, at SIGINT, and when a watched driver process exits;
- TCP keepalive is set, with its numbers, on the hub's accepted sockets and the driver's.

Ordering is by events (a log record, EOF on a socket, an asyncio.Event), never by sleeps;
a test that could hang without a deadline has a watchdog that stops the hub, and asserts
that the watchdog did not fire. The report schedule is shortened by monkeypatching.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from _util import scaled
from fakes import FakeDriver, fake_source

from maxwellhub import Hub, SocketHub, liveness
from maxwellhub.errors import DriverLost, UsageError
from maxwellhub.hub import core as hub_module
from maxwellhub.hub.adapter import DriverProtocol
from maxwellhub.net.addresses import connect_once
from maxwellhub.protocol import wire
from maxwellhub.run.launch import reap, start_driver
from maxwellhub.services import control

TLS = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 0.1}


# ---------------------------------------------------------------- helpers


class SlowDriver:
    """A driver whose model is slow: it answers the STATUS after INIT, and each GETFORCE,
    only when the test releases it (``init_release``, ``step_release``)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.got_init = asyncio.Event()
        self.init_release = asyncio.Event()
        self.got_field = asyncio.Event()
        self.step_release = asyncio.Event()
        self.closed = asyncio.Event()
        self.molecule_id: int | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        reader, writer = await asyncio.open_unix_connection(self.address)
        decoder = wire.Decoder("driver")
        staged = None
        try:
            while data := await reader.read(65536):
                for ev in decoder.feed(data):
                    if isinstance(ev, wire.Init):
                        self.molecule_id = ev.ident
                        self.got_init.set()
                    elif isinstance(ev, wire.Status):
                        if self.molecule_id is None:
                            writer.write(wire.encode_header(wire.NEEDINIT))
                            continue
                        await self.init_release.wait()  # "setting up the model"
                        writer.write(wire.encode_header(wire.READY))
                    elif isinstance(ev, wire.PosData):
                        staged = tuple(float(x) for x in ev.positions[0])
                        self.got_field.set()
                    elif isinstance(ev, wire.GetForce):
                        await self.step_release.wait()  # "computing the step"
                        assert self.molecule_id is not None and staged is not None
                        source = fake_source(self.molecule_id, staged)
                        writer.write(wire.encode_source_ready(source, b"{}"))
                    elif isinstance(ev, wire.Stop):
                        writer.write(wire.encode_header(wire.BYE))
                        return
        finally:
            self.closed.set()
            writer.close()


async def silent_peer_dropped(address: str) -> None:
    """Connect, say nothing, and return when the hub closes the connection: proof that
    its handshake deadline has passed."""
    reader, writer = await asyncio.open_unix_connection(address)
    try:
        while await reader.read(65536):
            pass
    finally:
        writer.close()


class Seen(logging.Handler):
    """Sets ``event`` at the first record whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.event = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            self.messages.append(message)
            self.event.set()


@pytest.fixture
def seen() -> Iterator[Callable[[str], Seen]]:
    """Make Seen handlers on the hub's logger; removed after the test."""
    made: list[Seen] = []
    logger = logging.getLogger("maxwellhub.hub")
    old_level = logger.level
    logger.setLevel(logging.INFO)

    def make(text: str) -> Seen:
        handler = Seen(text)
        logger.addHandler(handler)
        made.append(handler)
        return handler

    yield make
    for handler in made:
        logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture
def quick_reports(monkeypatch) -> None:
    """Reports of a long wait after 0.05 s, then every 0.1 s (scaled)."""

    def delays() -> Iterator[float]:
        at = scaled(0.05)
        while True:
            yield at
            at += scaled(0.1)

    monkeypatch.setattr(hub_module, "report_delays", delays)


def watchdog(hub: SocketHub, seconds: float) -> threading.Timer:
    """Stop ``hub`` (a control-style stop, on its loop) after ``seconds``, so that a wait
    without a deadline cannot hang the test; tests assert it did not fire."""
    loop = hub._loop
    assert hub.hub is not None and loop is not None
    timer = threading.Timer(
        seconds, loop.call_soon_threadsafe, (hub.hub.request_stop, "by the test's watchdog")
    )
    timer.daemon = True
    timer.start()
    return timer


# ---------------------------------------------------------------- slow is not dead


@pytest.mark.parametrize("how", ["explicit", "default"])
async def test_a_driver_slower_than_the_deadlines_is_not_dropped(
    how, unix_name, monkeypatch, caplog
):
    """The model's set-up after INIT and its step both take longer than the handshake
    deadline (made small: explicitly, or by shrinking the default); a silent connection
    is dropped at that deadline meanwhile, the slow driver is not, and its step's source
    arrives. The hub has no step deadline by default."""
    small = scaled(0.3)
    if how == "explicit":
        hub = Hub(unixsocket=unix_name, handshake_timeout=small)
    else:
        monkeypatch.setattr(hub_module, "DEFAULT_HANDSHAKE_TIMEOUT", small)
        hub = Hub(unixsocket=unix_name)
    assert hub.timeout is None and hub.handshake_timeout == small
    caplog.set_level(logging.INFO, logger="maxwellhub.hub")
    await hub.start()
    try:
        mid = hub.register_molecule_return_id({"dt_au": 0.5})
        slow = SlowDriver(str(hub.address))
        binding = asyncio.create_task(hub.wait_until_bound([mid]))
        await asyncio.wait_for(slow.got_init.wait(), scaled(10))
        # INIT sent; the driver sets up its model longer than the handshake deadline
        await asyncio.wait_for(silent_peer_dropped(str(hub.address)), scaled(10))
        assert not binding.done() and not slow.closed.is_set()
        slow.init_release.set()
        assert await asyncio.wait_for(binding, scaled(10))

        field = np.array([[0.1, -0.2, 0.3]])
        step = asyncio.create_task(hub.step_arrays([mid], field))
        await asyncio.wait_for(slow.got_field.wait(), scaled(10))
        await asyncio.wait_for(silent_peer_dropped(str(hub.address)), scaled(10))
        assert not step.done() and not slow.closed.is_set()
        slow.step_release.set()
        result = await asyncio.wait_for(step, scaled(10))
        assert tuple(result.sources[0]) == fake_source(mid, (0.1, -0.2, 0.3))
        assert hub.status()["bound_count"] == 1
    finally:
        slow.init_release.set()
        slow.step_release.set()
        await hub.stop(wait=scaled(2))
    drops = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropping")]
    assert len(drops) == 2, drops  # the two silent peers, each at the handshake deadline
    assert all(f"no answer to STATUS within {small:g} s" in d for d in drops), drops
    assert not any(f"molecule {mid}" in d for d in drops), drops


async def test_a_long_step_reports_who_it_waits_for(unix_name, seen, quick_reports):
    """A step without a deadline logs the molecules it waits for (INFO while their
    drivers compute), and completes when the source comes."""
    hub = Hub(unixsocket=unix_name)
    await hub.start()
    try:
        mid = hub.register_molecule_return_id({"dt_au": 0.5})
        slow = SlowDriver(str(hub.address))
        slow.init_release.set()
        assert await hub.wait_until_bound([mid], timeout=scaled(10))
        report = seen(f"for the source of molecule(s) [{mid}] (their drivers are computing)")
        step = asyncio.create_task(hub.step_arrays([mid], np.zeros((1, 3))))
        assert await asyncio.to_thread(report.event.wait, scaled(10)), "no report"
        assert not step.done()
        slow.step_release.set()
        result = await asyncio.wait_for(step, scaled(10))
        assert tuple(result.sources[0]) == fake_source(mid, (0.0, 0.0, 0.0))
    finally:
        await hub.stop(wait=scaled(2))


# ---------------------------------------------------------------- dead is noticed


def test_a_killed_driver_is_noticed_at_once_with_the_defaults(unix_name, tmp_path):
    """SocketHub() and maxwellhub-driver with their defaults (no deadlines): after the
    driver is killed, the next barrier returns {} (step_barrier) or raises DriverLost
    (step, on_lost="abort") because its connection closed; no deadline was involved
    (the hub has none, and the watchdog did not fire)."""
    log = tmp_path / "driver.log"
    with SocketHub(unixsocket=unix_name) as hub:
        assert hub.hub is not None and hub.hub.timeout is None
        dog = watchdog(hub, scaled(60))
        mid = hub.register_molecule_return_id()
        proc = start_driver("tls", TLS, unix=unix_name, log_path=log)
        try:
            hub.watch_processes([proc])  # a driver that fails to start ends the bind wait
            assert hub.wait_until_bound({mid: {"dt_au": 0.5}}), log.read_text()
            for k in range(3):
                assert mid in hub.step_barrier({mid: {"efield_au": [0.0, 0.0, 1e-3 * k]}})
            proc.kill()
            proc.wait(scaled(10))
            assert hub.step_barrier({mid: {"efield_au": [0.0, 0.0, 1.0]}}) == {}
            with pytest.raises(DriverLost) as lost:
                hub.step({mid: {"efield_au": [0.0, 0.0, 1.0]}}, on_lost="abort")
            assert lost.value.molecules == [mid]
            assert hub.stop_requested is None  # ended by the connection, not the watchdog
        finally:
            dog.cancel()
            reap([proc], scaled(5))


def test_a_watched_driver_process_that_exits_ends_the_bind_wait(unix_name, seen, quick_reports):
    """A local driver that dies before it binds ends wait_until_bound(timeout=None) at
    once (False), through its pidfd; not a stop, not a deadline."""
    waiting = seen("no driver connected for molecule(s) [0]")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit(3)"],
        stdin=subprocess.PIPE,
    )
    try:

        def die_once_waited() -> None:
            if waiting.event.wait(scaled(10)):
                assert proc.stdin is not None
                proc.stdin.close()  # the process exits 3 while the hub waits

        with SocketHub(unixsocket=unix_name) as hub:
            dog = watchdog(hub, scaled(60))
            hub.register_molecule(0)
            hub.watch_processes(lambda: [proc])
            killer = threading.Thread(target=die_once_waited)
            killer.start()
            try:
                assert hub.wait_until_bound([0]) is False
            finally:
                dog.cancel()
                killer.join(scaled(10))
            assert hub.stop_requested is None
        assert proc.wait(scaled(10)) == 3
    finally:
        reap([proc], scaled(5))


# ---------------------------------------------------------------- a wait without a deadline


def test_bind_wait_without_deadline_reports_and_ends_at_the_control_stop(
    unix_name, seen, quick_reports
):
    """wait_until_bound(timeout=None) never takes the hub's timeout: it logs the missing
    ids while it waits and ends (False) at the control endpoint's authenticated stop."""
    report = seen("no driver connected for molecule(s) [0, 1]")
    answers: list[dict] = []

    def stop_once_reported(address: str) -> None:
        if report.event.wait(scaled(10)):
            token = control.read_token(address)
            answers.append(control.request(address, {"Stop": {"token": token}}, timeout=scaled(10)))

    with SocketHub(unixsocket=unix_name, timeout=scaled(0.01), control=unix_name) as hub:
        # the hub's own timeout is tiny: a bind wait with timeout=None must not use it
        thread = threading.Thread(target=stop_once_reported, args=(hub.control_address,))
        thread.start()
        try:
            assert hub.wait_until_bound({0: {"dt_au": 0.5}, 1: {"dt_au": 0.5}}) is False
        finally:
            thread.join(scaled(10))
        assert hub.stop_requested == "by control request"
    assert answers == [{"Stopping": True}]
    assert "still waiting after" in report.messages[0]


def test_bind_wait_without_deadline_ends_at_sigint(unix_name, seen, quick_reports):
    """SIGINT during wait_until_bound(timeout=None) raises KeyboardInterrupt out of it;
    the interrupted wait is cancelled (nothing of it is left on the hub's loop) and the
    hub keeps working: a later wait with a deadline returns False at that deadline."""
    # Python's own SIGINT handler for the test: a process started in the background by a
    # shell without job control inherits SIGINT ignored, and Python then leaves it so.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _bind_wait_ends_at_sigint(unix_name, seen)
    finally:
        signal.signal(signal.SIGINT, previous)


def _bind_wait_ends_at_sigint(unix_name, seen) -> None:
    report = seen("no driver connected for molecule(s) [0]")
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread().ident == main

    def interrupt_once_reported() -> None:
        if report.event.wait(scaled(10)):
            signal.pthread_kill(main, signal.SIGINT)

    with SocketHub(unixsocket=unix_name) as hub:
        dog = watchdog(hub, scaled(60))
        thread = threading.Thread(target=interrupt_once_reported)
        thread.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                hub.wait_until_bound([0])
        finally:
            thread.join(scaled(10))
            dog.cancel()
        assert hub._loop is not None and not asyncio.all_tasks(hub._loop)
        assert hub.stop_requested is None
        assert hub.wait_until_bound([0], timeout=scaled(0.1)) is False


def test_an_interrupted_step_leaves_no_timer_behind(unix_name):
    """KeyboardInterrupt out of a step (here raised by a callback on the hub's loop, as a
    signal handler would) keeps the step frozen and disarms its timer: the next call's
    wait is its own."""
    with SocketHub(unixsocket=unix_name) as hub:
        assert hub.hub is not None and hub._loop is not None
        hub.register_molecule(0)

        def interrupt() -> None:
            raise KeyboardInterrupt

        hub._loop.call_soon(interrupt)
        with pytest.raises(KeyboardInterrupt):  # on_lost="wait": it waits for a driver
            hub.step({0: {"efield_au": [0.0, 0.0, 0.0]}}, timeout=scaled(60))
        barrier = hub.hub._barrier
        assert barrier is not None and barrier.timer is None and barrier.waiter is None
        # the frozen step goes on: without a driver, step(on_lost="abort") names molecule 0
        with pytest.raises(DriverLost):
            hub.step({0: {"efield_au": [1.0, 0.0, 0.0]}}, on_lost="abort")


# ---------------------------------------------------------------- TCP keepalive


def _keepalive_options(sock) -> dict[str, int]:
    get = sock.getsockopt
    return {
        "SO_KEEPALIVE": get(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "TCP_KEEPIDLE": get(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        "TCP_KEEPINTVL": get(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        "TCP_KEEPCNT": get(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        "TCP_USER_TIMEOUT": get(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    }


EXPECTED_KEEPALIVE = {
    "SO_KEEPALIVE": 1,
    "TCP_KEEPIDLE": liveness.KEEPALIVE_IDLE,
    "TCP_KEEPINTVL": liveness.KEEPALIVE_INTERVAL,
    "TCP_KEEPCNT": liveness.KEEPALIVE_COUNT,
    "TCP_USER_TIMEOUT": 1000 * liveness.LOST_HOST_SECONDS,
}


async def test_keepalive_is_set_on_accepted_and_driver_tcp_sockets():
    """The hub's accepted TCP socket and the driver's connected one (connect_once) carry
    keepalive with idle 60 s, 10 s probes, 6 of them, and a 120 s user timeout; a
    socket without them (the default) shows that the numbers are not the kernel's."""
    hub = Hub(port=0)
    await hub.start()
    try:
        sock = await asyncio.to_thread(connect_once, scaled(5), address=("127.0.0.1", hub.port))
        with sock:
            assert _keepalive_options(sock) == EXPECTED_KEEPALIVE  # the driver's side
            sock.settimeout(scaled(10))
            assert await asyncio.to_thread(sock.recv, 12) == wire.encode_header(wire.STATUS)
            [conn] = hub._connections  # it sent STATUS: the hub has accepted it
            assert isinstance(conn.link, DriverProtocol)
            accepted = conn.link.transport.get_extra_info("socket")
            assert _keepalive_options(accepted) == EXPECTED_KEEPALIVE
        with socket.socket() as plain:
            assert plain.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    finally:
        await hub.stop(wait=scaled(2))


def test_keepalive_leaves_unix_sockets_alone():
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        liveness.keepalive(left)  # no TCP options on a UNIX socket, and no error
        assert left.family == socket.AF_UNIX


# ---------------------------------------------------------------- deadlines as arguments


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "60", True])
def test_bad_deadlines_are_refused_by_name(bad, unix_name):
    with pytest.raises(UsageError, match="handshake_timeout must be a number"):
        Hub(unixsocket=unix_name, handshake_timeout=bad)
    with pytest.raises(UsageError, match=r"^timeout must be a number"):
        Hub(unixsocket=unix_name, timeout=bad)


def test_deadline_defaults():
    """No step deadline by default; the handshake's is 60 s, or the step's when shorter;
    an infinite deadline is none; the report schedule grows to 30 min and stays there."""
    assert Hub().timeout is None and Hub().handshake_timeout == 60.0
    assert Hub(timeout=5).handshake_timeout == 5.0
    assert Hub(timeout=60000).handshake_timeout == 60.0  # MaxwellLink's own default
    assert Hub(timeout=float("inf")).timeout is None
    delays = liveness.report_delays()
    first = [next(delays) for _ in range(9)]
    assert first == [30, 90, 210, 450, 930, 1890, 3690, 5490, 7290]
    reporter = liveness.Reporter(100.0)
    assert not reporter.due(129.9) and reporter.due(130.0) and not reporter.due(131.0)
    assert reporter.due(1000.0) and reporter.next_at == 100.0 + 930  # skips those passed


async def test_explicit_step_deadline_still_bounds_a_silent_driver(unix_name):
    """A number still works as before: step_barrier returns {} at it."""
    hub = Hub(unixsocket=unix_name, timeout=scaled(0.2))
    await hub.start()
    try:
        mid = hub.register_molecule_return_id({"dt_au": 0.5})
        FakeDriver(hub.address, silent_after=0).start()
        assert await hub.wait_until_bound([mid], timeout=scaled(10))
        assert await hub.step_barrier({mid: {"efield_au": [0.0, 0.0, 1.0]}}) == {}
    finally:
        await hub.stop(wait=scaled(2))


# ---------------------------------------------------------------- maxwellhub run


BROKEN_MODEL = '''
"""A TLS whose set-up fails in the driver: INIT kills the driver (exit 3)."""
from maxwellhub.models import get_model_class


class Broken(get_model_class("tls")):
    def initialize(self, *args, **kwargs):
        raise RuntimeError("set-up failed on purpose")
'''


@pytest.mark.meep
def test_run_ends_at_once_when_a_local_driver_dies_in_its_set_up(tmp_path):
    """`maxwellhub run` with no transport.timeout (no deadline): a local driver that dies
    while initialising (before any step, after binding) ends the run at once with the
    message naming it and its log's last line; nothing waited for a clock."""
    pytest.importorskip("meep")
    from _util import REPO_ROOT

    (tmp_path / "broken_model.py").write_text(BROKEN_MODEL)
    config = (REPO_ROOT / "examples" / "relax_2d.toml").read_text()
    assert "timeout" not in config and config.count('model = "tls"') == 1
    path = tmp_path / "broken.toml"
    path.write_text(config.replace('model = "tls"', 'model = "broken_model:Broken"'))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # for the drivers too
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "maxwellhub"),
            "run",
            str(path),
            "--set",
            f'output.directory="{tmp_path}"',
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=scaled(120),
    )
    assert run.returncode == 1, run.stderr[-3000:]
    assert "the driver of molecule 0 exited with code 3" in run.stderr, run.stderr[-3000:]
    assert "set-up failed on purpose" in run.stderr, run.stderr[-3000:]
