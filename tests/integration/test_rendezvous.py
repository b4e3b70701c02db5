"""Rendezvous files: atomic writing, validation naming the field, leftovers of dead runs
rejected, drivers waiting with a deadline, and the hub writing and removing its file."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from maxwellhub import Hub, SocketHub
from maxwellhub.errors import UsageError
from maxwellhub.net.rendezvous import (
    RendezvousError,
    read_address_file,
    remove_address_file,
    stale_reason,
    wait_and_connect,
    write_address_file,
)
from maxwellhub.protocol.auth import load_secret

FIELD = np.array([0.0, 0.0, 1e-3])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stale(path) -> str:
    """Why the address file at ``path`` is stale (asserted to be)."""
    reason = stale_reason(read_address_file(path))
    assert reason is not None, f"{path} is not stale"
    return reason


def _rewrite(path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _secret_file(tmp_path, text: str = "s3cret-value", name: str = "hub.secret"):
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_write_then_read_round_trip(tmp_path):
    """The file holds address, pid, host, run id, time and the secret's path, is written
    through a temporary file (none left behind) and never contains the secret."""
    secret = _secret_file(tmp_path)
    before = time.time()
    info = write_address_file(
        tmp_path / "hub.addr", address=("127.0.0.1", 4242), secret_file=secret, auth=True
    )
    back = read_address_file(tmp_path / "hub.addr")
    assert back == info
    assert (back.transport, back.host, back.port, back.unix) == ("tcp", "127.0.0.1", 4242, None)
    assert back.pid == os.getpid() and back.hostname == socket.gethostname()
    assert back.auth and back.secret_file == str(secret)
    assert before <= back.created <= time.time() and len(back.run_id) == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub.addr", "hub.secret"]
    assert "s3cret" not in (tmp_path / "hub.addr").read_text()
    assert stale_reason(back) is None


def test_wildcard_bind_advertises_the_host_name(tmp_path):
    """A hub bound to 0.0.0.0 tells drivers this machine's host name."""
    info = write_address_file(tmp_path / "a", address=("0.0.0.0", 1))
    assert info.host == socket.gethostname()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"port": "31415"}, "'port'"),
        ({"port": True}, "'port'"),
        ({"port": 0}, "'port'"),
        ({"transport": "udp"}, "'transport'"),
        ({"version": 2}, "'version'"),
        ({"format": "other"}, "'format'"),
        ({"unix": "rel/path", "transport": "unix"}, "'unix'"),
        ({"secret_file": "hub.secret"}, "'secret_file'"),
        ({"pid": -1}, "'pid'"),
        ({"run_id": ""}, "'run_id'"),
        ({"auth": "yes"}, "'auth'"),
    ],
)
def test_bad_fields_are_named(tmp_path, change, field):
    """Each malformed field is refused with the file and the field in the message."""
    path = tmp_path / "hub.addr"
    write_address_file(path, address=("127.0.0.1", 4242))
    _rewrite(path, **change)
    with pytest.raises(RendezvousError, match=field) as err:
        read_address_file(path)
    assert str(path) in str(err.value)


def test_missing_field_and_garbage(tmp_path):
    """A missing field is named; a file that is not JSON says so."""
    path = tmp_path / "hub.addr"
    write_address_file(path, address=("127.0.0.1", 4242))
    data = json.loads(path.read_text())
    del data["hostname"]
    path.write_text(json.dumps(data))
    with pytest.raises(RendezvousError, match="'hostname' is missing"):
        read_address_file(path)
    path.write_bytes(b"\xff{")
    with pytest.raises(RendezvousError, match="not UTF-8 JSON"):
        read_address_file(path)


def test_leftovers_are_recognised(tmp_path):
    """Dead pid, a pid reused by another process, and a previous boot are all stale."""
    path = tmp_path / "hub.addr"
    write_address_file(path, address=("127.0.0.1", 4242))
    _rewrite(path, pid=_dead_pid())
    assert "is not running" in _stale(path)
    write_address_file(path, address=("127.0.0.1", 4242))
    pid_start = read_address_file(path).pid_start
    assert pid_start is not None
    _rewrite(path, pid_start=pid_start + 1)
    assert "is now another process" in _stale(path)
    write_address_file(path, address=("127.0.0.1", 4242))
    _rewrite(path, boot_id="00000000-0000-0000-0000-000000000000")
    assert "last booted" in _stale(path)
    _rewrite(path, hostname="elsewhere.invalid", pid=_dead_pid())
    assert stale_reason(read_address_file(path)) is None  # only a connection can tell


def test_hub_refuses_a_live_hubs_file_and_replaces_a_dead_ones(tmp_path):
    """Another live process's file is not overwritten; a dead one's is."""
    path = tmp_path / "hub.addr"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        write_address_file(path, address=("127.0.0.1", 4242))
        start = Path(f"/proc/{other.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        _rewrite(path, pid=other.pid, pid_start=int(start))
        with pytest.raises(UsageError, match=f"live hub \\(pid {other.pid}"):
            write_address_file(path, address=("127.0.0.1", 1))
    finally:
        other.kill()
        other.wait()
    assert write_address_file(path, address=("127.0.0.1", 1)).port == 1


def test_remove_only_our_own_run(tmp_path):
    """remove_address_file leaves a file that another run has since replaced."""
    path = tmp_path / "hub.addr"
    first = write_address_file(path, address=("127.0.0.1", 1))
    write_address_file(path, address=("127.0.0.1", 2))
    assert not remove_address_file(path, first.run_id) and path.exists()
    assert remove_address_file(path, read_address_file(path).run_id)
    assert not path.exists()


def test_wait_for_a_file_written_later(tmp_path, deadline):
    """wait_and_connect picks up a file that appears after it started waiting."""
    server = socket.create_server(("127.0.0.1", 0))
    path = tmp_path / "hub.addr"
    timer = threading.Timer(
        0.3, write_address_file, args=(path,), kwargs={"address": server.getsockname()}
    )
    timer.start()
    try:
        sock, info = wait_and_connect(path, deadline(10))
        with sock:
            assert sock.getpeername() == server.getsockname() and info.port == sock.getpeername()[1]
    finally:
        timer.join()
        server.close()


def test_leftover_rejected_then_fresh_file_used(tmp_path, deadline, caplog):
    """A file from a dead run is reported once and skipped; the fresh file replacing it
    is used."""
    server = socket.create_server(("127.0.0.1", 0))
    path = tmp_path / "hub.addr"
    write_address_file(path, address=server.getsockname())
    _rewrite(path, pid=_dead_pid())
    timer = threading.Timer(
        0.5,
        write_address_file,
        args=(path,),
        kwargs={"address": server.getsockname(), "run_id": "fresh"},
    )
    caplog.set_level(logging.WARNING, "maxwellhub.rendezvous")
    timer.start()
    try:
        sock, info = wait_and_connect(path, deadline(10))
        sock.close()
    finally:
        timer.join()
        server.close()
    assert info.run_id == "fresh"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(path) in warnings[0] and "is not running" in warnings[0]


def test_refused_address_is_a_leftover_and_the_wait_has_a_deadline(tmp_path):
    """A file (of a live pid) whose port refuses connections is rejected; without a new
    file the wait ends at its deadline, naming the file and the reason."""
    probe = socket.create_server(("127.0.0.1", 0))
    address = probe.getsockname()
    probe.close()  # nothing listens there now
    path = tmp_path / "hub.addr"
    write_address_file(path, address=address)
    began = time.monotonic()
    with pytest.raises(TimeoutError) as err:
        wait_and_connect(path, 0.5)
    assert time.monotonic() - began >= 0.5
    assert str(path) in str(err.value) and "refuses connections" in str(err.value)
    with pytest.raises(TimeoutError, match="it never appeared"):
        wait_and_connect(tmp_path / "absent.addr", 0.2)


async def test_hub_writes_its_file_at_start_and_removes_it_at_stop(tmp_path):
    """Hub(address_file=...) publishes the bound port, the auth flag and the secret's
    path, and removes the file in stop()."""
    secret = _secret_file(tmp_path)
    path = tmp_path / "hub.addr"
    hub = Hub(port=0, address_file=path, auth=load_secret(secret))
    await hub.start()
    try:
        info = read_address_file(path)
        assert (info.host, info.port, info.auth) == ("127.0.0.1", hub.port, True)
        assert info.secret_file == str(secret) and info.pid == os.getpid()
    finally:
        await hub.stop()
    assert not path.exists()


def test_driver_uses_the_secret_file_named_in_the_address_file(tmp_path, driver_exe, deadline):
    """Authenticated TCP with no --secret-file: the driver reads the address file's
    secret_file; a --secret-file given on the command line wins (a wrong one here: refused)."""
    secret = _secret_file(tmp_path)
    wrong = _secret_file(tmp_path, "other", "wrong.secret")
    path = tmp_path / "hub.addr"
    env = {k: v for k, v in os.environ.items() if k != "MAXWELLHUB_SECRET"}
    with SocketHub(
        port=0, timeout=deadline(20), address_file=path, auth=load_secret(secret)
    ) as hub:
        hub.register_molecule(0)
        bad = subprocess.Popen(
            [
                str(driver_exe),
                "--address-file",
                str(path),
                "--secret-file",
                str(wrong),
                "--timeout",
                str(deadline(20)),
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        # The hub serves connections only while it waits: the wrong secret never binds.
        assert not hub.wait_until_bound({0: {"dt_au": 0.5}}, timeout=deadline(1.5))
        good = subprocess.Popen(
            [str(driver_exe), "--address-file", str(path), "--timeout", str(deadline(20))], env=env
        )
        assert hub.wait_until_bound({0: {"dt_au": 0.5}})
        assert np.isfinite(hub.step({0: {"efield_au": FIELD}})[0]["amp"]).all()
    assert good.wait(timeout=deadline(20)) == 0
    assert bad.wait(timeout=deadline(20)) != 0
    assert bad.stderr is not None
    assert "refused the secret" in bad.stderr.read()


def test_driver_rejects_a_killed_hubs_file(tmp_path, driver_exe, deadline):
    """A hub process killed with SIGKILL leaves its file; a driver started afterwards
    rejects it (the pid is dead), keeps waiting, and exits 1 at its deadline naming it."""
    path = tmp_path / "hub.addr"
    code = (
        "import sys, time\nfrom maxwellhub import SocketHub\n"
        f"hub = SocketHub(port=0, address_file={str(path)!r})\n"
        "print('up', flush=True)\ntime.sleep(60)\n"
    )
    hub = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert hub.stdout is not None
    try:
        assert hub.stdout.readline().strip() == "up"
    finally:
        hub.send_signal(signal.SIGKILL)
        hub.wait()
    assert path.exists()
    driver = subprocess.run(
        [str(driver_exe), "--address-file", str(path), "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=deadline(20),
    )
    assert driver.returncode == 1
    assert str(path) in driver.stderr and f"pid {hub.pid}" in driver.stderr
    assert "is not running" in driver.stderr


def test_address_file_excludes_host_and_unix(driver_exe, tmp_path):
    """--address-file with --host is a usage error (exit 2) naming both options."""
    done = subprocess.run(
        [str(driver_exe), "--address-file", str(tmp_path / "a"), "--host", "x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "--address-file" in done.stderr
