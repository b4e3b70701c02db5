"""Rate-limited log lines about peers, summarised without losing the counts.

A flood of bad peers (random bytes, silent connections, truncated frames) would otherwise
cost one log line each: thousands per second, each formatted and written while the
barrier waits. :class:`PeerLog` is a :class:`logging.Filter` on the hub's logger that lets
the first ``burst`` lines about peers through in each ``interval`` and counts the rest,
then logs one summary line per interval with the exact count of every kind of line it held
back. Lines about anything else (bound drivers, steps, the hub itself) always pass.

Which records are "about a peer" is the owner's call (``is_peer``, given the record's first
argument; only WARNING and above are limited), so this module knows nothing of connections
or hubs; the summary (at the highest level it holds back) is logged when the interval ends
(``later`` schedules that, e.g. ``loop.call_later``) or at :meth:`flush`. It must never
drop a count: every held-back line is in :attr:`held` and in a summary.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["PeerLog"]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
_PEER_BYTES = re.compile(r"""\s*\bb['"].*""", re.DOTALL)  # bytes a peer sent, quoted
_KIND_CHARS = 90  # a summary names each kind of line by at most this many characters
_KINDS_KEPT = 32  # kinds counted apart (peers choose the text); the rest are "other"
_KINDS_SHOWN = 5  # kinds named in one summary line
OTHER = "other lines about peers"


class PeerLog(logging.Filter):
    """Lets through at most ``burst`` lines about peers per ``interval`` seconds on the
    logger it is added to; the others are counted by kind and summarised in one line when
    the interval ends.

    ``is_peer(first_arg)`` says whether a record whose first argument is ``first_arg`` is
    about a peer (it sees only records with arguments). ``later(seconds, callback)``
    schedules the end-of-interval summary (without it, the summary waits for the next line
    or :meth:`flush`). ``clock`` is for tests."""

    def __init__(
        self,
        logger: logging.Logger,
        is_peer: Callable[[Any], bool],
        *,
        burst: int = 5,
        interval: float = 10.0,
        later: Callable[[float, Callable[[], None]], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.logger = logger
        self.is_peer = is_peer
        self.burst = burst
        self.interval = interval
        self.later = later
        self.clock = clock
        #: Lines about peers seen in all: logged one by one, and held back (by kind).
        self.logged = 0
        self.held: Counter[str] = Counter()
        self._window_end = -1.0
        self._window_logged = 0
        self._window_held: Counter[str] = Counter()
        self._window_level = logging.WARNING  # the summary's level: the highest held back
        self._scheduled = False
        self._summarising = False

    def install(self) -> PeerLog:
        """Start filtering the logger's records; returns self."""
        self.logger.addFilter(self)
        return self

    def remove(self) -> None:
        """Log the pending summary and stop filtering."""
        self.flush()
        self.logger.removeFilter(self)

    @property
    def seen(self) -> int:
        """Lines about peers, logged or held back."""
        return self.logged + sum(self.held.values())

    def counts(self) -> dict[str, Any]:
        """Exact counts for a status report: seen, logged, held back (by kind)."""
        return {"seen": self.seen, "logged": self.logged, "held_back": dict(self.held)}

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.levelno < logging.WARNING
            or self._summarising
            or not record.args
            or not isinstance(record.args, tuple)
        ):
            return True
        if not self.is_peer(record.args[0]):
            return True
        now = self.clock()
        if now >= self._window_end:
            self.flush()
            self._window_end = now + self.interval
        if self._window_logged < self.burst:
            self._window_logged += 1
            self.logged += 1
            return True
        kind = _kind(record)
        if kind not in self.held and len(self.held) >= _KINDS_KEPT:
            kind = OTHER
        self._window_held[kind] += 1
        self.held[kind] += 1
        self._window_level = max(self._window_level, record.levelno)
        if not self._scheduled and self.later is not None:
            self._scheduled = True
            self.later(max(self._window_end - now, 0.0), self._interval_ended)
        return False

    def _interval_ended(self) -> None:
        self._scheduled = False
        if self.clock() >= self._window_end:
            self.flush()
        elif self._window_held and self.later is not None:  # the window moved on: follow it
            self._scheduled = True
            self.later(max(self._window_end - self.clock(), 0.0), self._interval_ended)

    def flush(self) -> None:
        """Log one summary line for the lines held back so far (if any); a new interval
        starts with the next line about a peer."""
        held, self._window_held = self._window_held, Counter()
        level, self._window_level = self._window_level, logging.WARNING
        self._window_logged = 0
        self._window_end = -1.0
        if not held:
            return
        total = sum(held.values())
        top = held.most_common(_KINDS_SHOWN)
        kinds = "; ".join(f"{n:,} x {kind}" for kind, n in top)
        if len(held) > len(top):
            rest = total - sum(n for _, n in top)
            kinds += f"; {rest:,} x {len(held) - len(top)} other kind(s)"
        self._summarising = True
        try:
            self.logger.log(
                level,
                "%s more line(s) about peers were not logged (at most %d per %g s): %s",
                f"{total:,}",
                self.burst,
                self.interval,
                kinds,
            )
        finally:
            self._summarising = False


def _kind(record: logging.LogRecord) -> str:
    """The line with its peer and numbers blanked: what kinds of lines were held back."""
    args = record.args if isinstance(record.args, tuple) else ()
    try:
        text = str(record.msg) % ("<peer>", *args[1:])
    except (TypeError, ValueError):
        text = str(record.msg)
    return _NUMBER.sub("N", _PEER_BYTES.sub("", text))[:_KIND_CHARS]
