"""Relay nodes: N drivers behind R relays vs N direct connections, per-step time of the hub.

    .venv/bin/python benchmarks/relay.py [--drivers 4096] [--relays 4] [--steps 300]
        [--warmup 30] [--transport tcp|unix] [--quick]

Both setups run in one invocation, one after the other, with the same upstream hub: an
asyncio :class:`maxwellhub.Hub` (uvloop) stepping N molecules with ``step_arrays`` (every
step new fields; the answers are checked against them, since the drivers echo the field),
in a child process pinned to core 0.

- direct: ``benchmarks/c/loadgen.c`` holds all N driver connections to the hub;
- relays: R ``maxwellhub relay --molecules N/R`` processes, each with one loadgen holding
  its N/R local drivers over UNIX; each relay speaks to the hub over ONE connection with
  the batched frames (MXHFIELDS/MXHSOURCES).

Upstream transport: TCP (default, as between nodes) or UNIX. The loadgens and the relays
share core 1 (on a real cluster each relay has a node of its own, so the relays' CPU time
here is serialised that would be parallel there). Reported: median and p99 of the wall
time of each of --steps timed steps (after --warmup), the hub's CPU per step
(``process_time``), and the relays' CPU per step (all relays together, from
/proc/<pid>/task/*/schedstat), then the ratio relays / direct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    cpu_seconds,
    emit,
    free_port,
    machine,
    pin_to,
    raise_nofile,
    skip_with_log,
    stop_process,
)

DT_AU = 0.5


# --------------------------------------------------------------------------- hub side


async def serve(args) -> None:
    import numpy as np

    from maxwellhub import Hub

    where = {"unixsocket": args.unix} if args.unix else {"host": "127.0.0.1", "port": args.port}
    hub = Hub(timeout=args.deadline, **where)
    await hub.start()
    emit(listening=True)
    watched = json.loads(sys.stdin.readline())  # the relays' pids (none when direct)
    n = args.n
    ids = np.arange(n)
    if not await hub.wait_until_bound(
        {int(m): {"dt_au": DT_AU} for m in ids}, timeout=args.deadline
    ):
        raise SystemExit(f"drivers for {n} molecules did not bind within {args.deadline} s")
    fields = np.zeros((n, 3))
    fields[:, 1] = 1e-9 * np.arange(n)
    fields[:, 2] = 1e-3
    perf_counter = time.perf_counter

    async def steps(k: int, offset: int) -> list[float]:
        durations = []
        for s in range(k):
            fields[:, 0] = 1e-6 * ((offset + s) % 1000 + 1)
            t0 = perf_counter()
            result = await hub.step_arrays(ids, fields)
            durations.append(perf_counter() - t0)
            if not np.array_equal(result.sources, fields):
                raise SystemExit("the hub got sources that are not the fields it sent")
        return durations

    await steps(args.warmup, 0)
    relays0 = sum(cpu_seconds(p) for p in watched)
    cpu0 = time.process_time()
    durations = await steps(args.steps, args.warmup)
    cpu = time.process_time() - cpu0
    relays = sum(cpu_seconds(p) for p in watched) - relays0
    durations.sort()
    emit(
        steps=args.steps,
        median_ms=1e3 * durations[len(durations) // 2],
        p99_ms=1e3 * durations[math.ceil(0.99 * len(durations)) - 1],
        hub_cpu_ms=1e3 * cpu / args.steps,
        relay_cpu_ms=1e3 * relays / args.steps,
    )
    await hub.stop()
    emit(done=True)


# --------------------------------------------------------------------------- one setup


def run_setup(relays: int, args, workdir: Path) -> dict:
    """N loadgen drivers direct (relays = 0) or behind `relays` relays; the hub's report."""
    n = args.drivers
    if raise_nofile(n + 512) < n + 512:
        raise Skip(f"RLIMIT_NOFILE hard limit too low for {n} connections")
    if args.transport == "unix":
        upstream = ["--unix", str(workdir / f"hub-{relays}.sock")]
    else:
        upstream = ["--host", "127.0.0.1", "--port", str(free_port())]
    loadgen = build("loadgen")
    deadline = time.monotonic() + args.deadline + 60 + args.steps
    errors = open(workdir / f"stderr-{relays}.txt", "w+b")  # noqa: SIM115
    hub = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            *upstream,
            "-n",
            str(n),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--deadline",
            str(args.deadline),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=errors,
        env=child_env(),
        preexec_fn=pin_to(HUB_CORE),
    )
    assert hub.stdin is not None  # stdin=PIPE above
    others: list[subprocess.Popen] = []
    relay_procs: list[subprocess.Popen] = []
    try:
        lines = JsonLines(hub)
        hello = lines.next(deadline)
        if not hello or not hello.get("listening"):
            raise RuntimeError("the hub did not start")
        relay_exe = Path(sys.executable).with_name("maxwellhub")
        for r in range(relays):
            local = str(workdir / f"relay-{r}.sock")
            relay_procs.append(
                subprocess.Popen(
                    [
                        str(relay_exe),
                        "relay",
                        "--molecules",
                        str(n // relays),
                        *upstream,
                        "--listen-unix",
                        local,
                        "--timeout",
                        str(args.deadline),
                    ],
                    stdin=subprocess.DEVNULL,
                    stderr=errors,
                    env=child_env(),
                    preexec_fn=pin_to(CLIENT_CORE),
                )
            )
        hub.stdin.write((json.dumps([p.pid for p in relay_procs]) + "\n").encode())
        hub.stdin.flush()
        targets = (
            [["--unix", str(workdir / f"relay-{r}.sock")] for r in range(relays)]
            if relays
            else [upstream]
        )
        for where in targets:
            others.append(
                subprocess.Popen(
                    [
                        str(loadgen),
                        *where,
                        "-n",
                        str(n // len(targets)),
                        "--timeout",
                        str(args.deadline),
                    ],
                    stderr=errors,
                    preexec_fn=pin_to(CLIENT_CORE),
                )
            )
        report = lines.next(deadline)
        if not report or "median_ms" not in report:
            raise RuntimeError("the hub ended early")
        if not (lines.next(deadline) or {}).get("done"):
            raise RuntimeError("the hub did not stop cleanly")
        if stop_process(hub) != 0:
            raise RuntimeError(f"the hub exited with {hub.returncode}")
        codes = [stop_process(p, 10) for p in relay_procs]
        if any(codes):
            raise RuntimeError(f"relay exit statuses {codes}")
    except (RuntimeError, TimeoutError) as exc:
        hub.kill()
        raise skip_with_log(exc, errors) from None
    finally:
        stop_process(hub)
        for p in relay_procs + others:
            stop_process(p)
        errors.close()
    return report


# --------------------------------------------------------------------------- report


def print_table(args, direct, relayed) -> None:
    r = args.relays
    print(
        f"\n### {args.drivers:,} drivers: direct vs behind {r} relays "
        f"(upstream {args.transport.upper()}; median of {args.steps} steps)\n"
    )
    print(
        "| setup | hub connections | median ms/step | p99 ms/step | hub CPU ms/step "
        "| relays' CPU ms/step (all) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    rows = (
        (f"{args.drivers:,} direct connections", args.drivers, direct),
        (f"{args.drivers:,} drivers behind {r} relays ({args.drivers // r:,} each)", r, relayed),
    )
    for name, conns, x in rows:
        if isinstance(x, str):
            print(f"| {name} | {conns:,} | - | - | - | not measured: {x} |")
            continue
        relay_cpu = f"{x['relay_cpu_ms']:.2f}" if x is relayed else "-"
        print(
            f"| {name} | {conns:,} | {x['median_ms']:.3f} | {x['p99_ms']:.3f} "
            f"| {x['hub_cpu_ms']:.3f} | {relay_cpu} |"
        )
    if isinstance(direct, dict) and isinstance(relayed, dict):
        print(
            f"| ratio relays / direct | {r / args.drivers:.4f} "
            f"| {relayed['median_ms'] / direct['median_ms']:.3f} "
            f"| {relayed['p99_ms'] / direct['p99_ms']:.3f} "
            f"| {relayed['hub_cpu_ms'] / direct['hub_cpu_ms']:.3f} | - |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drivers", type=int, default=4096)
    parser.add_argument("--relays", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300, help="timed steps")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    parser.add_argument(
        "--transport",
        choices=("tcp", "unix"),
        default="tcp",
        help="between the hub and its drivers or relays (default tcp)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=180.0,
        help="seconds for binding and for any one step (default 180)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1,024 drivers, 100 steps (rough numbers)"
    )
    # hub side, in the child process
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--unix", help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        from maxwellhub.hub import new_event_loop

        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(serve(args))
        return
    if args.quick:
        args.drivers, args.steps, args.warmup = min(args.drivers, 1024), 100, 10
    if args.relays < 1 or args.drivers % args.relays:
        parser.error(f"--drivers {args.drivers} must be a multiple of --relays {args.relays}")

    print(f"machine: {machine()}")
    print(
        "pinning: "
        + (
            f"hub on core {HUB_CORE}; loadgens and relays on core {CLIENT_CORE}"
            if can_pin()
            else "not possible here (fewer than 2 usable cores)"
        )
    )
    results: dict[int, dict | str] = {}  # a setup's figures, or why it was skipped
    with tempfile.TemporaryDirectory(prefix="mxhrelay-") as tmp:
        for relays in (0, args.relays):
            t0 = time.monotonic()
            try:
                results[relays] = r = run_setup(relays, args, Path(tmp))
                said = f"{r['median_ms']:.3f} ms/step"
            except Skip as why:
                results[relays] = said = str(why)
            print(
                f"  {'direct' if relays == 0 else f'{relays} relays'}: {said} "
                f"({time.monotonic() - t0:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    print_table(args, results[0], results[args.relays])
    if any(isinstance(r, str) for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
