"""Physics core of the ``rttddft`` model: real-time TDHF/TDDFT of one molecule on PySCF.

Everything here is in atomic units (Hartree, bohr, a.u. of time and field). The public face
is :mod:`maxwellhub.models.rttddft`; this module holds the molecule set-up (XYZ
parsing, SCF) and the propagators, for ``n`` copies of one molecule at once (arrays with
a leading molecule axis); the Fock builders are in :mod:`._rt_fock`.

Representation. The density matrix is propagated in the Löwdin-orthonormal basis:
``X = S^-1/2``, ``P' = S^1/2 P S^1/2``, ``F' = X F X``; ``i dP'/dt = [F'(t), P']``. A
restricted molecule has one spin block holding the total density (occupations 2), an
unrestricted one two blocks (alpha, beta; occupations 1). Arrays are (m, s, N, N).

Fock builders (:mod:`._rt_fock`): ``NumpyFock`` (dense orthonormal-basis integrals and the
grid, numpy plus libxc; HF, LDA, GGA, global hybrids) where it applies and one (N², N²)
matrix fits in 256 MiB, else ``PySCFFock`` (PySCF's own J/K and numint).

Never: an incremental PySCF build (``get_veff``'s ``dm_last``/``vhf_last`` caches), a
general matrix exponential, an elementwise product of two complex arrays (numpy's SIMD
complex multiply can round differently with memory alignment, which would break bitwise
resumption), a change to an array it was given, printing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._rt_fock import NumpyFock, PySCFFock, complex_from, rows

__all__ = ["Geometry", "RTConfig", "RTCore", "parse_atoms", "read_xyz", "substeps"]

# dense two-electron integrals up to this many bytes per (N², N²) matrix; beyond, PySCF's J/K
_DENSE_ERI_BYTES = 256 * 2**20


# ---------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Atoms (symbol, (x, y, z) in Angstrom), and the charge and multiplicity that the
    source gave (None when it gave none). ``where`` names the source in errors."""

    atoms: tuple[tuple[str, tuple[float, float, float]], ...]
    charge: int | None
    multiplicity: int | None
    where: str


def _element(symbol: str, where: str) -> str:
    from pyscf.data import elements

    label = symbol.strip()
    bare = "".join(ch for ch in label if ch.isalpha())
    if not bare or bare.capitalize() not in elements.ELEMENTS_PROTON:
        raise ValueError(f"{where}: {symbol!r} is not a chemical element symbol")
    return bare.capitalize()


def _atom_line(text: str, where: str) -> tuple[str, tuple[float, float, float]]:
    parts = text.replace(",", " ").split()
    if len(parts) < 4:
        raise ValueError(f"{where}: expected 'Symbol x y z' (Angstrom), got {text.strip()!r}")
    symbol = _element(parts[0], where)
    try:
        xyz = tuple(float(v) for v in parts[1:4])
    except ValueError:
        raise ValueError(f"{where}: coordinates {' '.join(parts[1:4])!r} are not numbers") from None
    if not all(math.isfinite(v) for v in xyz):
        raise ValueError(f"{where}: coordinates {' '.join(parts[1:4])!r} are not finite")
    return symbol, (xyz[0], xyz[1], xyz[2])


def read_xyz(path: str) -> Geometry:
    """Read an XYZ file: line 1 the number of atoms, line 2 either ``charge multiplicity``
    (two integers, as MaxwellLink reads it) or a comment, then one ``Symbol x y z`` line per
    atom in Angstrom. Errors name the file and the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ValueError(f"XYZ file {path}: {exc.strerror or exc}") from None
    if not lines:
        raise ValueError(f"{path}, line 1: empty file; expected the number of atoms")
    try:
        natoms = int(lines[0].strip())
    except ValueError:
        raise ValueError(
            f"{path}, line 1: expected the number of atoms, got {lines[0].strip()!r}"
        ) from None
    if natoms < 1:
        raise ValueError(f"{path}, line 1: the number of atoms must be >= 1, got {natoms}")
    charge = multiplicity = None
    second = lines[1].split() if len(lines) > 1 else []
    if len(second) == 2:
        try:
            charge, multiplicity = int(second[0]), int(second[1])
        except ValueError:
            charge = multiplicity = None  # a comment line that happens to have two words
    body = lines[2 : 2 + natoms]
    if len(body) < natoms or any(not line.strip() for line in body):
        found = sum(1 for line in body if line.strip())
        raise ValueError(
            f"{path}: line 1 announces {natoms} atom(s) on lines 3-{natoms + 2}, but only "
            f"{found} atom line(s) follow"
        )
    atoms = tuple(_atom_line(line, f"{path}, line {k + 3}") for k, line in enumerate(body))
    return Geometry(atoms, charge, multiplicity, str(path))


def parse_atoms(text: str) -> Geometry:
    """Atoms from a string ``"O 0 0 0.117; H 0 0.757 -0.469; ..."`` (Angstrom), items
    separated by ``;`` or newlines. Errors name the item (1-based)."""
    items = [item for item in text.replace("\n", ";").split(";") if item.strip()]
    if not items:
        raise ValueError("atoms: empty; expected 'Symbol x y z; Symbol x y z; ...' (Angstrom)")
    atoms = tuple(_atom_line(item, f"atoms, item {k + 1}") for k, item in enumerate(items))
    return Geometry(atoms, None, None, "atoms")


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class RTConfig:
    """Everything shared by the n molecules of one model (see rttddft's parameters)."""

    geometry: Geometry
    charge: int
    multiplicity: int
    basis: str
    xc: str  # "hf" or a libxc functional PySCF knows
    grid_level: int
    propagator: str  # "pc" or "etrs"
    kick_direction: tuple[float, float, float]
    remove_permanent_dipole: bool
    maxwelllink_compat: bool
    conv_tol: float = 1e-12
    fock_builder: str = "auto"  # "auto", "numpy" or "pyscf"
    pc_max_iterations: int = 100

    @property
    def is_hf(self) -> bool:
        return self.xc.strip().lower() == "hf"


def substeps(dt_em: float, dt_substep: float) -> tuple[int, float]:
    """Sub-steps per EM step and their length: MaxwellLink's rule, ``int(D / dt)`` (at
    least 1) and ``dt = D / count``, except that a ratio within 1e-9 of an integer counts as
    that integer (``int(0.3 / 0.1)`` is 2 in floating point)."""
    ratio = dt_em / dt_substep
    count = max(1, math.floor(ratio * (1.0 + 1e-9)))
    return count, dt_em / count


def build_mol(config: RTConfig) -> Any:
    from pyscf import gto

    mol = gto.Mole()
    mol.atom = [(sym, xyz) for sym, xyz in config.geometry.atoms]
    mol.unit = "Angstrom"
    mol.basis = config.basis
    mol.charge = config.charge
    mol.spin = config.multiplicity - 1
    mol.verbose = 0
    mol.symmetry = False
    mol.build(parse_arg=False, dump_input=False)
    return mol


def run_scf(config: RTConfig, mol: Any) -> Any:
    """Ground state to a tight threshold: RHF/RKS for a singlet, UHF/UKS otherwise (as
    MaxwellLink picks RKS or UKS from the multiplicity)."""
    from pyscf import dft, scf

    restricted = config.multiplicity == 1
    if config.is_hf:
        mf = scf.RHF(mol) if restricted else scf.UHF(mol)
    else:
        mf = dft.RKS(mol, xc=config.xc) if restricted else dft.UKS(mol, xc=config.xc)
        mf.grids.level = config.grid_level
    mf.verbose = 0
    mf.conv_tol = config.conv_tol
    mf.conv_tol_grad = max(math.sqrt(config.conv_tol) * 1e-3, 1e-10)
    mf.max_cycle = 200
    mf.kernel()
    if not mf.converged:
        mf = mf.newton()  # second-order SCF from where DIIS stopped
        mf.verbose = 0
        mf.kernel(mf.mo_coeff, mf.mo_occ)
    if not mf.converged:
        raise RuntimeError(
            f"rttddft: the ground-state SCF of {config.geometry.where} ({config.xc}/"
            f"{config.basis}, charge {config.charge}, multiplicity {config.multiplicity}) did "
            f"not converge to conv_tol = {config.conv_tol:g}"
        )
    return mf


# ---------------------------------------------------------------- small linear algebra


def _herm(a: np.ndarray) -> np.ndarray:
    return a.conj().swapaxes(-1, -2)


def _unitary(vecs: np.ndarray, vals: np.ndarray, tau: float) -> np.ndarray:
    """exp(-i tau F) for Hermitian F = V diag(vals) V^H (batched). The diagonal phase is
    applied in real arithmetic (cos, sin, real products), the rest by a complex matrix
    product (BLAS), so the result does not depend on memory alignment."""
    theta = tau * vals
    c, s = np.cos(theta)[..., None, :], np.sin(theta)[..., None, :]
    vr, vi = vecs.real, vecs.imag
    # V diag(exp(-i theta)) = V diag(c - i s)
    return complex_from(vr * c + vi * s, vi * c - vr * s) @ _herm(vecs)


def _sandwich(u: np.ndarray, p: np.ndarray) -> np.ndarray:
    """U P U^H, made exactly Hermitian (round-off would otherwise accumulate an
    anti-Hermitian part, 1e-14 in 1000 sub-steps)."""
    q = u @ p @ _herm(u)
    return 0.5 * (q + _herm(q))


def _propagate(p: np.ndarray, vecs: np.ndarray, vals: np.ndarray, tau: float) -> np.ndarray:
    """exp(-i tau F) P exp(+i tau F) for Hermitian F = V diag(vals) V^H (batched)."""
    return _sandwich(_unitary(vecs, vals, tau), p)


def _eig(f: np.ndarray, real: bool) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of Hermitian matrices. ``real``: F is real symmetric (no exact exchange:
    pure DFT), so the real eigensolver (twice as fast) serves; the choice is the model's,
    not the data's, so a molecule takes the same path in an ensemble as alone."""
    if real:
        vals, vecs = np.linalg.eigh(np.ascontiguousarray(f.real))
        return vals, vecs.astype(np.complex128)
    return np.linalg.eigh(f)


# ---------------------------------------------------------------- the core


def _builder_kind(config: RTConfig, mf: Any, nao: int) -> str:
    if config.fock_builder != "auto":
        return config.fock_builder
    if not config.is_hf:
        ni = mf._numint
        if ni._xc_type(config.xc) not in ("LDA", "GGA") or ni.rsh_coeff(config.xc)[0]:
            return "pyscf"
    return "numpy" if nao**4 * 8 <= _DENSE_ERI_BYTES else "pyscf"


class RTCore:
    """One molecule's ground state and its propagation, for n copies at a time.

    The state (all arrays with leading dimension n): ``P`` the density matrix in the
    orthonormal basis (complex, (n, s, N, N)); ``fock`` the Fock matrix of ``P`` (field-free,
    or, with ``maxwelllink_compat``, with the field of the sub-step that built it); for the
    predictor-corrector also ``fock_half``, the midpoint Fock matrix of the last sub-step;
    ``step`` the EM steps taken (int64); ``energy`` and ``dipole`` of ``P`` (reported).
    """

    def __init__(self, config: RTConfig) -> None:
        self.config = config
        self.mol = mol = build_mol(config)
        self.mf = mf = run_scf(config, mol)
        self.restricted = config.multiplicity == 1
        self.nspin = 1 if self.restricted else 2
        s = mol.intor_symmetric("int1e_ovlp")
        w, v = np.linalg.eigh(s)
        if w.min() < 1e-9:
            raise ValueError(
                f"rttddft: basis {config.basis!r} is nearly linearly dependent for "
                f"{config.geometry.where} (smallest overlap eigenvalue {w.min():.2e})"
            )
        self.x = (v * w**-0.5) @ v.T
        self.s_half = (v * w**0.5) @ v.T
        self.nao = n = s.shape[0]
        hcore = np.asarray(mf.get_hcore())
        xc = None if config.is_hf else config.xc
        kind = _builder_kind(config, mf, n)
        self.builder_kind = kind
        builder = NumpyFock if kind == "numpy" else PySCFFock
        self.build = builder(mf, self.x, hcore, self.restricted, xc)
        # without exact exchange F' is real: J and V_xc see only Re P
        self.real_fock = not self.build.exact_exchange
        charges = mol.atom_charges().astype(np.float64)
        self.nuclear_dipole = charges @ mol.atom_coords()  # origin: the coordinates' origin
        self.e_nuc = float(mol.energy_nuc())
        self.e_scf = float(mf.e_tot)
        r = mol.intor_symmetric("int1e_r")  # +r, origin (0, 0, 0)
        # the electronic dipole operator d (mu_e = Tr(P d)); physics: d = -r (charge -1).
        # MaxwellLink 0.5.0 takes psi4's dipole integrals (which already carry the charge,
        # -r) and negates them once more, so its d is +r.
        d_ao = r if config.maxwelllink_compat else -r
        dm_ao = np.asarray(mf.make_rdm1())
        dm_tot = dm_ao if self.restricted else dm_ao[0] + dm_ao[1]
        self.mu_e0 = np.einsum("xij,ji->x", d_ao, dm_tot)  # ground-state electronic dipole
        self.dipole_shift = np.zeros(3)
        if config.remove_permanent_dipole:
            if config.maxwelllink_compat:
                # MaxwellLink subtracts mu_e0 / Tr(D) times the identity *in the AO basis*
                # (S^-1 in the orthonormal one): a real one-electron perturbation
                d_ao = d_ao - (self.mu_e0 / np.trace(dm_tot))[:, None, None] * np.eye(n)
            else:
                # a multiple of the identity operator (S in the AO basis) commutes with P':
                # it cannot change the dynamics, only the reported dipole
                self.dipole_shift = self.mu_e0.copy()
        self.d = np.ascontiguousarray(self.x @ d_ao @ self.x)  # (3, N, N) orthonormal
        self.d_flat = self.d.reshape(3, n * n).T.copy()  # (N², 3)
        p0 = self.s_half @ (dm_ao[None] if self.restricted else dm_ao) @ self.s_half
        self.p0 = complex_from(p0, np.zeros_like(p0))  # (s, N, N)
        self.n_electrons = float(mol.nelectron)
        kick = np.asarray(config.kick_direction, dtype=np.float64)
        self.kick_op = np.tensordot(kick, self.d, axes=1)  # k . d (orthonormal)

    # ------------------------------------------------------------ observables

    def dipoles(self, p: np.ndarray) -> np.ndarray:
        """Reported dipoles (m, 3) of densities (m, s, N, N)."""
        m, s, n, _ = p.shape
        pr = np.ascontiguousarray(p.real).reshape(m, s, n * n).sum(axis=1)
        return self.nuclear_dipole + rows(pr, self.d_flat) - self.dipole_shift

    def _field_operator(self, fields: np.ndarray) -> np.ndarray:
        """H' = -E . d (m, N, N), real."""
        return -rows(fields, self.d.reshape(3, -1)).reshape(-1, self.nao, self.nao)

    # ------------------------------------------------------------ state

    def initial_state(self, n: int, kick_au: np.ndarray) -> dict[str, np.ndarray]:
        """The ground state of n copies, each kicked impulsively by ``kick_au`` (n,) along
        ``kick_direction``: P' -> exp(+i kappa k.d') P' exp(-i kappa k.d'), which with
        d = -r is exp(-i kappa k.r') P' exp(+i kappa k.r')."""
        p = np.broadcast_to(self.p0, (n, *self.p0.shape)).copy()
        kicked = np.flatnonzero(kick_au != 0.0)
        if kicked.size:
            vals, vecs = _eig(self.kick_op, True)
            for i in kicked.tolist():
                # exp(+i kappa K) = exp(-i tau K) with tau = -kappa
                p[i] = _propagate(p[i][None], vecs[None], vals[None], -float(kick_au[i]))[0]
        fock, energy = self.build(p, True)
        state = {"P": p, "fock": fock}
        if self.config.propagator == "pc":
            state["fock_half"] = fock.copy()
        state["step"] = np.zeros(n, dtype=np.int64)
        state["energy"] = energy + self.e_nuc
        state["dipole"] = self.dipoles(p)
        return state

    def kicked(self, state: dict[str, np.ndarray], impulses: np.ndarray) -> dict[str, np.ndarray]:
        """``state`` after impulsive kicks ``impulses`` (n, 3) now (a new dict; rows of
        zeros untouched): P' -> exp(+i k.d') P' exp(-i k.d') as in :meth:`initial_state`,
        then the Fock matrix, energy and dipole of the kicked density (the propagator's
        Fock history restarts there, as at t = 0)."""
        new = {key: value.copy() for key, value in state.items()}
        for i in np.flatnonzero(np.any(impulses != 0.0, axis=1)).tolist():
            op = np.tensordot(np.asarray(impulses[i], dtype=np.float64), self.d, axes=1)
            vals, vecs = _eig(op, True)
            new["P"][i] = _propagate(state["P"][i][None], vecs[None], vals[None], -1.0)[0]
        fock, energy = self.build(new["P"], True)
        kicked = np.any(impulses != 0.0, axis=1)
        new["fock"] = np.where(kicked[:, None, None, None], fock, state["fock"])
        if "fock_half" in new:
            new["fock_half"] = np.where(kicked[:, None, None, None], fock, state["fock_half"])
        new["energy"] = np.where(kicked, energy + self.e_nuc, state["energy"])
        new["dipole"] = np.where(kicked[:, None], self.dipoles(new["P"]), state["dipole"])
        return new

    # ------------------------------------------------------------ one EM step

    def stage(
        self,
        state: dict[str, np.ndarray],
        fields: np.ndarray,
        dt_em: float,
        kick_field_au: np.ndarray,
        steps: tuple[int, float],
        pc_tolerance: float,
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """One EM step of length ``dt_em`` under ``fields`` (n, 3), held constant, in
        ``steps`` = (count, dt) sub-steps; pure."""
        config = self.config
        count, dt = steps
        first = state["step"] == 0
        total = fields
        if np.any(kick_field_au != 0.0) and first.any():
            # MaxwellLink's kick: a field kappa along kick_direction during the first EM step
            kick = np.asarray(config.kick_direction, dtype=np.float64)
            total = fields + np.where(first, kick_field_au, 0.0)[:, None] * kick
        v = self._field_operator(total)[:, None]  # (n, 1, N, N), both spins
        p, fock = state["P"], state["fock"]
        half = state.get("fock_half")
        compat = config.maxwelllink_compat
        if compat and first.any():
            # MaxwellLink adds the first step's field to the stored (field-free) SCF Fock
            # matrix, and its predictor-corrector starts from that as the past midpoint
            sel = first[:, None, None, None]
            fock = np.where(sel, fock + v, fock)
            if half is not None:
                half = np.where(sel, fock, half)
        energy = state["energy"]
        for _ in range(count):
            if half is None:
                p, fock, energy = self._etrs(p, fock, v, dt, compat)
            else:
                p, fock, half, energy = self._pc(p, fock, half, v, dt, compat, pc_tolerance)
        new = {"P": p, "fock": fock}
        if half is not None:
            new["fock_half"] = half
        new["step"] = state["step"] + 1
        new["energy"] = energy
        new["dipole"] = self.dipoles(p)
        if compat:
            sources = self._instantaneous_current(p, fock)
        else:
            sources = (new["dipole"] - state["dipole"]) / dt_em
        return new, sources

    def _etrs(
        self, p: np.ndarray, fock: np.ndarray, v: np.ndarray, dt: float, compat: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Enforced time-reversal symmetry: P(t+dt) = U P U^H with
        U = exp(-i dt/2 F(t+dt)) exp(-i dt/2 F(t)), F(t+dt) from the predictor
        exp(-i dt F(t)) P exp(+i dt F(t)). Second order; two Fock builds per sub-step."""
        start = fock if compat else fock + v
        vals, vecs = _eig(start, self.real_fock)
        trial = _propagate(p, vecs, vals, dt)
        f_end = self.build(trial, False)[0] + v
        vals1, vecs1 = _eig(f_end, self.real_fock)
        u = _unitary(vecs1, vals1, 0.5 * dt) @ _unitary(vecs, vals, 0.5 * dt)
        p_new = _sandwich(u, p)
        f_new, energy = self.build(p_new, True)
        return p_new, (f_new + v if compat else f_new), energy + self.e_nuc

    def _pc(
        self,
        p: np.ndarray,
        fock: np.ndarray,
        half: np.ndarray,
        v: np.ndarray,
        dt: float,
        compat: bool,
        tolerance: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Predictor-corrector exponential midpoint: P(t+dt) = U P U^H with
        U = exp(-i dt F(t+dt/2)), F(t+dt/2) = (F(t) + F(t+dt)) / 2 iterated to
        self-consistency (successive F(t+dt) within ``pc_tolerance``, Frobenius norm, at
        least two builds), starting from the extrapolation 2 F(t) - F(t-dt/2).
        Second order, and time-reversible once converged."""
        config = self.config
        start = fock if compat else fock + v
        past = half if compat else half + v
        mid = 2.0 * start - past
        m = p.shape[0]
        p_out = np.empty_like(p)
        f_out = np.empty_like(fock)
        mid_out = np.empty_like(fock)
        e_out = np.empty(m)
        # molecules still iterating (each stops at its own convergence, so a molecule
        # follows the same iterations in an ensemble as alone)
        active = np.arange(m)
        previous: np.ndarray | None = None
        for _ in range(config.pc_max_iterations):
            vals, vecs = _eig(mid, self.real_fock)
            p1 = _propagate(p[active], vecs, vals, dt)
            f1_free, energy = self.build(p1, True)
            f1 = f1_free + v[active]
            mid = 0.5 * (start + f1)
            if previous is None:
                previous = f1
                continue
            diff = (f1 - previous).reshape(len(active), self.nspin, -1)
            norm = np.sqrt((diff.real**2 + diff.imag**2).sum(axis=-1)).max(axis=-1)
            done = norm < tolerance
            idx = active[done]
            p_out[idx] = p1[done]
            if compat:
                f_out[idx] = f1[done]
                mid_out[idx] = mid[done]
            else:
                f_out[idx] = f1_free[done]
                mid_out[idx] = 0.5 * (fock[idx] + f1_free[done])
            e_out[idx] = energy[done]
            keep = ~done
            if not keep.any():
                return p_out, f_out, mid_out, e_out + self.e_nuc
            active, previous, mid, start = active[keep], f1[keep], mid[keep], start[keep]
        raise FloatingPointError(
            f"rttddft: the predictor-corrector did not converge to pc_tolerance = "
            f"{tolerance:g} in {config.pc_max_iterations} iterations; is the field "
            "or dt_substep_au too large?"
        )

    def _instantaneous_current(self, p: np.ndarray, fock: np.ndarray) -> np.ndarray:
        """MaxwellLink's source: Tr(dP'/dt d') with dP'/dt = -i [F', P'] of the new state."""
        c = fock @ p - p @ fock
        m, s, n, _ = c.shape
        ci = np.ascontiguousarray(c.imag).reshape(m, s, n * n).sum(axis=1)
        # Tr(-i C d) = sum Im(C) d (d real symmetric)
        return rows(ci, self.d_flat)
