"""The `maxwellhub-driver` process and its client loop, driven by a fake hub built from the
wire encoders, over UNIX sockets, TCP and socketpairs."""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _events import one
from _util import scaled, unix_socket_path

from maxwellhub.models import create_model
from maxwellhub.net.addresses import unix_socket_path as driver_unix_path
from maxwellhub.protocol import wire
from maxwellhub_drivers.cli import main, parse_params, parse_value
from maxwellhub_drivers.client import (
    EXIT_CONNECTION,
    EXIT_OK,
    EXIT_PROTOCOL,
    _ExtrasJSON,
    run_client,
    serve,
)

DT = 0.5
EYE = np.eye(3)


def init_message(molecule_id: int, **extra) -> bytes:
    """MaxwellLink's INIT: the molecule id and JSON with molecule_id and dt_au."""
    payload = {"molecule_id": molecule_id, "dt_au": DT, **extra}
    return wire.encode_init(molecule_id, json.dumps(payload).encode())


def posdata(field) -> bytes:
    """A lone FIELDDATA (POSDATA) message carrying ``field``."""
    return wire.encode_posdata(EYE, EYE, [field])


def canonical_extras(extras: dict) -> bytes:
    """Extras JSON the way MaxwellLink's driver writes it."""
    return json.dumps(extras, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


def model_extras(model) -> dict:
    """The in-process model's extras for its single molecule."""
    return {key: float(value[0]) for key, value in model.extras().items()}


class FakeHub:
    """The hub's side of one driver connection: wire encoders out, a hub decoder in."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        conn.settimeout(scaled(20))
        self.decoder = wire.Decoder(reader="hub")
        self.pending: list = []

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def receive(self):
        while not self.pending:
            data = self.conn.recv(1 << 16)
            if not data:
                raise EOFError("the driver closed the connection")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def ask(self, data: bytes, expected: type):
        self.send(data)
        event = self.receive()
        assert isinstance(event, expected), event
        return event

    def step(self, field) -> wire.ForceReady:
        """One fused FIELDDATA + GETSOURCE step."""
        reply = self.ask(wire.encode_field_step(field), wire.ForceReady)
        assert reply.energy == 0.0
        assert reply.forces.shape == (1, 3)
        np.testing.assert_array_equal(reply.virial, np.zeros((3, 3)))
        return reply

    def at_eof(self) -> bool:
        return self.conn.recv(1) == b""


def accept(listener: socket.socket) -> FakeHub:
    listener.settimeout(scaled(20))
    conn, _ = listener.accept()
    return FakeHub(conn)


@pytest.fixture
def listen_unix() -> Iterator[Callable[[str], socket.socket]]:
    """Open listening UNIX sockets at given paths; close and unlink them afterwards."""
    opened: list[tuple[socket.socket, str]] = []

    def listen(path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen()
        opened.append((sock, path))
        return sock

    yield listen
    for sock, path in opened:
        sock.close()
        Path(path).unlink(missing_ok=True)


def listen_tcp(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.fixture
def start_driver(driver_exe) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start `maxwellhub-driver` subprocesses; kill any still running at teardown."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, timeout: float = 20.0) -> subprocess.Popen:
        proc = subprocess.Popen(
            [str(driver_exe), *args, "--timeout", str(scaled(timeout))],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for the driver to exit; return its exit status and stderr."""
    _, err = proc.communicate(timeout=scaled(20))
    return proc.returncode, err


def wait_for_stderr_line(proc: subprocess.Popen, needle: str) -> str:
    """Read the driver's stderr until a line containing ``needle`` arrives."""
    stderr = proc.stderr
    assert stderr is not None, "the driver was started without stderr=PIPE"
    with selectors.DefaultSelector() as selector:
        selector.register(stderr, selectors.EVENT_READ)
        while True:
            if not selector.select(timeout=scaled(20)):
                raise TimeoutError(f"no stderr line with {needle!r}")
            line = stderr.readline()
            if not line:
                raise EOFError(f"driver exited (status {proc.wait()}) before {needle!r}")
            if needle in line:
                return line


# ---------------------------------------------------------------- whole sessions


def test_session_over_unix_matches_the_model(start_driver, unix_name, listen_unix):
    """Over a UNIX socket: NEEDINIT, INIT, steps whose sources and extras match the model
    run in-process, an idempotent re-sent field, a zero source without a field, STOP/BYE."""
    listener = listen_unix(str(unix_socket_path(unix_name)))
    proc = start_driver(
        "--unix",
        unix_name,
        "--model",
        "tls",
        "--param",
        "pe_initial=0.1, e_phase_initial=0.3",
        "--param",
        "orientation=1",
    )
    hub = accept(listener)
    reference = create_model("tls", pe_initial=0.1, e_phase_initial=0.3, orientation=1)
    reference.initialize(dt_au=DT, molecule_ids=[7])

    hub.ask(wire.encode_header(wire.STATUS), wire.NeedInit)
    hub.send(init_message(7, user_key="ignored"))
    hub.ask(wire.encode_header(wire.STATUS), wire.Ready)

    fields = np.random.default_rng(0).normal(scale=1e-3, size=(12, 3))
    for field in fields[:10]:
        reply = hub.step(field)
        np.testing.assert_allclose(reply.source, reference.step([field])[0], rtol=1e-14, atol=0)
        extras = json.loads(reply.extras)
        assert reply.extras == canonical_extras(extras)
        assert extras == pytest.approx(model_extras(reference), rel=1e-14, abs=0)

    # A field sent twice (first a wrong one) before GETSOURCE: computed from the committed
    # state each time, so only the last one counts.
    hub.send(posdata(fields[10] * 5))
    hub.ask(wire.encode_header(wire.STATUS), wire.HaveData)
    hub.send(posdata(fields[10]))
    reply = hub.ask(wire.encode_header(wire.GETFORCE), wire.ForceReady)
    np.testing.assert_allclose(reply.source, reference.step([fields[10]])[0], rtol=1e-14, atol=0)
    hub.ask(wire.encode_header(wire.STATUS), wire.Ready)

    # GETSOURCE without a field: zero source, extras of the unchanged state.
    reply = hub.ask(wire.encode_header(wire.GETFORCE), wire.ForceReady)
    assert reply.source.tolist() == [0.0, 0.0, 0.0]
    assert json.loads(reply.extras)["time_au"] == reference.time_au == 11 * DT

    hub.ask(wire.encode_header(wire.STOP), wire.Bye)
    status, err = finish(proc)
    assert status == EXIT_OK, err
    assert "ERROR" not in err
    hub.conn.close()


def test_session_over_tcp_with_params_file_and_exit(start_driver, tmp_path):
    """Over TCP with an sho from a params file: steps match the model; EXIT ends with 0."""
    params: dict[str, Any] = {"omega": 0.3, "mu0": 150.0, "orientation": 0, "p_initial": 0.01}
    params_file = tmp_path / "sho.json"
    params_file.write_text(json.dumps(params))
    with listen_tcp() as listener:
        port = listener.getsockname()[1]
        proc = start_driver(
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model",
            "sho",
            "--params-file",
            str(params_file),
            "--param",
            "mu0=120.0",
        )
        hub = accept(listener)
    reference = create_model("sho", **{**params, "mu0": 120.0})
    reference.initialize(dt_au=DT, molecule_ids=[0])
    hub.send(init_message(0))  # unsolicited, as MaxwellLink's hub does
    fields = np.random.default_rng(1).normal(scale=1e-3, size=(5, 3))
    for field in fields:
        reply = hub.step(field)
        np.testing.assert_allclose(reply.source, reference.step([field])[0], rtol=1e-14, atol=0)
        assert json.loads(reply.extras) == pytest.approx(model_extras(reference), rel=1e-14, abs=0)
    hub.send(wire.encode_header(wire.EXIT))
    status, err = finish(proc)
    assert status == EXIT_OK, err
    assert hub.at_eof()
    hub.conn.close()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_driver_retries_until_the_hub_listens(
    start_driver, listen_unix, tmp_path, tcp_port, transport
):
    """A driver started before the hub keeps retrying and connects once the hub listens."""
    path = str(tmp_path / "hub.sock")
    where = ["--unix", path] if transport == "unix" else ["--port", str(tcp_port)]
    proc = start_driver(*where, "--verbose")
    wait_for_stderr_line(proc, "retrying")  # it really tried before the listener existed
    listener = listen_unix(path) if transport == "unix" else listen_tcp(tcp_port)
    try:
        hub = accept(listener)
    finally:
        listener.close()
    hub.ask(wire.encode_header(wire.STATUS), wire.NeedInit)
    hub.ask(wire.encode_header(wire.STOP), wire.Bye)
    status, err = finish(proc)
    assert status == EXIT_OK, err
    hub.conn.close()


def test_driver_gives_up_at_its_deadline(start_driver, unix_name):
    """With nobody listening the driver exits 1 after --timeout, saying where it tried."""
    proc = start_driver("--unix", unix_name, timeout=0.3)
    status, err = finish(proc)
    assert status == EXIT_CONNECTION
    assert "could not connect to the hub at unix:/tmp/socketmxl_" in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- protocol errors


@pytest.mark.parametrize(
    ("messages", "complaint"),
    [
        ([b"GARBAGE!!!!!"], "unknown message header b'GARBAGE!!!!!' from the hub"),
        ([wire.encode_header(wire.READY)], "READY is not valid from the hub"),
        ([posdata([0.0, 0.0, 1e-3])], "POSDATA (field) before INIT"),
        ([wire.encode_init(0, b'{"molecule_id": 0}')], "no 'dt_au'"),
        ([wire.encode_init(0, b'{"dt_au": -0.5}')], "dt_au = -0.5 is not allowed"),
        ([wire.encode_init(0, b"not json")], "not UTF-8 JSON"),
        ([init_message(0), init_message(1)], "INIT again with molecule id 1"),
        ([init_message(0), posdata([np.nan, 0.0, 0.0])], "not finite"),
    ],
    ids=[
        "garbage",
        "driver-message",
        "field-before-init",
        "no-dt",
        "bad-dt",
        "not-json",
        "second-init",
        "nan-field",
    ],
)
def test_protocol_errors_exit_2_with_one_line(
    start_driver, unix_name, listen_unix, messages, complaint
):
    """Bad bytes or a message out of turn: exit status 2 and one clear stderr line."""
    listener = listen_unix(str(unix_socket_path(unix_name)))
    proc = start_driver("--unix", unix_name)
    hub = accept(listener)
    hub.send(b"".join(messages))
    status, err = finish(proc)
    assert status == EXIT_PROTOCOL, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "protocol error" in lines[0] and complaint in lines[0], lines[0]
    hub.conn.close()


def test_hub_closing_before_stop_exits_1(start_driver, unix_name, listen_unix):
    """A hub that vanishes mid-session makes the driver exit 1, saying so."""
    listener = listen_unix(str(unix_socket_path(unix_name)))
    proc = start_driver("--unix", unix_name)
    hub = accept(listener)
    hub.send(init_message(3))
    hub.step([0.0, 0.0, 1e-3])
    hub.conn.close()
    status, err = finish(proc)
    assert status == EXIT_CONNECTION
    assert "(molecule 3)" in err and "closed the connection before STOP or EXIT" in err


def test_hub_closing_right_after_stop_exits_0(start_driver, unix_name, listen_unix):
    """STOP followed at once by a close (BYE unread) is still a clean end."""
    listener = listen_unix(str(unix_socket_path(unix_name)))
    proc = start_driver("--unix", unix_name)
    hub = accept(listener)
    hub.send(init_message(0) + wire.encode_header(wire.STOP))
    hub.conn.close()
    status, err = finish(proc)
    assert status == EXIT_OK, err


# ---------------------------------------------------------------- in-process client loop


def run_in_thread(target, *args, **kwargs) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(target(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, result


def test_serve_handles_a_whole_session_in_one_read():
    """serve() on a socketpair answers several messages that arrive in one read, in order."""
    hub_sock, driver_sock = socket.socketpair()
    with hub_sock, driver_sock:
        model = create_model("tls", pe_initial=0.2)
        thread, result = run_in_thread(serve, driver_sock, model)
        reference = create_model("tls", pe_initial=0.2)
        reference.initialize(dt_au=DT, molecule_ids=[2])
        fields = [[0.0, 0.0, 1e-3], [0.0, 0.0, -2e-3]]
        hub = FakeHub(hub_sock)
        hub.send(
            wire.encode_header(wire.STATUS)
            + init_message(2)
            + wire.encode_header(wire.STATUS)
            + b"".join(wire.encode_field_step(f) for f in fields)
            + wire.encode_header(wire.STOP)
        )
        assert isinstance(hub.receive(), wire.NeedInit)
        assert isinstance(hub.receive(), wire.Ready)
        for field in fields:
            reply = hub.receive()
            np.testing.assert_array_equal(reply.source, reference.step([field])[0])
        assert isinstance(hub.receive(), wire.Bye)
        thread.join(scaled(20))
        assert result == [EXIT_OK]


def test_serve_accepts_a_step_split_at_every_byte():
    """A field step sent one byte at a time gives the same answer as one sent whole."""
    hub_sock, driver_sock = socket.socketpair()
    with hub_sock, driver_sock:
        thread, result = run_in_thread(serve, driver_sock, create_model("sho"))
        hub = FakeHub(hub_sock)
        hub.send(init_message(0))
        for byte in wire.encode_field_step([0.0, 0.0, 1e-3]):
            hub.send(bytes([byte]))
        reference = create_model("sho")
        reference.initialize(dt_au=DT)
        np.testing.assert_array_equal(hub.receive().source, reference.step([[0.0, 0.0, 1e-3]])[0])
        hub.send(wire.encode_header(wire.EXIT))
        thread.join(scaled(20))
        assert result == [EXIT_OK]


def test_run_client_connects_by_absolute_unix_path(tmp_path, listen_unix):
    """run_client() from Python connects to an absolute UNIX path and ends on STOP."""
    path = str(tmp_path / "hub.sock")
    listener = listen_unix(path)
    thread, result = run_in_thread(run_client, create_model("tls"), unix=path, timeout=scaled(20))
    hub = accept(listener)
    hub.send(init_message(4))
    hub.step([1e-3, 0.0, 0.0])
    hub.ask(wire.encode_header(wire.STOP), wire.Bye)
    thread.join(scaled(20))
    assert result == [EXIT_OK]
    hub.conn.close()


@pytest.mark.parametrize(
    "extras",
    [
        {"time_au": 0.5, "Pe": 0.1, "Pg": 0.9, "energy_au": -1.5e-300, "muz_au": 1e300},
        {"b": 1.0, "a": 2.0, "%s": 3.0, "caf\u00e9": 0.1},
        {"x": float("nan"), "y": float("inf"), "z": -float("inf")},
        {"n": 1, "flag": True, "s": 2.0},
        {},
    ],
)
def test_extras_json_is_json_dumps(extras):
    """The cached extras encoder writes exactly what MaxwellLink's json.dumps writes, for
    floats, odd keys, non-finite values and non-float values, also after a key change."""
    encode = _ExtrasJSON()
    for value in ({"other": 1.0}, extras, extras):
        assert encode(value) == canonical_extras(value)


def test_run_client_serves_a_batched_model_as_an_ensemble(listen_unix, unix_name):
    """A model with n > 1 is served as an ensemble: the driver opens with MXHHELLO for n
    molecules, and a hub that does not answer it ends the session with a clear error."""
    listener = listen_unix(str(unix_socket_path(unix_name)))
    done: dict[str, int] = {}
    thread = threading.Thread(
        target=lambda: done.setdefault(
            "code", run_client(create_model("tls", n=3), unix=unix_name, timeout=scaled(20))
        )
    )
    thread.start()
    listener.settimeout(scaled(20))
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(scaled(20))
        hello = b""
        while len(hello) < 24:
            hello += conn.recv(24 - len(hello))
    thread.join(scaled(20))
    # on a UNIX socket the ensemble also offers the shared-memory lane (flags bit 0)
    assert hello[:20] == wire.encode_hello(3)[:20]
    flags = one(wire.Decoder("hub").feed(hello), wire.Hello).flags
    assert flags & ~0xFF00 == wire.HELLO_SHM_LANE
    assert done["code"] == EXIT_CONNECTION


def test_unix_socket_names():
    """A bare name maps to /tmp/socketmxl_NAME; an absolute path is used as given."""
    assert driver_unix_path("demo") == "/tmp/socketmxl_demo"
    assert driver_unix_path("/run/user/1/hub.sock") == "/run/user/1/hub.sock"
    with pytest.raises(ValueError, match="longer than 107 bytes"):
        driver_unix_path("x" * 200)


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("-2", -2),
        ("0.5", 0.5),
        ("1e-4", 1e-4),
        ("true", True),
        ("False", False),
        ("[0.1, 0, 1]", [0.1, 0, 1]),
        ("x", "x"),
        (" spaced ", "spaced"),
    ],
)
def test_param_values_parse(text, value):
    """--param values parse as int, float, bool or JSON list, else stay strings."""
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_params_merge_file_and_pairs(tmp_path):
    """--params-file is read first, --param pairs (comma lists allowed) override it."""
    params_file = tmp_path / "p.json"
    params_file.write_text('{"omega": 0.1, "mu12": 10}')
    assert parse_params(["omega=0.3, pe_initial=[0.1,0.2]", "orientation=0"], str(params_file)) == {
        "omega": 0.3,
        "mu12": 10,
        "pe_initial": [0.1, 0.2],
        "orientation": 0,
    }
    with pytest.raises(ValueError, match="expected key=value"):
        parse_params(["omega"])
    with pytest.raises(ValueError, match="looks like JSON"):
        parse_params(["pe_initial=[0.1,"])
    params_file.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        parse_params([], str(params_file))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--unix", "a", "--host", "b"], "either --unix or --host"),
        (["--param", "omega=-1"], "parameter omega = -1 is not allowed"),
        (["--param", "colour=red"], "unknown parameter(s) colour; allowed: omega"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--timeout", "0"], "--timeout 0"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    """Bad command-line arguments exit 2 with argparse's usage and a clear reason."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_threads_pinned_before_numpy_loads():
    """The CLI pins BLAS/OpenMP threads to 1 before numpy is imported; the package only
    sets them when unset, so an embedding process keeps its own choice."""
    code = (
        "import os, sys; import maxwellhub_drivers.cli; "
        "print(os.environ['OMP_NUM_THREADS'], os.environ['OPENBLAS_NUM_THREADS'], "
        "'numpy' in sys.modules)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": "4"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=True,
    ).stdout
    assert out.split() == ["1", "1", "False"]
    code = "import os; import maxwellhub_drivers; print(os.environ['OMP_NUM_THREADS'])"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=True,
    ).stdout
    assert out.split() == ["4"]
