"""Stock i-PI clients against the hub: ASE's SocketClient and i-PI's own Python driver
(`i-pi-py_driver`), both unmodified, from the peer venv .peers/stock-ipi (marker `stock`:
skipped with the reason when it is absent), next to a maxwellhub driver that must keep the
fused fast path. A scripted client in this file stands in for ASE >= 3.29 (READY before
INIT and after every force call) and needs no peer.

The field is the one atom's position (bohr), the source is the force (hartree/bohr): each
client computes a known function of the field and the test checks every step's value.
Run with -s to see the steps/s of each client type.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from _util import scaled, stock_clients

from maxwellhub import SocketHub
from maxwellhub.models import create_model
from maxwellhub.protocol import wire
from maxwellhub.run.launch import reap, start_driver

STEPS = 100
DT_AU = 0.5
SHO = {"omega": 0.3, "mu0": 1.7, "orientation": 2, "q_initial": 0.2}

# The ASE calculator's forces, in a.u.: M @ E + C * E**2 (M not symmetric, so a swapped
# axis or a transposed matrix shows).
ASE_M = np.array([[1.0, 0.5, 0.0], [-0.25, 2.0, 0.125], [0.0, -0.75, 3.0]])
ASE_C = np.array([10.0, -20.0, 30.0])
# i-PI's harmonic model with one spring constant per axis: force = -k * E.
IPI_K = np.array([1.3, 2.1, 2.3])

ASE_CLIENT = textwrap.dedent('''
    """ASE's SocketClient with a calculator whose forces are a known function of the
    position (the field). argv: UNIX socket name (ASE prefixes /tmp/ipi_), timeout."""
    import json
    import sys

    import numpy as np
    from ase import Atoms, units
    from ase.calculators.calculator import Calculator, all_changes
    from ase.calculators.socketio import SocketClient

    M = np.array({m})
    C = np.array({c})


    class FieldForce(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            e = self.atoms.positions[0] / units.Bohr          # back to a.u.
            f = M @ e + C * e * e                              # hartree / bohr
            self.results = {{"energy": float(e @ e) * units.Ha,
                             "forces": (f * units.Ha / units.Bohr).reshape(1, 3)}}


    atoms = Atoms("H", positions=[[0.0, 0.0, 0.0]])
    atoms.calc = FieldForce()
    client = SocketClient(unixsocket=sys.argv[1], timeout=float(sys.argv[2]))
    steps = sum(1 for _ in client.irun(atoms, use_stress=False))
    print(json.dumps({{"steps": steps}}), flush=True)
''').format(m=ASE_M.tolist(), c=ASE_C.tolist())


def fields(steps: int, seed: int) -> np.ndarray:
    """A reproducible field per step, all three axes non-zero, different every step."""
    rng = np.random.default_rng(seed)
    return 1e-2 * (rng.standard_normal((steps, 3)) + np.array([0.5, -0.5, 1.0]))


def ase_expected(e: np.ndarray) -> np.ndarray:
    return ASE_M @ e + ASE_C * e * e


def ipi_expected(e: np.ndarray) -> np.ndarray:
    return -IPI_K * e


@pytest.fixture
def ipi_name(unix_name: str):
    """A socket name for the clients' own convention: the hub listens on /tmp/ipi_NAME."""
    path = Path("/tmp/ipi_" + unix_name)
    path.unlink(missing_ok=True)
    yield unix_name
    path.unlink(missing_ok=True)


def _stock() -> tuple[Path, Path]:
    """The stock clients' python and i-PI driver (tests needing them are marked stock)."""
    found = stock_clients()
    assert found is not None, "a stock test ran without the stock clients"
    return found


def start_ase(name: str, log: Path) -> subprocess.Popen:
    python, _ = _stock()
    script = log.parent / "ase_socketclient.py"  # not ase.py: that would shadow ase
    script.write_text(ASE_CLIENT)
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(python), str(script), name, str(scaled(60))],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


IPI_PARAM = ",".join(str(k) for k in IPI_K)


def start_ipi(
    name: str, log: Path, model: str = "harmonic", param: str = IPI_PARAM
) -> subprocess.Popen:
    _, driver = _stock()
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(driver), "-u", "-a", name, "-S", "/tmp/ipi_", "-m", model, "-o", param],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def connection(hub: SocketHub, mid: int):
    """The hub's connection serving molecule ``mid`` (white box: its learned dialect)."""
    assert hub.hub is not None
    return hub.hub._molecules[mid].driver


@pytest.fixture
def started():
    """Client processes of a test; any still running at teardown (a failed test) is ended."""
    procs: list[subprocess.Popen] = []
    yield procs
    reap(procs, scaled(5))


def bind_one(hub: SocketHub, start, log: Path, started: list) -> tuple[int, subprocess.Popen]:
    """Register a molecule, start its client and wait until it is bound and initialised
    (within a deadline, giving up early if the client dies)."""
    mid = hub.register_molecule_return_id()
    proc = start()
    started.append(proc)
    deadline = time.monotonic() + scaled(60)
    while not hub.wait_until_bound({mid: {"dt_au": DT_AU}}, timeout=0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(scaled(10))
            pytest.fail(
                f"client for molecule {mid} did not bind (exit code {proc.poll()}):\n"
                + log_text(log)
            )
    return mid, proc


def run(hub: SocketHub, plan: Mapping[int, tuple[np.ndarray, Callable]]) -> float:
    """Step every molecule through its fields, checking every source; returns steps/s."""
    t0 = time.perf_counter()
    for step in range(STEPS):
        results = hub.step({m: {"efield_au": f[step]} for m, (f, _) in plan.items()})
        for m, (f, expect) in plan.items():
            np.testing.assert_allclose(
                results[m]["amp"],
                expect(f[step]),
                rtol=1e-12,
                atol=1e-17,
                err_msg=f"molecule {m}, step {step}",
            )
    return STEPS / (time.perf_counter() - t0)


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no log)"


class _Listening(threading.Event):
    """Set when the relay said it listens (``seen``) or when its stderr ended."""

    seen = False


#: What `maxwellhub relay` logs once its local socket listens (relay.Relay._open).
RELAY_LISTENING = b"waiting for drivers of"


def start_relay_and_await_listening(
    argv: list[str], log: Path
) -> tuple[subprocess.Popen, _Listening]:
    """Start `maxwellhub relay` with its stderr on a pipe; a thread copies it to ``log``
    and sets the returned event at the line that says the relay listens (or at the end
    of its stderr, with ``seen`` False, when the relay died first). Awaiting that line
    is the only ordering that holds for clients that connect once (no retry)."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    listening = _Listening()

    def copy() -> None:
        with open(log, "wb") as out:
            assert proc.stderr is not None  # stderr=PIPE
            for line in proc.stderr:  # ends when the relay exits
                out.write(line)
                out.flush()
                if RELAY_LISTENING in line and not listening.seen:
                    listening.seen = True
                    listening.set()
        proc.stderr.close()
        listening.set()

    threading.Thread(target=copy, name="relay-stderr", daemon=True).start()
    return proc, listening


# ---------------------------------------------------------------- real clients


@pytest.mark.stock
def test_ase_socketclient_100_steps(ipi_name, tmp_path, started):
    """ASE's SocketClient (3.28: back to NEEDINIT after every force call): READY before
    INIT, so no INIT at binding; after its first force it asks for INIT again, so every
    later step is STATUS, INIT + STATUS, then the field; EXIT at the end, exit status 0."""
    log = tmp_path / "ase.log"
    with SocketHub(unixsocket="/tmp/ipi_" + ipi_name, timeout=scaled(30)) as hub:
        mid, proc = bind_one(hub, lambda: start_ase(ipi_name, log), log, started)
        f = fields(STEPS, seed=11)
        rate = run(hub, {mid: (f, ase_expected)})
        conn = connection(hub, mid)
        # READY before INIT, so none at binding; it asked for one after its first force
        assert conn.stock and conn.status_each_step and conn.init_needed
        # one STATUS after the first force, then STATUS + (INIT and) STATUS per step
        assert conn.status_probes == 1 + 2 * (STEPS - 1)
        status = hub.status()
        assert (status["stock_clients"], status["status_each_step"]) == (1, 1)
    assert reap([proc], scaled(20)) == [0], log_text(log)
    assert f'"steps": {STEPS}' in log_text(log), log_text(log)
    print(f"\nASE SocketClient 3.28 (STATUS+INIT every step): {rate:,.0f} steps/s")


@pytest.mark.stock
def test_ipi_driver_100_steps(ipi_name, tmp_path, started):
    """i-PI's driver with its harmonic model: NEEDINIT before INIT, READY after every
    force call, so after one STATUS it gets the fused fast path; its extras ("nada") are
    not JSON, so it gets EXIT at the end (it ignores STOP) and exits 0."""
    log = tmp_path / "ipi.log"
    with SocketHub(unixsocket="/tmp/ipi_" + ipi_name, timeout=scaled(30)) as hub:
        mid, proc = bind_one(hub, lambda: start_ipi(ipi_name, log), log, started)
        f = fields(STEPS, seed=12)
        rate = run(hub, {mid: (f, ipi_expected)})
        conn = connection(hub, mid)
        assert conn.stock and not conn.status_each_step and not conn.stock_steps
        assert conn.status_probes == 1
    assert reap([proc], scaled(20)) == [0], log_text(log)
    assert "Received exit message from i-PI" in log_text(log), log_text(log)
    print(f"\ni-PI i-pi-py_driver harmonic (fused): {rate:,.0f} steps/s")


@pytest.mark.stock
def test_ipi_driver_with_json_extras_gets_exit_after_stop(ipi_name, tmp_path, started, caplog):
    """i-PI's dummy model sends JSON extras, so the hub cannot tell it from MaxwellLink's
    driver: it sends STOP, which i-PI's driver ignores, then EXIT when no BYE came."""
    log = tmp_path / "ipi_dummy.log"
    caplog.set_level(logging.INFO, logger="maxwellhub.hub")
    with SocketHub(unixsocket="/tmp/ipi_" + ipi_name, timeout=scaled(30)) as hub:
        mid, proc = bind_one(hub, lambda: start_ipi(ipi_name, log, "dummy", ""), log, started)
        for step in range(5):
            result = hub.step({mid: {"efield_au": [0.1 * step, 0.2, 0.3]}})
            assert result[mid]["amp"].tolist() == [0.0, 0.0, 0.0]
            assert result[mid]["extra"] == b'{"dipole": [0.0, 0.0, 0.0]}'
        conn = connection(hub, mid)
        assert not conn.stock and not conn.status_each_step
    assert reap([proc], scaled(20)) == [0], log_text(log)
    assert "Received exit message from i-PI" in log_text(log), log_text(log)
    assert any("did not answer STOP" in r.getMessage() for r in caplog.records)


@pytest.mark.stock
def test_stock_clients_and_our_driver_on_one_hub(ipi_name, tmp_path, started, driver_exe, caplog):
    """ASE, i-PI and a maxwellhub driver on one hub, 100 steps, every value checked: the
    maxwellhub driver gets one STATUS in all (then the fused path) and STOP, the stock
    clients EXIT; all exit 0."""
    sock = "/tmp/ipi_" + ipi_name
    logs = {k: tmp_path / f"{k}.log" for k in ("ase", "ipi", "ours")}
    ours_ref = create_model("sho", n=1, **SHO)
    ours_ref.initialize(dt_au=DT_AU, molecule_ids=[0])
    procs = []
    caplog.set_level(logging.INFO, logger="maxwellhub.hub")
    with SocketHub(unixsocket=sock, timeout=scaled(30)) as hub:
        a, p = bind_one(hub, lambda: start_ase(ipi_name, logs["ase"]), logs["ase"], started)
        procs.append(p)
        i, p = bind_one(hub, lambda: start_ipi(ipi_name, logs["ipi"]), logs["ipi"], started)
        procs.append(p)
        o, p = bind_one(
            hub,
            lambda: start_driver("sho", SHO, timeout=scaled(30), unix=sock, log_path=logs["ours"]),
            logs["ours"],
            started,
        )
        procs.append(p)
        plan = {
            a: (fields(STEPS, 21), ase_expected),
            i: (fields(STEPS, 22), ipi_expected),
            o: (fields(STEPS, 23), lambda e: ours_ref.step(e.reshape(1, 3))[0]),
        }
        rate = run(hub, plan)
        ours, ase, ipi = connection(hub, o), connection(hub, a), connection(hub, i)
        assert (ours.stock, ours.status_each_step, ours.stock_steps) == (False, False, False)
        assert ours.status_probes == 1  # the one after its first source, no more
        assert ase.status_probes == 1 + 2 * (STEPS - 1) and ase.status_each_step
        assert ipi.status_probes == 1 and ipi.stock and not ipi.status_each_step
        status = hub.status()
        assert (status["stock_clients"], status["status_each_step"]) == (2, 1)
    codes = reap(procs, scaled(20))
    assert codes == [0, 0, 0], {k: log_text(v) for k, v in logs.items()}
    # ours answered STOP with BYE (no EXIT fallback); the stock clients were told EXIT
    assert ours.said_bye is True and ase.said_bye is True
    assert not any("did not answer STOP" in r.getMessage() for r in caplog.records)
    print(f"\nASE + i-PI + maxwellhub-driver sho on one hub: {rate:,.0f} steps/s")


def test_our_driver_alone_for_comparison(unix_name, tmp_path, started):
    """The same 100 checked steps with a maxwellhub driver alone: one STATUS after its
    first source, then the fused path (no peer needed)."""
    ref = create_model("sho", n=1, **SHO)
    ref.initialize(dt_au=DT_AU, molecule_ids=[0])
    log = tmp_path / "ours.log"
    with SocketHub(unixsocket=unix_name, timeout=scaled(30)) as hub:
        mid, proc = bind_one(
            hub,
            lambda: start_driver("sho", SHO, timeout=scaled(30), unix=unix_name, log_path=log),
            log,
            started,
        )
        rate = run(hub, {mid: (fields(STEPS, 31), lambda e: ref.step(e.reshape(1, 3))[0])})
        conn = connection(hub, mid)
        assert (conn.status_probes, conn.stock, conn.stock_steps) == (1, False, False)
    assert reap([proc], scaled(20)) == [0], log_text(log)
    print(f"\nmaxwellhub-driver sho (fused): {rate:,.0f} steps/s")


# ---------------------------------------------------------------- scripted client


class _StayReadyClient(threading.Thread):
    """What ASE >= 3.29's SocketClient does, strictly: READY from the start and after every
    force call, an error on INIT (it only takes INIT after NEEDINIT), POSDATA only when
    READY, GETFORCE only with data, and it leaves on EXIT. Forces: -2 * position."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(scaled(30))
        self.sock.connect(path)
        self.error: str | None = None
        self.steps = 0
        self.exited = False

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("hub closed the connection")
            buf += chunk
        return buf

    def _say(self, name: bytes) -> None:
        self.sock.sendall(wire.encode_header(name))

    def run(self) -> None:
        state, pos = wire.READY, np.zeros(3)  # pos is set by POSDATA before GETFORCE
        try:
            while True:
                head = self._read(12).rstrip()
                if head == wire.STATUS:
                    self._say(state)
                elif head == wire.POSDATA and state == wire.READY:
                    body = self._read(148)
                    pos = np.frombuffer(self._read(24), "<f8")
                    assert np.frombuffer(body[-4:], "<i4")[0] == 1
                    state = wire.HAVEDATA
                elif head == wire.GETFORCE and state == wire.HAVEDATA:
                    self.sock.sendall(
                        wire.encode_forceready(0.5, (-2.0 * pos).reshape(1, 3), extras=b"\0")
                    )
                    state, self.steps = wire.READY, self.steps + 1
                elif head == wire.EXIT:
                    self.exited = True
                    return
                else:
                    raise AssertionError(f"{head!r} while {state!r}")
        except Exception as exc:  # reported by the test
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.sock.close()


def test_client_ready_before_init_and_after_every_step(unix_name):
    """A client that is READY from the start (ASE >= 3.29) is never sent INIT, is learned
    to stay READY after one STATUS, gets fused steps, and EXIT at the end."""
    with SocketHub(unixsocket=unix_name, timeout=scaled(30)) as hub:
        mid = hub.register_molecule_return_id()
        assert hub.hub is not None
        client = _StayReadyClient(str(hub.hub.unixsocket))
        client.start()
        assert hub.wait_until_bound({mid: {"dt_au": DT_AU}}, timeout=scaled(30))
        f = fields(20, seed=41)
        for step in range(20):
            got = hub.step({mid: {"efield_au": f[step]}})[mid]["amp"]
            np.testing.assert_allclose(got, -2.0 * f[step], rtol=1e-15)
        conn = connection(hub, mid)
        assert (conn.stock, conn.init_needed, conn.status_each_step) == (True, False, False)
        assert conn.status_probes == 1
    client.join(scaled(10))
    assert client.error is None and client.exited and client.steps == 20


@pytest.mark.peer
def test_maxwelllink_driver_keeps_fused_path_and_gets_stop(
    mxl_driver, unix_name, tmp_path, started, caplog
):
    """MaxwellLink's mxl_driver: one STATUS after its first source, then the fused path;
    STOP at the end, answered by BYE (so no EXIT follows: its driver raises on EXIT)."""
    caplog.set_level(logging.INFO, logger="maxwellhub.hub")
    log = tmp_path / "mxl.log"
    tls = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 0.1}
    ref = create_model("tls", n=1, **tls)
    ref.initialize(dt_au=DT_AU, molecule_ids=[0])

    def start() -> subprocess.Popen:
        with open(log, "wb") as out:
            return subprocess.Popen(
                [
                    str(mxl_driver),
                    "--model",
                    "tls",
                    "--unix",
                    "--address",
                    unix_name,
                    "--param",
                    ", ".join(f"{k}={v}" for k, v in tls.items()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    with SocketHub(unixsocket=unix_name, timeout=scaled(30)) as hub:
        mid, proc = bind_one(hub, start, log, started)
        f = fields(STEPS, seed=51) * 1e-1
        # MaxwellLink's TLS and ours agree to 1e-10 (tests/integration/test_live.py), not to 1e-12
        for step in range(STEPS):
            got = hub.step({mid: {"efield_au": f[step]}})[mid]["amp"]
            want = ref.step(f[step].reshape(1, 3))[0]
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-14, err_msg=f"step {step}")
        conn = connection(hub, mid)
        assert (conn.status_probes, conn.stock, conn.stock_steps) == (1, False, False)
    assert reap([proc], scaled(20)) == [0], log_text(log)
    assert conn.said_bye is True
    assert not any("did not answer STOP" in r.getMessage() for r in caplog.records)


@pytest.mark.stock
def test_stock_clients_behind_a_relay_reach_an_authenticating_hub(ipi_name, tmp_path, started):
    """Stock clients cannot answer MXHAUTH; behind a relay on their node they need not:
    ASE and i-PI connect to the relay's UNIX socket (their /tmp/ipi_ prefix), the relay
    proves the secret to a TCP hub, and every step's values are right; all exit 0."""
    import sys

    from maxwellhub.protocol.auth import load_secret

    secret_file = tmp_path / "hub.secret"
    secret_file.write_text("relay-test-secret\n")
    secret_file.chmod(0o600)
    with SocketHub(port=0, timeout=scaled(30), auth=load_secret(secret_file)) as hub:
        ids = [hub.register_molecule_return_id() for _ in range(2)]
        relay_log = tmp_path / "relay.log"
        relay, listening = start_relay_and_await_listening(
            [
                str(Path(sys.executable).parent / "maxwellhub"),
                "relay",
                "--molecules",
                "2",
                "--host",
                "127.0.0.1",
                "--port",
                str(hub.port),
                "--secret-file",
                str(secret_file),
                "--listen-unix",
                "/tmp/ipi_" + ipi_name,
                "--timeout",
                str(scaled(30)),
            ],
            relay_log,
        )
        started.append(relay)
        # ASE's SocketClient connects exactly once: it must not start before the relay
        # listens, or it fails with ENOENT/ECONNREFUSED.
        assert listening.wait(scaled(30)) and listening.seen, log_text(relay_log)
        started.append(start_ase(ipi_name, tmp_path / "ase.log"))
        started.append(start_ipi(ipi_name, tmp_path / "ipi.log"))
        assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=scaled(60)), (
            log_text(relay_log)
        )
        f = fields(STEPS, seed=17)
        # The relay binds its clients in connection order: tell them apart by step 0.
        first = hub.step_arrays(ids, f[0][None, :] * np.ones((2, 1))).sources
        ase_row = 0 if np.allclose(first[0], ase_expected(f[0]), rtol=1e-12) else 1
        expect = [ase_expected, ipi_expected] if ase_row == 0 else [ipi_expected, ase_expected]
        for row in range(2):
            np.testing.assert_allclose(first[row], expect[row](f[0]), rtol=1e-12, atol=1e-17)
        for step in range(1, STEPS):
            got = hub.step_arrays(ids, f[step][None, :] * np.ones((2, 1))).sources
            for row in range(2):
                np.testing.assert_allclose(
                    got[row],
                    expect[row](f[step]),
                    rtol=1e-12,
                    atol=1e-17,
                    err_msg=f"row {row}, step {step}",
                )
        hub.graceful_shutdown(wait=scaled(5))
    assert reap(started, scaled(15)) == [0, 0, 0], log_text(relay_log)
