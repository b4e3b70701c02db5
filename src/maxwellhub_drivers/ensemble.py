"""Ensemble drivers: one process hosting M molecules, stepped with one batched frame.

``maxwellhub-driver --molecules M ...`` opens with MXHHELLO (maxwellhub's batched frames,
version 1, see :mod:`maxwellhub.protocol.wire`), is bound by the hub to M molecule ids at once,
and every step receives all M fields in one MXHFIELDS frame and answers all M sources
and per-molecule extras arrays in one MXHSOURCES frame (all of them, the dipoles only, or
none, as the frame's flags ask). The model is the same batched
model a single driver or the Meep process uses, so M molecules in one ensemble follow the
same trajectories as M single drivers. The protocol is the driver-side machine
:class:`maxwellhub.protocol.session.Session` in batched mode; this module is its model
side.

Only a maxwellhub hub answers MXHHELLO; against any other hub this driver stops with a
clear message (use M = 1 there). This module never pickles and never converts units.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from maxwellhub.net.buffers import keep_freed_memory, widen_socket_buffers
from maxwellhub.protocol import wire
from maxwellhub.protocol.session import Session, SessionState

from .client import REFUSED, DriverSide, HubClosed, ModelFailed
from .shm_driver import for_session

__all__ = ["EnsembleSession"]


class EnsembleSession(DriverSide):
    """The model side of one ensemble connection: authentication, continuity, STOP and
    EXIT as a single driver's (inherited); fields, sources and extras batched."""

    recv_size = 1 << 20  # straight into the decoder's buffer: a frame of 10^6 fields is 24 MB

    def make_session(self) -> Session:
        n = self.model.n
        keep_freed_memory(n)  # a process serving one large ensemble
        widen_socket_buffers(self.sock, n)
        self.flags = wire.WANT_EXTRAS
        # An INIT may list every molecule id (when they are not consecutive).
        limits = wire.Limits(max_init_bytes=(1 << 20) + 24 * n, max_batch=max(n, 1))
        # The shared-memory lane (drivers.shm_driver), offered on a UNIX socket.
        self.lane = lane = for_session(self)
        if lane is None:
            return Session(self, n, batched=True, limits=limits)
        return Session(
            self,
            n,
            batched=True,
            limits=limits,
            hello_flags=lane.hello_flags(),
            lane_offer=lane.on_offer,
        )

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.lane is not None:
                self.lane.close()

    def receiver(self) -> Callable[[memoryview], int]:
        # With a lane, reads serve lane steps until the socket has bytes.
        return self.sock.recv_into if self.lane is None else self.lane.receive

    def who(self) -> str:
        binding = self.session.binding
        if binding is None:
            return f" ({self.model.n} molecules, not bound yet)"
        ids = binding.molecule_ids
        return f" (molecules {ids[0]}..{ids[-1]})"

    def closed(self) -> HubClosed:
        session = self.session
        if session.state is SessionState.PROVING:
            return HubClosed(REFUSED)
        if not session.welcomed:
            return HubClosed(
                "the hub closed the connection without answering MXHHELLO: it does not "
                "speak maxwellhub's batched frames (ensemble drivers need a maxwellhub "
                "hub; use --molecules 1 with other hubs)"
            )
        return HubClosed("the hub closed the connection before STOP or EXIT")

    def stage(self, fields: np.ndarray, flags: int) -> None:
        self.flags = flags
        try:
            self.model.stage(fields)
        except Exception as exc:
            raise ModelFailed(
                f"step {self.session.steps + 1} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def commit(self) -> tuple[Any, Any]:
        try:
            self._before = self.model.get_state() if self.continuity.memory else None
            sources = self.model.commit()
            return sources, self.extras()
        except Exception as exc:
            raise ModelFailed(f"commit failed: {type(exc).__name__}: {exc}") from exc

    def extras(self) -> dict | None:
        """The extras arrays the last MXHFIELDS asked for (its flags): all of them
        (WANT_EXTRAS), the dipoles only (WANT_DIPOLES, from ``model.dipoles()``, plus
        ``mux_m_au``... when the model reports them), or none."""
        flags = self.flags
        if flags & wire.WANT_EXTRAS:
            return self.model.extras()
        if not flags & wire.WANT_DIPOLES:
            return None
        dipoles = self.model.dipoles()
        out = {key: dipoles[:, k] for k, key in enumerate(wire.DIPOLE_KEYS)}
        if set(wire.DIPOLE_M_KEYS) <= set(self.model.extras_keys):
            extras = self.model.extras()
            out.update((key, extras[key]) for key in wire.DIPOLE_M_KEYS)
        return out
