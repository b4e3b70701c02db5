"""The ``maxwellhub`` command: ``run`` (the main job), ``demo`` (hub + drivers, no Meep), and
``status``/``ping``/``stop`` (clients of a running hub's control endpoint)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxwellhub", description=__doc__)
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a coupled Meep + molecules job from a TOML config")
    run.add_argument("config", nargs="?", default=None,
                     help="TOML file (default: examples/relax_2d.toml)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set simulation.until=10 "
                          "(VALUE in TOML syntax; strings need quotes)")
    demo = sub.add_parser("demo", help="a hub and local TLS drivers exchanging fields, no Meep")
    demo.add_argument("--molecules", type=int, default=2)
    demo.add_argument("--steps", type=int, default=5)
    demo.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    for name, text in (("status", "print a running hub's status (step, molecules, timing)"),
                       ("ping", "check that a running hub's control endpoint answers"),
                       ("stop", "stop a running hub gracefully (output written, drivers "
                                "stopped); the token is read from the hub's token file")):
        c = sub.add_parser(name, help=text)
        c.add_argument("control", metavar="CONTROL",
                       help="control endpoint: a name (/tmp/maxwellhub_control_NAME, e.g. "
                            "mxh_run_<pid>), a socket path, or HOST:PORT")
        c.add_argument("--timeout", type=float, default=5.0,
                       help="seconds to connect and get the answer (default 5)")
        if name == "ping":
            c.add_argument("n", nargs="?", type=float, default=1, help="number to echo")
        if name == "stop":
            c.add_argument("--token-file", default=None,
                           help="file holding the token (default: CONTROL's .token file)")
    return p


def _control_client(args) -> int:
    """One request to a control endpoint; print the answer. 0 ok, 1 error answer, 2 no
    answer (cannot connect, timeout, no token)."""
    from . import control

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
        print(f"maxwellhub {args.command}: no answer from {args.control}: {exc}",
              file=sys.stderr)
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
    if args.command == "demo":
        from .demo import run_demo
        run_demo(args.molecules, args.steps, args.transport)
        return 0
    if args.command == "run":
        from .runner import main as run_main

        overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            try:
                overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"] if sep else None
            except tomllib.TOMLDecodeError:
                overrides[key.strip()] = None
            if overrides[key.strip()] is None:
                print(f"maxwellhub run: --set {item!r}: expected KEY=VALUE with a TOML value",
                      file=sys.stderr)
                return 2
        return run_main(args.config, overrides)
    return 2


if __name__ == "__main__":
    sys.exit(main())
