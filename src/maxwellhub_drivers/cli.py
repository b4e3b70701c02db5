"""``maxwellhub-driver``: one molecule's model behind a socket, answering a maxwellhub hub.

    maxwellhub-driver --unix demo --model tls --param omega=0.242 --param pe_initial=1e-4
    maxwellhub-driver --host 127.0.0.1 --port 31415 --model sho --params-file sho.json
    maxwellhub-driver --host hub.example --secret-file ~/.maxwellhub.secret --model tls
    maxwellhub-driver --address-file $SLURM_SUBMIT_DIR/hub.addr --model tls   # see rendezvous

A hub that requires authentication is answered with the secret from --secret-file (a
chmod 600 file) or from the environment variable MAXWELLHUB_SECRET; never on the command
line.

By default the driver waits for its hub without a deadline: a driver started before its
hub (a batch job whose hub job still queues, a relay started later) must not give up after
a minute; the job's wall-time limit bounds it, Ctrl-C or SIGTERM end it, and it logs a
warning on a growing schedule while it waits. Give --timeout to bound the wait.

Exit status: 0 after STOP or EXIT, 1 when the hub cannot be reached before --timeout or
goes away early, 2 on a protocol error (or bad arguments), 3 when the model fails.
"""

from __future__ import annotations

# Nothing imported here loads numpy: the thread pinning below must run before it does.
import argparse
import json
import logging
import os
import sys
from collections.abc import Collection
from typing import Any

# A driver process is one of many on a machine: one BLAS/OpenMP thread each, always.
for _var in (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
):
    os.environ[_var] = "1"

__all__ = ["main", "parse_params", "parse_value"]


def _unquoted(text: str) -> str | None:
    """The text inside matching single or double quotes, else None."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return None


def parse_value(text: str) -> Any:
    """A ``--param`` value: bool (true/false), int, float, JSON list/object, a quoted
    string (the quotes removed, never parsed: ``'1e-3'`` stays text), else the string."""
    stripped = text.strip()
    quoted = _unquoted(stripped)
    if quoted is not None:
        return quoted
    lowered = stripped.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(stripped)
        except ValueError:
            pass
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ValueError(f"value {text!r} looks like JSON but is not: {exc}") from None
    return stripped


def _text_value(text: str) -> Any:
    """A ``--param`` value for a text (str or path) parameter: the text as written (quotes
    removed), so ``basis=6-31g``, ``label=1`` and ``x=1e-3`` arrive as those strings; a
    JSON list (one value per molecule) is parsed."""
    stripped = text.strip()
    quoted = _unquoted(stripped)
    if quoted is not None:
        return quoted
    return parse_value(stripped) if stripped[:1] == "[" else stripped


def _split_pairs(text: str) -> list[str]:
    """Split on commas outside brackets and quotes, so MaxwellLink's
    ``"omega=0.24, mu12=187"`` works and list values such as ``pe_initial=[0.1,0]`` or
    quoted text such as ``label='a, b'`` stay whole (a quote opens a value only right
    after its ``=``, so an apostrophe inside text is just a character)."""
    parts, depth, start, quote = [], 0, 0, ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"" and text[:i].rstrip().endswith("="):
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def parse_params(
    pairs: list[str], params_file: str | None = None, text_keys: Collection[str] = ()
) -> dict[str, Any]:
    """Model parameters from a JSON file, then ``key=value`` pairs (which override it).
    Values of ``text_keys`` (the model's str and path parameters) stay text (see
    :func:`_text_value`); the JSON file's values keep their JSON types."""
    params: dict[str, Any] = {}
    if params_file is not None:
        try:
            with open(params_file, encoding="utf-8") as f:
                loaded = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--params-file {params_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ValueError(
                f"--params-file {params_file}: expected a JSON object, got {type(loaded).__name__}"
            )
        params.update(loaded)
    for item in pairs:
        for pair in _split_pairs(item):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--param {pair!r}: expected key=value")
            key = key.strip()
            params[key] = _text_value(value) if key in text_keys else parse_value(value)
    return params


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maxwellhub-driver",
        description="Run one molecule's model and answer a maxwellhub (or MaxwellLink) hub "
        "over a UNIX or TCP socket.",
        epilog="Exit status: 0 after STOP or EXIT; 1 hub unreachable or gone; 2 protocol "
        "error or bad arguments; 3 model failure.",
    )
    where = parser.add_argument_group("hub address (UNIX socket, or TCP by default)")
    where.add_argument(
        "--unix",
        metavar="NAME_OR_PATH",
        help="UNIX socket: a bare name means /tmp/socketmxl_NAME, an absolute "
        "path is used as given",
    )
    where.add_argument("--host", help="TCP host of the hub (default 127.0.0.1)")
    where.add_argument("--port", type=int, default=31415, help="TCP port (default 31415)")
    where.add_argument(
        "--address-file",
        metavar="PATH",
        help="wait (up to --timeout) for the hub's rendezvous file and connect "
        "where it says; a leftover of a dead run is rejected; its "
        "secret_file is used unless --secret-file is given",
    )
    parser.add_argument(
        "--model",
        default="tls",
        help="model: a registered name (tls, sho), an entry point of group "
        "maxwellhub.models, or package.module:ClassName (default tls)",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model parameter, repeatable; values parse as bool, int, float "
        "or JSON list, else string (a str or path parameter keeps its "
        "text as written; quote text elsewhere: k='1e-3'); 'a=1, b=2' "
        "also works; relative paths are relative to the current "
        "directory",
    )
    parser.add_argument(
        "--params-file",
        metavar="FILE.json",
        help="JSON object of model parameters (--param overrides it)",
    )
    parser.add_argument(
        "--molecules",
        type=int,
        default=1,
        metavar="M",
        help="host M molecules in this process, stepped together with one "
        "batched frame per step (needs a maxwellhub hub); list-valued "
        "--param values give one value per molecule (default 1)",
    )
    parser.add_argument(
        "--secret-file",
        metavar="PATH",
        help="shared secret for a hub that requires authentication (the "
        "file must be owner-only, chmod 600); default: the environment "
        "variable MAXWELLHUB_SECRET",
    )
    keep = parser.add_argument_group(
        "continuity (a replacement driver resumes where this one stopped; needs a maxwellhub hub)"
    )
    keep.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="write the committed state here (atomically, one file per "
        "molecule id, the newest two kept) and restore from it when "
        "bound to the same molecule(s)",
    )
    keep.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="K",
        help="write a checkpoint every K steps (default 1); the hub must "
        "keep at least K + 1 steps of history to replay "
        "(Hub(history=...))",
    )
    keep.add_argument(
        "--checkpoint-keep-every",
        type=int,
        default=0,
        metavar="R",
        help="also keep the newest two checkpoints whose step is a multiple "
        "of R (a run checkpoint every R steps then finds its state)",
    )
    keep.add_argument(
        "--reconnect",
        action="store_true",
        help="when the connection drops before STOP, connect again (within "
        "--timeout) and resume, from memory or the checkpoints",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up connecting after this long (default: no deadline, so a driver "
        "started before its hub waits for it; a warning says so now and then)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``maxwellhub-driver``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.unix is not None and args.host is not None:
        parser.error("give either --unix or --host/--port, not both")
    if args.address_file is not None and (args.unix is not None or args.host is not None):
        parser.error("give either --address-file or --unix/--host, not both")
    if args.timeout is not None and not args.timeout > 0:
        parser.error(f"--timeout {args.timeout:g}: expected a number of seconds > 0")
    if args.molecules < 1:
        parser.error(f"--molecules {args.molecules}: expected an integer >= 1")
    if args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every {args.checkpoint_every}: expected an integer >= 1")
    if args.checkpoint_keep_every < 0:
        parser.error(
            f"--checkpoint-keep-every {args.checkpoint_keep_every}: expected an integer >= 0"
        )
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format=("%(asctime)s " if args.verbose else "")
        + "maxwellhub-driver: %(levelname)s: %(message)s",
    )
    log = logging.getLogger("maxwellhub.driver")

    from maxwellhub.models import get_model_class
    from maxwellhub.protocol.auth import load_secret

    from .checkpoint import Continuity
    from .client import run_client, unix_socket_path

    try:
        secret = load_secret(args.secret_file)
        cls = get_model_class(args.model)
        params = parse_params(args.param, args.params_file, _text_keys(cls))
        # paths resolved against this directory, once, before the model is built
        params = cls.validate_params(args.molecules, base_dir=os.getcwd(), **params)
        model = cls(n=args.molecules, **params)
        if args.unix is not None:
            unix_socket_path(args.unix)  # reject an overlong path before connecting
    except ValueError as exc:
        parser.error(str(exc))
    try:
        continuity = Continuity(
            args.checkpoint_dir,
            args.checkpoint_every,
            args.checkpoint_keep_every,
            memory=args.reconnect,
            logger=log,
        )
    except OSError as exc:
        parser.error(f"--checkpoint-dir {args.checkpoint_dir}: {exc}")
    try:
        if args.address_file is not None:
            from .rendezvous import run_via_address_file

            return run_via_address_file(
                model,
                args.address_file,
                timeout=args.timeout,
                logger=log,
                secret=secret,
                secret_given=args.secret_file is not None,
                continuity=continuity,
                reconnect=args.reconnect,
            )
        return run_client(
            model,
            unix=args.unix,
            host=args.host,
            port=args.port,
            timeout=args.timeout,
            logger=log,
            secret=secret,
            continuity=continuity,
            reconnect=args.reconnect,
        )
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


def _text_keys(cls) -> set[str]:
    """The names (and aliases) of a model class's str and path parameters."""
    text = {key for key, spec in cls.parameters.items() if spec.kind in (str, "path")}
    return text | {alias for alias, (key, _) in cls.aliases.items() if key in text}


if __name__ == "__main__":
    sys.exit(main())
