"""The ``maxwellhub`` command: ``run`` (the main job) and ``demo`` (hub + drivers, no Meep)."""

from __future__ import annotations

import argparse
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
