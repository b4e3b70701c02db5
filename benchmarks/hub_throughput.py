"""Hub barrier throughput: how many barrier steps per second a hub sustains with N drivers
that do no physics, and how much of the hub's CPU each driver costs.

    .venv/bin/python benchmarks/hub_throughput.py [--quick] [--counts 1,64] [--transports unix]
        [--hubs maxwellhub-async,maxwellhub-sync,maxwelllink,c-epoll] [--seconds 1] [--repeats 3]

Every cell (hub x transport x N) runs two processes: the hub, pinned to core 0, and
``benchmarks/c/loadgen.c`` (N connections in one epoll process, answering SOURCEREADY with
dmu/dt = the field), pinned to core 1. The hubs:

- ``maxwellhub-async``: ``await maxwellhub.Hub.step(requests)`` in one coroutine, on
  ``maxwellhub.new_event_loop()`` (the stdlib's loop, or $MAXWELLHUB_LOOP);
- ``maxwellhub-sync``: ``maxwellhub.SocketHub.step(requests)``, what Meep's step callback
  calls;
- ``maxwelllink``: MaxwellLink's ``SocketHub.step_barrier`` (latency 1e-4), run by the
  Python of its own venv (``.peers/maxwelllink`` or $MAXWELLHUB_MXL_PYTHON) when present;
- ``c-epoll``: ``benchmarks/c/epoll_hub.c``, a minimal epoll hub: the kernel's limit.
- on request (``--hubs``), ``maxwellhub-async-loop`` and ``maxwellhub-sync-loop``: the same
  two with ``fast_path=False`` (every driver read through the event loop), to see what the
  steady reader of :mod:`maxwellhub.hub.fastpath` gives in the same run; and
  ``maxwellhub-async-py`` and ``maxwellhub-sync-py``: the same two with the compiled
  speedups off (MAXWELLHUB_PURE_PYTHON=1), to see what the C steady step gives.

The Python hubs run in a child of this script (``--serve HUB``), so their CPU time is their
own. Each step changes every molecule's field (one numpy write into the arrays the requests
hold); the hub's answer is checked against it after each timed run. Timing rule, the same
in every hub: warm up for at least --min-steps steps and a quarter of --seconds, then
--repeats timed runs of max(--min-steps, --seconds x warm-up rate) steps. Reported: medians
over the runs of steps/s, mean and p99 ms per step, and hub CPU (user + system, all
threads) per driver per step. C programs are compiled with ``cc -O2`` into a temp dir.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    CLIENT_CORE,
    HUB_CORE,
    JsonLines,
    Skip,
    build,
    can_pin,
    child_env,
    emit,
    fmt,
    free_port,
    machine,
    median,
    peer_python,
    pin_to,
    raise_nofile,
    skip_with_log,
    stop_process,
)

HUBS = ("maxwellhub-async", "maxwellhub-sync", "maxwelllink", "c-epoll")
# the same two with every read through the event loop (fast_path=False), on request
LOOP_HUBS = ("maxwellhub-async-loop", "maxwellhub-sync-loop")
# and with the compiled speedups off (MAXWELLHUB_PURE_PYTHON=1), on request
PY_HUBS = ("maxwellhub-async-py", "maxwellhub-sync-py")
LABELS = {
    "maxwellhub-async": "maxwellhub Hub.step (async)",
    "maxwellhub-sync": "maxwellhub SocketHub.step (sync)",
    "maxwellhub-async-loop": "maxwellhub Hub.step (async, fast_path=False)",
    "maxwellhub-sync-loop": "maxwellhub SocketHub.step (sync, fast_path=False)",
    "maxwellhub-async-py": "maxwellhub Hub.step (async, pure Python)",
    "maxwellhub-sync-py": "maxwellhub SocketHub.step (sync, pure Python)",
    "maxwelllink": "MaxwellLink {version} SocketHub.step_barrier",
    "c-epoll": "minimal C hub with epoll (the limit)",
}
TRANSPORTS = ("unix", "tcp")
COUNTS = (1, 8, 64, 256, 1024, 4096)
DT_AU = 0.5


# --------------------------------------------------------------------------- hub side


def timed_runs(run_steps, seconds: float, repeats: int, min_steps: int, check) -> None:
    """Warm up, then time ``repeats`` runs and emit one JSON line per run.

    ``run_steps(k)`` does k barrier steps and returns the k step durations (s).
    ``check()`` verifies the last step's answers (outside the timed region).
    """
    warm, t0 = 0, time.perf_counter()
    while warm < min_steps or time.perf_counter() - t0 < 0.25 * seconds:
        run_steps(min_steps)
        warm += min_steps
    steps = max(min_steps, math.ceil(seconds * warm / (time.perf_counter() - t0)))
    for _ in range(repeats):
        c0 = time.process_time()
        durations = run_steps(steps)
        cpu = time.process_time() - c0
        check()
        durations.sort()
        wall = sum(durations)
        emit(
            steps=steps,
            wall_s=wall,
            mean_ms=1e3 * wall / steps,
            p99_ms=1e3 * durations[math.ceil(0.99 * steps) - 1],
            cpu_s=cpu,
        )


class Workload:
    """N molecules' fields in one array, and requests whose values are views into it, so a
    new step's fields cost one numpy write whatever N is."""

    def __init__(self, ids: list[int]) -> None:
        import numpy as np

        self.ids = ids
        self.fields = np.zeros((len(ids), 3))
        self.fields[:, 1] = 1e-9 * np.arange(len(ids))
        self.fields[:, 2] = 1e-3
        self.requests = {m: {"efield_au": self.fields[i]} for i, m in enumerate(ids)}
        self.step = 0
        self.results: dict = {}

    def next_fields(self) -> None:
        self.step += 1
        self.fields[:, 0] = 1e-6 * (self.step % 1000)

    def check(self) -> None:
        import numpy as np

        amps = np.array([self.results[m]["amp"] for m in self.ids])
        if not np.array_equal(amps, self.fields):
            raise SystemExit("the hub returned sources that are not the fields sent")


def serve_maxwellhub(args, sync: bool, fast_path: bool = True) -> None:
    where = {"unixsocket": args.unix} if args.unix else {"host": "127.0.0.1", "port": args.port}
    if sync:
        _serve_socket_hub(args, where, fast_path)
    else:
        _serve_async_hub(args, where, fast_path)
    emit(done=True)


def _serve_socket_hub(args, where: dict, fast_path: bool) -> None:
    """The synchronous facade (SocketHub), stepped from plain calls."""
    from maxwellhub import SocketHub

    hub = SocketHub(timeout=120, fast_path=fast_path, **where)
    emit(listening=True)
    ids = [hub.register_molecule_return_id() for _ in range(args.n)]
    if not hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=120):
        raise SystemExit("drivers did not bind within 120 s")
    work = Workload(ids)
    perf_counter = time.perf_counter

    def run_steps(k: int) -> list[float]:
        durations, last = [], perf_counter()
        for _ in range(k):
            work.next_fields()
            work.results = hub.step(work.requests)
            t = perf_counter()
            durations.append(t - last)
            last = t
        return durations

    timed_runs(run_steps, args.seconds, args.repeats, args.min_steps, work.check)
    hub.stop()


def _serve_async_hub(args, where: dict, fast_path: bool) -> None:
    """The asyncio Hub, stepped from a coroutine on its own event loop."""
    from maxwellhub import Hub, new_event_loop

    loop = new_event_loop()
    hub = Hub(timeout=120, fast_path=fast_path, **where)
    loop.run_until_complete(hub.start())
    emit(listening=True)
    ids = [hub.register_molecule_return_id() for _ in range(args.n)]
    bound = hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=120)
    if not loop.run_until_complete(bound):
        raise SystemExit("drivers did not bind within 120 s")
    work = Workload(ids)
    perf_counter = time.perf_counter

    async def run_async(k: int) -> list[float]:
        durations, last = [], perf_counter()
        for _ in range(k):
            work.next_fields()
            work.results = await hub.step(work.requests)
            t = perf_counter()
            durations.append(t - last)
            last = t
        return durations

    def run_steps(k: int) -> list[float]:
        return loop.run_until_complete(run_async(k))

    timed_runs(run_steps, args.seconds, args.repeats, args.min_steps, work.check)
    loop.run_until_complete(hub.stop())
    loop.close()


def serve_maxwelllink(args) -> None:
    from importlib.metadata import version

    from maxwelllink import SocketHub

    where = {"unixsocket": args.unix} if args.unix else {"host": "127.0.0.1", "port": args.port}
    hub = SocketHub(timeout=120, latency=1e-4, **where)
    emit(listening=True, version=version("maxwelllink"))
    ids = [hub.register_molecule_return_id() for _ in range(args.n)]
    if not hub.wait_until_bound({m: {"molecule_id": m, "dt_au": DT_AU} for m in ids}, timeout=120):
        raise SystemExit("drivers did not bind within 120 s")
    work = Workload(ids)
    perf_counter = time.perf_counter

    def run_steps(k: int) -> list[float]:
        durations, last = [], perf_counter()
        for _ in range(k):
            work.next_fields()
            work.results = hub.step_barrier(work.requests)
            if not work.results:
                raise SystemExit("MaxwellLink's step_barrier returned {} (aborted)")
            t = perf_counter()
            durations.append(t - last)
            last = t
        return durations

    timed_runs(run_steps, args.seconds, args.repeats, args.min_steps, work.check)
    hub.stop()
    emit(done=True)


# --------------------------------------------------------------------------- one cell


def hub_command(hub: str, where: list[str], n: int, args) -> list[str]:
    """The argv of the hub process."""
    timing = [
        "--seconds",
        str(args.seconds),
        "--repeats",
        str(args.repeats),
        "--min-steps",
        str(args.min_steps),
    ]
    if hub == "c-epoll":
        return [str(build("epoll_hub")), *where, "-n", str(n), *timing]
    python = sys.executable
    if hub == "maxwelllink":
        peer = peer_python()
        if peer is None:
            raise Skip("MaxwellLink not installed (.peers/maxwelllink or $MAXWELLHUB_MXL_PYTHON)")
        python = str(peer)
    return [python, __file__, "--serve", hub, *where, "-n", str(n), *timing]


def run_cell(hub: str, transport: str, n: int, args, workdir: Path) -> dict:
    """Run one hub with N loadgen drivers; return the medians of the timed runs."""
    if raise_nofile(n + 256) < n + 256:
        raise Skip(f"RLIMIT_NOFILE hard limit too low for {n} connections")
    if transport == "unix":
        where = ["--unix", str(workdir / f"{hub}-{n}.sock")]
    else:
        where = ["--host", "127.0.0.1", "--port", str(free_port())]
    argv = hub_command(hub, where, n, args)
    loadgen = build("loadgen")
    deadline = time.monotonic() + 120 + 5 * args.repeats * args.seconds + n * 0.05
    errors = open(workdir / "stderr.txt", "w+b")  # noqa: SIM115
    env = child_env()
    if hub.endswith("-py"):
        env["MAXWELLHUB_PURE_PYTHON"] = "1"
    hub_proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=errors, env=env, preexec_fn=pin_to(HUB_CORE)
    )
    clients = None
    try:
        lines = JsonLines(hub_proc)
        hello = lines.next(deadline)
        if not hello or not hello.get("listening"):
            raise RuntimeError("the hub did not start")
        clients = subprocess.Popen(
            [str(loadgen), *where, "-n", str(n), "--timeout", "60"],
            stderr=errors,
            preexec_fn=pin_to(CLIENT_CORE),
        )
        runs = []
        while (line := lines.next(deadline)) is not None and not line.get("done"):
            runs.append(line)
        if len(runs) != args.repeats:
            raise RuntimeError("the hub ended early")
        if stop_process(hub_proc) != 0:
            raise RuntimeError(f"the hub exited with {hub_proc.returncode}")
    except (RuntimeError, TimeoutError) as exc:
        hub_proc.kill()
        raise skip_with_log(exc, errors) from None
    finally:
        stop_process(hub_proc)
        if clients is not None:
            stop_process(clients)
        errors.close()
    return {
        "version": hello.get("version"),
        "steps_s": median(r["steps"] / r["wall_s"] for r in runs),
        "mean_ms": median(r["mean_ms"] for r in runs),
        "p99_ms": median(r["p99_ms"] for r in runs),
        "cpu_us": median(1e6 * r["cpu_s"] / (n * r["steps"]) for r in runs),
        "steps": runs[0]["steps"],
    }


# --------------------------------------------------------------------------- report


def label(hub: str, results: dict) -> str:
    version = next(
        (
            r["version"]
            for (h, _, _), r in results.items()
            if h == hub and isinstance(r, dict) and r.get("version")
        ),
        "",
    )
    return LABELS[hub].format(version=version).replace("  ", " ")


def _cell(results: dict, hub: str, transport: str, n: int) -> dict | None:
    r = results.get((hub, transport, n))
    return r if isinstance(r, dict) else None


def _ratio(results: dict, hub: str, other: str, transport: str, n: int) -> str:
    """steps/s of ``hub`` over ``other``'s in the same run, or '-'."""
    mine, theirs = _cell(results, hub, transport, n), _cell(results, other, transport, n)
    if mine is None or theirs is None or hub == other:
        return "-"
    return f"{mine['steps_s'] / theirs['steps_s']:.2f}"


def print_tables(results: dict, hubs, transports, counts) -> None:
    for transport in transports:
        print(
            f"\n### Hub barrier throughput, {transport.upper()} "
            "(loadgen drivers, no physics; medians)\n"
        )
        print(
            "| hub | N | steps/s | x MaxwellLink | x C | mean ms/step | p99 ms/step "
            "| hub CPU µs/driver/step | CPU x C |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        notes = []
        for hub in hubs:
            for n in counts:
                r = results.get((hub, transport, n))
                if r is None:
                    continue
                if isinstance(r, str):
                    print(
                        f"| {label(hub, results)} | {n} | - | - | - | - | - | not measured¹ | - |"
                    )
                    notes.append(f"{hub}, N={n}: {r}")
                    continue
                c = _cell(results, "c-epoll", transport, n)
                cpu_x = f"{r['cpu_us'] / c['cpu_us']:.2f}" if c and hub != "c-epoll" else "-"
                print(
                    f"| {label(hub, results)} | {n} | {fmt(r['steps_s'])} "
                    f"| {_ratio(results, hub, 'maxwelllink', transport, n)} "
                    f"| {_ratio(results, hub, 'c-epoll', transport, n)} "
                    f"| {r['mean_ms']:.4f} | {r['p99_ms']:.4f} | {r['cpu_us']:.2f} "
                    f"| {cpu_x} |"
                )
        for note in dict.fromkeys(notes):
            print(f"\n¹ {note}")


OURS = ("maxwellhub-async", "maxwellhub-sync")


def target_lines(results: dict, transports, counts) -> list[str]:
    """The issue's targets, each with its measured ratio and 'met' or 'NOT met'."""
    lines = []
    verdict = {True: "met", False: "NOT met"}

    def steps_ratio(ours, other, transport, n):
        a, b = _cell(results, ours, transport, n), _cell(results, other, transport, n)
        return None if a is None or b is None else a["steps_s"] / b["steps_s"]

    def cpu_ratio(ours, transport, n):
        a, b = _cell(results, ours, transport, n), _cell(results, "c-epoll", transport, n)
        return None if a is None or b is None else a["cpu_us"] / b["cpu_us"]

    for transport in transports:
        t = transport.upper()
        for n, least in ((1, 0.9), (8, 0.75)):
            for ours in OURS:
                ratio = steps_ratio(ours, "c-epoll", transport, n)
                if ratio is not None:
                    lines.append(
                        f"- {t}: N = {n} steps/s, {ours} / C epoll: {ratio:.2f}, "
                        f"target >= {least}: {verdict[ratio >= least]}"
                    )
        for ours in OURS:
            cpu = [(n, cpu_ratio(ours, transport, n)) for n in counts if n >= 64]
            ratios = [(n, r) for n, r in cpu if r is not None]
            if ratios:
                worst = max(r for _, r in ratios)
                each = ", ".join(f"N={n}: {r:.2f}" for n, r in ratios)
                lines.append(
                    f"- {t}: hub CPU per driver per step, {ours} / C epoll, N >= 64 "
                    f"({each}): worst {worst:.2f}, target <= 1.5: "
                    f"{verdict[worst <= 1.5]}"
                )
        for ours in OURS:
            ratios = [
                (n, r)
                for n in counts
                if (r := steps_ratio(ours, "maxwelllink", transport, n)) is not None
            ]
            if ratios:
                worst = min(r for _, r in ratios)
                each = ", ".join(f"N={n}: {r:.2f}" for n, r in ratios)
                lines.append(
                    f"- {t}: steps/s, {ours} / MaxwellLink ({each}): worst "
                    f"{worst:.2f}, target >= 1 at every N: {verdict[worst >= 1]}"
                )
        ratios = [
            (n, r)
            for n in counts
            if (r := steps_ratio("maxwellhub-sync", "maxwellhub-async", transport, n)) is not None
        ]
        if ratios:
            worst = min(r for _, r in ratios)
            each = ", ".join(f"N={n}: {r:.2f}" for n, r in ratios)
            lines.append(
                f"- {t}: steps/s, sync / async ({each}): worst {worst:.2f}, target "
                f">= 0.9 at every N (within 10%): {verdict[worst >= 0.9]}"
            )
        sync, asyn = (
            _cell(results, h, transport, 1) for h in ("maxwellhub-sync", "maxwellhub-async")
        )
        if sync and asyn:
            extra = 1e3 * (sync["mean_ms"] - asyn["mean_ms"])
            lines.append(
                f"- {t}: N = 1, sync minus async: {extra:+.1f} µs per step "
                f"({100 * extra / (1e3 * asyn['mean_ms']):+.0f}%)"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hubs", default=",".join(HUBS))
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)))
    parser.add_argument("--seconds", type=float, default=1.0, help="per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-steps", type=int, default=20)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="N in 1, 8, 64, 256; 0.25 s per run (numbers are rough)",
    )
    # hub side, in the child process
    parser.add_argument(
        "--serve",
        choices=("maxwellhub-async", "maxwellhub-sync", "maxwelllink", *LOOP_HUBS, *PY_HUBS),
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--unix", help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve == "maxwelllink":
        return serve_maxwelllink(args)
    if args.serve:
        return serve_maxwellhub(
            args,
            sync=args.serve.startswith("maxwellhub-sync"),
            fast_path=not args.serve.endswith("-loop"),
        )

    if args.quick:
        args.counts, args.seconds = "1,8,64,256", min(args.seconds, 0.25)
    hubs = [h for h in args.hubs.split(",") if h]
    transports = [t for t in args.transports.split(",") if t]
    counts = [int(c) for c in args.counts.split(",") if c]
    for name, values, allowed in (
        ("hub", hubs, HUBS + LOOP_HUBS + PY_HUBS),
        ("transport", transports, TRANSPORTS),
    ):
        bad = set(values) - set(allowed)
        if bad:
            parser.error(f"unknown {name} {sorted(bad)}; allowed: {', '.join(allowed)}")

    print(f"machine: {machine()}")
    print(
        "pinning: "
        + (
            f"hub on core {HUB_CORE}, drivers on core {CLIENT_CORE}"
            if can_pin()
            else "not possible here (fewer than 2 usable cores)"
        )
    )
    print(f"timing: {args.seconds:g} s per run, {args.repeats} runs, medians", flush=True)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="mxhbench-") as tmp:
        # the hubs of one N run one after the other, so that a change of load on a shared
        # machine hits the cells that are compared less
        for transport in transports:
            for n in counts:
                for hub in hubs:
                    t0 = time.monotonic()
                    try:
                        results[(hub, transport, n)] = r = run_cell(
                            hub, transport, n, args, Path(tmp)
                        )
                        said = f"{fmt(r['steps_s'])} steps/s, {r['cpu_us']:.2f} µs/driver"
                    except Skip as why:
                        results[(hub, transport, n)] = said = str(why)
                    print(
                        f"  {transport} {hub} N={n}: {said} ({time.monotonic() - t0:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    print_tables(results, hubs, transports, counts)
    print("\n### Targets (same run)\n")
    for line in target_lines(results, transports, counts) or ["- (not enough cells measured)"]:
        print(line)


if __name__ == "__main__":
    main()
