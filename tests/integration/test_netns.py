"""Many hosts on one machine: the hub in one network namespace, two drivers in two others,
joined by veth pairs, over authenticated TCP; the results equal the loopback run's and the
traffic provably crossed the veth links, not the host's loopback.

Topology (names unique per test run, always deleted, even on failure)::

    <p>d1: veth 10.213.1.2/24 --- 10.213.1.1/24 veth :<p>h (hub, bound to 10.213.1.1 only)
    <p>d2: veth 10.213.2.2/24 --- 10.213.2.1/24 veth :
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _util import REPO_ROOT

pytest.importorskip("meep")
pytestmark = [pytest.mark.meep, pytest.mark.slow]

EM = REPO_ROOT / "examples" / "hpc" / "em_relax_2d.py"
DRIVER = Path(sys.executable).parent / "maxwellhub-driver"
HUB_IP = "10.213.1.1"
UNTIL = "15"  # 301 steps
TLS = [
    "--model",
    "tls",
    "--param",
    "omega=0.242",
    "--param",
    "mu12=187",
    "--param",
    "orientation=2",
    "--param",
    "pe_initial=1e-4",
]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    name = f"mxhprobe{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except RuntimeError as exc:
        return f"cannot create a network namespace: {exc}"
    _ip("netns", "del", name)
    return None


@pytest.fixture
def namespaces():
    """Three namespaces joined by two veth pairs; yields their names; always deleted."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    prefix = f"mx{secrets.token_hex(3)}"  # veth names must stay under 16 bytes
    hub, d1, d2 = f"{prefix}h", f"{prefix}d1", f"{prefix}d2"
    made: list[str] = []
    try:
        for ns in (hub, d1, d2):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for i, drv in ((1, d1), (2, d2)):
            _ip(
                "link",
                "add",
                f"{prefix}h{i}",
                "netns",
                hub,
                "type",
                "veth",
                "peer",
                "name",
                f"{prefix}v{i}",
                "netns",
                drv,
            )
            _ip("-n", hub, "addr", "add", f"10.213.{i}.1/24", "dev", f"{prefix}h{i}")
            _ip("-n", drv, "addr", "add", f"10.213.{i}.2/24", "dev", f"{prefix}v{i}")
            _ip("-n", hub, "link", "set", f"{prefix}h{i}", "up")
            _ip("-n", drv, "link", "set", f"{prefix}v{i}", "up")
            _ip("-n", drv, "route", "add", "default", "via", f"10.213.{i}.1")
        yield {"hub": hub, "drivers": [d1, d2], "veths": [f"{prefix}v1", f"{prefix}v2"]}
    finally:
        for ns in made:  # deleting a namespace deletes its veth ends too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OMPI_", "PMIX_")) and k != "MAXWELLHUB_SECRET"
    }
    env.update(OMPI_MCA_ess_singleton_isolated="1", OPENBLAS_NUM_THREADS="1")
    return env


def _in(ns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv] if ns else argv


def _tx_bytes(ns: str, dev: str) -> int:
    done = subprocess.run(
        _in(ns, ["cat", f"/sys/class/net/{dev}/statistics/tx_bytes"]),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return int(done.stdout)


def _run(
    tmp: Path, host: str, hub_ns: str | None, driver_ns: list[str | None], deadline
) -> tuple[dict, np.lib.npyio.NpzFile, list[str]]:
    """The 2D relaxation of two molecules, hub in hub_ns bound to host, one driver in each
    of driver_ns, authenticated, through an address file."""
    tmp.mkdir()
    secret = tmp / "hub.secret"
    secret.write_text(secrets.token_hex(32))
    secret.chmod(0o600)
    addr = tmp / "hub.addr"
    env = _env()
    drivers = [
        subprocess.Popen(
            _in(
                ns,
                [
                    str(DRIVER),
                    "--address-file",
                    str(addr),
                    "--timeout",
                    str(deadline(60)),
                    "-v",
                    *TLS,
                ],
            ),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for ns in driver_ns
    ]
    try:
        hub = subprocess.run(
            _in(
                hub_ns,
                [
                    sys.executable,
                    str(EM),
                    "--host",
                    host,
                    "--secret-file",
                    str(secret),
                    "--address-file",
                    str(addr),
                    "--molecules",
                    "2",
                    "--until",
                    UNTIL,
                    "--wait",
                    str(deadline(60)),
                    "--out",
                    str(tmp / "out.npz"),
                ],
            ),
            env=env,
            capture_output=True,
            text=True,
            timeout=deadline(120),
        )
    finally:
        logs = []
        for d in drivers:
            try:
                d.wait(timeout=deadline(20))
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait()
            assert d.stderr is not None
            logs.append(d.stderr.read())
    assert hub.returncode == 0, hub.stderr[-3000:]
    assert [d.returncode for d in drivers] == [0, 0], logs
    summary = json.loads([ln for ln in hub.stdout.splitlines() if ln.startswith("{")][-1])
    return summary, np.load(tmp / "out.npz"), logs


def test_hub_and_drivers_in_three_namespaces_equal_loopback(namespaces, tmp_path, deadline):
    """Authenticated TCP across veth links gives the loopback run's populations exactly;
    the drivers connected to the hub's veth address and their veth links carried the session."""
    began = time.monotonic()
    loop_summary, loop, _ = _run(tmp_path / "loopback", "127.0.0.1", None, [None, None], deadline)
    links = list(zip(namespaces["drivers"], namespaces["veths"], strict=True))
    before = [_tx_bytes(ns, dev) for ns, dev in links]
    summary, ns_run, logs = _run(
        tmp_path / "netns", HUB_IP, namespaces["hub"], namespaces["drivers"], deadline
    )
    after = [_tx_bytes(ns, dev) for ns, dev in links]
    elapsed = time.monotonic() - began
    steps = summary["steps"]
    assert steps == loop_summary["steps"] == 301
    worst = max(float(np.abs(ns_run[k] - loop[k]).max()) for k in ("Pe", "Pge_real", "Pge_imag"))
    sent = [a - b for a, b in zip(after, before, strict=True)]
    print(
        f"\nnamespaces vs loopback: max difference {worst:.1e}; driver veth tx bytes "
        f"{sent}; both runs {elapsed:.1f} s"
    )
    assert worst < 1e-12
    assert np.all(ns_run["Pe"][-1] < 0.9 * ns_run["Pe"][0])  # the molecules did relax
    # Each driver answered every step over its own veth: a SOURCEREADY is >= 124 bytes.
    assert all(s > 124 * steps for s in sent), sent
    # Both drivers connected to the hub's veth address, the one it alone was bound to.
    assert all(f"connected to tcp:{HUB_IP}:" in log for log in logs), logs
