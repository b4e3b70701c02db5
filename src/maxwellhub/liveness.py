"""How maxwellhub tells a slow peer from a dead one, in one place for the hub, the relay
and the driver.

A molecular step may take minutes (RT-TDDFT), a hub may start hours after its drivers (a
batch queue): neither is a failure, so the waits for a step, for drivers to bind and for a
hub to appear have no deadline unless one is asked for. A dead peer is noticed by its
connection instead: a process that exits or crashes closes its sockets at once (EOF or a
reset), and a host that vanishes (power, network) is noticed by TCP keepalive, which
:func:`keepalive` sets on every TCP connection with the explicit numbers below, so the
time to notice is bounded and the same on every machine (the kernel's defaults take over
two hours). Waits that do keep a deadline: the handshake of a new connection
(:data:`DEFAULT_HANDSHAKE_TIMEOUT`, against peers that never speak) and a relay's wait for
the replacement of a lost local driver (:data:`DEFAULT_REPLACE_TIMEOUT`).

A wait without a deadline logs who it waits for on a growing schedule
(:func:`report_delays`), so a stuck run says why without flooding a log.

This module never opens a connection and never sleeps: it only sets options and says when.
"""

from __future__ import annotations

import errno
import math
import numbers
import socket
from collections.abc import Iterator

from .errors import UsageError

__all__ = [
    "CONNECT_ATTEMPT",
    "CONNECT_BACKOFF_FIRST",
    "CONNECT_BACKOFF_MAX",
    "CONNECT_RETRY_ERRNOS",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_REPLACE_TIMEOUT",
    "KEEPALIVE_COUNT",
    "KEEPALIVE_IDLE",
    "KEEPALIVE_INTERVAL",
    "LOST_HOST_SECONDS",
    "REPORT_FIRST",
    "REPORT_MAX",
    "Reporter",
    "check_timeout",
    "keepalive",
    "report_delays",
    "within",
]

#: Connecting to a hub that is not up yet (a driver, a relay's upstream link): the first
#: and the longest pause between attempts (doubling), in seconds.
CONNECT_BACKOFF_FIRST = 0.05
CONNECT_BACKOFF_MAX = 1.0
#: Seconds one connection attempt may take when the wait as a whole has no deadline.
CONNECT_ATTEMPT = 10.0
#: Errors that mean "the hub is not listening yet": keep trying.
CONNECT_RETRY_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
    }
)

#: Seconds of silence on a TCP connection before the first keepalive probe.
KEEPALIVE_IDLE = 60
#: Seconds between unanswered probes.
KEEPALIVE_INTERVAL = 10
#: Unanswered probes after which the kernel drops the connection.
KEEPALIVE_COUNT = 6
#: The longest a vanished host goes unnoticed: idle time plus all probes (2 minutes). Also
#: the TCP_USER_TIMEOUT, which bounds the same way a send that is never acknowledged.
LOST_HOST_SECONDS = KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT

#: Seconds a new connection may take to authenticate and answer its first STATUS. A
#: driver answers in milliseconds; the margin is for a node starting thousands of driver
#: processes at once. A peer that never answers holds a handshake slot only this long.
DEFAULT_HANDSHAKE_TIMEOUT = 60.0
#: Seconds a relay waits for a replacement to connect when a local driver is lost (nothing
#: computes meanwhile); then it exits so that the upstream hub applies its own policy.
DEFAULT_REPLACE_TIMEOUT = 60.0

#: A wait without a deadline first reports who is missing after this many seconds ...
REPORT_FIRST = 30.0
#: ... then after twice the previous interval, capped at this many seconds.
REPORT_MAX = 1800.0


def keepalive(sock: socket.socket) -> None:
    """Turn on TCP keepalive with :data:`KEEPALIVE_IDLE`, :data:`KEEPALIVE_INTERVAL`,
    :data:`KEEPALIVE_COUNT` and a TCP_USER_TIMEOUT of :data:`LOST_HOST_SECONDS` on a TCP
    socket (or the socket-like object an event loop's transport gives); UNIX sockets are
    left alone. Options this platform lacks are skipped (Linux has them all)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", LOST_HOST_SECONDS * 1000),  # milliseconds
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def check_timeout(value: object, name: str = "timeout") -> float | None:
    """A deadline in seconds: a number > 0, or None (or infinity) for none. Anything else
    is a :class:`UsageError` naming ``name``."""
    if value is None:
        return None
    seconds = float(value) if isinstance(value, numbers.Real) else math.nan
    if isinstance(value, bool) or not seconds > 0:  # NaN fails too
        raise UsageError(
            f"{name} must be a number of seconds > 0, or None for no deadline; not {value!r}"
        )
    return None if math.isinf(seconds) else seconds


def within(timeout: float | None) -> str:
    """``"within 5 s"``, or ``"(no deadline)"``: for messages about a wait."""
    return "(no deadline)" if timeout is None else f"within {timeout:g} s"


def report_delays() -> Iterator[float]:
    """Seconds from the start of a wait to each report: 30, 90, 210, ... (the interval
    doubling from 30 s up to 30 min), forever."""
    return _Delays()


class _Delays:
    """The iterator of :func:`report_delays` (a class, not a generator: a hub step makes
    one and most are dropped unfinished, which costs a generator a GeneratorExit)."""

    __slots__ = ("at", "interval")

    def __init__(self) -> None:
        self.interval, self.at = 0.0, 0.0

    def __iter__(self) -> _Delays:
        return self

    def __next__(self) -> float:
        if not self.interval:
            self.interval = self.at = REPORT_FIRST
        else:
            self.interval = min(2 * self.interval, REPORT_MAX)
            self.at += self.interval
        return self.at


class Reporter:
    """When a wait that started at ``start`` (any monotonic clock) should next say who
    it waits for: :meth:`due` is True once per delay of :func:`report_delays`."""

    def __init__(self, start: float) -> None:
        self.start = start
        self._delays = report_delays()
        self.next_at = start + next(self._delays)

    def due(self, now: float) -> bool:
        if now < self.next_at:
            return False
        while self.next_at <= now:
            self.next_at = self.start + next(self._delays)
        return True
