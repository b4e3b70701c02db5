"""The synchronous face of the hub: MaxwellLink's ``SocketHub`` API for plain functions
such as Meep's step callback, on the public step contract of :class:`maxwellhub.hub.Hub`
(``begin_step`` / ``finish_step``). It owns a private event loop and runs it *in the
calling thread* only while one of its methods waits: no thread, no lock, no polling. A
step waits on the steady drivers' sockets directly
(:meth:`maxwellhub.hub.fastpath.SteadyReader.wait`, one epoll wait per wake-up) and
runs one loop iteration only when the loop has work: a new connection, a handshake, the
control endpoint, a timer."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from ..errors import UsageError
from ..net.addresses import DEFAULT_PORT
from ..parallel.mpi import am_master
from .barrier import StepResult, as_step_arrays, check_policy, checked_dipoles
from .core import Hub, new_event_loop
from .fastpath import can_wait_detached
from .lane import Resume, SteadyLane

__all__ = ["SocketHub"]


_T = TypeVar("_T")


class SocketHub:
    """MaxwellLink's synchronous ``SocketHub`` API on top of :class:`Hub`.

    Parameters
    ----------
    host : TCP address to bind (default ``127.0.0.1``); ignored with ``unixsocket``.
    port : TCP port (default 31415; 0 picks a free one, see :attr:`port`).
    unixsocket : a bare name (``/tmp/socketmxl_<name>``) or a path for a UNIX socket.
    timeout : seconds a step may take before ``step_barrier`` returns ``{}`` (``step``
        raises :class:`BarrierTimeout`); None (default) waits as long as the drivers
        compute. A driver that dies is noticed by its connection at once, a vanished host
        within 2 minutes (TCP keepalive, :mod:`maxwellhub.liveness`); a step or bind that
        waits long logs who it waits for. ``wait_until_bound(timeout=None)`` waits until
        the drivers come, whatever this is (as MaxwellLink's does). Every wait ends at
        Ctrl-C (KeyboardInterrupt) and at the control endpoint's stop.
    handshake_timeout : seconds a new connection may take to authenticate and answer its
        first STATUS (default 60, or ``timeout`` when shorter).
    latency : accepted for compatibility with MaxwellLink and ignored: this hub waits on
        events, it never sleeps between polls.
    loop : ``"asyncio"`` (default, or env MAXWELLHUB_LOOP) or ``"uvloop"``: the event loop
        run in the calling thread during each call. uvloop re-creates its signal wake-up
        socket pair on every ``run_until_complete`` in the main thread (measured +35 us per
        step), which is why this facade defaults to the stdlib loop; the async
        :class:`Hub` runs on whatever loop you run it on (``uvloop.run`` recommended).

    control : a name (``/tmp/maxwellhub_control_<name>``), a path, or ``host:port``: serve
        the control endpoint (:mod:`maxwellhub.control`: status, ping, authenticated stop).
        It is served while a method of this object waits, i.e. during every step and bind.

    address_file : a path where the hub publishes its address once listening (a
        :mod:`maxwellhub.net.rendezvous` file, removed at :meth:`stop`), for drivers started
        with ``maxwellhub-driver --address-file PATH`` (another job, an array job, MPMD).

    On MPI ranks other than 0 the object is inert (no socket, ``step_barrier`` returns
    ``{}``): only rank 0 talks to drivers. Use it as a context manager, or call
    :meth:`stop`.
    """

    _detached = False

    def __init__(
        self,
        host: str | None = None,
        port: int | None = DEFAULT_PORT,
        unixsocket: str | os.PathLike[str] | None = None,
        timeout: float | None = None,
        latency: float = 0.01,
        loop: str | None = None,
        address_file: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        self.latency = latency
        self.timeout = timeout
        self._is_master = am_master()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.hub: Hub | None = None
        if not self._is_master:
            return
        self.hub = Hub(host, port, unixsocket, timeout, address_file=address_file, **options)
        self._loop = new_event_loop(loop or os.environ.get("MAXWELLHUB_LOOP") or "asyncio")
        try:
            self._run(self.hub.start())
        except BaseException:
            self._loop.close()
            self._loop = None
            raise
        # Steps wait on the steady reader directly (no loop iteration per step) when this loop
        # allows it; between calls the steady reader is detached (see _run).
        self._detached = self.hub.steady is not None and can_wait_detached(self._loop)
        self._detach()

    def _detach(self) -> None:
        if self._detached and self.hub is not None and self.hub.steady is not None:
            self.hub.steady.detach()

    def _attach(self) -> None:
        if self.hub is not None and self.hub.steady is not None:
            self.hub.steady.attach()

    def _check_no_running_loop(self) -> None:
        if asyncio._get_running_loop() is not None:
            raise UsageError(
                "SocketHub's synchronous methods cannot run inside a running "
                "event loop; use maxwellhub.Hub and await its methods"
            )

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise UsageError("this SocketHub is stopped (or not on MPI rank 0)")
        try:
            self._check_no_running_loop()
        except UsageError:
            coro.close()
            raise
        task = loop.create_task(coro)
        self._attach()  # the loop serves the steady reader while it runs a coroutine
        try:
            return loop.run_until_complete(task)
        except BaseException:
            # Interrupted (Ctrl-C raises KeyboardInterrupt out of the loop): end the wait
            # here, so that it does not resume inside a later call.
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(task)
            raise
        finally:
            self._detach()

    # -- attributes
    @property
    def port(self) -> int | None:
        return self.hub.port if self.hub else None

    @property
    def address(self) -> str | tuple[str, int] | None:
        return self.hub.address if self.hub else None

    @property
    def step_index(self) -> int:
        return self.hub.step_index if self.hub else 0

    @property
    def paused(self) -> bool:
        """MaxwellLink's meaning: stopped, or (once stepping has begun) some registered
        molecule's driver is down, until a replacement binds."""
        hub = self.hub
        if hub is None or hub.paused:
            return True
        return hub.step_index > 0 and bool(hub.registry.driverless)

    @property
    def stop_requested(self) -> str | None:
        return self.hub.stop_requested if self.hub else None

    @property
    def control_address(self) -> str | None:
        return self.hub.control_address if self.hub else None

    # --- MaxwellLink compatibility ---
    # Attributes MaxwellLink 0.5.0's own code reads on its hub, with the same meaning.
    @property
    def unixsocket_path(self) -> str | None:
        """The UNIX socket file the hub listens on (None for TCP), as MaxwellLink's."""
        return self.hub.unixsocket if self.hub else None

    @property
    def expected(self) -> set[int]:
        """The registered molecule ids (a copy: register with ``register_molecule``)."""
        return set(self.hub.registry.molecules) if self.hub else set()

    @property
    def host(self) -> str | None:
        """The TCP address bound (None for a UNIX socket or off rank 0)."""
        return self.hub.host if self.hub and not self.hub.unixsocket else None

    # --- end MaxwellLink compatibility ---

    # -- API
    def register_molecule(self, molecule_id: int, init: Mapping[str, Any] | None = None) -> None:
        if self.hub:
            self.hub.register_molecule(molecule_id, init)

    def register_molecule_return_id(self, init: Mapping[str, Any] | None = None) -> int:
        if self.hub:
            return self.hub.register_molecule_return_id(init)
        raise UsageError("register_molecule_return_id is only available on MPI rank 0")

    def all_bound(self, molecule_ids: Iterable[int], require_init: bool = True) -> bool:
        """Whether every id has a driver (that completed INIT, if ``require_init``). Read
        from the hub's state directly when they are (the steady state, no event-loop
        round trip); otherwise the loop runs once so that pending connections and
        replies are read, since a caller polling this between sleeps has no other way
        to let them in."""
        if self.hub is None:
            return False
        ids = molecule_ids if isinstance(molecule_ids, list | tuple) else list(molecule_ids)
        if self.hub.all_bound(ids, require_init):
            return True
        if self._loop is not None and not self._loop.is_closed():
            self._run(asyncio.sleep(0))  # let pending connections and replies be read
        return self.hub.all_bound(ids, require_init)

    def wait_until_bound(
        self,
        init_payloads: Any,
        require_init: bool = True,
        timeout: float | None = None,
    ) -> bool:
        """See :meth:`Hub.wait_until_bound`: ``timeout`` None waits until the drivers
        come (not the hub's ``timeout``), logging who is missing; it ends early, with
        False, at a stop request or when a watched process exits."""
        if self.hub is None:
            return False
        return bool(self._run(self.hub.wait_until_bound(init_payloads, require_init, timeout)))

    def watch_processes(
        self, processes: Iterable[Any] | Callable[[], Iterable[Any]] | None
    ) -> None:
        """See :meth:`Hub.watch_processes` (nothing on ranks other than 0)."""
        if self.hub is not None:
            self.hub.watch_processes(processes)

    def _barrier(
        self,
        ids: Any,
        fields: Any,
        timeout: float | None,
        abort: bool,
        want_extras: bool = True,
        dipoles: bool = False,
    ) -> StepResult | None:
        """One barrier attempt without a Task: dispatch synchronously, then run the loop
        only until this step's waiter resolves (the hot path of Meep's step callback)."""
        self._check_no_running_loop()
        hub, loop = self._live()
        steady = hub.steady if self._detached else None
        barrier = hub.begin_step(
            ids, fields, timeout, abort, want_extras, dipoles, timers=steady is None
        )
        if barrier is not None and barrier.waiter is not None:
            try:
                if steady is not None:
                    steady.wait(
                        barrier.waiter.done,
                        lambda: hub.step_due_at(barrier),
                        lambda: hub.step_due(barrier),
                    )
                else:
                    loop.run_until_complete(barrier.waiter)
            except BaseException:  # Ctrl-C: the step stays frozen, its timer must not fire
                hub.stop_waiting(barrier)
                raise
        return hub.finish_step(barrier)

    def _live(self) -> tuple[Hub, asyncio.AbstractEventLoop]:
        """The hub and its loop; a :class:`UsageError` when stopped or not on rank 0."""
        if self.hub is None or self._loop is None:
            raise UsageError("this SocketHub is stopped (or not on MPI rank 0)")
        return self.hub, self._loop

    def step_barrier(
        self, requests: Mapping[int, Mapping[str, Any]], timeout: float | None = None
    ) -> dict[int, dict[str, Any]]:
        if self.hub is None or self._loop is None:
            return {}  # not rank 0, or stopped: the "paused" case of the contract
        out = self._dict_step(requests, timeout, True)
        if isinstance(out, dict):
            return out
        return out.as_dict() if out is not None else {}

    def _dict_step(
        self, requests: Mapping[int, Mapping[str, Any]], timeout: float | None, abort: bool
    ) -> dict[int, dict[str, Any]] | StepResult | None:
        """A step of MaxwellLink's request dict: the result dict when the steady lane made
        the step whole, else the barrier's result (None: incomplete, see ``outcome``)."""
        lane = self._lane()
        out = lane.step(requests, timeout) if lane is not None else None
        if type(out) is dict:
            return out
        if isinstance(out, Resume):  # written, then handed over: the frozen step goes on
            return self._barrier(None, None, out.timeout, abort)
        hub, _ = self._live()
        ids, fields = hub.requests_to_arrays(requests)  # validated here, once
        return self._barrier(ids, fields, timeout, abort)

    def _lane(self) -> SteadyLane | None:
        """The stepper's steady lane when this hub waits detached (see
        :mod:`maxwellhub.hub.lane`), else None."""
        hub = self.hub
        if hub is None or not self._detached or hub.stepper.lane is None:
            return None
        self._check_no_running_loop()
        return hub.stepper.lane

    def step(
        self,
        requests: Mapping[int, Mapping[str, Any]],
        timeout: float | None = None,
        on_lost: str = "wait",
    ) -> dict[int, dict[str, Any]]:
        """The barrier with a deadline; see :meth:`Hub.step` (raises instead of ``{}``)."""
        if self.hub is None:
            raise UsageError("step is only available on MPI rank 0")
        abort = check_policy(on_lost)
        out = self._dict_step(requests, timeout, abort)
        if type(out) is dict:
            return out
        return self.hub.outcome(cast("StepResult | None", out), abort, timeout).as_dict()

    def step_arrays(
        self,
        ids: Any,
        fields: Any,
        timeout: float | None = None,
        on_lost: str = "wait",
        extras: bool = True,
        dipoles: bool = False,
    ) -> StepResult:
        """The barrier in array form; see :meth:`Hub.step_arrays` (``dipoles`` too)."""
        if self.hub is None or self._loop is None:
            raise UsageError("step_arrays is only available on MPI rank 0 of a running hub")
        abort = check_policy(on_lost)
        lane = self._lane()
        if lane is not None and ids is not None:
            out = lane.step_arrays(ids, fields, timeout, extras, dipoles)
            if isinstance(out, StepResult):
                return checked_dipoles(out, dipoles)
            if isinstance(out, Resume):  # written, then handed over: the frozen step goes on
                result = self._barrier(None, None, out.timeout, abort, extras, dipoles)
                return checked_dipoles(self.hub.outcome(result, abort, timeout), dipoles)
        if not self.hub.in_step and ids is not None:
            ids, fields = as_step_arrays(ids, fields)
        result = self._barrier(ids, fields, timeout, abort, extras, dipoles)
        return checked_dipoles(self.hub.outcome(result, abort, timeout), dipoles)

    def status(self) -> dict[str, Any]:
        return self.hub.status() if self.hub else {}

    # -- parameter changes and kicks over the wire (maxwellhub.hub.params)
    def set_params(self, molecule_ids: int | Iterable[int], changes: Mapping[str, Any]) -> None:
        """See :meth:`Hub.set_params`: sent between steps, every answer awaited (nothing
        on ranks other than 0)."""
        if self.hub is not None:
            self._run(self.hub.set_params(molecule_ids, changes))

    def apply_kick(self, molecule_ids: int | Iterable[int], impulse: Any) -> None:
        """See :meth:`Hub.apply_kick` (nothing on ranks other than 0)."""
        if self.hub is not None:
            self._run(self.hub.apply_kick(molecule_ids, impulse))

    @property
    def requested_params(self) -> int:
        """Changes queued through the control endpoint (``SetParams``), not applied yet."""
        return len(self.hub.params.requested) if self.hub is not None else 0

    def apply_requested_params(self) -> int:
        """See :meth:`Hub.apply_requested_params` (0 on ranks other than 0)."""
        if self.hub is None or not self.hub.params.requested:
            return 0
        return int(self._run(self.hub.apply_requested_params()))

    def molecule_steps(self, molecule_ids: Iterable[int]) -> npt.NDArray[Any]:
        """See :meth:`Hub.molecule_steps` (an empty array on ranks other than 0)."""
        if self.hub is None:
            return np.zeros(0, dtype=np.int64)
        return self.hub.molecule_steps(molecule_ids)

    def snapshot(self) -> dict[str, npt.NDArray[Any]]:
        """See :meth:`Hub.snapshot` (``{}`` on ranks other than 0)."""
        return self.hub.snapshot() if self.hub is not None else {}

    def restore(self, snapshot: Mapping[str, npt.NDArray[Any]]) -> None:
        """See :meth:`Hub.restore` (nothing on ranks other than 0)."""
        if self.hub is not None:
            self.hub.restore(snapshot)

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

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __del__(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed() and not loop.is_running():
            # Best effort at garbage collection: an error here has nowhere to go.
            with contextlib.suppress(Exception):
                self.stop()
