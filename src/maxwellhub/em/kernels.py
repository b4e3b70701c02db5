"""Molecule kernels on a grid, pure numpy: the Gaussian or point weights, the molecule's
own longitudinal (Coulomb) self-interaction on a Yee lattice, and the grouping of
molecules into boxes.

Nothing here imports Meep, holds state or converts units; lengths are Meep lengths.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError

__all__ = [
    "KERNEL_CUTOFF_SIGMAS",
    "group_into_boxes",
    "kernel_samples",
    "kernel_weights",
    "self_coulomb_matrices",
]

#: A Gaussian kernel is cut at this many sigma (1.1% of its peak); the discrete
#: normalisation includes the cut, which moves the radiated rate by ~3e-4 of itself.
KERNEL_CUTOFF_SIGMAS = 3.0


def kernel_weights(
    points: np.ndarray, center: np.ndarray, sigma: float, spacing: float
) -> np.ndarray:
    """Weights of one molecule's kernel at grid ``points`` (P, d), normalised so that
    ``weights.sum() * spacing**d == 1`` exactly.

    ``sigma > 0``: a Gaussian ``exp(-|r - center|^2 / (2 sigma^2))`` cut at
    ``KERNEL_CUTOFF_SIGMAS * sigma``; ``sigma == 0``: the multilinear hat of a point (the
    weights of linear interpolation to ``center``). ``d`` is the number of axes the cell
    extends along (1, 2 or 3); the same code serves all.
    """
    points = np.asarray(points, dtype=np.float64)
    w = kernel_samples(points, np.asarray(center, dtype=np.float64), float(sigma), spacing)
    total = w.sum()
    if not total > 0:
        raise UsageError(f"molecule at {list(center)}: its kernel covers no grid point")
    return w / (total * spacing ** points.shape[1])


def kernel_samples(sites: np.ndarray, center: np.ndarray, sigma: float, dx: float) -> np.ndarray:
    """Unnormalised kernel weights at ``sites`` (see :func:`kernel_weights`)."""
    offset = sites - center
    if sigma > 0:
        r2 = np.einsum("pd,pd->p", offset, offset)
        w = np.exp(-0.5 * r2 / sigma**2)
        w[r2 > (KERNEL_CUTOFF_SIGMAS * sigma) ** 2] = 0.0
        return w
    return np.prod(np.clip(1.0 - np.abs(offset) / dx, 0.0, None), axis=1)


def self_coulomb_matrices(centers, sigmas, axes, offsets, active, dx) -> np.ndarray:
    """(M, 3, 3): L such that a molecule's own longitudinal (Coulomb) field, as its
    kernel reads it, is -L @ P for the dipole P it has emitted so far (Meep units).

    In Meep's Yee scheme the divergence of the curl vanishes exactly, so the longitudinal
    part of D is exactly -Pi_L of the accumulated source current, local in time:
    Pi_L = Div^T (Div Div^T)^-1 Div on the lattice, applied here by FFT on a periodic
    window around the molecule. Zero for divergence-free kernels (Ez in 2D, 1D cells).
    """
    out = np.zeros((len(centers), 3, 3))
    cache: dict[tuple, np.ndarray] = {}
    charge = np.zeros(3)
    for axis in range(3):  # the lattice where the divergence lives, from any component
        if axes[:, axis].any():
            charge = np.mod(offsets[axis] - 0.5 * (np.arange(3) == axis) * active, 1.0)
            break
    for m in range(len(centers)):
        coupled = tuple(np.flatnonzero(axes[m]))
        cell = centers[m] / dx - charge
        frac = np.round(np.mod(cell, 1.0), 9)
        key = (float(sigmas[m]), tuple(frac[active]), coupled)
        if key not in cache:
            cache[key] = _coulomb_window(frac, float(sigmas[m]), coupled, active, dx)
        out[m] = cache[key]
    return out


def _coulomb_window(frac, sigma, coupled, active, dx) -> np.ndarray:
    """L of one molecule whose centre is ``frac`` cells past a charge-lattice point."""
    d = int(active.sum())
    reach = (KERNEL_CUTOFF_SIGMAS * sigma if sigma > 0 else dx) / dx
    n = 16
    while n < 4 * (2 * reach + 2):
        n *= 2
    idx = np.stack(np.meshgrid(*[np.arange(n) - n // 2] * d, indexing="ij"), axis=-1)
    k = 2 * np.pi * np.fft.fftfreq(n, 1.0)
    kgrid = np.meshgrid(*[k] * d, indexing="ij")
    shift = np.eye(3)[:, active]
    g = np.zeros((3,) + (n,) * d, dtype=np.complex128)
    for j, a in enumerate(np.flatnonzero(active)):
        g[a] = (1 - np.exp(-1j * kgrid[j])) / dx
    hats = {}
    for a in coupled:
        pos = (idx + 0.5 * shift[a] - frac[active]) * dx
        w = kernel_samples(pos.reshape(-1, d), np.zeros(d), sigma, dx).reshape((n,) * d)
        hats[a] = np.fft.fftn(w / (w.sum() * dx**d))
    denom = np.sum(np.abs(g) ** 2, axis=0)
    denom[(0,) * d] = np.inf
    L = np.zeros((3, 3))
    for a in coupled:
        for b in coupled:
            term = np.conj(hats[a] * g[a]) * g[b] * hats[b] / denom
            L[a, b] = (term.sum() * dx**d / n**d).real
    return L


# Grouping molecules into boxes: a box costs a few Python calls per step (about the price
# of this many sites of C work), each site a few nanoseconds. Boxes stay below a size at
# which Meep's per-step copies of a chunk's index and amplitude vectors would leave the
# malloc heap for fresh mmap'd pages (a page fault every 4 KiB).
_BOX_COST_IN_SITES = 1000
_BOX_MAX_SITES = 4096


def group_into_boxes(lo: np.ndarray, hi: np.ndarray, active: np.ndarray, dx: float):
    """Group molecules (support boxes lo..hi) into boxes; yield (lo, hi, members)."""

    def sites(a, b):
        return float(np.prod(np.where(active, (b - a) / dx + 1, 1.0)))

    # start from tiles of about one box's worth of sites, then merge greedily
    side = dx * max(1.0, _BOX_COST_IN_SITES ** (1 / max(1, int(active.sum()))))
    tile = np.where(active, np.floor(lo / side), 0).astype(np.int64)
    _, label = np.unique(tile, axis=0, return_inverse=True)
    label = label.ravel()
    boxes = [
        [lo[g].min(axis=0), hi[g].max(axis=0), g]
        for g in (np.flatnonzero(label == k) for k in range(label.max() + 1))
    ]
    merged = True
    while merged and len(boxes) > 1:
        merged = False
        pairs = [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes))]
        for i, j in pairs:
            (alo, ahi, ag), (blo, bhi, bg) = boxes[i], boxes[j]
            clo, chi = np.minimum(alo, blo), np.maximum(ahi, bhi)
            both = sites(clo, chi)
            if (
                both <= _BOX_MAX_SITES
                and both < sites(alo, ahi) + sites(blo, bhi) + _BOX_COST_IN_SITES
            ):
                boxes[i] = [clo, chi, np.concatenate([ag, bg])]
                del boxes[j]
                merged = True
                break
    for box_lo, box_hi, members in boxes:
        yield box_lo, box_hi, np.sort(members)
