"""The admission-controlled listener: accepts in small batches and refuses new peers at
once while too many are still in their handshake, so a connect-and-close flood cannot
queue thousands of callbacks ahead of the barrier's replies."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

__all__ = ["Listener"]

log = logging.getLogger("maxwellhub.hub")

_ACCEPT_BATCH = 16  # connections accepted per event-loop wake-up
_REFUSAL_LOG_EVERY = 10.0  # seconds between summary lines about refused connections


class Listener:
    """The hub's listening socket. It accepts at most ``_ACCEPT_BATCH`` connections per
    wake-up of the event loop (asyncio's own server accepts up to ``backlog`` at once, so
    a connect-and-close flood queued thousands of callbacks ahead of the barrier's
    replies), and closes new connections at once while too many peers are still in the
    handshake (``admit()`` says no: ``Hub.max_pending``), with one summary line per 10 s.
    Same ``close``, ``wait_closed`` and ``sockets`` as an ``asyncio.Server``.

    ``factory`` makes the protocol of an accepted connection; ``admit()`` says whether one
    more may start its handshake; ``pending()`` counts those in the handshake (for the
    summary line)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Callable[[], asyncio.BaseProtocol],
        admit: Callable[[], bool],
        pending: Callable[[], int],
    ) -> None:
        self.factory, self.admit, self.pending = factory, admit, pending
        self.sock = sock
        self.sockets = [sock]
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._refused = 0
        self._refused_since = 0.0
        self._paused: asyncio.TimerHandle | None = None
        sock.setblocking(False)
        self.loop = loop
        self.loop.add_reader(sock.fileno(), self._accept)

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

    def _accept(self) -> None:
        loop = self.loop
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of descriptors or memory: back off a little
                log.error("accepting connections failed (%s); retrying in 0.1 s", exc)
                loop.remove_reader(self.sock.fileno())
                self._paused = loop.call_later(0.1, self._resume)
                return
            if not self.admit():
                conn.close()
                self._note_refusal()
                continue
            conn.setblocking(False)
            task = loop.create_task(loop.connect_accepted_socket(self.factory, conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resume(self) -> None:
        self._paused = None
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _note_refusal(self) -> None:
        now = time.monotonic()
        self._refused += 1
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
        if self._paused is not None:
            self._paused.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    async def wait_closed(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
