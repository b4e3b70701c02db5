"""The molecule side of every EM engine: groups of molecules, one step of all of them,
parameter changes and kicks, the records, and their checkpoint state.

Written once for Meep's coupling (:class:`maxwellhub.em.meep.MeepCoupling`) and the
engines' (:class:`maxwellhub.em.coupling.EngineCoupling`). A group is either one batched
embedded model (``add_molecules``) or molecules whose drivers connect to a hub
(``add_socket_molecules``); all socket molecules step in one array barrier
(``hub.step_arrays``), ensemble drivers getting one frame each, under the ``on_lost``
policy.

Dipoles: engines that need each molecule's dipole (a cavity in the dipole gauge, the
dipole self-energy) ask :meth:`Molecules.step` for them. They are the extras keys
``mux_au``, ``muy_au``, ``muz_au`` that every model reports (the model conformance tests
check it), at the time the model reports them: after its step, the same time as the
source it returns. Embedded models give them through ``Model.dipoles()`` without their
other extras; socket molecules through the barrier's dipoles flag (ensemble drivers send
only those keys; single drivers send their JSON extras every step anyway). Models that
also report the dipole at their next force evaluation (``mux_m_au``..., velocity-Verlet
models) give the engine ``2 mu - mu_m`` as well.

This module never touches Meep or a socket itself (the hub does), and makes O(groups)
Python calls per step, none per molecule.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BarrierTimeout, DriverLost, UsageError

__all__ = ["DIPOLE_KEYS", "NEXT_DIPOLE_KEYS", "MoleculeCoupling", "Molecules"]

log = logging.getLogger("maxwellhub.em")

DIPOLE_KEYS = ("mux_au", "muy_au", "muz_au")
NEXT_DIPOLE_KEYS = ("mux_m_au", "muy_m_au", "muz_m_au")


@dataclass
class Group:
    """Molecules driven together: one embedded model, or the socket molecules."""

    rows: np.ndarray  # rows of these molecules in the coupling's arrays
    span: slice  # the same rows (they are consecutive), as a slice
    ids: np.ndarray  # their molecule ids
    model: Any = None  # embedded: a maxwellhub_drivers model; None: socket
    init: Mapping | None = None  # socket: extra INIT payload


def _dipoles_of(extras: Mapping[str, np.ndarray], keys: tuple[str, ...]) -> np.ndarray | None:
    if not all(k in extras for k in keys):
        return None
    # column by column into a column-major array: three contiguous copies (np.stack along
    # axis 1 writes with a stride of 3 and costs several times more at 10^6 molecules)
    first = np.asarray(extras[keys[0]])
    out = np.empty((len(first), len(keys)), order="F")
    for k, key in enumerate(keys):
        out[:, k] = extras[key]
    return out


class Molecules:
    """All the molecules of one coupling, in the order they were added (rows).

    ``hub``, ``timeout``, ``on_lost`` and ``record_every`` mean what they mean for
    :class:`~maxwellhub.em.meep.MeepCoupling`."""

    def __init__(
        self,
        hub=None,
        record_every: int = 1,
        timeout: float | None = None,
        on_lost: str | Callable[[DriverLost], bool] = "wait",
    ) -> None:
        if on_lost not in ("wait", "abort") and not callable(on_lost):
            raise UsageError(f"on_lost = {on_lost!r}; expected 'wait', 'abort' or a function")
        if isinstance(record_every, bool) or not isinstance(record_every, int) or record_every < 0:
            raise UsageError(f"record_every = {record_every!r}; expected an int >= 0")
        self.hub = hub
        self.timeout = timeout
        self.on_lost = on_lost
        self.record_every = record_every
        self.groups: list[Group] = []
        self._ids: list[int] = []
        self.socket_rows = np.zeros(0, np.int64)
        self.socket_ids = np.zeros(0, np.int64)
        self.records: list[tuple[int, list[dict[str, np.ndarray]]]] = []
        self._all_socket = False  # every molecule is a socket molecule, rows in order
        # parameter changes and kicks of embedded molecules for the next step boundary,
        # in the order asked (each a call on a group's model), and per group the
        # parameters the changes lead to (later changes are checked against them)
        self.pending: list[Callable[[], None]] = []
        self._pending_params: dict[int, dict[str, Any]] = {}
        #: Changes of socket molecules their drivers refused at the step boundary, each
        #: naming molecule and parameter (also logged; the run goes on).
        self.refused: list[str] = []

    # ------------------------------------------------------------------ building

    @property
    def ids(self) -> np.ndarray:
        return np.array(self._ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ids)

    def add(
        self,
        n: int,
        molecule_ids: Sequence[int] | None,
        model: Any = None,
        init: Mapping | None = None,
    ) -> np.ndarray:
        """A group of ``n`` molecules (``model`` None: socket); returns their ids."""
        if molecule_ids is None:
            start = max(self._ids, default=-1) + 1
            ids = np.arange(start, start + n)
        else:
            ids = np.asarray(molecule_ids, dtype=np.int64)
            if ids.shape != (n,):
                raise UsageError(f"molecule_ids must give {n} ids")
        if set(ids.tolist()) & set(self._ids) or len(set(ids.tolist())) != n:
            raise UsageError(f"molecule ids {ids.tolist()} repeat an id")
        first = len(self._ids)
        self.groups.append(
            Group(np.arange(first, first + n), slice(first, first + n), ids, model, init)
        )
        self._ids.extend(ids.tolist())
        return ids

    def start(self) -> None:
        """Fix the socket rows once all groups are added."""
        socket = [g for g in self.groups if g.model is None]
        self.socket_rows = (
            np.concatenate([g.rows for g in socket]) if socket else np.zeros(0, np.int64)
        )
        self.socket_ids = (
            np.concatenate([g.ids for g in socket]) if socket else np.zeros(0, np.int64)
        )
        self._all_socket = np.array_equal(self.socket_rows, np.arange(len(self._ids)))

    def bind(self, dt_au: float) -> None:
        """Initialise the embedded models and wait for the socket molecules' drivers."""
        for group in self.groups:
            if group.model is not None:
                group.model.initialize(dt_au=dt_au, molecule_ids=group.ids)
        socket = [g for g in self.groups if g.model is None]
        if not socket:
            return
        if self.hub is None:
            raise UsageError("socket molecules need a hub (hub=...)")
        payloads = {int(mid): {"dt_au": dt_au, **(g.init or {})} for g in socket for mid in g.ids}
        if not self.hub.wait_until_bound(payloads, timeout=self.timeout):
            missing = [m for m in payloads if not self.hub.all_bound([m])]
            raise TimeoutError(
                f"no driver bound molecule(s) {missing} "
                + ("(no deadline)" if self.timeout is None else f"within {self.timeout:g} s")
            )

    # ------------------------------------------------------------ changes, kicks

    def set_params(self, molecule_ids: int | Sequence[int], changes: Mapping[str, Any]) -> None:
        """Check now, queue for the next step boundary (see ``MeepCoupling.set_params``)."""
        from maxwellhub.models import ParameterError

        by_group, socket_ids = self._rows("set_params", molecule_ids)
        planned = []
        for g, rows in by_group.items():
            group = self.groups[g]
            picked = None if rows == list(range(len(group.ids))) else rows  # the group
            try:
                new = group.model.check_params(changes, picked, params=self._pending_params.get(g))
            except ParameterError as exc:
                if exc.molecule is not None:
                    who = f"molecule {int(group.ids[exc.molecule])}"
                else:
                    listed = [str(int(group.ids[r])) for r in rows]
                    who = (
                        ("molecule " if len(listed) == 1 else "molecules ")
                        + ", ".join(listed[:10])
                        + (" ..." if len(listed) > 10 else "")
                    )
                raise UsageError(f"set_params: {who}: {exc}") from None
            planned.append((g, dict(changes), picked, new))
        for g, change, picked, new in planned:  # all checked: queue them
            self.pending.append(functools.partial(self.groups[g].model.set_params, change, picked))
            self._pending_params[g] = new
        if socket_ids:  # checked by their drivers when applied (a refusal names them)
            call = functools.partial(self._hub().set_params, socket_ids, dict(changes))
            self.pending.append(functools.partial(self._over_the_wire, call))

    def apply_kick(self, molecule_ids: int | Sequence[int], impulse: Any) -> None:
        """Check now, queue for the next step boundary (see ``MeepCoupling.apply_kick``)."""
        vector = np.asarray(impulse, dtype=np.float64)
        if vector.shape != (3,) or not np.isfinite(vector).all():
            raise UsageError(
                f"apply_kick: impulse = {impulse!r}; expected a finite 3-vector (a.u.)"
            )
        by_group, socket_ids = self._rows("apply_kick", molecule_ids)
        for g, rows in by_group.items():
            group = self.groups[g]
            if not group.model.takes_kicks():
                raise UsageError(
                    f"apply_kick: molecule {int(group.ids[rows[0]])}: model "
                    f"{group.model.name or type(group.model).__name__} takes no kicks"
                )
            picked = None if rows == list(range(len(group.ids))) else rows
            self.pending.append(functools.partial(group.model.apply_kick, vector.copy(), picked))
        if socket_ids:
            call = functools.partial(self._hub().apply_kick, socket_ids, vector.copy())
            self.pending.append(functools.partial(self._over_the_wire, call))

    def _over_the_wire(self, call: Callable[[], None]) -> None:
        """Send a queued change to socket drivers; a refusal is logged and kept in
        :attr:`refused` (raising here would leave the engine in the middle of its step)."""
        from ..hub.params import ParameterRefused

        try:
            call()
        except ParameterRefused as exc:
            log.error("%s; the run goes on without it", exc)
            self.refused.append(str(exc))

    def _requested(self) -> bool:
        """Whether the hub's control endpoint queued changes (``SetParams``)."""
        return self.hub is not None and bool(getattr(self.hub, "requested_params", 0))

    def _hub(self):
        if self.hub is None:
            raise UsageError("socket molecules need a hub (hub=...)")
        return self.hub

    def _rows(
        self, what: str, molecule_ids: int | Sequence[int]
    ) -> tuple[dict[int, list[int]], list[int]]:
        """Group index -> rows of the listed embedded molecules, and the listed socket
        molecules' ids (UsageError naming an unknown or repeated molecule)."""
        ids = [int(m) for m in np.atleast_1d(np.asarray(molecule_ids)).tolist()]
        if len(ids) != len(set(ids)):
            raise UsageError(f"{what}: molecule ids {ids} repeat an id")
        where = {
            int(mid): (g, row)
            for g, group in enumerate(self.groups)
            for row, mid in enumerate(group.ids.tolist())
        }
        by_group: dict[int, list[int]] = {}
        socket_ids: list[int] = []
        for mid in ids:
            if mid not in where:
                raise UsageError(f"{what}: no molecule with id {mid}")
            g, row = where[mid]
            if self.groups[g].model is None:
                socket_ids.append(mid)
            else:
                by_group.setdefault(g, []).append(row)
        return by_group, socket_ids

    def apply_pending(self, run: bool = True) -> None:
        """Apply the queued changes (``run=False``: drop them, on MPI ranks whose models
        never step)."""
        changes, self.pending = self.pending, []
        self._pending_params = {}
        if run:
            for apply in changes:
                apply()
            if self.hub is not None:  # SetParams asked through the hub's control endpoint
                requested = getattr(self.hub, "apply_requested_params", None)
                if requested is not None:
                    requested()

    # ------------------------------------------------------------------ stepping

    def answers(
        self,
        fields: np.ndarray,
        step: int,
        sources: np.ndarray,
        dipoles: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """:meth:`step`, returning ``(sources, dipoles, dipoles_next)``: with one embedded
        group the model's own arrays, uncopied (10^6 molecules: two 24 MB copies less per
        step), else the given buffers filled. Valid until the next step."""
        if len(self.groups) != 1:
            nexts = self.step(fields, step, sources, dipoles)
            return sources, dipoles, nexts
        if self.groups[0].model is None:  # all socket molecules: the barrier's arrays
            if self.pending or self._requested():
                self.apply_pending()
            record = bool(self.record_every) and step % self.record_every == 0
            result = self._socket_step(fields, record, dipoles is not None)
            if record:
                self.records.append((step, [result.extras()]))
            if dipoles is None:
                return result.sources, None, None
            mu, mu_m = self._socket_dipoles(result, step)
            return result.sources, mu, None if mu_m is None else 2.0 * mu - mu_m
        if self.pending or self._requested():
            self.apply_pending()
        group = self.groups[0]
        model = group.model
        out = model.step(fields)
        record = bool(self.record_every) and step % self.record_every == 0
        extras = [model.extras()] if record else []
        if record:
            self.records.append((step, extras))
        if dipoles is None:
            return out, None, None
        if NEXT_DIPOLE_KEYS[0] in getattr(model, "extras_keys", ()) or not hasattr(
            model, "dipoles"
        ):
            mu_m = self._model_dipoles(model, group, dipoles, extras, record)
            return out, dipoles, None if mu_m is None else 2.0 * dipoles - mu_m
        return out, model.dipoles(), None

    def step(
        self,
        fields: np.ndarray,
        step: int,
        sources: np.ndarray,
        dipoles: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """Step every molecule under ``fields`` (M, 3); write their dmu/dt into
        ``sources`` (M, 3) and, when ``dipoles`` (M, 3) is given, their dipoles into it.
        Returns the dipoles at the next force time (``2 mu - mu_m``, (M, 3)) when every
        molecule reports them and dipoles were asked, else None."""
        if self.pending or self._requested():
            self.apply_pending()
        record = bool(self.record_every) and step % self.record_every == 0
        extras: list[dict[str, np.ndarray]] = []
        nexts: list[tuple[Any, np.ndarray | None]] = []
        for group in self.groups:
            model = group.model
            if model is None:
                continue
            sources[group.span] = model.step(fields[group.span])
            if record:
                extras.append(model.extras())
            if dipoles is not None:
                nexts.append(
                    (group.span, self._model_dipoles(model, group, dipoles, extras, record))
                )
        if self.socket_rows.size:
            # One array barrier for all socket molecules (ensemble drivers get one frame
            # each); extras travel only on recorded steps, dipoles every step if asked.
            socket_fields = fields if self._all_socket else fields[self.socket_rows]
            result = self._socket_step(socket_fields, record, dipoles is not None)
            sources[self.socket_rows] = result.sources
            if record:
                extras.append(result.extras())
            if dipoles is not None:
                mu, mu_m = self._socket_dipoles(result, step)
                dipoles[self.socket_rows] = mu
                nexts.append((self.socket_rows, mu_m))
        if record:
            self.records.append((step, extras))
        if dipoles is None or not nexts or any(m is None for _, m in nexts):
            return None
        out = np.empty_like(dipoles)
        for rows, mu_m in nexts:
            out[rows] = 2.0 * dipoles[rows] - mu_m
        return out

    def _socket_dipoles(self, result, step: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The socket molecules' dipoles (M, 3) and next-force-time dipoles (None unless
        every one reports them) from a barrier's extras. The hub has already refused a
        step where a molecule's dipole did not come (ProtocolError naming it)."""
        got = result.extras()
        mu = _dipoles_of(got, DIPOLE_KEYS)
        if mu is None:
            raise UsageError(
                f"step {step}: no dipole (mux_au, muy_au, muz_au) from molecule(s) "
                f"{self.socket_ids.tolist()[:10]}: this engine needs every molecule's dipole"
            )
        mu_m = _dipoles_of(got, NEXT_DIPOLE_KEYS)
        if mu_m is not None and np.isnan(mu_m).any():  # not every molecule has them
            mu_m = None
        return mu, mu_m

    @staticmethod
    def _model_dipoles(model, group: Group, dipoles: np.ndarray, extras, record: bool):
        """An embedded group's dipoles into ``dipoles``; returns its next-force-time
        dipoles ``mu_m`` (the keys, not yet 2 mu - mu_m) or None."""
        keys = getattr(model, "extras_keys", ())
        if NEXT_DIPOLE_KEYS[0] in keys or not hasattr(model, "dipoles"):
            got = extras[-1] if record else model.extras()
            mu = _dipoles_of(got, DIPOLE_KEYS)
            if mu is None:
                raise UsageError(
                    f"model {model.name or type(model).__name__} reports no dipole "
                    "(mux_au, muy_au, muz_au): this engine needs it"
                )
            dipoles[group.span] = mu
            return _dipoles_of(got, NEXT_DIPOLE_KEYS)
        dipoles[group.span] = model.dipoles()
        return None

    def _socket_step(self, fields: np.ndarray, extras: bool, dipoles: bool):
        """One barrier for the socket molecules, under the ``on_lost`` policy."""
        policy = self.on_lost
        kw: dict[str, Any] = {"extras": extras}
        if dipoles:
            kw["dipoles"] = True
        if not callable(policy):
            return self.hub.step_arrays(
                self.socket_ids, fields, timeout=self.timeout, on_lost=policy, **kw
            )
        while True:
            try:
                return self.hub.step_arrays(
                    self.socket_ids, fields, timeout=self.timeout, on_lost="abort", **kw
                )
            except DriverLost as exc:
                if not policy(exc):
                    raise
                # a replacement is on its way; the frozen step goes on once it is bound
                if not self.hub.wait_until_bound(exc.molecules, timeout=self.timeout):
                    raise BarrierTimeout(
                        f"no replacement driver for molecule(s) {exc.molecules} "
                        + (
                            "(no deadline)"
                            if self.timeout is None
                            else f"within {self.timeout:g} s"
                        ),
                        exc.molecules,
                    ) from exc

    # ------------------------------------------------------------------ state

    def slot_sizes(self) -> list[int]:
        """Molecules per entry of a record's extras list: embedded groups, then sockets."""
        sizes = [len(g.ids) for g in self.groups if g.model is not None]
        return sizes + ([int(self.socket_rows.size)] if self.socket_rows.size else [])

    def state(self) -> dict[str, np.ndarray]:
        """Every embedded model's state (``model.<g>.<key>``) and the records so far
        (``records.*``), as arrays."""
        state: dict[str, np.ndarray] = {}
        for g, group in enumerate(self.groups):
            if group.model is not None:
                for key, value in group.model.get_state().items():
                    state[f"model.{g}.{key}"] = np.asarray(value)
        state["records.step"] = np.array([s for s, _ in self.records], dtype=np.int64)
        for j, size in enumerate(self.slot_sizes()):
            keys = sorted({k for _, extras in self.records for k in extras[j]})
            state[f"records.{j}.keys"] = np.array(keys, dtype=str)
            for i, key in enumerate(keys):
                rows = [extras[j].get(key) for _, extras in self.records]
                present = [r for r in rows if r is not None]
                if len(present) == len(rows):  # the usual case: one C-level stack
                    table = np.stack(present).astype(np.float64, copy=False).reshape(-1, size)
                else:
                    table = np.full((len(self.records), size), np.nan)
                    for t, r in enumerate(rows):
                        if r is not None:
                            table[t] = r
                state[f"records.{j}.{i}"] = table
        return state

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """Back to :meth:`state`'s arrays (the models must be initialised)."""
        for g, group in enumerate(self.groups):
            if group.model is not None:
                prefix = f"model.{g}."
                group.model.set_state(
                    {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                )
        steps = np.asarray(state["records.step"]).tolist()
        slots = []
        for j in range(len(self.slot_sizes())):
            keys = np.asarray(state[f"records.{j}.keys"]).tolist()
            slots.append({key: np.asarray(state[f"records.{j}.{i}"]) for i, key in enumerate(keys)})
        self.records = [
            (s, [{key: table[t] for key, table in slot.items()} for slot in slots])
            for t, s in enumerate(steps)
        ]

    def history(self) -> dict[str, np.ndarray]:
        """``molecule_id`` (M,), ``step`` (T,), and for every extras key a (T, M) float
        array (NaN where a molecule does not report that key)."""
        ids = self.ids
        out: dict[str, np.ndarray] = {
            "molecule_id": ids,
            "step": np.array([s for s, _ in self.records]),
        }
        if not self.records:
            return out
        rows = [g.rows for g in self.groups if g.model is not None]
        if self.socket_rows.size:
            rows.append(self.socket_rows)
        keys = sorted({k for _, extras in self.records for e in extras for k in e})
        for key in keys:
            table = np.full((len(self.records), len(ids)), np.nan)
            for t, (_, extras) in enumerate(self.records):
                for r, e in zip(rows, extras, strict=True):
                    if key in e:
                        table[t, r] = e[key]
            out[key] = table
        return out


class MoleculeCoupling:
    """What every coupling (Meep's and the engines') offers on its molecules, delegated
    to its :class:`Molecules` (``self._molecules``, set by the subclass)."""

    _molecules: Molecules

    # the molecule side's settings, readable and settable on the coupling
    hub = property(
        lambda self: self._molecules.hub, lambda self, v: setattr(self._molecules, "hub", v)
    )
    timeout = property(
        lambda self: self._molecules.timeout, lambda self, v: setattr(self._molecules, "timeout", v)
    )
    on_lost = property(
        lambda self: self._molecules.on_lost, lambda self, v: setattr(self._molecules, "on_lost", v)
    )
    record_every = property(lambda self: self._molecules.record_every)

    @property
    def refused_changes(self) -> list[str]:
        """Changes of socket molecules their drivers refused (each naming molecule and
        parameter), in order."""
        return self._molecules.refused

    @property
    def molecule_ids(self) -> np.ndarray:
        """Ids of all molecules in the order they were added."""
        return self._molecules.ids

    @property
    def _groups(self) -> list[Group]:
        return self._molecules.groups

    def set_params(self, molecule_ids: int | Sequence[int], changes: Mapping[str, Any]) -> None:
        """Change mutable model parameters of molecules at the next step
        boundary: the changes are checked now (an error names the molecule id and the
        parameter) and applied, in the order asked, before the molecules' next step
        (before a checkpoint written first, which then holds them).

        ``changes``: parameter name -> value as the model takes it: one value for all
        the listed molecules, or, when they all belong to one ``add_molecules`` group,
        a list with one value per listed molecule. A parameter the model shares by all
        its molecules can only change for the whole group (list all its ids).
        Molecules behind socket drivers get the change over the wire at the same
        boundary (``hub.set_params``): their drivers check it then, and a refusal is
        logged naming molecule and parameter and kept in ``refused_changes`` while the
        run goes on; one value for all of them.
        """
        self._molecules.set_params(molecule_ids, changes)

    def apply_kick(self, molecule_ids: int | Sequence[int], impulse: Any) -> None:
        """Kick embedded molecules at the next step boundary with an impulsive field
        ``E(t) = impulse delta(t)`` (``impulse`` = kappa e, a.u. of field times time: one
        3-vector for all listed molecules), in order with :meth:`set_params` changes.
        Checked now: an unknown molecule, an embedded model without kicks, or an impulse
        that is not a finite 3-vector is a UsageError naming the molecule; socket
        molecules are kicked over the wire (``hub.apply_kick``), their drivers checking."""
        self._molecules.apply_kick(molecule_ids, impulse)
