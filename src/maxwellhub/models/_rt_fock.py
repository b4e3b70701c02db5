"""Fock/Kohn-Sham builders of the ``rttddft`` model: F'[P'] in the Löwdin-orthonormal
basis for m molecules at once (arrays (m, s, N, N); s = 1 total density of a restricted
molecule, s = 2 alpha and beta), field-free, with the energy on request.

``NumpyFock`` precomputes once what every build shares (two-electron integrals in the
orthonormal basis as dense (N², N²) matrices for J and K, basis functions and their
gradients on PySCF's DFT grid) and per build does matrix products plus one libxc call on
the grid points of all molecules: HF, LDA, GGA and global hybrids. ``PySCFFock`` calls
PySCF's own J/K and numint: any functional (meta-GGA, range-separated hybrids) and any
size. Both agree with PySCF's ``get_fock`` to 1e-12 (tests/integration/test_rttddft.py).

Every product is done molecule by molecule (``_rows``), so a molecule gets the same bits
in an ensemble as alone. Never: an elementwise product of two complex arrays (numpy's SIMD
complex multiply can round differently with memory alignment), PySCF's incremental
``get_veff`` caches, printing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["NumpyFock", "PySCFFock", "complex_from", "rows"]

# molecules x grid points x basis functions per block of the grid work (bounds memory)
_GRID_BLOCK = 4_000_000
# pair products of basis functions on the grid up to this many bytes; beyond, phi P phi^T
_PAIR_BYTES = 48 * 2**20


def complex_from(re: np.ndarray, im: np.ndarray) -> np.ndarray:
    """re + i im by assignment (exact, no complex multiply)."""
    out = np.empty(re.shape, dtype=np.complex128)
    out.real = re
    out.imag = im
    return out


def rows(x: np.ndarray, a: np.ndarray) -> np.ndarray:
    """x @ a row by row, (m, K) @ (K, L) -> (m, L): one small product per row, so a row's
    result does not depend on how many rows there are (a single (m, K) @ (K, L) product
    picks its kernel, and so its summation order, by m). An ensemble molecule then gets the
    very bits it gets alone."""
    return np.matmul(x[:, None, :], a)[:, 0, :]


def _rsum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum over the last two axes of a * b (real arrays) -> leading axes."""
    return (a * b).reshape((*a.shape[:-2], -1)).sum(axis=-1)


class NumpyFock:
    """F'[P'] (field-free) for m molecules from dense orthonormal-basis integrals."""

    def __init__(
        self, mf: Any, x: np.ndarray, hcore: np.ndarray, restricted: bool, xc: str | None
    ) -> None:
        from pyscf import ao2mo

        mol = mf.mol
        n = x.shape[0]
        self.n = n
        self.restricted = restricted
        self.h = x @ hcore @ x
        eri = mf._eri if getattr(mf, "_eri", None) is not None else mol.intor("int2e", aosym="s8")
        eri_j = ao2mo.incore.full(eri, x, compact=False).reshape(n * n, n * n)
        self.alpha = 1.0 if xc is None else float(mf._numint.hybrid_coeff(xc, spin=mol.spin))
        self.exact_exchange = self.alpha != 0.0
        eri_k = (
            eri_j.reshape(n, n, n, n).transpose(0, 2, 1, 3).reshape(n * n, n * n)
            if self.alpha
            else None
        )
        if restricted:
            # G = J[P] - alpha/2 K[P] for the total density: one matrix for the real part
            self.g_real = eri_j - 0.5 * self.alpha * eri_k if eri_k is not None else eri_j
            self.g_imag = -0.5 * self.alpha * eri_k if eri_k is not None else None
        else:
            self.eri_j = eri_j
            self.k_neg = -self.alpha * eri_k if eri_k is not None else None
        self.grid = _GridXC(mf, x, xc, restricted) if xc is not None else None

    def __call__(self, p: np.ndarray, want_energy: bool) -> tuple[np.ndarray, Any]:
        m, s, n, _ = p.shape
        pr = np.ascontiguousarray(p.real)
        pi = np.ascontiguousarray(p.imag)
        flat_r = pr.reshape(m, s, n * n)
        flat_i = pi.reshape(m, s, n * n)
        if self.restricted:
            gr = rows(flat_r[:, 0], self.g_real).reshape(m, 1, n, n)
            gi = (
                rows(flat_i[:, 0], self.g_imag).reshape(m, 1, n, n)
                if self.g_imag is not None
                else None
            )
        else:
            jt = rows(flat_r[:, 0] + flat_r[:, 1], self.eri_j)
            gr = np.repeat(jt.reshape(m, 1, n, n), 2, axis=1)
            if self.k_neg is not None:
                gr = gr + rows(flat_r.reshape(m * 2, n * n), self.k_neg).reshape(m, 2, n, n)
                gi = rows(flat_i.reshape(m * 2, n * n), self.k_neg).reshape(m, 2, n, n)
            else:
                gi = None
        exc = None
        if self.grid is not None:
            vxc, exc = self.grid(pr)
            fr = self.h + gr + vxc
        else:
            fr = self.h + gr
        energy = None
        if want_energy:
            # E = sum_s Tr(P_s (h + G_s / 2)) (+ E_xc); Tr(P G) = sum(Pr Gr + Pi Gi)
            e = _rsum(pr, self.h + 0.5 * gr)
            if gi is not None:
                e = e + 0.5 * _rsum(pi, gi)
            energy = e.sum(axis=1) if exc is None else e.sum(axis=1) + exc
        f = complex_from(fr, gi) if gi is not None else complex_from(fr, np.zeros_like(fr))
        return f, energy


class _GridXC:
    """V_xc' and E_xc on PySCF's grid, for m molecules at once (LDA and GGA).

    Small problems precompute the products of basis-function pairs on the grid (and their
    gradients), so a build is two matrix products and one libxc call; larger ones keep the
    basis-function values only (memory ng N instead of 4 ng N²/2) and do phi P phi^T."""

    def __init__(self, mf: Any, x: np.ndarray, xc: str, restricted: bool) -> None:
        ni = mf._numint
        self.ni, self.xc, self.restricted = ni, xc, restricted
        self.xctype = ni._xc_type(xc)
        self.nk = 4 if self.xctype == "GGA" else 1
        ao = ni.eval_ao(mf.mol, mf.grids.coords, deriv=1 if self.nk == 4 else 0)
        ao = ao if self.nk == 4 else ao[None]
        phi = np.ascontiguousarray(ao @ x)  # (nk, ng, N), orthonormal basis
        self.w = np.asarray(mf.grids.weights)
        ng, n = phi.shape[1:]
        self.n = n
        r, c = np.triu_indices(n)
        self.pairs = (r, c)
        self.use_pairs = self.nk * ng * r.size * 8 <= _PAIR_BYTES
        if self.use_pairs:
            # rows [k * ng + g]: phi_r phi_c (k = 0) and its gradient d_k (phi_r phi_c)
            prod = np.empty((self.nk, ng, r.size))
            prod[0] = phi[0][:, r] * phi[0][:, c]
            for k in range(1, self.nk):
                prod[k] = phi[k][:, r] * phi[0][:, c] + phi[0][:, r] * phi[k][:, c]
            self.prod = prod.reshape(self.nk * ng, r.size)
            self.prod_t = np.ascontiguousarray(self.prod.T)
            # rho = sum_{r<=c} (2 - delta_rc) P_rc phi_r phi_c
            self.pair_weight = np.where(r == c, 1.0, 2.0)
            self.block = max(1, _GRID_BLOCK // (self.nk * ng))
        else:
            self.phi = phi
            self.phi0_t = np.ascontiguousarray(phi[0].T)
            self.block = max(1, _GRID_BLOCK // (ng * n))

    def __call__(self, pr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = pr.shape[0]
        if m <= self.block:
            return self._block(pr)
        v = np.empty_like(pr)
        exc = np.empty(m)
        for lo in range(0, m, self.block):
            hi = min(m, lo + self.block)
            v[lo:hi], exc[lo:hi] = self._block(pr[lo:hi])
        return v, exc

    def _densities(self, pr: np.ndarray) -> np.ndarray:
        """rho[s, k, m, g]: density (k = 0) and gradient of each spin block."""
        m, s = pr.shape[:2]
        ng = self.w.size
        if self.use_pairs:
            packed = pr[:, :, self.pairs[0], self.pairs[1]] * self.pair_weight
            rho = rows(packed.reshape(m * s, -1), self.prod_t)  # (m s, nk ng)
            return rho.reshape(m, s, self.nk, ng).transpose(1, 2, 0, 3)
        phi = self.phi
        rho = np.empty((s, self.nk, m, ng))
        for spin in range(s):
            t = phi[0] @ pr[:, spin]  # (m, ng, N) = phi P
            rho[spin, 0] = (t * phi[0]).sum(axis=-1)
            for k in range(1, self.nk):
                rho[spin, k] = 2.0 * (t * phi[k]).sum(axis=-1)
        return rho

    def _potential(self, wv: np.ndarray, m: int, s: int) -> np.ndarray:
        """V[m, s] from the weighted xc derivatives wv[s, k, m, g]."""
        n = self.n
        out = np.empty((m, s, n, n))
        if self.use_pairs:
            r, c = self.pairs
            packed = rows(
                np.ascontiguousarray(wv.transpose(2, 0, 1, 3)).reshape(m * s, -1), self.prod
            )  # (m s, npair)
            packed = packed.reshape(m, s, -1)
            out[:, :, r, c] = packed
            out[:, :, c, r] = packed
            return out
        phi = self.phi
        for spin in range(s):
            aow = phi[0] * (0.5 * wv[spin, 0])[..., None]  # (m, ng, N); halved: V + V^T
            for k in range(1, self.nk):
                aow = aow + phi[k] * wv[spin, k][..., None]
            vm = self.phi0_t @ aow
            out[:, spin] = vm + vm.swapaxes(-1, -2)
        return out

    def _block(self, pr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m, s = pr.shape[:2]
        ng = self.w.size
        rho = np.ascontiguousarray(self._densities(pr)).reshape(s, self.nk, m * ng)
        arg = rho[0] if self.restricted else rho
        if self.nk == 1:
            arg = arg[..., 0, :]
        exc, vxc = self.ni.eval_xc_eff(
            self.xc, arg, deriv=1, xctype=self.xctype, spin=0 if self.restricted else 1
        )[:2]
        rho_total = rho[0, 0] if self.restricted else rho[0, 0] + rho[1, 0]
        e = rows((rho_total * exc).reshape(m, ng), self.w[:, None])[:, 0]
        wv = np.asarray(vxc).reshape(s, self.nk, m, ng) * self.w
        return self._potential(wv, m, s), e


class PySCFFock:
    """F'[P'] (field-free) from PySCF's own J/K and numint, one molecule at a time. For
    meta-GGA, range-separated hybrids and molecules too large for dense integrals."""

    def __init__(
        self, mf: Any, x: np.ndarray, hcore: np.ndarray, restricted: bool, xc: str | None
    ) -> None:
        self.mf, self.x, self.hcore, self.restricted, self.xc = mf, x, hcore, restricted, xc
        self.h = x @ hcore @ x
        if xc is None:
            self.omega, self.alpha, self.hyb = 0.0, 0.0, 1.0
        else:
            self.omega, self.alpha, self.hyb = mf._numint.rsh_and_hybrid_coeff(xc, spin=mf.mol.spin)
        self.exact_exchange = bool(xc is None or self.hyb or self.omega)

    def _k(self, dm: np.ndarray, hermi: int) -> np.ndarray:
        mf = self.mf
        k = self.hyb * mf.get_k(mf.mol, dm, hermi=hermi) if self.hyb else 0.0
        if self.omega:
            k = k + (self.alpha - self.hyb) * mf.get_k(mf.mol, dm, hermi=hermi, omega=self.omega)
        return np.asarray(k) if not isinstance(k, float) else np.zeros_like(dm)

    def __call__(self, p: np.ndarray, want_energy: bool) -> tuple[np.ndarray, Any]:
        mf, x = self.mf, self.x
        m, s = p.shape[:2]
        f = np.empty(p.shape, dtype=np.complex128)
        energy = np.empty(m)
        exchange = self.exact_exchange
        for i in range(m):
            dr = x @ np.ascontiguousarray(p[i].real) @ x
            di = x @ np.ascontiguousarray(p[i].imag) @ x
            dt_ = dr[0] if self.restricted else dr[0] + dr[1]
            j = mf.get_j(mf.mol, dt_, hermi=1)
            exc = 0.0
            if self.xc is not None:
                ni = mf._numint
                if self.restricted:
                    _, exc, vxc = ni.nr_rks(mf.mol, mf.grids, self.xc, dr[0])
                    vxc = vxc[None]
                else:
                    _, exc, vxc = ni.nr_uks(mf.mol, mf.grids, self.xc, dr)
            else:
                vxc = np.zeros_like(dr)
            scale = 0.5 if self.restricted else 1.0
            gr = np.empty_like(dr)
            gi = np.zeros_like(di)
            for spin in range(s):
                gr[spin] = j
                if exchange:
                    gr[spin] -= scale * self._k(dr[spin], 1)
                    gi[spin] = -scale * self._k(di[spin], 2)
            fr = x @ (self.hcore + gr + vxc) @ x
            fi = x @ gi @ x
            f[i] = complex_from(fr, fi)
            if want_energy:
                energy[i] = float(
                    np.sum(dr * (self.hcore + 0.5 * gr)) + 0.5 * np.sum(di * gi) + exc
                )
        return f, (energy if want_energy else None)
