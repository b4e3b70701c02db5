"""``rttddft``: real-time TDHF/TDDFT of one molecule (or n copies of it) on PySCF.

    model = create_model("rttddft", n=1, xyz="water.xyz", basis="sto-3g", xc="pbe0",
                         kick_au=1e-3)
    model.initialize(dt_au=0.2)        # the EM step; sub-steps of about dt_substep_au
    sources = model.step(fields)       # fields (n, 3) in a.u. -> dmu/dt (n, 3) in a.u.
    model.extras()                     # energy_au, mux_au, muy_au, muz_au, time_au

As a driver, with a MaxwellLink job script's parameters as they are::

    maxwellhub-driver --unix hcn --model rttddft --param "molecule_xyz=hcn.xyz,
        functional=SCF, basis=sto-3g, dt_rttddft_au=0.04, delta_kick_au=1e-3"

Units: atomic units throughout (Hartree, bohr, a.u. of time and of field); the geometry
is read in Angstrom.

Model. The ground state is a tight SCF (RHF/RKS for multiplicity 1, UHF/UKS otherwise, as
MaxwellLink picks RKS or UKS). The one-electron density matrix is propagated in the
Löwdin-orthonormal basis (``X = S^-1/2``, ``P' = S^1/2 P S^1/2``, ``F' = X F X``) by
``i dP'/dt = [F'[P'] + H'(t), P']`` with the adiabatic Fock/Kohn-Sham matrix ``F'[P']``
rebuilt from ``P'`` at every evaluation (fixed nuclei). ``fock_builder``: ``"numpy"``
precomputes the integrals in the orthonormal basis (dense (N², N²) matrices for J and K,
basis functions on PySCF's DFT grid) and needs only numpy and one libxc call per build (HF,
LDA, GGA, global hybrids); ``"pyscf"`` calls PySCF's own J/K and numint (any functional);
``"auto"`` takes numpy where it applies and one (N², N²) matrix fits in 256 MiB (N <= 75).
Both agree with PySCF's ``get_fock`` to 1e-12 on complex densities.

Sign conventions. Electrons have charge -1: the electronic dipole operator is ``d = -r``
(PySCF's ``int1e_r`` is ``+r``), the coupling ``H' = -E . d = +E . r``, and the reported
dipole ``mu = sum_A Z_A R_A + Tr(P d) = sum_A Z_A R_A - Tr(P r)`` with the gauge origin at
the origin of the coordinates (as given; nothing is re-centred). A field along +z lowers
the electron density at +z, so ``mu_z`` rises: ``d mu = alpha E`` with ``alpha > 0``.

Propagators (``propagator``). Both are second order in the sub-step (peak positions of a
spectrum move as ``dt²``) and keep ``Tr P`` and idempotency to round-off, because every
update is a unitary ``P' -> U P' U^H`` with ``U`` from an eigendecomposition of a
Hermitian matrix (no general matrix exponential):

- ``"pc"`` (default, MaxwellLink's default): exponential midpoint rule
  ``U = exp(-i dt F(t + dt/2))`` with ``F(t + dt/2) = (F(t) + F(t + dt)) / 2`` iterated to
  self-consistency from the extrapolation ``2 F(t) - F(t - dt/2)`` (successive
  ``F(t + dt)`` within ``pc_tolerance`` in Frobenius norm, at least two Fock builds per
  sub-step). Time-reversible once converged; the default 1e-8 (MaxwellLink's is 1e-6) keeps
  the energy drift of water/HF after a 1e-2 kick at 2.5e-9 Hartree per 1000 sub-steps of
  0.05 a.u. (1.4e-7 at 1e-6).
- ``"etrs"``: enforced time-reversal symmetry, ``U = exp(-i dt/2 F(t + dt))
  exp(-i dt/2 F(t))`` with ``F(t + dt)`` from the predictor ``exp(-i dt F(t))``; exactly two
  Fock builds per sub-step.

Time steps and the field. The EM step ``D`` (``initialize(dt_au=D)``) is split into
``int(D / dt_substep_au)`` sub-steps (at least one; MaxwellLink's rule, with a ratio
within 1e-9 of an integer taken as that integer) of length ``D / count``. The field the
hub gives for a step is held constant over all its sub-steps and enters both ends of every
sub-step.

Kicks. ``kick_au`` (kappa, per molecule) is the impulsive kick ``E(t) = kappa delta(t) k``
with ``k = kick_direction`` (used as given, not normalised): at t = 0,
``P' -> exp(-i kappa k.r') P' exp(+i kappa k.r')`` with ``r' = X r X``, after which
``mu . k`` rises. ``kick_field_au`` is MaxwellLink's kick: a field ``kappa k`` added to the
hub's field during the first EM step (all its sub-steps), an impulse of ``kappa D``.

Source. The source the EM solver receives for a step is the dipole change over the step,
``(mu(t + D) - mu(t)) / D``, with the dipoles that ``extras()`` reports (``mux_au``...):
Meep's current, held over the step, then integrates exactly to the dipole change.

``remove_permanent_dipole``: the reported dipole loses the ground-state electronic dipole
``Tr(P_0 d)`` (the nuclear part stays, as in MaxwellLink). In the coupling it is a multiple
of the identity operator, which commutes with ``P'`` and so changes nothing.

``maxwelllink_compat`` reproduces MaxwellLink 0.5.0's trajectories (not physics): its psi4
dipole integrals already carry the electron's charge and it negates them again, so its
electronic dipole operator is ``+r`` (HCN/STO-3G: ``mu_z = +0.965`` a.u. where PySCF and
this model say ``-0.965``) and its coupling ``-E . r``; the Fock matrix a sub-step starts
from carries the previous sub-step's field (at the first sub-step of an EM step, the
previous EM step's field); ``remove_permanent_dipole`` subtracts the identity *in the AO
basis* (a real perturbation); and the source is the instantaneous ``Tr(-i [F', P'] d')`` at
the step's end. With it, the embedded Meep coupling reproduces MaxwellLink's own 2D Meep +
HCN reference run (EM feedback included) to 2e-8 a.u. in ``mu_z``.

State (checkpoints resume bit for bit): ``P`` (n, s, N, N) complex, ``fock`` and, for
``"pc"``, ``fock_half`` (the Fock history the propagator needs), ``step`` (EM steps taken),
``energy`` (field-free total energy, Hartree) and ``dipole`` (n, 3); ``s`` is 1 (total
density) for a restricted and 2 (alpha, beta) for an unrestricted molecule.

Ensembles: n copies of one geometry, basis and functional share every integral and are
propagated as one batch (``P`` is (n, s, N, N)); a molecule follows bit for bit the
trajectory it follows alone (every product is done molecule by molecule inside the batch,
and the eigensolver is picked by the functional, not by the data).

Parameters: ``dt_substep_au`` and ``pc_tolerance`` may change between steps
(``set_params``); everything else is fixed for the model's life. MaxwellLink's names are
aliases (``molecule_xyz``, ``functional`` with "SCF" for HF, ``dt_rttddft_au``,
``delta_kick_au`` -> ``kick_field_au``, ``delta_kick_direction`` "x".."xyz",
``electron_propagation``, ``threshold_pc``); its psi4-only parameters (``engine``,
``memory``, ``num_threads``, ``checkpoint``, ``restart``, ``verbose``, ``dft_grid_name``,
``dft_radial_points``, ``dft_spherical_points``) are accepted and ignored, with a warning in
the driver's log, so its job scripts run with only the executable's name changed.

Not shipped: Ehrenfest dynamics (moving nuclei). It needs analytic nuclear gradients of the
time-dependent, complex density including the Pulay/basis-set-motion terms and the moving
Löwdin basis, which PySCF does not provide for a propagated non-stationary density; an
approximate version would not conserve energy and could not be tested to the standards
this model is held to.

This module must never: modify a state array it was given; rely on PySCF's incremental
Fock caches (``get_veff``'s ``dm_last``/``vhf_last``); use a general matrix exponential per
sub-step; let PySCF print; normalise ``kick_direction``.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from ._rt_core import Geometry, RTConfig, RTCore, parse_atoms, read_xyz, substeps
from .base import Model, Parameter, ParameterError


def _import_pyscf() -> str:
    """Import PySCF now, when this module loads (so that a missing PySCF is named as such
    by the model registry), keeping the root logger's level: PySCF imports
    numpy.distutils (numpy < 1.26), whose import sets the root logger to WARNING, and a
    run's progress and checkpoint lines would vanish. Returns PySCF's version."""
    root = logging.getLogger()
    level = root.level
    try:
        return str(importlib.import_module("pyscf").__version__)
    finally:
        root.setLevel(level)


PYSCF_VERSION = _import_pyscf()

__all__ = ["RTTDDFTModel"]

_LOG = logging.getLogger("maxwellhub.driver")

_KICK_AXES = {
    "x": (1.0, 0.0, 0.0),
    "y": (0.0, 1.0, 0.0),
    "z": (0.0, 0.0, 1.0),
    "xy": (1.0, 1.0, 0.0),
    "xz": (1.0, 0.0, 1.0),
    "yz": (0.0, 1.0, 1.0),
    "xyz": (1.0, 1.0, 1.0),
}


def _kick_direction_from_mxl(value: Any) -> Any:
    """MaxwellLink's ``delta_kick_direction`` strings ("x" .. "xyz") as a vector; it kicks
    with the field kappa along each named axis, so "xyz" is (1, 1, 1)."""
    if isinstance(value, str):
        key = value.strip().lower()
        if key not in _KICK_AXES:
            raise ValueError(f"expected one of {', '.join(_KICK_AXES)}")
        return _KICK_AXES[key]
    return value


def _functional_from_mxl(value: Any) -> Any:
    """MaxwellLink's ``functional``: "SCF" means Hartree-Fock."""
    if isinstance(value, str) and value.strip().upper() in ("SCF", "HF"):
        return "hf"
    return value


def _positive(a: np.ndarray) -> np.ndarray:
    return a > 0


_IGNORED = "MaxwellLink's (psi4); accepted so its job scripts run, and ignored here"


def _check_xc(xc: str, builder: str) -> str:
    """The functional as the core takes it ("hf" or a libxc name), or ParameterError."""
    if xc.strip().lower() in ("hf", "scf"):
        return "hf"
    from pyscf.dft import numint

    ni = numint.NumInt()
    try:
        xctype = ni._xc_type(xc)
    except (KeyError, ValueError, TypeError) as exc:
        raise ParameterError(
            f"rttddft: parameter xc = {xc!r} is not allowed; expected 'hf' or a functional "
            f"PySCF's libxc knows ({exc})",
            "xc",
        ) from None
    if xctype == "HF":
        return "hf"
    if builder == "numpy" and (xctype not in ("LDA", "GGA") or ni.rsh_coeff(xc)[0]):
        raise ParameterError(
            f"rttddft: parameter fock_builder = 'numpy' is not allowed for xc = {xc!r}; the "
            "numpy builder does HF, LDA, GGA and global hybrids: expected 'auto' or 'pyscf'",
            "fock_builder",
        )
    return xc


def _geometry(params: Mapping[str, Any]) -> Geometry:
    xyz, atoms = params["xyz"], params["atoms"]
    if (xyz is None) == (atoms is None or not atoms.strip()):
        raise ParameterError(
            "rttddft: give exactly one of xyz (an XYZ file; MaxwellLink's molecule_xyz) and "
            "atoms (an atom string)",
            "xyz" if xyz is not None else "atoms",
        )
    try:
        return read_xyz(xyz) if xyz is not None else parse_atoms(atoms)
    except ValueError as exc:
        raise ParameterError(f"rttddft: {exc}", "xyz" if xyz is not None else "atoms") from None


def _charge_multiplicity(params: Mapping[str, Any], geometry: Geometry) -> tuple[int, int]:
    """Line 2 of the XYZ file when it gives them (charge and multiplicity parameters left
    at their defaults, or equal), else the parameters; checked against the electrons."""
    from pyscf.data import elements

    charge, multiplicity = params["charge"], params["multiplicity"]
    if geometry.charge is not None and geometry.multiplicity is not None:
        for key, ours, default, theirs in (
            ("charge", charge, 0, geometry.charge),
            ("multiplicity", multiplicity, 1, geometry.multiplicity),
        ):
            if ours != default and ours != theirs:
                raise ParameterError(
                    f"rttddft: parameter {key} = {ours} contradicts {geometry.where}, line 2 "
                    f"({geometry.charge} {geometry.multiplicity}); give it in one place",
                    key,
                )
        charge, multiplicity = geometry.charge, geometry.multiplicity
    electrons = sum(elements.charge(sym) for sym, _ in geometry.atoms) - charge
    where = f"{geometry.where}, line 2" if geometry.charge is not None else "parameters"
    if multiplicity < 1 or electrons < multiplicity - 1 or (electrons - multiplicity + 1) % 2:
        raise ParameterError(
            f"rttddft: multiplicity {multiplicity} is impossible with {electrons} electrons "
            f"(charge {charge}, from {where}); an even electron count needs an odd "
            "multiplicity and vice versa",
            "multiplicity",
        )
    return charge, multiplicity


def _check_basis(basis: str, geometry: Geometry) -> None:
    from pyscf import gto

    for symbol in sorted({sym for sym, _ in geometry.atoms}):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = gto.basis.load(basis, symbol)
        except Exception:
            found = None
        if not found:
            raise ParameterError(
                f"rttddft: basis {basis!r} has no functions for {symbol} ({geometry.where})",
                "basis",
            )


def _config(params: Mapping[str, Any]) -> RTConfig:
    """The shared configuration of the core, checked cheaply (no SCF)."""
    geometry = _geometry(params)
    charge, multiplicity = _charge_multiplicity(params, geometry)
    xc = _check_xc(params["xc"], params["fock_builder"])
    _check_basis(params["basis"], geometry)
    direction = params["kick_direction"]
    if not np.any(direction) and (np.any(params["kick_au"]) or np.any(params["kick_field_au"])):
        raise ParameterError(
            "rttddft: parameter kick_direction = [0, 0, 0] is not allowed with a kick; "
            "expected a non-zero 3-vector",
            "kick_direction",
        )
    return RTConfig(
        geometry=geometry,
        charge=charge,
        multiplicity=multiplicity,
        basis=params["basis"],
        xc=xc,
        grid_level=params["grid_level"],
        propagator=params["propagator"],
        kick_direction=(float(direction[0]), float(direction[1]), float(direction[2])),
        remove_permanent_dipole=params["remove_permanent_dipole"],
        maxwelllink_compat=params["maxwelllink_compat"],
        conv_tol=params["scf_conv_tol"],
        fock_builder=params["fock_builder"],
    )


class RTTDDFTModel(Model):
    """Real-time TDHF/TDDFT of n copies of one molecule (see the module docstring)."""

    name = "rttddft"
    parameters: ClassVar[Mapping[str, Parameter]] = {
        "xyz": Parameter(
            None,
            "XYZ file: atom count, 'charge multiplicity' (or a comment), then 'Symbol x y z' "
            "lines in Angstrom",
            kind="path",
            shared=True,
        ),
        "atoms": Parameter(
            None,
            "atoms instead of a file: 'O 0 0 0.12; H 0 0.76 -0.47; ...' (Angstrom)",
            kind=str,
            shared=True,
        ),
        "charge": Parameter(
            0, "molecular charge (unless the XYZ file's line 2 gives it)", kind=int, shared=True
        ),
        "multiplicity": Parameter(
            1,
            "2S + 1 (unless the XYZ file's line 2 gives it); 1 runs RHF/RKS, else UHF/UKS",
            kind=int,
            valid=lambda a: a >= 1,
            allowed="an integer >= 1",
            shared=True,
        ),
        "basis": Parameter("sto-3g", "PySCF basis set name", kind=str, shared=True),
        "xc": Parameter(
            "hf",
            "'hf' or a PySCF/libxc functional ('lda', 'pbe', 'b3lyp', 'pbe0', ...)",
            kind=str,
            shared=True,
        ),
        "grid_level": Parameter(
            3,
            "PySCF DFT grid level (grids.level)",
            kind=int,
            valid=lambda a: (a >= 0) & (a <= 9),
            allowed="an integer 0-9",
            shared=True,
        ),
        "dt_substep_au": Parameter(
            0.04,
            "longest electronic sub-step (a.u.; dt_substep_fs in fs): the EM step is "
            "split into int(D / dt) equal sub-steps",
            valid=_positive,
            allowed="a number > 0",
            mutable=True,
            shared=True,
            unit="time",
        ),
        "propagator": Parameter(
            "pc",
            "'pc' (self-consistent exponential midpoint) or 'etrs'",
            kind=str,
            choices=("pc", "etrs"),
            shared=True,
        ),
        "pc_tolerance": Parameter(
            1e-8,
            "predictor-corrector convergence: Frobenius norm of successive F(t + dt) "
            "(Hartree); MaxwellLink's default is 1e-6",
            valid=_positive,
            allowed="a number > 0",
            mutable=True,
            shared=True,
        ),
        "kick_au": Parameter(
            0.0,
            "impulsive kick kappa: E = kappa delta(t) kick_direction at t = 0 (a.u. of "
            "field x time)",
        ),
        "kick_field_au": Parameter(
            0.0,
            "MaxwellLink's kick: a field kappa kick_direction added during the first EM "
            "step (a.u.)",
        ),
        "kick_direction": Parameter(
            (1.0, 1.0, 1.0),
            "kick direction, used as given (not normalised)",
            kind="vector",
            shared=True,
        ),
        "remove_permanent_dipole": Parameter(
            False,
            "report the dipole without the ground-state electronic dipole",
            kind=bool,
            shared=True,
        ),
        "maxwelllink_compat": Parameter(
            False,
            "reproduce MaxwellLink 0.5.0's trajectories (its dipole sign, field lag, source)",
            kind=bool,
            shared=True,
        ),
        "fock_builder": Parameter(
            "auto",
            "'numpy' (dense integrals, small molecules), 'pyscf' (PySCF's own builders) or 'auto'",
            kind=str,
            choices=("auto", "numpy", "pyscf"),
            shared=True,
        ),
        "scf_conv_tol": Parameter(
            1e-12,
            "ground-state SCF energy threshold (Hartree)",
            valid=_positive,
            allowed="a number > 0",
            shared=True,
        ),
        # MaxwellLink's own, so that its job scripts run unchanged
        "engine": Parameter(None, _IGNORED, kind=str, shared=True),
        "memory": Parameter(None, _IGNORED, kind=str, shared=True),
        "num_threads": Parameter(1, _IGNORED, kind=int, shared=True),
        "checkpoint": Parameter(
            False, _IGNORED + " (use the driver's --checkpoint-dir)", kind=bool, shared=True
        ),
        "restart": Parameter(
            False, _IGNORED + " (maxwellhub resumes from its checkpoints)", kind=bool, shared=True
        ),
        "verbose": Parameter(False, _IGNORED, kind=bool, shared=True),
        "dft_grid_name": Parameter(
            None, _IGNORED + " (grid_level sets the grid)", kind=str, shared=True
        ),
        "dft_radial_points": Parameter(
            -1, _IGNORED + " (grid_level sets the grid)", kind=int, shared=True
        ),
        "dft_spherical_points": Parameter(
            -1, _IGNORED + " (grid_level sets the grid)", kind=int, shared=True
        ),
    }
    #: MaxwellLink's parameter names -> (ours, converter)
    aliases: ClassVar[Mapping[str, tuple[str, Callable[[Any], Any] | None]]] = {
        "molecule_xyz": ("xyz", None),
        "functional": ("xc", _functional_from_mxl),
        "dt_rttddft_au": ("dt_substep_au", None),
        "delta_kick_au": ("kick_field_au", None),
        "delta_kick_direction": ("kick_direction", _kick_direction_from_mxl),
        "electron_propagation": ("propagator", None),
        "threshold_pc": ("pc_tolerance", None),
    }
    extras_keys = ("energy_au", "mux_au", "muy_au", "muz_au")
    #: small and fast (H2, HF/STO-3G): for the conformance test over every model
    example_params: ClassVar[dict[str, Any]] = {
        "atoms": "H 0 0 0; H 0 0 0.74",
        "xc": "hf",
        "kick_au": 1e-3,
        "dt_substep_au": 0.1,
    }
    conformance_rtol: ClassVar[float] = 0.0

    # ------------------------------------------------------------ Model hooks

    @classmethod
    def _validate(cls, params: dict[str, Any], n: int) -> None:
        _config(params)

    def _configure(self) -> None:
        config = _config(self.params)
        core = self.__dict__.get("core")
        if core is None or core.config != config:
            self.core = RTCore(config)  # the SCF: the expensive part
        ignored = [
            key
            for key, spec in self.parameters.items()
            if spec.doc.startswith(_IGNORED) and self.params[key] != spec.default
        ]
        if ignored:
            _LOG.warning(
                "rttddft: ignoring MaxwellLink parameter(s) %s (%s)",
                ", ".join(ignored),
                "psi4 resources, grids and checkpoint files have no meaning here",
            )

    def _initial_state(self) -> dict[str, np.ndarray]:
        return self.core.initial_state(self.n, np.asarray(self.params["kick_au"]))

    def _prepare(self, dt_au: float) -> None:
        self._substeps = substeps(dt_au, self.params["dt_substep_au"])

    def _stage_impl(
        self, state: dict[str, np.ndarray], fields: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        assert self.dt_au is not None
        return self.core.stage(
            state,
            fields,
            self.dt_au,
            np.asarray(self.params["kick_field_au"]),
            self._substeps,
            self.params["pc_tolerance"],
        )

    def _kick_impl(
        self, state: dict[str, np.ndarray], impulses: np.ndarray
    ) -> dict[str, np.ndarray]:
        return self.core.kicked(state, impulses)

    def _extras_impl(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dipole = state["dipole"]
        return {
            "energy_au": state["energy"].copy(),
            "mux_au": dipole[:, 0].copy(),
            "muy_au": dipole[:, 1].copy(),
            "muz_au": dipole[:, 2].copy(),
        }

    # ------------------------------------------------------------ information

    @property
    def substeps(self) -> tuple[int, float] | None:
        """(sub-steps per EM step, their length in a.u.) once initialized."""
        return getattr(self, "_substeps", None)

    @property
    def scf_energy(self) -> float:
        """Ground-state total energy of the SCF (Hartree)."""
        return self.core.e_scf
