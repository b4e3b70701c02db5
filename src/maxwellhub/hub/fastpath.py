"""The steady-state data path: the sockets of initialised drivers in one epoll set.

Once a driver is bound and initialised its connection leaves the event loop's reader set
and joins a :class:`SteadyReader`: one ``select.epoll`` holding every steady driver socket. A
read on it lands in the connection's decoder buffer and goes through the same protocol
adapter as a read by the loop (so partial frames, unexpected messages and the SOURCEREADY
fast path behave alike); only the per-driver cost of the loop (a selector key, a Handle,
a transport callback per ready socket) is gone. The loop stays the control plane:
handshakes, new connections, timers, the control endpoint, and every driver that reached
end of file or an error, which the steady reader hands back to its transport at once so the loop
sees the close as it always did.

Two ways to service the steady reader:

- *attached* (the async :class:`~maxwellhub.hub.Hub`, and the synchronous hub while it
  runs the loop for anything but a step): the steady reader's epoll fd is one reader of the loop;
  one callback reads every driver that is ready;
- *detached* (:meth:`SteadyReader.wait`, the synchronous hub's step): the calling thread waits on
  the steady reader's epoll, which then also holds the loop's own selector fd. Driver answers are
  read without any event-loop iteration; the loop runs one iteration only when one of its
  own descriptors is ready (a new connection, a handshake, the control endpoint) or one
  of its timers is due (a step deadline, a handshake deadline).

*Direct* steps (:class:`DirectStep`): the steady single-molecule drivers of a step get their
field blocks from one batched write and their replies from one batched read
(:mod:`maxwellhub.net.steadyio`, in C when built): a reply of the one clean SOURCEREADY
shape lands in the barrier's arrays without a Python call per driver; every other read
goes to the driver's protocol machine as before.

This module must never parse bytes itself or decide hub policy: it only moves bytes
between sockets and the connection adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import select
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from ..net import steadyio
from ..protocol import wire
from ..protocol.connection import all_direct_ready, mark_answered_direct, mark_sent_direct

if TYPE_CHECKING:
    from ..protocol.connection import Connection
    from .barrier import Barrier

__all__ = ["DirectStep", "SteadyReader", "can_wait_detached"]

_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_SMALL_READ = 1 << 16  # a read of a single-molecule driver (SOURCEREADY is 124 B + extras)


class Steady(Protocol):
    """A driver connection's asyncio adapter (:class:`~maxwellhub.hub.adapter.DriverProtocol`)
    as the steady reader sees it."""

    transport: asyncio.Transport

    @property
    def small_frames(self) -> bool:
        """Whether its frames are small (one molecule): read as bytes; else (an
        ensemble's frames of up to tens of MB) straight into the decoder's buffer."""

    def get_buffer(self, sizehint: int) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def joined(self, fd: int) -> None:
        """Its socket ``fd`` is read by the steady reader now (it may write to it directly)."""

    def left(self) -> None:
        """It is no longer read by the steady reader."""

    @property
    def conn(self) -> Connection:
        """Its protocol machine."""


def can_wait_detached(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether :meth:`SteadyReader.wait` can wait for ``loop`` (the stdlib's selector loop, whose
    selector fd and timer heap it reads); other loops (uvloop) keep the steady reader attached."""
    return isinstance(loop, asyncio.SelectorEventLoop) and hasattr(loop, "_selector")


_NO_ROWS = np.zeros(0, dtype=np.int64)
_NO_RAW = np.zeros(0, dtype=np.uint8)
_NO_TABLE = np.zeros(0, dtype=np.int32)


class _Plan:
    """The arrays of a :class:`DirectStep`, kept for the next step with the same drivers."""

    __slots__ = (
        "conns",
        "dirty",
        "fd_array",
        "fds",
        "generation",
        "protos",
        "raw",
        "row_array",
        "rows",
        "table",
    )

    def __init__(
        self,
        generation: int,
        protos: list[Steady],
        conns: list[Connection],
        fds: list[int],
        rows: list[int],
        fd_array: npt.NDArray[Any],
        row_array: npt.NDArray[Any],
        table: npt.NDArray[Any],
        raw: npt.NDArray[Any],
    ) -> None:
        self.generation, self.protos, self.conns = generation, protos, conns
        self.fds, self.rows = fds, rows
        self.fd_array, self.row_array, self.table, self.raw = fd_array, row_array, table, raw
        self.dirty = False

    def clean_raw(self) -> npt.NDArray[Any]:
        if self.dirty:
            self.raw[:] = 0
            self.dirty = False
        return self.raw


class DirectStep:
    """The drivers of one step whose blocks went out through :func:`steadyio.send` and whose
    replies :func:`steadyio.collect` reads (see the module notes). Index k is the order they
    were added in; ``rows[k]`` is the barrier row of driver k."""

    def __init__(
        self, barrier: Barrier, max_extras: int, plan: _Plan | None, members: dict[int, Steady]
    ) -> None:
        self.barrier = barrier
        self.members = members  # the steady reader's drivers by fd
        self.plan = plan  # the last step's arrays, reused when its drivers are the same
        self.max_extras = max_extras
        self.protos: list[Steady] = []
        self.conns: list[Connection] = []
        self.fds: list[int] = []
        self.rows: list[int] = []
        self.sent = 0  # how many of them were written so far
        # made by the first flush (empty until then; shared, never written)
        self._rows = _NO_ROWS
        self.raw = _NO_RAW  # k -> its reads go to its protocol machine
        self.table = _NO_TABLE  # fd -> k
        self.answered: list[int] = []
        self.done: npt.NDArray[Any] = barrier.done.view(np.uint8)

    def add(self, proto: Steady, fd: int, row: int) -> bool:
        """Take ``proto``'s block into the batched send when it may be (the steady reader
        reads its socket ``fd``, its transport holds nothing and its machine agrees; the
        machine is then BUSY). A socket the steady reader gave back may be closed and its
        number reused by the next connection: it never enters a step's table."""
        if self.members.get(fd) is not proto:
            return False
        transport = proto.transport
        if transport.get_write_buffer_size() or transport.is_closing():
            return False
        conn = proto.conn
        if not conn.send_step_direct():
            return False
        self.protos.append(proto)
        self.conns.append(conn)
        self.fds.append(fd)
        self.rows.append(row)
        return True

    def reuse(self, connections: int, fields: npt.NDArray[Any]) -> bool:
        """Send the whole step as the last one was sent, when the hub's ``connections``
        are exactly the last step's drivers, all still idle, in the same layout (so the
        same rows); else False and nothing is sent. (Nothing is queued on their
        transports: a write that queues drops the plan, see :meth:`SteadyReader.queued`.)"""
        plan = self.plan
        if (
            plan is None
            or self.fds
            or plan.generation != self.barrier.layout.generation
            or len(plan.conns) != connections
            or not all_direct_ready(plan.conns)
        ):
            return False
        mark_sent_direct(plan.conns)
        self.protos, self.conns = list(plan.protos), list(plan.conns)
        self.fds, self.rows = list(plan.fds), list(plan.rows)
        self.flush(fields)
        return True

    def flush(self, fields: npt.NDArray[Any]) -> None:
        """Write the blocks added since the last flush; what a socket did not take is queued
        on its transport (which then keeps the order)."""
        first = self.sent
        n = len(self.fds)
        if first == n:
            return
        if fields.dtype != np.float64 or not fields.flags.c_contiguous:
            fields = np.ascontiguousarray(fields, dtype=np.float64)
        plan = self.plan
        if first == 0 and plan is not None and plan.fds == self.fds and plan.rows == self.rows:
            fds, rows = plan.fd_array, plan.row_array  # the steady state: last step's arrays
        else:
            fds = np.array(self.fds[first:], dtype=np.int32)
            rows = np.array(self.rows[first:], dtype=np.int64)
        short = steadyio.send(fds, rows, fields)
        self.sent = n
        if first == 0 and plan is not None and fds is plan.fd_array:
            self._rows, self.table = plan.row_array, plan.table
            self.raw = plan.clean_raw()
        else:
            self._extend(first, fds)
        if short:
            self.queue_rest(short, first, fields, rows)

    def adopt(self, plan: _Plan) -> None:
        """The state right after ``plan``'s drivers were all sent their blocks (by the
        caller, as :meth:`reuse` would: :class:`~maxwellhub.hub.lane.SteadyLane`)."""
        self.protos, self.conns = list(plan.protos), list(plan.conns)
        self.fds, self.rows = list(plan.fds), list(plan.rows)
        self.sent = len(self.fds)
        self._rows, self.table = plan.row_array, plan.table
        self.raw = plan.clean_raw()

    def queue_rest(
        self,
        short: list[tuple[int, int]],
        first: int,
        fields: npt.NDArray[Any],
        rows: npt.NDArray[Any],
    ) -> None:
        """Queue on their transports what the sockets of drivers ``first + k`` did not
        take of their blocks (``short`` from :func:`steadyio.send`)."""
        self.plan = None  # their transports hold the rest now
        for k, sent in short:
            proto = self.protos[first + k]
            block = wire.encode_field_step(fields[rows[k]])
            proto.transport.write(block[sent:])

    def _extend(self, first: int, fds: npt.NDArray[Any]) -> None:
        """Arrays for drivers first.. (a new plan when first is 0)."""
        n = len(self.fds)
        self._rows = np.array(self.rows, dtype=np.int64)
        if first == 0:
            self.table = np.full(int(fds.max()) + 1, -1, dtype=np.int32)
            self.raw = np.zeros(n, dtype=np.uint8)
            self.plan = _Plan(
                self.barrier.layout.generation,
                list(self.protos),
                list(self.conns),
                list(self.fds),
                list(self.rows),
                fds,
                self._rows,
                self.table,
                self.raw,
            )
        else:  # more drivers joined the step (replacements): this step's own arrays
            self.plan = None
            self.raw = np.concatenate((self.raw, np.zeros(n - first, dtype=np.uint8)))
            top = int(fds.max()) + 1
            if top > len(self.table):
                grown = np.full(top, -1, dtype=np.int32)
                grown[: len(self.table)] = self.table
                self.table = grown
            else:
                self.table = self.table.copy()
        self.table[fds] = np.arange(first, n, dtype=np.int32)

    def drop(self, fd: int) -> None:
        """``fd`` left the steady reader (closed, or given back to the loop): no read of
        a later socket with that number may count as its driver's (nor may a later step
        reuse this plan)."""
        if 0 <= fd < len(self.table):
            self.table = self.table.copy()
            self.table[fd] = -1
        self.plan = None

    def collect(
        self, epoll: select.epoll, loop_fd: int, outer_fd: int, deadline: float
    ) -> tuple[int, int, bytes | None]:
        """One :func:`steadyio.collect` into the barrier; the machines of the drivers it
        answered are READY again and the barrier is woken when complete."""
        barrier = self.barrier
        status, waiting, last, who, data = steadyio.collect(
            epoll,
            loop_fd,
            outer_fd,
            self.table,
            self.raw,
            self._rows,
            barrier.sources,
            self.done,
            barrier.waiting,
            deadline,
            self.max_extras,
            barrier.extras,
            self.answered,
        )
        if self.answered:
            self.absorb(self.answered, waiting, last)
            self.answered.clear()
        return status, who, data

    def absorb(self, answered: list[int], waiting: int, last: int) -> None:
        """After a collect that took the replies of drivers ``answered`` (``waiting``
        rows left, ``last`` the last to answer): their machines are READY again and the
        barrier is woken when complete."""
        if not answered:
            return
        barrier = self.barrier
        mark_answered_direct(self.conns, answered)
        barrier.waiting = waiting
        if waiting == 0:
            barrier.last = self.conns[last]
            barrier.wake("done")

    def hand_over(self, k: int, data: bytes) -> None:
        """Driver k's read is not the clean reply: its protocol machine takes it (and,
        holding part of a frame now, every later read of this step)."""
        proto = self.protos[k]
        proto.data_received(data)
        if proto.conn.buffered:
            self.raw[k] = 1
            if self.plan is not None:  # the plan's array: cleared before it is reused
                self.plan.dirty = True


class SteadyReader:
    """Steady driver sockets in one epoll set (see the module notes)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.fd = self.epoll.fileno()
        self.drivers: dict[int, Steady] = {}
        # fds of drivers with small frames -> the protocol's data_received
        self._small: dict[int, Callable[[bytes], None]] = {}
        self._fd_of: dict[Steady, int] = {}
        self._handed_back = False  # a driver went back to the loop during a detached wait
        self._attached = False
        self._loop_fd = -1
        #: The current step's :class:`DirectStep`, if its hub made one; the last one's arrays.
        self.direct: DirectStep | None = None
        self.plan: _Plan | None = None
        self.attach()

    def __len__(self) -> int:
        return len(self.drivers)

    def queued(self) -> None:
        """A steady driver's write was queued on its transport: the next step must not
        write to its socket before the transport has drained (no plan reuse)."""
        self.plan = None
        if self.direct is not None:
            self.direct.plan = None

    @property
    def small(self) -> bool:
        """Whether it reads any single-molecule driver (one a :class:`DirectStep` can take)."""
        return bool(self._small)

    # -- membership
    def claim(self, proto: Steady) -> None:
        """Read ``proto``'s socket here instead of in the loop (idempotent)."""
        transport = proto.transport
        if transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return  # not a socket transport: the loop keeps it
        fd = sock.fileno()
        if fd in self.drivers or fd < 0:
            return
        transport.pause_reading()
        self.epoll.register(fd, _READ)
        self.drivers[fd] = proto
        self._fd_of[proto] = fd
        if proto.small_frames:
            self._small[fd] = proto.data_received
        proto.joined(fd)

    def forget(self, proto: Steady, *, resume: bool = False) -> None:
        """Stop reading ``proto``'s socket here; ``resume`` gives it back to the loop."""
        fd = self._fd_of.pop(proto, None)
        if fd is None:
            return
        del self.drivers[fd]
        self._small.pop(fd, None)
        self.plan = None
        if self.direct is not None:
            self.direct.drop(fd)
        proto.left()
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(fd)
        if resume:
            proto.transport.resume_reading()
            self._handed_back = True

    # -- servicing
    def attach(self) -> None:
        """Let the loop service the steady reader (one reader for every steady driver)."""
        if self._attached or self.epoll.closed:
            return
        if self._loop_fd >= 0:
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(self._loop_fd)
            self._loop_fd = -1
        self.loop.add_reader(self.fd, self.drain)
        self._attached = True

    def detach(self) -> None:
        """Service the steady reader from :meth:`wait` (the loop's selector joins the epoll)."""
        if not self._attached or self.epoll.closed:
            return
        self.loop.remove_reader(self.fd)
        self._attached = False
        self._loop_fd = self.loop._selector.fileno()  # type: ignore[attr-defined]
        self.epoll.register(self._loop_fd, select.EPOLLIN)

    def drain(self) -> None:
        """Read every ready driver once (the loop's reader callback)."""
        direct = self.direct
        if direct is not None and direct.barrier.waiting:
            self._collect(direct, -1, -1, -math.inf)
        else:
            self._read(self.epoll.poll(0, len(self.drivers) + 2))

    def _collect(self, direct: DirectStep, loop_fd: int, outer_fd: int, deadline: float) -> int:
        """Batched reads until the step is complete, nothing is ready by ``deadline``, or
        the loop is needed; the last status (DONE, LOOP, TIMEOUT or GONE)."""
        while True:
            status, who, data = direct.collect(self.epoll, loop_fd, outer_fd, deadline)
            if not self.absorb(direct, status, who, data):
                return int(status)
            if not direct.barrier.waiting:
                return steadyio.DONE

    def absorb(self, direct: DirectStep, status: int, who: int, data: bytes | None) -> bool:
        """Act on a collect's ``status``: a read for a driver's machine or a socket not in
        the step is read on (True: collect again); a driver's end gives it back to the
        loop (False, as for DONE, LOOP and TIMEOUT: the wait decides)."""
        if status == steadyio.DATA and data is not None:
            direct.hand_over(who, data)
            return True
        if status == steadyio.FOREIGN:
            self._read([(who, 0)])
            return True
        if status == steadyio.GONE:
            self.forget(direct.protos[who], resume=True)
        return False

    def wait_inline(self, outer_fd: int, deadline: float) -> bool:
        """The async hub's step, without leaving the coroutine: batched reads until the
        step is complete (True), or until the loop has work (its selector ``outer_fd`` is
        readable, a driver went back to it) or ``deadline`` (loop time) passes (False:
        the caller awaits the step as usual)."""
        direct = self.direct
        if direct is None:
            return False
        status = self._collect(direct, -1, outer_fd, self._monotonic(deadline))
        return status == steadyio.DONE

    def _monotonic(self, loop_time: float) -> float:
        """``loop_time`` on ``time.monotonic``'s clock (the C wait's)."""
        if math.isinf(loop_time):
            return loop_time
        return time.monotonic() + (loop_time - self.loop.time())

    def _read(self, ready: list[tuple[int, int]]) -> bool:
        """Read the ready drivers; True when the loop's own selector was among them."""
        drivers = self.drivers
        small = self._small.get
        read = os.read
        loop_ready = False
        for fd, _events in ready:
            received = small(fd)
            try:
                if received is not None:  # one SOURCEREADY: bytes for the fast path
                    data = read(fd, _SMALL_READ)
                    if data:
                        received(data)
                        continue
                else:
                    proto = drivers.get(fd)
                    if proto is None:
                        loop_ready = loop_ready or fd == self._loop_fd
                        continue
                    n = os.readv(fd, [proto.get_buffer(-1)])
                    if n:
                        proto.buffer_updated(n)
                        continue
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                pass  # the loop's own read meets the error (or end of file) and closes it
            gone = drivers.get(fd)
            if gone is not None:
                self.forget(gone, resume=True)
        return loop_ready

    def wait(
        self, done: Callable[[], bool], due_at: Callable[[], float], due: Callable[[], None]
    ) -> None:
        """Serve the steady reader and the loop until ``done()`` (detached; see the module notes);
        ``due()`` is called when the loop time passes ``due_at()`` (the step's alarm).

        Each pass waits once on the epoll set, until the earlier of the alarm and the
        loop's next timer, so no deadline (step, handshake, report) is ever late; nothing
        else bounds the wait, as a step without a deadline may last as long as the
        drivers compute."""
        loop = self.loop
        poll = self.epoll.poll
        ready_callbacks = loop._ready  # type: ignore[attr-defined]
        timers = loop._scheduled  # type: ignore[attr-defined]
        while not done():
            alarm = due_at()
            if timers:
                alarm = min(alarm, timers[0].when())
            timeout = alarm - loop.time()
            if ready_callbacks or self._handed_back or timeout <= 0:
                timeout = 0.0
            direct = self.direct
            if direct is not None:
                status = self._collect(direct, self._loop_fd, -1, time.monotonic() + timeout)
                if status == steadyio.DONE:
                    continue
                run_loop = True
                if status == steadyio.TIMEOUT and due_at() <= loop.time():
                    due()
                if not done():
                    self._handed_back = False
                    self._run_loop_once()
                continue
            events = poll(timeout, len(self.drivers) + 2)
            run_loop = self._read(events) or self._handed_back or bool(ready_callbacks)
            if not events:
                if due_at() <= loop.time():
                    due()
                run_loop = True  # a loop timer may be due
            if run_loop and not done():
                self._handed_back = False
                self._run_loop_once()

    def _run_loop_once(self) -> None:
        loop = self.loop
        stop = loop.call_soon(loop.stop)
        try:
            loop.run_forever()
        finally:  # interrupted (Ctrl-C from a callback): no stop left for a later run
            stop.cancel()

    def close(self) -> None:
        """Give every driver back to the loop and close the epoll set."""
        if self.epoll.closed:
            return
        for proto in list(self.drivers.values()):
            self.forget(proto, resume=True)
        if self._attached:
            self.loop.remove_reader(self.fd)
            self._attached = False
        self.epoll.close()
