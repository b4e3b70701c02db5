"""The asyncio adapter of one hub-side driver connection: an
:class:`asyncio.BufferedProtocol` that moves bytes between the socket and the sans-I/O
:class:`~maxwellhub.protocol.connection.Connection`, and is that connection's
:class:`~maxwellhub.protocol.connection.Link` (abort, close, one deadline timer, delayed
sends, the shared-memory lane offer).

asyncio reads straight into the connection's decoder buffer; whatever bytes the
connection returns are written to the transport, or, once the driver is steady (read by
the steady reader of :mod:`maxwellhub.hub.fastpath`), straight to the socket when the
transport holds nothing.

What it needs of the hub is :class:`HubView` (no import of the hub: no cycle); the hub
makes one adapter per accepted connection (``Hub._new_driver``). An adapter never decides
a protocol question (what a frame means, what to answer, when a session ends: the
connection does) nor hub policy (admission, binding, steps, stopping: the hub does); it
only reads, writes, arms timers and reports what the socket did.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any, Protocol, cast

from ..liveness import keepalive
from ..net.buffers import keep_freed_memory, widen_socket_buffers
from ..protocol import wire
from ..protocol.auth import Secret
from ..protocol.connection import Connection, HubCallbacks
from . import shm
from .fastpath import SteadyReader

__all__ = ["DriverProtocol", "HubView", "adapter_of"]


class HubView(HubCallbacks, Protocol):
    """What an adapter needs of its :class:`~maxwellhub.hub.Hub` (no import of it: no
    cycle): the connection's callbacks and settings, the steady reader, the shared-memory
    lane option and pending lanes. ``_connection_made`` is the hub's own, shared with its
    adapters only."""

    timeout: float | None
    handshake_timeout: float  # always set on a hub (its default, or the step timeout)
    limits: wire.Limits
    dialect: str
    auth: Secret | None
    steady: SteadyReader | None
    shm_lane: bool | None
    lanes: shm.PendingLanes

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    def _connection_made(self, conn: Connection) -> None: ...


class DriverProtocol(asyncio.BufferedProtocol):
    """The asyncio face of one driver connection: a thin adapter that feeds the bytes it
    reads to a :class:`~maxwellhub.protocol.connection.Connection` (the protocol, sans
    I/O) and writes the bytes the connection returns. It is the connection's
    :class:`~maxwellhub.protocol.connection.Link`: aborting, closing, one deadline timer."""

    #: Set by connection_made, which the event loop calls before any other method.
    transport: asyncio.Transport
    write: Callable[[Any], None]  # the transport's writelines, or _write_direct when steady

    def __init__(self, hub: HubView, number: int) -> None:
        self.hub = hub
        self.number = number
        self.loop = hub.loop  # made only by a started hub's listener
        self.conn = Connection(
            hub,
            number,
            limits=hub.limits,
            dialect=hub.dialect,
            auth=hub.auth,
            handshake_timeout=hub.handshake_timeout,
            step_timeout=hub.timeout,
        )
        self.conn.link = self
        # asyncio reads straight into the decoder's buffer: no frame of ours in between
        self.get_buffer = self.conn.read_buffer  # type: ignore[method-assign]
        self._timer: asyncio.TimerHandle | None = None
        self.bye: asyncio.Future[Any] | None = None
        self._fd = -1  # the socket's fd while the steady reader reads it

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport (asyncio's or uvloop's) is an asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.write = self.transport.writelines
        peer = transport.get_extra_info("peername")
        if peer:
            self.conn.peer = f"driver#{self.conn.number} ({peer[0]}:{peer[1]})"
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                keepalive(sock)  # a vanished host is noticed in LOST_HOST_SECONDS
        self.hub._connection_made(self.conn)
        self.write(self.conn.start())

    # asyncio receives straight into the decoder's buffer (BufferedProtocol): a batched
    # frame of 10^6 molecules is 48 MB, and copying it read by read cost as much again.
    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        out = self.conn.received(nbytes)
        if out:
            self.write(out)

    def data_received(self, data: bytes) -> None:
        """The same as a buffered read (for callers that hand bytes in)."""
        out = self.conn.receive_data(data)
        if out:
            self.write(out)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_steady()
        self.conn.connection_lost(exc)

    def _leave_steady(self) -> None:
        steady = self.hub.steady
        if steady is not None:
            steady.forget(self)

    # -- the steady reader (maxwellhub.hub.fastpath)
    @property
    def small_frames(self) -> bool:
        return self.conn.batch is None

    def joined(self, fd: int) -> None:
        self._fd = fd
        self.write = self._write_direct

    def left(self) -> None:
        self._fd = -1  # given back: the socket may close and its number be reused
        self.write = self.transport.writelines

    def _write_direct(self, parts: list[Any]) -> None:
        """Write one buffer straight to the socket when the transport holds nothing
        (the step's field: no copy, no transport bookkeeping); the rest, and whatever
        the socket does not take, through the transport, which keeps the order."""
        transport = self.transport
        data = parts[0] if len(parts) == 1 else None
        if type(data) is not bytes or transport.get_write_buffer_size() or transport.is_closing():
            self._queue(parts)
            return
        try:
            sent = os.write(self._fd, data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the transport meets the error too and closes the connection
            self._queue(parts)
            return
        if sent < len(data):
            self._queue([memoryview(data)[sent:]])

    def _queue(self, parts: list[Any]) -> None:
        """Write through the transport (it keeps what the socket does not take, in order);
        the steady step then must not write to this socket directly until it is empty."""
        steady = self.hub.steady
        if steady is not None:
            steady.queued()
        self.transport.writelines(parts)

    # -- Link
    def abort(self) -> None:
        self._leave_steady()
        self.transport.abort()

    def close(self) -> None:
        self._leave_steady()
        self.transport.close()

    def arm(self, seconds: float) -> None:
        self.disarm()
        self._timer = self.loop.call_later(seconds, self._expired, seconds)

    def _expired(self, seconds: float) -> None:
        self._timer = None
        self.conn.expired(seconds)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def later(self, seconds: float, callback: Callable[[], list[Any]]) -> None:
        self.loop.call_later(seconds, self._send_from, callback)

    def _send_from(self, callback: Callable[[], list[Any]]) -> None:
        out = callback()
        if out:
            self.write(out)

    def hosting(self, molecules: int) -> None:
        keep_freed_memory(molecules)
        widen_socket_buffers(self.transport.get_extra_info("socket"), molecules)

    def ended(self, said_bye: bool) -> None:
        if self.bye is not None and not self.bye.done():
            self.bye.set_result(said_bye)

    def offer_lane(self, parts: list[Any], extras: int) -> shm.HubLane | None:
        hub = self.hub
        return shm.offer(
            self.conn, self.transport, self.loop, hub.shm_lane, parts, extras, hub.lanes
        )

    # -- for the hub
    def send_end(self) -> asyncio.Future[Any]:
        """End the session (STOP or EXIT); the future says whether it ended politely."""
        self.bye = self.loop.create_future()
        out = self.conn.send_end()
        if out:
            self.write(out)
        return self.bye


def adapter_of(conn: Connection) -> DriverProtocol:
    """The asyncio adapter of a hub's connection (every connection of a Hub has one)."""
    return cast(DriverProtocol, conn.link)
