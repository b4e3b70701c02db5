"""The Meep side of the molecules' kernels: their Yee sites in every chunk, the field read
from the DFT accumulators in place, the sources written with ``add_srcdata`` (see
:mod:`maxwellhub.em.meep` for why). The only module that touches Meep's internals; it
makes no Python call per molecule or per grid point in a step."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

try:  # the C kernels behind scipy's sparse @ vector, without its ~7 us of dispatch per call
    from scipy.sparse._sparsetools import csc_matvec as _csc_matvec
    from scipy.sparse._sparsetools import csr_matvec as _csr_matvec
except ImportError:  # pragma: no cover - a scipy that moved its private kernels
    _csc_matvec = _csr_matvec = None

from ...errors import UsageError
from ...parallel.mpi import comm_world
from ..kernels import (
    KERNEL_CUTOFF_SIGMAS,
    group_into_boxes,
    kernel_samples,
    self_coulomb_matrices,
)

__all__ = ["component_axis"]

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
