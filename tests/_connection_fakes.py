"""Fakes for driving the hub-side connection machine (maxwellhub.protocol.connection)
with plain bytes: a hub that records its callbacks, a link that records its actions, and a
connection brought to INIT. Shared by the unit tests and the parameter-change tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from maxwellhub.protocol import wire
from maxwellhub.protocol.auth import Secret
from maxwellhub.protocol.connection import Connection, Lane, Parts, State

STATUS = wire.encode_header(wire.STATUS)
READY = wire.encode_header(wire.READY)
NEEDINIT = wire.encode_header(wire.NEEDINIT)
BYE = wire.encode_header(wire.BYE)


class Mol:
    def __init__(self, mid: int, payload: dict | None = None) -> None:
        self.id, self.payload = mid, payload


class Layout:
    def __init__(self, ids: list[int], generation: int = 1) -> None:
        self.generation = generation
        self.row = {m: r for r, m in enumerate(ids)}


class Step:
    def __init__(self, fields) -> None:
        self.fields = np.asarray(fields, dtype=np.float64)
        self.field_bytes = None
        self.want_extras = True
        self.want_dipoles = False


class FakeHub:
    """Records the callbacks; binds on request."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.field: np.ndarray | None = None
        self.answers: list[tuple[int, str | None]] = []

    def source_ready(self, conn, sx, sy, sz, extras):
        self.calls.append(("source", (sx, sy, sz), extras))

    def sources_batch(self, conn, event):
        self.calls.append(("sources", event.sources.copy()))

    def driver_available(self, conn):
        self.calls.append(("available",))

    def driver_ready(self, conn):
        self.calls.append(("ready",))

    def driver_initialized(self, conn):
        self.calls.append(("initialized",))

    def replay_offer(self, conn):
        return 0, 0

    def pending_field(self, conn):
        return self.field

    def connection_lost(self, conn, previous, exc):
        self.calls.append(("lost", previous))

    def params_answered(self, conn, sequence, error):
        self.answers.append((sequence, error))


class FakeLink:
    """Records the connection's actions; declines every shared-memory lane offer."""

    def __init__(self) -> None:
        self.aborted = self.closed = False
        self.armed: float | None = None
        self.ends: list[bool] = []
        self.hosting_n: int | None = None
        self.later_calls: list[tuple[float, Callable[[], Parts]]] = []
        self.lane_offers: list[int] = []
        self.written: list[Parts] = []

    def write(self, parts: Parts) -> None:
        self.written.append(parts)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def arm(self, seconds: float) -> None:
        self.armed = seconds

    def disarm(self) -> None:
        self.armed = None

    def later(self, seconds: float, callback: Callable[[], Parts]) -> None:
        self.later_calls.append((seconds, callback))

    def hosting(self, molecules: int) -> None:
        self.hosting_n = molecules

    def ended(self, said_bye: bool) -> None:
        self.ends.append(said_bye)

    def offer_lane(self, parts: Parts, extras: int) -> Lane | None:
        self.write(parts)
        self.lane_offers.append(extras)
        return None  # no lane: the connection keeps stepping over the socket


def make(auth: Secret | None = None, handshake: float | None = 5.0):
    hub, link = FakeHub(), FakeLink()
    conn = Connection(hub, 1, limits=wire.Limits(), auth=auth, handshake_timeout=handshake)
    conn.link = link
    return conn, hub, link


def feed(conn: Connection, data: bytes, how: str) -> bytes:
    """Feed ``data`` whole or byte by byte; the bytes the machine answered."""
    chunks = [data] if how == "whole" else [data[i : i + 1] for i in range(len(data))]
    out = []
    for chunk in chunks:
        out += conn.receive_data(chunk)
    return b"".join(bytes(p) for p in out)


def ready_single(how: str = "whole"):
    """A single-molecule connection bound to molecule 3, initialised and idle."""
    conn, hub, link = make()
    assert b"".join(conn.start()) == STATUS and link.armed == 5.0
    assert feed(conn, NEEDINIT, how) == b""
    assert conn.state is State.UNBOUND and hub.calls == [("available",)] and link.armed is None
    conn.bind([Mol(3, {"dt_au": 0.5})])
    out = b"".join(conn.send_init())
    head = wire.encode_init(3, b"")[:12]
    assert out.startswith(head) and out.endswith(STATUS)
    assert conn.state is State.INIT
    return conn, hub, link
