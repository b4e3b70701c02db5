"""The control endpoint (maxwellhub.services.control) and its command-line clients."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import selectors
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _util import REPO_ROOT, scaled
from fakes import FakeDriver

from maxwellhub import Hub, SocketHub, cli
from maxwellhub.hub import StopRequested
from maxwellhub.services import control


@pytest.fixture
async def hub(unix_name):
    """A started async Hub with a control endpoint named like its socket."""
    h = Hub(unixsocket=unix_name, timeout=scaled(10), control=unix_name)
    await h.start()
    yield h
    await h.stop(wait=scaled(2))


def requests_for(ids, step):
    return {m: {"efield_au": np.array([0.1 * step, 0.01 * m, 1.0])} for m in ids}


async def ask(address: str, *lines: bytes) -> list[dict]:
    """Send ``lines`` on one connection; return one parsed answer per line."""
    reader, writer = await asyncio.open_unix_connection(address)
    try:
        writer.write(b"".join(lines))
        return [json.loads(await asyncio.wait_for(reader.readline(), scaled(5))) for _ in lines]
    finally:
        writer.close()


async def bind_fakes(hub, n):
    ids = [hub.register_molecule_return_id() for _ in range(n)]
    fakes = [FakeDriver(hub.address).start() for _ in ids]
    assert await hub.wait_until_bound({m: {"dt_au": 0.5} for m in ids}, timeout=scaled(10))
    return ids, fakes


class Stepper:
    """Steps the hub in a task until stopped; ``reached(n)`` awaits step n."""

    def __init__(self, hub, ids) -> None:
        self.hub, self.ids = hub, ids
        self.error: BaseException | None = None
        self._marks: dict[int, asyncio.Event] = {}
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        step = 0
        try:
            while True:
                await self.hub.step(requests_for(self.ids, step), timeout=scaled(5))
                step += 1
                for n, event in self._marks.items():
                    if step >= n:
                        event.set()
        except Exception as exc:
            self.error = exc
            for event in self._marks.values():
                event.set()

    async def reached(self, n: int) -> None:
        event = self._marks.setdefault(n, asyncio.Event())
        if self.hub.step_index >= n:
            event.set()
        await asyncio.wait_for(event.wait(), scaled(10))
        assert self.error is None, self.error


def test_control_address_forms():
    """A bare name maps to /tmp/maxwellhub_control_NAME, a path is kept, HOST:PORT is TCP."""
    assert control.control_address("run1") == "/tmp/maxwellhub_control_run1"
    assert control.control_address("/tmp/x/ctl") == "/tmp/x/ctl"
    assert control.control_address("127.0.0.1:4598") == ("127.0.0.1", 4598)
    assert control.control_address("[::1]:4598") == ("::1", 4598)
    assert control.token_path("/tmp/x/ctl") == Path("/tmp/x/ctl.token")
    with pytest.raises(ValueError):
        control.control_address("")


async def test_ping_pong(hub):
    """{"Ping": n} answers {"Pong": n} for integers and floats, many per connection."""
    answers = await ask(
        hub.control_address,
        b'{"Ping": 7}\n',
        b'{"Ping": -2.5}\r\n',
        b'{ "Ping" : 12345678901234567890 }\n',
    )
    assert answers == [{"Pong": 7}, {"Pong": -2.5}, {"Pong": 12345678901234567890}]


async def test_status_while_stepping_shows_steps_and_timing(hub):
    """Status during a barrier run: step count advances, per-step time and slowest ids."""
    ids, _ = await bind_fakes(hub, 3)
    stepper = Stepper(hub, ids)
    try:
        await stepper.reached(5)
        (first,) = await ask(hub.control_address, b'"Status"\n')
        await stepper.reached(first["Status"]["step"] + 5)
        (second,) = await ask(hub.control_address, b'{"Status": null}\n')
    finally:
        stepper.task.cancel()
    s1, s2 = first["Status"], second["Status"]
    assert 5 <= s1["step"] < s2["step"]
    assert s2["molecules"] == 3 and s2["bound"] == ids and s2["missing"] == []
    assert s2["bound_count"] == 3 and s2["missing_count"] == 0
    timing = s2["time_per_step_ms"]
    assert timing["steps"] >= s2["step"] - 1
    assert timing["last"] > 0 and 0 < timing["mean"] <= timing["p99"]
    slow = s2["slowest_molecules"]
    assert slow and {e["id"] for e in slow} <= set(ids)
    assert sum(e["times_last"] for e in slow) >= s1["step"]
    assert s2["stop_requested"] is None


async def test_status_lists_are_capped_for_many_molecules(hub):
    """With many molecules Status gives counts and only the first 100 ids of each list."""
    for _ in range(250):
        hub.register_molecule_return_id()
    (answer,) = await ask(hub.control_address, b'"Status"\n')
    status = answer["Status"]
    assert status["missing_count"] == 250 and status["missing"] == list(range(100))
    assert status["bound_count"] == 0 and status["bound"] == []


@pytest.mark.parametrize(
    "line, code, names",
    [
        (b"{nope", 1000, "malformed"),
        (b"[1, 2]", 1000, "object"),
        (b"\xff\xfe", 1000, "UTF-8"),
        (b'{"Ping": NaN}', 1000, "NaN"),
        (b'{"Ping": 1, "Status": null}', 1000, "exactly one"),
        (b"[" * 50_000, 1000, "malformed"),
        (b'{"Fly": 1}', 1100, "Fly"),
        (b'"Launch"', 1100, "Launch"),
        (b'{"Ping": "x"}', 1200, "Ping"),
        (b'{"Ping": true}', 1200, "Ping"),
        (b'{"Status": 5}', 1200, "Status"),
        (b'{"Stop": 5}', 1200, "Stop"),
        (b'{"Stop": {}}', 1300, "authentication"),
        (b'{"Stop": {"token": "0"}}', 1300, "authentication"),
        (b'{"Stop": {"token": 5}}', 1300, "authentication"),
    ],
)
async def test_error_codes_answered_and_connection_kept(hub, caplog, line, code, names):
    """Each bad request gets its error code naming the problem; the connection still works
    and the peer is named in one log line."""
    caplog.set_level(logging.WARNING, logger="maxwellhub.control")
    error, pong = await ask(hub.control_address, line + b"\n", b'{"Ping": 1}\n')
    assert error["type"] == "Error" and error["code"] == code
    assert names.lower() in error["message"].lower()
    assert pong == {"Pong": 1}
    lines = [r.getMessage() for r in caplog.records if r.name == "maxwellhub.control"]
    assert len(lines) == 1 and "control#" in lines[0] and str(code) in lines[0]
    assert hub.stop_requested is None


async def test_line_too_long_is_refused_and_closed(hub):
    """A line over 64 KiB gets error 1400 and the connection is closed; 64 KiB is fine."""
    (ok,) = await ask(hub.control_address, b"x" * control.MAX_LINE + b"\n")
    assert ok["code"] == 1000
    reader, writer = await asyncio.open_unix_connection(hub.control_address)
    try:
        writer.write(b"x" * (control.MAX_LINE + 1))
        error = json.loads(await asyncio.wait_for(reader.readline(), scaled(5)))
        assert error["code"] == 1400
        assert await asyncio.wait_for(reader.read(), scaled(5)) == b""  # closed
    finally:
        writer.close()
    assert await ask(hub.control_address, b'{"Ping": 3}\n') == [{"Pong": 3}]


async def test_socket_and_token_are_owner_only_and_removed(unix_name):
    """Control socket and token file are 0600 and removed when the hub stops."""
    h = Hub(unixsocket=unix_name, timeout=scaled(10), control=unix_name)
    await h.start()
    path = h.control_address
    assert path is not None
    token = control.token_path(path)
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(token).st_mode) == 0o600
        assert len(token.read_text().strip()) == 64
    finally:
        await h.stop(wait=scaled(2))
    assert not os.path.exists(path) and not token.exists()


async def test_connections_over_the_cap_are_refused(hub, caplog):
    """At most 64 control connections are served; the 65th is closed, the others answer."""
    caplog.set_level(logging.WARNING, logger="maxwellhub.control")
    pairs = [
        await asyncio.open_unix_connection(hub.control_address)
        for _ in range(control.MAX_CONNECTIONS)
    ]
    try:
        for _, writer in pairs:
            writer.write(b'{"Ping": 1}\n')
        for reader, _ in pairs:
            assert json.loads(await asyncio.wait_for(reader.readline(), scaled(5))) == {"Pong": 1}
        reader, writer = await asyncio.open_unix_connection(hub.control_address)
        assert await asyncio.wait_for(reader.read(), scaled(5)) == b""
        writer.close()
    finally:
        for _, w in pairs:
            w.close()
    assert any("refusing control#" in r.getMessage() for r in caplog.records)


async def test_wrong_token_refused_and_run_continues(hub):
    """A wrong token is refused (1300) and the barrier run keeps stepping."""
    ids, _ = await bind_fakes(hub, 2)
    stepper = Stepper(hub, ids)
    try:
        await stepper.reached(3)
        (answer,) = await ask(hub.control_address, b'{"Stop": {"token": "%s"}}\n' % (b"0" * 64))
        assert answer["code"] == 1300
        await stepper.reached(hub.step_index + 3)
    finally:
        stepper.task.cancel()
    assert hub.stop_requested is None


async def test_right_token_stops_the_barrier(hub):
    """The token from the token file stops the run: step raises StopRequested, later calls
    too, step_barrier returns {}."""
    ids, _ = await bind_fakes(hub, 2)
    stepper = Stepper(hub, ids)
    await stepper.reached(3)
    token = control.read_token(hub.control_address)
    (answer,) = await ask(
        hub.control_address, json.dumps({"Stop": {"token": token}}).encode() + b"\n"
    )
    assert answer == {"Stopping": True}
    await asyncio.wait_for(stepper.task, scaled(5))
    assert isinstance(stepper.error, StopRequested)
    assert hub.stop_requested == "by control request"
    with pytest.raises(StopRequested):
        await hub.step(requests_for(ids, 0), timeout=scaled(5))
    assert await hub.step_barrier(requests_for(ids, 0)) == {}
    (status,) = await ask(hub.control_address, b'"Status"\n')
    assert status["Status"]["stop_requested"] == "by control request"


def test_sync_facade_serves_control_while_waiting(unix_name):
    """SocketHub answers control requests while it waits inside a bind; Stop ends the wait."""
    answers: list[dict] = []

    def client(address: str) -> None:
        answers.append(control.request(address, {"Ping": 5}, timeout=scaled(10)))
        answers.append(control.request(address, "Status", timeout=scaled(10)))
        token = control.read_token(address)
        answers.append(control.request(address, {"Stop": {"token": token}}, timeout=scaled(10)))

    with SocketHub(unixsocket=unix_name, timeout=scaled(10), control=unix_name) as hub:
        hub.register_molecule(0)
        thread = threading.Thread(target=client, args=(hub.control_address,))
        thread.start()
        # No driver ever comes: only the Stop request can end this wait early.
        assert not hub.wait_until_bound([0], timeout=scaled(60))
        thread.join(scaled(10))
        assert hub.stop_requested == "by control request"
        with pytest.raises(StopRequested):
            hub.step({0: {"efield_au": [0.0, 0.0, 0.0]}})
        assert hub.step_barrier({0: {"efield_au": [0.0, 0.0, 0.0]}}) == {}
    assert answers[0] == {"Pong": 5}
    assert answers[1]["Status"]["missing"] == [0]
    assert answers[2] == {"Stopping": True}


async def test_cli_exit_codes(hub, tmp_path, capsys):
    """maxwellhub ping/status/stop print the answer; exit 0 ok, 1 error answer, 2 no hub."""
    name = hub.control_address
    assert await asyncio.to_thread(cli.main, ["ping", name, "42"]) == 0
    assert json.loads(capsys.readouterr().out) == {"Pong": 42}
    assert await asyncio.to_thread(cli.main, ["status", name]) == 0
    assert json.loads(capsys.readouterr().out)["Status"]["step"] == 0
    wrong = tmp_path / "wrong.token"
    wrong.write_text("0" * 64)
    wrong.chmod(0o600)
    assert await asyncio.to_thread(cli.main, ["stop", name, "--token-file", str(wrong)]) == 1
    assert json.loads(capsys.readouterr().out)["code"] == 1300
    missing = str(tmp_path / "no_such_control")
    assert await asyncio.to_thread(cli.main, ["status", missing, "--timeout", str(scaled(2))]) == 2
    assert "no answer" in capsys.readouterr().err
    assert await asyncio.to_thread(cli.main, ["stop", name]) == 0
    assert json.loads(capsys.readouterr().out) == {"Stopping": True}


def _wait_for_stderr(proc: subprocess.Popen, needle: str, seconds: float) -> str:
    """Read the process's stderr until a line containing ``needle``."""
    with selectors.DefaultSelector() as selector:
        assert proc.stderr is not None
        selector.register(proc.stderr, selectors.EVENT_READ)
        while True:
            if not selector.select(timeout=seconds):
                raise TimeoutError(f"no stderr line with {needle!r}")
            line = proc.stderr.readline()
            if not line:
                raise EOFError(f"exited (status {proc.wait()}) before {needle!r}")
            if needle in line:
                return line


def _maxwellhub(*args: str) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "maxwellhub.cli", *args],
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}


@pytest.mark.meep
@pytest.mark.slow
def test_run_status_and_stop_by_control(tmp_path):
    """`maxwellhub run` opens a control socket: `maxwellhub status` shows steps advancing,
    `maxwellhub stop` ends it with exit 0, drivers stopped and the HDF5 written."""
    import h5py

    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "maxwellhub.cli",
            "run",
            str(REPO_ROOT / "examples" / "relax_2d.toml"),
            "--set",
            "simulation.until=100000",
            "--set",
            f'output.directory="{tmp_path}"',
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        _wait_for_stderr(run, "control endpoint", scaled(60))
        address = control.control_address(f"mxh_run_{run.pid}")
        assert isinstance(address, str)  # a name, so a UNIX socket path
        steps: list[int] = []
        deadline = time.monotonic() + scaled(60)
        while len(steps) < 2 or steps[-1] <= steps[0]:  # a remote process: ask again
            assert time.monotonic() < deadline, f"steps did not advance: {steps}"
            code, status = _maxwellhub("status", address)
            assert code == 0, status
            if status["Status"]["step"] > 0:
                steps.append(status["Status"]["step"])
        assert status["Status"]["time_per_step_ms"]["mean"] > 0
        assert status["Status"]["slowest_molecules"][0]["id"] == 0
        code, answer = _maxwellhub("stop", f"mxh_run_{run.pid}")
        assert (code, answer) == (0, {"Stopping": True})
        out, err = run.communicate(timeout=scaled(60))
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] == "by control request"
    assert summary["control"] == address and summary["complete"] is False
    assert summary["driver_exit_codes"] == [0]
    with h5py.File(summary["hdf5"]) as f:
        assert not f.attrs["complete"]
        assert len(f["step"]) > 10
    assert not os.path.exists(address) and not control.token_path(address).exists()
