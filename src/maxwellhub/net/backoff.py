"""One backoff for every "try again until it is there" wait: connecting to a hub that may
start later, looking for its address file, reaching an upstream hub.

:class:`Backoff` only says how long to wait and whether the deadline has passed; the
caller sleeps (``time.sleep`` in the blocking driver, ``await asyncio.sleep`` in the
relay) and says what it waits for when :meth:`Backoff.report_due` is True (the growing
schedule of :func:`maxwellhub.liveness.report_delays`). Nothing to await exists before the
peer does, so a bounded backoff between attempts is the honest wait. This module never
sleeps and never opens a connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..liveness import CONNECT_ATTEMPT, CONNECT_BACKOFF_FIRST, CONNECT_BACKOFF_MAX, Reporter

__all__ = ["Backoff"]


class Backoff:
    """Delays between attempts: ``first`` s, growing by ``growth`` up to ``cap`` s, cut
    short by a deadline ``timeout`` s from now (None: no deadline). ``clock``: any
    monotonic clock (an event loop's ``time``)."""

    def __init__(
        self,
        timeout: float | None,
        *,
        first: float = CONNECT_BACKOFF_FIRST,
        cap: float = CONNECT_BACKOFF_MAX,
        growth: float = 2.0,
        attempt: float = CONNECT_ATTEMPT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if first <= 0 or cap < first or growth < 1:
            raise ValueError(f"backoff needs 0 < first <= cap and growth >= 1: {first}, {cap}")
        self.clock = clock
        self.start = clock()
        self.deadline = None if timeout is None else self.start + timeout
        self.delay = first
        self.cap = cap
        self.growth = growth
        self.attempt = attempt
        self.tries = 0
        self._reporter = Reporter(self.start)

    def attempt_timeout(self, at_most: float | None = None) -> float:
        """Seconds the next attempt may take (counted as a try): what is left before the
        deadline (at least 0.01 s), or ``at_most`` (default ``attempt``) without one."""
        self.tries += 1
        limit = self.attempt if at_most is None else at_most
        if self.deadline is None:
            return limit
        return max(0.01, min(limit, self.deadline - self.clock()))

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None when the deadline has passed
        (give up). The delay after this one grows."""
        delay = self.delay
        if self.deadline is not None:
            left = self.deadline - self.clock()
            if left <= 0:
                return None
            delay = min(delay, left)
        self.delay = min(self.delay * self.growth, self.cap)
        return delay

    def report_due(self) -> bool:
        """Whether to say (once more, on a growing schedule) what is being waited for."""
        return self._reporter.due(self.clock())

    @property
    def waited(self) -> float:
        """Seconds since the wait started."""
        return self.clock() - self.start
