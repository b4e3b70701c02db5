"""Parameter changes and kicks sent to socket drivers between steps, their log and their
replay: the hub side of the MXHPARAMS extension (see :mod:`maxwellhub.protocol.params`).

Every change is logged with the step it applies at (how many steps each molecule had
completed) before it is sent, so a driver that dies before it answers, or a replacement
that resumes from an older step, gets it again at that step: the hub interleaves the
logged changes with the replayed fields (:meth:`ParamChanges.replay`) and continuity stays
exact. A change a driver refused is dropped from the log for its molecules.

Only a driver that accepted the extension after INIT is ever sent a frame; asking a change
of a molecule whose driver is a plain i-PI or MaxwellLink peer is a :class:`UsageError`
naming the molecule, raised before anything is sent or logged.

This module never touches a socket (the connections' links write) and never converts units.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ..errors import BarrierTimeout, UsageError
from ..liveness import within
from ..protocol.connection import Connection, State
from ..protocol.params import Kick, Op, SetParams, parse_payload
from .barrier import ids_text
from .registry import Registry

__all__ = ["Change", "ParamChanges", "ParameterRefused"]

log = logging.getLogger("maxwellhub.hub")

# A driver in these states has not said yet whether it speaks the parameter frames: the
# change is logged and reaches it with its replay (see ParamChanges.replay).
_NOT_YET = (State.BOUND, State.INIT)
# A driver that answered its first step is sent one STATUS; its answer (READY) comes a
# round trip later, and the change waits for it (the hub may finish the step before).
_LEARN = State.LEARN


class HubView(Protocol):
    """What this module needs of :class:`maxwellhub.hub.Hub` (no import of it: no cycle).
    ``_wait_change`` is the hub's own wait for a connection to change state, shared with
    this module only."""

    registry: Registry
    timeout: float | None
    paused: bool

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def in_step(self) -> bool: ...
    def molecule_steps(self, molecule_ids: Iterable[int]) -> npt.NDArray[Any]: ...
    async def _wait_change(self, deadline: float | None) -> bool: ...


class ParameterRefused(UsageError):
    """A driver refused a parameter change or kick; the message names the molecule and
    the parameter. The run goes on (the change did not apply to those molecules)."""

    def __init__(self, message: str, molecules: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.molecules = sorted(molecules)


@dataclass
class Change:
    """A logged change: the op and, per molecule id, the steps completed when it applied."""

    op: Op
    steps: dict[int, int] = field(default_factory=dict)


@dataclass
class _Wait:
    sequence: int
    future: asyncio.Future[Any]


class ParamChanges:
    """The parameter changes of one :class:`~maxwellhub.hub.Hub`: send, await, log, replay."""

    def __init__(self, hub: HubView) -> None:
        self.hub = hub
        self.log: list[Change] = []
        self.requested: list[Op] = []  # asked through the control endpoint, not yet applied
        self._waits: dict[Connection, _Wait] = {}
        self._lock: asyncio.Lock | None = None  # one change at a time, in order

    # -- building ops from the user's arguments
    def _ids(self, what: str, molecule_ids: int | Iterable[int]) -> tuple[int, ...]:
        ids = tuple(int(m) for m in np.atleast_1d(np.asarray(molecule_ids)).tolist())
        if not ids:
            raise UsageError(f"{what}: no molecule ids given")
        if len(set(ids)) != len(ids):
            raise UsageError(f"{what}: molecule ids {list(ids)} repeat an id")
        unknown = self.hub.registry.unknown(ids)
        if unknown:
            raise UsageError(
                f"{what}: molecule {unknown[0]} is not registered with this hub"
                + (f" (nor {ids_text(unknown[1:])})" if len(unknown) > 1 else "")
            )
        return ids

    def set_params_op(
        self, molecule_ids: int | Iterable[int], changes: Mapping[str, Any]
    ) -> SetParams:
        if not isinstance(changes, Mapping) or not changes:
            raise UsageError(f"set_params: changes = {changes!r}; expected a non-empty mapping")
        return SetParams(self._ids("set_params", molecule_ids), dict(changes))

    def kick_op(self, molecule_ids: int | Iterable[int], impulse: Any) -> Kick:
        vector = np.asarray(impulse, dtype=np.float64)
        if vector.shape != (3,) or not np.isfinite(vector).all():
            raise UsageError(
                f"apply_kick: impulse = {impulse!r}; expected a finite 3-vector (a.u.)"
            )
        x, y, z = vector.tolist()
        return Kick(self._ids("apply_kick", molecule_ids), (x, y, z))

    # -- applying
    async def apply(self, op: Op) -> None:
        """Send ``op`` to the drivers of its molecules between steps and await every
        answer (the hub's ``timeout``: :class:`BarrierTimeout` naming those missing);
        :class:`ParameterRefused` naming molecule and parameter when a driver refused."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await self._apply(op)

    def _drivers(self, op: Op) -> dict[Connection, list[int]]:
        """The connections now bound to the op's molecules, and which of them each hosts;
        a :class:`UsageError` naming a molecule whose driver cannot take the change."""
        by: dict[Connection, list[int]] = {}
        for mid in op.molecules:
            driver = self.hub.registry.molecules[mid].driver
            if driver is None:
                continue  # logged: its next driver gets it with its replay
            if not driver.params and driver.state not in _NOT_YET:
                raise UsageError(
                    f"molecule {mid}: its driver ({driver.peer}) does not speak maxwellhub's "
                    "parameter frames (a plain i-PI or MaxwellLink driver): parameter "
                    "changes and kicks cannot reach it"
                )
            if driver.state is State.PARAMS:  # an earlier change timed out unanswered
                raise UsageError(
                    f"molecule {mid}: its driver ({driver.peer}) has not answered an earlier "
                    "parameter change yet"
                )
            by.setdefault(driver, []).append(mid)
        return by

    async def _targets(self, op: Op) -> dict[Connection, list[int]]:
        """:meth:`_drivers` once none of them is still to say READY after its first
        step (else that driver would miss the change); :class:`BarrierTimeout` after the
        hub's ``timeout``."""
        hub = self.hub
        deadline = None if hub.timeout is None else hub.loop.time() + hub.timeout
        while True:
            if hub.in_step:
                raise UsageError(
                    "parameter changes go between steps; a step is frozen (complete it first)"
                )
            by = self._drivers(op)
            learning = sorted(m for d, mids in by.items() if d.state is _LEARN for m in mids)
            if not learning:
                return by
            if not await hub._wait_change(deadline):
                if hub.paused:
                    raise UsageError("the hub is shutting down: no parameter change is sent")
                raise BarrierTimeout(
                    f"molecule(s) {ids_text(learning)}: their driver did not answer the "
                    f"STATUS after its first step {within(hub.timeout)}, so no parameter "
                    "change was sent",
                    learning,
                )

    async def _apply(self, op: Op) -> None:
        hub = self.hub
        by = await self._targets(op)
        steps = hub.molecule_steps(op.molecules).tolist()
        change = Change(op, dict(zip(op.molecules, steps, strict=True)))
        self.log.append(change)
        waits: dict[Connection, asyncio.Future[Any]] = {}
        for driver, mids in by.items():
            part = op.restricted(mids)
            step = change.steps[mids[0]]
            if driver.state is State.READY:
                parts = driver.send_params(step, [part])
                fut = hub.loop.create_future()
                self._waits[driver] = _Wait(driver.params_sent, fut)
                waits[driver] = fut
                driver.link.write(parts)
            elif driver.state is State.REPLAY:
                driver.replay.append((step, [part]))  # after what it replays now
            # BOUND, INIT: driver_ready puts the logged change in its replay
        if waits:
            await self._await(change, waits)

    async def _await(self, change: Change, waits: dict[Connection, asyncio.Future[Any]]) -> None:
        timeout = self.hub.timeout
        done, pending = await asyncio.wait(list(waits.values()), timeout=timeout)
        refused: list[str] = []
        refused_ids: list[int] = []
        for driver, fut in waits.items():
            if fut not in done:
                continue
            outcome = fut.result()
            mids = [m.id for m in driver.molecules if m.id in change.steps]
            if outcome == "lost":
                log.warning(
                    "%s was lost before it answered a parameter change; the change is "
                    "logged and replayed to its replacement",
                    driver,
                )
            elif outcome is not None:
                for mid in mids:
                    change.steps.pop(mid, None)
                refused.append(f"{driver.peer}: {outcome}")
                refused_ids.extend(mids)
        if not change.steps and change in self.log:
            self.log.remove(change)
        if pending:
            missing = sorted(m.id for d, f in waits.items() if f in pending for m in d.molecules)
            for d, f in waits.items():
                if f in pending:
                    self._waits.pop(d, None)
            raise BarrierTimeout(
                f"no answer to a parameter change from molecule(s) {ids_text(missing)} "
                f"{within(timeout)} (the change stays logged)",
                missing,
            )
        if refused:
            raise ParameterRefused("parameter change refused: " + "; ".join(refused), refused_ids)

    # -- the connections' callbacks
    def answered(self, conn: Connection, sequence: int, error: str | None) -> None:
        wait = self._waits.get(conn)
        if wait is None or wait.sequence != sequence:
            if error:  # late (after a timeout): still worth a line
                log.warning("%s refused a parameter change: %s", conn, error)
            return
        del self._waits[conn]
        if not wait.future.done():
            wait.future.set_result(error)

    def lost(self, conn: Connection) -> None:
        wait = self._waits.pop(conn, None)
        if wait is not None and not wait.future.done():
            wait.future.set_result("lost")

    # -- replay
    def replay(
        self, conn: Connection, start: int, done: int, fields: list[npt.NDArray[Any]] | None
    ) -> list[Any]:
        """The replay of a driver restored at step ``start`` (the molecules completed
        ``done``): the missed steps' ``fields`` (None: the window did not reach back;
        continuity is lost anyway) with the logged changes at their steps, as items of
        :attr:`Connection.replay`."""
        ids = [m.id for m in conn.molecules]
        first = ids[0]
        due = [(c.steps[first], c) for c in self.log if c.steps.get(first, -1) >= start]
        if not due:
            return list(fields or [])
        items: list[Any] = []
        if fields is None:
            return [(step, [c.op.restricted(ids)]) for step, c in due]
        at = 0
        for j in range(len(fields) + 1):
            while at < len(due) and due[at][0] <= start + j:
                step, c = due[at]
                items.append((step, [c.op.restricted(ids)]))
                at += 1
            if j < len(fields):
                items.append(fields[j])
        items.extend((step, [c.op.restricted(ids)]) for step, c in due[at:])
        return items

    # -- run checkpoints
    def snapshot(self) -> dict[str, npt.NDArray[Any]]:
        """The log as one JSON string array (``params_log``) for the hub's snapshot."""
        entries = [
            {"op": c.op.to_json(), "steps": [[m, s] for m, s in c.steps.items()]} for c in self.log
        ]
        return {"params_log": np.array(json.dumps(entries))}

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """The log from :meth:`snapshot` (absent in older snapshots: empty)."""
        raw = snapshot.get("params_log")
        self.log = []
        if raw is None:
            return
        try:
            entries = json.loads(str(np.asarray(raw)))
            for entry in entries:
                body = json.dumps({"sequence": 1, "ops": [entry["op"]]}).encode()
                (op,) = parse_payload(body)[1]
                self.log.append(Change(op, {int(m): int(s) for m, s in entry["steps"]}))
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"hub snapshot: params_log is not a parameter log: {exc}") from None

    # -- the control endpoint's requests
    def request(self, op: Op) -> int:
        """Queue ``op`` for :meth:`apply_requested`; how many are queued."""
        self.requested.append(op)
        return len(self.requested)

    async def apply_requested(self) -> int:
        """Apply the queued requests in order (between steps); how many were applied."""
        ops, self.requested = self.requested, []
        for k, op in enumerate(ops):
            try:
                await self.apply(op)
            except BaseException:
                self.requested[:0] = ops[k + 1 :]
                raise
        return len(ops)
