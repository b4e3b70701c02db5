"""The hub side of the shared-memory lane (:mod:`maxwellhub.net.shm_lane`) on a live connection.

An ensemble driver on a UNIX socket offers the lane in its MXHHELLO flags
(:data:`maxwellhub.protocol.wire.HELLO_SHM_LANE`). The connection machine asks its I/O layer to
answer that offer (:func:`offer`, called by ``Link.offer_lane``); when the hub wants the
lane (``Hub(shm_lane=...)``: by default on for a UNIX socket, never on TCP) the answer is
MXHSHMLANE with the segment and its doorbells passed as descriptors (``SCM_RIGHTS``) on
the connection's own socket, else MXHSHMLANE of size 0. The connection then steps the
driver through the :class:`HubLane` it was handed: :meth:`HubLane.post` writes the fields
and rings the driver; the driver's bell is an event-loop reader whose callback feeds the
sources and extras to the connection machine as the MXHSOURCES event a socket would have
delivered, so the barrier, the replay history and every check downstream are the socket
path's, bit for bit.

A hub keeps at most :data:`MAX_PENDING_LANES` lanes offered to connections that are not
bound to molecules yet (:class:`PendingLanes`): a flood of MXHHELLO-only connections cannot
make it map a segment and open two eventfds for each. An offer beyond that is answered
MXHSHMLANE of size 0, so that driver steps on its socket, as the protocol allows.

The socket stays the connection: STOP, EXIT, replayed steps and the driver's death (EOF)
travel on it as without a lane. Nothing of the lane has a name in the file system (a memfd
and two eventfds): the kernel frees it with the last descriptor or mapping, at stop or
after a crash of either side. This module must never block: it writes and reads memory
and rings eventfds.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..net import shm_lane
from ..protocol import wire

if TYPE_CHECKING:
    import asyncio

    from ..protocol.connection import Connection

__all__ = ["MAX_PENDING_LANES", "HubLane", "PendingLanes", "offer", "wanted"]

log = logging.getLogger("maxwellhub.hub")

#: Lanes one hub keeps offered to connections not bound to molecules yet, at most: far
#: more than drivers start at once (each is bound one round trip after its MXHHELLO).
MAX_PENDING_LANES = 64


def wanted(option: bool | None, transport: asyncio.BaseTransport) -> bool:
    """Whether the hub offers a lane on this connection: ``option`` (None: yes on a UNIX
    socket) and a Linux UNIX stream socket (a lane over TCP would be another node's)."""
    if option is False or not sys.platform.startswith("linux"):
        return False
    sock = transport.get_extra_info("socket")
    return sock is not None and sock.family == socket.AF_UNIX


class HubLane:
    """One accepted (or offered) lane of one connection, hub side.

    ``post`` and ``close`` are what the connection machine calls; the bell callback is
    registered on ``loop`` once the driver accepted (:meth:`settle`)."""

    def __init__(
        self,
        conn: Connection,
        lane: shm_lane.Lane,
        loop: asyncio.AbstractEventLoop,
        write: Any,
    ) -> None:
        self.conn = conn
        self.lane = lane
        self.loop = loop
        self.write = write  # the transport's writelines
        self.active = False
        self.closed = False

    def settle(self, accepted: bool) -> None:
        """The driver's MXHSHMOK (True) or MXHSHMNO (False)."""
        if not accepted:
            log.info("%s declined the shared-memory lane: batched frames on its socket", self.conn)
            self.close()
            return
        self.active = True
        self.loop.add_reader(self.lane.to_hub, self._on_bell)
        log.info(
            "%s: shared-memory lane for %d molecules (extras up to %d arrays)",
            self.conn,
            self.lane.molecules,
            self.lane.n_extras,
        )

    def post(self, fields: npt.NDArray[Any], flags: int) -> None:
        """Write one step's (M, 3) fields and MXHFIELDS flags, ring the driver."""
        lane = self.lane
        lane.flags = flags
        lane.fields[...] = fields
        lane.post(lane.step + 1)

    def _on_bell(self) -> None:
        """The driver rang: its sources (and extras) of the step, as an MXHSOURCES event."""
        conn, lane = self.conn, self.lane
        try:
            sources = lane.take_sources()
            extras = lane.read_extras() if lane.n_extras else {}
        except BlockingIOError:
            return  # no ring after all (the counter was read already)
        except shm_lane.LaneError as exc:
            conn.fail(f"shared-memory lane: {exc}")
            return
        if not np.isfinite(sources).all():
            bad = int(np.flatnonzero(~np.isfinite(sources).all(axis=1))[0])
            conn.fail(
                "MXHSOURCES (shared-memory lane): value of molecule index "
                f"{bad} is not finite {sources[bad].tolist()!r}"
            )
            return
        conn.dispatch(wire.SourcesBatch(sources, extras))
        out = conn.data_to_send()
        if out:
            self.write(out)

    def close(self) -> None:
        """Stop listening to the bell and release the segment (idempotent)."""
        self.closed = True
        if self.active:
            self.active = False
            self.loop.remove_reader(self.lane.to_hub)
        self.lane.close()
        if self.conn.lane is self:
            self.conn.lane = None


class PendingLanes:
    """The lanes one hub offered to connections not bound to molecules yet: at most
    ``limit`` of them. A lane leaves the count when its connection is bound or the lane
    is closed (its connection ended, or the driver declined it); :attr:`refused` counts
    the offers answered with size 0 because the count was full."""

    def __init__(self, limit: int = MAX_PENDING_LANES) -> None:
        self.limit = limit
        self.lanes: list[HubLane] = []
        self.refused = 0

    def room(self) -> bool:
        """Whether one more lane may be offered (the count is brought up to date first:
        at most ``limit`` lanes to look at)."""
        self.lanes = [lane for lane in self.lanes if not lane.closed and not lane.conn.molecules]
        return len(self.lanes) < self.limit

    def refuse(self, conn: Connection) -> None:
        self.refused += 1
        # a WARNING whose first argument is a connection hosting no molecule: the hub's
        # PeerLog rate-limits these lines into summaries that keep the count
        log.warning(
            "%s: no shared-memory lane: %d lanes offered to connections not bound yet is "
            "the cap; it steps on its socket",
            conn,
            self.limit,
        )


def offer(
    conn: Connection,
    transport: asyncio.Transport,
    loop: asyncio.AbstractEventLoop,
    option: bool | None,
    parts: list[Any],
    extras: int,
    pending: PendingLanes | None = None,
) -> HubLane | None:
    """Write ``parts`` (what the connection queued before, MXHWELCOME at least), then
    answer the driver's lane offer: MXHSHMLANE with the segment and doorbells attached
    when the hub wants a lane here and ``pending`` (the hub's lanes not bound yet) has
    room, else MXHSHMLANE of size 0. The lane to step with once the driver accepts it,
    or None."""
    molecules = conn.size
    if not wanted(option, transport) or transport.get_write_buffer_size():
        # (bytes still queued in the transport would follow the descriptors' frame)
        transport.writelines([*parts, wire.encode_shm_lane(molecules, extras, 0)])
        return None
    if pending is not None and not pending.room():
        pending.refuse(conn)
        transport.writelines([*parts, wire.encode_shm_lane(molecules, extras, 0)])
        return None
    seg, mm, size = shm_lane.new_segment(molecules, extras)
    to_driver = to_hub = -1
    try:
        to_driver = os.eventfd(0, os.EFD_CLOEXEC)
        to_hub = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        lane = shm_lane.Lane("hub", mm, molecules, extras, to_driver, to_hub, None)
        data = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
        data += wire.encode_shm_lane(molecules, extras, size)
        raw = transport.get_extra_info("socket")
        # A second socket object on a duplicate of the connection's descriptor: the
        # transport's own object (asyncio's TransportSocket, uvloop's) cannot sendmsg.
        with socket.socket(fileno=os.dup(raw.fileno())) as sock:
            sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fds(seg, lane))])
    except BlockingIOError:
        sent = -1
    except BaseException:
        for fd in (to_driver, to_hub):
            if fd >= 0:
                os.close(fd)
        mm.close()
        raise
    finally:
        os.close(seg)  # the driver holds its own copy now (or nobody needs it)
    if sent != len(data):
        lane.close()
        if sent < 0:  # nothing left: the socket is full at the handshake; no lane then
            transport.writelines([*parts, wire.encode_shm_lane(molecules, extras, 0)])
            return None
        conn.fail(f"the lane offer was cut short ({sent} of {len(data)} bytes written)")
        return None
    hub_lane = HubLane(conn, lane, loop, transport.writelines)
    if pending is not None:
        pending.lanes.append(hub_lane)
    return hub_lane


def _fds(seg: int, lane: shm_lane.Lane) -> bytes:
    return np.array([seg, lane.to_driver, lane.to_hub], dtype=np.int32).tobytes()
