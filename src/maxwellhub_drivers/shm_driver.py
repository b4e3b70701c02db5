"""The driver side of the shared-memory lane (:mod:`maxwellhub.net.shm_lane`) for an ensemble.

An ensemble session on a UNIX socket offers the lane in its MXHHELLO flags
(:meth:`DriverLane.hello_flags`). Until the hub answered (MXHSHMLANE, right after
MXHWELCOME) the session reads with room for descriptors (:meth:`DriverLane.receive`),
because the segment and its doorbells come attached to that frame. It maps the segment
and answers MXHSHMOK, or MXHSHMNO when the segment does not check out (and stays on
batched frames). From then on the session waits in one poll on the hub's doorbell and
its socket: a ring is a step (the fields are read from the segment, the model steps as
for an MXHFIELDS frame, the sources and extras are written back and the hub's bell rung);
bytes on the socket (STOP, EXIT, a replayed step) or its EOF go to the session as
without a lane. A step whose extras do not fit the lane is answered with MXHSOURCES.

The hook into :class:`drivers.ensemble.EnsembleSession` is small on purpose: the session
asks :func:`for_session` for a lane, sends its hello flags, reads through
:meth:`DriverLane.receive`, and hands MXHSHMLANE to :meth:`DriverLane.on_offer`; a lane
step goes through the session machine
(:meth:`maxwellhub.protocol.session.Session.lane_step`). This module never pickles and
never converts units.
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import sys
from typing import TYPE_CHECKING

import numpy as np

from maxwellhub.errors import ProtocolError
from maxwellhub.net import shm_lane
from maxwellhub.protocol import wire

from .client import send_parts

if TYPE_CHECKING:
    from .ensemble import EnsembleSession

__all__ = ["ENV", "DriverLane", "for_session"]

#: Set to 0 to keep an ensemble driver off the lane (it then never offers it).
ENV = "MAXWELLHUB_SHM_LANE"
_ANC = socket.CMSG_SPACE(3 * array.array("i").itemsize)


def for_session(session: EnsembleSession) -> DriverLane | None:
    """A lane to offer for ``session``: on Linux, on a UNIX socket, unless the
    environment says ``MAXWELLHUB_SHM_LANE=0``; else None (batched frames only)."""
    if os.environ.get(ENV, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return None
    if session.sock.family != socket.AF_UNIX:
        return None
    return DriverLane(session)


class DriverLane:
    """The lane of one ensemble session, from its offer to its end."""

    def __init__(self, session: EnsembleSession) -> None:
        self.session = session
        self.sock = session.sock
        self.log: logging.Logger = session.log
        model = session.model
        # Every extras array a step may ask for: all the model reports, or the dipoles.
        keys = set(model.extras_keys) | set(wire.DIPOLE_KEYS)
        self.n_extras = min(len(keys), wire.SHM_MAX_EXTRAS)
        self.pending = True  # offered, no MXHSHMLANE yet: read with room for descriptors
        self.fds: list[int] = []  # descriptors received before their frame was decoded
        self.lane: shm_lane.Lane | None = None
        self._poller: select.poll | None = None
        self._bell = -1

    def hello_flags(self) -> int:
        return wire.hello_lane_flags(self.n_extras)

    # -- reading
    def receive(self, buf: memoryview) -> int:
        """``sock.recv_into(buf)`` for the session: with a lane, serve lane steps until
        the socket has bytes (or EOF); before the hub's answer, keep the descriptors."""
        if self.lane is not None:
            self._serve_until_socket()
        if not self.pending:
            return self.sock.recv_into(buf)
        n, anc, flags, _ = self.sock.recvmsg_into([buf], _ANC)
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            self._close_fds()
            raise ProtocolError("the hub passed more descriptors than a lane has")
        return n

    def _serve_until_socket(self) -> None:
        # No deadline: the hub's death is the socket's EOF in this same poll (a driver
        # waits for its hub as long as it lives, as on the socket).
        poller, bell = self._poller, self._bell
        assert poller is not None
        while True:
            ready = poller.poll()
            rang = any(fd == bell for fd, _ in ready)
            if rang:
                self.step()
            if len(ready) > rang:  # the socket: bytes or EOF, for the session
                return

    # -- the handshake
    def on_offer(self, offer: wire.ShmLane) -> None:
        """MXHSHMLANE: map the segment and answer MXHSHMOK, or MXHSHMNO and stay on
        batched frames; size 0 is the hub declining (nothing to answer)."""
        if not self.pending:
            self._close_fds()
            raise ProtocolError("a second MXHSHMLANE from the hub")
        self.pending = False
        fds, self.fds = self.fds, []
        if offer.size == 0:
            for fd in fds:
                os.close(fd)
            self.log.info("the hub keeps this ensemble on its socket (no shared-memory lane)")
            return
        try:
            if offer.molecules != self.session.model.n:
                for fd in fds:
                    os.close(fd)
                raise shm_lane.LaneError(
                    f"a lane for {offer.molecules} molecules; this driver hosts "
                    f"{self.session.model.n}"
                )
            lane = shm_lane.map_offer(offer, fds, None)  # consumes the descriptors
        except (shm_lane.LaneError, OSError, ValueError) as exc:
            self.log.warning("declining the shared-memory lane: %s", exc)
            self.sock.sendall(wire.encode_shm_answer(False))
            return
        self.lane = lane
        self._bell = lane.to_driver
        self._poller = poller = select.poll()
        poller.register(lane.to_driver, select.POLLIN)
        poller.register(self.sock.fileno(), select.POLLIN)
        self.sock.sendall(wire.encode_shm_answer(True))
        self.log.info("stepping through a shared-memory lane (%d molecules)", lane.molecules)

    # -- a step
    def step(self) -> None:
        """The hub rang: the fields from the segment through the session machine (as
        MXHFIELDS + GETFORCE), the answer into the segment and the hub's bell, or on the
        socket when its extras do not fit the lane."""
        driver, lane = self.session, self.lane
        assert lane is not None
        try:
            fields = lane.wait_fields()
        except shm_lane.LaneError as exc:
            raise ProtocolError(f"shared-memory lane: {exc}") from None
        flags = lane.flags
        if flags & ~wire.FIELDS_FLAGS:
            raise ProtocolError(
                f"shared-memory lane: flags {flags} has bits other than "
                "WANT_EXTRAS (1) and WANT_DIPOLES (2)"
            )
        # The model gets the array an MXHFIELDS frame decodes to: a copy, (M, 3) over
        # (3, M) storage, so that both paths hand it the same bits in the same layout.
        staged = np.empty((3, lane.molecules)).T
        staged[...] = fields
        if not np.isfinite(staged).all():
            raise ProtocolError("shared-memory lane: the fields are not all finite")
        machine = driver.session
        sources, extras = machine.lane_step(staged, flags)
        if lane.write_extras(extras):
            lane.post_sources(sources)
        else:  # extras that do not fit the lane: this answer goes on the socket
            send_parts(self.sock, machine.encode_answer(sources, extras))
        machine.sent()  # after the answer left: continuity files never run ahead

    def close(self) -> None:
        self._close_fds()
        if self.lane is not None:
            self.lane.sock = None  # the session's socket is not the lane's to close
            self.lane.close()
            self.lane = None

    def _close_fds(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)
