"""A relay node: many local drivers behind one upstream connection with batched frames.

``maxwellhub relay`` runs on a compute node. Its local side is a :class:`~maxwellhub.Hub`
listening on a UNIX socket (and/or TCP) for ordinary drivers (``maxwellhub-driver``,
MaxwellLink's ``mxl_driver``, ensembles); its upstream side is ONE connection to the
run's hub on which the relay behaves as an ensemble driver hosting M molecules
(MXHHELLO, MXHWELCOME, MXHFIELDS + GETFORCE answered by MXHSOURCES; see
:mod:`maxwellhub.protocol.wire`). The hub's per-step work then grows with the number of relays,
not with the number of molecules. The two-layer idea is MaxwellLink's bridge and
ChAR0N's router; the frames are maxwellhub's own.

Session, in order:

1. Listen locally and wait until drivers for M molecules have connected; only then
   connect upstream (retrying with backoff: the hub may start later) and say
   MXHHELLO(M), so a relay never claims molecules it cannot serve.
2. The upstream INIT names the M molecule ids (``molecule_id_range`` or
   ``molecule_ids``) and their payloads (``payloads``, or one shared object). The relay
   registers exactly those ids locally with those payloads, so every local driver gets
   INIT with its real molecule id, ``dt_au`` and the user's keys; it answers the
   upstream STATUS with READY once every local driver is initialised.
3. Each upstream MXHFIELDS + GETFORCE is one local barrier step (:meth:`Hub.step_arrays`)
   answered by one MXHSOURCES; the local drivers' per-molecule JSON extras travel as
   numeric arrays by key (NaN where a molecule does not report a key; strings and
   booleans do not travel). The MXHFIELDS flags go down with the step: WANT_EXTRAS
   sends all extras up, WANT_DIPOLES alone only the dipole keys (``mux_au``...), asked
   of the local ensembles with the same flag; neither, none.
4. Upstream STOP: STOP to every local driver, then BYE upstream, exit 0 (EXIT: the same
   without BYE).

Deadlines: with the default ``timeout=None`` the relay waits for its local drivers to
connect, initialise and compute, and for the upstream hub to appear, as long as it takes
(logging who it waits for on a growing schedule; Ctrl-C and SIGTERM end it). Deaths are
noticed by the connections, not by deadlines (:mod:`maxwellhub.liveness`): TCP keepalive
on the upstream and local TCP connections, EOF on every socket. A number bounds each of
those waits, as it did before.

Continuity: a local driver that dies mid-run is replaced like a direct one (the relay
waits up to ``replace_timeout`` for a driver to connect to the relay and gives it the
frozen field) while the upstream step waits for the relay. If no replacement comes, or the
upstream goes away, the relay stops its local drivers and exits non-zero with one line
saying why; the upstream hub sees the relay's connection drop and applies its own
lost-driver policy (wait for a replacement relay, or abort).

Exit statuses of :meth:`Relay.run` (and of ``maxwellhub relay``): 0 after STOP or EXIT,
1 the upstream hub unreachable or gone (or the relay interrupted), 2 a protocol error
from the upstream hub, 3 the local drivers did not connect, initialise or answer in time.

This module never unpickles, never converts units, and never puts a secret on a command
line or in a log line.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import Any, cast

import numpy as np

from .errors import BarrierTimeout, DriverLost, MaxwellHubError, ProtocolError, UsageError
from .hub import Hub, StepResult, StopRequested
from .hub.barrier import ids_text
from .liveness import (
    CONNECT_RETRY_ERRNOS,
    DEFAULT_REPLACE_TIMEOUT,
    check_timeout,
    keepalive,
    within,
)
from .net.addresses import DEFAULT_PORT, unix_socket_path
from .net.backoff import Backoff
from .protocol import params as params_frames
from .protocol import wire
from .protocol.auth import Secret, is_loopback
from .protocol.session import PENDING, Binding, Session, SessionState, _Pending

__all__ = ["EXIT_LOCAL", "EXIT_OK", "EXIT_PROTOCOL", "EXIT_UPSTREAM", "Relay"]

log = logging.getLogger("maxwellhub.relay")

EXIT_OK = 0
EXIT_UPSTREAM = 1  # upstream unreachable or gone before STOP/EXIT; interrupted
EXIT_PROTOCOL = 2  # the upstream hub sent bad bytes or an unusable INIT
EXIT_LOCAL = 3  # local drivers did not connect, initialise or answer in time

# What MXHSOURCES can carry (the upstream decoder's default Limits).
_MAX_EXTRAS_KEYS = wire.Limits().max_extras_keys
_MAX_KEY_BYTES = wire.Limits().max_key_bytes
_SPARES = 256  # local drivers beyond M allowed to wait as replacements
_LOCAL_STOP_WAIT = 1.0  # s for local BYEs, shorter than the upstream's wait for ours

_BYE = wire.encode_header(wire.BYE)


class RelayFailed(MaxwellHubError):
    """The relay cannot go on; ``code`` is its exit status, the message says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _describe_upstream(unix: str | None, host: str | None, port: int) -> str:
    if unix is not None:
        return f"unix:{unix_socket_path(unix)}"
    return f"tcp:{host or '127.0.0.1'}:{port}"


class _Upstream(asyncio.Protocol):
    """The relay's connection to the upstream hub: the driver-side machine
    (:class:`~maxwellhub.protocol.session.Session`, batched) in an asyncio adapter whose
    model is the local hub; the local INIT and each local step run as tasks and answer
    the machine later. Every way the session ends resolves :attr:`ended` with
    ``(exit status, message)``."""

    #: Set by connection_made, which the event loop calls before any other method.
    transport: asyncio.Transport

    def __init__(self, relay: Relay, where: str) -> None:
        if relay.local is None:
            raise UsageError("the relay connects upstream only once its local hub listens")
        self.relay = relay
        self.local: Hub = relay.local
        self.where = where
        m = relay.molecules
        self.session = Session(
            self,
            m,
            batched=True,
            limits=wire.Limits(max_init_bytes=(1 << 20) + 512 * m, max_batch=m),
            host="this relay",
        )
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()
        self.bye = False
        self.ids: np.ndarray | None = None  # set once local drivers are initialised
        self.fields: np.ndarray | None = None  # staged by MXHFIELDS
        self.flags = wire.WANT_EXTRAS  # of the last MXHFIELDS
        self.task: asyncio.Task | None = None  # local INIT or local step in flight
        self._dropped_keys: set[str] = set()
        # Continuity (MXHRESUME): the upstream's step count when it bound this relay, the
        # step each local molecule's state belongs to, and the upstream step the next
        # MXHFIELDS belongs to (below ``resume_to``: a replay for the molecules behind).
        self.resume_to = 0
        self.local_steps: np.ndarray | None = None
        self.at = 0

    @property
    def steps(self) -> int:
        """Upstream steps answered (or, during a step, that step's number)."""
        return self.session.steps

    @property
    def stepping(self) -> bool:
        return self.session.state is SessionState.STEPPING

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport (asyncio's or uvloop's) is an asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keepalive(sock)  # a vanished hub host is noticed in LOST_HOST_SECONDS
        self._write(self.session.start())

    def _write(self, parts: list) -> None:
        if parts and not self.ended.done():
            self.transport.writelines(parts)
            self.session.sent()

    def data_received(self, data: bytes) -> None:
        if self.ended.done():
            return
        session = self.session
        try:
            self._write(session.receive_data(data))
        except ProtocolError as exc:
            self.finish(
                EXIT_PROTOCOL,
                f"protocol error from the upstream hub at {self.where}{self._when()}: {exc}",
            )
            return
        if session.end is wire.Stop:
            self.finish(EXIT_OK, f"STOP from the upstream hub after {self.steps} steps", bye=True)
        elif session.end is wire.Exit:
            self.finish(EXIT_OK, f"EXIT from the upstream hub after {self.steps} steps")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ended.done():
            return
        if self.session.state is SessionState.PROVING:
            why = (
                "closed the connection after our MXHPROOF: it refused the secret (is "
                "--secret-file the hub's?)"
            )
        elif not self.session.welcomed:
            why = (
                "closed the connection without answering MXHHELLO (a relay needs a "
                "maxwellhub hub that speaks batched frames)"
            )
        else:
            why = "closed the connection before STOP or EXIT"
        self.finish(
            EXIT_UPSTREAM,
            f"the upstream hub at {self.where} {why}{self._when()}" + (f" ({exc})" if exc else ""),
        )

    def _when(self) -> str:
        if self.stepping:
            return f" during step {self.steps}"
        return f" after {self.steps} steps" if self.ids is not None else ""

    def finish(self, code: int, message: str, bye: bool = False) -> None:
        """End the session (first call wins) and wake a local step in flight."""
        if self.ended.done():
            return
        self.bye = bye
        self.ended.set_result((code, message))
        if self.stepping:
            self.local.request_stop("because the relay's session ended")

    # -- SessionModel: the local hub
    def answer_challenge(self, nonce: bytes) -> bytes:
        secret = self.relay.secret
        if secret is None:
            raise ProtocolError(
                "it requires authentication (MXHAUTH); give the relay --secret-file or "
                "MAXWELLHUB_SECRET"
            )
        return secret.proof(nonce)

    def claim(self) -> bytes:
        return b""  # a relay is new: it holds no molecules to claim back

    def initialize(self, binding: Binding) -> _Pending:
        self._start(self._initialize(binding.molecule_ids, binding.payloads, binding.resume))
        return PENDING

    def stage(self, fields: np.ndarray, flags: int) -> None:
        self.fields, self.flags = fields, flags

    def commit(self) -> _Pending:
        fields, self.fields = self.fields, None
        if fields is None:  # the session stages before it commits
            raise ProtocolError("GETFORCE without MXHFIELDS since the last step")
        self._start(self._step(fields, self.flags))
        return PENDING

    def unstaged(self) -> dict[str, float]:
        raise ProtocolError("GETFORCE without MXHFIELDS since the last step")

    def answered(self) -> None:
        return  # the relay keeps no checkpoints of its own

    def apply_params(self, event: wire.Params, molecule_ids: list[int]) -> _Pending:
        """MXHPARAMS: the local hub applies it to the local drivers; the answer goes up."""
        self._start(self._params(event))
        return PENDING

    async def _params(self, event: wire.Params) -> None:
        async def apply(op: params_frames.Op) -> None:
            part = self._due(op, event.step)
            if part.molecules:
                await self.local.params.apply(part)

        ack = await params_frames.answer_async(event, apply)
        self._write(self.session.params_answered(ack))

    def _due(self, op: params_frames.Op, step: int) -> params_frames.Op:
        """``op``, made at upstream ``step``, for the local molecules whose state is at
        or before that step. While the upstream replays steps to this relay (MXHRESUME),
        the molecules further on already took that change (their state is after it): a
        replayed kick must not reach them twice. Otherwise every molecule is at the
        relay's step, and all of them take it."""
        ids, steps = self.ids, self.local_steps
        if ids is None or steps is None:  # not resumed: every molecule is at the step
            return op
        return op.restricted(ids[steps <= step].tolist())

    # -- the local side
    def _start(self, coro: Any) -> None:
        self.task = asyncio.ensure_future(coro)
        self.task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        """A local INIT or step that failed unexpectedly ends the session, with the
        reason, instead of leaving the upstream step waiting forever."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self.finish(EXIT_LOCAL, f"the relay failed{self._when()}: {type(exc).__name__}: {exc}")

    async def _initialize(
        self, ids: list[int], payloads: list[dict], offer: dict | None = None
    ) -> None:
        local = self.local
        for mid in ids:  # no payload yet, so binding sends no INIT before the step is set
            local.register_molecule(mid)
        if offer is not None:  # the local drivers are offered the upstream's step
            local.set_molecule_steps(ids, offer["step"])
        local.on_behind = _upstream_replays if offer is not None else None
        try:
            bound = await local.wait_until_bound(
                dict(zip(ids, payloads, strict=True)), timeout=self.relay.timeout
            )
        finally:
            local.on_behind = None
        if not bound:
            if self.ended.done():
                return
            missing = local.missing(ids)
            self.finish(
                EXIT_LOCAL,
                f"local drivers of molecule(s) {ids_text(missing)} "
                f"did not initialise {within(self.relay.timeout)}",
            )
            return
        if self.ended.done():
            return
        self.ids = np.asarray(ids, dtype=np.int64)
        log.info("molecules %d..%d initialised behind the relay", ids[0], ids[-1])
        start = 0
        if offer is not None:
            # The oldest local state decides what the upstream must replay; molecules
            # further on sit those replayed steps out (see _step).
            self.local_steps = local.molecule_steps(ids)
            start, done = int(self.local_steps.min()), offer["step"]
            self.resume_to = self.at = done
            if start < done and done - start <= offer["history"]:
                self.at = start
            elif start < done:
                log.warning(
                    "molecules behind the relay resume from step %d, but the "
                    "upstream hub keeps only %d step(s) of history at step %d: "
                    "continuity is lost for them",
                    start,
                    offer["history"],
                    done,
                )
        self._write(self.session.initialized(start if offer is not None else None))

    async def _step(self, fields: np.ndarray, flags: int) -> None:
        if self.at < self.resume_to:  # a replayed step: only the molecules behind take it
            await self._replayed_step(fields)
            return
        self.at += 1
        try:
            result = await self._local_step(self.ids, fields, flags)
        except StopRequested:
            return  # the session ended while the step waited; finish() said why
        except MaxwellHubError as exc:  # BarrierTimeout above all
            self.finish(EXIT_LOCAL, f"step {self.steps} behind the relay: {exc}")
            return
        extras = self._extras(result, flags)
        self._write(self.session.answered(result.sources, extras))

    async def _replayed_step(self, fields: np.ndarray) -> None:
        """Upstream step ``self.at`` replayed: step the molecules whose state is at or
        before it; the upstream discards the answer, so the rest answer zeros."""
        ids, steps = self.ids, self.local_steps
        if ids is None or steps is None:  # set together by _initialize when resuming
            raise ProtocolError("a replayed step before the local drivers resumed")
        behind = steps <= self.at
        sources = np.zeros((len(ids), 3))
        try:
            result = await self._local_step(ids[behind], fields[behind], 0)
        except StopRequested:
            return
        except MaxwellHubError as exc:
            self.finish(EXIT_LOCAL, f"replayed step {self.at} behind the relay: {exc}")
            return
        sources[behind] = result.sources
        steps[behind] += 1
        self.at += 1
        self._write(self.session.answered(sources, None, counted=False))

    async def _local_step(self, ids: Any, fields: np.ndarray, flags: int) -> StepResult:
        """One local barrier step (no deadline unless the relay has a ``timeout``), asking
        the local drivers what the upstream MXHFIELDS ``flags`` ask (extras, dipoles). A
        lost local driver is waited for, up to ``replace_timeout``, and its replacement
        gets the frozen field; :class:`BarrierTimeout` when none comes."""
        extras = bool(flags & wire.WANT_EXTRAS)
        dipoles = bool(flags & wire.WANT_DIPOLES)
        relay, local = self.relay, self.local
        while True:
            try:
                # unchecked: missing dipoles go upstream as NaN rows; the upstream hub,
                # which asked for them, names the molecules
                return await local.step_arrays_raw(
                    ids, fields, relay.timeout, "abort", extras, dipoles
                )
            except DriverLost as exc:
                log.warning(
                    "the local driver of molecule(s) %s is gone; waiting %s for a replacement "
                    "to connect to the relay at %s",
                    ids_text(exc.molecules),
                    within(relay.replace_timeout),
                    relay.listening,
                )
                came = await local.wait_until_bound(
                    exc.molecules, require_init=False, timeout=relay.replace_timeout
                )
                if not came and not local.paused:  # paused: the next try says StopRequested
                    raise BarrierTimeout(
                        f"no replacement for the local driver of molecule(s) "
                        f"{ids_text(exc.molecules)} connected "
                        f"{within(relay.replace_timeout)}",
                        exc.molecules,
                    ) from None

    def _extras(self, result: StepResult, flags: int) -> dict[str, np.ndarray] | None:
        """The local extras the upstream ``flags`` ask for (all: WANT_EXTRAS; the dipole
        keys only: WANT_DIPOLES; else None) as MXHSOURCES can carry them: ASCII keys of
        at most 64 bytes, at most 64 keys; other keys are dropped with one warning each."""
        if flags & wire.WANT_EXTRAS:
            extras = result.extras()
        elif flags & wire.WANT_DIPOLES:
            dipole_keys = (*wire.DIPOLE_KEYS, *wire.DIPOLE_M_KEYS)
            extras = {k: v for k, v in result.extras().items() if k in dipole_keys}
        else:
            return None
        out: dict[str, np.ndarray] = {}
        for key, values in extras.items():
            if key.isascii() and 0 < len(key) <= _MAX_KEY_BYTES and len(out) < _MAX_EXTRAS_KEYS:
                out[key] = values
            elif key not in self._dropped_keys:
                self._dropped_keys.add(key)
                log.warning(
                    "extras key %r does not fit MXHSOURCES (ASCII, at most "
                    "%d bytes, at most %d keys); it is not passed upstream",
                    key,
                    _MAX_KEY_BYTES,
                    _MAX_EXTRAS_KEYS,
                )
        return out


class Relay:
    """A relay node (see the module docstring).

    ``molecules``: M, how many molecules this relay hosts upstream. Upstream address:
    ``upstream_unix`` (name or path) or ``upstream_host``/``upstream_port``; ``secret``
    answers an upstream hub that requires authentication. Local side: ``local_unix``
    and/or ``local_tcp`` (``(host, port)``, port 0 picks one) and ``local_secret`` to
    require it from local drivers. ``timeout``: seconds for local drivers to connect and
    initialise, for each local step, and for reaching the upstream hub; None (default):
    no deadline, deaths are noticed by the connections. ``replace_timeout``: seconds for a
    lost local driver's replacement to connect (default ``timeout``, or 60 s without one).
    ``history``: steps of fields the local hub keeps to replay to a replacement local
    driver (``Hub(history=...)``; 0 keeps none, and a replacement then continues from its
    own initial or checkpointed state).

    Run it with ``asyncio.run(Relay(...).run())`` (or uvloop); ``run`` returns the exit
    status and logs one ERROR line when it is not 0.
    """

    def __init__(
        self,
        molecules: int,
        *,
        upstream_unix: str | None = None,
        upstream_host: str | None = None,
        upstream_port: int = DEFAULT_PORT,
        local_unix: str | None = None,
        local_tcp: tuple[str, int] | None = None,
        secret: Secret | None = None,
        local_secret: Secret | None = None,
        timeout: float | None = None,
        history: int = 0,
        replace_timeout: float | None = None,
    ) -> None:
        if isinstance(molecules, bool) or not isinstance(molecules, int) or molecules < 1:
            raise UsageError(f"molecules must be an integer >= 1, not {molecules!r}")
        if local_unix is None and local_tcp is None:
            raise UsageError("a relay needs a local address: local_unix and/or local_tcp")
        if upstream_unix is not None and upstream_host is not None:
            raise UsageError("give the upstream hub as upstream_unix or upstream_host, not both")
        self.timeout = check_timeout(timeout)
        replace = check_timeout(replace_timeout, "replace_timeout")
        #: Seconds a lost local driver's replacement has to connect.
        self.replace_timeout = replace or self.timeout or DEFAULT_REPLACE_TIMEOUT
        self.molecules = molecules
        self.upstream_unix = upstream_unix
        self.upstream_host = upstream_host
        self.upstream_port = int(upstream_port)
        self.local_unix = local_unix
        self.local_tcp = local_tcp
        self.secret = secret
        self.local_secret = local_secret
        self.history = history
        self.upstream = _describe_upstream(upstream_unix, upstream_host, self.upstream_port)
        self.local: Hub | None = None
        self.listening = ""
        #: The session's outcome once :meth:`run` returned: (exit status, message).
        self.outcome: tuple[int, str] | None = None

    async def run(self, *, handle_signals: bool = False) -> int:
        """Serve until the upstream ends the session; return the exit status.
        ``handle_signals``: SIGINT/SIGTERM end the relay (status 1) after stopping its
        local drivers."""
        loop = asyncio.get_running_loop()
        session: _Upstream | None = None
        interrupted: asyncio.Future = loop.create_future()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, _resolve, interrupted, sig.name)
        try:
            opening = asyncio.ensure_future(self._open(loop))
            await asyncio.wait({opening, interrupted}, return_when=asyncio.FIRST_COMPLETED)
            if not opening.done():
                opening.cancel()
                await asyncio.gather(opening, return_exceptions=True)
                raise RelayFailed(EXIT_UPSTREAM, f"interrupted by {interrupted.result()}")
            session = opening.result()
            await asyncio.wait({session.ended, interrupted}, return_when=asyncio.FIRST_COMPLETED)
            if not session.ended.done():
                session.finish(
                    EXIT_UPSTREAM,
                    f"interrupted by {interrupted.result()} after {session.steps} steps",
                )
            code, message = session.ended.result()
        except RelayFailed as exc:
            code, message = exc.code, str(exc)
        finally:
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
            await self._shutdown(session)
        self.outcome = (code, message)
        if code == EXIT_OK:
            log.info("%s; local drivers stopped", message)
        else:
            log.error("%s", message)
        return code

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Upstream:
        """Listen locally, wait for the local drivers, connect upstream."""
        where: dict[str, Any]
        if self.local_unix is not None:
            where = {"unixsocket": self.local_unix}
        elif self.local_tcp is not None:
            where = {"host": self.local_tcp[0], "port": self.local_tcp[1]}
        else:  # refused by __init__
            raise RelayFailed(EXIT_PROTOCOL, "a relay needs a local address")
        try:
            # Drivers for all M molecules wait unbound until the upstream INIT names the
            # ids, so the local hub must let that many (and spares) wait.
            local = Hub(
                timeout=self.timeout,
                auth=self.local_secret,
                history=self.history,
                max_spare=self.molecules + _SPARES,
                max_pending=max(4096, 2 * self.molecules),
                **where,
            )
        except (ValueError, TypeError) as exc:  # UsageError is a ValueError
            raise RelayFailed(EXIT_PROTOCOL, f"cannot make the local hub: {exc}") from None
        # Those drivers keep their shared-memory lanes unbound as long, too.
        local.lanes.limit += self.molecules
        try:
            await local.start()
        except (UsageError, OSError) as exc:
            raise RelayFailed(EXIT_PROTOCOL, f"cannot listen for local drivers: {exc}") from None
        self.local = local
        listening = []
        if self.local_unix is not None:
            listening.append(f"unix:{local.unixsocket}")
        if self.local_tcp is not None:
            port = local.port
            if self.local_unix is not None:
                # Both: the same hub also accepts on TCP (drivers join the same molecules).
                host = self.local_tcp[0]
                try:
                    port = await local.listen(host, self.local_tcp[1])
                except OSError as exc:
                    raise RelayFailed(
                        EXIT_PROTOCOL,
                        f"cannot listen for local drivers on TCP {host}:{self.local_tcp[1]}: {exc}",
                    ) from None
                if self.local_secret is None and not is_loopback(host):
                    log.warning(
                        "listening on TCP %s:%d without a local secret: any "
                        "host that can reach it may connect as a driver",
                        host,
                        port,
                    )
            listening.append(f"tcp:{self.local_tcp[0]}:{port}")
        #: Where local drivers connect, for messages (and the local TCP port when 0 was
        #: asked).
        self.listening = " and ".join(listening)
        log.info("waiting for drivers of %d molecules at %s", self.molecules, self.listening)
        have = await local.wait_for_drivers(self.molecules, self.timeout)
        if have < self.molecules:
            raise RelayFailed(
                EXIT_LOCAL,
                f"drivers for only {have} of {self.molecules} "
                f"molecules connected to the relay at "
                f"{self.listening} {within(self.timeout)}",
            )
        log.info(
            "drivers for %d molecules connected; connecting to the upstream hub at %s",
            have,
            self.upstream,
        )
        return await self._connect(loop)

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Upstream:
        """Connect upstream, retrying with backoff (0.05 s doubling to 1 s) until
        ``timeout`` (None: until it answers, saying so on a growing schedule): the upstream
        hub may start later than the relay, in another batch job."""
        backoff = Backoff(self.timeout, clock=loop.time)
        while True:
            try:
                return await asyncio.wait_for(self._connect_once(loop), backoff.attempt_timeout())
            except OSError as exc:  # TimeoutError included
                if (
                    not isinstance(exc, TimeoutError)
                    and exc.errno is not None
                    and exc.errno not in CONNECT_RETRY_ERRNOS
                ):
                    raise RelayFailed(
                        EXIT_UPSTREAM,
                        f"cannot connect to the upstream hub at {self.upstream}: {exc}",
                    ) from None
                why = getattr(exc, "strerror", None) or exc
                delay = backoff.next_delay()
                if delay is None:
                    raise RelayFailed(
                        EXIT_UPSTREAM,
                        f"could not connect to the upstream hub "
                        f"at {self.upstream} {within(self.timeout)} "
                        f"({backoff.tries} attempts; last error: {why})",
                    ) from None
                if backoff.report_due():
                    log.warning(
                        "still cannot reach the upstream hub at %s after %.0f s (%d attempts; "
                        "last error: %s); retrying",
                        self.upstream,
                        backoff.waited,
                        backoff.tries,
                        why,
                    )
                await asyncio.sleep(delay)  # nothing to await before the hub exists

    async def _connect_once(self, loop: asyncio.AbstractEventLoop) -> _Upstream:
        if self.upstream_unix is not None:
            _, session = await loop.create_unix_connection(
                lambda: _Upstream(self, self.upstream), unix_socket_path(self.upstream_unix)
            )
        else:
            _, session = await loop.create_connection(
                lambda: _Upstream(self, self.upstream),
                self.upstream_host or "127.0.0.1",
                self.upstream_port,
            )
        return session

    async def _shutdown(self, session: _Upstream | None) -> None:
        """STOP the local drivers, then BYE upstream (after STOP) and close."""
        task = session.task if session is not None else None
        if task is not None and not task.done() and self.local is not None:
            self.local.request_stop("because the relay's session ended")  # wakes it
            await asyncio.wait({task}, timeout=_LOCAL_STOP_WAIT)
            if not task.done():
                task.cancel()
        if self.local is not None:
            await self.local.stop(wait=_LOCAL_STOP_WAIT)
        if session is not None and session.transport is not None:
            if session.bye and not session.transport.is_closing():
                session.transport.write(_BYE)
            session.transport.close()


def _upstream_replays(driver: Any, start: int, done: int) -> bool:
    """While the relay starts: a local driver restored a state older than the upstream's
    step, which this relay (new, no history) cannot replay: take its step as the truth and
    let the upstream hub replay the missing steps through the relay."""
    log.info(
        "%s resumes from step %d; the upstream hub is asked to replay steps %d..%d",
        driver,
        start,
        start,
        done - 1,
    )
    return True


def _resolve(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)


def run_relay(relay: Relay) -> int:
    """Run ``relay`` on a new event loop (the stdlib's, or $MAXWELLHUB_LOOP);
    return its exit status."""
    from .hub import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(relay.run(handle_signals=True))
