"""The coupling API of molecules in a Meep simulation (:class:`MeepCoupling`): molecules
embedded or behind socket drivers, the step function Meep calls, the per-step exchange
between MPI ranks, and the checkpoint state (see :mod:`maxwellhub.em.meep`)."""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ...errors import DriverLost, UsageError
from ...parallel.mpi import comm_world, rank_and_size
from ...units import MeepUnits
from ..molecules import MoleculeCoupling, Molecules
from .sites import _AXES, _Sites

__all__ = ["MeepCoupling"]


def _as_points(centers: Any) -> np.ndarray:
    """Centres as an (n, 3) float array from Vector3s, tuples or an array."""
    if hasattr(centers, "x"):
        centers = [centers]
    out = []
    for c in centers:
        v = [c.x, c.y, c.z] if hasattr(c, "x") else list(np.atleast_1d(c))
        if not 1 <= len(v) <= 3:
            raise UsageError(f"a molecule centre needs 1 to 3 coordinates, got {c!r}")
        out.append([float(a) for a in v] + [0.0] * (3 - len(v)))
    if not out:
        raise UsageError("no molecule centres given")
    arr = np.array(out)
    if not np.isfinite(arr).all():
        raise UsageError("molecule centres must be finite")
    return arr


def _per_molecule(name: str, value: Any, n: int, minimum: float) -> np.ndarray:
    arr = (
        np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)).copy()
        if np.ndim(value) == 0 or len(value) == n
        else None
    )
    if arr is None:
        raise UsageError(f"{name} must be a number or {n} numbers, got {value!r}")
    if not (np.isfinite(arr).all() and (arr >= minimum).all()):
        raise UsageError(f"{name} = {value!r} is not allowed; expected finite numbers >= {minimum}")
    return arr


class MeepCoupling(MoleculeCoupling):
    """Molecules coupled to an ordinary ``mp.Simulation``, serially or under MPI.

    Molecules are added with :meth:`add_molecules` (embedded model) and
    :meth:`add_socket_molecules` (drivers through the hub) before the run starts; each
    call returns the molecule ids. ``axis`` is "x", "y", "z" or any combination such as
    "xyz": the field components the molecule reads and emits. In a 1D Meep cell (along
    z) the components are x and y. ``sigma`` is the Gaussian width in Meep length units
    (0: point kernel); ``rescaling`` multiplies the molecule's emitted dmu/dt.

    :param sim: the Meep simulation (not yet run, or run without molecules so far).
        Courant factor 0.5 is assumed only through ``sim.fields.dt``; no symmetries, real
        fields.
    :param time_units_fs: the Meep time unit in fs (see :mod:`maxwellhub.units`).
    :param hub: a :class:`maxwellhub.SocketHub` for socket molecules (None on ranks > 0 is
        fine).
    :param record_every: record every molecule's extras every this many steps (rank 0);
        0 records nothing (what the benchmarks do).
    :param timeout: seconds to wait for drivers to bind and for each barrier; None
        (default): no deadline, as long as the drivers compute (a dead driver is noticed by
        its connection, see :mod:`maxwellhub.liveness`; a long wait logs who is missing).
    :param on_lost: what a barrier does when a socket molecule's driver is gone:
        ``"wait"`` for a replacement until ``timeout``, ``"abort"`` the run at once
        (DriverLost), or a function ``f(exc: DriverLost) -> bool`` called at once (say, to
        start a replacement): True waits for the replacement (the frozen step goes on,
        until ``timeout``), False aborts.
    :param subtract_self_coulomb: remove from each molecule's field its own longitudinal
        (Coulomb) field, which a kernel with a divergence (any in-plane or 3D component)
        feels as a huge instantaneous self-interaction ~ mu/sigma^3; the molecular
        Hamiltonian already contains it. Coulomb fields between molecules are kept. Exact
        on Meep's lattice where the molecule sits in vacuum (see
        ``self_coulomb_matrices`` in ``src/maxwellhub/em/kernels.py``); no effect on Ez in 2D
        or on 1D cells.
    """

    def __init__(
        self,
        sim,
        time_units_fs: float = 0.1,
        hub=None,
        record_every: int = 1,
        timeout: float | None = None,
        subtract_self_coulomb: bool = True,
        on_lost: str | Callable[[DriverLost], bool] = "wait",
    ) -> None:
        self._molecules = Molecules(hub, record_every, timeout, on_lost)
        self.sim = sim
        self.subtract_self_coulomb = bool(subtract_self_coulomb)
        self.units = MeepUnits(time_units_fs)
        self._centers: list[np.ndarray] = []
        self._sigmas: list[np.ndarray] = []
        self._axes: list[np.ndarray] = []
        self._scales: list[np.ndarray] = []
        self._started = False
        self._fields = None
        self._last_step: int | None = None
        self.fields_au = np.zeros((0, 3))  # last fields read (a.u.), rank 0; reused
        self.sources_au = np.zeros((0, 3))  # last dmu/dt (a.u.), every rank; reused
        #: a request to stop at the next step boundary (a signal number; 0: none), set on
        #: any rank (say, by a signal handler). Under MPI it reaches rank 0 in the per-step
        #: Reduce of the fields and rank 0's decision comes back in the per-step Bcast of
        #: the sources, as :attr:`stop_agreed`: every rank sees it at the same step, with
        #: no extra collective.
        self.stop_request = 0
        #: the stop request every rank agreed on at the last step (0: go on)
        self.stop_agreed = 0

    # ------------------------------------------------------------------ molecules

    def add_molecules(
        self,
        model: str | type,
        centers: Any,
        *,
        sigma: Any = 0.1,
        axis: str = "z",
        rescaling: Any = 1.0,
        molecule_ids: Sequence[int] | None = None,
        **params: Any,
    ) -> np.ndarray:
        """Add molecules propagated in this process by one batched ``model`` instance.

        ``params`` are the model's parameters (a.u.), each a scalar or one per molecule.
        """
        from maxwellhub.models import create_model

        n = len(_as_points(centers))
        instance = create_model(model, n=n, **params)
        return self._add(centers, sigma, axis, rescaling, molecule_ids, model=instance)

    def _apply_param_changes(self) -> None:
        """Apply the queued parameter changes (rank 0 steps the models; elsewhere the
        models never step, the queue is dropped)."""
        self._molecules.apply_pending(run=self._rank == 0)

    def add_socket_molecules(
        self,
        centers: Any,
        *,
        sigma: Any = 0.1,
        axis: str = "z",
        rescaling: Any = 1.0,
        molecule_ids: Sequence[int] | None = None,
        init: Mapping | None = None,
    ) -> np.ndarray:
        """Add molecules whose drivers connect to the hub; ``init`` is added to their
        INIT payload (which always carries ``dt_au``)."""
        return self._add(centers, sigma, axis, rescaling, molecule_ids, init=dict(init or {}))

    def _add(self, centers, sigma, axis, rescaling, molecule_ids, model=None, init=None):
        if self._started:
            raise UsageError("molecules must be added before the run starts")
        points = _as_points(centers)
        n = len(points)
        if (
            not isinstance(axis, str)
            or not axis
            or set(axis) - set(_AXES)
            or len(set(axis)) != len(axis)
        ):
            raise UsageError(
                f"axis = {axis!r}; expected 'x', 'y', 'z' or a combination such as 'xyz'"
            )
        mask = np.zeros(3, dtype=bool)
        mask[[_AXES[a] for a in axis]] = True
        ids = self._molecules.add(n, molecule_ids, model, init)
        self._centers.append(points)
        self._sigmas.append(_per_molecule("sigma", sigma, n, 0.0))
        self._axes.append(np.broadcast_to(mask, (n, 3)))
        self._scales.append(_per_molecule("rescaling", rescaling, n, -np.inf))
        return ids

    # ------------------------------------------------------------------ running

    def step_function(self) -> Callable:
        """The function to give ``sim.run``: ``sim.run(coupling.step_function(), until=T)``.

        It advances the molecules once per Meep time step, whatever Meep calls it for
        (Meep calls step functions once more after the last step; that propagation is
        the one the next ``run`` starts with)."""

        def maxwellhub_step(sim) -> None:
            self._step(sim)

        return maxwellhub_step

    def run(self, *step_functions: Callable, until: float) -> None:
        """``sim.run`` with the molecules' step function (and yours) until ``until``."""
        self.sim.run(self.step_function(), *step_functions, until=until)

    def _step(self, sim) -> None:
        n = sim.fields.t
        if n == self._last_step:
            return
        if not self._started:
            self._start(sim)
        elif sim.fields is not self._fields:
            raise UsageError(
                "the Meep fields were re-created (reset_meep, change of "
                "structure or sources) after the molecules were coupled"
            )
        fields_au = self._sites.read()
        if self._size > 1:
            # this rank's stop request rides along with its share of the fields
            send = self._reduce_send
            send[:-1] = fields_au
            send[-1] = float(self.stop_request)
            comm_world().Reduce(send, self._reduced, root=0)
            fields_au = self._reduced[:-1]
        fields_au = fields_au.reshape(3, -1).T  # (M, 3), column-major
        if self._coulomb is not None:  # remove each molecule's own Coulomb field
            fields_au = fields_au + self.units.efield_meep_to_au(
                np.einsum("mab,mb->ma", self._coulomb, self._emitted)
            )
        self._propagate(fields_au, n)
        self._sites.emit(self._bcast[:-1])
        if self._coulomb is not None:
            s_meep = self.units.source_au_to_meep(self.sources_au) * self._scale[:, None]
            self._emitted += s_meep * sim.fields.dt
        self._last_step = n

    def _propagate(self, fields_au: np.ndarray, step: int) -> None:
        """Rank 0 steps every molecule; the others receive the sources by broadcast.

        The sources land in ``self._bcast`` (``self.sources_au`` views it). Its last
        element is a flag: 1 when rank 0 failed (every rank raises), else minus the
        agreed stop request (see :attr:`stop_agreed`)."""
        rank, size = self._rank, self._size
        buf = self._bcast
        if rank == 0:
            try:
                self.fields_au = fields_au
                if self._molecules.pending:
                    self._apply_param_changes()
                self._drive(fields_au, step, self.sources_au)
                buf[-1] = -float(self._stop_decision()) if size > 1 else 0.0
            except BaseException:
                if size > 1:  # let the other ranks fail too instead of hanging
                    buf[-1] = 1.0
                    comm_world().Bcast(buf, root=0)
                raise
        elif self._molecules.pending:
            self._apply_param_changes()  # dropped: the models here never step
        if size > 1:
            comm_world().Bcast(buf, root=0)
            if buf[-1] > 0.0:
                raise RuntimeError("maxwellhub: rank 0 failed to step the molecules")
            self.stop_agreed = int(-buf[-1])
        else:
            self.stop_agreed = self.stop_request

    def _stop_decision(self) -> int:
        """Rank 0, under MPI: the stop every rank will see for this step. Rank 0's own
        request (a signal number) if it has one, else whatever another rank asked for
        (the per-step Reduce summed the requests: a single signal number comes through
        as itself, a sum of several as SIGTERM)."""
        if self.stop_request:
            return int(self.stop_request)
        total = int(self._reduced[-1])
        if total <= 0:
            return 0
        return total if total in {int(s) for s in signal.Signals} else int(signal.SIGTERM)

    def _drive(self, fields_au: np.ndarray, step: int, sources: np.ndarray) -> None:
        """Step every molecule under ``fields_au`` (M, 3); write their dmu/dt to
        ``sources`` (M, 3)."""
        self._molecules.step(fields_au, step, sources)

    def _start(self, sim) -> None:
        """Set everything up, collectively, at the first step."""
        import meep as mp

        if not len(self._molecules):
            raise UsageError("no molecules: add some before running")
        if sim.symmetries:
            raise UsageError("molecules cannot be coupled to a simulation with symmetries")
        fields = sim.fields
        if not fields.is_real:
            raise UsageError(
                "complex fields (k_point or force_complex_fields) are not "
                "supported by the molecule coupling"
            )
        if sim.dimensions == 1 and np.concatenate(self._axes)[:, 2].any():
            raise UsageError("a 1D Meep cell (along z) has no Ez: use axis 'x' or 'y'")
        dt_au = self.units.time_meep_to_au(fields.dt)
        axes = np.concatenate(self._axes)
        self._scale = np.concatenate(self._scales)
        for axis, component in enumerate((mp.Ex, mp.Ey, mp.Ez)):
            if axes[:, axis].any():
                fields.require_component(component)
        # one constant time function for all molecule sources: current = amplitude
        self._src_time = mp.CustomSource(lambda t: 1.0).swigobj
        fields.register_src_time(self._src_time)
        self._sites = _Sites(
            sim,
            np.concatenate(self._centers),
            np.concatenate(self._sigmas),
            axes,
            self._src_time,
            field_to_au=self.units.efield_meep_to_au(1.0),
            source_to_meep=self.units.source_au_to_meep(self._scale),
        )
        fields.require_source_components()
        self._fields = fields
        coulomb = self._sites.self_coulomb
        self._coulomb = coulomb if self.subtract_self_coulomb and coulomb.any() else None
        self._emitted = np.zeros((len(self._molecules), 3))  # dipole emitted so far, Meep units
        self._bcast = np.zeros(3 * len(self._molecules) + 1)  # sources (a.u.) and a fail flag
        self.sources_au = self._bcast[:-1].reshape(3, -1).T  # (M, 3), column-major
        # the fields summed over MPI ranks, and the ranks' stop requests (last element)
        self._reduce_send = np.zeros(3 * len(self._molecules) + 1)
        self._reduced = np.zeros(3 * len(self._molecules) + 1)
        self._molecules.start()
        self._started = True
        self._rank, self._size = rank_and_size()
        if self._rank == 0:
            self._molecules.bind(dt_au)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, np.ndarray]:
        """Everything the coupling carries from one step to the next, as named arrays
        (no objects: savable with ``np.savez`` and loadable with ``allow_pickle=False``).

        Call it from a step function placed after the coupling's in ``sim.run``, when
        the molecules have done step ``sim.fields.t`` and Meep's fields are still at
        that step (:mod:`maxwellhub.checkpoint` does, together with Meep's own field
        dump). On rank 0: the step, the molecules' ids, every embedded model's state,
        the last fields and sources, the self-Coulomb bookkeeping, the amplitudes Meep
        holds at this rank's sites, and the recorded history; on other MPI ranks the
        step, the sources and their own sites' amplitudes. Socket molecules' states live
        in their drivers (and the hub's snapshot), not here.
        """
        if not self._started or self._last_step is None:
            raise UsageError(
                "checkpoint_state: the coupling has not stepped yet (a "
                "checkpoint before the first step is a fresh start)"
            )
        if self.sim.fields.t != self._last_step:
            raise UsageError(
                f"checkpoint_state at Meep step {self.sim.fields.t}, but the "
                f"molecules are at step {self._last_step}: call it from a step "
                "function after the coupling's"
            )
        if self._molecules.pending:  # due before the next step: the checkpoint holds them
            self._apply_param_changes()
        state: dict[str, np.ndarray] = {
            "last_step": np.array(self._last_step, dtype=np.int64),
            "molecule_id": self.molecule_ids,
            "sources": self._bcast[:-1].copy(),
            "emitted": self._emitted.copy(),
            "held": self._sites.held.copy(),
        }
        if self._rank != 0:
            return state
        state["fields_au"] = np.array(self.fields_au, dtype=np.float64)
        state.update(self._molecules.state())
        return state

    def restore_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Continue from :meth:`checkpoint_state`'s arrays, before ``sim.run``: sets the
        coupling up now (binding socket molecules' drivers, so start them first), puts
        every embedded model, source amplitude and record back, and makes the step the
        checkpoint was taken at count as done. Load Meep's fields (``sim.load_fields``)
        after this call, and (socket molecules) restore the hub before it: the DFT
        monitors must exist when Meep loads its fields, and the hub must know its step
        before drivers bind."""
        if self._started:
            raise UsageError("restore_state must be called before the coupling has run")
        saved_ids = np.asarray(state["molecule_id"])
        if not np.array_equal(saved_ids, self.molecule_ids):
            raise UsageError(
                f"the checkpoint's molecule ids {saved_ids.tolist()[:10]} differ "
                f"from this coupling's {self.molecule_ids.tolist()[:10]}"
            )
        if self.sim.fields is None:
            self.sim.init_sim()
        self._start(self.sim)
        self._sites.restore(state["held"])
        self._bcast[:-1] = state["sources"]
        self._emitted[:] = state["emitted"]
        self._last_step = int(state["last_step"])
        if self._rank != 0:
            return
        self.fields_au = np.array(state["fields_au"], dtype=np.float64)
        self._molecules.restore(state)

    def clear_field_reads(self) -> None:
        """Zero the DFT accumulators the coupling reads E from (after ``sim.load_fields``,
        which also loads them, in single precision)."""
        self._sites.clear_accumulators()

    # ------------------------------------------------------------------ results

    def history(self) -> dict[str, np.ndarray]:
        """What was recorded so far (rank 0; empty elsewhere).

        ``molecule_id`` (M,), ``step`` (T,), and for every extras key a (T, M) float
        array (NaN where a molecule does not report that key), e.g. ``time_au``, ``Pe``.
        """
        return self._molecules.history()
