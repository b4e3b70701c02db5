"""Molecules inside a Meep simulation: field reads, sources, the step function.

Usage (a 2D cell, one embedded two-level system and one behind a socket driver)::

    import meep as mp
    from maxwellhub import SocketHub
    from maxwellhub.em import MeepCoupling

    sim = mp.Simulation(cell_size=mp.Vector3(8, 8), resolution=10,
                        boundary_layers=[mp.PML(3.0)])
    hub = SocketHub(unixsocket="demo")                 # inert on MPI ranks > 0
    coupling = MeepCoupling(sim, time_units_fs=0.1, hub=hub)
    coupling.add_molecules("tls", centers=[(0, 0)], sigma=0.1, axis="z",
                           omega=0.242, mu12=187.0, orientation=2, pe_initial=1e-4)
    coupling.add_socket_molecules(centers=[(1, 0)], sigma=0.1, axis="z")
    sim.run(coupling.step_function(), until=90)        # or coupling.run(until=90)
    pe = coupling.history()["Pe"]                      # (records, molecules), rank 0

How one step works (Meep calls the step function before each ``fields.step()``, when E
is at t_n and the molecular state at t_n - dt/2): read the kernel-weighted E of every
molecule, step every embedded group with one batched ``model.step`` (and the socket
molecules with one hub barrier), then write the new dmu/dt -- which belongs to
t_n + dt/2, exactly when Meep evaluates electric currents in that step -- into Meep's
source amplitudes. The molecular propagation is a midpoint rule on Meep's leapfrog.

Kernels live on the Yee sites of each field component: a Gaussian of width sigma (cut at
3 sigma) or, with ``sigma=0``, the multilinear "hat" of a point, normalised so that
sum(w) dV = 1 exactly over the sites (in every chunk and on every MPI rank). The field is
read as sum(w E) dV and the current emitted as w dmu/dt at the very same sites: read and
emission are exact transposes for every component.

Reading fields: ``sim.get_array`` costs about 40 ns per point and 5 us per call in Meep
1.25 (it interpolates to the centred grid through a generic per-point loop). Instead,
molecules are grouped into a few boxes, and each box has a zero-frequency DFT monitor on
the Yee grid updated every step: Meep's own C loop then adds E(t_{n+1}) * scale to the
monitor's accumulator at the end of each step. We view that accumulator with numpy
(``dft_chunk.dft`` is a raw ``complex<double>*``), read it and zero it: O(1) Python calls
per step (the tests check the view against ``get_field_point``). What a site costs per step
(measured, Meep 1.25): the DFT update about 3 ns and the source about 1 ns inside
``fields.step()``, our copy and zeroing about 1 ns, ``add_srcdata`` about 2 ns; one kernel
weight costs about 0.6 ns in each of the two sparse products (read and emission).

Updating source amplitudes in Meep 1.25 (what we found): ``fields.add_srcdata`` copies
the amplitudes into the C++ ``src_vol`` and nothing exposes them for writing; the index
vector of a ``sourcedata`` cannot be built from Python (only Meep fills it, e.g.
``dft_fields.fourier_sourcedata``); per-molecule ``CustomSource`` time functions cost 4-6
Python callbacks per molecule per step (MaxwellLink's way); ``change_sources`` rebuilds
everything, the user's sources included. But ``fields_chunk::add_source`` *combines* a
new ``src_vol`` with an existing one of the same component, time function and index
vector by adding the amplitudes in place (``src_vol::combinable`` /
``add_amplitudes_from``). So ``fourier_sourcedata`` of the same DFT monitor (each site's
position encoded in the amplitudes it returns) gives every chunk's Yee-site indices once,
in the monitor's order; we add one ``src_vol`` per box, chunk and component whose time
function is the constant 1 (one shared ``CustomSource``: a few callbacks per step in
all), and every step call ``add_srcdata`` once per box, chunk and component with
new - current amplitudes: O(1) Python calls per step, O(sites) C work, the user's own
sources untouched. We mirror what Meep holds, so the rounding of the increments never
accumulates. Consequences: do not call ``change_sources``, ``reset_meep`` or
``restart_fields`` once the molecules are coupled (detected: the step raises), and
``until_after_sources`` never ends (the molecule sources never stop).

Checkpoints (:mod:`maxwellhub.checkpoint`): between steps the coupling's whole state is a
dict of arrays (:meth:`MeepCoupling.checkpoint_state`); :meth:`MeepCoupling.restore_state`
rebuilds the sites, zeroes the DFT accumulators and adds the saved amplitudes to Meep's
zero ones, so Meep holds exactly the mirrored values and a resumed run is bitwise the
uninterrupted one (Meep's own ``dump_fields``/``load_fields`` carry the fields). Under
MPI each rank saves and restores the amplitudes of its own chunks' sites, and a stop
request (:attr:`MeepCoupling.stop_request`, set by a signal handler on any rank) rides in
the per-step Reduce to rank 0, whose decision every rank reads from the per-step Bcast
(:attr:`MeepCoupling.stop_agreed`): all ranks stop at the same step.

This module never makes a Python call per molecule or per grid point in a step (except
the hub's per-socket-molecule requests), never talks to the hub on MPI ranks other than 0,
never pickles (amplitudes reach the other ranks with ``Bcast``), and never converts units
itself (the factors of :mod:`maxwellhub.units` are folded into the kernel matrices once).
The step reuses preallocated site- and molecule-sized arrays: fresh ones of 10^4 molecules
made malloc give pages back to the kernel and fault them in again every step. Meep is
imported lazily.
"""

from __future__ import annotations

import ctypes
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

try:  # the C kernels behind scipy's sparse @ vector, without its ~7 us of dispatch per call
    from scipy.sparse._sparsetools import csc_matvec as _csc_matvec
    from scipy.sparse._sparsetools import csr_matvec as _csr_matvec
except ImportError:  # pragma: no cover - a scipy that moved its private kernels
    _csc_matvec = _csr_matvec = None

from ..errors import DriverLost, UsageError
from ..parallel.mpi import comm_world, rank_and_size
from ..units import MeepUnits
from .kernels import KERNEL_CUTOFF_SIGMAS, group_into_boxes, kernel_samples, self_coulomb_matrices
from .molecules import MoleculeCoupling, Molecules

__all__ = ["MeepCoupling"]

_AXES = {"x": 0, "y": 1, "z": 2}


def _matvec(
    matrix: sp.csr_matrix, x: np.ndarray, out: np.ndarray, rows: slice, transposed: bool = False
) -> np.ndarray:
    """``out = matrix @ x`` (or ``matrix.T @ x``) for a canonical CSR matrix whose rows
    outside ``rows`` are empty, and contiguous float64 vectors; returns ``out``. The
    transposed product loops over the matrix's rows too (CSR is the CSC of the
    transpose), so both cost the nonzeros in ``rows``, not the sites."""
    if _csr_matvec is None:
        out[:] = (matrix.T if transposed else matrix) @ x
        return out
    indptr = matrix.indptr[rows.start : rows.stop + 1]
    n = rows.stop - rows.start
    if transposed:
        out.fill(0.0)  # the kernels add to out
        _csc_matvec(matrix.shape[1], n, indptr, matrix.indices, matrix.data, x[rows], out)
    else:
        out[rows] = 0.0  # the rest stays 0
        _csr_matvec(n, matrix.shape[1], indptr, matrix.indices, matrix.data, x, out[rows])
    return out


@dataclass
class _Patch:
    """The Yee sites of one field component in one box, owned by one Meep chunk."""

    sourcedata: Any  # Meep's index vector of the sites (for add_srcdata)
    view: np.ndarray  # complex view of the DFT accumulator at those sites
    start: int  # position of the sites in the coupling's site vector
    stop: int


class _Sites:
    """All Yee sites the molecules read and emit at, and the kernel matrix between them.

    Built collectively (every MPI rank) when the coupling starts. Per box of molecules
    and per field component, one zero-frequency, every-step DFT monitor over the box
    makes Meep itself copy E at the box's Yee sites into a buffer after each step (the
    DFT accumulator, viewed and zeroed by numpy), and ``fourier_sourcedata`` of the
    same monitor gives the sites' chunk indices in the same order, for ``add_srcdata``.

    The unit factors are folded into the two kernel matrices: ``field_to_au`` (a.u. of
    field per Meep unit) and ``source_to_meep`` ((M,): Meep dipole current per a.u. of
    dmu/dt, times each molecule's rescaling), both from :mod:`maxwellhub.units`.
    """

    def __init__(
        self,
        sim,
        centers: np.ndarray,
        sigmas: np.ndarray,
        axes: np.ndarray,
        src_time,
        field_to_au: float,
        source_to_meep: np.ndarray,
    ) -> None:
        import meep as mp

        fields = sim.fields
        self.fields = fields
        self.src_time = src_time
        dx = 1.0 / sim.resolution
        cell = np.array([sim.cell_size.x, sim.cell_size.y, sim.cell_size.z])
        active = cell > 0
        reach = np.where(sigmas > 0, KERNEL_CUTOFF_SIGMAS * sigmas, dx)
        lo = np.where(active, centers - reach[:, None], 0.0)
        hi = np.where(active, centers + reach[:, None], 0.0)
        _check_inside(sim, lo, hi, active)
        self.patches: list[_Patch] = []
        self._scale: float | None = None  # DFT accumulator units per field unit
        self.offsets = np.zeros((3, 3))  # Yee offset (cells) of Ex, Ey, Ez per axis
        rows, cols, vals = [], [], []
        dv = dx ** int(active.sum())
        self._dfts: list[Any] = []  # Meep DFT monitors (SWIG objects)
        for box_lo, box_hi, members in group_into_boxes(lo, hi, active, dx):
            center = mp.Vector3(*(0.5 * (box_lo + box_hi)))
            size = mp.Vector3(*(box_hi - box_lo))
            volume = mp.Volume(center=center, size=size, dims=sim.dimensions)
            for axis, component in enumerate((mp.Ex, mp.Ey, mp.Ez)):
                mols = members[axes[members, axis]]
                if not mols.size:
                    continue
                for patch, sites in self._patches(sim, mp, volume, component, active, dx):
                    for m in mols:
                        w = kernel_samples(sites, centers[m][active], float(sigmas[m]), dx)
                        nz = np.flatnonzero(w)
                        rows.append(np.full(nz.size, axis * len(centers) + m))
                        cols.append(patch.start + nz)
                        vals.append(w[nz])
        n_sites = self.patches[-1].stop if self.patches else 0
        weights = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(3 * len(centers), n_sites),
        )
        # normalise every molecule's kernel so that sum(w) dV = 1 over all its sites,
        # which may lie in several chunks and on several MPI ranks
        totals = np.asarray(weights.sum(axis=1)).ravel()
        comm = comm_world()
        if comm is not None and comm.Get_size() > 1:
            comm.Allreduce(totals.copy(), totals)
        coupled = axes.T.ravel()
        if (totals[coupled] <= 0).any():
            m = int(np.flatnonzero(coupled & (totals <= 0))[0]) % len(centers)
            raise UsageError(f"molecule at {list(centers[m])}: its kernel covers no grid point")
        scale = np.where(totals > 0, 1.0 / np.where(totals > 0, totals, 1.0), 0.0)
        # rows a * M + m: component a of molecule m (one block of M rows per component)
        normalised = (sp.diags(scale) @ weights).tocsr()  # (3M, sites), * dV
        # E (a.u.) = normalised @ accumulator / (accumulator units per field unit) ...
        self.read_matrix = (normalised * (field_to_au / (self._scale or 1.0))).tocsr()
        # ... and the current at the sites = emit_matrix^T @ dmu/dt, with emit_matrix =
        # normalised / dV (dmu/dt in Meep units): the same sparsity, so both products
        # loop over the molecules' nonzero weights, never over all the sites in the boxes
        self.emit_matrix = (
            sp.diags(np.tile(source_to_meep, 3) / dv) @ normalised
        ).tocsr()  # (3M, sites)
        for matrix in (self.read_matrix, self.emit_matrix):
            matrix.sum_duplicates()  # canonical CSR, as the C kernel expects
        m = len(centers)
        used = np.flatnonzero(axes.any(axis=0))  # the components any molecule couples to
        self._rows = slice(int(used.min()) * m, (int(used.max()) + 1) * m)
        self.held = np.zeros(n_sites)  # what Meep holds
        self._site_field = np.zeros(n_sites)
        self._read = np.zeros(3 * len(centers))
        self._emit = np.zeros(n_sites)
        self._delta = np.zeros(n_sites, dtype=np.complex128)  # imaginary part stays 0
        # the arguments of each per-step add_srcdata: the amplitudes are views of _delta
        self._srcdata_args = [
            (p.sourcedata, src_time, p.stop - p.start, self._delta[p.start : p.stop], False)
            for p in self.patches
        ]
        self.self_coulomb = self_coulomb_matrices(centers, sigmas, axes, self.offsets, active, dx)

    def _patches(self, sim, mp, volume, component, active, dx):
        """Yield (patch, site coordinates) for this rank's chunks of one box."""
        fields = sim.fields
        where = volume.swigobj
        dft = fields.add_dft_fields([component], where, np.array([0.0]), False, 1, False)
        self._dfts.append(dft)  # keep the monitor alive: it is our field reader
        shape = [int(n) for n in fields.dft_monitor_size(dft, where, component) if n]
        # fourier_sourcedata returns -dJ[position] for each site: dJ = position + 1
        codes = (np.arange(int(np.prod(shape))) + 1.0).astype(np.complex128)
        sourcedata = list(dft.fourier_sourcedata(where, component, fields, codes))
        _, corner, _ = sim.get_array_slice_dimensions(component, vol=volume)
        corner = np.array([corner.x, corner.y, corner.z])
        # where this component's Yee sites sit within a cell (0 or 1/2 per axis)
        self.offsets[component_axis(component)] = np.mod(np.rint(2 * corner / dx) / 2, 1.0)
        corner = corner[active]
        chunk = dft.chunks
        for data in sourcedata:
            if chunk is None:
                raise RuntimeError("Meep returned more source chunks than DFT chunks")
            n = int(chunk.N)
            code = np.rint(-np.asarray(data.amp_arr).real).astype(np.int64) - 1
            data.amp_arr = mp.ComplexVector()  # decoded; do not copy it every step
            if code.size != n:
                raise RuntimeError(f"Meep DFT chunk has {n} points but {code.size} sites")
            if n:
                pos = np.stack(np.unravel_index(code, shape), axis=1)[:, : corner.size]
                buffer = (ctypes.c_double * (2 * n)).from_address(int(chunk.dft))
                view = np.ctypeslib.as_array(buffer).view(np.complex128)
                view[:] = 0.0
                chunk.update_dft(fields.time())  # E now; later steps add theirs
                if self._scale is None:
                    self._scale = complex(chunk.scale).real
                start = self.patches[-1].stop if self.patches else 0
                patch = _Patch(data, view, start, start + n)
                self.patches.append(patch)
                fields.add_srcdata(data, self.src_time, n, np.zeros(n, np.complex128), False)
                yield patch, corner + dx * pos
            chunk = chunk.next_in_dft

    def read(self) -> np.ndarray:
        """This rank's part of the kernel-weighted E of every molecule (3M,), a.u., as
        component blocks: E_a of molecule m at a * M + m.

        E at the sites is what the last ``fields.step()`` left in the DFT buffers (the
        buffers are zeroed here so the next step writes the next E alone). The array
        returned is overwritten by the next call."""
        site_field = self._site_field
        for p in self.patches:
            site_field[p.start : p.stop] = p.view.real
            p.view.fill(0.0)
        return _matvec(self.read_matrix, site_field, self._read, self._rows)

    def restore(self, held: np.ndarray) -> None:
        """Zero the DFT accumulators and make Meep hold ``held`` (from a checkpoint's
        ``self.held``) at the sites; called right after the sites were built, when Meep
        holds exactly 0 there, so it then holds ``0 + held``, the same bits as ``held``."""
        held = np.asarray(held, dtype=np.float64)
        if held.shape != self.held.shape:
            raise UsageError(
                f"the checkpoint has source amplitudes at {held.shape[0]} sites "
                f"but this simulation has {self.held.shape[0]} on this rank: "
                "the cell, resolution, molecules or MPI ranks differ"
            )
        self.clear_accumulators()
        np.subtract(held, self.held, out=self._delta.real)
        self.held += self._delta.real
        for args in self._srcdata_args:
            self.fields.add_srcdata(*args)

    def clear_accumulators(self) -> None:
        """Zero the DFT accumulators (the next ``fields.step()`` writes the next E)."""
        for p in self.patches:
            p.view.fill(0.0)

    def emit(self, sources_au: np.ndarray) -> None:
        """Make Meep's current at every site equal to the molecules' emission, from
        their dmu/dt (3M,) in a.u., in component blocks as :meth:`read` returns E."""
        target = _matvec(self.emit_matrix, sources_au, self._emit, self._rows, transposed=True)
        delta = self._delta.real
        np.subtract(target, self.held, out=delta)
        self.held += delta  # the same IEEE additions Meep does: `held` is what it holds
        add_srcdata = self.fields.add_srcdata
        for args in self._srcdata_args:
            add_srcdata(*args)


def component_axis(component) -> int:
    """0, 1, 2 for Meep's Ex, Ey, Ez."""
    import meep as mp

    return {mp.Ex: 0, mp.Ey: 1, mp.Ez: 2}[component]


def _check_inside(sim, lo: np.ndarray, hi: np.ndarray, active: np.ndarray) -> None:
    """Refuse kernels (support boxes lo..hi, (M, 3)) that reach outside the cell."""
    size = np.array([sim.cell_size.x, sim.cell_size.y, sim.cell_size.z])
    center = np.array([sim.geometry_center.x, sim.geometry_center.y, sim.geometry_center.z])
    low, high = center - size / 2, center + size / 2
    bad = active & ((lo < low) | (hi > high))
    if bad.any():
        m, axis = (int(i[0]) for i in np.nonzero(bad))
        raise UsageError(
            f"the kernel of molecule {m} reaches outside the cell along "
            f"{'xyz'[axis]}: [{lo[m, axis]:.3g}, {hi[m, axis]:.3g}] is not "
            f"inside [{low[axis]:.3g}, {high[axis]:.3g}]; move the molecule "
            "or make sigma smaller"
        )


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
