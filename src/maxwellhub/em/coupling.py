"""Molecules coupled to a non-Meep EM engine: the stepping loop written once.

Usage (a cavity with 1,000 embedded two-level systems and 2 behind socket drivers)::

    from maxwellhub import SocketHub
    from maxwellhub.em import EngineCoupling, SingleModeCavity

    cavity = SingleModeCavity(frequency_au=0.242, damping_au=0.0, coupling_strength=1e-4,
                              coupling_axis="z", include_dse=True)
    hub = SocketHub(unixsocket="cavity_demo")
    coupling = EngineCoupling(cavity, dt_au=0.5, hub=hub, record_every=100)
    coupling.add_molecules("tls", n=1000, omega=0.242, mu12=187.0, orientation=2,
                           pe_initial=1e-3)
    coupling.add_socket_molecules(n=2)           # maxwellhub-driver --unix cavity_demo ...
    coupling.run(until=20_000.0)                  # a.u. of time
    history = coupling.history()                  # per-molecule extras and engine records

One step n (``t_n = n dt`` to ``t_{n+1}``): the engine gives the field (:meth:`Engine.field`,
one 3-vector broadcast to every molecule, or one row per molecule); every molecule steps
under it (embedded groups with one batched ``model.step`` each, socket molecules in one
hub barrier, with the ``on_lost`` policy); the sources dmu/dt (and, when the engine needs
them, the dipoles ``mux_au``...) times each molecule's ``rescaling`` go back to the engine
(:meth:`Engine.finish`). Parameter changes and kicks queued with :meth:`set_params` /
:meth:`apply_kick` apply at the next step boundary.

Recorded: the engine's observables and the ensemble aggregates (total dipole and total
dmu/dt) every step (``history()["engine/..."]``), per-molecule extras every
``record_every`` steps. :meth:`checkpoint_state` / :meth:`restore_state` carry all of it,
the models' states and the engine's (with its random generator), between step
boundaries, so a resumed run is bitwise the uninterrupted one.

Engines run in one process (MPI rank 0): under ``mpirun`` only Meep spreads its grid over
ranks; many drivers are spread with relays instead. This module makes O(1) Python calls
per step for any number of molecules (one per model group and one barrier) and never
converts units (everything is atomic units).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import DriverLost, UsageError
from ..parallel.mpi import rank_and_size
from .engine import Engine
from .molecules import MoleculeCoupling, Molecules

__all__ = ["EngineCoupling"]


class EngineCoupling(MoleculeCoupling):
    """Molecules coupled to ``engine`` (an :class:`~maxwellhub.em.engine.Engine`).

    Parameters: ``dt_au`` the time step (a.u.); ``hub`` a :class:`maxwellhub.SocketHub`
    for socket molecules; ``record_every`` per-molecule extras every this many steps (0:
    none; the engine and the aggregates are recorded every step); ``timeout`` and
    ``on_lost`` as for :class:`~maxwellhub.em.meep.MeepCoupling` (no deadline by default:
    a dead driver is noticed by its connection).
    """

    def __init__(
        self,
        engine: Engine,
        dt_au: float,
        hub=None,
        record_every: int = 1,
        timeout: float | None = None,
        on_lost: str | Callable[[DriverLost], bool] = "wait",
    ) -> None:
        if not isinstance(engine, Engine):
            raise UsageError(f"engine = {engine!r}; expected a maxwellhub.em Engine")
        if isinstance(dt_au, bool) or not (isinstance(dt_au, (int, float)) and dt_au > 0):
            raise UsageError(f"dt_au = {dt_au!r}; expected a number > 0")
        if not math.isfinite(dt_au):
            raise UsageError(f"dt_au = {dt_au!r}; expected a finite number > 0")
        self.engine = engine
        self.dt_au = float(dt_au)
        self._molecules = Molecules(hub, record_every, timeout, on_lost)
        self._positions: list[np.ndarray] = []
        self._scales: list[np.ndarray] = []
        self._started = False
        self.step_index = 0  # steps completed
        self._engine_records: list[dict[str, Any]] = []
        #: a stop request (a signal number) for the next step boundary; see
        #: :attr:`MeepCoupling.stop_request` (one process here: agreed at once)
        self.stop_request = 0
        self.stop_agreed = 0

    # ------------------------------------------------------------------ molecules

    @property
    def time_au(self) -> float:
        """Time reached (a.u.): ``step_index * dt_au``."""
        return self.step_index * self.dt_au

    def add_molecules(
        self,
        model: str | type,
        n: int | None = None,
        *,
        positions: Any = None,
        rescaling: Any = 1.0,
        molecule_ids: Sequence[int] | None = None,
        **params: Any,
    ) -> np.ndarray:
        """``n`` molecules (or one per row of ``positions``) propagated in this process
        by one batched ``model``; ``params`` are the model's (each a scalar or one per
        molecule). Returns their ids."""
        from maxwellhub.models import create_model

        count, points = self._count(n, positions)
        instance = create_model(model, n=count, **params)
        return self._add(count, points, rescaling, molecule_ids, model=instance)

    def add_socket_molecules(
        self,
        n: int | None = None,
        *,
        positions: Any = None,
        rescaling: Any = 1.0,
        molecule_ids: Sequence[int] | None = None,
        init: Mapping | None = None,
    ) -> np.ndarray:
        """``n`` molecules whose drivers connect to the hub; ``init`` is added to their
        INIT payload (which always carries ``dt_au``)."""
        count, points = self._count(n, positions)
        return self._add(count, points, rescaling, molecule_ids, init=dict(init or {}))

    @staticmethod
    def _count(n: int | None, positions: Any) -> tuple[int, np.ndarray]:
        if positions is None:
            if n is None:
                n = 1
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise UsageError(f"n = {n!r}; expected an int >= 1")
            return int(n), np.full((int(n), 3), np.nan)
        points = np.array(positions, dtype=np.float64)
        if points.ndim == 1:  # one coordinate per molecule: along x
            points = np.stack([points, np.zeros_like(points), np.zeros_like(points)], axis=1)
        if points.ndim != 2 or points.shape[1] not in (1, 2, 3) or not len(points):
            raise UsageError(f"positions: expected (M,), (M, 1..3) values, got {points.shape}")
        if points.shape[1] < 3:
            points = np.pad(points, ((0, 0), (0, 3 - points.shape[1])))
        if n is not None and n != len(points):
            raise UsageError(f"n = {n} but {len(points)} positions")
        return len(points), points

    def _add(self, n, points, rescaling, molecule_ids, model=None, init=None) -> np.ndarray:
        if self._started:
            raise UsageError("molecules must be added before the run starts")
        scale = np.broadcast_to(np.asarray(rescaling, dtype=np.float64), (n,))
        if not np.isfinite(scale).all():
            raise UsageError(f"rescaling = {rescaling!r}; expected finite numbers")
        ids = self._molecules.add(n, molecule_ids, model, init)
        self._positions.append(points)
        self._scales.append(np.array(scale))
        return ids

    # ------------------------------------------------------------------ running

    def _start(self) -> None:
        if not len(self._molecules):
            raise UsageError("no molecules: add some before running")
        if rank_and_size()[1] > 1:
            raise UsageError(
                f"the {self.engine.name} engine runs in one process; under mpirun only Meep "
                "spreads over ranks (spread many drivers with relays instead)"
            )
        m = len(self._molecules)
        self.engine.setup(np.concatenate(self._positions), self.dt_au)
        self._molecules.start()
        self._scale = np.concatenate(self._scales)
        self._scaled = not np.all(self._scale == 1.0)
        self._fields_shape = (m, 3)
        self._sources = np.zeros((m, 3))
        self._dipoles = np.zeros((m, 3)) if self.engine.needs_dipoles else None
        self._ones = np.ones(m)
        if m >= 10_000:  # every step's arrays of tens of MB: no page faults for each
            from ..hub import keep_freed_memory

            keep_freed_memory(m)
        self._started = True
        self._molecules.bind(self.dt_au)

    def step(self) -> None:
        """One step of the engine and every molecule."""
        if not self._started:
            self._start()
        n = self.step_index
        field = self.engine.field()
        # one vector for all: a read-only broadcast view, no copy
        fields = np.broadcast_to(field, self._fields_shape) if field.ndim == 1 else field
        sources, dipoles, nexts = self._molecules.answers(fields, n, self._sources, self._dipoles)
        if self._scaled:
            scale = self._scale[:, None]
            sources = sources * scale
            dipoles = None if dipoles is None else dipoles * scale
            nexts = None if nexts is None else nexts * scale
        self.engine.finish(sources, dipoles, nexts)
        record = self.engine.record()
        record["dmudt_total_au"] = self._ones @ sources
        if dipoles is not None:
            record["mu_total_au"] = self._ones @ dipoles
        self._engine_records.append(record)
        self.step_index = n + 1
        self.stop_agreed = self.stop_request

    def run(
        self,
        *step_functions: Callable[[EngineCoupling], None],
        until: float | None = None,
        steps: int | None = None,
    ) -> None:
        """Step until the time ``until`` (a.u., absolute: a resumed run ends where the
        uninterrupted one does) or ``steps`` more steps; after each step call every
        ``f(coupling)`` of ``step_functions`` (checkpoints, schedules, progress)."""
        if (until is None) == (steps is None):
            raise UsageError("run: give exactly one of until= (a.u.) and steps=")
        last = self.steps_until(until) if until is not None else self.step_index + int(steps or 0)
        while self.step_index < last:
            self.step()
            for f in step_functions:
                f(self)

    def steps_until(self, until: float) -> int:
        """The step count at which a run ``until`` the time ``until`` (a.u.) ends."""
        return round(until / self.dt_au)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, np.ndarray]:
        """Everything carried from one step boundary to the next, as named arrays: the
        step, the molecule ids, the engine's state (``engine.*``), every embedded
        model's state and the records (per-molecule and the engine's)."""
        if not self._started:
            raise UsageError("checkpoint_state: the coupling has not stepped yet")
        if self._molecules.pending:  # due before the next step: the checkpoint holds them
            self._molecules.apply_pending()
        state: dict[str, np.ndarray] = {
            "last_step": np.array(self.step_index, dtype=np.int64),
            "molecule_id": self.molecule_ids,
        }
        state.update({f"engine.{k}": np.asarray(v) for k, v in self.engine.state().items()})
        state.update(self._molecules.state())
        keys = sorted({k for r in self._engine_records for k in r})
        state["engine_records.keys"] = np.array(keys, dtype=str)
        for i, key in enumerate(keys):
            state[f"engine_records.{i}"] = np.array([r[key] for r in self._engine_records])
        return state

    def restore_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Continue from :meth:`checkpoint_state`'s arrays, before running (binds the
        socket molecules' drivers: start them, and restore the hub, first)."""
        if self._started:
            raise UsageError("restore_state must be called before the coupling has run")
        saved_ids = np.asarray(state["molecule_id"])
        if not np.array_equal(saved_ids, self.molecule_ids):
            raise UsageError(
                f"the checkpoint's molecule ids {saved_ids.tolist()[:10]} differ "
                f"from this coupling's {self.molecule_ids.tolist()[:10]}"
            )
        self._start()
        self.engine.restore({k[7:]: v for k, v in state.items() if k.startswith("engine.")})
        self._molecules.restore(state)
        self.step_index = int(state["last_step"])
        keys = np.asarray(state["engine_records.keys"]).tolist()
        columns = [np.asarray(state[f"engine_records.{i}"]) for i in range(len(keys))]
        count = len(columns[0]) if columns else 0
        self._engine_records = [
            {key: col[t] for key, col in zip(keys, columns, strict=True)} for t in range(count)
        ]

    # ------------------------------------------------------------------ results

    def history(self) -> dict[str, np.ndarray]:
        """The per-molecule records (``molecule_id``, ``step``, a (T, M) array per extras
        key, as :meth:`MeepCoupling.history`), and every step's engine records and
        aggregates as ``engine/<key>`` ((S, ...) arrays; ``engine/time_au`` the time
        reached by each step)."""
        out = self._molecules.history()
        records = self._engine_records
        if records:
            out["engine/step"] = np.arange(len(records), dtype=np.int64)
            out["engine/time_au"] = self.dt_au * np.arange(1, len(records) + 1)
            for key in sorted({k for r in records for k in r}):
                out[f"engine/{key}"] = np.array([r.get(key, np.nan) for r in records])
        return out
