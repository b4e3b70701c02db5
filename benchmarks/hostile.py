"""A flood from the same node against a live hub: how much of its quiet rate the healthy
barrier keeps.

A :class:`maxwellhub.Hub` runs in this process on a UNIX socket (timeout 5 s) while 8
healthy molecules step a barrier loop continuously (their drivers run in one child
process; every step's sources and extras are checked). The quiet rate is measured, then
attackers flood the same socket, each kind in its own process, unpinned, at full speed for
``--seconds`` (plain blocking clients: while the listen backlog is full the kernel holds
their connects):

- ``connect-close``: connect and close in a loop;
- ``random``: random bytes, connection after connection;
- ``oversize``: frames whose length fields announce far more than any limit, then filler;
- ``fuzz``: random and mutated frames (SOURCEREADY / NEEDINIT / READY / MXHHELLO with byte
  flips, random length fields, truncations), N per connection;
- ``truncated``: a valid frame cut short, then close;
- ``idle``: ``--idle`` silent connections held open (each one the hub drops is reopened);
- ``slowloris``: one byte every few seconds, reconnecting when dropped.

Halfway through the flood a replacement driver connects as ``maxwellhub-driver`` does
(:func:`maxwellhub_drivers.client.connect`), for a new molecule: the time until the hub
binds it is reported. After the flood the quiet rate is measured again (the machine may be
shared: the fraction is against the mean of both quiet rates, each shown).

Reported: quiet and attacked steps/s and the fraction, attacks made, what the listener did
with new connections, the replacement's time to bind, peak RSS of the hub, log lines
logged and the lines about peers held back into summaries (with their exact counts).

    .venv/bin/python benchmarks/hostile.py [--seconds 20] [--idle 500] [--backlog 4096]

The attacker functions are plain blocking-socket code, also used by
tests/integration/test_hostile.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
import resource
import select
import signal
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

from maxwellhub import Hub  # noqa: E402
from maxwellhub.hub import new_event_loop  # noqa: E402
from maxwellhub.protocol import wire  # noqa: E402

KINDS = ("connect-close", "random", "oversize", "fuzz", "truncated", "idle", "slowloris")
_DRIVER_RE = re.compile(r"driver#(\d+)")

# ----------------------------------------------------------------------------- frames


def _valid_frames(rng: random.Random) -> list[bytes]:
    src = (rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(-1, 1))
    extras = json.dumps({"n": rng.randint(0, 99)}).encode()
    return [
        wire.encode_source_ready(src, extras),
        wire.encode_header(wire.NEEDINIT),
        wire.encode_header(wire.READY),
        wire.encode_hello(rng.randint(1, 64)),
    ]


# Where a length-like int32 sits in each valid frame (offset), by frame index above.
_LENGTH_FIELDS = {0: (20, 120), 3: (16, 20)}


def fuzz_frame(rng: random.Random) -> bytes:
    """One random or mutated frame."""
    r = rng.random()
    if r < 0.2:
        return rng.randbytes(rng.randint(1, 300))
    i = rng.randrange(4)
    frame = bytearray(_valid_frames(rng)[i])
    if r < 0.5:  # byte flips
        for _ in range(rng.randint(1, 4)):
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
    elif r < 0.7 and i in _LENGTH_FIELDS:  # a random length field
        off = rng.choice(_LENGTH_FIELDS[i])
        value = rng.choice(
            [
                -1,
                0,
                2,
                1 << 20,
                (1 << 20) + 1,
                1 << 31 - 1,
                rng.randint(-(1 << 31), (1 << 31) - 1),
                rng.randint(0, 4096),
            ]
        )
        struct.pack_into("<i", frame, off, value)
    elif r < 0.85:  # truncation
        frame = frame[: rng.randrange(1, len(frame))]
    return bytes(frame)


def truncated_frame(rng: random.Random) -> bytes:
    """A valid frame cut short (at least one byte, at least one byte missing)."""
    frame = rng.choice(_valid_frames(rng))
    return frame[: rng.randrange(1, len(frame))]


# ----------------------------------------------------------------------------- attackers


def _connect(path: str, timeout: float = 10.0) -> socket.socket:
    """Connect as a plain blocking client does: while the hub's listen backlog is full the
    kernel holds the connect until there is room (at most ``timeout`` s in all, then the
    BlockingIOError). The socket returned has ``timeout`` for its reads and writes."""
    end = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        left = max(min(end - time.monotonic(), 0.5), 0.001)
        s.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(left), int(left % 1 * 1e6))
        )
        try:
            s.connect(path)
        except BlockingIOError:  # still no room in the backlog after `left` s
            s.close()
            if time.monotonic() > end:
                raise
            continue
        except BaseException:
            s.close()
            raise
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))
        s.settimeout(timeout)
        return s


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


def attack_fuzz(
    path: str, frames: int, per_conn: int, seed: int, seconds: float, wait: float = 0.2
) -> dict:
    """Write ``frames`` fuzz frames, ``per_conn`` per connection (a connection the hub drops
    early passes its unsent frames on to the next)."""
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    sent = conns = dropped = 0
    while sent < frames and time.monotonic() < deadline:
        try:
            s = _connect(path, max(deadline - time.monotonic(), 0.01))
        except BlockingIOError:
            break
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
        try:
            s = _connect(path, max(deadline - time.monotonic(), 0.01))
        except BlockingIOError:
            break
        conns += 1
        try:
            s.recv(12)
            s.sendall(truncated_frame(rng))
        except OSError:
            dropped += 1
        s.close()
    return {"connections": conns, "dropped_by_hub": dropped}


def _until_dropped(s: socket.socket, chunks, deadline: float) -> bool:
    """Send ``chunks`` (an iterator of bytes) until the hub drops the connection (True) or
    ``deadline`` passes (False)."""
    try:
        for chunk in chunks:
            if time.monotonic() >= deadline:
                return False
            s.sendall(chunk)
    except OSError:
        return True
    return False


def attack_random(path: str, seed: int, seconds: float, chunk: int = 4096) -> dict:
    """Random bytes, ``chunk`` at a time, on connection after connection until
    ``seconds`` pass (the hub drops each at its first bad header)."""
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    conns = dropped = sent = 0
    while time.monotonic() < deadline:
        try:
            s = _connect(path, max(deadline - time.monotonic(), 0.01))
        except BlockingIOError:
            break
        conns += 1

        def chunks():
            nonlocal sent
            while True:
                sent += chunk
                yield rng.randbytes(chunk)

        dropped += _until_dropped(s, chunks(), deadline)
        s.close()
    return {"connections": conns, "dropped_by_hub": dropped, "bytes": sent}


#: Frames announcing more than any limit allows: (valid frame index, length offset).
_OVERSIZE = ((0, 20), (0, 120), (3, 16), (3, 20))


def oversize_frame(rng: random.Random) -> bytes:
    """A valid frame whose length field announces far more than the hub accepts."""
    i, off = rng.choice(_OVERSIZE)
    frame = bytearray(_valid_frames(rng)[i])
    struct.pack_into("<i", frame, off, rng.choice([(1 << 31) - 1, 1 << 30, 1 << 24]))
    return bytes(frame)


def attack_oversize(path: str, seed: int, seconds: float) -> dict:
    """Frames with huge length fields, then filler as if the payload followed, on
    connection after connection until ``seconds`` pass."""
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    conns = dropped = 0
    filler = bytes(65536)
    while time.monotonic() < deadline:
        try:
            s = _connect(path, max(deadline - time.monotonic(), 0.01))
        except BlockingIOError:
            break
        conns += 1

        def chunks():
            yield oversize_frame(rng)
            while True:
                yield filler

        dropped += _until_dropped(s, chunks(), deadline)
        s.close()
    return {"connections": conns, "dropped_by_hub": dropped}


def attack_slowloris(
    path: str,
    seconds: float,
    interval: float,
    payload: bytes = b"NEEDINIT    ",
    connections: int | None = None,
) -> dict:
    """One byte of ``payload`` every ``interval`` s; reconnect when dropped (up to
    ``connections`` times, if given)."""
    deadline = time.monotonic() + seconds
    conns = dropped = sent = 0
    while time.monotonic() < deadline and (connections is None or conns < connections):
        try:
            s = _connect(path, max(deadline - time.monotonic(), 0.01))
        except BlockingIOError:
            break
        conns += 1
        gone, i = False, 0
        try:
            while time.monotonic() < deadline:
                k = i % len(payload)
                s.sendall(payload[k : k + 1])
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


def attack_idle(path: str, count: int, seconds: float, reopen: bool = False) -> dict:
    """Open ``count`` connections that never speak; wait (up to ``seconds``) for the hub
    to close each one. ``reopen``: open a new silent one for each the hub closes, until
    ``seconds`` pass (``count`` are then held open all the time)."""
    raise_nofile(count + 64)
    t0 = time.monotonic()
    deadline = t0 + seconds
    socks: dict[int, socket.socket] = {}
    poll = select.poll()

    open_: set[int] = set()

    def open_one() -> int:
        try:
            s = _connect(path, max(deadline - time.monotonic(), 0.01))
        except BlockingIOError:
            return 0
        s.setblocking(False)
        socks[s.fileno()] = s
        poll.register(s.fileno(), select.POLLIN)
        open_.add(s.fileno())
        return 1

    opened = sum(open_one() for _ in range(count))
    latest = 0.0
    dropped = 0
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
                socks.pop(fd).close()
                dropped += 1
                latest = time.monotonic() - t0
                if reopen and time.monotonic() < deadline:
                    opened += open_one()
    for s in socks.values():
        s.close()
    return {"connections": opened, "dropped_by_hub": dropped, "last_drop_s": round(latest, 3)}


def attack_connect_close(path: str, count: int, seconds: float) -> dict:
    """Connect and close immediately, ``count`` times or for ``seconds``."""
    deadline = time.monotonic() + seconds
    conns = 0
    while conns < count and time.monotonic() < deadline:
        try:
            _connect(path, max(deadline - time.monotonic(), 0.01)).close()
        except BlockingIOError:
            break
        conns += 1
    return {"connections": conns, "dropped_by_hub": 0}


# ----------------------------------------------------------------------------- healthy


class CountingDriver:
    """A well-behaved driver like tests/fakes.FakeDriver (source = fake_source, extras
    {"n": fields received}) that keeps only a count, so a long run holds no history."""

    def __init__(self, path: str, sock: socket.socket | None = None) -> None:
        self.path = path
        self.sock = sock  # already connected (else it connects to path)
        self.molecule_id: int | None = None
        self.steps = 0

    async def run(self) -> None:
        if self.sock is not None:
            reader, writer = await asyncio.open_unix_connection(sock=self.sock)
        else:
            reader, writer = await asyncio.open_unix_connection(self.path)
        decoder = wire.Decoder("driver")
        init, staged, mid = False, None, -1
        try:
            while data := await reader.read(65536):
                for ev in decoder.feed(data):
                    if isinstance(ev, wire.Status):
                        writer.write(wire.encode_header(wire.READY if init else wire.NEEDINIT))
                    elif isinstance(ev, wire.Init):
                        init, self.molecule_id = True, ev.ident
                        mid = ev.ident
                    elif isinstance(ev, wire.PosData):
                        staged = tuple(float(x) for x in ev.field)
                        self.steps += 1
                    elif isinstance(ev, wire.GetForce):
                        extras = b'{"n": %d}' % self.steps
                        writer.write(wire.encode_source_ready(fake_source(mid, staged), extras))
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


def _replacement_main(path: str) -> None:
    """A replacement driver: ready, it waits for a line on stdin, then connects the way
    ``maxwellhub-driver`` does (maxwellhub_drivers.client.connect) and serves its molecule."""
    from maxwellhub_drivers.client import connect

    emit(ready=True)
    sys.stdin.readline()
    t0 = time.monotonic()
    sock = connect(unix=path, timeout=120)
    connected = time.monotonic() - t0
    driver = CountingDriver(path, sock)
    asyncio.run(driver.run())
    emit(connect_s=round(connected, 4), steps={str(driver.molecule_id): driver.steps})


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


def track_peers(
    hub: Hub, kind_of_pid: dict[int, str], made_at: dict[str, float] | None = None
) -> dict[int, str]:
    """Before ``hub.start()``: record the kind of every accepted connection (by the
    peer's pid, SO_PEERCRED), and in ``made_at`` when each kind's latest connection got
    its transport. Returns {driver number: kind}."""
    kinds: dict[int, str] = {}
    made_at = {} if made_at is None else made_at
    make = hub._new_driver

    def factory():
        d = make()
        made = d.connection_made

        def connection_made(transport, d=d, made=made):
            pid = -1
            sock = transport.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):
                pid = struct.unpack(
                    "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                )[0]
            kinds[d.number] = kind = kind_of_pid.get(pid, "?")
            made_at[kind] = time.monotonic()
            made(transport)

        d.connection_made = connection_made  # type: ignore[method-assign]
        return d

    hub._new_driver = factory  # type: ignore[method-assign]
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
            if (
                tuple(res[m]["amp"]) != fake_source(m, field_of(k, m))
                or json.loads(res[m]["extra"])["n"] != k + 1
            ):
                state["bad"] += 1
        state["steps"] += 1


def _spawn(role: list[str], path: str, args) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            *role,
            "--path",
            path,
            "--seconds",
            str(args.seconds),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def attacker_roles(args) -> dict[str, list[str]]:
    """Each attacker's command line: one process per kind, at full speed for the run."""
    return {
        "connect-close": ["--attack", "connect-close", "--count", str(args.connect_close)],
        "random": ["--attack", "random"],
        "oversize": ["--attack", "oversize"],
        "fuzz": [
            "--attack",
            "fuzz",
            "--frames",
            str(args.frames),
            "--per-conn",
            str(args.per_conn),
        ],
        "truncated": ["--attack", "truncated", "--count", str(args.truncated)],
        "idle": ["--attack", "idle", "--count", str(args.idle)],
        "slowloris": ["--attack", "slowloris", "--interval", str(args.interval)],
    }


async def _at(t: float) -> None:
    """Sleep until monotonic time ``t``."""
    await asyncio.sleep(max(0.0, t - time.monotonic()))


async def _read(proc: subprocess.Popen, wait: float) -> dict:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, JsonLines(proc).next, time.monotonic() + wait) or {}


_SUMMARY_RE = re.compile(r"^([\d,]+) more line\(s\) about peers were not logged")
SETTLE = 0.15  # seconds after pausing the attackers before a quiet window (queues drain)


class Flood:
    """The attacker processes, paused (SIGSTOP) and resumed (SIGCONT) window by window, so
    that quiet and attacked windows interleave and a shared machine's drifting load falls
    on both alike. Only the processes this benchmark started, by their own handles."""

    def __init__(self, procs: dict[str, subprocess.Popen]) -> None:
        self.procs = procs

    def _signal(self, sig: int) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(sig)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)


class Windows:
    """Steps, seconds and the hub process's CPU seconds of the quiet and the attacked
    windows, in order."""

    def __init__(self) -> None:
        self.quiet: list[tuple[int, float, float]] = []
        self.attacked: list[tuple[int, float, float]] = []

    @staticmethod
    def rate(windows: list[tuple[int, float, float]]) -> float:
        """Steps per second."""
        return sum(w[0] for w in windows) / sum(w[1] for w in windows)

    @staticmethod
    def cpu_per_step(windows: list[tuple[int, float, float]]) -> float:
        """The hub process's CPU seconds per step."""
        return sum(w[2] for w in windows) / max(sum(w[0] for w in windows), 1)

    def fractions(self) -> list[float]:
        """Each attacked window's rate over the quiet window right after it."""
        return [
            (a[0] / a[1]) / (q[0] / q[1]) for a, q in zip(self.attacked, self.quiet, strict=True)
        ]


async def _window(state: dict, until: float) -> tuple[int, float, float]:
    s0, t0, c0 = state["steps"], time.monotonic(), time.process_time()
    await _at(until)
    return state["steps"] - s0, time.monotonic() - t0, time.process_time() - c0


async def _replace(hub: Hub, replacement: subprocess.Popen, made_at: dict, out: dict) -> None:
    """A replacement driver (a child waiting for "go") connects; time until bound."""
    out["mid"] = mid = hub.register_molecule_return_id({"dt_au": 0.5})
    t_go = time.monotonic()
    assert replacement.stdin is not None
    replacement.stdin.write(b"go\n")
    replacement.stdin.flush()
    out["bound"] = await hub.wait_until_bound([mid], timeout=60)
    out["bound_s"] = time.monotonic() - t_go
    out["admitted_s"] = made_at.get("replacement", math.nan) - t_go


async def bench(args) -> None:
    raise_nofile(args.idle + 4096)
    timeout = args.hub_timeout
    path = f"/tmp/maxwellhub_hostile_{os.getpid()}"
    lines = capture_hub_log()
    hub = Hub(unixsocket=path, timeout=timeout, backlog=args.backlog)
    kind_of_pid: dict[int, str] = {}
    made_at: dict[str, float] = {}
    kinds = track_peers(hub, kind_of_pid, made_at)
    await hub.start()
    healthy = _spawn(["--healthy", "8"], path, args)
    kind_of_pid[healthy.pid] = "healthy"
    replacement = _spawn(["--replacement"], path, args)
    kind_of_pid[replacement.pid] = "replacement"
    ids = list(range(8))
    assert await hub.wait_until_bound({m: {"dt_au": 0.5} for m in ids}, timeout=60)
    assert (await _read(replacement, 60)).get("ready"), "the replacement driver did not start"
    state = {"stop": False, "steps": 0, "bad": 0}
    task = asyncio.create_task(stepper(hub, ids, state))
    rss_start = vm_rss_kib()
    await asyncio.sleep(1.0)  # warm up

    # The flood: every attacker in its own process, unpinned, at full speed; paused and
    # resumed so that attacked and quiet windows alternate.
    window = args.window
    rounds = max(2, math.ceil(args.seconds / window))
    period = 2 * window + SETTLE
    t0 = time.monotonic() + 2.0  # the attackers' start-up (imports) comes first
    until = t0 + (rounds - 1) * period + window  # the end of the last attacked window
    procs = {
        kind: _spawn([*role, "--until", repr(until)], path, args)
        for kind, role in attacker_roles(args).items()
        if kind in args.kinds.split(",")
    }
    for kind, p in procs.items():
        kind_of_pid[p.pid] = kind
    flood, windows = Flood(procs), Windows()
    repl_out: dict = {}
    rss_max = rss_start
    replacing = None
    for r in range(rounds):
        start = t0 + r * period
        await _at(start)
        flood.resume()
        if r == rounds // 2:  # a replacement driver connects as maxwellhub-driver does
            replacing = asyncio.create_task(_replace(hub, replacement, made_at, repl_out))
        windows.attacked.append(await _window(state, start + window))
        flood.pause()
        rss_max = max(rss_max, vm_rss_kib())
        await _at(start + window + SETTLE)
        windows.quiet.append(await _window(state, start + period))
    flood.resume()
    assert replacing is not None
    await replacing
    bound = repl_out["bound"]
    mid = repl_out["mid"]
    attack_lines = len(lines.records)
    results = {kind: await _read(p, 60) for kind, p in procs.items()}
    attackers_cpu = sum(r.get("cpu_s", 0.0) for r in results.values())
    for p in procs.values():
        stop_process(p)
    # Silent peers still open (if any) are dropped at the handshake deadline.
    end = time.monotonic() + timeout + 10
    while len(hub._connections) > 9 and time.monotonic() < end:
        await asyncio.sleep(0.1)
    conns_after = len(hub._connections)
    rss_end = vm_rss_kib()
    rss_max = max(rss_max, rss_end)
    state["stop"] = True
    await task

    # The last step includes the replacement's molecule: every source checked.
    final_ok = bound
    if bound:
        k = hub.step_index
        all_ids = [*ids, mid]
        res = await hub.step({m: {"efield_au": field_of(k, m)} for m in all_ids}, timeout=30)
        final_ok = all(tuple(res[m]["amp"]) == fake_source(m, field_of(k, m)) for m in all_ids)
    total_steps = hub.step_index
    status = hub.status()
    await hub.stop(wait=5)
    report = await _read(healthy, 30)
    stop_process(healthy)
    repl = await _read(replacement, 30)
    stop_process(replacement)
    counts = {int(k): v for k, v in report.get("steps", {}).items()}
    once = (
        bool(counts)
        and all(counts.get(m) == total_steps for m in ids)
        and state["bad"] == 0
        and repl.get("steps", {}).get(str(mid)) == 1
    )
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    print(f"# Hostile input against a live hub: a flood from the same node\n\n{machine()}\n")
    print(
        f"Load average at the end {os.getloadavg()[0]:.2f}: the machine is shared, so quiet "
        f"and attacked windows of {window:g} s alternate in this one run ({rounds} of each: "
        f"the attackers are paused with SIGSTOP for each quiet window, after {SETTLE:g} s "
        f"for the queues to drain).\n"
    )
    print(
        f"Hub (this process, {type(asyncio.get_running_loop()).__module__.split('.')[0]} "
        f"loop) on a UNIX socket, timeout {timeout:g} s, backlog "
        f"{args.backlog}; 8 healthy molecules in one child process, every step's sources "
        f"checked; {len(procs)} attacker processes, unpinned, at full speed.\n"
    )
    fractions = sorted(windows.fractions())
    quiet, attacked = Windows.rate(windows.quiet), Windows.rate(windows.attacked)
    # (a hub from before the paced listener and the log summary lacks these counts)
    listener: dict = Counter(status.get("listeners", [{}])[0])
    print("| figure | value |\n|---|---|")
    print(f"| quiet steps/s | {fmt(quiet)} |")
    print(f"| attacked steps/s | {fmt(attacked)} |")
    cpu_q, cpu_a = Windows.cpu_per_step(windows.quiet), Windows.cpu_per_step(windows.attacked)
    print(
        f"| hub process CPU per step, quiet / attacked (what a loaded machine disturbs "
        f"least) | {cpu_q * 1e6:.0f} / {cpu_a * 1e6:.0f} µs (quiet/attacked "
        f"{cpu_q / cpu_a:.0%}) |"
    )
    print(f"| attackers' CPU seconds in all | {attackers_cpu:.1f} |")
    print(
        f"| **fraction of the quiet rate kept** (per window pair: min / median / max) | "
        f"**{attacked / quiet:.0%}** ({fractions[0]:.0%} / "
        f"{fractions[len(fractions) // 2]:.0%} / {fractions[-1]:.0%}) |"
    )
    print(
        f"| attacks made (connections the attackers opened) | "
        f"{sum(r.get('connections', 0) for r in results.values()):,} |"
    )
    print(
        f"| new connections: accepted / closed already / admitted (paced as hostile) / "
        f"paced rounds / backlog shrunk | {listener['accepted']:,} / "
        f"{listener['closed_already']:,} / {listener['admitted']:,} "
        f"({listener['hostile_paced']:,}) / {listener['paced_rounds']:,} / "
        f"{listener['backlog_shrunk']:,} |"
    )
    print(
        f"| replacement driver bound during the flood (maxwellhub_drivers.client.connect) | "
        f"{'yes' if bound else 'NO'}, {repl_out['bound_s'] * 1e3:.0f} ms after it began "
        f"connecting (connected after {repl.get('connect_s', math.nan) * 1e3:.0f} ms, "
        f"admitted by the hub after {repl_out['admitted_s'] * 1e3:.0f} ms) |"
    )
    print(
        f"| steps in all; every healthy molecule stepped once per step, sources and extras "
        f"right; the replacement's step right | {total_steps:,}; "
        f"{'yes' if once and final_ok else 'NO'} (bad {state['bad']}) |"
    )
    print(f"| RSS at start / end (VmRSS) | {rss_start / 1024:.1f} / {rss_end / 1024:.1f} MiB |")
    print(
        f"| RSS sampled max / peak ru_maxrss of the hub | {rss_max / 1024:.1f} / "
        f"{maxrss / 1024:.1f} MiB |"
    )
    print(f"| connections after the flood (healthy 8 + replacement) | {conns_after} |")
    report_lines(
        lines,
        attack_lines,
        status.get("peer_lines") or {"seen": 0, "logged": 0, "held_back": {}},
        kinds,
        results,
    )


def report_lines(lines: Lines, attack_lines: int, peer_log: dict, kinds, results) -> None:
    """The log lines: logged in all, about peers (one by one and summarised), per kind."""
    summarised = sum(
        int(m.group(1).replace(",", ""))
        for _, msg in lines.records
        if (m := _SUMMARY_RE.match(msg))
    )
    print(
        f"| WARNING/ERROR lines logged (during the flood / in all) | {attack_lines:,} / "
        f"{len(lines.records):,} |"
    )
    print(
        f"| lines about peers: seen / logged one by one / held back (the summaries' "
        f"counts) | {peer_log['seen']:,} / {peer_log['logged']:,} / "
        f"{sum(peer_log['held_back'].values()):,} ({summarised:,}) |"
    )
    by_driver = lines_by_driver(lines.records)
    per_kind: dict[str, Counter] = defaultdict(Counter)
    for number, kind in kinds.items():
        per_kind[kind]["admitted"] += 1
        per_kind[kind]["lines"] += len(by_driver.get(number, []))
    print("\n| attacker | attacker says | admitted by the hub | lines naming them |")
    print("|---|---|---|---|")
    for kind in (*KINDS, "healthy", "replacement", "?"):
        if kind not in per_kind and kind not in results:
            continue
        c = per_kind[kind]
        says = ", ".join(
            f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
            for k, v in results.get(kind, {}).items()
        )
        print(f"| {kind} | {says} | {c['admitted']:,} | {c['lines']:,} |")
    held = sorted(peer_log["held_back"].items(), key=lambda kv: -kv[1])
    print("\nHeld back, by kind: " + "; ".join(f"{n:,} x {k}" for k, n in held))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="attacked seconds in all")
    ap.add_argument("--window", type=float, default=1.0, help="seconds per window")
    ap.add_argument("--frames", type=int, default=10**9, help="fuzz frames at most")
    ap.add_argument("--per-conn", type=int, default=200, help="fuzz frames per connection")
    ap.add_argument("--idle", type=int, default=500, help="silent connections held open")
    ap.add_argument("--truncated", type=int, default=10**9, help="truncated frames at most")
    ap.add_argument("--connect-close", type=int, default=10**9, help="connections at most")
    ap.add_argument("--interval", type=float, default=2.0, help="slowloris byte interval")
    ap.add_argument("--hub-timeout", type=float, default=5.0)
    ap.add_argument("--backlog", type=int, default=4096, help="the hub's listen backlog")
    ap.add_argument("--kinds", default=",".join(KINDS), help="attackers to run (a,b,...)")
    ap.add_argument(
        "--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the hub's event loop"
    )
    # internal: the child roles
    ap.add_argument("--attack", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--healthy", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--replacement", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--until", type=float, help=argparse.SUPPRESS)  # a monotonic time
    args = ap.parse_args(argv)
    if args.healthy:
        asyncio.run(_healthy_main(args.path, args.healthy))
    elif args.replacement:
        _replacement_main(args.path)
    elif args.attack:
        emit(**attack(args), cpu_s=round(time.process_time(), 2))
    else:
        with asyncio.Runner(loop_factory=lambda: new_event_loop(args.loop)) as runner:
            runner.run(bench(args))


def attack(args) -> dict:
    """Run the attacker ``args.attack`` (a child role) and return what it says."""
    path, seed = args.path, args.seed
    seconds = args.seconds if args.until is None else args.until - time.monotonic()
    if args.attack == "fuzz":
        return attack_fuzz(path, args.frames, args.per_conn, seed, seconds)
    if args.attack == "truncated":
        return attack_truncated(path, args.count, seed, seconds)
    if args.attack == "slowloris":
        return attack_slowloris(path, seconds, args.interval)
    if args.attack == "idle":
        return attack_idle(path, args.count, seconds, reopen=True)
    if args.attack == "random":
        return attack_random(path, seed, seconds)
    if args.attack == "oversize":
        return attack_oversize(path, seed, seconds)
    return attack_connect_close(path, args.count, seconds)


if __name__ == "__main__":
    main()
