"""In-process fake drivers for hub tests: asyncio peers that speak the wire via the codec,
with hooks to misbehave. They do no physics: the source is a simple function of the field
and the molecule id, so a test can check every value."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Self

import numpy as np

from maxwellhub.protocol import wire

_RUNNING: set[asyncio.Task] = set()


def fake_source(mid: int, field) -> tuple[float, float, float]:
    """What a well-behaved fake answers for ``field`` at molecule ``mid``."""
    return (2.0 * field[0] + mid, 3.0 * field[1] - mid, -field[2] + 0.5)


class _FakePeer:
    """What every fake peer shares: its address and its task."""

    address: Any
    task: asyncio.Task | None

    def start(self) -> Self:
        self.task = asyncio.create_task(self._run())
        # asyncio holds tasks weakly: an unreferenced fake would be garbage-collected
        # mid-conversation, so every running fake is kept here until it ends.
        _RUNNING.add(self.task)
        self.task.add_done_callback(_RUNNING.discard)
        return self

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if isinstance(self.address, str):
            return await asyncio.open_unix_connection(self.address)
        return await asyncio.open_connection(*self.address)

    async def _run(self) -> None:
        raise NotImplementedError


class FakeDriver(_FakePeer):
    """A driver peer. ``silent_after`` fields: stop answering (stay connected);
    ``close_after`` fields: close the connection on the next field (mid-step)."""

    def __init__(
        self,
        address,
        *,
        close_after: int | None = None,
        silent_after: int | None = None,
        bad_reply: bytes | None = None,
    ) -> None:
        self.address = address
        self.close_after = close_after
        self.silent_after = silent_after
        self.bad_reply = bad_reply
        self.fields: list[tuple[float, float, float]] = []
        self.messages: list[str] = []
        self.molecule_id: int | None = None
        self.init_json: dict | None = None
        self.task = None
        self.closed = asyncio.Event()

    async def _run(self) -> None:
        reader, writer = await self._open()
        decoder = wire.Decoder("driver")
        initialized = False
        staged = None
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for ev in decoder.feed(data):
                    name = type(ev).__name__
                    self.messages.append(name)
                    if isinstance(ev, wire.Status):
                        reply = wire.READY if initialized else wire.NEEDINIT
                        if staged is not None:
                            reply = wire.HAVEDATA
                        writer.write(wire.encode_header(reply))
                    elif isinstance(ev, wire.Init):
                        initialized = True
                        self.molecule_id = ev.ident
                        self.init_json = json.loads(ev.payload or b"{}")
                    elif isinstance(ev, wire.PosData):
                        fx, fy, fz = (float(x) for x in ev.field)
                        f = (fx, fy, fz)
                        if self.close_after is not None and len(self.fields) >= self.close_after:
                            writer.close()
                            return
                        self.fields.append(f)
                        staged = f
                    elif isinstance(ev, wire.GetForce):
                        if self.bad_reply is not None:
                            writer.write(self.bad_reply)
                            await writer.drain()
                            writer.close()
                            return
                        if self.silent_after is not None and len(self.fields) > self.silent_after:
                            continue
                        assert self.molecule_id is not None and staged is not None, (
                            "GETSOURCE before INIT and a field"
                        )
                        src = fake_source(self.molecule_id, staged)
                        extras = json.dumps({"n": len(self.fields)}).encode()
                        writer.write(wire.encode_source_ready(src, extras))
                        staged = None
                    elif isinstance(ev, wire.Stop):
                        writer.write(wire.encode_header(wire.BYE))
                        await writer.drain()
                        writer.close()
                        return
                    elif isinstance(ev, wire.Exit):
                        writer.close()
                        return
        except (ConnectionError, OSError):
            return
        finally:
            self.closed.set()


class FakeEnsemble(_FakePeer):
    """An ensemble driver peer hosting ``m`` molecules with batched frames (MXHHELLO).
    Answers sources = fake_source per molecule and extras {"n": steps, "id": molecule}."""

    def __init__(self, address, m: int, *, close_after: int | None = None) -> None:
        self.address = address
        self.m = m
        self.close_after = close_after
        self.steps: list[np.ndarray] = []
        self.molecule_ids: list[int] | None = None
        self.init_json: dict | None = None
        self.messages: list[str] = []
        self.closed = asyncio.Event()
        self.task = None

    async def _run(self) -> None:
        reader, writer = await self._open()
        writer.write(wire.encode_hello(self.m))
        decoder = wire.Decoder("driver")
        initialized, staged = False, None
        try:
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    return
                for ev in decoder.feed(data):
                    self.messages.append(type(ev).__name__)
                    if isinstance(ev, wire.Welcome):
                        decoder.batch = ev.molecules
                    elif isinstance(ev, wire.Status):
                        writer.write(
                            wire.encode_header(wire.READY if initialized else wire.NEEDINIT)
                        )
                    elif isinstance(ev, wire.Init):
                        initialized = True
                        self.init_json = json.loads(ev.payload)
                        first, count = self.init_json["molecule_id_range"]
                        self.molecule_ids = list(range(first, first + count))
                    elif isinstance(ev, wire.FieldsBatch):
                        if self.close_after is not None and len(self.steps) >= self.close_after:
                            writer.close()
                            return
                        staged = ev.fields
                        self.steps.append(staged)
                    elif isinstance(ev, wire.GetForce):
                        ids = self.molecule_ids
                        if ids is None or staged is None:
                            raise AssertionError("GETSOURCE before INIT and MXHFIELDS")
                        src = np.array(
                            [fake_source(m, f) for m, f in zip(ids, staged, strict=True)]
                        )
                        extras = {
                            "n": np.full(self.m, float(len(self.steps))),
                            "id": np.array(ids, dtype=float),
                        }
                        writer.write(wire.encode_sources_batch(src, extras))
                    elif isinstance(ev, wire.Stop):
                        writer.write(wire.encode_header(wire.BYE))
                        await writer.drain()
                        writer.close()
                        return
        except (ConnectionError, OSError):
            return
        finally:
            self.closed.set()
