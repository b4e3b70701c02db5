"""The ``maxwellhub`` command: ``run`` (the main job), ``demo`` (hub + drivers, no Meep),
``relay`` (a relay node for many local drivers), and ``status``/``ping``/``stop`` (clients
of a running hub's control endpoint)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxwellhub", description=__doc__)
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a coupled Meep + molecules job from a TOML config")
    run.add_argument(
        "config",
        nargs="?",
        default=None,
        help="TOML file (default: the packaged relax_2d.toml, as examples/relax_2d.toml)",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set simulation.until=10 "
        "(VALUE in TOML syntax; strings need quotes)",
    )
    run.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue from the newest checkpoint in DIR (the config's "
        "[checkpoint] dir) or from the checkpoint DIR itself; without "
        "CONFIG the config saved in the checkpoint is used. Exit status "
        "75: stopped by SIGTERM/SIGINT with a checkpoint written",
    )
    run.add_argument(
        "--missing-extras",
        action="store_true",
        help="run nothing: print the pip extras of maxwellhub the config's models need "
        "and that are not installed (e.g. pyscf for rttddft), one per line",
    )
    demo = sub.add_parser("demo", help="a hub and local TLS drivers exchanging fields, no Meep")
    demo.add_argument("--molecules", type=int, default=2)
    demo.add_argument("--steps", type=int, default=5)
    demo.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    _relay_parser(sub)
    for name, text in (
        ("status", "print a running hub's status (step, molecules, timing)"),
        ("ping", "check that a running hub's control endpoint answers"),
        (
            "stop",
            "stop a running hub gracefully (output written, drivers "
            "stopped); the token is read from the hub's token file",
        ),
    ):
        c = sub.add_parser(name, help=text)
        c.add_argument(
            "control",
            metavar="CONTROL",
            help="control endpoint: a name (/tmp/maxwellhub_control_NAME, e.g. "
            "mxh_run_<pid>), a socket path, or HOST:PORT",
        )
        c.add_argument(
            "--timeout",
            type=float,
            default=5.0,
            help="seconds to connect and get the answer (default 5)",
        )
        if name == "ping":
            c.add_argument("n", nargs="?", type=float, default=1, help="number to echo")
        if name == "stop":
            c.add_argument(
                "--token-file",
                default=None,
                help="file holding the token (default: CONTROL's .token file)",
            )
    return p


def _relay_parser(sub) -> None:
    r = sub.add_parser(
        "relay",
        help="relay node: serve local drivers, speak to the hub over one "
        "connection with batched frames",
        description="Accept local drivers (UNIX and/or TCP) and host their M molecules "
        "towards the upstream hub over ONE connection, as an ensemble driver. "
        "Exit status: 0 after the hub's STOP or EXIT; 1 hub unreachable or gone "
        "(or interrupted); 2 protocol error from the hub or bad arguments; 3 "
        "local drivers did not connect, initialise or answer in time.",
    )
    r.add_argument(
        "--molecules",
        type=int,
        required=True,
        metavar="M",
        help="molecules this relay hosts: it waits until drivers for M molecules "
        "have connected locally, then says MXHHELLO(M) upstream",
    )
    up = r.add_argument_group("upstream hub (as for maxwellhub-driver)")
    up.add_argument("--unix", metavar="NAME_OR_PATH", help="the hub's UNIX socket")
    up.add_argument("--host", help="the hub's TCP host (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=31415, help="the hub's TCP port (31415)")
    up.add_argument(
        "--secret-file",
        metavar="PATH",
        help="secret for a hub that requires authentication (chmod 600); "
        "default: the environment variable MAXWELLHUB_SECRET",
    )
    lo = r.add_argument_group("local drivers")
    lo.add_argument(
        "--listen-unix",
        metavar="NAME_OR_PATH",
        help="UNIX socket for local drivers (a bare name means /tmp/socketmxl_NAME)",
    )
    lo.add_argument(
        "--listen-tcp", metavar="HOST:PORT", help="TCP address for local drivers (port 0 picks one)"
    )
    lo.add_argument(
        "--local-secret-file",
        metavar="PATH",
        help="require this secret from local drivers (chmod 600)",
    )
    r.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="deadline for local drivers to connect and initialise, for each step and "
        "for reaching the hub (default: none; a dead driver or hub is noticed by its "
        "connection, and a long wait logs who it waits for)",
    )
    r.add_argument(
        "--replace-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="deadline for a lost local driver's replacement to connect, after which the "
        "relay exits 3 (default: --timeout, or 60 without it)",
    )
    r.add_argument(
        "--history",
        type=int,
        default=0,
        metavar="STEPS",
        help="steps of fields kept to replay to a replacement local driver, so "
        "it catches up exactly (default 0: none)",
    )


def _relay(args) -> int:
    from .errors import UsageError
    from .protocol.auth import load_secret
    from .relay import Relay, run_relay

    def usage(message: str) -> int:
        print(f"maxwellhub relay: {message}", file=sys.stderr)
        return 2

    if args.unix is not None and args.host is not None:
        return usage("give the hub as --unix or --host/--port, not both")
    if args.listen_unix is None and args.listen_tcp is None:
        return usage("give --listen-unix and/or --listen-tcp for the local drivers")
    local_tcp = None
    if args.listen_tcp is not None:
        host, sep, port = args.listen_tcp.rpartition(":")
        if not sep or not host or not port.isdigit():
            return usage(f"--listen-tcp {args.listen_tcp!r}: expected HOST:PORT")
        local_tcp = (host.strip("[]"), int(port))
    try:
        relay = Relay(
            args.molecules,
            upstream_unix=args.unix,
            upstream_host=args.host,
            upstream_port=args.port,
            local_unix=args.listen_unix,
            local_tcp=local_tcp,
            secret=load_secret(args.secret_file),
            local_secret=(
                load_secret(args.local_secret_file, env=None) if args.local_secret_file else None
            ),
            timeout=args.timeout,
            replace_timeout=args.replace_timeout,
            history=args.history,
        )
    except (UsageError, ValueError) as exc:
        return usage(str(exc))
    return run_relay(relay)


def _control_client(args) -> int:
    """One request to a control endpoint; print the answer. 0 ok, 1 error answer, 2 no
    answer (cannot connect, timeout, no token)."""
    from .services import control

    try:
        address = control.control_address(args.control)
    except ValueError as exc:
        print(f"maxwellhub {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.command == "ping":
        req: object = {"Ping": int(args.n) if float(args.n).is_integer() else args.n}
    elif args.command == "status":
        req = {"Status": None}
    else:
        try:
            req = {"Stop": {"token": control.read_token(address, args.token_file)}}
        except OSError as exc:
            print(f"maxwellhub stop: cannot read the token: {exc}", file=sys.stderr)
            return 2
    try:
        answer = control.request(address, req, timeout=args.timeout)
    except (OSError, ValueError) as exc:  # TimeoutError is an OSError
        print(f"maxwellhub {args.command}: no answer from {args.control}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(answer))
    return 1 if answer.get("type") == "Error" else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A run reports its progress (steps done, steps/s, time left) even without -v.
    logging.getLogger("maxwellhub.run").setLevel(min(level, logging.INFO))
    if args.command in ("status", "ping", "stop"):
        return _control_client(args)
    if args.command == "relay":
        logging.getLogger("maxwellhub.relay").setLevel(min(level, logging.INFO))
        return _relay(args)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.molecules, args.steps, args.transport)
        return 0
    if args.command == "run":
        from .run.runner import main as run_main

        overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            try:
                overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"] if sep else None
            except tomllib.TOMLDecodeError:
                overrides[key.strip()] = None
            if overrides[key.strip()] is None:
                print(
                    f"maxwellhub run: --set {item!r}: expected KEY=VALUE with a TOML value",
                    file=sys.stderr,
                )
                return 2
        return run_main(
            args.config, overrides, resume=args.resume, missing_extras=args.missing_extras
        )
    return 2


if __name__ == "__main__":
    sys.exit(main())
