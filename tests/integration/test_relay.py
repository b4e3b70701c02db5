"""`maxwellhub relay`: local drivers behind one upstream connection with batched frames.

Real `maxwellhub-driver` and `maxwellhub relay` processes against a SocketHub, plus a
scripted upstream hub (a plain socket speaking the batched frames) for the ways a session
can end badly."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from _util import scaled, unix_socket_path

from maxwellhub import SocketHub
from maxwellhub.errors import ProtocolError
from maxwellhub.protocol import wire
from maxwellhub.protocol.auth import Secret, load_secret
from maxwellhub.protocol.init import parse_ensemble_init
from maxwellhub.run.launch import driver_env, reap, start_driver

DT_AU = 0.5
TLS = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 0.1}
EXTRAS_KEYS = (
    "time_au",
    "energy_au",
    "mux_au",
    "muy_au",
    "muz_au",
    "Pe",
    "Pg",
    "Pge_real",
    "Pge_imag",
)


def start_relay(
    tmp_path: Path,
    listen: str,
    molecules: int,
    upstream: list[str],
    *extra: str,
    env: dict | None = None,
    timeout: float | None = 20,
) -> tuple[subprocess.Popen, Path]:
    """Start `maxwellhub relay` listening on UNIX `listen`; its stderr goes to a file.
    ``timeout`` None: no --timeout (the relay's default, no deadline)."""
    log = tmp_path / f"relay_{listen}.log"
    argv = [
        str(Path(sys.executable).parent / "maxwellhub"),
        "relay",
        "--molecules",
        str(molecules),
        *upstream,
        "--listen-unix",
        listen,
        *([] if timeout is None else ["--timeout", str(scaled(timeout))]),
        *extra,
    ]
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            argv,
            env=driver_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    return proc, log


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def fields_at(step: int, n: int) -> np.ndarray:
    """(n, 3) fields, different for every row and step, on all three axes (a.u.)."""
    t = step * DT_AU
    rows = 1.0 + np.arange(n)[:, None]
    return 2e-3 * rows * np.sin(0.242 * t + 0.1 * rows) * np.array([0.3, -0.5, 1.0])


def initialized_ids(logs: list[Path]) -> list[int]:
    """The molecule ids verbose drivers say they were initialised with."""
    ids = []
    for path in logs:
        for line in path.read_text().splitlines():
            if "initialized molecule " in line:
                ids.append(int(line.split("initialized molecule ")[1].split()[0]))
    return sorted(ids)


def test_parse_ensemble_init():
    """The relay reads ids and per-molecule payloads from INIT, and names what is wrong."""
    init = parse_ensemble_init(
        json.dumps({"molecule_id_range": [4, 2], "dt_au": 0.5, "molecule_id": 4, "x": 1}).encode(),
        2,
        "this relay",
    )
    ids, payloads = init.molecule_ids, init.payloads
    assert ids == [4, 5] and payloads == [{"dt_au": 0.5, "x": 1}] * 2
    init = parse_ensemble_init(
        json.dumps(
            {
                "molecule_ids": [9, 3],
                "dt_au": 0.5,
                "payloads": [{"dt_au": 0.5, "tag": "a", "molecule_id": 9}, {"dt_au": 0.25}],
            }
        ).encode(),
        2,
        "this relay",
    )
    ids, payloads = init.molecule_ids, init.payloads
    assert ids == [9, 3] and payloads == [{"dt_au": 0.5, "tag": "a"}, {"dt_au": 0.25}]
    bad = {
        b"\xff": "UTF-8 JSON",
        b"[1]": "not an object",
        b'{"dt_au": 0.5}': "molecule_id_range or molecule_ids",
        b'{"molecule_id_range": [0, 3], "dt_au": 0.5}': "this relay hosts 2",
        b'{"molecule_ids": [1, 1], "dt_au": 0.5}': "1 distinct",
        b'{"molecule_id_range": [0, true], "dt_au": 0.5}': "molecule_id_range",
        b'{"molecule_id_range": [0, 2]}': "molecule 0: dt_au = None",
        b'{"molecule_id_range": [0, 2], "dt_au": 1, "payloads": '
        b'[{"dt_au": 1}]}': "list of 2 JSON objects",
        b'{"molecule_id_range": [0, 2], "dt_au": 1, "payloads": [{"dt_au": 1}, '
        b'{"dt_au": -1}]}': "molecule 1: dt_au = -1",
    }
    for payload, words in bad.items():
        with pytest.raises(ProtocolError, match=words.replace("(", r"\(")):
            parse_ensemble_init(payload, 2, "this relay")


def test_relays_give_the_same_results_as_direct_connections(unix_name, tmp_path):
    """Four drivers direct and four behind two relays (TCP upstream with a secret; one
    relay also requires a local secret): every step's sources and extras of molecule k+4
    equal molecule k's to 1e-12 over 300 steps; local drivers see their real molecule ids;
    everything exits 0 after STOP."""
    n, steps = 4, 300
    upstream_secret = secret_file(tmp_path / "hub.secret", "upstream-secret")
    local_secret = secret_file(tmp_path / "local.secret", "local-secret")
    hub = SocketHub(port=0, timeout=scaled(30), auth=load_secret(upstream_secret))
    procs: list[subprocess.Popen] = []
    relays: list[tuple[subprocess.Popen, Path]] = []
    upstream = ["--host", "127.0.0.1", "--port", str(hub.port)]
    with hub:
        direct = [hub.register_molecule_return_id() for _ in range(n)]
        for _ in direct:
            procs.append(
                start_driver(
                    "tls",
                    TLS,
                    timeout=scaled(30),
                    host="127.0.0.1",
                    port=hub.port,
                    secret=load_secret(upstream_secret),
                )
            )
        assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in direct}, timeout=scaled(30))
        relayed = [hub.register_molecule_return_id() for _ in range(n)]
        # Relay A reads the upstream secret from --secret-file, relay B from the
        # environment, and B's local drivers must prove the local secret.
        relays.append(
            start_relay(
                tmp_path, f"{unix_name}_a", 2, upstream, "--secret-file", str(upstream_secret)
            )
        )
        relays.append(
            start_relay(
                tmp_path,
                f"{unix_name}_b",
                2,
                upstream,
                "--local-secret-file",
                str(local_secret),
                env=Secret.from_file(upstream_secret).environ(),
            )
        )
        logs = []
        for k in range(n):
            logs.append(tmp_path / f"relayed_{k}.log")
            procs.append(
                start_driver(
                    "tls",
                    TLS,
                    timeout=scaled(30),
                    unix=f"{unix_name}_{'ab'[k // 2]}",
                    log_path=logs[-1],
                    extra_args=["--verbose"],
                    secret=load_secret(local_secret) if k >= 2 else None,
                )
            )
        # Different payloads per molecule make the hub send INIT's "payloads" list.
        assert hub.wait_until_bound(
            {m: {"dt_au": DT_AU, "tag": f"m{m}"} for m in relayed}, timeout=scaled(30)
        )
        assert initialized_ids(logs) == relayed
        ids = np.array(direct + relayed)
        for step in range(steps):
            f = fields_at(step, n)
            result = hub.step_arrays(ids, np.vstack([f, f]))
            np.testing.assert_allclose(
                result.sources[n:],
                result.sources[:n],
                rtol=1e-12,
                atol=1e-300,
                err_msg=f"step {step}",
            )
            extras = result.extras()
            assert set(EXTRAS_KEYS) <= set(extras), sorted(extras)
            for key, values in extras.items():
                np.testing.assert_allclose(
                    values[n:],
                    values[:n],
                    rtol=1e-12,
                    atol=1e-15,
                    err_msg=f"step {step}, extras {key}",
                )
        # Not trivially equal: the molecules saw different fields and answered differently.
        assert len({round(float(s), 12) for s in result.sources[:n, 2]}) == n
        np.testing.assert_allclose(extras["time_au"], steps * DT_AU, rtol=1e-12)
    relay_codes = reap([p for p, _ in relays], scaled(10))
    assert relay_codes == [0, 0], [log.read_text()[-2000:] for _, log in relays]
    assert reap(procs, scaled(10)) == [0] * (2 * n)
    for _, log in relays:
        assert f"STOP from the upstream hub after {steps} steps" in log.read_text()


@pytest.mark.parametrize("history", [0, 100])
def test_killed_driver_behind_relay_is_replaced(history, unix_name, tmp_path):
    """A driver behind a relay SIGKILLed mid-run is replaced at the relay; the run goes on
    and every other molecule steps exactly once per step (its time_au). Without history
    the replacement starts over; with --history it is replayed the missed steps and is
    never behind."""
    n, steps = 3, 60
    hub = SocketHub(unixsocket=unix_name, timeout=scaled(30))
    listen = f"{unix_name}_r"
    procs: list[subprocess.Popen] = []
    with hub:
        ids = [hub.register_molecule_return_id() for _ in range(n)]
        relay, relay_log = start_relay(
            tmp_path, listen, n, ["--unix", unix_name], "--history", str(history)
        )
        for _ in ids:
            procs.append(start_driver("tls", TLS, timeout=scaled(30), unix=listen))
        assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=scaled(30))
        victim_step = random.Random(5).randrange(10, 40)
        victim = procs[1]
        restarted: set[int] = set()
        for step in range(steps):
            if step == victim_step:
                # Killed between steps (a thread killing "during the run" could come after
                # the last step once steps take microseconds); its replacement is started
                # and the step then waits until the relay has bound it.
                victim.send_signal(signal.SIGKILL)
                victim.wait(scaled(10))
                procs.append(start_driver("tls", TLS, timeout=scaled(30), unix=listen))
            result = hub.step_arrays(ids, fields_at(step, n))
            times = dict(zip(ids, result.extras()["time_au"].tolist(), strict=True))
            behind = {m for m in ids if times[m] != pytest.approx((step + 1) * DT_AU)}
            restarted |= behind
            # Only the victim's molecule may be behind, only after the kill, and only
            # without a history to replay.
            assert len(restarted) <= 1, (step, times)
            if step < victim_step or history:
                assert not behind, (step, times)
        assert len(restarted) == (0 if history else 1) and len(procs) == n + 1
        assert relay.poll() is None, relay_log.read_text()
    assert reap([relay], scaled(10)) == [0], relay_log.read_text()[-2000:]
    codes = reap(procs, scaled(10))
    assert codes[1] == -signal.SIGKILL and codes[:1] + codes[2:] == [0] * n
    assert "disconnected" in relay_log.read_text()  # the relay's hub saw the loss


def test_lost_driver_not_replaced_ends_a_relay_with_default_deadlines(unix_name, tmp_path):
    """No deadlines anywhere but --replace-timeout: a driver killed behind the relay and
    not replaced makes the relay exit 3 naming its molecule, and the hub (default
    SocketHub, no deadline) sees the relay's connection drop: step_barrier returns {}.
    A watchdog stops the hub if that never happens; it must not have fired."""
    listen = f"{unix_name}_r"
    with SocketHub(unixsocket=unix_name) as hub:
        assert hub._loop is not None and hub.hub is not None
        dog = threading.Timer(
            scaled(60), hub._loop.call_soon_threadsafe, (hub.hub.request_stop, "by watchdog")
        )
        dog.start()
        ids = [hub.register_molecule_return_id() for _ in range(2)]
        relay, relay_log = start_relay(
            tmp_path,
            listen,
            2,
            ["--unix", unix_name],
            "--replace-timeout",
            str(scaled(0.5)),
            timeout=None,
        )
        procs = [start_driver("tls", TLS, unix=listen) for _ in ids]
        try:
            hub.watch_processes([relay])  # a relay that dies early ends the bind wait
            assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}), relay_log.read_text()
            assert hub.step_barrier({m: {"efield_au": [0.0, 0.0, 1e-3]} for m in ids})
            procs[0].kill()
            procs[0].wait(scaled(10))
            assert hub.step_barrier({m: {"efield_au": [0.0, 0.0, 2e-3]} for m in ids}) == {}
            assert hub.stop_requested is None  # the relay's connection ended the step
        finally:
            dog.cancel()
            codes = reap([relay, *procs], scaled(10))
    text = relay_log.read_text()
    assert codes[0] == 3, text[-2000:]
    assert "no replacement for the local driver of molecule(s)" in text, text[-2000:]


def test_relay_passes_stop_to_its_drivers_and_says_bye(unix_name, tcp_port, tmp_path, caplog):
    """The hub's STOP reaches the drivers behind a relay (one local over UNIX, one over
    TCP; they say BYE and exit 0), the relay answers BYE itself, exits 0 and removes its
    socket file."""
    listen = f"{unix_name}_r"
    hub = SocketHub(unixsocket=unix_name, timeout=scaled(30))
    logs = [tmp_path / f"driver_{k}.log" for k in range(2)]
    with hub:
        ids = [hub.register_molecule_return_id() for _ in range(2)]
        relay, relay_log = start_relay(
            tmp_path, listen, 2, ["--unix", unix_name], "--listen-tcp", f"127.0.0.1:{tcp_port}"
        )
        wheres = [{"unix": listen}, {"host": "127.0.0.1", "port": tcp_port}]
        procs = [
            start_driver(
                "tls", TLS, timeout=scaled(30), log_path=log, extra_args=["--verbose"], **where
            )
            for log, where in zip(logs, wheres, strict=True)
        ]
        assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=scaled(30))
        for step in range(5):
            hub.step_arrays(ids, fields_at(step, 2))
        caplog.set_level(logging.WARNING, logger="maxwellhub.hub")
    assert "no BYE" not in caplog.text  # the relay answered STOP with BYE
    assert reap([relay], scaled(10)) == [0], relay_log.read_text()[-2000:]
    assert reap(procs, scaled(10)) == [0, 0]
    for log in logs:
        assert "STOP after 5 steps; said BYE" in log.read_text()
    assert "STOP from the upstream hub after 5 steps" in relay_log.read_text()
    assert not unix_socket_path(listen).exists()


class ScriptedHub:
    """An upstream hub played by the test, byte by byte, on a UNIX socket."""

    def __init__(self, name: str) -> None:
        self.path = str(unix_socket_path(name))
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(1)
        self.server.settimeout(scaled(20))
        self.conn: socket.socket | None = None
        self.decoder = wire.Decoder("hub")
        self.pending: list = []

    def accept(self) -> None:
        self.conn, _ = self.server.accept()
        self.conn.settimeout(scaled(20))

    @property
    def connection(self) -> socket.socket:
        assert self.conn is not None, "accept() first"
        return self.conn

    def send(self, data: bytes) -> None:
        self.connection.sendall(data)

    def expect(self, kind: type):
        """The next message from the relay, which must be a `kind`."""
        while not self.pending:
            data = self.connection.recv(1 << 16)
            assert data, "the relay closed the connection"
            self.pending += self.decoder.feed(data)
        event = self.pending.pop(0)
        assert isinstance(event, kind), event
        return event

    def welcome(self, molecules: int, init: dict) -> None:
        """Answer MXHHELLO, send INIT and STATUS, and wait for READY."""
        hello = self.expect(wire.Hello)
        assert hello.molecules == molecules
        self.decoder.batch = molecules
        self.send(
            wire.encode_welcome(molecules)
            + wire.encode_init(0, json.dumps(init).encode())
            + wire.encode_header(wire.STATUS)
        )

    def close(self) -> None:
        for s in (self.conn, self.server):
            if s is not None:
                s.close()
        os.unlink(self.path)


@pytest.fixture
def scripted_hub(unix_name):
    hub = ScriptedHub(unix_name)
    yield hub
    hub.close()


def test_relay_exits_nonzero_when_its_upstream_goes_away(scripted_hub, unix_name, tmp_path):
    """An upstream that vanishes after one step (no STOP): the relay says so, naming the
    upstream, stops its driver and exits 1. The driver was initialised as molecule 7."""
    listen = f"{unix_name}_r"
    relay, relay_log = start_relay(tmp_path, listen, 1, ["--unix", unix_name])
    driver_log = tmp_path / "driver.log"
    driver = start_driver(
        "tls", TLS, timeout=scaled(30), unix=listen, log_path=driver_log, extra_args=["--verbose"]
    )
    scripted_hub.accept()
    scripted_hub.welcome(1, {"molecule_id_range": [7, 1], "dt_au": DT_AU, "molecule_id": 7})
    scripted_hub.expect(wire.Ready)
    scripted_hub.send(
        wire.encode_fields_batch([[0.0, 0.0, 1e-3]]) + wire.encode_header(wire.GETFORCE)
    )
    sources = scripted_hub.expect(wire.SourcesBatch)
    assert sources.sources.shape == (1, 3) and sources.sources[0, 2] != 0
    assert sources.extras["time_au"].tolist() == [DT_AU]
    scripted_hub.conn.close()
    assert reap([relay], scaled(10)) == [1]
    text = relay_log.read_text()
    assert (
        f"the upstream hub at unix:{scripted_hub.path} closed the connection before "
        "STOP or EXIT after 1 steps" in text
    ), text
    assert reap([driver], scaled(10)) == [0]
    assert initialized_ids([driver_log]) == [7]


def test_relay_refuses_an_init_for_the_wrong_number_of_molecules(scripted_hub, unix_name, tmp_path):
    """An upstream INIT naming 2 molecules for a relay of 1 is a protocol error: exit 2,
    naming the upstream hub and the numbers."""
    listen = f"{unix_name}_r"
    relay, relay_log = start_relay(tmp_path, listen, 1, ["--unix", unix_name])
    driver = start_driver("tls", TLS, timeout=scaled(30), unix=listen)
    scripted_hub.accept()
    scripted_hub.welcome(1, {"molecule_id_range": [0, 2], "dt_au": DT_AU})
    assert reap([relay], scaled(10)) == [2]
    text = relay_log.read_text()
    assert f"protocol error from the upstream hub at unix:{scripted_hub.path}" in text
    assert "INIT names 2 molecule ids (2 distinct); this relay hosts 1" in text
    assert reap([driver], scaled(10)) == [0]


def test_relay_without_enough_local_drivers_exits_3(unix_name, tmp_path):
    """Drivers for fewer molecules than --molecules within the deadline: exit 3, saying
    how many came and where they were expected."""
    listen = f"{unix_name}_r"
    relay, relay_log = start_relay(tmp_path, listen, 2, ["--unix", unix_name], timeout=1)
    assert reap([relay], scaled(20)) == [3]
    text = relay_log.read_text()
    assert (
        f"drivers for only 0 of 2 molecules connected to the relay at "
        f"unix:{unix_socket_path(listen)}" in text
    ), text
    assert not unix_socket_path(listen).exists()


def test_relay_with_unreachable_upstream_exits_1(unix_name, tmp_path):
    """No upstream hub within the deadline: exit 1 naming its address; the local driver
    is stopped."""
    listen = f"{unix_name}_r"
    relay, relay_log = start_relay(tmp_path, listen, 1, ["--unix", unix_name], timeout=1.5)
    driver = start_driver("tls", TLS, timeout=scaled(30), unix=listen)
    assert reap([relay], scaled(20)) == [1]
    text = relay_log.read_text()
    assert f"could not connect to the upstream hub at unix:{unix_socket_path(unix_name)}" in text, (
        text
    )
    assert reap([driver], scaled(10)) == [0]


def _reference_pe(n: int, steps: int, kicks: dict[int, list[float]] | None = None) -> np.ndarray:
    """Pe of n TLS molecules stepped in-process by the same code path as a driver, every
    molecule kicked with ``kicks[k]`` after k steps."""
    from maxwellhub.models import create_model

    models = []
    for m in range(n):
        model = create_model("tls", n=1, **TLS)
        model.initialize(dt_au=DT_AU, molecule_ids=[m])
        models.append(model)
    pe = np.zeros((steps, n))
    for step in range(steps):
        fields = fields_at(step, n)
        for m, model in enumerate(models):
            if kicks and step in kicks:
                model.apply_kick(kicks[step])
            model.stage(fields[m : m + 1])
            model.commit()
            pe[step, m] = model.extras_of(0)["Pe"]
    return pe


@pytest.mark.parametrize("how", ["checkpoints", "reconnect"])
def test_dead_relay_replaced_with_exact_continuity(how, unix_name, tmp_path):
    """SIGKILL the relay itself at step 25. A new relay on the same socket takes over:
    with "checkpoints" its drivers are new processes that restore their checkpoints (every
    4 steps), with "reconnect" the old drivers (--reconnect) come back with their live
    state. The relay tells the hub the oldest state (MXHRESUME), the hub replays, the
    relay steps only the molecules behind: every population equals the uninterrupted
    in-process reference bitwise."""
    n, steps, kill_at = 3, 50, 25
    ckpt = tmp_path / "ckpt"
    args = (
        ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "4"]
        if how == "checkpoints"
        else ["--reconnect"]
    )
    hub = SocketHub(unixsocket=unix_name, timeout=scaled(30), history=10)
    listen = f"{unix_name}_r"
    procs: list[subprocess.Popen] = []
    pe = np.zeros((steps, n))
    with hub:
        ids = [hub.register_molecule_return_id() for _ in range(n)]
        relay, _ = start_relay(tmp_path, listen, n, ["--unix", unix_name])
        procs += [
            start_driver("tls", TLS, timeout=scaled(30), unix=listen, extra_args=args) for _ in ids
        ]
        assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=scaled(30))
        relays = [relay]
        for step in range(steps):
            if step == kill_at:
                relay.kill()
                relay.wait(scaled(10))
                if how == "checkpoints":
                    assert reap(procs, scaled(10)) == [1] * n  # they lost their relay
                relay, relay_log = start_relay(tmp_path, f"{listen}", n, ["--unix", unix_name])
                relays.append(relay)
                if how == "checkpoints":
                    procs += [
                        start_driver("tls", TLS, timeout=scaled(30), unix=listen, extra_args=args)
                        for _ in ids
                    ]
            pe[step] = hub.step_arrays(ids, fields_at(step, n)).extras()["Pe"]
        hub.graceful_shutdown(wait=scaled(5))
    assert reap(relays, scaled(10))[1:] == [0], relay_log.read_text()[-2000:]
    assert reap(procs, scaled(10))[-n:] == [0] * n
    want = _reference_pe(n, steps)
    assert np.array_equal(pe, want), np.abs(pe - want).max()
    text = relay_log.read_text()
    if how == "checkpoints":  # checkpoints at 24: steps 24 and 25 are replayed
        assert "asked to replay steps 24..24" in text or "24..25" in text, text[-2000:]


def test_replayed_kick_reaches_only_the_molecules_behind_the_relay(unix_name, tmp_path):
    """Kick all molecules after step 9, SIGKILL the relay at step 10. Molecules 0 and 1
    checkpoint every step (states of step 10, kick included), molecule 2 every 4 (state of
    step 8). The new relay resumes from step 8: the hub replays steps 8 and 9 with the
    kick between them, and the relay passes the kick only to molecule 2, the one behind.
    Every population equals the uninterrupted in-process run with one kick."""
    n, steps, kick_at, kill_at = 3, 14, 9, 10
    kick = [0.0, 0.0, 2e-2]
    ckpt = tmp_path / "ckpt"

    hub = SocketHub(unixsocket=unix_name, timeout=scaled(30), history=10)
    listen = f"{unix_name}_r"
    procs: list[subprocess.Popen] = []
    pe = np.zeros((steps, n))
    with hub:
        ids = [hub.register_molecule_return_id() for _ in range(n)]
        relay, _ = start_relay(tmp_path, listen, n, ["--unix", unix_name])
        relays = [relay]
        # one directory, a file per molecule: whichever driver hosts which molecule, two
        # molecules have a checkpoint of step 10 and one of step 8
        procs += [
            start_driver(
                "tls",
                TLS,
                timeout=scaled(30),
                unix=listen,
                extra_args=["--checkpoint-dir", str(ckpt), "--checkpoint-every", str(every)],
            )
            for every in (1, 1, 4)
        ]
        assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=scaled(30))
        for step in range(steps):
            if step == kick_at:
                hub.apply_kick(ids, kick)
            if step == kill_at:
                relay.kill()
                relay.wait(scaled(10))
                assert reap(procs, scaled(10)) == [1] * n  # they lost their relay
                relay, relay_log = start_relay(tmp_path, listen, n, ["--unix", unix_name])
                relays.append(relay)
                procs += [  # each new driver restores its molecule's newest checkpoint
                    start_driver(
                        "tls",
                        TLS,
                        timeout=scaled(30),
                        unix=listen,
                        extra_args=["--checkpoint-dir", str(ckpt)],
                    )
                    for _ in ids
                ]
            pe[step] = hub.step_arrays(ids, fields_at(step, n)).extras()["Pe"]
        hub.graceful_shutdown(wait=scaled(5))
    assert reap(relays, scaled(10))[1:] == [0], relay_log.read_text()[-2000:]
    assert reap(procs, scaled(10))[-n:] == [0] * n
    text = relay_log.read_text()
    assert "asked to replay steps 8..9" in text, text[-2000:]
    want = _reference_pe(n, steps, {kick_at: kick})
    assert not np.array_equal(want, _reference_pe(n, steps))  # the kick shows
    assert np.array_equal(pe, want), np.abs(pe - want)[kill_at:].tolist()
