"""The steady step in one pass: the fields of a request out to every driver and their
sources back, with no barrier object and no call per driver in Python.

After a step whose every reply came through the batched read
(:class:`~maxwellhub.hub.fastpath.DirectStep`) with a clean plan, the
:class:`~maxwellhub.hub.stepping.Stepper` keeps a :class:`SteadyLane` for that plan. The
next step that asks the same molecules of the same drivers, all idle, with nothing else
for the loop to do, is then: the request read into arrays (in C), every block written
(one :func:`~maxwellhub.net.steadyio.send`), every reply taken
(one :func:`~maxwellhub.net.steadyio.collect`), the step's bookkeeping (step count,
replay history, timing, last to answer) and MaxwellLink's result dict (in C). That is
the step the C hub makes, with about ten lines of Python around it.

Anything else is the usual step, decided before a byte is written (the lane declines:
None) or, once the blocks are out, by handing the step over: the lane builds the frozen
:class:`~maxwellhub.hub.barrier.Barrier` and the :class:`DirectStep` exactly as the usual
path would have them at that point (the same arrays, the replies taken so far), gives the
reader's status to the steady reader as its own wait would, and returns :class:`Resume`;
the caller continues that frozen step with the usual ``begin_step``/wait/``finish_step``.
So a partial or odd read, a driver's end, the loop's work (a new connection, the
control endpoint, a timer), a report of who is missing, a deadline, a short write or a
Ctrl-C each take the path they always took.

This module never decides protocol questions (the connection machines do), never binds
drivers and never touches a socket but through :mod:`maxwellhub.net.steadyio`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from ..net import steadyio
from ..protocol import wire
from ..protocol.connection import (
    Connection,
    all_direct_ready,
    mark_answered_direct,
    mark_sent_direct,
)
from .barrier import Barrier, Layout, StepResult, as_step_arrays
from .fastpath import DirectStep, SteadyReader, _Plan, can_wait_detached
from .registry import Registry

__all__ = ["Resume", "SteadyLane"]


class _Hub(Protocol):
    """What the lane reads of the hub (the stepper's ``HubView``)."""

    @property
    def paused(self) -> bool: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def limits(self) -> wire.Limits: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def steady(self) -> SteadyReader | None: ...
    @property
    def _connections(self) -> set[Connection]: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...


class _Stepper(Protocol):
    """What the lane uses of its :class:`~maxwellhub.hub.stepping.Stepper` (no import of
    it: the stepper makes lanes)."""

    barrier: Barrier | None

    @property
    def hub(self) -> _Hub: ...
    @property
    def _layout(self) -> Layout | None: ...
    @property
    def payloads_known(self) -> bool: ...
    @property
    def _reports(self) -> Callable[[], Iterator[float]]: ...
    def count_step(
        self,
        layout: Layout,
        fields: npt.NDArray[Any],
        started: float,
        last: Connection | None,
    ) -> None: ...


class Resume:
    """The lane wrote the step and handed it over: continue the frozen step with
    ``timeout`` (what is left of the caller's; None: no deadline)."""

    __slots__ = ("timeout",)

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout


class SteadyLane:
    """The steady step of one :class:`_Plan` on one :class:`Layout` (see the module notes).
    ``first_report`` (s): when a step's first report of who is missing is due; the lane
    never waits past it, nor past the step's deadline or the loop's next timer."""

    __slots__ = ("first_report", "key", "layout", "n", "plan", "stepper")

    def __init__(self, stepper: _Stepper, layout: Layout, plan: _Plan, first_report: float) -> None:
        self.stepper = stepper
        self.layout = layout
        self.plan = plan
        self.key = layout.key
        self.n = len(layout.ids)
        self.first_report = first_report

    @staticmethod
    def usable(layout: Layout, plan: _Plan | None) -> bool:
        """Whether a lane can serve steps of ``layout`` sent as ``plan`` (one single-molecule
        driver per row, the compiled dict helpers present)."""
        return (
            plan is not None
            and not plan.dirty
            and steadyio.request_fields is not None
            and steadyio.result_dict is not None
            and plan.generation == layout.generation
            and len(plan.conns) == len(plan.rows) == len(layout.ids) > 0
            and layout.ids.dtype == np.int64
            and layout.ids.flags.c_contiguous
        )

    def _steady(self) -> SteadyReader | None:
        """The steady reader if this step is the lane's to make, else None."""
        st = self.stepper
        hub = st.hub
        steady = hub.steady
        if (
            steady is None
            or st.barrier is not None
            or st._layout is not self.layout
            or hub.paused
            or steady.plan is not self.plan
            or steady.direct is not None
            or steady._handed_back
            or hub.registry.unbound
            or len(hub._connections) != self.n
            or hub.loop._ready  # type: ignore[attr-defined]  # callbacks due: the loop's turn
            or not st.payloads_known
        ):
            return None
        return steady

    def step(
        self, requests: Mapping[int, Mapping[str, Any]], timeout: float | None
    ) -> dict[int, dict[str, Any]] | Resume | None:
        """One step of MaxwellLink's request dict: its result dict, :class:`Resume`, or None
        (declined: nothing was sent, nothing changed)."""
        steady = self._steady()
        if steady is None or type(requests) is not dict or len(requests) != self.n:
            return None
        n = self.n
        ids = np.empty(n, dtype=np.int64)
        fields = np.empty((n, 3))
        if not steadyio.request_fields(requests, ids, fields) or ids.tobytes() != self.key:
            return None
        out = self._run(steady, fields, timeout, True, False)
        if type(out) is tuple:
            result: dict[int, dict[str, Any]] = steadyio.result_dict(self.layout.ids, *out)
            return result
        return cast("Resume | None", out)

    def step_arrays(
        self, ids: Any, fields: Any, timeout: float | None, extras: bool, dipoles: bool
    ) -> StepResult | Resume | None:
        """One step in array form (``ids`` and ``fields`` as ``step_arrays`` takes them,
        validated as there): its :class:`StepResult`, :class:`Resume`, or None."""
        steady = self._steady()
        if steady is None:
            return None
        ids, fields = as_step_arrays(ids, fields)
        if ids.tobytes() != self.key:
            return None
        fields = np.ascontiguousarray(fields, dtype=np.float64)
        out = self._run(steady, fields, timeout, extras, dipoles)
        if type(out) is tuple:
            return StepResult(self.layout.ids, out[0], out[1], [])
        return cast("Resume | None", out)

    def _run(
        self,
        steady: SteadyReader,
        fields: npt.NDArray[Any],
        timeout: float | None,
        want_extras: bool,
        want_dipoles: bool,
    ) -> tuple[npt.NDArray[Any], dict[int, bytes]] | Resume | None:
        """Send ``fields`` and take the replies: (sources, extras) when the step is
        complete (and counted), :class:`Resume` when handed over, None when declined."""
        hub = self.stepper.hub
        loop = hub.loop
        wait = hub.timeout if timeout is None else timeout
        now = loop.time()
        until = self.first_report if wait is None else min(wait, self.first_report)
        timers = loop._scheduled  # type: ignore[attr-defined]
        if timers:
            until = min(until, timers[0].when() - now)
        plan = self.plan
        conns = plan.conns
        if until <= 0 or not all_direct_ready(conns):
            return None
        if steady._attached:  # the async hub: its loop's selector is watched beside the set
            if not can_wait_detached(loop):
                return None
            loop_fd, outer_fd = -1, loop._selector.fileno()  # type: ignore[attr-defined]
        else:  # the sync hub between loop runs: the loop's selector is in the set
            loop_fd, outer_fd = steady._loop_fd, -1
        n = self.n
        mark_sent_direct(conns)
        started = time.monotonic()
        short = steadyio.send(plan.fd_array, plan.row_array, fields)
        sources = np.zeros((n, 3))
        done = np.zeros(n, dtype=bool)
        extras: dict[int, bytes] = {}
        step = (fields, sources, done, extras, want_extras, want_dipoles, started, now)
        if short:
            self._hand_over(steady, *step).queue_rest(short, 0, fields, plan.row_array)
            return self._resume(wait, now)
        answered: list[int] = []
        try:
            status, waiting, last, who, data = steadyio.collect(
                steady.epoll,
                loop_fd,
                outer_fd,
                plan.table,
                plan.clean_raw(),
                plan.row_array,
                sources,
                done.view(np.uint8),
                n,
                started + until,
                hub.limits.max_extras_bytes,
                extras,
                answered,
            )
        except BaseException:  # Ctrl-C in the wait: the step stays frozen, as always
            direct = self._hand_over(steady, *step)
            direct.absorb(answered, n - int(done.sum()), -1)
            raise
        if status == steadyio.DONE:
            self._complete(fields, answered, last, started)
            return sources, extras
        direct = self._hand_over(steady, *step)
        direct.absorb(answered, waiting, last)
        steady.absorb(direct, status, who, data)
        return self._resume(wait, now)

    def _complete(
        self, fields: npt.NDArray[Any], answered: list[int], last: int, started: float
    ) -> None:
        """What ``finish_step`` does for a complete step."""
        conns = self.plan.conns
        mark_answered_direct(conns, answered)
        self.stepper.count_step(self.layout, fields, started, conns[last])

    def _hand_over(
        self,
        steady: SteadyReader,
        fields: npt.NDArray[Any],
        sources: npt.NDArray[Any],
        done: npt.NDArray[Any],
        extras: dict[int, bytes],
        want_extras: bool,
        want_dipoles: bool,
        started: float,
        now: float,
    ) -> DirectStep:
        """The step frozen as the usual path would hold it now (the blocks written, the
        reads going to ``sources``, ``done`` and ``extras``), with its
        :class:`DirectStep`; the caller then gives it what the reads took."""
        st = self.stepper
        barrier = Barrier(self.layout, fields, want_extras, want_dipoles)
        barrier.sources, barrier.done, barrier.extras = sources, done, extras
        barrier.started = started
        barrier.reports = reports = st._reports()
        barrier.report_base = now
        barrier.report_at = now + next(reports)
        st.barrier = barrier
        direct = DirectStep(barrier, st.hub.limits.max_extras_bytes, self.plan, steady.drivers)
        direct.adopt(self.plan)
        steady.direct = direct
        return direct

    def _resume(self, wait: float | None, started: float) -> Resume:
        if wait is None:
            return Resume(None)
        return Resume(max(0.0, wait - (self.stepper.hub.loop.time() - started)))
