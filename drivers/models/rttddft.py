"""``rttddft``: real-time TDHF/TDDFT of one molecule (or n copies of it) on PySCF.

    model = RTTDDFTModel(n=1, xyz="water.xyz", basis="sto-3g", xc="pbe0", kick_au=1e-3)
    model.initialize(dt_au=0.2)        # the EM step; sub-steps of about dt_substep_au
    sources = model.step(fields)       # fields (n, 3) in a.u. -> dmu/dt (n, 3) in a.u.
    model.extras()                     # energy_au, mux_au, muy_au, muz_au, time_au

Units: atomic units throughout (Hartree, bohr, a.u. of time and of field); the geometry
is read in Angstrom.

Model. The ground state is a tight SCF (RHF/RKS for multiplicity 1, UHF/UKS otherwise, as
MaxwellLink picks RKS or UKS). The one-electron density matrix is propagated in the
Löwdin-orthonormal basis (``X = S^-1/2``, ``P' = S^1/2 P S^1/2``, ``F' = X F X``) by
``i dP'/dt = [F'[P'] + H'(t), P']`` with the adiabatic Fock/Kohn-Sham matrix ``F'[P']``
rebuilt from ``P'`` at every evaluation (fixed nuclei).

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
the step's end.

State (checkpoints resume bit for bit): ``P`` (n, s, N, N) complex, ``fock`` and, for
``"pc"``, ``fock_half`` (the Fock history the propagator needs), ``step`` (EM steps taken),
``energy`` (field-free total energy, Hartree) and ``dipole`` (n, 3); ``s`` is 1 (total
density) for a restricted and 2 (alpha, beta) for an unrestricted molecule.

Ensembles: n copies of one geometry, basis and functional share every integral and are
propagated as one batch (``P`` is (n, s, N, N)); a molecule follows the same trajectory
in an ensemble as alone (to round-off: the batched matrix products may sum in another
order).

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

import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from ._rt_core import Geometry, RTConfig, RTCore, parse_atoms, read_xyz, substeps
from .base import Model

__all__ = ["RTTDDFTModel", "resolve_parameters"]

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
            raise ValueError(
                f"rttddft: delta_kick_direction = {value!r} is not allowed; expected one of "
                f"{', '.join(_KICK_AXES)}"
            )
        return _KICK_AXES[key]
    return value


def _functional_from_mxl(value: Any) -> Any:
    """MaxwellLink's ``functional``: "SCF" means Hartree-Fock."""
    if isinstance(value, str) and value.strip().upper() in ("SCF", "HF"):
        return "hf"
    return value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


# name -> (default, kind, per-molecule, doc); kinds: float, int, bool, str, "path", "vector"
_PARAMETERS: dict[str, tuple[Any, Any, bool, str]] = {
    "xyz": (
        "",
        "path",
        False,
        "XYZ file: atom count, 'charge multiplicity' (or a comment), "
        "then 'Symbol x y z' lines in Angstrom",
    ),
    "atoms": (
        "",
        str,
        False,
        "atoms instead of a file: 'O 0 0 0.12; H 0 0.76 -0.47; ...' (Angstrom)",
    ),
    "charge": (0, int, False, "molecular charge (when the XYZ file's line 2 gives none)"),
    "multiplicity": (
        1,
        int,
        False,
        "2S + 1 (when the XYZ file's line 2 gives none); 1 runs RHF/RKS, anything else UHF/UKS",
    ),
    "basis": ("sto-3g", str, False, "PySCF basis set name"),
    "xc": (
        "hf",
        str,
        False,
        "'hf' or a PySCF/libxc functional ('lda', 'pbe', 'b3lyp', 'pbe0', ...)",
    ),
    "grid_level": (3, int, False, "PySCF DFT grid level 0-9 (grids.level)"),
    "dt_substep_au": (
        0.04,
        float,
        False,
        "longest electronic sub-step (a.u.); the EM step is split into int(D / dt) equal sub-steps",
    ),
    "propagator": ("pc", str, False, "'pc' (self-consistent exponential midpoint) or 'etrs'"),
    "pc_tolerance": (
        1e-8,
        float,
        False,
        "predictor-corrector convergence: Frobenius norm of successive F(t + dt) (Hartree); "
        "MaxwellLink's default is 1e-6",
    ),
    "kick_au": (
        0.0,
        float,
        True,
        "impulsive kick kappa: E = kappa delta(t) kick_direction at t = 0 (a.u. of field x time)",
    ),
    "kick_field_au": (
        0.0,
        float,
        True,
        "MaxwellLink's kick: a field kappa kick_direction added during the first EM step (a.u.)",
    ),
    "kick_direction": (
        (1.0, 1.0, 1.0),
        "vector",
        False,
        "kick direction, used as given (not normalised)",
    ),
    "remove_permanent_dipole": (
        False,
        bool,
        False,
        "report the dipole without the ground-state electronic dipole",
    ),
    "maxwelllink_compat": (
        False,
        bool,
        False,
        "reproduce MaxwellLink 0.5.0's trajectories (its dipole sign, field lag and source)",
    ),
    "fock_builder": (
        "auto",
        str,
        False,
        "'auto', 'numpy' (dense integrals, small molecules) or 'pyscf' (PySCF's own builders)",
    ),
    "scf_conv_tol": (1e-12, float, False, "ground-state SCF energy threshold (Hartree)"),
}

_CHOICES = {"propagator": ("pc", "etrs"), "fock_builder": ("auto", "numpy", "pyscf")}

#: MaxwellLink's parameter names -> (ours, converter)
ALIASES: Mapping[str, tuple[str, Callable[[Any], Any] | None]] = {
    "molecule_xyz": ("xyz", None),
    "functional": ("xc", _functional_from_mxl),
    "dt_rttddft_au": ("dt_substep_au", None),
    "delta_kick_au": ("kick_field_au", None),
    "delta_kick_direction": ("kick_direction", _kick_direction_from_mxl),
    "electron_propagation": ("propagator", _lower),
    "threshold_pc": ("pc_tolerance", None),
}

#: MaxwellLink parameters that have no meaning here (psi4 resources, its own checkpoint
#: files, psi4 grid names): accepted and ignored so its job scripts run unchanged.
IGNORED_MXL = (
    "engine",
    "memory",
    "num_threads",
    "checkpoint",
    "restart",
    "verbose",
    "dft_grid_name",
    "dft_radial_points",
    "dft_spherical_points",
)


def _bad(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"rttddft: parameter {key} = {value!r} is not allowed; expected {expected}")


def _convert(key: str, value: Any, kind: Any) -> Any:
    if kind in (str, "path"):
        if not isinstance(value, str):
            raise _bad(key, value, "a string")
        return os.path.abspath(value) if kind == "path" and value else value
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool | np.bool_):
            raise _bad(key, value, "true or false")
        return bool(value)
    if kind == "vector":
        arr = np.array(value, dtype=np.float64) if not isinstance(value, str) else None
        if arr is None or arr.shape != (3,) or not np.isfinite(arr).all():
            raise _bad(key, value, "three finite numbers")
        arr.setflags(write=False)
        return arr
    if kind is int:
        if isinstance(value, bool) or (
            not isinstance(value, int | np.integer)
            and not (isinstance(value, float) and value.is_integer())
        ):
            raise _bad(key, value, "an integer")
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _bad(key, value, "a number") from None
    if not math.isfinite(number):
        raise _bad(key, value, "a finite number")
    return number


def _per_molecule(key: str, value: Any, n: int) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _bad(key, value, "a number or n numbers") from None
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise _bad(key, value, f"a finite number or {n} finite numbers (one per molecule)")
    arr.setflags(write=False)
    return arr


def _apply_aliases(raw: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ignored = sorted(key for key in raw if key in IGNORED_MXL)
    if ignored:
        _LOG.warning(
            "rttddft: ignoring MaxwellLink parameter(s) %s (psi4 resources, psi4 "
            "grid names and MaxwellLink's own checkpoint files have no meaning "
            "here; use grid_level, and the driver's --checkpoint-dir)",
            ", ".join(ignored),
        )
    for key, value in raw.items():
        if key in IGNORED_MXL:
            continue
        if key in ALIASES:
            ours, converter = ALIASES[key]
            if ours in raw:
                raise ValueError(
                    f"rttddft: both {key} (MaxwellLink's name) and {ours} given; give one"
                )
            out[ours] = converter(value) if converter else value
        else:
            out[key] = value
    return out


def resolve_parameters(n: int, raw: Mapping[str, Any]) -> tuple[dict[str, Any], RTConfig]:
    """Our parameters (with MaxwellLink's names translated) and the shared configuration,
    checked without running any SCF: the geometry file parses, the multiplicity fits the
    electron count, the functional is known to libxc and the basis covers every element."""
    given = _apply_aliases(raw)
    unknown = sorted(set(given) - set(_PARAMETERS))
    if unknown:
        raise ValueError(
            f"rttddft: unknown parameter(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(_PARAMETERS)} (or MaxwellLink's names "
            f"{', '.join(ALIASES)})"
        )
    params: dict[str, Any] = {}
    for key, (default, kind, per_molecule, _) in _PARAMETERS.items():
        value = given.get(key, default)
        params[key] = _per_molecule(key, value, n) if per_molecule else _convert(key, value, kind)
    for key, choices in _CHOICES.items():
        params[key] = params[key].strip().lower()
        if params[key] not in choices:
            raise _bad(key, params[key], " or ".join(repr(c) for c in choices))
    geometry = _geometry(params)
    charge, multiplicity = _charge_multiplicity(params, geometry, given)
    xc = _check_xc(params)
    _check_numbers(params)
    _check_basis(params["basis"], geometry)
    config = RTConfig(
        geometry=geometry,
        charge=charge,
        multiplicity=multiplicity,
        basis=params["basis"],
        xc=xc,
        grid_level=params["grid_level"],
        dt_substep=params["dt_substep_au"],
        propagator=params["propagator"],
        pc_tolerance=params["pc_tolerance"],
        kick_direction=tuple(float(v) for v in params["kick_direction"]),  # type: ignore[arg-type]
        remove_permanent_dipole=params["remove_permanent_dipole"],
        maxwelllink_compat=params["maxwelllink_compat"],
        conv_tol=params["scf_conv_tol"],
        fock_builder=params["fock_builder"],
    )
    return params, config


def _geometry(params: dict[str, Any]) -> Geometry:
    if bool(params["xyz"]) == bool(params["atoms"].strip()):
        raise ValueError(
            "rttddft: give exactly one of xyz (an XYZ file; MaxwellLink's "
            "molecule_xyz) and atoms (an atom string)"
        )
    return read_xyz(params["xyz"]) if params["xyz"] else parse_atoms(params["atoms"])


def _charge_multiplicity(
    params: dict[str, Any], geometry: Geometry, given: Mapping[str, Any]
) -> tuple[int, int]:
    from pyscf.data import elements

    charge, multiplicity = params["charge"], params["multiplicity"]
    if geometry.charge is not None and geometry.multiplicity is not None:
        for key, ours, theirs in (
            ("charge", charge, geometry.charge),
            ("multiplicity", multiplicity, geometry.multiplicity),
        ):
            if key in given and ours != theirs:
                raise ValueError(
                    f"rttddft: parameter {key} = {ours} contradicts {geometry.where}, line 2 "
                    f"({geometry.charge} {geometry.multiplicity}); give it in one place"
                )
        charge, multiplicity = geometry.charge, geometry.multiplicity
    electrons = sum(elements.charge(sym) for sym, _ in geometry.atoms) - charge
    where = f"{geometry.where}, line 2" if geometry.charge is not None else "parameters"
    if multiplicity < 1 or electrons < multiplicity - 1 or (electrons - multiplicity + 1) % 2:
        raise ValueError(
            f"rttddft: multiplicity {multiplicity} is impossible with {electrons} electrons "
            f"(charge {charge}, from {where}); an even electron count needs an odd "
            "multiplicity and vice versa"
        )
    return charge, multiplicity


def _check_xc(params: dict[str, Any]) -> str:
    xc = params["xc"].strip()
    if xc.lower() == "hf":
        return "hf"
    from pyscf.dft import numint

    try:
        xctype = numint.NumInt()._xc_type(xc)
    except (KeyError, ValueError, TypeError) as exc:
        raise _bad("xc", xc, f"'hf' or a functional PySCF's libxc knows ({exc})") from None
    if xctype == "HF":
        return "hf"
    if params["fock_builder"] == "numpy" and (
        xctype not in ("LDA", "GGA") or numint.NumInt().rsh_coeff(xc)[0]
    ):
        raise _bad(
            "fock_builder",
            "numpy",
            f"'auto' or 'pyscf' for {xc} (the numpy builder does LDA, GGA and global hybrids)",
        )
    return xc


def _check_numbers(params: dict[str, Any]) -> None:
    for key in ("dt_substep_au", "pc_tolerance", "scf_conv_tol"):
        if not params[key] > 0:
            raise _bad(key, params[key], "a number > 0")
    if not 0 <= params["grid_level"] <= 9:
        raise _bad("grid_level", params["grid_level"], "an integer 0-9")
    if not params["kick_direction"].any() and (
        params["kick_au"].any() or params["kick_field_au"].any()
    ):
        raise _bad("kick_direction", params["kick_direction"].tolist(), "a non-zero vector")


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
            raise ValueError(
                f"rttddft: basis {basis!r} has no functions for {symbol} ({geometry.where})"
            )


class RTTDDFTModel(Model):
    """Real-time TDHF/TDDFT of n copies of one molecule (see the module docstring)."""

    name = "rttddft"
    # Our parameters are checked by resolve_parameters (strings, paths, vectors and flags
    # that the base class's float/int parameters cannot describe yet).
    parameters: ClassVar[Mapping[str, Any]] = {}
    extras_keys = ("energy_au", "mux_au", "muy_au", "muz_au")
    aliases: ClassVar[Mapping[str, tuple[str, Callable[[Any], Any] | None]]] = ALIASES
    #: small and fast (H2, HF/STO-3G): for the conformance test over every model
    example_params: ClassVar[dict[str, Any]] = {
        "atoms": "H 0 0 0; H 0 0 0.74",
        "xc": "hf",
        "kick_au": 1e-3,
        "dt_substep_au": 0.05,
    }
    conformance_rtol: ClassVar[float] = 1e-12

    def __init__(self, n: int = 1, **params: Any) -> None:
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"rttddft: n = {n!r} is not allowed; expected an int >= 1")
        self.rt_params, self.config = resolve_parameters(int(n), params)
        self.core = RTCore(self.config)  # the SCF: the expensive part
        super().__init__(int(n))

    # ------------------------------------------------------------ Model hooks

    def _initial_state(self) -> dict[str, np.ndarray]:
        return self.core.initial_state(self.n, np.asarray(self.rt_params["kick_au"]))

    def _prepare(self, dt_au: float) -> None:
        self._substeps = substeps(dt_au, self.config.dt_substep)

    def _stage_impl(
        self, state: dict[str, np.ndarray], fields: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        assert self.dt_au is not None
        return self.core.stage(
            state, fields, self.dt_au, np.asarray(self.rt_params["kick_field_au"])
        )

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
