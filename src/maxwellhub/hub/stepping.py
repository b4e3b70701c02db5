"""The step machinery of the :class:`~maxwellhub.hub.Hub`: freezing a barrier step,
sending every idle driver its frozen field, gathering the replies, the step's one timer
(deadline and reports of who is missing), and completing the step.

:class:`Stepper` is composed into the hub (``hub.stepper``), one per hub, and owns the
state only a step uses: the frozen :class:`~maxwellhub.hub.barrier.Barrier` while a step
is in progress, the step timer, the current :class:`~maxwellhub.hub.barrier.Layout`, and
the per-step timings and last-to-answer counts that ``Hub.status`` reports.

Its contract with the hub:

- the hub binds the stepper's own methods as its public step contract (``begin_step``,
  ``finish_step``, ``stop_waiting``, ``step_due_at``, ``step_due``, ``outcome``,
  ``requests_to_arrays``) and as the connections' reply callbacks (``source_ready``,
  ``sources_batch``, ``pending_field`` of
  :class:`~maxwellhub.protocol.connection.HubCallbacks`), so a reply or a step costs no
  call more than when the hub held them;
- the stepper reads the hub through :class:`HubView` (its loop, timeout, registry,
  connections, steady reader, replay history, stop state) and advances ``hub.step_index``
  when a step completes; binding stays the hub's (it calls back ``_progress_binds`` and
  ``_ensure_init``);
- the hub tells it of the rest: :meth:`Stepper.serve` (a driver became ready),
  :meth:`Stepper.wake` (a stop), :meth:`Stepper.disarm` (the hub stops),
  :meth:`Stepper.new_layout` (a restored replay window).

This module never touches a socket itself (bytes go through each connection's link or the
steady reader's :class:`~maxwellhub.hub.fastpath.DirectStep`), never binds drivers and
never converts units.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from itertools import chain
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from ..errors import BarrierTimeout, DriverLost, MaxwellHubError, UsageError
from ..liveness import within
from ..net import steadyio
from ..protocol import wire
from ..protocol.connection import Connection, State
from .barrier import Barrier, Layout, StepResult, fields_array, ids_text
from .fastpath import DirectStep, Steady, SteadyReader, _Plan, can_wait_detached
from .history import History
from .lane import SteadyLane
from .registry import Registry

__all__ = ["HubView", "Stepper", "StopRequested"]

log = logging.getLogger("maxwellhub.hub")

_BOUND = State.BOUND
_READY = State.READY
_STEP_TIMES = 10_000  # per-step durations kept for status() (last, mean, p99)
_LAST_TO_ANSWER_CAP = 4096  # molecule ids counted as "last to answer" before trimming


class StopRequested(MaxwellHubError):
    """The run was asked to stop (:meth:`Hub.request_stop`, e.g. by the control endpoint);
    raised by ``step``/``step_arrays``, while ``step_barrier`` returns ``{}``."""


class HubView(Protocol):
    """What the stepper needs of its :class:`~maxwellhub.hub.Hub` (no import of it: no
    cycle). ``_connections``, ``_progress_binds`` and ``_ensure_init`` are the hub's own,
    shared with its stepper only."""

    paused: bool
    timeout: float | None
    limits: wire.Limits
    registry: Registry
    continuity: History
    steady: SteadyReader | None
    step_index: int
    _connections: set[Connection]

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def stop_requested(self) -> str | None: ...
    def _progress_binds(self) -> None: ...
    def _ensure_init(self, driver: Connection | None) -> None: ...


class _SteadyLink(Steady, Protocol):
    """A connection's asyncio adapter (:class:`~maxwellhub.hub.adapter.DriverProtocol`) as a
    direct step sends through it."""

    _fd: int  # the socket's fd while the steady reader reads it, else -1


def _send(conn: Connection, out: list[Any]) -> None:
    if out:
        conn.link.write(out)


class Stepper:
    """The barrier steps of one hub (see the module's contract). ``reports`` gives the
    schedule of a long step's reports of who is missing (the hub's
    :func:`~maxwellhub.liveness.report_delays`)."""

    def __init__(self, hub: HubView, reports: Callable[[], Iterator[float]]) -> None:
        self.hub = hub
        self._reports = reports
        #: The frozen step while one is in progress (begun and not complete), else None.
        self.barrier: Barrier | None = None
        self._watchdog: asyncio.TimerHandle | None = None  # the step timer (_arm_step)
        self._layout: Layout | None = None
        self._generation = 0
        #: Every registered molecule has its INIT payload (the hub clears it on register).
        self.payloads_known = False
        #: Per-step durations (ms), first field sent to last source received.
        self.step_ms: deque[float] = deque(maxlen=_STEP_TIMES)
        #: How often each molecule's reply completed a step (bounded).
        self.last_to_answer: Counter[int] = Counter()
        #: The steady step in one pass, when the last step allows it (see its module).
        self.lane: SteadyLane | None = None

    # ------------------------------------------------------------------ for the hub

    def serve(self, driver: Connection) -> None:
        """A driver became ready: a replacement gets the frozen field(s) it owes."""
        barrier = self.barrier
        if barrier is not None and driver.place(barrier.layout) and self._pending(driver, barrier):
            _send(driver, driver.send_step(barrier))

    def wake(self, reason: str) -> None:
        """Wake the wait on the step in progress, if any (``reason``: see Barrier.wake)."""
        if self.barrier is not None:
            self.barrier.wake(reason)

    def disarm(self) -> None:
        """Cancel the step timer (the hub stops)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def new_layout(self, ids: npt.NDArray[Any], index: npt.NDArray[Any]) -> Layout:
        """A layout of ``ids`` (at the registry slots ``index``) with a new generation."""
        self._generation += 1
        return Layout(ids, self._generation, index)

    # ------------------------------------------------------------------ the replies

    def pending_field(self, conn: Connection) -> npt.NDArray[Any] | None:
        """The frozen field a single-molecule connection still owes a source for."""
        barrier = self.barrier
        if barrier is not None and conn.place(barrier.layout) and self._pending(conn, barrier):
            row: npt.NDArray[Any] = barrier.fields[conn.row]
            return row
        return None

    @staticmethod
    def _pending(driver: Connection, barrier: Barrier) -> bool:
        """Whether ``driver`` (placed in the barrier's layout) still owes sources."""
        if driver.batch is None:
            return not barrier.done[driver.row]
        return not barrier.done[driver.rows].all()

    def source_ready(
        self, driver: Connection, sx: float, sy: float, sz: float, extras: bytes
    ) -> None:
        """A single molecule's source for the current step."""
        barrier = self.barrier
        r = driver.row
        if barrier is None or r < 0 or barrier.done[r]:
            driver.fail("SOURCEREADY for a step that was not asked")
            return
        barrier.single[r] = (sx, sy, sz)
        if extras:
            barrier.extras[r] = extras
        barrier.done[r] = True
        barrier.waiting -= 1
        if barrier.waiting == 0:
            barrier.last = driver
            barrier.wake("done")

    def sources_batch(self, driver: Connection, event: wire.SourcesBatch) -> None:
        """An ensemble's sources for the current step."""
        barrier = self.barrier
        rows = driver.rows
        if (
            barrier is None
            or rows is None
            or driver.rows_generation != barrier.layout.generation
            or barrier.done[rows].all()
        ):
            driver.fail("MXHSOURCES for a step that was not asked")
            return
        fresh = int(np.count_nonzero(~barrier.done[rows]))
        barrier.sources[rows] = event.sources
        barrier.done[rows] = True
        if event.extras:
            barrier.batch_extras.append((rows, event.extras))
        barrier.waiting -= fresh
        if barrier.waiting == 0:
            barrier.last = driver
            barrier.wake("done")

    # ------------------------------------------------------------------ a step

    def _freeze(
        self,
        ids: npt.NDArray[Any],
        fields: npt.NDArray[Any],
        want_extras: bool,
        want_dipoles: bool = False,
    ) -> Barrier:
        layout = self._layout
        if layout is None or layout.key != ids.tobytes():
            molecules = self.hub.registry.molecules
            unknown = [int(m) for m in ids.tolist() if int(m) not in molecules]
            if unknown:
                raise UsageError(
                    f"molecule {unknown[0]} is not registered with this hub"
                    + (f" (nor {ids_text(unknown[1:])})" if len(unknown) > 1 else "")
                )
            if len(set(ids.tolist())) != len(ids):
                raise UsageError("a step names the same molecule twice")
            index = np.fromiter(
                (molecules[m].index for m in ids.tolist()), dtype=np.intp, count=len(ids)
            )
            layout = self._layout = self.new_layout(ids.copy(), index)
            self.hub.continuity.follow(layout)
        return Barrier(layout, fields, want_extras, want_dipoles)

    def begin_step(
        self,
        ids: npt.NDArray[Any] | None,
        fields: npt.NDArray[Any] | None,
        timeout: float | None,
        abort_on_loss: bool,
        want_extras: bool = True,
        want_dipoles: bool = False,
        timers: bool = True,
    ) -> Barrier | None:
        """Freeze (or continue) the step, send what is due; the barrier, or None when
        paused. Synchronous: the caller then waits on ``barrier.waiter`` if set (with
        the loop running), and calls :meth:`finish_step`; :meth:`stop_waiting` if the
        wait is abandoned. This is the contract :class:`SocketHub` steps with.

        ``timers=False``: no loop timer for the step's deadline and reports; the caller
        waits until :meth:`step_due_at` itself and then calls :meth:`step_due` (a wait
        that does not run the loop each step, :meth:`maxwellhub.hub.fastpath.SteadyReader.wait`,
        would otherwise leave a cancelled timer in the loop's heap per step)."""
        if self.hub.paused:
            return None
        barrier = self.barrier
        if barrier is None:
            if ids is None or fields is None:
                raise UsageError("no step to continue: give the molecule ids and fields")
            barrier = self.barrier = self._freeze(ids, fields, want_extras, want_dipoles)
        barrier.abort_on_loss = abort_on_loss
        barrier.lost.clear()
        self.hub._progress_binds()
        self._send_due(barrier)
        layout = barrier.layout
        if abort_on_loss:
            row, done = layout.row, barrier.done
            barrier.lost.extend(
                m
                for m in self.hub.registry.driverless
                if (r := row.get(m)) is not None and not done[r]
            )
        if barrier.waiting and not (abort_on_loss and barrier.lost):
            loop = self.hub.loop
            barrier.waiter = loop.create_future()
            wait = self.hub.timeout if timeout is None else timeout
            now = loop.time()
            barrier.deadline = None if wait is None else now + wait
            if barrier.reports is None:  # the first wait of this step starts the schedule
                barrier.reports = self._reports()
                barrier.report_base = now
                barrier.report_at = now + next(barrier.reports)
            if timers:
                self._arm_step(barrier)
        return barrier

    def _send_due(self, barrier: Barrier) -> None:
        """Send the frozen field to every idle driver that owes a source (per connection,
        not per molecule); INIT to bound drivers whose step needs them now."""
        layout = barrier.layout
        generation = layout.generation
        done = barrier.done
        fresh = barrier.waiting == len(done)  # nothing answered yet: all are pending
        connections = self.hub._connections
        direct = self._direct_step(barrier)
        if direct is not None and fresh and direct.reuse(len(connections), barrier.fields):
            return  # the steady state: the same drivers as the last step, sent as then
        for driver in list(connections):  # per connection, not per molecule
            state = driver.state
            if state is _READY:
                # driver.place(layout), inlined while its rows are known (the steady state)
                if driver.rows_generation != generation:
                    if not driver.place(layout):
                        continue
                elif driver.row < 0:
                    continue
                if fresh or self._pending(driver, barrier):
                    if direct is not None:
                        link = cast(_SteadyLink, driver.link)
                        if link._fd >= 0 and direct.add(link, link._fd, driver.row):
                            continue
                    out = driver.send_step(barrier)
                    if out:
                        driver.link.write(out)
            elif state is _BOUND:
                self.hub._ensure_init(driver)
        if direct is not None:
            direct.flush(barrier.fields)

    def _direct_step(self, barrier: Barrier) -> DirectStep | None:
        """The step's batched send and read (:class:`~maxwellhub.hub.fastpath.DirectStep`)
        when the hub has a steady reader and it holds single-molecule drivers."""
        steady = self.hub.steady
        if steady is None or not steady.small:
            return None
        direct = steady.direct
        if direct is None or direct.barrier is not barrier:
            direct = DirectStep(
                barrier, self.hub.limits.max_extras_bytes, steady.plan, steady.drivers
            )
            steady.direct = direct
        return direct

    @staticmethod
    def step_due_at(barrier: Barrier) -> float:
        """Loop time of the step's next alarm: its deadline, or the next report of who is
        missing if that comes first (a step without a deadline only ever reports)."""
        deadline = barrier.deadline
        if deadline is not None and deadline <= barrier.report_at:
            return deadline
        return barrier.report_at

    def step_due(self, barrier: Barrier) -> None:
        """The step's alarm (:meth:`step_due_at`) went off: wake the wait at the deadline,
        else say who is missing."""
        deadline = barrier.deadline
        if deadline is not None and deadline <= barrier.report_at:
            barrier.wake("timeout")
        else:
            self._report_step(barrier)

    def _arm_step(self, barrier: Barrier) -> None:
        """Make sure the hub's one step timer fires by :meth:`step_due_at`. It is kept
        across steps (a timer made and cancelled per step cost microseconds, and most
        steps end long before any deadline or report): when it fires it looks at the step
        waiting then, acts if that step is due, and re-arms for it."""
        due = self.step_due_at(barrier)
        dog = self._watchdog
        if dog is not None:
            if dog.when() <= due:
                return  # fires in time, and then checks this step
            dog.cancel()
        self._watchdog = self.hub.loop.call_at(due, self._watch)

    def _watch(self) -> None:
        self._watchdog = None
        barrier = self.barrier
        if barrier is None or barrier.waiter is None or barrier.waiter.done():
            return  # nobody waits on a step (an abandoned wait is not woken)
        if self.step_due_at(barrier) <= self.hub.loop.time():
            self.step_due(barrier)
        if barrier.waiter is not None and not barrier.waiter.done():
            self._arm_step(barrier)

    def _report_step(self, barrier: Barrier) -> None:
        """Say which molecules a long step waits for: WARNING for those without a driver
        (a replacement is awaited), INFO when their drivers are computing."""
        missing = barrier.missing()
        unbound = [m for m in missing if self.hub.registry.molecules[m].driver is None]
        elapsed = self.hub.loop.time() - barrier.report_base
        if unbound:
            log.warning(
                "step %d: still waiting after %.0f s; no driver connected for molecule(s) %s",
                self.hub.step_index,
                elapsed,
                ids_text(unbound),
            )
        else:
            log.info(
                "step %d: still waiting after %.0f s for the source of molecule(s) %s "
                "(their drivers are computing)",
                self.hub.step_index,
                elapsed,
                ids_text(missing),
            )
        if barrier.reports is not None:
            barrier.report_at = barrier.report_base + next(barrier.reports)

    @staticmethod
    def stop_waiting(barrier: Barrier) -> None:
        """Stop waiting on ``barrier`` (its step stays frozen for the next call)."""
        if barrier.timer is not None:
            barrier.timer.cancel()
            barrier.timer = None
        barrier.waiter = None

    def finish_step(self, barrier: Barrier | None) -> StepResult | None:
        """After waiting: the result when the step is complete, else None."""
        if barrier is None:
            return None
        self.stop_waiting(barrier)
        if barrier.waiting:
            return None
        self.barrier = None
        steady = self.hub.steady
        if steady is not None and steady.direct is not None:
            plan = steady.plan = steady.direct.plan  # for the next step with the same drivers
            steady.direct = None
            self._keep_lane(barrier.layout, plan)
        else:
            self.lane = None
        self.count_step(barrier.layout, barrier.fields, barrier.started, barrier.last)
        sources = barrier.sources
        single = barrier.single
        if len(single) == 1:
            for r, source in single.items():
                sources[r] = source
        elif single:  # numpy's array from a list of tuples cost 0.8 us a row; this 0.3
            rows = np.fromiter(single, np.intp, len(single))
            flat = np.fromiter(chain.from_iterable(single.values()), np.float64, 3 * len(single))
            sources[rows] = flat.reshape(-1, 3)
        return StepResult(barrier.layout.ids, sources, barrier.extras, barrier.batch_extras)

    def count_step(
        self,
        layout: Layout,
        fields: npt.NDArray[Any],
        started: float,
        last: Connection | None,
    ) -> None:
        """The bookkeeping of a completed step (here and in the steady lane): the step
        count, the replay history, the step's time, who answered last."""
        self.hub.step_index += 1
        self.hub.continuity.completed(layout, fields)
        self.step_ms.append((time.monotonic() - started) * 1e3)
        if last is not None and last.molecules:
            self._note_last(last.molecules[0].id)

    def _keep_lane(self, layout: Layout, plan: _Plan | None) -> None:
        """Keep a :class:`~maxwellhub.hub.lane.SteadyLane` for the next steps when this one
        went out and came back whole through the batched path."""
        lane = self.lane
        if lane is not None and lane.plan is plan and lane.layout is layout:
            return
        if SteadyLane.usable(layout, plan):
            self.lane = SteadyLane(self, layout, cast(_Plan, plan), next(self._reports()))
        else:
            self.lane = None

    async def run(
        self,
        ids: Any,
        fields: Any,
        timeout: float | None,
        abort_on_loss: bool,
        want_extras: bool = True,
        dipoles: bool = False,
    ) -> StepResult | None:
        """One attempt at a step for the async hub: begin it, wait (inline when it can,
        else in the loop), finish it; the result, or None (see :meth:`outcome`)."""
        barrier = self.begin_step(ids, fields, timeout, abort_on_loss, want_extras, dipoles)
        if barrier is not None and barrier.waiter is not None:
            self._wait_inline(barrier)
            try:
                await barrier.waiter
            except BaseException:  # cancelled: no timer of this wait may fire into the next
                self.stop_waiting(barrier)
                raise
        return self.finish_step(barrier)

    def _wait_inline(self, barrier: Barrier) -> None:
        """Wait for the step's replies without leaving the coroutine when nothing else is
        due: the batched read (:meth:`SteadyReader.wait_inline`) watches the loop's
        selector beside the drivers and stops as soon as the loop has work (a new
        connection, a handshake, the control endpoint, a timer or a ready callback);
        the wait then goes on in the loop as usual. Only with the stdlib's selector
        loop (uvloop exposes no selector to watch)."""
        steady = self.hub.steady
        loop = self.hub.loop
        if steady is None or steady.direct is None or not can_wait_detached(loop):
            return
        if loop._ready:  # type: ignore[attr-defined]  # other callbacks are due now
            return
        deadline = self.step_due_at(barrier)
        timers = loop._scheduled  # type: ignore[attr-defined]
        if timers:
            deadline = min(deadline, timers[0].when())
        selector = loop._selector.fileno()  # type: ignore[attr-defined]
        steady.wait_inline(selector, deadline)

    def requests_to_arrays(
        self, requests: Mapping[int, Mapping[str, Any]]
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]] | tuple[None, None]:
        """ids and fields from MaxwellLink's request dict (and INIT payloads it carries)."""
        if self.barrier is not None:
            return None, None  # a frozen step is continued; its fields stay
        fast = steadyio.request_fields
        if fast is not None and self.payloads_known and type(requests) is dict:
            n = len(requests)
            ids, fields = np.empty(n, dtype=np.int64), np.empty((n, 3))
            if fast(requests, ids, fields):  # the plain shape, in C; else read below
                return ids, fields
        ids = np.fromiter(map(int, requests), dtype=np.int64, count=len(requests))
        try:
            efields = [req["efield_au"] for req in requests.values()]
        except (KeyError, TypeError):
            bad = next(
                k
                for k, req in requests.items()
                if not isinstance(req, Mapping) or "efield_au" not in req
            )
            raise UsageError(f"molecule {int(bad)}: request lacks 'efield_au'") from None
        if not self.payloads_known:  # else no INIT payload is needed any more
            molecules = self.hub.registry.molecules
            for mid, req in requests.items():
                init = req.get("init")
                mol = molecules.get(int(mid))
                if init is not None and mol is not None and mol.payload is None:
                    mol.payload = dict(init)
            self.payloads_known = all(m.payload is not None for m in molecules.values())
        return ids, fields_array(ids, efields)

    def outcome(self, result: StepResult | None, abort: bool, timeout: float | None) -> StepResult:
        """``result``, or the error saying why there is none: stopped, a driver lost (the
        abort policy), or no source in time (naming the molecules)."""
        if result is not None:
            return result
        barrier = self.barrier
        if self.hub.stop_requested is not None:
            raise StopRequested(f"step {self.hub.step_index}: stopped {self.hub.stop_requested}")
        if barrier is None or self.hub.paused:
            raise BarrierTimeout("the hub is stopped; no step can complete")
        if abort and barrier.lost:
            lost = sorted(set(barrier.lost))
            raise DriverLost(
                f"step {self.hub.step_index}: the driver of molecule(s) {lost} is "
                "gone and the policy is to abort",
                lost,
            )
        missing = barrier.missing()
        unbound = [m for m in missing if self.hub.registry.molecules[m].driver is None]
        wait = self.hub.timeout if timeout is None else timeout
        raise BarrierTimeout(
            f"step {self.hub.step_index}: no source from molecule(s) {ids_text(missing)} "
            f"{within(wait)}"
            + (f"; no driver connected for {ids_text(unbound)}" if unbound else ""),
            missing,
        )

    def _note_last(self, mid: int) -> None:
        counts = self.last_to_answer
        counts[mid] += 1
        if len(counts) > _LAST_TO_ANSWER_CAP:  # bounded: keep the leaders
            self.last_to_answer = Counter(dict(counts.most_common(_LAST_TO_ANSWER_CAP // 4)))
