"""The coupling hub: driver connections over TCP or UNIX sockets, molecule binding, and
barrier steps (send every molecule its field, gather every molecule's source).

Two faces, one implementation:

- :class:`Hub` is the asyncio core. It runs on the caller's event loop; one
  asyncio adapter per connection (:class:`~maxwellhub.hub.adapter.DriverProtocol`) feeds
  a sans-I/O :class:`~maxwellhub.protocol.connection.Connection`. Once a driver is initialised its
  socket is read from one epoll set, the steady reader of :mod:`maxwellhub.hub.fastpath`, by the
  same adapter (the loop stays the control plane: handshakes, new connections, timers,
  faults). ``await hub.step(requests)`` is the async barrier. The hub itself listens,
  admits and binds drivers, reports status and takes snapshots; the steps are driven by
  its :class:`~maxwellhub.hub.stepping.Stepper` (``hub.stepper``).
- :class:`SocketHub` is MaxwellLink's synchronous API (``step_barrier``,
  ``wait_until_bound``, ...) for plain functions such as Meep's step callback. It owns a
  private event loop and runs it *in the calling thread* only while one of its methods is
  waiting, so there is no thread, no lock and no polling; a step waits on the steady reader itself
  and runs the loop only when the loop has work. Between calls, new connections wait in
  the kernel's listen backlog.

Barrier contract (kept from MaxwellLink, with its holes closed):

- a step *freezes* the fields it was given; until the step completes, every retry sends
  the same frozen field, whatever the new request says;
- replies already received are kept when another driver fails; a replacement driver bound
  to the same molecule gets the frozen field; healthy drivers are never asked twice;
- ``step_barrier`` returns ``{}`` when paused (stopped), aborted (a driver was lost) or
  incomplete (timeout), and the next call continues the same frozen step;
- ``step`` waits for replacements itself and raises :class:`BarrierTimeout` naming the
  missing molecules when its deadline passes.

This module never converts units and never interprets the extras a driver sends.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from ..errors import UsageError
from ..liveness import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    check_timeout,
    report_delays,
)
from ..net.addresses import DEFAULT_PORT, unix_socket_path
from ..net.listener import Listener, Pending
from ..net.logsummary import PeerLog
from ..net.rendezvous import remove_address_file, write_address_file
from ..net.unix import bind_owner_only, remove_if_ours
from ..protocol import wire
from ..protocol.auth import Secret, is_loopback
from ..protocol.connection import Connection, State
from ..services.control import ControlServer
from . import shm
from .adapter import DriverProtocol, adapter_of
from .barrier import Barrier, StepResult, as_step_arrays, check_policy, checked_dipoles, ids_text
from .fastpath import SteadyReader
from .history import History
from .lane import Resume
from .params import ParamChanges
from .registry import Molecule, Registry
from .stepping import Stepper, StopRequested

__all__ = ["Hub", "StopRequested", "new_event_loop"]

log = logging.getLogger("maxwellhub.hub")

# Connection states (see maxwellhub.protocol.connection.State), by their short names here.
_BOUND = State.BOUND
_READY = State.READY
_CLOSING = State.CLOSING
_CLOSED = State.CLOSED
_MIN_PENDING_CAP = 4096  # connections in the handshake before new ones are refused


def new_event_loop(kind: str | None = None) -> asyncio.AbstractEventLoop:
    """A new event loop: ``"asyncio"`` (the stdlib's), ``"uvloop"`` (when installed), or
    ``None`` for the environment variable MAXWELLHUB_LOOP, else the stdlib's. The stdlib's
    is the default because a steady step can then wait inside the coroutine, watching
    the loop's selector (:meth:`Stepper._wait_inline`); uvloop exposes no selector, so with it
    every step waits in the loop (measured in ``benchmarks/hub_throughput.py``)."""
    kind = kind or os.environ.get("MAXWELLHUB_LOOP") or "asyncio"
    if kind not in ("uvloop", "asyncio"):
        raise UsageError(f"event loop kind {kind!r}: expected 'uvloop' or 'asyncio'")
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _send(conn: Connection, out: list[Any]) -> None:
    if out:
        conn.link.write(out)


class Hub:
    """The asyncio hub. Create it, ``await start()``, register molecules, ``await step()``.

    Parameters mirror :class:`SocketHub`. All coroutines must run on one event loop (the
    one ``start`` ran on). ``auth``: a :class:`maxwellhub.protocol.auth.Secret` (see
    :func:`maxwellhub.protocol.auth.load_secret`); every driver must then prove it holds the same
    secret (MXHAUTH/MXHPROOF) before STATUS and INIT. ``None`` (default): no
    authentication, and the wire is exactly MaxwellLink's. ``address_file``: a path where
    ``start`` publishes the address (:mod:`maxwellhub.net.rendezvous`; removed by ``stop``)
    for drivers started with ``maxwellhub-driver --address-file``. ``dialect``: how
    sessions end. ``"maxwelllink"`` (default) decides per connection: EXIT to stock i-PI
    clients (ASE, i-PI), STOP to the others (see :mod:`maxwellhub.protocol.connection`);
    ``"ipi"`` sends EXIT to every driver.

    ``timeout`` (default None: no deadline) bounds each step and a driver's INIT; a
    driver that dies is noticed by its connection, not by a deadline
    (:mod:`maxwellhub.liveness`). ``handshake_timeout`` bounds how long a new connection
    may take to authenticate and answer its first STATUS; by default
    :data:`~maxwellhub.liveness.DEFAULT_HANDSHAKE_TIMEOUT` (60 s), or ``timeout`` when that
    is shorter. ``shm_lane``: ensemble drivers on the same node that offer it are stepped
    through shared memory (:mod:`maxwellhub.hub.shm`); None (default): on a UNIX socket,
    False: never (TCP never has it).

    ``fast_path`` (default True): initialised drivers' sockets leave the event loop's
    reader set for one epoll set read by a single callback
    (:mod:`maxwellhub.hub.fastpath`); False reads every driver through the loop.

    The step contract :class:`SocketHub` drives its steps with (``begin_step``,
    ``finish_step``, ``stop_waiting``, ``step_due_at``, ``step_due``, ``outcome``,
    ``requests_to_arrays``) and the connections' reply callbacks (``source_ready``,
    ``sources_batch``, ``pending_field``) are the methods of the hub's
    :class:`~maxwellhub.hub.stepping.Stepper` (``hub.stepper``), bound on the hub.
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = DEFAULT_PORT,
        unixsocket: str | os.PathLike[str] | None = None,
        timeout: float | None = None,
        *,
        limits: wire.Limits | None = None,
        dialect: str = "maxwelllink",
        backlog: int = 4096,
        auth: Secret | None = None,
        control: str | os.PathLike[str] | None = None,
        history: int = 0,
        max_pending: int | None = None,
        max_spare: int = 256,
        address_file: str | os.PathLike[str] | None = None,
        handshake_timeout: float | None = None,
        shm_lane: bool | None = None,
        fast_path: bool = True,
    ) -> None:
        if dialect not in ("maxwelllink", "ipi"):
            raise UsageError(f"dialect must be 'maxwelllink' or 'ipi', not {dialect!r}")
        self.timeout = check_timeout(timeout)
        handshake = check_timeout(handshake_timeout, "handshake_timeout")
        if handshake is None:
            handshake = min(DEFAULT_HANDSHAKE_TIMEOUT, self.timeout or math.inf)
        #: Seconds a new connection has to authenticate and answer its first STATUS.
        self.handshake_timeout = handshake
        self.host = host or "127.0.0.1"
        self.port = DEFAULT_PORT if port is None else int(port)
        self.unixsocket = None if unixsocket is None else unix_socket_path(unixsocket)
        self.limits = limits or wire.Limits()
        self.dialect = dialect
        self.backlog = backlog
        if auth is not None and not isinstance(auth, Secret):
            raise UsageError(
                "auth must be a maxwellhub.protocol.auth.Secret (from load_secret), not "
                f"{type(auth).__name__}"
            )
        self.auth = auth
        #: Ensemble drivers that offer it are stepped through shared memory
        #: (:mod:`maxwellhub.hub.shm`): None (default) on a UNIX socket, False never.
        self.shm_lane = shm_lane
        #: The lanes offered to connections not bound yet, capped (hub/shm.py).
        self.lanes = shm.PendingLanes()
        self.step_index = 0
        self.paused = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The steady drivers' sockets (:mod:`maxwellhub.hub.fastpath`), once started;
        #: None with ``fast_path=False`` (every read through the event loop).
        self.steady: SteadyReader | None = None
        self.fast_path = fast_path
        self._server: Listener | None = None
        self._extra: list[Listener] = []  # more listeners (Hub.listen)
        self._unix_inode: tuple[int, int] | None = None
        self.registry = Registry(max_spare)
        self.continuity = History(history)
        self._connections: set[Connection] = set()
        # connected, not yet answered STATUS; oldest first (evicted first at max_pending)
        self._handshaking = Pending()
        #: Rate-limits log lines about peers that host no molecule into summaries with
        #: exact counts (:mod:`maxwellhub.net.logsummary`); installed by ``start``.
        self.peer_log: PeerLog | None = None
        self._accepted = 0
        self._changed: asyncio.Future[Any] | None = None
        self.control = control  # where to serve maxwellhub.control, or None
        self._control: ControlServer | None = None
        # maxwellhub.net.rendezvous: written once listening, removed at stop
        self.address_file = None if address_file is None else os.fspath(address_file)
        self._address_run_id: str | None = None
        self._stop_reason: str | None = None
        self.history = history
        self.max_pending = max_pending  # None: max(4096, 2 x registered molecules)

        #: Policy for a restored driver behind the hub's count that the window cannot
        #: replay: ``on_behind(conn, start, done)`` returning True takes its ``start`` as
        #: its molecules' count (a relay whose upstream hub replays the rest); None or
        #: False goes on from its state and says continuity is lost.
        self.on_behind: Callable[[Connection, int, int], bool] | None = None
        self._watched: Iterable[Any] | Callable[[], Iterable[Any]] = ()  # watch_processes
        #: Parameter changes and kicks sent to drivers, logged for replay (hub/params.py).
        self.params = ParamChanges(self)
        #: The step machinery (:mod:`maxwellhub.hub.stepping`). Its own bound methods are
        #: the hub's step contract and the connections' reply callbacks: no call in between.
        stepper = self.stepper = Stepper(self, report_delays)
        self.begin_step = stepper.begin_step
        self.finish_step = stepper.finish_step
        self.stop_waiting = stepper.stop_waiting
        self.step_due_at = stepper.step_due_at
        self.step_due = stepper.step_due
        self.outcome = stepper.outcome
        self.requests_to_arrays = stepper.requests_to_arrays
        self.source_ready = stepper.source_ready
        self.sources_batch = stepper.sources_batch
        self.pending_field = stepper.pending_field

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str | tuple[str, int]:
        """The UNIX socket path, or ``(host, port)`` for TCP."""
        return self.unixsocket if self.unixsocket else (self.host, self.port)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop ``start`` ran on; a :class:`UsageError` before ``start``."""
        if self._loop is None:
            raise UsageError("this Hub is not started: await hub.start() first")
        return self._loop

    async def start(self) -> None:
        """Bind and listen. A live hub already on the same UNIX path is an error."""
        self._loop = asyncio.get_running_loop()
        if self.peer_log is None:
            self.peer_log = PeerLog(log, self._is_stranger, later=self._loop.call_later)
        self.peer_log.install()
        if self.fast_path and self.steady is None:
            self.steady = SteadyReader(self._loop)
        server: Listener
        if self.unixsocket:
            path = self.unixsocket
            sock, self._unix_inode = bind_owner_only(path, self.backlog)
            server = self._server = self._listener(sock)
            log.info(
                "hub listening on UNIX socket %s (drivers on this node only; to open it to "
                "other nodes use TCP: host='0.0.0.0' or this node's address, with "
                "auth=load_secret(...))",
                path,
            )
        else:
            server = self._server = self._listener(
                Listener.tcp_socket(self.host, self.port, self.backlog)
            )
            self.port = server.sockets[0].getsockname()[1]
            log.info(
                "hub listening on TCP %s:%d (a loopback address serves this node only; to "
                "open it to other nodes bind host='0.0.0.0' or this node's address, with "
                "auth=load_secret(...))",
                self.host,
                self.port,
            )
            if self.auth is None and not is_loopback(self.host):
                log.warning(
                    "hub listening on TCP %s:%d without authentication: any host "
                    "that can reach it may connect (give a secret: auth=load_secret"
                    "(...))",
                    self.host,
                    self.port,
                )
        if self.control is not None:
            control = ControlServer(self, self.control)
            try:
                await control.start()
            except BaseException:
                server.close()
                self._remove_unix_path()
                raise
            self._control = control
        if self.address_file is not None:
            try:
                self._write_address_file()
            except BaseException:
                if self._control is not None:
                    await self._control.close()
                    self._control = None
                server.close()
                self._remove_unix_path()
                raise

    def _write_address_file(self) -> None:
        """Publish the address (and the secret file's location) for drivers started with
        ``--address-file``; see :mod:`maxwellhub.net.rendezvous`."""
        if self.address_file is None:
            return
        source = self.auth.source if self.auth is not None else None
        info = write_address_file(
            self.address_file,
            address=self.address,
            auth=self.auth is not None,
            secret_file=source if source and os.path.isfile(source) else None,
        )
        self._address_run_id = info.run_id
        log.info("hub address written to %s (run %s)", self.address_file, info.run_id)

    def _listener(self, sock: socket.socket) -> Listener:
        return Listener(
            self.loop,
            sock,
            self._new_driver,
            self._room_for,
            lambda: len(self._handshaking),
            backlog=self.backlog,
            failures=self._strangers_dropped,
        )

    async def listen(self, host: str, port: int) -> int:
        """Also accept drivers on TCP ``host:port`` (after :meth:`start`; 0 picks a free
        port, returned), with the same admission control as the main address."""
        sock = Listener.tcp_socket(host, port, self.backlog)
        self._extra.append(self._listener(sock))
        return int(sock.getsockname()[1])

    def _new_driver(self) -> DriverProtocol:
        self._accepted += 1
        return DriverProtocol(self, self._accepted)

    def _connection_made(self, conn: Connection) -> None:
        self._connections.add(conn)
        self._handshaking.add(conn)

    def _room_for(self) -> bool:
        """Make room for another connection's handshake (see ``max_pending``): evict the
        connection longest in its handshake when the cap is reached."""
        cap = self.max_pending or max(_MIN_PENDING_CAP, 2 * len(self.registry))
        while len(self._handshaking) >= cap:
            oldest: Connection = self._handshaking.pop_oldest()
            oldest.fail(
                f"evicted before answering STATUS: {cap} connections are in the handshake "
                "(max_pending); the one waiting longest makes room"
            )
        return True

    def _strangers_dropped(self) -> int:
        """WARNING/ERROR lines so far about connections hosting no molecule (drops)."""
        return self.peer_log.seen if self.peer_log is not None else 0

    def _is_stranger(self, arg: object) -> bool:
        """Whether a log record's first argument is a connection of this hub hosting no
        molecule (its lines are rate-limited by :attr:`peer_log`)."""
        return isinstance(arg, Connection) and arg.hub is self and not arg.molecules

    async def graceful_shutdown(self, reason: str | None = None, wait: float = 2.0) -> None:
        """Send STOP (or EXIT) to every driver and wait up to ``wait`` s for their BYE."""
        if reason:
            log.info("shutting down: %s", reason)
        self.paused = True
        for server in self._listeners():
            server.close()
        byes = [adapter_of(d).send_end() for d in list(self._connections) if d.state != _CLOSING]
        if byes:
            _, pending = await asyncio.wait(byes, timeout=wait)
            if pending:
                names = sorted(str(d) for d in self._connections if d.state == _CLOSING)
                log.warning("no BYE within %.1f s from: %s", wait, ", ".join(names))

    async def stop(self, wait: float = 2.0) -> None:
        """Stop accepting, end every driver politely, close every socket, remove the path."""
        if self._loop is None:
            return
        if self._address_run_id is not None and self.address_file is not None:
            # first, so no new driver is sent here
            remove_address_file(self.address_file, self._address_run_id)
            self._address_run_id = None
        if self._control is not None:
            control, self._control = self._control, None
            await control.close()
        if not self.paused or any(d.state != _CLOSING for d in self._connections):
            await self.graceful_shutdown(wait=wait)
        for d in list(self._connections):
            # STOP unanswered: EXIT (an i-PI client ignores STOP)
            _send(d, d.exit_after_stop())
            adapter_of(d).abort()
        for server in self._listeners():
            server.close()
            await server.wait_closed()
        # Let connection_lost callbacks run so nothing refers to a dead transport.
        await asyncio.sleep(0)
        if self.peer_log is not None:
            self.peer_log.remove()  # its last summary; the counts stay for status()
        if self.steady is not None:
            self.steady.close()
            self.steady = None
        self.stepper.disarm()
        self._remove_unix_path()
        self.stepper.wake("stopped")

    def _listeners(self) -> list[Listener]:
        return ([self._server] if self._server is not None else []) + self._extra

    def _remove_unix_path(self) -> None:
        if self.unixsocket:
            remove_if_ours(self.unixsocket, self._unix_inode)
        self._unix_inode = None

    # ------------------------------------------------------------------ molecules

    def register_molecule(self, molecule_id: int, init: Mapping[str, Any] | None = None) -> None:
        """Reserve a slot for ``molecule_id`` (its driver may connect later)."""
        mol = self.registry.register(int(molecule_id), init)
        self.stepper.payloads_known = False
        self.continuity.grow(mol.index + 1)
        self._progress_binds()

    def register_molecule_return_id(self, init: Mapping[str, Any] | None = None) -> int:
        """Reserve a slot with the next free id and return it."""
        mid = self.registry.next_free_id()
        self.register_molecule(mid, init)
        return mid

    @property
    def _molecules(self) -> dict[int, Molecule]:
        return self.registry.molecules

    def all_bound(self, molecule_ids: Iterable[int], require_init: bool = True) -> bool:
        """True when every id has a driver (that completed INIT, if ``require_init``)."""
        return self.registry.all_bound(molecule_ids, require_init)

    def missing(self, molecule_ids: Iterable[int]) -> list[int]:
        """The ids among ``molecule_ids`` that have no initialised driver."""
        return self.registry.missing(molecule_ids)

    async def wait_until_bound(
        self,
        init_payloads: Mapping[int, Mapping[str, Any]] | Iterable[int],
        require_init: bool = True,
        timeout: float | None = None,
    ) -> bool:
        """Wait until every id in ``init_payloads`` is bound (and initialised); ids not
        registered yet are registered. True when they are; False when ``timeout`` passed,
        a stop was requested (:meth:`request_stop`) or a process given to
        :meth:`watch_processes` exited.

        ``timeout`` None (the default, as in MaxwellLink) waits until the drivers come,
        however long: who is missing is logged after 30 s, then at doubling intervals up
        to 30 min."""
        payloads = (
            dict(init_payloads)
            if isinstance(init_payloads, Mapping)
            else {int(m): None for m in init_payloads}
        )
        timeout = check_timeout(timeout)
        for mid, payload in payloads.items():
            mol = self._molecules.get(int(mid))
            if mol is None:
                self.register_molecule(int(mid), payload)
            elif payload is not None:
                mol.payload = dict(payload)
        self._progress_binds()
        for mid in payloads:
            self._ensure_init(self._molecules[int(mid)].driver)
        loop = self.loop
        deadline = None if timeout is None else loop.time() + timeout
        ids = list(payloads)
        reports = _Reports(loop, lambda elapsed: self._report_unbound(ids, require_init, elapsed))
        watch = _ExitWatch(self, self._watched() if callable(self._watched) else self._watched)
        try:
            while not self.all_bound(ids, require_init):
                if watch.exited() or not await self._wait_change(deadline):
                    return self.all_bound(ids, require_init)
            return True
        finally:
            reports.cancel()
            watch.close()

    def watch_processes(
        self, processes: Iterable[Any] | Callable[[], Iterable[Any]] | None
    ) -> None:
        """Local driver processes (``subprocess.Popen``, or anything with ``pid`` and
        ``poll()``) whose exit ends every bind wait at once, so a driver that dies before
        it binds or initialises is noticed without a deadline: a collection, or a function
        giving the ones to watch when a wait starts (say, without those already replaced);
        None watches nothing. A process that dies after binding needs no watch: its
        connection closes."""
        self._watched = () if processes is None else processes

    def _report_unbound(self, ids: list[int], require_init: bool, elapsed: float) -> None:
        """One line on who a bind wait still waits for: a WARNING while some molecule has
        no driver, INFO while the drivers are only initialising."""
        absent, starting = self.registry.unbound_report(ids, require_init)
        if not absent and not starting:
            return
        parts = [f"no driver connected for molecule(s) {ids_text(absent)}"] if absent else []
        if starting:
            parts.append(f"the drivers of {ids_text(starting)} are initialising")
        log.log(
            logging.WARNING if absent else logging.INFO,
            "still waiting after %.0f s: %s",
            elapsed,
            "; ".join(parts),
        )

    async def _wait_change(self, deadline: float | None) -> bool:
        """Wait for any binding change until ``deadline`` (loop time; None: no deadline);
        False if the deadline passed or the hub is paused (a stop was requested)."""
        if self.paused:
            return False
        loop = self.loop
        if self._changed is None or self._changed.done():
            self._changed = loop.create_future()
        fut = self._changed
        # shield: a cancelled waiter (Ctrl-C in SocketHub) must not cancel the shared future
        if deadline is None:
            return await asyncio.shield(fut)
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        timer = loop.call_later(remaining, _resolve, fut, False)
        try:
            return await asyncio.shield(fut)
        finally:
            timer.cancel()

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(True)

    # ------------------------------------------------------------------ binding

    # -- the connections' callbacks (maxwellhub.protocol.connection.HubCallbacks)

    def driver_available(self, driver: Connection) -> None:
        """A new connection answered STATUS: bind it when molecules are free."""
        self._handshaking.discard(driver)
        refusal = self.registry.offer(driver)
        if refusal is not None:
            # Spare drivers wait for a molecule to free up; a bounded number of them.
            driver.fail(refusal)
            return
        self._progress_binds()
        self._notify()  # wait_for_drivers counts waiting connections

    def _progress_binds(self) -> None:
        """Bind waiting connections (see :mod:`maxwellhub.hub.registry` for the order)."""
        if not self.registry.unbound:
            return
        for driver in self.registry.progress():
            log.info("%s bound%s", driver, " (claimed)" if driver.claim else "")
            self._ensure_init(driver)
            self._notify()

    def waiting_molecules(self) -> int:
        """Molecules that the connections waiting for a binding could host."""
        return self.registry.waiting_molecules()

    async def wait_for_drivers(self, molecules: int, timeout: float | None) -> int:
        """Wait until connections able to host ``molecules`` molecules wait for a binding,
        before any molecule id is known, or until ``timeout`` s passed (None: no deadline;
        how many came is logged on the schedule of
        :func:`maxwellhub.liveness.report_delays`); return how many they can host."""
        loop = self.loop
        deadline = None if timeout is None else loop.time() + timeout
        reports = _Reports(
            loop,
            lambda elapsed: log.warning(
                "still waiting after %.0f s: drivers for %d of %d molecules connected",
                elapsed,
                self.waiting_molecules(),
                molecules,
            ),
        )
        try:
            while (have := self.waiting_molecules()) < molecules:
                if not await self._wait_change(deadline):
                    return self.waiting_molecules()
            return have
        finally:
            reports.cancel()

    def _ensure_init(self, driver: Connection | None) -> None:
        """Send INIT once the payload of every molecule of ``driver`` is known (or a
        step needs it now: then a missing payload is sent as ``{}``)."""
        if driver is None or driver.state != _BOUND:
            return
        barrier = self.stepper.barrier
        for mol in driver.molecules:
            if mol.payload is None:
                if barrier is None or mol.id not in barrier.layout.row:
                    return
                mol.payload = {}
        _send(driver, driver.send_init())

    # ------------------------------------------------------------------ continuity

    def replay_offer(self, conn: Connection) -> tuple[int, int]:
        """(steps ``conn``'s first molecule completed, how many of them can be replayed)."""
        first = conn.molecules[0]
        return self.continuity.offer(first.index, first.id)

    def driver_ready(self, driver: Connection) -> None:
        """INIT acknowledged: bring a restored driver to the molecules' current step by
        replaying the steps it missed, then serve it (see the module's continuity notes)."""
        first = driver.molecules[0]
        done = self.continuity.steps(first.index)
        start = driver.resume_step
        reported = start is not None
        start = start or 0
        if start > done:
            driver.fail(
                f"MXHRESUME says its state belongs to step {start}, but the hub "
                f"has completed only {done} step(s) of molecule {first.id}"
            )
            return
        fields: list[npt.NDArray[Any]] | None = []
        if start < done:
            ids = [m.id for m in driver.molecules]
            fields = self.continuity.fields(ids, driver.batch is not None, start, done)
            if fields is None:
                self._unreplayable(driver, start, done, reported)
            else:
                log.info(
                    "%s: replaying %d missed step(s) %d..%d from the hub's history",
                    driver,
                    len(fields),
                    start,
                    done - 1,
                )
        # the logged parameter changes go in at their steps (hub/params.py)
        driver.replay = self.params.replay(driver, start, done, fields)
        if driver.replay:
            _send(driver, driver.send_replay())
            return
        driver.state = _READY
        self.driver_initialized(driver)

    def _unreplayable(self, driver: Connection, start: int, done: int, reported: bool) -> None:
        """A driver's state is behind and the history does not reach back to it: the
        documented policy is to go on from that state, saying so once (or, when
        :attr:`on_behind` says so, to take its step as the molecules' count)."""
        if self.on_behind is not None and self.on_behind(driver, start, done):
            self.continuity.set_steps([m.index for m in driver.molecules], start)
            return
        log.warning(
            "%s resumes from step %d (%s) but the hub is at step %d and keeps fields for "
            "replay only from step %d: it continues from its state of step %d, so "
            "continuity is lost for %s",
            driver,
            start,
            "its checkpoint"
            if reported and start
            else "its initial state"
            if reported
            else "it sent no MXHRESUME, so its initial state is assumed",
            done,
            done - self.replay_offer(driver)[1],
            start,
            "it" if driver.batch is None else "these molecules",
        )

    def set_molecule_steps(self, molecule_ids: Iterable[int], step: int) -> None:
        """Declare that the molecules have completed ``step`` steps elsewhere (a relay
        passing on its upstream hub's count): drivers binding them are offered that step."""
        self.continuity.set_steps([self._molecules[int(m)].index for m in molecule_ids], step)

    def molecule_steps(self, molecule_ids: Iterable[int]) -> npt.NDArray[Any]:
        """How many steps each molecule has completed (int64 array)."""
        return np.array(
            [self.continuity.steps(self._molecules[int(m)].index) for m in molecule_ids],
            dtype=np.int64,
        )

    def snapshot(self) -> dict[str, npt.NDArray[Any]]:
        """The hub's part of a run checkpoint, as plain arrays (``np.savez`` them; load
        with ``allow_pickle=False``): the step counter, every molecule's completed steps
        and the replay history. Take it between steps."""
        if self.stepper.barrier is not None:
            raise UsageError("snapshot() in the middle of a step; take it between steps")
        ids = np.fromiter(self._molecules, dtype=np.int64, count=len(self._molecules))
        return (
            {"step_index": np.array(self.step_index, dtype=np.int64)}
            | self.continuity.snapshot(ids)
            | self.params.snapshot()
        )

    def restore(self, snapshot: Mapping[str, npt.NDArray[Any]]) -> None:
        """Continue from :meth:`snapshot`: call it after registering the same molecules and
        before any step. Drivers that then bind are told each molecule's step (INIT) and
        replayed what their checkpoints miss."""
        if self.stepper.barrier is not None or self.step_index:
            raise UsageError("restore() must come before the first step")
        try:
            step_index = int(snapshot["step_index"])
        except KeyError as exc:
            raise UsageError(f"hub snapshot lacks {exc.args[0]!r}") from None
        slot = {m.id: m.index for m in self._molecules.values()}
        self.continuity.restore(snapshot, slot, self.stepper.new_layout)
        self.params.restore(snapshot)
        self.step_index = step_index

    def driver_initialized(self, driver: Connection) -> None:
        """INIT (and any replay) done: a replacement gets the frozen field(s)."""
        for mol in driver.molecules:
            mol.initialized = True
        if self.steady is not None and isinstance(driver.link, DriverProtocol):
            self.steady.claim(driver.link)  # steady now: its reads leave the event loop
        self.stepper.serve(driver)
        self._notify()

    def connection_lost(self, driver: Connection, previous: State, exc: Exception | None) -> None:
        """A connection closed: its molecules wait for a replacement."""
        self.params.lost(driver)
        self._connections.discard(driver)
        self._handshaking.discard(driver)
        mols = self.registry.release(driver)
        if not mols:
            buffered = driver.buffered
            if buffered and previous not in (_CLOSING, _CLOSED) and not driver.reported:
                # A peer that leaves half a message behind gets its one line (a peer that
                # merely connects and closes is not worth one).
                log.warning(
                    "%s closed the connection in the middle of a message (%d bytes of it received)",
                    driver,
                    buffered,
                )
            return
        barrier = self.stepper.barrier
        if previous != _CLOSING:
            pending: list[int] = []
            if barrier is not None and driver.place(barrier.layout):
                rows = driver.rows if driver.batch is not None else [driver.row]
                ids, done = barrier.layout.ids[rows], barrier.done[rows]
                pending = ids[~done].tolist()
            log.warning(
                "%s disconnected%s%s",
                driver,
                " in the middle of a step" if pending else "",
                f" ({exc})" if exc else "",
            )
            if pending and barrier is not None:
                barrier.lost.extend(pending)
                if barrier.abort_on_loss:
                    barrier.wake("lost")
        self._progress_binds()
        self._notify()

    def params_answered(self, driver: Connection, sequence: int, error: str | None) -> None:
        """A driver answered a parameter change (see :mod:`maxwellhub.hub.params`)."""
        self.params.answered(driver, sequence, error)

    async def set_params(
        self, molecule_ids: int | Iterable[int], changes: Mapping[str, Any]
    ) -> None:
        """Change model parameters of socket molecules between steps: MXHPARAMS to their
        drivers, every answer awaited (the hub's ``timeout``). Logged with the step and
        replayed to a replacement driver. :class:`~maxwellhub.hub.params.ParameterRefused`
        names the molecule and parameter a driver refused; a :class:`UsageError` names a
        molecule whose driver does not speak the extension (plain i-PI, MaxwellLink)."""
        await self.params.apply(self.params.set_params_op(molecule_ids, changes))

    async def apply_kick(self, molecule_ids: int | Iterable[int], impulse: Any) -> None:
        """Kick socket molecules between steps with ``impulse`` delta(t) (a 3-vector,
        a.u.); as :meth:`set_params`."""
        await self.params.apply(self.params.kick_op(molecule_ids, impulse))

    async def apply_requested_params(self) -> int:
        """Apply the changes asked through the control endpoint (``SetParams``), in order,
        between steps; how many. Couplings call it at every step boundary."""
        return await self.params.apply_requested()

    async def step_barrier(
        self, requests: Mapping[int, Mapping[str, Any]], timeout: float | None = None
    ) -> dict[int, dict[str, Any]]:
        """MaxwellLink's barrier: ``{molid: {"amp": ndarray(3), "extra": bytes}}``, or ``{}``
        when paused, aborted by a lost driver, or incomplete at ``timeout``."""
        out = await self._dict_step(requests, timeout, True)
        if isinstance(out, dict):
            return out
        return out.as_dict() if out is not None else {}

    async def step(
        self,
        requests: Mapping[int, Mapping[str, Any]],
        timeout: float | None = None,
        on_lost: str = "wait",
    ) -> dict[int, dict[str, Any]]:
        """The barrier with a deadline. ``on_lost`` is the policy when a molecule has no
        driver: ``"wait"`` for a replacement until ``timeout``, then raise
        :class:`BarrierTimeout` naming the missing molecules; ``"abort"`` raise
        :class:`DriverLost` at once, naming them (the frozen step is kept either way)."""
        abort = check_policy(on_lost)
        out = await self._dict_step(requests, timeout, abort)
        if type(out) is dict:
            return out
        return self.outcome(cast("StepResult | None", out), abort, timeout).as_dict()

    async def _dict_step(
        self, requests: Mapping[int, Mapping[str, Any]], timeout: float | None, abort: bool
    ) -> dict[int, dict[str, Any]] | StepResult | None:
        """A step of MaxwellLink's request dict: the result dict when the steady lane made
        the step whole, else the barrier's result (None: incomplete, see ``outcome``)."""
        lane = self.stepper.lane
        out = lane.step(requests, timeout) if lane is not None else None
        if type(out) is dict:
            return out
        if isinstance(out, Resume):  # written, then handed over: the frozen step goes on
            return await self.stepper.run(None, None, out.timeout, abort)
        ids, fields = self.requests_to_arrays(requests)  # validated here, once
        return await self.stepper.run(ids, fields, timeout, abort)

    async def step_arrays(
        self,
        ids: Any,
        fields: Any,
        timeout: float | None = None,
        on_lost: str = "wait",
        extras: bool = True,
        dipoles: bool = False,
    ) -> StepResult:
        """The barrier in array form: ``ids`` (N,), ``fields`` (N, 3) a.u. -> a
        :class:`StepResult` (sources row for row). Same policies as :meth:`step`.

        ``extras=False`` tells ensemble drivers not to send their extras arrays;
        ``dipoles=True`` asks them for the dipole arrays at least (``mux_au``, ``muy_au``,
        ``muz_au``, and ``mux_m_au``... when reported; MXHFIELDS flag WANT_DIPOLES), so
        ``extras=False, dipoles=True`` gives the dipoles alone in ``result.extras()``.
        Single drivers send all their extras every step, dipoles included. When dipoles
        were asked and a molecule's did not come (an ensemble driver older than
        WANT_DIPOLES, a model without them), the step is complete (the hub moved on) and
        :class:`ProtocolError` names the molecules."""
        result = await self.step_arrays_raw(ids, fields, timeout, on_lost, extras, dipoles)
        return checked_dipoles(result, dipoles)

    async def step_arrays_raw(
        self,
        ids: Any,
        fields: Any,
        timeout: float | None,
        on_lost: str,
        extras: bool,
        dipoles: bool,
    ) -> StepResult:
        """:meth:`step_arrays` without the check that the dipoles came (a relay passes
        them upstream as they are; the upstream hub checks)."""
        abort = check_policy(on_lost)
        lane = self.stepper.lane
        if lane is not None and ids is not None:
            out = lane.step_arrays(ids, fields, timeout, extras, dipoles)
            if isinstance(out, StepResult):
                return out
            if isinstance(out, Resume):  # written, then handed over: the frozen step goes on
                result = await self.stepper.run(None, None, out.timeout, abort, extras, dipoles)
                return self.outcome(result, abort, timeout)
        if self.stepper.barrier is None and ids is not None:
            ids, fields = as_step_arrays(ids, fields)
        result = await self.stepper.run(ids, fields, timeout, abort, extras, dipoles)
        return self.outcome(result, abort, timeout)

    def status(self, most: int | None = None) -> dict[str, Any]:
        """A snapshot for humans and the control endpoint. ``most`` caps the ``bound`` and
        ``missing`` id lists (their full lengths are in ``bound_count``/``missing_count``).
        ``time_per_step_ms`` is over the last 10,000 completed steps (first field sent to
        last source received); ``slowest_molecules`` are the ids whose reply most often
        completed a step."""
        bound = sorted(m.id for m in self._molecules.values() if m.initialized)
        missing = sorted(m.id for m in self._molecules.values() if not m.initialized)
        times = self.stepper.step_ms
        timing: dict[str, float | None] = {"last": None, "mean": None, "p99": None}
        timing["steps"] = len(times)
        if times:
            arr = np.fromiter(times, dtype=np.float64, count=len(times))
            timing.update(
                last=round(times[-1], 4),
                mean=round(float(arr.mean()), 4),
                p99=round(float(np.percentile(arr, 99)), 4),
            )
        return {
            "step": self.step_index,
            "molecules": len(self._molecules),
            "bound_count": len(bound),
            "missing_count": len(missing),
            "bound": bound if most is None else bound[:most],
            "missing": missing if most is None else missing[:most],
            "connections": len(self._connections),
            # stock i-PI clients (EXIT at the end) and those of them served with STATUS
            # before every step instead of the fused fast path
            "stock_clients": sum(d.stock for d in self._connections),
            "status_each_step": sum(d.status_each_step for d in self._connections),
            "in_step": self.stepper.barrier is not None,
            "time_per_step_ms": timing,
            "slowest_molecules": [
                {"id": m, "times_last": n} for m, n in self.stepper.last_to_answer.most_common(5)
            ],
            # new connections (maxwellhub.net.listener) and log lines about peers
            "listeners": [dict(server.counts) for server in self._listeners()],
            "peer_lines": self.peer_log.counts() if self.peer_log is not None else None,
        }

    @property
    def in_step(self) -> bool:
        """Whether a step is frozen (begun and not complete)."""
        return self.stepper.barrier is not None

    @property
    def _barrier(self) -> Barrier | None:
        """The frozen step, or None (:attr:`Stepper.barrier`)."""
        return self.stepper.barrier

    # ------------------------------------------------------------------ control

    @property
    def stop_requested(self) -> str | None:
        """Why a stop was requested (:meth:`request_stop`), or None."""
        return self._stop_reason

    @property
    def control_address(self) -> str | None:
        """The control endpoint as ``maxwellhub status`` takes it, or None."""
        return self._control.describe() if self._control is not None else None

    def request_stop(self, reason: str = "on request") -> None:
        """End the run politely: the current and every later barrier call ends (``step``
        and ``step_arrays`` raise :class:`StopRequested`, ``step_barrier`` returns ``{}``,
        ``wait_until_bound`` returns False). Drivers are left to :meth:`stop`."""
        if self._stop_reason is None:
            self._stop_reason = reason
            log.warning("stop requested %s at step %d", reason, self.step_index)
        self.paused = True
        self.stepper.wake("stopped")
        self._notify()


class _Reports:
    """Calls ``say(seconds waited)`` on the schedule of
    :func:`maxwellhub.liveness.report_delays` until cancelled (one timer at a time)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, say: Callable[[float], None]) -> None:
        self.loop, self.say = loop, say
        self.start = loop.time()
        self._delays = report_delays()
        self._timer = loop.call_at(self.start + next(self._delays), self._fire)

    def _fire(self) -> None:
        self.say(self.loop.time() - self.start)
        self._timer = self.loop.call_at(self.start + next(self._delays), self._fire)

    def cancel(self) -> None:
        self._timer.cancel()


class _ExitWatch:
    """Wakes a hub's waits (:meth:`Hub._notify`) when one of ``processes`` exits: a pidfd
    per live process, read by the event loop, so nothing polls. Where pidfds are missing
    (not Linux >= 5.3) the exit is still seen by :meth:`exited` at the next wake-up."""

    def __init__(self, hub: Hub, processes: Iterable[Any]) -> None:
        self.hub = hub
        self.processes = list(processes)
        self._fds: list[int] = []
        for proc in self.processes:
            if proc.poll() is not None:
                continue
            try:
                fd = os.pidfd_open(proc.pid)
            except (OSError, AttributeError):  # gone meanwhile, or no pidfd here
                continue
            self._fds.append(fd)
            hub.loop.add_reader(fd, self._exited, fd)

    def _exited(self, fd: int) -> None:
        self.hub.loop.remove_reader(fd)  # a pidfd stays readable once its process exited
        self.hub._notify()

    def exited(self) -> bool:
        return any(proc.poll() is not None for proc in self.processes)

    def close(self) -> None:
        for fd in self._fds:
            self.hub.loop.remove_reader(fd)
            os.close(fd)
        self._fds = []


def _resolve(fut: asyncio.Future[Any], value: object) -> None:
    """Set ``fut``'s result unless it is done already (a timer racing another wake-up)."""
    if not fut.done():
        fut.set_result(value)
