"""MaxwellLink 0.5.0 drop-in: its Meep solver on our SocketHub, and the hub attributes it reads."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading

import numpy as np
import pytest
from _util import REPO_ROOT, mxl_meep_python, scaled, unix_socket_path

from maxwellhub import SocketHub
from maxwellhub.protocol import wire

RUNNER = REPO_ROOT / "tests" / "_mxl_meep_run.py"


def _run_in_peer(python, hub: str, name: str) -> dict:
    """Run tests/_mxl_meep_run.py in the Meep peer venv on one hub; return its RESULT."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_")}
    env.update(
        PYTHONPATH=str(REPO_ROOT / "src"),  # this worktree's maxwellhub, on the peer's Debian numpy
        OMPI_MCA_ess_singleton_isolated="1",
        OPENBLAS_NUM_THREADS="1",
        PYTHONNOUSERSITE="1",
    )
    args = [str(python), str(RUNNER), "--hub", hub, "--unix", name, "--until", "3"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=scaled(120))
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (
        f"MaxwellLink's Meep solver on {hub} hub failed (exit {done.returncode}):\n"
        f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    )
    return json.loads(lines[0][len("RESULT ") :])


def test_maxwelllink_meep_solver_on_our_hub_is_bitwise_theirs(unix_name):
    """MaxwellLink's MeepSimulation + mxl_driver TLS: our SocketHub gives their hub's bits."""
    python, why = mxl_meep_python()
    if python is None:
        pytest.skip(why)
    probe = subprocess.run(
        [str(python), "-c", "import meep, maxwelllink; print('VERSION', maxwelllink.__version__)"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMPI_MCA_ess_singleton_isolated": "1"},
        timeout=scaled(60),
    )
    # Built but broken is a failure, not a skip.
    assert probe.returncode == 0, f"{python} cannot import meep/maxwelllink:\n{probe.stderr}"
    assert "VERSION 0.5.0" in probe.stdout
    theirs = _run_in_peer(python, "theirs", unix_name + "_theirs")
    ours = _run_in_peer(python, "ours", unix_name + "_ours")
    assert ours["hub"]["type"] == "maxwellhub.hub.sync.SocketHub"
    assert theirs["hub"]["type"].startswith("maxwelllink.")
    assert ours["hub"]["unixsocket_path"] == str(unix_socket_path(unix_name + "_ours"))
    assert theirs["hub"]["unixsocket_path"] == str(unix_socket_path(unix_name + "_theirs"))
    assert ours["hub"]["expected"] == theirs["hub"]["expected"] == [0]
    assert ours["hub"]["paused_before"] is theirs["hub"]["paused_before"] is False
    assert ours["steps"] == theirs["steps"] > 10
    assert ours["history"] == theirs["history"]  # every float as float.hex: bitwise
    assert ours["ez"] == theirs["ez"]
    assert ours["driver_exit"] == theirs["driver_exit"] == 0


# ------------------------------------------------------------ compatibility attributes


def test_unixsocket_path_bare_name_and_absolute_path(unix_name, tmp_path):
    """unixsocket_path: /tmp/socketmxl_<name> for a bare name, the path as given otherwise."""
    with SocketHub(unixsocket=unix_name) as hub:
        assert hub.unixsocket_path == f"/tmp/socketmxl_{unix_name}"
        assert os.path.exists(hub.unixsocket_path)
        assert hub.host is None
    path = tmp_path / "hub.sock"
    with SocketHub(unixsocket=str(path)) as hub:
        assert hub.unixsocket_path == str(path)


def test_unixsocket_path_is_none_over_tcp():
    """Over TCP unixsocket_path is None (MaxwellLink's bridge then uses host and port)."""
    with SocketHub(port=0) as hub:
        assert hub.unixsocket_path is None
        assert hub.host == "127.0.0.1"  # loopback by default
        assert hub.port


def test_relative_unixsocket_name_resolves_as_mxl_driver_expects(unix_name):
    """A relative name with a separator is /tmp/socketmxl_<name>, where mxl_driver connects."""
    os.makedirs(f"/tmp/socketmxl_{unix_name}", exist_ok=True)
    try:
        with SocketHub(unixsocket=f"{unix_name}/hub") as hub:
            assert hub.unixsocket_path == f"/tmp/socketmxl_{unix_name}/hub"
    finally:
        os.rmdir(f"/tmp/socketmxl_{unix_name}")


def test_expected_is_the_registered_ids(unix_name):
    """expected: the set of registered ids, growing with register_molecule(_return_id)."""
    with SocketHub(unixsocket=unix_name) as hub:
        assert hub.expected == set()
        hub.register_molecule(5)
        first = hub.register_molecule_return_id()
        assert hub.expected == {5, first}
        assert isinstance(hub.expected, set)
        with pytest.raises(ValueError, match="already registered"):
            hub.register_molecule(5)


def test_first_log_line_says_where_and_how_to_open(caplog):
    """The hub's first log line names its address and how to open it to other nodes."""
    with caplog.at_level(logging.INFO, logger="maxwellhub"), SocketHub(port=0) as hub:
        first = next(r for r in caplog.records if r.name.startswith("maxwellhub"))
        text = first.getMessage()
        assert f"127.0.0.1:{hub.port}" in text
        assert "other nodes" in text and "0.0.0.0" in text and "auth=" in text


def _driver_that_dies(path, steps):
    """A blocking fake driver: INIT, answer ``steps`` steps, then close without a word."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    dec = wire.Decoder("driver")
    init, answered = False, 0
    with s:
        while True:
            data = s.recv(4096)
            if not data:
                return
            for ev in dec.feed(data):
                if isinstance(ev, wire.Status):
                    s.sendall(wire.encode_header(wire.READY if init else wire.NEEDINIT))
                elif isinstance(ev, wire.Init):
                    init = True
                elif isinstance(ev, wire.GetForce):
                    if answered == steps:
                        return
                    answered += 1
                    s.sendall(wire.encode_source_ready((0.0, 0.0, 0.0)))
                elif isinstance(ev, wire.Stop):
                    s.sendall(wire.encode_header(wire.BYE))
                    return


def test_paused_means_a_driver_is_down(unix_name):
    """paused: False while every driver is up, True after one is lost mid-run, then False."""
    path = str(unix_socket_path(unix_name))
    with SocketHub(unixsocket=unix_name, timeout=scaled(10)) as hub:
        hub.register_molecule(0)
        first = threading.Thread(target=_driver_that_dies, args=(path, 1))
        first.start()
        assert hub.wait_until_bound({0: {"dt_au": 1.0}}, timeout=scaled(10))
        assert hub.paused is False
        field = {0: {"efield_au": np.zeros(3)}}
        assert hub.step_barrier(field)
        assert hub.step_barrier(field) == {}  # the driver closed: aborted
        first.join(scaled(5))
        assert hub.paused is True
        second = threading.Thread(target=_driver_that_dies, args=(path, 5))
        second.start()
        assert hub.wait_until_bound({0: {"dt_au": 1.0}}, timeout=scaled(10))
        assert hub.paused is False
    second.join(scaled(5))
