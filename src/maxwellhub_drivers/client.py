"""The driver's blocking client loop: connect to a hub, then answer it with one model.

The session is the driver-side machine :class:`maxwellhub.protocol.session.Session` (the
i-PI client state machine in the EM profile, see docs/reference/wire.md, and the
batched frames of an ensemble): STATUS is answered NEEDINIT before INIT, HAVEDATA between
POSDATA and GETFORCE and READY otherwise; INIT carries the molecule id and UTF-8 JSON with
``dt_au``; POSDATA stages a step (the field is the single position), GETFORCE commits it and
answers SOURCEREADY, so a step re-sent before GETFORCE is idempotent; STOP is answered BYE
and EXIT ends the session silently. A hub holding a shared secret opens with MXHAUTH
instead of STATUS; the driver answers MXHPROOF (see :mod:`maxwellhub.protocol.auth`) when it was
given the secret and stops with exit status 2 otherwise.

This module is the machine's socket loop and its model side (the driver's
:class:`~maxwellhub.models.Model` and its continuity files). It never prints: it
logs, and :func:`run_client` returns an exit status. The steady steps of a single tls or
sho molecule run in a compiled loop when it is built (:mod:`maxwellhub_drivers.fastloop`),
which hands every other message back to the machine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from maxwellhub.errors import ProtocolError
from maxwellhub.liveness import CONNECT_RETRY_ERRNOS, within
from maxwellhub.net.addresses import DEFAULT_PORT, connect_once, unix_socket_path
from maxwellhub.net.backoff import Backoff
from maxwellhub.protocol import params as params_frames
from maxwellhub.protocol import wire
from maxwellhub.protocol.session import (
    BYE,
    Binding,
    ExtrasJSON,
    Session,
    SessionState,
)

from .checkpoint import Continuity
from .fastloop import FastLoop

if TYPE_CHECKING:
    from maxwellhub.models import Model
    from maxwellhub.protocol.auth import Secret

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
_ExtrasJSON = ExtrasJSON  # the name the tests and older code import


class HubClosed(ConnectionError):
    """The hub closed the connection before STOP or EXIT."""


class ModelFailed(RuntimeError):
    """The model raised while stepping or initialising."""


NO_SECRET = "the hub requires authentication (MXHAUTH); give --secret-file or MAXWELLHUB_SECRET"
REFUSED = (
    "the hub closed the connection after our MXHPROOF: it refused the secret (is it the hub's?)"
)


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
    backoff = Backoff(timeout)
    while True:
        try:
            sock = attempt(backoff.attempt_timeout())
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve the hub's host in {where}: {exc}") from exc
        except OSError as exc:
            if exc.errno not in CONNECT_RETRY_ERRNOS and not isinstance(exc, TimeoutError):
                raise OSError(f"cannot connect to {where}: {exc}") from exc
            delay = backoff.next_delay()
            if delay is None:
                raise TimeoutError(
                    f"could not connect to the hub at {where} {within(timeout)} "
                    f"({backoff.tries} attempts; last error: {exc.strerror or exc})"
                ) from None
            if backoff.report_due():
                log.warning(
                    "still waiting for the hub at %s after %.0f s (%d attempts; last error: "
                    "%s); retrying",
                    where,
                    backoff.waited,
                    backoff.tries,
                    exc.strerror or exc,
                )
            log.debug("connect to %s failed (%s); retrying in %.2f s", where, exc, delay)
            time.sleep(delay)  # nothing to await before the hub exists (see Backoff)
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
    side: DriverSide
    if model.n == 1:
        side = DriverSide(sock, model, log, secret, continuity)
    else:
        from .ensemble import EnsembleSession

        side = EnsembleSession(sock, model, log, secret, continuity)
    try:
        side.run()
    except ProtocolError as exc:
        log.error("protocol error%s: %s", side.who(), exc)
        return EXIT_PROTOCOL
    except ModelFailed as exc:
        log.error("model error%s: %s", side.who(), exc)
        return EXIT_MODEL
    except OSError as exc:  # HubClosed, ConnectionResetError, ...
        log.error("connection lost%s: %s", side.who(), exc)
        continuity.refused = str(exc) == REFUSED
        return EXIT_CONNECTION
    return EXIT_OK


def send_parts(sock: socket.socket, parts: list) -> None:
    """Send the buffers in order, as ``sendall`` of their concatenation would, without
    concatenating them (one MXHSOURCES of 10^6 molecules is 48 MB): one ``sendmsg``
    when the kernel takes them all, as it does for a step's answer."""
    if len(parts) == 1:
        sock.sendall(parts[0])
        return
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]


_IOV_MAX = 1024  # buffers per sendmsg (Linux's UIO_MAXIOV)


class DriverSide:
    """A driver process's side of the machine: the socket loop and the
    :class:`~maxwellhub.protocol.session.SessionModel` of one model (one molecule here;
    :class:`~maxwellhub_drivers.ensemble.EnsembleSession` for n > 1). ``run`` returns
    when the session ends cleanly."""

    recv_size = _RECV_SIZE

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
        self._before: dict[str, np.ndarray] | None = None
        self.session = self.make_session()

    def make_session(self) -> Session:
        return Session(self, 1)

    def who(self) -> str:
        binding = self.session.binding
        return "" if binding is None else f" (molecule {binding.molecule_ids[0]})"

    def closed(self) -> HubClosed:
        """Why the hub's EOF ends the session."""
        session = self.session
        if session.state is SessionState.PROVING:
            return HubClosed(REFUSED)
        pending = session.buffered
        return HubClosed(
            "the hub closed the connection before STOP or EXIT"
            + (f" (in the middle of a message, {pending} bytes buffered)" if pending else "")
        )

    def run(self) -> None:
        session, sock = self.session, self.sock
        out = session.start()
        if out:
            send_parts(sock, out)
        recv_into, read_buffer, received = self.receiver(), session.read_buffer, session.received
        size = self.recv_size
        fast = self.fast_loop()
        while True:
            if fast is not None and fast.usable():
                # steady steps in C until anything else comes, which it hands back
                data = fast.run()
                if data is not None:
                    if not data:
                        raise self.closed()
                    out = session.receive_data(data)
                    if out:
                        send_parts(sock, out)
                        session.sent()
                    if session.state is SessionState.ENDED:
                        break
                    continue
            n = recv_into(read_buffer(size))
            if n == 0:
                raise self.closed()
            out = received(n)
            if out:
                send_parts(sock, out)
                session.sent()
            if session.state is SessionState.ENDED:
                break
        self.ended(session)

    def fast_loop(self) -> FastLoop | None:
        """The compiled steady loop for this session, or None (see
        :mod:`maxwellhub_drivers.fastloop`)."""
        return FastLoop.for_side(self)

    def fast_steps(self, committed: int, sent: int) -> None:
        """The compiled loop committed ``committed`` steps and sent the answers of ``sent``
        of them (one fewer when a send failed): counted as the session machine and
        :meth:`answered` count them. The loop runs only with no checkpoints and no kept
        state, where :meth:`Continuity.committed` just counts."""
        self.session.steps += committed
        self.continuity.step += sent

    def receiver(self) -> Callable[[memoryview], int]:
        """What ``run`` reads with: ``recv_into`` of the socket."""
        return self.sock.recv_into

    def ended(self, session: Session) -> None:
        if session.end is wire.Stop:
            # The hub may close right after STOP; the session is over anyway.
            with contextlib.suppress(OSError):
                self.sock.sendall(BYE)
            self.log.info("STOP after %d steps; said BYE", session.steps)
        else:
            self.log.info("EXIT after %d steps", session.steps)

    # -- SessionModel
    def answer_challenge(self, nonce: bytes) -> bytes:
        if self.secret is None:
            raise ProtocolError(NO_SECRET)
        return self.secret.proof(nonce)

    def claim(self) -> bytes:
        return self.continuity.claim()

    def initialize(self, binding: Binding) -> int | None:
        ids = binding.molecule_ids
        try:
            self.model.initialize(dt_au=binding.dt_au, molecule_ids=ids)
        except Exception as exc:
            raise ModelFailed(f"initialize failed: {type(exc).__name__}: {exc}") from exc
        if len(ids) == 1:
            self.log.info("initialized molecule %d with dt_au = %r", ids[0], binding.dt_au)
        else:
            self.log.info(
                "initialized molecules %d..%d with dt_au = %r", ids[0], ids[-1], binding.dt_au
            )
        try:
            return self.continuity.begin(self.model, ids, binding.resume)
        except Exception as exc:
            raise ModelFailed(
                f"restoring a checkpoint failed: {type(exc).__name__}: {exc}"
            ) from exc

    def stage(self, fields: np.ndarray, flags: int) -> None:
        try:
            self.model.stage(fields)
        except Exception as exc:
            raise ModelFailed(
                f"step {self.session.steps + 1} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("step %d: field %s", self.session.steps + 1, fields[0].tolist())

    def commit(self) -> tuple[Any, Any]:
        model = self.model
        try:
            self._before = model.get_state() if self.continuity.memory else None
            source = model.commit().tolist()[0]
            # every step, as MaxwellLink's driver does: the i-PI frames have no flags, so
            # a hub asking for dipoles (step_arrays(dipoles=True)) reads mux_au, muy_au,
            # muz_au from this JSON
            return source, model.extras_of(0)
        except Exception as exc:
            raise ModelFailed(f"commit or extras failed: {type(exc).__name__}: {exc}") from exc

    def unstaged(self) -> dict[str, float]:
        try:
            return self.model.extras_of(0)
        except Exception as exc:
            raise ModelFailed(f"commit or extras failed: {type(exc).__name__}: {exc}") from exc

    def answered(self) -> None:
        # after the answer left: a checkpoint never runs ahead of the hub
        self.continuity.committed(self.model, self._before)

    def apply_params(self, event: wire.Params, molecule_ids: list[int]) -> bytes:
        """MXHPARAMS: the changes and kicks applied to the model; MXHPARAMSOK."""
        self.continuity.changing(self.model)
        apply = params_frames.model_applier(self.model, molecule_ids)
        return params_frames.answer(event, molecule_ids, apply)
