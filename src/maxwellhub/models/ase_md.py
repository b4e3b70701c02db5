"""``ase``: classical molecular dynamics of one molecule (or n copies) with an ASE calculator.

    model = create_model("ase", n=1, calculator="morse", charges="0.3 -0.3")
    model.initialize(dt_au=0.5)
    sources = model.step(fields)       # fields (n, 3) a.u. -> dmu/dt (n, 3) a.u.

Units. The model works in atomic units (bohr, a.u. of time, electron masses, Hartree,
Hartree/bohr, e). ASE's eV, Å and amu are converted at the calculator call and nowhere
else, with ASE's own constants (CODATA 2014): positions Å = bohr * ``units.Bohr``
(0.529177 Å/bohr); energies Hartree = eV / ``units.Hartree`` (27.2114 eV/Ha); forces
Ha/bohr = eV/Å * ``units.Bohr / units.Hartree``; masses m_e = amu * ``units._amu /
units._me`` (1822.888); k_B = ``units.kB / units.Hartree`` Ha/K; 1 fs = 41.3414 a.u.
The geometry file (any format ASE reads, usually XYZ) is in Å.

Calculators (``calculator``): ``"morse"`` ASE's MorsePotential (``morse_epsilon`` eV,
``morse_rho0``, ``morse_r0`` Å: V = eps (exp(-2 rho0 (r/r0 - 1)) - 2 exp(-rho0 (r/r0 - 1))),
force constant 2 eps (rho0/r0)**2, omega = (rho0/r0) sqrt(2 eps / mu_reduced));
``"water"`` the flexible SPC/Fw water of :mod:`._water` (harmonic bonds and angle, fixed
charges); ``"pyscf"`` Born-Oppenheimer forces from a PySCF SCF (``basis``, ``xc``: "hf"
or a functional) at every force evaluation; ``"package.module:callable"`` any callable
that takes no arguments and returns an ASE calculator. Without ``geometry`` the built-ins
start from their own molecule: morse a CO-like diatomic (C, O along z at r0), water the
force field's minimum (O, H, H), pyscf H2 at 0.74 Å.

Integrator. Each EM step ``dt`` (``initialize``) is ``n_substeps`` sub-steps ``h`` of
velocity Verlet, wrapped in half-steps of a Langevin thermostat (OBABO) when ``tau_fs > 0``:
O: v = c v + sqrt((1 - c**2) k_B T / m) xi, c = exp(-h / (2 tau)); B: v += F h / (2 m);
A: r += v h; forces; B; O. With ``tau_fs = 0`` there is no O step and no random draw: plain
velocity Verlet. The forces are F = F_calculator(r) + q_i E with the field E of the step held
constant over all its sub-steps; the state keeps the forces of its positions (with the
previous step's field), which start the next step (as ``sho``).

Source timing (``sho``'s and MaxwellLink's): the source of a step is dmu/dt half a sub-step
after its end, sum_i q_i (v_i + F_i h / (2 m_i)); extras ``mux_au``... are the dipole there
(positions + h/2 times that velocity) and ``mux_m_au``... the dipole at the step's end.

Charges and dipole. mu = sum_i q_i r_i with the positions the model integrates (never
wrapped into a cell: a periodic calculator wraps its own copy), the gauge origin at the
coordinates' origin. ``charges`` ("q1 q2 ...", one per atom, in e) or, when unset, the
calculator's ``get_charges()`` at the initial geometry, fixed from then on. A charge needs
a mass: a dummy site ``X`` (atomic number 0, to which ASE gives a nominal mass of 1) or an
atom of zero mass is refused, and so is ASE's TIP4P
calculator, whose M site carries charge but is not an atom (the sum over atoms would
miss it); a massless virtual site is not supported. The dipole is always sum q_i r_i: a
calculator's own dipole (PySCF's electronic one, say) is not used, and charges are not
recomputed along the trajectory (for ``pyscf`` the field acts on the initial Mulliken
charges, not on the electrons). A molecule with a net charge has an origin-dependent
dipole, and a static field accelerates it as a whole.

Thermostat: ``temperature_K`` (target, mutable), ``tau_fs`` (relaxation time, mutable;
0 = off), ``seed`` (the generator, checkpointed in the state). Initial velocities: Maxwell-
Boltzmann at ``initial_temperature_K`` (negative: at ``temperature_K``, MaxwellLink's
meaning of its ``temperature_K``) from a generator seeded by ``seed`` alone, with the
centre-of-mass velocity removed; 0 K gives zero velocities.

State: ``positions``, ``velocities``, ``forces`` (n, natoms, 3) and ``potential`` (n,), the
calculator's field-free energy. n molecules are n independent copies (one force call each).

What it must never do: keep a calculator between calls or change any attribute in a step
(a fresh calculator and a fresh Atoms are made for every force evaluation, so no cache of
one step can leak into another: a user callable may return one calculator it keeps, as
ASE recomputes when the positions change); wrap positions; draw random numbers anywhere
but from ``self._rng`` inside a step; convert units anywhere but at the calculator call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.io import read as ase_read

from .base import Model, Parameter, ParameterError

__all__ = ["ASEModel", "PySCFCalculator"]

BOHR_PER_ANG = 1.0 / units.Bohr
HARTREE_PER_EV = 1.0 / units.Hartree
FORCE_AU_PER_EV_ANG = units.Bohr / units.Hartree
ME_PER_AMU = units._amu / units._me
KB_AU = units.kB / units.Hartree
AU_PER_FS = 1e-15 / units._aut

_BUILTINS = ("morse", "water", "pyscf")
_AXES = ("mux_au", "muy_au", "muz_au")
_AXES_M = ("mux_m_au", "muy_m_au", "muz_m_au")


class PySCFCalculator(Calculator):
    """Energy, forces, Mulliken charges and dipole of a PySCF SCF (RHF/RKS, closed shell),
    computed from scratch at each geometry (no guess carried over: results depend on the
    positions alone)."""

    implemented_properties = ["energy", "forces", "charges", "dipole"]  # noqa: RUF012
    default_parameters: dict[str, Any] = {"basis": "sto-3g", "xc": "hf"}  # noqa: RUF012

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        from pyscf import dft, gto, scf

        super().calculate(atoms, properties, system_changes)
        assert self.atoms is not None
        symbols = self.atoms.get_chemical_symbols()
        atom = [(s, tuple(p)) for s, p in zip(symbols, self.atoms.positions, strict=True)]
        mol = gto.M(atom=atom, unit="Angstrom", basis=self.parameters["basis"], verbose=0)
        xc = str(self.parameters["xc"])
        mf = scf.RHF(mol) if xc.lower() == "hf" else dft.RKS(mol, xc=xc)
        mf.conv_tol = 1e-12
        mf.conv_tol_grad = 1e-8
        energy = mf.kernel()
        if not mf.converged:
            raise RuntimeError("PySCFCalculator: the SCF did not converge")
        gradient = mf.nuc_grad_method().kernel()
        _, charges = mf.mulliken_pop(verbose=0)
        dipole = mf.dip_moment(unit="AU", verbose=0) * units.Bohr  # e Å
        self.results = {
            "energy": float(energy) * units.Hartree,
            "forces": -np.asarray(gradient) * units.Hartree / units.Bohr,
            "charges": np.asarray(charges, dtype=float),
            "dipole": np.asarray(dipole, dtype=float),
        }


def _text_list(value: Any) -> str:
    if isinstance(value, list | tuple | np.ndarray):
        return " ".join(repr(float(x)) for x in np.ravel(np.asarray(value, dtype=float)))
    return value


class ASEModel(Model):
    """Molecular dynamics with an ASE calculator under the local field (module docstring)."""

    name = "ase"
    parameters: ClassVar[Mapping[str, Parameter]] = {
        "geometry": Parameter(
            None,
            "structure file (XYZ, Å); unset: the calculator's own molecule",
            kind="path",
            shared=True,
        ),
        "calculator": Parameter(
            "morse",
            "morse, water, pyscf or package.module:callable",
            kind=str,
            shared=True,
            valid=lambda a: np.array([s.lower() in _BUILTINS or ":" in s for s in a]),
            allowed="morse, water, pyscf or 'package.module:callable'",
        ),
        "charges": Parameter(
            None,
            "charges per atom (e), 'q1 q2 ...'; unset: the calculator's",
            kind=str,
            shared=True,
        ),
        "morse_epsilon": Parameter(
            11.23,
            "Morse well depth (eV)",
            shared=True,
            valid=lambda a: a > 0,
            allowed="a number > 0",
        ),
        "morse_rho0": Parameter(
            2.6,
            "Morse rho0 = a r0 (dimensionless)",
            shared=True,
            valid=lambda a: a > 0,
            allowed="a number > 0",
        ),
        "morse_r0": Parameter(
            1.128,
            "Morse bond length (Å)",
            shared=True,
            valid=lambda a: a > 0,
            allowed="a number > 0",
        ),
        "basis": Parameter("sto-3g", "PySCF basis", kind=str, shared=True),
        "xc": Parameter("hf", "PySCF method: hf or a functional", kind=str, shared=True),
        "temperature_K": Parameter(
            0.0,
            "thermostat target (K)",
            mutable=True,
            valid=lambda a: a >= 0,
            allowed="a number >= 0",
        ),
        "tau_fs": Parameter(
            0.0,
            "Langevin relaxation time (fs); 0: no thermostat",
            mutable=True,
            valid=lambda a: a >= 0,
            allowed="a number >= 0",
        ),
        "initial_temperature_K": Parameter(
            -1.0,
            "Maxwell-Boltzmann temperature of the initial velocities (K); negative: temperature_K",
        ),
        "seed": Parameter(
            0, "seed of the thermostat and of the initial velocities", kind=int, shared=True
        ),
        "n_substeps": Parameter(
            1,
            "MD sub-steps per EM step",
            kind=int,
            shared=True,
            valid=lambda a: a >= 1,
            allowed="an integer >= 1",
        ),
    }
    aliases: ClassVar[Mapping[str, tuple[str, Callable[[Any], Any] | None]]] = {
        "atoms": ("geometry", None),  # MaxwellLink's name
    }
    extras_keys = (
        "energy_au",
        "energy_kin_au",
        "temperature_K",
        *_AXES,
        *_AXES_M,
    )
    example_params: ClassVar[dict[str, Any]] = {
        "calculator": "morse",
        "charges": "0.3 -0.3",
        "initial_temperature_K": 0.0,
    }

    def __init__(self, n: int = 1, **params: Any) -> None:
        super().__init__(n, **params)
        self._rng = np.random.default_rng(self.params["seed"])

    @classmethod
    def _checked_params(cls, n, base_dir, params):  # type: ignore[override]
        # charges may come as a list of numbers (Python callers): the stored form is text
        if "charges" in params:
            params = {**params, "charges": _text_list(params["charges"])}
        return super()._checked_params(n, base_dir, params)

    # ------------------------------------------------------------ set-up

    @classmethod
    def _validate(cls, params: dict[str, Any], n: int) -> None:
        atoms = _geometry(params)
        virtual = (atoms.get_masses() <= 0) | (atoms.get_atomic_numbers() == 0)
        if virtual.any():
            i = int(np.flatnonzero(virtual)[0])
            raise ParameterError(
                f"ase: atom {i} ({atoms.get_chemical_symbols()[i]}) of geometry is a dummy or "
                "massless site, which has no mass of its own; massless (virtual) sites are not "
                "supported: velocity Verlet cannot move them and a charge on them would be "
                "lost from the dipole",
                "geometry",
            )
        if params["charges"] is not None:
            _parse_charges(params["charges"], len(atoms))

    def _configure(self) -> None:
        p = self.params
        template = _geometry(p)
        self._template = template
        self._natoms = len(template)
        self._pos0 = template.get_positions() * BOHR_PER_ANG
        self._mass = template.get_masses() * ME_PER_AMU  # (natoms,)
        self._factory = _factory(p)
        if p["calculator"] not in _BUILTINS:
            _refuse_virtual_sites(self._factory())
        if p["charges"] is not None:
            self._q = _parse_charges(p["charges"], self._natoms)
        else:
            self._q = _calculator_charges(self._factory, template)
        self._h = 0.0  # before initialize(): extras report the state itself

    def _prepare(self, dt_au: float) -> None:
        h = dt_au / self.params["n_substeps"]
        self._h = h
        tau = self.params["tau_fs"] * AU_PER_FS
        on = tau > 0
        c = np.where(on, np.exp(-0.5 * h / np.where(on, tau, 1.0)), 1.0)  # (n,)
        kt = KB_AU * self.params["temperature_K"]
        self._thermostat = bool(on.any())
        self._c1 = c[:, None, None]
        self._c2 = np.sqrt(
            (1.0 - c * c)[:, None, None] * kt[:, None, None] / self._mass[None, :, None]
        )

    def _initial_state(self):
        n, m = self.n, self._mass
        energy, forces = self._calculate(self._pos0)
        t0 = np.where(
            self.params["initial_temperature_K"] < 0,
            self.params["temperature_K"],
            self.params["initial_temperature_K"],
        )
        rng = np.random.default_rng((self.params["seed"], 1))  # not the thermostat's
        velocities = rng.standard_normal((n, self._natoms, 3))
        velocities *= np.sqrt(KB_AU * t0[:, None, None] / m[None, :, None])
        velocities -= (m[None, :, None] * velocities).sum(axis=1, keepdims=True) / m.sum()
        velocities[t0 == 0] = 0.0
        return {
            "positions": np.tile(self._pos0, (n, 1, 1)),
            "velocities": velocities,
            "forces": np.tile(forces, (n, 1, 1)),
            "potential": np.full(n, energy),
        }

    # ------------------------------------------------------------ the step

    def _calculate(self, positions: np.ndarray) -> tuple[float, np.ndarray]:
        """(field-free energy Ha, forces Ha/bohr (natoms, 3)) at ``positions`` (bohr), from a
        fresh Atoms and a fresh calculator: nothing is cached between calls."""
        atoms = self._template.copy()
        atoms.positions = positions / BOHR_PER_ANG
        atoms.calc = self._factory()
        energy = float(atoms.get_potential_energy()) * HARTREE_PER_EV
        forces = np.asarray(atoms.get_forces(), dtype=np.float64) * FORCE_AU_PER_EV_ANG
        return energy, forces

    def _stage_impl(self, state, fields):
        h, m = self._h, self._mass[None, :, None]
        pos, vel = state["positions"].copy(), state["velocities"].copy()
        forces, potential = state["forces"].copy(), state["potential"].copy()
        field_force = self._q[None, :, None] * fields[:, None, :]
        for _ in range(self.params["n_substeps"]):
            if self._thermostat:
                vel = self._c1 * vel + self._c2 * self._rng.standard_normal(vel.shape)
            vel += forces * (0.5 * h) / m
            pos += vel * h
            for i in range(self.n):
                potential[i], forces[i] = self._calculate(pos[i])
            forces += field_force
            vel += forces * (0.5 * h) / m
            if self._thermostat:
                vel = self._c1 * vel + self._c2 * self._rng.standard_normal(vel.shape)
        new = {"positions": pos, "velocities": vel, "forces": forces, "potential": potential}
        return new, self._atom_sum(vel + forces * (0.5 * h) / m)

    def _atom_sum(self, vectors: np.ndarray) -> np.ndarray:
        """sum_i q_i x_i over the atoms of (n, natoms, 3), atom by atom in a fixed order
        (the same bits for one molecule and for n)."""
        total = np.zeros((self.n, 3))
        for i, q in enumerate(self._q):
            total += q * vectors[:, i, :]
        return total

    def _extras_impl(self, state):
        m = self._mass[None, :, None]
        vel = state["velocities"]
        v_half = vel + state["forces"] * (0.5 * self._h) / m
        mu_half = self._atom_sum(state["positions"] + (0.5 * self._h) * v_half)
        mu = self._atom_sum(state["positions"])
        kinetic = 0.5 * (m * vel * vel).sum(axis=(1, 2))
        out = {key: mu_half[:, k].copy() for k, key in enumerate(_AXES)}
        out.update({key: mu[:, k].copy() for k, key in enumerate(_AXES_M)})
        out["energy_kin_au"] = kinetic
        out["energy_au"] = state["potential"] + kinetic
        out["temperature_K"] = 2.0 * kinetic / (3 * self._natoms * KB_AU)
        return out


# ---------------------------------------------------------------- helpers


def _default_geometry(calculator: str, params: Mapping[str, Any]) -> Atoms:
    if calculator == "morse":
        return Atoms("CO", positions=[[0, 0, 0], [0, 0, params["morse_r0"]]])
    if calculator == "water":
        from ._water import water_geometry

        return Atoms("OH2", positions=water_geometry())
    if calculator == "pyscf":
        return Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    raise ParameterError(
        f"ase: calculator = {calculator!r} has no molecule of its own; give geometry",
        "geometry",
    )


def _geometry(params: Mapping[str, Any]) -> Atoms:
    path = params["geometry"]
    if path is None:
        return _default_geometry(params["calculator"].lower(), params)
    try:
        atoms = ase_read(path)
    except Exception as exc:
        raise ParameterError(
            f"ase: geometry = {path!r} cannot be read by ASE: {exc}", "geometry"
        ) from None
    if not isinstance(atoms, Atoms) or len(atoms) == 0:
        raise ParameterError(f"ase: geometry = {path!r} holds no atoms", "geometry")
    atoms.calc = None
    atoms.constraints = []
    return atoms


def _parse_charges(text: str, natoms: int) -> np.ndarray:
    items = text.replace("[", " ").replace("]", " ").replace(",", " ").split()
    try:
        q = np.array([float(x) for x in items], dtype=np.float64)
    except ValueError:
        raise ParameterError(
            f"ase: parameter charges = {text!r} is not numbers; expected one charge per atom "
            "(e), like '0.4 -0.4'",
            "charges",
        ) from None
    if q.shape != (natoms,) or not np.isfinite(q).all():
        raise ParameterError(
            f"ase: parameter charges = {text!r} has {len(q)} entries; expected {natoms} finite "
            "numbers, one per atom of the geometry",
            "charges",
        )
    return q


def _factory(params: Mapping[str, Any]) -> Callable[[], Calculator]:
    """A function making a fresh calculator per call."""
    name = params["calculator"]
    if name == "morse":
        from ase.calculators.morse import MorsePotential

        kw = {
            "epsilon": params["morse_epsilon"],
            "rho0": params["morse_rho0"],
            "r0": params["morse_r0"],
        }
        return lambda: MorsePotential(**kw)
    if name == "water":
        from ._water import FlexibleWater

        return FlexibleWater
    if name == "pyscf":
        basis, xc = params["basis"], params["xc"]
        return lambda: PySCFCalculator(basis=basis, xc=xc)
    module_name, _, attr = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ParameterError(
            f"ase: calculator = {name!r} cannot be loaded: {exc}", "calculator"
        ) from None
    if not callable(obj):
        raise ParameterError(f"ase: calculator = {name!r} is not callable", "calculator")
    return obj


def _refuse_virtual_sites(calc: Any) -> None:
    try:
        from ase.calculators.tip4p import TIP4P
    except ImportError:  # pragma: no cover
        return
    if isinstance(calc, TIP4P):
        raise ParameterError(
            "ase: ASE's TIP4P puts the oxygen's charge on the massless M site, which is not "
            "an atom: the dipole sum over atoms and the field's force on it would be wrong. "
            "Use a model with charges on atoms (calculator='water', flexible SPC/Fw)",
            "calculator",
        )


def _calculator_charges(factory: Callable[[], Calculator], template: Atoms) -> np.ndarray:
    atoms = template.copy()
    calc = factory()
    if "charges" not in getattr(calc, "implemented_properties", ()):
        raise ParameterError(
            f"ase: the calculator {type(calc).__name__} gives no charges; give the parameter "
            "charges (one per atom, in e)",
            "charges",
        )
    atoms.calc = calc
    q = np.asarray(atoms.get_charges(), dtype=np.float64)
    if q.shape != (len(atoms),) or not np.isfinite(q).all():
        raise ParameterError(f"ase: the calculator's charges {q!r} are not one per atom", "charges")
    return q
