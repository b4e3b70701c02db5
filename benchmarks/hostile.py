"""Hostile input against a live hub (issue 5, item 3).

A :class:`maxwellhub.Hub` runs in this process on a UNIX socket (timeout 5 s) while 8
healthy molecules step a barrier loop continuously (their drivers run in a child process)
and attackers, each a child process bounded in count and time, hit the same socket:

- ``fuzz``: random and mutated frames (random bytes; SOURCEREADY / NEEDINIT / READY /
  MXHHELLO with byte flips, random length fields, truncations), N per connection;
- ``truncated``: a valid frame cut short, then close;
- ``slowloris``: one byte every few seconds, reconnecting when dropped;
- ``idle``: many connections that never speak;
- ``connect-close``: connect and close in a loop.

Reported: barrier steps/s before and during the attack, RSS (start, end, sampled max,
ru_maxrss), log lines of ``maxwellhub.hub`` per attacker kind (attributed by the peer's
pid, SO_PEERCRED) with a check that every peer the hub dropped got exactly one line naming
it, that each healthy molecule stepped exactly once per step, and that a new healthy driver
still binds at the end.

    .venv/bin/python benchmarks/hostile.py [--frames 100000] [--idle 1000] [--seconds 60]

The attacker functions are plain blocking-socket code, also used by tests/integration/test_hostile.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import resource
import select
import socket
import struct
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import JsonLines, emit, fmt, machine, raise_nofile, stop_process  # noqa: E402
from fakes import fake_source  # noqa: E402

from maxwellhub import Hub, wire  # noqa: E402

KINDS = ("fuzz", "truncated", "slowloris", "idle", "connect-close")
_DRIVER_RE = re.compile(r"driver#(\d+)")

# ----------------------------------------------------------------------------- frames


def _valid_frames(rng: random.Random) -> list[bytes]:
    src = (rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(-1, 1))
    extras = json.dumps({"n": rng.randint(0, 99)}).encode()
    return [wire.encode_source_ready(src, extras), wire.encode_header(wire.NEEDINIT),
            wire.encode_header(wire.READY), wire.encode_hello(rng.randint(1, 64))]


# Where a length-like int32 sits in each valid frame (offset), by frame index above.
_LENGTH_FIELDS = {0: (20, 120), 3: (16, 20)}


def fuzz_frame(rng: random.Random) -> bytes:
    """One random or mutated frame."""
    r = rng.random()
    if r < 0.2:
        return rng.randbytes(rng.randint(1, 300))
    i = rng.randrange(4)
    frame = bytearray(_valid_frames(rng)[i])
    if r < 0.5:                                       # byte flips
        for _ in range(rng.randint(1, 4)):
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
    elif r < 0.7 and i in _LENGTH_FIELDS:             # a random length field
        off = rng.choice(_LENGTH_FIELDS[i])
        value = rng.choice([-1, 0, 2, 1 << 20, (1 << 20) + 1, 1 << 31 - 1,
                            rng.randint(-(1 << 31), (1 << 31) - 1), rng.randint(0, 4096)])
        struct.pack_into("<i", frame, off, value)
    elif r < 0.85:                                    # truncation
        frame = frame[:rng.randrange(1, len(frame))]
    return bytes(frame)


def truncated_frame(rng: random.Random) -> bytes:
    """A valid frame cut short (at least one byte, at least one byte missing)."""
    frame = rng.choice(_valid_frames(rng))
    return frame[:rng.randrange(1, len(frame))]


# ----------------------------------------------------------------------------- attackers


def _connect(path: str, timeout: float = 10.0) -> socket.socket:
    """Connect, retrying while the listen backlog is full (EAGAIN on a UNIX socket)."""
    end = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.001)


def _await_drop(s: socket.socket, wait: float) -> bool:
    """True when the hub closes this connection within ``wait`` s (reading what it sends)."""
    end = time.monotonic() + wait
    try:
        while (left := end - time.monotonic()) > 0:
            s.settimeout(left)
            if not s.recv(65536):
                return True
    except TimeoutError:
        return False
    except OSError:
        return True
    return False


def attack_fuzz(path: str, frames: int, per_conn: int, seed: int, seconds: float,
                wait: float = 0.2) -> dict:
    """Write ``frames`` fuzz frames, ``per_conn`` per connection (a connection the hub drops
    early passes its unsent frames on to the next)."""
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    sent = conns = dropped = 0
    while sent < frames and time.monotonic() < deadline:
        s = _connect(path)
        conns += 1
        gone = False
        try:
            for _ in range(min(per_conn, frames - sent)):
                s.sendall(fuzz_frame(rng))
                sent += 1
        except OSError:
            gone = True
        dropped += gone or _await_drop(s, wait)
        s.close()
    return {"connections": conns, "frames": sent, "dropped_by_hub": dropped}


def attack_truncated(path: str, count: int, seed: int, seconds: float) -> dict:
    """``count`` connections: read STATUS, send a truncated frame, close."""
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    conns = dropped = 0
    while conns < count and time.monotonic() < deadline:
        s = _connect(path)
        conns += 1
        try:
            s.recv(12)
            s.sendall(truncated_frame(rng))
        except OSError:
            dropped += 1
        s.close()
    return {"connections": conns, "dropped_by_hub": dropped}


def attack_slowloris(path: str, seconds: float, interval: float,
                     payload: bytes = b"NEEDINIT    ", connections: int | None = None) -> dict:
    """One byte of ``payload`` every ``interval`` s; reconnect when dropped (up to
    ``connections`` times, if given)."""
    deadline = time.monotonic() + seconds
    conns = dropped = sent = 0
    while time.monotonic() < deadline and (connections is None or conns < connections):
        s = _connect(path)
        conns += 1
        gone, i = False, 0
        try:
            while time.monotonic() < deadline:
                k = i % len(payload)
                s.sendall(payload[k:k + 1])
                sent += 1
                i += 1
                if _await_drop(s, min(interval, max(deadline - time.monotonic(), 0))):
                    gone = True
                    break
        except OSError:
            gone = True
        dropped += gone
        s.close()
    return {"connections": conns, "dropped_by_hub": dropped, "bytes": sent}


def attack_idle(path: str, count: int, seconds: float) -> dict:
    """Open ``count`` connections that never speak; wait (up to ``seconds``) for the hub
    to close each one."""
    raise_nofile(count + 64)
    t0 = time.monotonic()
    socks = {}
    for _ in range(count):
        s = _connect(path)
        s.setblocking(False)
        socks[s.fileno()] = s
    poll = select.poll()
    for fd in socks:
        poll.register(fd, select.POLLIN)
    deadline = t0 + seconds
    open_ = set(socks)
    latest = 0.0
    while open_ and (left := deadline - time.monotonic()) > 0:
        for fd, _ in poll.poll(left * 1e3):
            try:
                data = socks[fd].recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                poll.unregister(fd)
                open_.discard(fd)
                latest = time.monotonic() - t0
    for s in socks.values():
        s.close()
    return {"connections": count, "dropped_by_hub": count - len(open_),
            "last_drop_s": round(latest, 3)}


def attack_connect_close(path: str, count: int, seconds: float) -> dict:
    """Connect and close immediately, ``count`` times or for ``seconds``."""
    deadline = time.monotonic() + seconds
    conns = 0
    while conns < count and time.monotonic() < deadline:
        _connect(path).close()
        conns += 1
    return {"connections": conns, "dropped_by_hub": 0}


# ----------------------------------------------------------------------------- healthy


class CountingDriver:
    """A well-behaved driver like tests/fakes.FakeDriver (source = fake_source, extras
    {"n": fields received}) that keeps only a count, so a long run holds no history."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.molecule_id: int | None = None
        self.steps = 0

    async def run(self) -> None:
        reader, writer = await asyncio.open_unix_connection(self.path)
        decoder = wire.Decoder("driver")
        init, staged = False, None
        try:
            while data := await reader.read(65536):
                for ev in decoder.feed(data):
                    if isinstance(ev, wire.Status):
                        writer.write(wire.encode_header(wire.READY if init else wire.NEEDINIT))
                    elif isinstance(ev, wire.Init):
                        init, self.molecule_id = True, ev.ident
                    elif isinstance(ev, wire.PosData):
                        staged = tuple(float(x) for x in ev.field)
                        self.steps += 1
                    elif isinstance(ev, wire.GetForce):
                        extras = b'{"n": %d}' % self.steps
                        writer.write(wire.encode_source_ready(
                            fake_source(self.molecule_id, staged), extras))
                    elif isinstance(ev, (wire.Stop, wire.Exit)):
                        if isinstance(ev, wire.Stop):
                            writer.write(wire.encode_header(wire.BYE))
                            await writer.drain()
                        return
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()


async def _healthy_main(path: str, n: int) -> None:
    drivers = [CountingDriver(path) for _ in range(n)]
    await asyncio.gather(*(d.run() for d in drivers))
    emit(steps={str(d.molecule_id): d.steps for d in drivers})


# ----------------------------------------------------------------------------- the hub side


class Lines(logging.Handler):
    """Keeps (level, message) of every record."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))


def capture_hub_log() -> Lines:
    """Attach a :class:`Lines` to "maxwellhub.hub" (WARNING and up, not propagated)."""
    lines = Lines()
    logger = logging.getLogger("maxwellhub.hub")
    logger.addHandler(lines)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    return lines


def lines_by_driver(records) -> dict[int, list[tuple[int, str]]]:
    """WARNING/ERROR lines grouped by the driver number they name first."""
    out: dict[int, list] = defaultdict(list)
    for level, msg in records:
        if level >= logging.WARNING and (m := _DRIVER_RE.search(msg)):
            out[int(m.group(1))].append((level, msg))
    return out


def reason(msg: str) -> str:
    """A log line's reason with its numbers blanked, for grouping."""
    why = msg.split(": ", 1)[1] if ": " in msg else msg
    return re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "N", why)[:70]


def vm_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def track_peers(hub: Hub, kind_of_pid: dict[int, str]) -> dict[int, str]:
    """Before ``hub.start()``: record the kind of every accepted connection (by the
    peer's pid, SO_PEERCRED). Returns {driver number: kind}."""
    kinds: dict[int, str] = {}
    make = hub._new_driver

    def factory():
        d = make()
        made = d.connection_made

        def connection_made(transport, d=d, made=made):
            pid = -1
            sock = transport.get_extra_info("socket")
            try:
                pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET,
                                                          socket.SO_PEERCRED, 12))[0]
            except (OSError, AttributeError):
                pass
            kinds[d.number] = kind_of_pid.get(pid, "?")
            made(transport)

        d.connection_made = connection_made
        return d

    hub._new_driver = factory
    return kinds


def field_of(step: int, mid: int) -> tuple[float, float, float]:
    return (0.001 * step, 0.01 * mid, 1.0 - 1e-4 * step)


async def stepper(hub: Hub, ids: list[int], state: dict) -> None:
    """Step the barrier until state["stop"]; check every source and extras count."""
    while not state["stop"]:
        k = hub.step_index
        req = {m: {"efield_au": field_of(k, m)} for m in ids}
        res = await hub.step(req, timeout=60)
        for m in ids:
            if tuple(res[m]["amp"]) != fake_source(m, field_of(k, m)) or \
                    json.loads(res[m]["extra"])["n"] != k + 1:
                state["bad"] += 1
        state["steps"] += 1


def _spawn(kind: str, path: str, args, extra: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--attack", kind,
                             "--path", path, "--seconds", str(args.seconds), *extra],
                            stdout=subprocess.PIPE)


async def bench(args) -> None:
    raise_nofile(args.idle + 4096)
    timeout = args.hub_timeout
    path = f"/tmp/maxwellhub_hostile_{os.getpid()}"
    lines = capture_hub_log()
    hub = Hub(unixsocket=path, timeout=timeout, backlog=4096)
    kind_of_pid = {os.getpid(): "final-healthy"}
    kinds = track_peers(hub, kind_of_pid)
    await hub.start()
    loop = asyncio.get_running_loop()
    healthy = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--healthy",
                                "8", "--path", path], stdout=subprocess.PIPE)
    kind_of_pid[healthy.pid] = "healthy"
    ids = list(range(8))
    assert await hub.wait_until_bound({m: {"dt_au": 0.5} for m in ids}, timeout=30)
    state = {"stop": False, "steps": 0, "bad": 0}
    task = asyncio.create_task(stepper(hub, ids, state))
    rss_start = vm_rss_kib()
    rss_max = rss_start
    base = max(2.0, min(10.0, args.seconds / 6))
    await asyncio.sleep(base)
    steps_before = state["steps"] / base

    specs = {
        "fuzz": ["--frames", str(args.frames), "--per-conn", str(args.per_conn)],
        "truncated": ["--count", str(args.truncated)],
        "slowloris": ["--interval", str(args.interval)],
        "idle": ["--count", str(args.idle)],
        "connect-close": ["--count", str(args.connect_close)],
    }
    t0, s0 = time.monotonic(), state["steps"]
    procs = {}
    for kind, extra in specs.items():
        p = _spawn(kind, path, args, extra)
        procs[kind] = p
        kind_of_pid[p.pid] = kind
    # Sample RSS while the attackers run; they stop by themselves.
    while any(p.poll() is None for p in procs.values()):
        rss_max = max(rss_max, vm_rss_kib())
        await asyncio.sleep(0.25)
        if time.monotonic() - t0 > args.seconds + 60:
            break
    during_s = time.monotonic() - t0
    steps_during = (state["steps"] - s0) / during_s
    results = {}
    for kind, p in procs.items():
        results[kind] = await loop.run_in_executor(
            None, JsonLines(p).next, time.monotonic() + 30) or {}
        stop_process(p)
    # Idle peers still open (if any) are dropped by the hub's timeout.
    end = time.monotonic() + timeout + 10
    while len(hub._connections) > 8 and time.monotonic() < end:
        await asyncio.sleep(0.1)
    conns_after = len(hub._connections)
    rss_end = vm_rss_kib()
    rss_max = max(rss_max, rss_end)
    state["stop"] = True
    await task

    # A new healthy driver still binds and steps.
    new = CountingDriver(path)
    new_task = asyncio.create_task(new.run())
    mid = hub.register_molecule_return_id({"dt_au": 0.5})
    final_ok = await hub.wait_until_bound([mid], timeout=timeout + 10)
    if final_ok:
        k = hub.step_index
        all_ids = [*ids, mid]
        res = await hub.step({m: {"efield_au": field_of(k, m)} for m in all_ids}, timeout=30)
        final_ok = all(tuple(res[m]["amp"]) == fake_source(m, field_of(k, m)) for m in all_ids)
    total_steps = hub.step_index
    await hub.stop(wait=5)
    await asyncio.wait_for(new_task, 10)
    report = await loop.run_in_executor(None, JsonLines(healthy).next, time.monotonic() + 30)
    stop_process(healthy)
    counts = {int(k): v for k, v in (report or {}).get("steps", {}).items()}
    once = bool(counts) and all(counts.get(m) == total_steps for m in ids) and \
        new.steps == 1 and state["bad"] == 0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # Log lines per kind; one line per dropped peer.
    by_driver = lines_by_driver(lines.records)
    per_kind: dict[str, Counter] = defaultdict(Counter)
    reasons: dict[str, Counter] = defaultdict(Counter)
    for number, kind in kinds.items():
        got = by_driver.get(number, [])
        c = per_kind[kind]
        c["connections"] += 1
        c["errors"] += sum(1 for lv, _ in got if lv >= logging.ERROR)
        c["warnings"] += sum(1 for lv, _ in got if lv == logging.WARNING)
        c["one line"] += len(got) == 1
        c["no line"] += not got
        c["several lines"] += len(got) > 1
        if len(got) > 1:  # show them: the standard is one line per bad peer
            print(f"{kind} driver#{number} got {len(got)} lines: "
                  + " | ".join(msg for _, msg in got), file=sys.stderr)
        for _, msg in got:
            reasons[kind][reason(msg)] += 1
    unattributed = sum(1 for lv, msg in lines.records
                       if lv >= logging.WARNING and not _DRIVER_RE.search(msg))

    print(f"# Hostile input against a live hub\n\n{machine()}\n")
    print(f"Hub timeout {timeout:g} s, UNIX socket, 8 healthy molecules (one child process "
          f"of drivers), attackers in child processes for up to {args.seconds:g} s.\n")
    print("| figure | value |\n|---|---|")
    print(f"| barrier steps/s before the attack ({base:g} s) | {fmt(steps_before)} |")
    print(f"| barrier steps/s during the attack ({during_s:.1f} s) | {fmt(steps_during)} |")
    print(f"| steps in all | {total_steps:,} |")
    print(f"| every healthy molecule stepped once per step, sources and extras right | "
          f"{'yes' if once else 'NO'} ({counts}, final {new.steps}, bad {state['bad']}) |")
    print(f"| RSS at start / end (VmRSS) | {rss_start / 1024:.1f} / {rss_end / 1024:.1f} MiB |")
    print(f"| RSS sampled max / peak ru_maxrss | {rss_max / 1024:.1f} / "
          f"{maxrss / 1024:.1f} MiB |")
    print(f"| connections after the attack (healthy 8) | {conns_after} |")
    print(f"| a new healthy driver binds and steps at the end | {'yes' if final_ok else 'NO'} |")
    print(f"| WARNING/ERROR lines naming no driver | {unattributed} |")
    print("\n| attacker | attacker says | hub connections | ERROR | WARNING | dropped "
          "peers with one line | no line | several lines | top reasons |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in (*KINDS, "healthy", "final-healthy", "?"):
        if kind not in per_kind and kind not in results:
            continue
        c = per_kind[kind]
        top = "; ".join(f"{n}x {r}" for r, n in reasons[kind].most_common(3))
        says = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                         for k, v in results.get(kind, {}).items())
        print(f"| {kind} | {says} | {c['connections']:,} | {c['errors']:,} | "
              f"{c['warnings']:,} | {c['one line']:,} | {c['no line']:,} | "
              f"{c['several lines']:,} | {top} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--per-conn", type=int, default=200)
    ap.add_argument("--truncated", type=int, default=2000)
    ap.add_argument("--connect-close", type=int, default=1_000_000)
    ap.add_argument("--interval", type=float, default=2.0, help="slowloris byte interval")
    ap.add_argument("--hub-timeout", type=float, default=5.0)
    # internal: the child roles
    ap.add_argument("--attack", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--healthy", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)
    if args.healthy:
        asyncio.run(_healthy_main(args.path, args.healthy))
    elif args.attack == "fuzz":
        emit(**attack_fuzz(args.path, args.frames, args.per_conn, args.seed, args.seconds))
    elif args.attack == "truncated":
        emit(**attack_truncated(args.path, args.count, args.seed, args.seconds))
    elif args.attack == "slowloris":
        emit(**attack_slowloris(args.path, args.seconds, args.interval))
    elif args.attack == "idle":
        emit(**attack_idle(args.path, args.count, args.seconds))
    elif args.attack == "connect-close":
        emit(**attack_connect_close(args.path, args.count, args.seconds))
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
