"""Real drivers: barrier steps per second and the driver's own CPU time per step.

    .venv/bin/python benchmarks/drivers.py [--quick] [--seconds 1] [--repeats 3]
        [--transport unix|tcp]

Each row is one driver process, pinned to core 1: our ``maxwellhub-driver --model tls``
and ``--model sho`` (with their compiled steady loop when it is built, and the tls one
again with MAXWELLHUB_PURE_PYTHON=1: the pure-Python path, same run);
``benchmarks/c/loadgen.c`` with one connection, which does no physics (what a driver's
socket I/O alone costs); MaxwellLink's ``mxl_driver -m tls`` / ``-m sho`` when its venv
is present (``.peers/maxwelllink`` or $MAXWELLHUB_MXL_PYTHON). The hub is a
minimal blocking one in this process, pinned to core 0: STATUS, INIT, then per step one
FIELDDATA+GETSOURCE block (a weak oscillating field on z) and one SOURCEREADY read with
its extras. The driver's CPU time (all its threads, from /proc/<pid>/task/*/schedstat)
is read before and after each timed run. Timing rule as in hub_throughput.py: warm up for at least
--min-steps steps and a quarter of --seconds, then --repeats runs; medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    CLIENT_CORE,
    HUB_CORE,
    Skip,
    build,
    can_pin,
    child_env,
    cpu_seconds,
    fmt,
    free_port,
    machine,
    median,
    peer_python,
    pin_to,
    stop_process,
)

TLS = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 0.1}
SHO = {"omega": 0.242, "mu0": 187.0, "orientation": 2, "q_initial": 0.01}
DT_AU = 0.5

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_BLOCK = struct.Struct("<12s9d9di3d12s")  # FIELDDATA + GETSOURCE, 196 bytes
_FIXED = 124  # SOURCEREADY without its extras


def header(name: str) -> bytes:
    return name.encode().ljust(12)


class MinimalHub:
    """One driver, blocking socket calls, nothing else: the driver is what is measured."""

    def __init__(self, transport: str, path: Path) -> None:
        self.path = None
        if transport == "unix":
            self.path = str(path)
            self.listener = socket.socket(socket.AF_UNIX)
            self.listener.bind(self.path)
            self.where: dict[str, Any] = {"unix": self.path}
        else:
            self.listener = socket.socket()
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            port = free_port()
            self.listener.bind(("127.0.0.1", port))
            self.where = {"port": port}
        self.listener.listen(1)
        self.listener.settimeout(60)
        self.conn: socket.socket | None = None
        self.reply = bytearray(65536)
        self.view = memoryview(self.reply)

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        self.conn = conn
        conn.settimeout(60)
        if conn.family == socket.AF_INET:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(header("STATUS"))
        self._read(12)
        body = json.dumps({"molecule_id": 0, "dt_au": DT_AU}).encode()
        conn.sendall(header("INIT") + struct.pack("<ii", 0, len(body)) + body)

    def _conn(self) -> socket.socket:
        if self.conn is None:
            raise Skip("no driver connected")
        return self.conn

    def _read(self, n: int, at: int = 0) -> None:
        while n:
            k = self._conn().recv_into(self.view[at:], n)
            if k == 0:
                raise Skip("the driver closed the connection")
            at += k
            n -= k

    def step(self, ez: float) -> None:
        self._conn().sendall(
            _BLOCK.pack(
                header("POSDATA"), *_IDENTITY, *_IDENTITY, 1, 0.0, 0.0, ez, header("GETFORCE")
            )
        )
        self._read(_FIXED)
        (m,) = struct.unpack_from("<i", self.reply, 120)
        self._read(m, _FIXED)

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.sendall(header("STOP"))
                self.conn.recv(12)
            except OSError:
                pass
            self.conn.close()
        self.listener.close()
        if self.path:
            os.unlink(self.path)


def driver_argv(kind: str, model: str, where: dict) -> list[str]:
    if kind == "loadgen":
        address = (
            ["--unix", where["unix"]]
            if "unix" in where
            else ["--host", "127.0.0.1", "--port", str(where["port"])]
        )
        return [str(build("loadgen")), *address, "-n", "1"]
    params = TLS if model == "tls" else SHO
    if kind in ("maxwellhub", "maxwellhub-pure"):
        exe = Path(sys.executable).with_name("maxwellhub-driver")
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "maxwellhub_drivers.cli"]
        argv += ["--unix", where["unix"]] if "unix" in where else ["--port", str(where["port"])]
        argv += ["--model", model]
        for key, value in params.items():
            argv += ["--param", f"{key}={value}"]
        return argv
    python = peer_python()
    if python is None:
        raise Skip("MaxwellLink not installed (.peers/maxwelllink or $MAXWELLHUB_MXL_PYTHON)")
    exe = python.with_name("mxl_driver")
    if "unix" in where:  # mxl_driver builds the path as prefix + name
        directory, name = os.path.split(where["unix"])
        address = ["--unix", "--sockets_prefix", directory + "/", "--address", name]
    else:
        address = ["--address", "127.0.0.1", "--port", str(where["port"])]
    param = ", ".join(f"{k}={v}" for k, v in params.items())
    return [str(exe), *address, "--model", model, "--param", param]


def measure(kind: str, model: str, args, workdir: Path) -> dict:
    """Run one driver behind the minimal hub; medians of steps/s and driver CPU per step."""
    hub = MinimalHub(args.transport, workdir / f"{kind}-{model}.sock")
    env = child_env()
    if kind == "maxwellhub-pure":
        env["MAXWELLHUB_PURE_PYTHON"] = "1"
    proc = subprocess.Popen(
        driver_argv(kind, model, hub.where),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=pin_to(CLIENT_CORE),
    )
    affinity = os.sched_getaffinity(0)
    if can_pin():
        os.sched_setaffinity(0, {HUB_CORE})
    step = 0

    def run(k: int) -> float:
        nonlocal step
        t0 = time.perf_counter()
        for _ in range(k):
            step += 1
            hub.step(1e-4 * math.sin(0.05 * step))
        return time.perf_counter() - t0

    try:
        hub.accept()
        warm, t0 = 0, time.perf_counter()
        while warm < args.min_steps or time.perf_counter() - t0 < 0.25 * args.seconds:
            run(args.min_steps)
            warm += args.min_steps
        steps = max(args.min_steps, math.ceil(args.seconds * warm / (time.perf_counter() - t0)))
        runs = []
        for _ in range(args.repeats):
            c0 = cpu_seconds(proc.pid)
            wall = run(steps)
            runs.append((steps / wall, 1e6 * (cpu_seconds(proc.pid) - c0) / steps))
    except (OSError, Skip) as exc:
        proc.kill()
        raw = proc.stderr.read() if proc.stderr is not None else b""
        err = raw.decode(errors="replace").strip().splitlines()[-2:]
        raise Skip(f"failed: {exc}: {' / '.join(err)}") from None
    finally:
        os.sched_setaffinity(0, affinity)
        hub.close()
        stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()
    return {
        "steps_s": median(r[0] for r in runs),
        "cpu_us": median(r[1] for r in runs),
        "steps": steps,
    }


OUR_TLS = "maxwellhub-driver --model tls"
FLOOR = "C loadgen, no physics (the I/O floor)"
THEIR_TLS = "MaxwellLink mxl_driver -m tls"
ROWS = (
    ("maxwellhub", "tls", OUR_TLS),
    ("maxwellhub-pure", "tls", "maxwellhub-driver --model tls, pure Python"),
    ("maxwellhub", "sho", "maxwellhub-driver --model sho"),
    ("loadgen", "-", FLOOR),
    ("maxwelllink", "tls", THEIR_TLS),
    ("maxwelllink", "sho", "MaxwellLink mxl_driver -m sho"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    parser.add_argument("--seconds", type=float, default=1.0, help="per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-steps", type=int, default=20)
    parser.add_argument(
        "--drivers",
        default="maxwellhub,loadgen,maxwelllink",
        help="which drivers to measure (default all three kinds)",
    )
    parser.add_argument("--quick", action="store_true", help="0.25 s per run")
    args = parser.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 0.25)

    print(f"machine: {machine()}", flush=True)
    results: dict[str, dict | str] = {}
    with tempfile.TemporaryDirectory(prefix="mxhdrv-") as tmp:
        for kind, model, name in ROWS:
            if kind.split("-")[0] not in args.drivers.split(","):
                continue
            try:
                results[name] = measure(kind, model, args, Path(tmp))
            except Skip as why:
                results[name] = str(why)
    print(
        f"\n### Real drivers, one each, {args.transport.upper()} "
        f"(minimal hub; {args.seconds:g} s per run, medians of {args.repeats})\n"
    )
    print("| driver | steps/s | driver CPU µs/step |")
    print("|---|---:|---:|")
    for name, r in results.items():
        if isinstance(r, str):
            print(f"| {name} | - | not measured: {r} |")
        else:
            print(f"| {name} | {fmt(r['steps_s'])} | {r['cpu_us']:.1f} |")
    print("\n### Target (same run)\n")
    print(
        target_line(
            results.get(OUR_TLS, "not asked for"), results.get(THEIR_TLS), results.get(FLOOR)
        )
    )


#: The tls driver's CPU per step may exceed the C load generator's (the socket floor,
#: measured in the same run) by at most this many µs.
TARGET_OVER_FLOOR_US = 5.0


def target_line(ours, theirs, floor) -> str:
    """The tls driver's CPU per step against the socket floor of the same run."""
    if not isinstance(ours, dict):
        return f"- tls driver: not measured ({ours})"
    versus = (
        f"; MaxwellLink's tls: {theirs['cpu_us']:.1f} µs, "
        f"{theirs['cpu_us'] / ours['cpu_us']:.1f}x ours"
        if isinstance(theirs, dict)
        else ""
    )
    if not isinstance(floor, dict):
        return (
            f"- tls driver CPU per step: {ours['cpu_us']:.1f} µs{versus}; the C load "
            f"generator's floor was not measured, so the target is not judged"
        )
    over = ours["cpu_us"] - floor["cpu_us"]
    verdict = "met" if over <= TARGET_OVER_FLOOR_US else "NOT met"
    return (
        f"- tls driver CPU per step: {ours['cpu_us']:.1f} µs; socket I/O floor (C "
        f"loadgen): {floor['cpu_us']:.1f} µs; over the floor: {over:.1f} µs (ratio "
        f"{ours['cpu_us'] / floor['cpu_us']:.2f}){versus}; target: at most "
        f"{TARGET_OVER_FLOOR_US:g} µs over the floor: {verdict}"
    )


if __name__ == "__main__":
    main()
