"""Ensemble drivers: one process hosting M molecules, stepped with one batched frame.

``maxwellhub-driver --molecules M ...`` opens with MXHHELLO (maxwellhub's batched frames,
version 1, see :mod:`maxwellhub.wire`), is bound by the hub to M molecule ids at once,
and every step receives all M fields in one MXHFIELDS frame and answers all M sources
and per-molecule extras arrays in one MXHSOURCES frame (all of them, the dipoles only, or
none, as the frame's flags ask). The model is the same batched
model a single driver or the Meep process uses, so M molecules in one ensemble follow the
same trajectories as M single drivers.

Only a maxwellhub hub answers MXHHELLO; against any other hub this driver stops with a
clear message (use M = 1 there). This module never pickles and never converts units.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from maxwellhub import wire
from maxwellhub.errors import ProtocolError
from maxwellhub.net.buffers import keep_freed_memory, widen_socket_buffers
from maxwellhub.protocol.init import parse_ensemble_init

from .client import (
    _HAVEDATA,
    _NEEDINIT,
    _READY,
    REFUSED,
    HubClosed,
    ModelFailed,
    _Session,
)
from .models import Model
from .shm_driver import DriverLane, for_session

if TYPE_CHECKING:
    from maxwellhub.auth import Secret

    from .checkpoint import Continuity

__all__ = ["EnsembleSession"]


class EnsembleSession(_Session):
    """The state machine of one ensemble connection. Authentication, STOP and EXIT are
    handled as in a single driver's session (inherited); the rest is batched."""

    def __init__(
        self,
        sock: socket.socket,
        model: Model,
        log: logging.Logger,
        secret: Secret | None = None,
        continuity: Continuity | None = None,
    ) -> None:
        super().__init__(sock, model, log, secret, continuity)
        keep_freed_memory(model.n)  # a process serving one large ensemble
        widen_socket_buffers(sock, model.n)
        # An INIT may list every molecule id (when they are not consecutive).
        self.decoder = wire.Decoder(
            reader="driver",
            limits=wire.Limits(max_init_bytes=(1 << 20) + 24 * model.n, max_batch=max(model.n, 1)),
        )
        self.welcomed = False
        self.ids: list[int] | None = None
        self.dt_au: float | None = None
        self.flags = wire.WANT_EXTRAS
        self.handlers = {
            wire.Welcome: self.on_welcome,
            wire.Status: self.on_status,
            wire.Init: self.on_init,
            wire.FieldsBatch: self.on_fields,
            wire.GetForce: self.on_getforce,
            wire.Stop: self.on_stop,
            wire.Exit: self.on_exit,
            wire.AuthChallenge: self.on_auth,
            wire.Params: self.on_params,
            wire.ShmLane: self.on_lane,
        }
        # The shared-memory lane (drivers.shm_driver), offered on a UNIX socket.
        self.lane = for_session(self)

    def who(self) -> str:
        if self.ids is None:
            return f" ({self.model.n} molecules, not bound yet)"
        return f" (molecules {self.ids[0]}..{self.ids[-1]})"

    def run(self) -> None:
        lane = self.lane
        try:
            self._run(lane)
        finally:
            if lane is not None:
                lane.close()

    def _run(self, lane: DriverLane | None) -> None:
        flags = 0 if lane is None else lane.hello_flags()
        self.sock.sendall(wire.encode_hello(self.model.n, flags=flags))
        decoder = self.decoder
        recv_into = self.sock.recv_into if lane is None else lane.receive
        while True:
            # straight into the decoder's buffer: a frame of 10^6 fields is 24 MB
            n = recv_into(decoder.read_buffer(1 << 20))
            if n == 0:
                if self.proof_sent:
                    raise HubClosed(REFUSED)
                if not self.welcomed:
                    raise HubClosed(
                        "the hub closed the connection without answering "
                        "MXHHELLO: it does not speak maxwellhub's batched frames "
                        "(ensemble drivers need a maxwellhub hub; use "
                        "--molecules 1 with other hubs)"
                    )
                raise HubClosed("the hub closed the connection before STOP or EXIT")
            for event in decoder.received(n):
                handler = self.handlers.get(type(event))
                if handler is None:
                    raise ProtocolError(f"unexpected message {type(event).__name__} from the hub")
                if handler(event):
                    return

    def on_welcome(self, event: wire.Welcome) -> bool:
        self.proof_sent = False  # accepted
        if event.molecules != self.model.n:
            raise ProtocolError(
                f"MXHWELCOME for {event.molecules} molecules; this driver hosts {self.model.n}"
            )
        self.welcomed = True
        self.decoder.batch = event.molecules
        return False

    def on_status(self, _event) -> bool:
        if self.ids is None:
            self.sock.sendall(self.continuity.claim() + _NEEDINIT)
        else:
            self.sock.sendall(_HAVEDATA if self.model.staged else _READY)
        return False

    def on_init(self, event: wire.Init) -> bool:
        if not self.welcomed:
            raise ProtocolError(
                "INIT before MXHWELCOME: the hub did not accept batched "
                "frames; ensemble drivers need a maxwellhub hub"
            )
        init = parse_ensemble_init(event.payload, self.model.n)
        ids, dt_au = init.molecule_ids, init.dt_au
        if self.ids is not None:
            if (self.ids, self.dt_au) == (ids, dt_au):
                return False
            raise ProtocolError("a second INIT with other molecule ids or time step")
        try:
            self.model.initialize(dt_au=dt_au, molecule_ids=ids)
        except Exception as exc:
            raise ModelFailed(f"initialize failed: {type(exc).__name__}: {exc}") from exc
        self.ids, self.dt_au = ids, dt_au
        self.log.info("initialized molecules %d..%d with dt_au = %r", ids[0], ids[-1], dt_au)
        self.resume(ids, init.resume)
        self.accept_params(init.data)
        return False

    def molecule_ids(self) -> list[int] | None:
        return self.ids

    def on_lane(self, event: wire.ShmLane) -> bool:
        if self.lane is None:
            raise ProtocolError("MXHSHMLANE, but this driver offered no shared-memory lane")
        self.lane.on_offer(event)
        return False

    def on_fields(self, event: wire.FieldsBatch) -> bool:
        if self.ids is None:
            raise ProtocolError("MXHFIELDS before INIT")
        self.flags = event.flags
        try:
            self.model.stage(event.fields)
        except Exception as exc:
            raise ModelFailed(f"step {self.steps + 1} failed: {type(exc).__name__}: {exc}") from exc
        return False

    def on_getforce(self, _event) -> bool:
        if self.ids is None:
            raise ProtocolError("GETFORCE before INIT")
        if not self.model.staged:
            raise ProtocolError("GETFORCE without MXHFIELDS since the last step")
        continuity = self.continuity
        try:
            before = self.model.get_state() if continuity.memory else None
            sources = self.model.commit()
            extras = self.extras()
        except Exception as exc:
            raise ModelFailed(f"commit failed: {type(exc).__name__}: {exc}") from exc
        self.steps += 1
        if self.lane is None or not self.lane.answer(sources, extras):
            _send_parts(self.sock, wire.sources_batch_parts(sources, extras))
        continuity.committed(self.model, before)  # after the answer left
        return False

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


def _send_parts(sock: socket.socket, parts: list) -> None:
    """Send the buffers in order, as ``sendall`` of their concatenation would, without
    concatenating them (one MXHSOURCES of 10^6 molecules is 48 MB)."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]


_IOV_MAX = 1024  # buffers per sendmsg (Linux's UIO_MAXIOV)
