"""The driver's blocking client loop: connect to a hub, then answer it with one model.

The session follows the i-PI client state machine in the EM profile (see
shared/reference/wire.md): STATUS is answered NEEDINIT before INIT, HAVEDATA between
POSDATA and GETFORCE and READY otherwise; INIT carries the molecule id and UTF-8 JSON with
``dt_au``; POSDATA stages a step (the field is the single position), GETFORCE commits it and
answers SOURCEREADY, so a step re-sent before GETFORCE is idempotent; STOP is answered BYE
and EXIT ends the session silently. A hub holding a shared secret opens with MXHAUTH
instead of STATUS; the driver answers MXHPROOF (see :mod:`maxwellhub.auth`) when it was
given the secret and stops with exit status 2 otherwise.

Framing is the shared codec :mod:`maxwellhub.wire`; this module only moves bytes. It never
prints: it logs, and :func:`run_client` returns an exit status.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from maxwellhub import wire
from maxwellhub.addresses import DEFAULT_PORT, connect_once, unix_socket_path
from maxwellhub.errors import ProtocolError
from maxwellhub.liveness import (
    CONNECT_ATTEMPT,
    CONNECT_BACKOFF_FIRST,
    CONNECT_BACKOFF_MAX,
    CONNECT_RETRY_ERRNOS,
    Reporter,
    within,
)
from maxwellhub.protocol import params as params_frames
from maxwellhub.protocol.init import parse_single_init

from .checkpoint import Continuity

if TYPE_CHECKING:
    from maxwellhub.auth import Secret

    from .models import Model

__all__ = [
    "DEFAULT_PORT",
    "EXIT_CONNECTION",
    "EXIT_MODEL",
    "EXIT_OK",
    "EXIT_PROTOCOL",
    "connect",
    "run_client",
    "serve",
    "unix_socket_path",
]


#: Exit statuses of :func:`run_client` (and of ``maxwellhub-driver``).
EXIT_OK = 0
EXIT_CONNECTION = 1  # could not connect, or the hub went away without STOP/EXIT
EXIT_PROTOCOL = 2  # the hub sent bad bytes, a message out of turn or an unusable INIT
EXIT_MODEL = 3  # the model failed (for example a non-finite source)

_LOG = logging.getLogger("maxwellhub.driver")
_RECV_SIZE = 1 << 16


class HubClosed(ConnectionError):
    """The hub closed the connection before STOP or EXIT."""


class ModelFailed(RuntimeError):
    """The model raised while stepping or initialising."""


NO_SECRET = "the hub requires authentication (MXHAUTH); give --secret-file or MAXWELLHUB_SECRET"
REFUSED = (
    "the hub closed the connection after our MXHPROOF: it refused the secret (is it the hub's?)"
)


def answer_challenge(sock: socket.socket, secret: Secret | None, event: wire.AuthChallenge) -> None:
    """Answer the hub's MXHAUTH with MXHPROOF, or raise :class:`ProtocolError` without a
    secret."""
    if secret is None:
        raise ProtocolError(NO_SECRET)
    sock.sendall(wire.encode_auth_proof(secret.proof(event.nonce)))


def connect(
    *,
    unix: str | None = None,
    host: str | None = None,
    port: int = DEFAULT_PORT,
    timeout: float | None = None,
    logger: logging.Logger | None = None,
) -> socket.socket:
    """Connect to the hub, retrying with exponential backoff (0.05 s doubling to 1 s)
    until ``timeout`` seconds have passed; raise :class:`TimeoutError` then. ``timeout``
    None retries until the hub listens (it may start hours later, from a batch queue),
    logging a WARNING on the growing schedule of :func:`maxwellhub.liveness.report_delays`.

    ``unix`` (name or absolute path) selects a UNIX socket, otherwise TCP to ``host``
    (default 127.0.0.1) and ``port``. The returned socket is blocking with no timeout.
    """
    log = logger or _LOG
    if unix is not None:
        where = f"unix:{unix_socket_path(unix)}"
        attempt = functools.partial(connect_once, unix=unix_socket_path(unix))
    else:
        address = (host or "127.0.0.1", int(port))
        where = f"tcp:{address[0]}:{address[1]}"
        attempt = functools.partial(connect_once, address=address)
    deadline = None if timeout is None else time.monotonic() + timeout
    reporter = Reporter(time.monotonic())
    delay = CONNECT_BACKOFF_FIRST
    tries = 0
    while True:
        tries += 1
        remaining = CONNECT_ATTEMPT if deadline is None else deadline - time.monotonic()
        try:
            sock = attempt(max(remaining, 0.01))
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve the hub's host in {where}: {exc}") from exc
        except OSError as exc:
            if exc.errno not in CONNECT_RETRY_ERRNOS and not isinstance(exc, TimeoutError):
                raise OSError(f"cannot connect to {where}: {exc}") from exc
            now = time.monotonic()
            remaining = delay if deadline is None else deadline - now
            if remaining <= 0:
                raise TimeoutError(
                    f"could not connect to the hub at {where} {within(timeout)} "
                    f"({tries} attempts; last error: {exc.strerror or exc})"
                ) from None
            if reporter.due(now):
                log.warning(
                    "still waiting for the hub at %s after %.0f s (%d attempts; last error: "
                    "%s); retrying",
                    where,
                    now - reporter.start,
                    tries,
                    exc.strerror or exc,
                )
            log.debug("connect to %s failed (%s); retrying in %.2f s", where, exc, delay)
            # Nothing to await before the hub exists: a bounded backoff between attempts.
            time.sleep(min(delay, remaining))
            delay = min(2 * delay, CONNECT_BACKOFF_MAX)
            continue
        log.info("connected to %s", where)
        return sock


def run_client(
    model: Model,
    *,
    unix: str | None = None,
    host: str | None = None,
    port: int = DEFAULT_PORT,
    timeout: float | None = None,
    logger: logging.Logger | None = None,
    secret: Secret | None = None,
    continuity: Continuity | None = None,
    reconnect: bool = False,
) -> int:
    """Connect to the hub and serve ``model`` until the session ends: one molecule as an
    i-PI client, n > 1 molecules as an ensemble with batched frames
    (:mod:`maxwellhub_drivers.ensemble`); ``secret`` answers a hub that asks for
    authentication.

    ``continuity`` (:class:`maxwellhub_drivers.checkpoint.Continuity`) writes checkpoints
    and picks the state to resume from when a maxwellhub hub offers it. ``reconnect``:
    when the connection drops before STOP or EXIT, connect again (within ``timeout``) and
    resume; the hub replays what the state misses. ``timeout``: seconds to connect, None
    (default) until the hub listens (see :func:`connect`). Once connected there is no
    deadline: the hub may compute its own step for as long as it needs, and its death
    ends the session by the connection (EOF, reset, or TCP keepalive for a lost host).

    Returns :data:`EXIT_OK` after STOP or EXIT, :data:`EXIT_CONNECTION` if the hub cannot
    be reached within ``timeout`` seconds or goes away first, :data:`EXIT_PROTOCOL` on a
    protocol error and :data:`EXIT_MODEL` if the model fails. Errors are logged as one line.
    """
    log = logger or _LOG
    continuity = continuity or Continuity(memory=reconnect, logger=log)
    sessions = 0
    while True:
        try:
            sock = connect(unix=unix, host=host, port=port, timeout=timeout, logger=log)
        except OSError as exc:  # TimeoutError included
            log.error("%s", exc)
            return EXIT_CONNECTION
        sessions += 1
        with sock:
            status = serve(sock, model, logger=log, secret=secret, continuity=continuity)
        if status != EXIT_CONNECTION or not reconnect or continuity.refused:
            return status
        log.warning(
            "reconnecting to the hub (session %d ended at step %d)", sessions, continuity.step
        )


def serve(
    sock: socket.socket,
    model: Model,
    *,
    logger: logging.Logger | None = None,
    secret: Secret | None = None,
    continuity: Continuity | None = None,
) -> int:
    """Answer the hub on the connected ``sock`` with ``model``; return an exit status as
    :func:`run_client` does. The caller owns (and closes) ``sock``."""
    log = logger or _LOG
    continuity = continuity or Continuity(logger=log)
    continuity.refused = False
    if model.n == 1:
        session = _Session(sock, model, log, secret, continuity)
    else:
        from .ensemble import EnsembleSession

        session = EnsembleSession(sock, model, log, secret, continuity)
    try:
        session.run()
    except ProtocolError as exc:
        log.error("protocol error%s: %s", session.who(), exc)
        return EXIT_PROTOCOL
    except ModelFailed as exc:
        log.error("model error%s: %s", session.who(), exc)
        return EXIT_MODEL
    except OSError as exc:  # HubClosed, ConnectionResetError, ...
        log.error("connection lost%s: %s", session.who(), exc)
        continuity.refused = str(exc) == REFUSED
        return EXIT_CONNECTION
    return EXIT_OK


_NEEDINIT = wire.encode_header(wire.NEEDINIT)
_READY = wire.encode_header(wire.READY)
_HAVEDATA = wire.encode_header(wire.HAVEDATA)
_BYE = wire.encode_header(wire.BYE)
_ZERO_SOURCE = (0.0, 0.0, 0.0)


class _Session:
    """One connection's state machine. ``run`` returns when the session ends cleanly."""

    def __init__(
        self,
        sock: socket.socket,
        model: Model,
        log: logging.Logger,
        secret: Secret | None = None,
        continuity: Continuity | None = None,
    ) -> None:
        self.sock = sock
        self.model = model
        self.continuity = continuity or Continuity(logger=log)
        self.log = log
        self.secret = secret
        self.proof_sent = False  # MXHPROOF sent and nothing heard since
        self.decoder = wire.Decoder(reader="driver")
        self.init: tuple[int, float] | None = None  # (molecule id, dt_au) of the first INIT
        self.steps = 0
        self.extras_json = _ExtrasJSON()
        # Each handler takes the message of its key's type; True ends the session.
        self.handlers: dict[type, Callable[[Any], bool]] = {
            wire.Status: self.on_status,
            wire.Init: self.on_init,
            wire.PosData: self.on_posdata,
            wire.GetForce: self.on_getforce,
            wire.Stop: self.on_stop,
            wire.Exit: self.on_exit,
            wire.AuthChallenge: self.on_auth,
            wire.Params: self.on_params,
        }

    def who(self) -> str:
        return "" if self.init is None else f" (molecule {self.init[0]})"

    def run(self) -> None:
        buf = bytearray(_RECV_SIZE)
        view = memoryview(buf)
        recv_into, feed, handlers = self.sock.recv_into, self.decoder.feed, self.handlers
        while True:
            n = recv_into(buf)
            if n == 0:
                if self.proof_sent:
                    raise HubClosed(REFUSED)
                pending = self.decoder.buffered
                raise HubClosed(
                    "the hub closed the connection before STOP or EXIT"
                    + (
                        f" (in the middle of a message, {pending} bytes buffered)"
                        if pending
                        else ""
                    )
                )
            for event in feed(view[:n]):
                handler = handlers.get(type(event))
                if handler is None:  # the decoder admits only hub messages; be explicit
                    raise ProtocolError(f"unexpected message {event!r} from the hub")
                if handler(event):
                    return

    # Each handler returns True when the session is over.

    def on_auth(self, event: wire.AuthChallenge) -> bool:
        answer_challenge(self.sock, self.secret, event)
        self.proof_sent = True
        return False

    def on_status(self, _event) -> bool:
        self.proof_sent = False  # accepted: the hub moved on to STATUS
        if self.init is None:
            self.sock.sendall(self.continuity.claim() + _NEEDINIT)
        elif self.model.staged:
            self.sock.sendall(_HAVEDATA)
        else:
            self.sock.sendall(_READY)
        return False

    def on_init(self, event: wire.Init) -> bool:
        init = parse_single_init(event.ident, event.payload)
        dt_au = init.dt_au
        if self.init is not None:
            # Stock i-PI hubs may re-send INIT; the same one changes nothing.
            if self.init == (event.ident, dt_au):
                self.log.debug("INIT repeated for molecule %d; ignored", event.ident)
                return False
            raise ProtocolError(
                f"INIT again with molecule id {event.ident} and dt_au {dt_au!r} after "
                f"molecule id {self.init[0]} and dt_au {self.init[1]!r}"
            )
        try:
            self.model.initialize(dt_au=dt_au, molecule_ids=[event.ident])
        except Exception as exc:
            raise ModelFailed(f"initialize failed: {type(exc).__name__}: {exc}") from exc
        self.init = (event.ident, dt_au)
        self.log.info("initialized molecule %d with dt_au = %r", event.ident, dt_au)
        self.resume([event.ident], init.resume)
        self.accept_params(init.data)
        return False

    def accept_params(self, init_data: dict) -> None:
        """Accept the hub's offer of parameter frames (MXHPARAMSOK 0), if it made one."""
        if params_frames.accepts(init_data):
            self.sock.sendall(params_frames.ACCEPT)

    def on_params(self, event: wire.Params) -> bool:
        """MXHPARAMS: apply the changes and kicks to the model, answer MXHPARAMSOK."""
        ids = self.molecule_ids()
        if ids is None:
            raise ProtocolError("MXHPARAMS before INIT")
        apply = params_frames.model_applier(self.model, ids)
        self.sock.sendall(params_frames.answer(event, ids, apply))
        return False

    def molecule_ids(self) -> list[int] | None:
        return None if self.init is None else [self.init[0]]

    def resume(self, ids: list[int], offer: dict | None) -> None:
        """Pick the state to continue from; answer a resume offer with MXHRESUME."""
        try:
            step = self.continuity.begin(self.model, ids, offer)
        except Exception as exc:
            raise ModelFailed(
                f"restoring a checkpoint failed: {type(exc).__name__}: {exc}"
            ) from exc
        if step is not None:
            self.sock.sendall(wire.encode_resume(step, len(ids)))

    def on_posdata(self, event: wire.PosData) -> bool:
        if self.init is None:
            raise ProtocolError("POSDATA (field) before INIT")
        if event.positions.shape[0] != 1:
            raise ProtocolError(
                f"POSDATA with nat = {event.positions.shape[0]}; the EM profile sends the "
                "field as exactly one position"
            )
        try:
            self.model.stage(event.positions)
        except Exception as exc:
            raise ModelFailed(f"step {self.steps + 1} failed: {type(exc).__name__}: {exc}") from exc
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("step %d: field %s", self.steps + 1, event.positions[0].tolist())
        return False

    def on_getforce(self, _event) -> bool:
        if self.init is None:
            raise ProtocolError("GETFORCE (source request) before INIT")
        continuity = self.continuity
        before = None
        try:
            if self.model.staged:
                if continuity.memory:
                    before = self.model.get_state()
                source = self.model.commit().tolist()[0]
                self.steps += 1
                committed = True
            else:
                self.log.warning(
                    "GETFORCE without a field since the last one; answering a zero source"
                )
                source = _ZERO_SOURCE
                committed = False
            # every step, as MaxwellLink's driver does: the i-PI frames have no flags, so
            # a hub asking for dipoles (step_arrays(dipoles=True)) reads mux_au, muy_au,
            # muz_au from this JSON
            extras = self.model.extras_of(0)
        except Exception as exc:
            raise ModelFailed(f"commit or extras failed: {type(exc).__name__}: {exc}") from exc
        self.sock.sendall(wire.encode_source_ready(source, self.extras_json(extras)))
        if committed:  # after the answer left: a checkpoint never runs ahead of the hub
            continuity.committed(self.model, before)
        return False

    def on_stop(self, _event) -> bool:
        # The hub may close right after STOP; the session is over anyway.
        with contextlib.suppress(OSError):
            self.sock.sendall(_BYE)
        self.log.info("STOP after %d steps; said BYE", self.steps)
        return True

    def on_exit(self, _event) -> bool:
        self.log.info("EXIT after %d steps", self.steps)
        return True


class _ExtrasJSON:
    """Extras as MaxwellLink's driver writes them: ``json.dumps(extras, ensure_ascii=False,
    separators=(",", ":"), sort_keys=True)`` in UTF-8, from a template made once per key
    set (a model reports the same keys every step). Finite floats print as json prints
    them (``float.__repr__``); anything else goes through json itself."""

    def __init__(self) -> None:
        self._keys: tuple[str, ...] = ()
        self._order: list[str] = []
        self._template = "{}"

    def __call__(self, extras: dict[str, float]) -> bytes:
        keys = tuple(extras)
        if keys != self._keys:
            self._keys, self._order = keys, sorted(keys)
            self._template = (
                "{"
                + ",".join(
                    json.dumps(key, ensure_ascii=False).replace("%", "%%") + ":%s"
                    for key in self._order
                )
                + "}"
            )
        values = [extras[key] for key in self._order]
        try:
            if math.isfinite(sum(values)):
                return (self._template % tuple(map(float.__repr__, values))).encode("utf-8")
        except TypeError:  # not all floats
            pass
        return json.dumps(extras, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode(
            "utf-8"
        )
