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

This module must never parse bytes itself or decide hub policy: it only moves bytes
between sockets and the connection adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
from collections.abc import Callable
from typing import Protocol

__all__ = ["SteadyReader", "can_wait_detached"]

_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_SMALL_READ = 1 << 16  # a read of a single-molecule driver (SOURCEREADY is 124 B + extras)


class Steady(Protocol):
    """A driver connection's asyncio adapter as the steady reader sees it."""

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


def can_wait_detached(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether :meth:`SteadyReader.wait` can wait for ``loop`` (the stdlib's selector loop, whose
    selector fd and timer heap it reads); other loops (uvloop) keep the steady reader attached."""
    return isinstance(loop, asyncio.SelectorEventLoop) and hasattr(loop, "_selector")


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
        self.attach()

    def __len__(self) -> int:
        return len(self.drivers)

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
        self._read(self.epoll.poll(0, len(self.drivers) + 2))

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
