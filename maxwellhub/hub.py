"""The coupling hub: driver connections over TCP or UNIX sockets, molecule binding, and
barrier steps (send every molecule its field, gather every molecule's source).

Two faces, one implementation:

- :class:`Hub` is the asyncio core. It runs on the caller's event loop; one
  :class:`asyncio.Protocol` per connection feeds :class:`maxwellhub.wire.Decoder`.
  ``await hub.step(requests)`` is the async barrier.
- :class:`SocketHub` is MaxwellLink's synchronous API (``step_barrier``,
  ``wait_until_bound``, ...) for plain functions such as Meep's step callback. It owns a
  private event loop (uvloop when installed) and runs it *in the calling thread* only while
  one of its methods is waiting, so there is no thread, no lock and no polling. Between
  calls, new connections wait in the kernel's listen backlog.

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
import errno
import json
import logging
import math
import os
import socket
import stat
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from . import wire
from .addresses import DEFAULT_PORT, unix_socket_path
from .errors import BarrierTimeout, DriverLost, ProtocolError, UsageError
from .mpi import am_master

__all__ = ["Hub", "SocketHub", "new_event_loop"]

log = logging.getLogger("maxwellhub.hub")

# Connection states. Each names what the hub waits for on that connection.
_PROBE = "probe"          # STATUS sent before binding; expect READY or NEEDINIT
_UNBOUND = "unbound"      # answered; waiting for a molecule to bind to
_BOUND = "bound"          # bound, INIT not sent yet (no payload known)
_INIT = "init"            # INIT + STATUS sent; expect READY
_READY = "ready"          # initialised and idle
_BUSY = "busy"            # field sent; expect FORCEREADY
_CLOSING = "closing"      # STOP or EXIT sent; expect BYE or close
_CLOSED = "closed"

_STOP_BYTES = wire.encode_header(wire.STOP)
_EXIT_BYTES = wire.encode_header(wire.EXIT)
_STATUS_BYTES = wire.encode_header(wire.STATUS)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop when uvloop is installed, else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"INIT payload value {obj!r} of type {type(obj).__name__} is not JSON")


def _field3(mid: int, value: Any) -> tuple[float, float, float]:
    try:
        ex, ey, ez = (float(x) for x in np.asarray(value, dtype=np.float64).reshape(3))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"molecule {mid}: efield_au must be 3 numbers, got {value!r}") from exc
    if not (math.isfinite(ex) and math.isfinite(ey) and math.isfinite(ez)):
        raise UsageError(f"molecule {mid}: efield_au is not finite: {(ex, ey, ez)}")
    return ex, ey, ez


class _Molecule:
    """A registered molecule id and the driver (if any) bound to it."""

    __slots__ = ("id", "driver", "payload", "initialized")

    def __init__(self, mid: int) -> None:
        self.id = mid
        self.driver: _Driver | None = None
        self.payload: dict | None = None
        self.initialized = False


class _Barrier:
    """One frozen step: the fields sent and the replies received so far."""

    __slots__ = ("fields", "results", "waiting", "waiter", "abort_on_loss", "lost")

    def __init__(self, fields: dict[int, tuple[float, float, float]]) -> None:
        self.fields = fields
        self.results: dict[int, dict] = {}
        self.waiting = len(fields)
        self.waiter: asyncio.Future | None = None
        self.abort_on_loss = False
        self.lost: list[int] = []

    def wake(self, why: str) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(why)


class _Driver(asyncio.Protocol):
    """One driver connection: feeds bytes to the codec and reports events to the hub."""

    def __init__(self, hub: Hub, number: int) -> None:
        self.hub = hub
        self.number = number
        self.decoder = wire.Decoder("hub", hub.limits)
        self.transport: asyncio.Transport | None = None
        self.state = _PROBE
        self.molecule: _Molecule | None = None
        self.peer = f"driver#{number}"
        self.dialect = hub.dialect
        self.bye: asyncio.Future | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None

    # -- naming, for log lines that point at the culprit
    def __str__(self) -> str:
        mol = f" molecule {self.molecule.id}" if self.molecule is not None else ""
        return f"{self.peer}{mol}"

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"driver#{self.number} ({peer[0]}:{peer[1]})"
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.hub._connections.add(self)
        self.transport.write(_STATUS_BYTES)
        self._handshake_timer = self.hub._loop.call_later(
            self.hub.timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        try:
            for event in self.decoder.feed(data):
                self._on_event(event)
        except ProtocolError as exc:
            self.fail(str(exc))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        previous, self.state = self.state, _CLOSED
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self.bye is not None and not self.bye.done():
            self.bye.set_result(False)
        self.hub._connection_lost(self, previous, exc)

    # -- protocol
    def fail(self, why: str) -> None:
        """Drop this connection for a protocol violation, with one log line naming it."""
        if self.state == _CLOSED:
            return
        log.error("dropping %s: %s", self, why)
        if self.transport is not None:
            self.transport.abort()

    def _handshake_expired(self) -> None:
        if self.state in (_PROBE, _INIT):
            self.fail(f"no answer to STATUS within {self.hub.timeout:g} s")

    def _on_event(self, event: wire.Event) -> None:
        kind = type(event)
        state = self.state
        if kind is wire.ForceReady and state == _BUSY:
            self.state = _READY
            self.hub._source_ready(self, event)
        elif kind is wire.Ready and state == _INIT:
            self.state = _READY
            self._cancel_handshake()
            self.hub._driver_initialized(self)
        elif kind in (wire.Ready, wire.NeedInit) and state == _PROBE:
            self.state = _UNBOUND
            self._cancel_handshake()
            self.hub._driver_available(self)
        elif kind is wire.Bye and state == _CLOSING:
            if self.bye is not None and not self.bye.done():
                self.bye.set_result(True)
            self.transport.close()
        else:
            name = _EVENT_NAMES.get(kind, kind.__name__)
            self.fail(f"unexpected {name} while {_EXPECTING[state]}")

    def _cancel_handshake(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def send_init(self, mid: int, payload: dict) -> None:
        body = json.dumps({**payload, "molecule_id": mid}, default=_json_default).encode()
        self.state = _INIT
        self.transport.write(wire.encode_init(mid, body) + _STATUS_BYTES)
        self._handshake_timer = self.hub._loop.call_later(
            self.hub.timeout, self._handshake_expired)

    def send_field(self, field3: tuple[float, float, float]) -> None:
        self.state = _BUSY
        self.transport.write(wire.encode_field_step(field3))

    def send_end(self) -> asyncio.Future:
        """STOP (MaxwellLink dialect, answered by BYE) or EXIT (stock i-PI, no answer)."""
        self.bye = self.hub._loop.create_future()
        if self.state == _CLOSED:
            self.bye.set_result(False)
            return self.bye
        self.state = _CLOSING
        if self.dialect == "ipi":
            self.transport.write(_EXIT_BYTES)
            self.bye.set_result(True)
        else:
            self.transport.write(_STOP_BYTES)
        return self.bye


_EVENT_NAMES = {wire.Ready: "READY", wire.NeedInit: "NEEDINIT", wire.HaveData: "HAVEDATA",
                wire.ForceReady: "FORCEREADY", wire.Bye: "BYE"}
_EXPECTING = {_PROBE: "waiting for the answer to STATUS",
              _UNBOUND: "waiting for a molecule to bind to (nothing was asked)",
              _BOUND: "bound and waiting for INIT (nothing was asked)",
              _INIT: "waiting for READY after INIT",
              _READY: "idle (nothing was asked)",
              _BUSY: "waiting for FORCEREADY",
              _CLOSING: "waiting for BYE",
              _CLOSED: "closed"}


class Hub:
    """The asyncio hub. Create it, ``await start()``, register molecules, ``await step()``.

    Parameters mirror :class:`SocketHub`. All coroutines must run on one event loop (the
    one ``start`` ran on).
    """

    def __init__(self, host: str | None = None, port: int | None = DEFAULT_PORT,
                 unixsocket: str | os.PathLike | None = None, timeout: float = 60.0,
                 *, limits: wire.Limits | None = None, dialect: str = "maxwelllink",
                 backlog: int = 4096) -> None:
        if dialect not in ("maxwelllink", "ipi"):
            raise UsageError(f"dialect must be 'maxwelllink' or 'ipi', not {dialect!r}")
        if timeout is None or not timeout > 0:
            raise UsageError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.host = host or "127.0.0.1"
        self.port = DEFAULT_PORT if port is None else int(port)
        self.unixsocket = None if unixsocket is None else unix_socket_path(unixsocket)
        self.timeout = float(timeout)
        self.limits = limits or wire.Limits()
        self.dialect = dialect
        self.backlog = backlog
        self.step_index = 0
        self.paused = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._unix_inode: tuple[int, int] | None = None
        self._molecules: dict[int, _Molecule] = {}
        self._next_id = 0
        self._unbound: deque[_Driver] = deque()
        self._connections: set[_Driver] = set()
        self._accepted = 0
        self._barrier: _Barrier | None = None
        self._changed: asyncio.Future | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str | tuple[str, int]:
        """The UNIX socket path, or ``(host, port)`` for TCP."""
        return self.unixsocket if self.unixsocket else (self.host, self.port)

    async def start(self) -> None:
        """Bind and listen. A live hub already on the same UNIX path is an error."""
        self._loop = asyncio.get_running_loop()
        if self.unixsocket:
            path = self.unixsocket
            _clear_stale_unix_socket(path)
            old_umask = os.umask(0o177)  # the socket file is born owner-only (0600)
            try:
                self._server = await self._loop.create_unix_server(
                    self._new_driver, path=path, backlog=self.backlog)
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
            st = os.stat(path)
            self._unix_inode = (st.st_dev, st.st_ino)
            log.info("hub listening on UNIX socket %s", path)
        else:
            self._server = await self._loop.create_server(
                self._new_driver, host=self.host, port=self.port, backlog=self.backlog,
                reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]
            log.info("hub listening on TCP %s:%d", self.host, self.port)

    def _new_driver(self) -> _Driver:
        self._accepted += 1
        return _Driver(self, self._accepted)

    async def graceful_shutdown(self, reason: str | None = None, wait: float = 2.0) -> None:
        """Send STOP (or EXIT) to every driver and wait up to ``wait`` s for their BYE."""
        if reason:
            log.info("shutting down: %s", reason)
        self.paused = True
        if self._server is not None:
            self._server.close()
        byes = [d.send_end() for d in list(self._connections) if d.state != _CLOSING]
        if byes:
            done, pending = await asyncio.wait(byes, timeout=wait)
            if pending:
                names = sorted(str(d) for d in self._connections if d.state == _CLOSING)
                log.warning("no BYE within %.1f s from: %s", wait, ", ".join(names))

    async def stop(self, wait: float = 2.0) -> None:
        """Stop accepting, end every driver politely, close every socket, remove the path."""
        if self._loop is None:
            return
        if not self.paused or any(d.state != _CLOSING for d in self._connections):
            await self.graceful_shutdown(wait=wait)
        for d in list(self._connections):
            if d.transport is not None:
                d.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # Let connection_lost callbacks run so nothing refers to a dead transport.
        await asyncio.sleep(0)
        self._remove_unix_path()
        if self._barrier is not None:
            self._barrier.wake("stopped")

    def _remove_unix_path(self) -> None:
        if not self.unixsocket or self._unix_inode is None:
            return
        try:
            st = os.stat(self.unixsocket)
            if (st.st_dev, st.st_ino) == self._unix_inode:
                os.unlink(self.unixsocket)
        except FileNotFoundError:
            pass
        self._unix_inode = None

    # ------------------------------------------------------------------ molecules

    def register_molecule(self, molecule_id: int, init: Mapping | None = None) -> None:
        """Reserve a slot for ``molecule_id`` (its driver may connect later)."""
        mid = int(molecule_id)
        if mid in self._molecules:
            raise ValueError(f"Molecule ID {mid} already registered!")
        mol = self._molecules[mid] = _Molecule(mid)
        if init is not None:
            mol.payload = dict(init)
        self._progress_binds()

    def register_molecule_return_id(self, init: Mapping | None = None) -> int:
        """Reserve a slot with the next free id and return it."""
        while self._next_id in self._molecules:
            self._next_id += 1
        mid = self._next_id
        self.register_molecule(mid, init)
        return mid

    def all_bound(self, molecule_ids: Iterable[int], require_init: bool = True) -> bool:
        """True when every id has a driver (that completed INIT, if ``require_init``)."""
        for mid in molecule_ids:
            mol = self._molecules.get(int(mid))
            if mol is None or mol.driver is None:
                return False
            if require_init and not mol.initialized:
                return False
        return True

    def missing(self, molecule_ids: Iterable[int]) -> list[int]:
        """The ids among ``molecule_ids`` that have no initialised driver."""
        return [int(m) for m in molecule_ids
                if (mol := self._molecules.get(int(m))) is None or not mol.initialized]

    async def wait_until_bound(self, init_payloads: Mapping[int, Mapping] | Iterable[int],
                               require_init: bool = True,
                               timeout: float | None = None) -> bool:
        """Wait until every id in ``init_payloads`` is bound (and initialised); False on
        timeout. Ids not registered yet are registered."""
        payloads = (dict(init_payloads) if isinstance(init_payloads, Mapping)
                    else {int(m): None for m in init_payloads})
        for mid, payload in payloads.items():
            mol = self._molecules.get(int(mid))
            if mol is None:
                self.register_molecule(int(mid), payload)
            elif payload is not None:
                mol.payload = dict(payload)
        self._progress_binds()
        for mid in payloads:
            self._ensure_init(self._molecules[int(mid)])
        deadline = self._loop.time() + (self.timeout if timeout is None else timeout)
        while not self.all_bound(payloads, require_init):
            if not await self._wait_change(deadline):
                return self.all_bound(payloads, require_init)
        return True

    async def _wait_change(self, deadline: float) -> bool:
        """Wait for any binding change until ``deadline``; False if the deadline passed."""
        remaining = deadline - self._loop.time()
        if remaining <= 0 or self.paused:
            return False
        if self._changed is None or self._changed.done():
            self._changed = self._loop.create_future()
        fut = self._changed
        timer = self._loop.call_later(remaining, lambda: fut.done() or fut.set_result(False))
        try:
            return await fut
        finally:
            timer.cancel()

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(True)

    # ------------------------------------------------------------------ binding

    def _driver_available(self, driver: _Driver) -> None:
        self._unbound.append(driver)
        self._progress_binds()

    def _progress_binds(self) -> None:
        """Bind waiting anonymous drivers to free molecule ids, in registration order."""
        if not self._unbound:
            return
        for mol in self._molecules.values():
            if mol.driver is not None:
                continue
            driver = None
            while self._unbound and driver is None:
                candidate = self._unbound.popleft()
                if candidate.state == _UNBOUND:
                    driver = candidate
            if driver is None:
                return
            mol.driver, driver.molecule, driver.state = driver, mol, _BOUND
            mol.initialized = False
            log.info("%s bound to molecule %d", driver.peer, mol.id)
            self._ensure_init(mol)
            self._notify()

    def _ensure_init(self, mol: _Molecule) -> None:
        driver = mol.driver
        if driver is None or driver.state != _BOUND:
            return
        payload = mol.payload
        if payload is None and self._barrier is not None and mol.id in self._barrier.fields:
            payload = {}
        if payload is not None:
            driver.send_init(mol.id, payload)

    def _driver_initialized(self, driver: _Driver) -> None:
        mol = driver.molecule
        mol.initialized = True
        barrier = self._barrier
        if barrier is not None and mol.id in barrier.fields and mol.id not in barrier.results:
            driver.send_field(barrier.fields[mol.id])  # a replacement gets the frozen field
        self._notify()

    def _connection_lost(self, driver: _Driver, previous: str, exc: Exception | None) -> None:
        self._connections.discard(driver)
        mol = driver.molecule
        if mol is None or mol.driver is not driver:
            return
        mol.driver = None
        mol.initialized = False
        barrier = self._barrier
        if previous != _CLOSING:
            pending = barrier is not None and mol.id in barrier.fields \
                and mol.id not in barrier.results
            log.warning("%s disconnected%s%s", driver,
                        " in the middle of a step" if pending else "",
                        f" ({exc})" if exc else "")
            if pending:
                barrier.lost.append(mol.id)
                if barrier.abort_on_loss:
                    barrier.wake("lost")
        self._progress_binds()
        self._notify()

    def _source_ready(self, driver: _Driver, event: wire.ForceReady) -> None:
        barrier = self._barrier
        mid = driver.molecule.id
        if barrier is None or mid not in barrier.fields or mid in barrier.results:
            driver.fail("FORCEREADY for a step that was not asked")
            return
        if event.forces.shape[0] != 1:
            driver.fail(f"SOURCEREADY carries nat = {event.forces.shape[0]}, the EM profile "
                        "needs 1")
            return
        barrier.results[mid] = {"amp": event.forces[0], "extra": event.extras}
        barrier.waiting -= 1
        if barrier.waiting == 0:
            barrier.wake("done")

    # ------------------------------------------------------------------ barrier

    def _freeze(self, requests: Mapping[int, Mapping]) -> _Barrier:
        fields = {}
        for key, req in requests.items():
            mid = int(key)
            mol = self._molecules.get(mid)
            if mol is None:
                raise UsageError(f"molecule {mid} is not registered with this hub")
            try:
                efield = req["efield_au"]
            except (KeyError, TypeError):
                raise UsageError(f"molecule {mid}: request lacks 'efield_au'") from None
            fields[mid] = _field3(mid, efield)
            init = req.get("init")
            if init is not None and mol.payload is None:
                mol.payload = dict(init)
        return _Barrier(fields)

    async def _run_barrier(self, requests: Mapping[int, Mapping], timeout: float | None,
                           abort_on_loss: bool) -> dict[int, dict] | None:
        """Run (or continue) the frozen step. The results when complete, else None."""
        if self.paused:
            return None
        barrier = self._barrier
        if barrier is None:
            barrier = self._barrier = self._freeze(requests)
        barrier.abort_on_loss = abort_on_loss
        barrier.lost.clear()
        self._progress_binds()
        for mid, field3 in barrier.fields.items():
            if mid in barrier.results:
                continue
            mol = self._molecules[mid]
            driver = mol.driver
            if driver is None:
                if abort_on_loss:
                    barrier.lost.append(mid)
                continue
            if driver.state == _READY:
                driver.send_field(field3)
            elif driver.state == _BOUND:
                self._ensure_init(mol)
        if barrier.waiting and not (abort_on_loss and barrier.lost):
            barrier.waiter = self._loop.create_future()
            wait = self.timeout if timeout is None else timeout
            timer = self._loop.call_later(wait, barrier.wake, "timeout")
            try:
                await barrier.waiter
            finally:
                timer.cancel()
                barrier.waiter = None
        if barrier.waiting:
            return None
        self._barrier = None
        self.step_index += 1
        return barrier.results

    async def step_barrier(self, requests: Mapping[int, Mapping],
                           timeout: float | None = None) -> dict[int, dict]:
        """MaxwellLink's barrier: ``{molid: {"amp": ndarray(3), "extra": bytes}}``, or ``{}``
        when paused, aborted by a lost driver, or incomplete at ``timeout``."""
        return await self._run_barrier(requests, timeout, abort_on_loss=True) or {}

    async def step(self, requests: Mapping[int, Mapping], timeout: float | None = None,
                   on_lost: str = "wait") -> dict[int, dict]:
        """The barrier with a deadline. ``on_lost`` is the policy when a molecule has no
        driver: ``"wait"`` for a replacement until ``timeout``, then raise
        :class:`BarrierTimeout` naming the missing molecules; ``"abort"`` raise
        :class:`DriverLost` at once, naming them (the frozen step is kept either way)."""
        if on_lost not in ("wait", "abort"):
            raise UsageError(f"on_lost must be 'wait' or 'abort', not {on_lost!r}")
        abort = on_lost == "abort"
        results = await self._run_barrier(requests, timeout, abort_on_loss=abort)
        if results is not None:
            return results
        barrier = self._barrier
        if barrier is None or self.paused:
            raise BarrierTimeout("the hub is stopped; no step can complete")
        if abort and barrier.lost:
            lost = sorted(set(barrier.lost))
            raise DriverLost(f"step {self.step_index}: the driver of molecule(s) {lost} is "
                             "gone and the policy is to abort")
        missing = sorted(set(barrier.fields) - set(barrier.results))
        unbound = [m for m in missing if self._molecules[m].driver is None]
        wait = self.timeout if timeout is None else timeout
        raise BarrierTimeout(
            f"step {self.step_index}: no source from molecule(s) {missing} within {wait:g} s"
            + (f"; no driver connected for {unbound}" if unbound else ""), missing)

    def status(self) -> dict:
        """A snapshot for humans and the control endpoint."""
        return {
            "step": self.step_index,
            "molecules": len(self._molecules),
            "bound": sorted(m.id for m in self._molecules.values() if m.initialized),
            "missing": sorted(m.id for m in self._molecules.values() if not m.initialized),
            "connections": len(self._connections),
            "in_step": self._barrier is not None,
        }


def _clear_stale_unix_socket(path: str) -> None:
    """Remove a leftover socket file only after a probe shows nobody listens on it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise UsageError(f"cannot probe existing socket {path}: {exc}") from exc
        log.info("removing stale socket file %s (nobody listens)", path)
        os.unlink(path)
    else:
        raise UsageError(f"another hub is listening on {path}; choose another name or "
                         "stop that hub first")
    finally:
        probe.close()


class SocketHub:
    """MaxwellLink's synchronous ``SocketHub`` API on top of :class:`Hub`.

    Parameters
    ----------
    host : TCP address to bind (default ``127.0.0.1``); ignored with ``unixsocket``.
    port : TCP port (default 31415; 0 picks a free one, see :attr:`port`).
    unixsocket : a bare name (``/tmp/socketmxl_<name>``) or a path for a UNIX socket.
    timeout : seconds a step, a bind or a handshake may take before giving up.
    latency : accepted for compatibility with MaxwellLink and ignored: this hub waits on
        events, it never sleeps between polls.

    On MPI ranks other than 0 the object is inert (no socket, ``step_barrier`` returns
    ``{}``): only rank 0 talks to drivers. Use it as a context manager, or call
    :meth:`stop`.
    """

    def __init__(self, host: str | None = None, port: int | None = DEFAULT_PORT,
                 unixsocket: str | os.PathLike | None = None, timeout: float = 60.0,
                 latency: float = 0.01, **options: Any) -> None:
        self.latency = latency
        self.timeout = timeout
        self._is_master = am_master()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.hub: Hub | None = None
        if not self._is_master:
            return
        self.hub = Hub(host, port, unixsocket, timeout, **options)
        self._loop = new_event_loop()
        try:
            self._run(self.hub.start())
        except BaseException:
            self._loop.close()
            self._loop = None
            raise

    def _run(self, coro):
        loop = self._loop
        if loop is None:
            coro.close()
            raise UsageError("this SocketHub is stopped (or not on MPI rank 0)")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None:
            coro.close()
            raise UsageError("SocketHub's synchronous methods cannot run inside a running "
                             "event loop; use maxwellhub.Hub and await its methods")
        return loop.run_until_complete(coro)

    # -- attributes
    @property
    def port(self) -> int | None:
        return self.hub.port if self.hub else None

    @property
    def address(self):
        return self.hub.address if self.hub else None

    @property
    def step_index(self) -> int:
        return self.hub.step_index if self.hub else 0

    @property
    def paused(self) -> bool:
        return self.hub.paused if self.hub else True

    # -- API
    def register_molecule(self, molecule_id: int, init: Mapping | None = None) -> None:
        if self.hub:
            self.hub.register_molecule(molecule_id, init)

    def register_molecule_return_id(self, init: Mapping | None = None) -> int:
        if self.hub:
            return self.hub.register_molecule_return_id(init)
        raise UsageError("register_molecule_return_id is only available on MPI rank 0")

    def all_bound(self, molecule_ids: Iterable[int], require_init: bool = True) -> bool:
        if self.hub is None:
            return False
        if self._loop is not None and not self._loop.is_closed():
            self._run(asyncio.sleep(0))  # let pending connections and replies be read
        return self.hub.all_bound(molecule_ids, require_init)

    def wait_until_bound(self, init_payloads, require_init: bool = True,
                         timeout: float | None = None) -> bool:
        if self.hub is None:
            return False
        return self._run(self.hub.wait_until_bound(init_payloads, require_init, timeout))

    def step_barrier(self, requests: Mapping[int, Mapping],
                     timeout: float | None = None) -> dict[int, dict]:
        if self.hub is None or self._loop is None:
            return {}  # not rank 0, or stopped: the "paused" case of the contract
        return self._run(self.hub.step_barrier(requests, timeout))

    def step(self, requests: Mapping[int, Mapping], timeout: float | None = None,
             on_lost: str = "wait") -> dict[int, dict]:
        """The barrier with a deadline; see :meth:`Hub.step` (raises instead of ``{}``)."""
        if self.hub is None:
            raise UsageError("step is only available on MPI rank 0")
        return self._run(self.hub.step(requests, timeout, on_lost))

    def status(self) -> dict:
        return self.hub.status() if self.hub else {}

    def graceful_shutdown(self, reason: str | None = None, wait: float = 2.0) -> None:
        if self.hub is not None and self._loop is not None:
            self._run(self.hub.graceful_shutdown(reason, wait))

    def stop(self) -> None:
        """Stop accepting, end drivers (STOP/EXIT, short wait for BYE), close everything."""
        if self.hub is None or self._loop is None:
            return
        loop = self._loop
        try:
            self._run(self.hub.stop())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            self._loop = None
            loop.close()

    def __enter__(self) -> SocketHub:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __del__(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed() and not loop.is_running():
            try:
                self.stop()
            except Exception:
                pass
