"""Shared-memory lane vs UNIX socket, side by side in one run.

A minimal hub loop in this process (pinned to core 0) and forked driver processes (pinned
to core 1) answering ``sources = fields * 0.5``: the model costs ~0, so the transport is
what is measured. Both sides of each row run in the same run, alternating.

* ``unix``: the project's wire frames on a UNIX stream socket. Single-molecule drivers get
  the 196-byte FIELDDATA+GETSOURCE block (``wire.FIELD_STEP_HEAD``, as hub.py's fast path
  writes it) and answer ``wire.encode_source_ready``; the hub parses SOURCEREADY with the
  fast-path checks of hub.py; the barrier is one epoll over the driver sockets. Ensemble
  drivers get ``wire.fields_batch_parts`` + GETFORCE and answer ``wire.encode_sources_batch``,
  both sides decoding with ``wire.Decoder``.
* ``shm-eventfd``: :mod:`maxwellhub.net.shm_lane` (memfd segment, eventfd doorbells, epoll
  barrier over the bells and the companion sockets); ``shm-sockbell``: the same segment,
  the doorbell one byte on the companion socket (one fd per driver). The hub copies the
  fields into each lane and the sources out of it every step (it would, for a solver).

Hub CPU is this process's CPU time (``time.process_time``), drivers excluded. Every step's
sources are checked against ``fields * 0.5`` bitwise on every lane, outside the timed
step (``hub.step``: send, barrier, receive into the hub's array).

The second table runs the lane as a run uses it, negotiated in the handshake
(:mod:`maxwellhub.hub.shm`, :mod:`drivers.shm_driver`): ``SocketHub.step_arrays`` against
one forked ensemble driver session (``drivers.client.serve``) whose model (of the driver
API: input checks, stage, commit) answers ``fields * 0.5``, lane vs the same hub with
``shm_lane=False`` (MXHFIELDS/MXHSOURCES frames), alternating, every step checked bitwise.

Measured on 2026-12-03 (2 vCPUs shared with five other engineers' runs: load average 3-36
during the runs, so every figure is noisy; ratios from the same run, best of 2-3
alternating runs):

* the transport alone (first table), ensemble of 10^6 molecules: the eventfd lane 6.96x /
  6.93x the frames' steps/s (1 / 2 drivers) and 2.9x / 1.4x the raw-bytes socket floor;
  hub CPU 0.18x / 0.17x the frames'. (Earlier, quieter runs: 13.8x / 9.2x.)
* single-molecule drivers, N = 1 ... 1024 (first table): no steady steps/s win (eventfd
  lane 1.22x / 1.19x / 1.82x / 0.69x / 2.06x at N = 1 / 8 / 64 / 256 / 1024 in the last
  run, 0.73x ... 1.84x across runs): the transport there is two wake-ups per step, not
  bytes. So the lane is negotiated for ensembles only.
* the real path (second table), six runs: hub CPU per step 0.50-0.71x (10^4), 0.49-0.56x
  (10^5), 0.35-0.42x (10^6) the frames'; steps/s lane / frames 0.97-1.69x (10^4),
  0.86-2.09x (10^5), 0.71-1.68x (10^6), median about 1.2x. The end-to-end win is small
  because what the lane removes (four kernel copies and two codec copies of 24 MB at 10^6)
  is a part of the step: the model and the two (M, 3) transpositions between the hub's
  row-major arrays and the column blocks a model is given (kept so that both paths hand
  the model the same bits in the same layout) remain, and on a socket the kernel copies
  of hub and driver overlap on the two cores, while the lane's copies are in series.
  Kept: it never costs steps/s beyond the noise and always saves the hub (the EM process)
  half its CPU per step or more.

    .venv/bin/python benchmarks/shm_lane.py                      # the full table
    .venv/bin/python benchmarks/shm_lane.py --counts 1,8 --ensemble 0 --seconds 0.5
    .venv/bin/python benchmarks/shm_lane.py --real-only --real 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from maxwellhub.net import shm_lane
from maxwellhub.protocol import wire

C = 0.5
HUB_CORE, DRIVER_CORE = 0, 1
_GETFORCE = wire.encode_header(wire.GETFORCE)
_SR_HEADER = wire.encode_header(wire.FORCEREADY)
_SR_ENERGY_NAT = struct.pack("<di", 0.0, 1)
_SR_TAIL = struct.Struct("<3d72xi")
_SR_SIZE = wire.SOURCE_READY_PREFIX_SIZE
_FIELD3 = struct.Struct("<3d")
_HEAD = len(wire.FIELD_STEP_HEAD)
TIMEOUT = 60.0
MODES = ("unix", "shm-eventfd", "shm-sockbell")
#: Ensemble rows add the socket floor: raw float64 bytes, no frames, no codec copies.
ENSEMBLE_MODES = ("unix", "unix-raw", "shm-eventfd", "shm-sockbell")


def _pin(core: int) -> bool:
    try:
        os.sched_setaffinity(0, {core})
    except (AttributeError, OSError):
        return False
    return True


# ---------------------------------------------------------------------------- drivers
def _recv_exact(sock: socket.socket, buf: memoryview) -> bool:
    got = 0
    while got < len(buf):
        n = sock.recv_into(buf[got:])
        if n == 0:
            return False
        got += n
    return True


def driver_unix_single(sock: socket.socket) -> None:
    buf = bytearray(wire.FIELD_STEP_SIZE)
    view = memoryview(buf)
    while _recv_exact(sock, view):
        ex, ey, ez = _FIELD3.unpack_from(buf, _HEAD)
        sock.sendall(wire.encode_source_ready((ex * C, ey * C, ez * C)))


def driver_unix_batch(sock: socket.socket, molecules: int) -> None:
    dec = wire.Decoder("driver", wire.Limits())
    dec.batch = molecules
    fields = None
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return
        for ev in dec.feed(data):
            if isinstance(ev, wire.FieldsBatch):
                fields = ev.fields
            elif isinstance(ev, wire.GetForce):
                assert fields is not None
                sock.sendall(wire.encode_sources_batch(fields * C))


def driver_unix_raw(sock: socket.socket, molecules: int) -> None:
    """The socket floor: (M, 3) float64 in, (M, 3) out, received into a preallocated
    array and sent from one, no header and no transposition."""
    fields = np.empty((molecules, 3))
    sources = np.empty((molecules, 3))
    fview, sview = fields.data.cast("B"), sources.data.cast("B")
    while _recv_exact(sock, fview):
        np.multiply(fields, C, out=sources)
        sock.sendall(sview)


def driver_shm(sock: socket.socket) -> None:
    lane = shm_lane.accept(sock)
    poller = lane.driver_poller()
    try:
        while True:
            f = lane.wait_fields(poller)
            np.multiply(f, C, out=lane.sources)
            lane.post_sources()
    except shm_lane.PeerGone:
        pass
    finally:
        lane.close()


def spawn(path: str, listener: socket.socket, n: int, mode: str, molecules: int) -> list[int]:
    """Fork ``n`` drivers that connect to ``path``; the hub accepts them afterwards."""
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:  # the driver
            code = 0
            try:
                listener.close()
                _pin(DRIVER_CORE)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                if mode.startswith("shm"):
                    driver_shm(s)  # the offer says which bell
                elif mode == "unix-raw":
                    driver_unix_raw(s, molecules)
                elif molecules == 1:
                    driver_unix_single(s)
                else:
                    driver_unix_batch(s, molecules)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        pids.append(pid)
    return pids


# ---------------------------------------------------------------------------- hub loops
class UnixHub:
    def __init__(self, socks: list[socket.socket], molecules: int) -> None:
        self.socks, self.m = socks, molecules
        self.ep = select.epoll()
        self.row = {}
        for i, s in enumerate(socks):
            s.setblocking(False)
            self.ep.register(s.fileno(), select.EPOLLIN)
            self.row[s.fileno()] = i
        self.decoders = []
        for _ in socks:
            d = wire.Decoder("hub", wire.Limits(max_batch=max(molecules, 1)))
            d.batch = molecules
            self.decoders.append(d)

    def step(self, fields: np.ndarray, out: np.ndarray) -> None:
        if self.m == 1:
            self._step_single(fields, out)
        else:
            self._step_batch(fields, out)

    def _step_single(self, fields: np.ndarray, out: np.ndarray) -> None:
        fb = fields.astype("<f8").tobytes()
        head = wire.FIELD_STEP_HEAD
        for r, s in enumerate(self.socks):
            s.send(b"".join((head, fb[24 * r : 24 * r + 24], _GETFORCE)))
        pending = len(self.socks)
        partial: dict[int, bytes] = {}
        row, socks = self.row, self.socks
        while pending:
            events = self.ep.poll(TIMEOUT)
            if not events:
                raise TimeoutError("unix barrier")
            for fd, _ in events:
                r = row[fd]
                data = partial.pop(fd, b"") + socks[r].recv(4096)
                if not data:
                    raise ConnectionError(f"driver {r} closed")
                if len(data) < _SR_SIZE:
                    partial[fd] = data
                    continue
                if not (data.startswith(_SR_HEADER) and data[12:24] == _SR_ENERGY_NAT):
                    raise wire.ProtocolError(f"driver {r}: not a SOURCEREADY")
                sx, sy, sz, m = _SR_TAIL.unpack_from(data, 24)
                if m != len(data) - _SR_SIZE:
                    raise wire.ProtocolError(f"driver {r}: extras length")
                out[r] = (sx, sy, sz)
                pending -= 1

    def _step_batch(self, fields: np.ndarray, out: np.ndarray) -> None:
        m = self.m
        for r, s in enumerate(self.socks):
            s.setblocking(True)
            for part in wire.fields_batch_parts(fields[r * m : (r + 1) * m]):
                s.sendall(part)
            s.sendall(_GETFORCE)
            s.setblocking(False)
        pending = len(self.socks)
        while pending:
            events = self.ep.poll(TIMEOUT)
            if not events:
                raise TimeoutError("unix barrier")
            for fd, _ in events:
                r = self.row[fd]
                data = self.socks[r].recv(1 << 20)
                if not data:
                    raise ConnectionError(f"driver {r} closed")
                for ev in self.decoders[r].feed(data):
                    assert isinstance(ev, wire.SourcesBatch)
                    out[r * m : (r + 1) * m] = ev.sources
                    pending -= 1

    def close(self) -> None:
        self.ep.close()
        for s in self.socks:
            s.close()


class RawHub:
    """The socket floor for ensembles: raw bytes each way, received in place."""

    def __init__(self, socks: list[socket.socket], molecules: int) -> None:
        self.socks, self.m = socks, molecules
        self.ep = select.epoll()
        self.row = {s.fileno(): i for i, s in enumerate(socks)}
        for s in socks:
            self.ep.register(s.fileno(), select.EPOLLIN)

    def step(self, fields: np.ndarray, out: np.ndarray) -> None:
        m = self.m
        for r, s in enumerate(self.socks):
            s.sendall(fields[r * m : (r + 1) * m].data.cast("B"))
        views = [out[r * m : (r + 1) * m].data.cast("B") for r in range(len(self.socks))]
        got = [0] * len(self.socks)
        pending = len(self.socks)
        while pending:
            events = self.ep.poll(TIMEOUT)
            if not events:
                raise TimeoutError("raw barrier")
            for fd, _ in events:
                r = self.row[fd]
                n = self.socks[r].recv_into(views[r][got[r] :], 0, socket.MSG_DONTWAIT)
                if n == 0:
                    raise ConnectionError(f"driver {r} closed")
                got[r] += n
                if got[r] == len(views[r]):
                    pending -= 1

    def close(self) -> None:
        self.ep.close()
        for s in self.socks:
            s.close()


class ShmHub:
    def __init__(self, socks: list[socket.socket], molecules: int, bell: str) -> None:
        self.m = molecules
        self.lanes = [shm_lane.create(s, molecules, bell=bell) for s in socks]
        self.barrier = shm_lane.Barrier(self.lanes)
        self.k = 0

    def step(self, fields: np.ndarray, out: np.ndarray) -> None:
        m = self.m
        self.k += 1
        for r, lane in enumerate(self.lanes):
            lane.fields[...] = fields[r * m : (r + 1) * m]
        self.barrier.step(self.k, TIMEOUT)
        for r, lane in enumerate(self.lanes):
            out[r * m : (r + 1) * m] = lane.sources

    def close(self) -> None:
        self.barrier.close()
        for lane in self.lanes:
            lane.close()


def run_cell(mode: str, drivers: int, molecules: int, seconds: float, min_steps: int) -> dict:
    """One row side: ``drivers`` forked drivers of ``molecules`` molecules each."""
    with tempfile.TemporaryDirectory(prefix="mxh-shm-") as tmp:
        path = os.path.join(tmp, "hub.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(min(drivers, 4096))
        pids = spawn(path, listener, drivers, mode, molecules)
        pinned = _pin(HUB_CORE)
        socks = [listener.accept()[0] for _ in range(drivers)]
        listener.close()
        hub: UnixHub | RawHub | ShmHub
        if mode == "unix":
            hub = UnixHub(socks, molecules)
        elif mode == "unix-raw":
            hub = RawHub(socks, molecules)
        else:
            hub = ShmHub(socks, molecules, "socket" if mode == "shm-sockbell" else "eventfd")
        total = drivers * molecules
        rng = np.random.default_rng(1)
        fields = rng.standard_normal((total, 3))
        out = np.empty_like(fields)
        try:
            for _ in range(3):  # warm up
                hub.step(fields, out)
            steps, wall, cpu = 0, 0.0, 0.0
            t_start = time.perf_counter()
            while steps < min_steps or time.perf_counter() - t_start < seconds:
                fields[0, 0] = steps  # every step differs
                c0, t0 = time.process_time(), time.perf_counter()
                hub.step(fields, out)
                wall += time.perf_counter() - t0
                cpu += time.process_time() - c0
                # The check is outside the timed step (it costs as much as the lane at 1e6).
                if not np.array_equal(out, fields * C):
                    raise AssertionError(f"{mode}: wrong sources at step {steps}")
                steps += 1
        finally:
            hub.close()
            bad = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
        if bad:
            raise RuntimeError(f"{len(bad)} {mode} drivers failed")
    return {
        "steps": steps,
        "wall": wall,
        "cpu": cpu,
        "steps_s": steps / wall,
        "ms_step": 1e3 * wall / steps,
        "cpu_us_drv": 1e6 * cpu / (steps * drivers),
        "mol_steps_s": steps * total / wall,
        "pinned": pinned,
    }


# ---------------------------------------------------------------------------- real path
# The negotiated lane as a run uses it: SocketHub.step_arrays (what an EM callback calls)
# and forked ensemble driver sessions (drivers.client.serve with a model of the driver
# API), the lane offered in MXHHELLO and passed in the handshake, against the same hub
# and drivers on batched frames (Hub(shm_lane=False)).


def _echo_model(molecules: int):
    from maxwellhub.models import Model

    class Echo(Model):
        """sources = fields * 0.5 through the driver model API (checks, time, commit)."""

        name = "bench_echo"

        def _initial_state(self) -> dict:
            return {"q": np.zeros(self.n)}

        def _stage_impl(self, state: dict, fields: np.ndarray) -> tuple[dict, np.ndarray]:
            return state, fields * C

        def _extras_impl(self, state: dict) -> dict:
            return {}

    return Echo(n=molecules)


def _fork_real_driver(path: str, molecules: int, lane: bool) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0  # the driver
    try:
        _pin(DRIVER_CORE)
        os.environ["MAXWELLHUB_SHM_LANE"] = "1" if lane else "0"
        from maxwellhub_drivers.client import EXIT_OK, connect, serve

        sock = connect(unix=path, timeout=TIMEOUT)
        code = 0 if serve(sock, _echo_model(molecules)) == EXIT_OK else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    os._exit(code)


def real_cell(lane: bool, drivers: int, molecules: int, seconds: float, min_steps: int) -> dict:
    """SocketHub + ``drivers`` forked ensemble sessions of ``molecules`` each."""
    from maxwellhub import SocketHub

    with tempfile.TemporaryDirectory(prefix="mxh-shm-") as tmp:
        path = os.path.join(tmp, "hub.sock")
        pids = [_fork_real_driver(path, molecules, lane) for _ in range(drivers)]
        pinned = _pin(HUB_CORE)
        total = drivers * molecules
        hub = SocketHub(unixsocket=path, timeout=TIMEOUT, shm_lane=None if lane else False)
        try:
            with hub:
                ids = np.array([hub.register_molecule_return_id() for _ in range(total)])
                init = {int(m): {"dt_au": 0.1} for m in ids}
                if not hub.wait_until_bound(init, timeout=TIMEOUT):
                    raise TimeoutError("drivers did not bind")
                assert hub.hub is not None
                on_lane = sum(c.lane is not None and c.lane.active for c in hub.hub._connections)
                if on_lane != (drivers if lane else 0):
                    raise AssertionError(f"{on_lane} of {drivers} drivers on the lane")
                fields = np.random.default_rng(1).standard_normal((total, 3))
                for _ in range(3):  # warm up
                    hub.step_arrays(ids, fields, timeout=TIMEOUT, extras=False)
                steps, wall, cpu = 0, 0.0, 0.0
                t_start = time.perf_counter()
                while steps < min_steps or time.perf_counter() - t_start < seconds:
                    fields[0, 0] = steps  # every step differs
                    c0, t0 = time.process_time(), time.perf_counter()
                    res = hub.step_arrays(ids, fields, timeout=TIMEOUT, extras=False)
                    wall += time.perf_counter() - t0
                    cpu += time.process_time() - c0
                    if res.sources.tobytes() != (fields * C).tobytes():
                        raise AssertionError(f"lane={lane}: wrong sources at step {steps}")
                    steps += 1
                hub.graceful_shutdown(wait=10)
        finally:
            bad = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
        if bad:
            raise RuntimeError(f"{len(bad)} drivers failed (lane={lane})")
    return {
        "steps": steps,
        "steps_s": steps / wall,
        "ms_step": 1e3 * wall / steps,
        "cpu_ms_step": 1e3 * cpu / steps,
        "mol_steps_s": steps * total / wall,
        "pinned": pinned,
    }


def real_table(sizes: list[int], drivers: int, seconds: float, repeats: int) -> None:
    print(
        f"\nnegotiated lane, the real path: SocketHub.step_arrays (extras off) and {drivers} "
        "forked ensemble driver session(s) (drivers.client.serve, a model of the driver API "
        "answering fields * 0.5); best of alternating runs"
    )
    print("| molecules | path | steps/s | ms/step | hub CPU ms/step | lane / socket steps/s |")
    print("|---:|---|---:|---:|---:|---:|")
    for total in sizes:
        best: dict[str, dict] = {}
        for _ in range(repeats):
            for lane in (True, False):
                r = real_cell(lane, drivers, total // drivers, seconds, 5)
                key = "lane" if lane else "socket"
                if key not in best or r["steps_s"] > best[key]["steps_s"]:
                    best[key] = r
        ratio = best["lane"]["steps_s"] / best["socket"]["steps_s"]
        for key in ("socket", "lane"):
            r = best[key]
            print(
                f"| {total:,} | {key} | {r['steps_s']:,.1f} | {r['ms_step']:.2f} "
                f"| {r['cpu_ms_step']:.2f} | {f'{ratio:.2f}x' if key == 'lane' else ''} |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default="1,8,64,256,1024", help="single-molecule drivers N")
    ap.add_argument("--ensemble", type=int, default=1_000_000, help="molecules (0: skip)")
    ap.add_argument("--ensemble-drivers", default="1,2")
    ap.add_argument("--seconds", type=float, default=1.5, help="per side per row")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs; best is kept")
    ap.add_argument(
        "--real",
        default="10000,100000,1000000",
        help="molecules of the negotiated-lane table (SocketHub + ensemble sessions; '' skips)",
    )
    ap.add_argument("--real-drivers", type=int, default=1)
    ap.add_argument("--real-only", action="store_true", help="only the negotiated-lane table")
    args = ap.parse_args()
    real = [int(x) for x in args.real.split(",") if x]
    if args.real_only:
        real_table(real, args.real_drivers, args.seconds, args.repeats)
        return
    counts = [int(x) for x in args.counts.split(",") if x]
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = 3 * max(counts, default=0) + 64
    if need > limit:
        print(f"RLIMIT_NOFILE {limit} < {need}: raising the soft limit", file=sys.stderr)
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (need, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        )
    rows: list[tuple[str, dict[str, dict]]] = []

    def measure(label: str, drivers: int, molecules: int, min_steps: int) -> None:
        best: dict[str, dict] = {}
        modes = MODES if molecules == 1 else ENSEMBLE_MODES
        for _ in range(args.repeats):
            for mode in modes:
                r = run_cell(mode, drivers, molecules, args.seconds, min_steps)
                if mode not in best or r["steps_s"] > best[mode]["steps_s"]:
                    best[mode] = r
        rows.append((label, best))
        print(
            f"  {label}: " + ", ".join(f"{m} {r['steps_s']:.0f}/s" for m, r in best.items()),
            flush=True,
        )

    for n in counts:
        measure(f"N = {n} single", n, 1, 20)
    if args.ensemble:
        for k in [int(x) for x in args.ensemble_drivers.split(",") if x]:
            measure(f"{args.ensemble:,} mol / {k} drv", k, args.ensemble // k, 5)
    pinned = all(r["pinned"] for _, best in rows for r in best.values())
    print(
        f"\nhub on core {HUB_CORE}, drivers on core {DRIVER_CORE}: "
        f"{'pinned' if pinned else 'NOT pinned'}; os.cpu_count() = {os.cpu_count()}; "
        f"best of {args.repeats} alternating runs of >= {args.seconds} s per side"
    )
    print(
        "| row | lane | steps/s | x unix | ms/step | hub CPU µs/drv/step | x unix | Mmol-steps/s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, best in rows:
        u = best["unix"]
        for mode, r in best.items():
            print(
                f"| {label} | {mode} | {r['steps_s']:,.0f} | {r['steps_s'] / u['steps_s']:.2f} "
                f"| {r['ms_step']:.3f} | {r['cpu_us_drv']:.1f} "
                f"| {r['cpu_us_drv'] / u['cpu_us_drv']:.2f} | {r['mol_steps_s'] / 1e6:.3f} |"
            )
    if real:
        real_table(real, args.real_drivers, args.seconds, args.repeats)


if __name__ == "__main__":
    main()
