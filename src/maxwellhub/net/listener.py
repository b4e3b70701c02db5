"""The admission-controlled listener: new connections get a bounded share of the hub's
time, so a flood of them cannot starve the barrier.

asyncio's own server accepts up to ``backlog`` connections per wake-up, and a
connect-and-close flood from another process then queued thousands of callbacks ahead of
the barrier's replies (the healthy barrier kept 8-17 % of its quiet rate). Here:

- each round of accepting stops after :data:`ACCEPT_BUDGET` seconds or
  :data:`ACCEPT_BATCH` admitted connections; a round that leaves connections waiting puts
  the listener on a timer (one round per :data:`ACCEPT_PACE` seconds) until a round drains
  the queue, so a flood costs the hub at most about ``ACCEPT_BUDGET / ACCEPT_PACE`` of its
  time in accepting, and the kernel's listen backlog (not the hub's memory) holds the
  rest. Bound drivers' reads never wait behind more than one round;
- a peer that already closed (a connect-and-close loop) is closed at once, before any
  transport, protocol or log line is made for it;
- while peers that host nothing are being dropped (``failures()`` grew within the last
  :data:`HOSTILE_HOLD` seconds: random bytes, oversize lengths, silent peers), each costs
  the hub far more than an accept (a transport, STATUS, a read, the drop), so at most one
  connection is admitted per :data:`HOSTILE_PACE` seconds; a real driver's handshake
  costs no more than that slot;
- while such a flood lasts (paced, most peers gone before being accepted, or hostile) the
  listen backlog shrinks to :data:`FLOOD_BACKLOG`, so a real driver that gets into the
  queue waits behind tens of attackers, not thousands (clients waiting in ``connect`` are
  woken as room appears; the configured backlog is restored once the queue drains);
- a new connection is admitted only when ``admit()`` says so (the hub makes room by
  evicting the connection longest in its handshake, see :class:`Pending`); one refused is
  closed at once and counted, with one summary line per 10 s.

This module must not know the wire protocol; it sees sockets and callbacks only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "ACCEPT_BATCH",
    "ACCEPT_BUDGET",
    "ACCEPT_PACE",
    "FLOOD_BACKLOG",
    "HOSTILE_HOLD",
    "HOSTILE_PACE",
    "Listener",
    "Pending",
]

log = logging.getLogger("maxwellhub.hub")

#: Connections admitted (given a transport) per round at most.
ACCEPT_BATCH = 4
#: Seconds one round of accepting may take (checked after each connection).
ACCEPT_BUDGET = 0.00015
#: Seconds between rounds while connections keep waiting (a flood).
ACCEPT_PACE = 0.002
#: The listen backlog during a flood (see the module notes).
FLOOD_BACKLOG = 32
#: Seconds between admissions while peers that host nothing are being dropped.
HOSTILE_PACE = 0.003
#: Seconds that admissions stay paced after the last such drop.
HOSTILE_HOLD = 1.0
_REFUSAL_LOG_EVERY = 10.0  # seconds between summary lines about refused connections
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


class Pending:
    """The connections still in their handshake, oldest first (an insertion-ordered set):
    when too many are, the hub evicts the oldest, which had the longest to answer, so a
    flood of silent peers cannot lock out a real driver, which answers in milliseconds."""

    def __init__(self) -> None:
        self._items: dict[Any, None] = {}

    def add(self, item: Any) -> None:
        self._items[item] = None

    def discard(self, item: Any) -> None:
        self._items.pop(item, None)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._items))

    def pop_oldest(self) -> Any:
        """Remove and return the oldest; a KeyError when empty."""
        item = next(iter(self._items))
        del self._items[item]
        return item


class Listener:
    """The hub's listening socket, served in bounded rounds (see the module notes). Same
    ``close``, ``wait_closed`` and ``sockets`` as an ``asyncio.Server``.

    ``factory`` makes the protocol of an accepted connection; ``admit()`` says whether one
    more may start its handshake; ``pending()`` counts those in the handshake (for the
    summary line); ``backlog``, the socket's listen backlog, lets it shrink the backlog
    during a flood; ``failures()`` counts the peers hosting nothing that were dropped so
    far (its growth paces admissions). :attr:`counts` holds what it did: connections
    accepted, found already closed, refused, admitted, the rounds that left a queue
    behind, the admissions paced as hostile, and the times the backlog was shrunk."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Callable[[], asyncio.BaseProtocol],
        admit: Callable[[], bool],
        pending: Callable[[], int],
        *,
        budget: float = ACCEPT_BUDGET,
        batch: int = ACCEPT_BATCH,
        pace: float = ACCEPT_PACE,
        backlog: int | None = None,
        failures: Callable[[], int] | None = None,
    ) -> None:
        self.factory, self.admit, self.pending = factory, admit, pending
        self.budget, self.batch, self.pace = budget, batch, pace
        self.backlog = backlog  # the configured listen backlog (None: never shrunk)
        self._shrunk = False
        self.failures = failures
        self._failures_seen = 0
        self._hostile_until = -math.inf
        self._hostile = False  # in the current round
        self.sock = sock
        self.sockets = [sock]
        self.counts = {"accepted": 0, "closed_already": 0, "refused": 0, "admitted": 0}
        self.counts["paced_rounds"] = 0
        self.counts["backlog_shrunk"] = 0
        self.counts["hostile_paced"] = 0
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._refused = 0
        self._refused_since = 0.0
        self._timer: asyncio.TimerHandle | None = None  # set while paced (or backing off)
        sock.setblocking(False)
        self.loop = loop
        self.loop.add_reader(sock.fileno(), self._round)
        self._watching = True  # the loop calls _round when the socket is readable

    @staticmethod
    def tcp_socket(host: str, port: int, backlog: int) -> socket.socket:
        """A listening TCP socket (IPv6 only on an IPv6 address; SO_REUSEADDR)."""
        family, _, _, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    @property
    def paced(self) -> bool:
        """Whether the listener is on its timer (connections kept waiting: a flood)."""
        return self._timer is not None

    def _round(self) -> None:
        """Accept until the queue is empty, the time budget is spent or a batch is
        admitted; then wait for the socket (drained) or for the next round (not)."""
        start = time.perf_counter()
        counts, admitted, gone = self.counts, 0, 0
        self._hostile = hostile = self._under_attack()
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                self._drained()
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of descriptors or memory: back off a little
                log.error("accepting connections failed (%s); retrying in 0.1 s", exc)
                self._pause(0.1)
                return
            counts["accepted"] += 1
            if _closed_already(conn):
                counts["closed_already"] += 1
                gone += 1
                conn.close()
            elif not self.admit():
                conn.close()
                self._note_refusal()
            else:
                admitted += 1
                self._serve(conn)
                if hostile:  # one admission per HOSTILE_PACE
                    counts["hostile_paced"] += 1
                    self._shrink()
                    self._pause(HOSTILE_PACE)
                    return
            if admitted >= self.batch or time.perf_counter() - start >= self.budget:
                counts["paced_rounds"] += 1
                if gone > admitted:
                    self._shrink()
                self._pause(self.pace)
                return

    def _serve(self, conn: socket.socket) -> None:
        self.counts["admitted"] += 1
        conn.setblocking(False)
        loop = self.loop
        task = loop.create_task(loop.connect_accepted_socket(self.factory, conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pause(self, seconds: float) -> None:
        """Stop watching the socket; the next round runs in ``seconds``."""
        if self._watching:
            self.loop.remove_reader(self.sock.fileno())
            self._watching = False
        self._timer = self.loop.call_later(seconds, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if not self._closed:
            self._round()

    def _under_attack(self) -> bool:
        """Whether peers hosting nothing were dropped within the last HOSTILE_HOLD s."""
        if self.failures is None:
            return False
        now = time.monotonic()
        seen = self.failures()
        if seen != self._failures_seen:
            self._failures_seen = seen
            self._hostile_until = now + HOSTILE_HOLD
        return now < self._hostile_until

    def _shrink(self) -> None:
        if self.backlog is not None and not self._shrunk and self.backlog > FLOOD_BACKLOG:
            self.sock.listen(FLOOD_BACKLOG)  # Linux applies a new backlog to a listening socket
            self._shrunk = True
            self.counts["backlog_shrunk"] += 1

    def _drained(self) -> None:
        """The queue is empty: wait for the socket again (with the configured backlog)."""
        if self._shrunk and not self._hostile and not self._closed and self.backlog is not None:
            self.sock.listen(self.backlog)
            self._shrunk = False
        if not self._watching and not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._round)
            self._watching = True

    def _note_refusal(self) -> None:
        now = time.monotonic()
        self._refused += 1
        self.counts["refused"] += 1
        if now - self._refused_since >= _REFUSAL_LOG_EVERY:
            log.error(
                "refused %d connection(s): %d peers are still in the handshake (max_pending)",
                self._refused,
                self.pending(),
            )
            self._refused, self._refused_since = 0, now

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watching:
            self.loop.remove_reader(self.sock.fileno())
            self._watching = False
        self.sock.close()

    async def wait_closed(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _closed_already(conn: socket.socket) -> bool:
    """Whether the peer of a just-accepted connection has already closed it (end of file
    or a reset, nothing to read): one non-blocking peek, no transport needed."""
    try:
        return conn.recv(1, _PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False  # open, nothing sent yet
    except OSError:
        return True  # reset
