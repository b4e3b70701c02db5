"""``qutip``: any open quantum system (Lindblad master equation) built with QuTiP.

    model = create_model("qutip", preset="custom", module="examples/models/build_tls.py",
                         kwargs="omega=0.242,mu12=187", gamma_dephase=1e-3)
    model = create_model("qutip", preset="nlevel", energies=[0.3, 0.4],
                         dipoles=[[0, 0, 1.2], [0.5, 0, 0]], gamma_relax=1e-4)

As a driver, with a MaxwellLink 0.5.0 job script's parameters as they are::

    maxwellhub-driver --model qutip --param "preset=custom, module=build_tls.py,
        fd_dmudt=false, kwargs=omega=0.242,mu12=187,orientation=2,pe_initial=1e-4"

Units: atomic units throughout (Hartree, a.u. of time, field and dipole).

System. A ``build_model(**kwargs)`` returns MaxwellLink's dict ``H0`` (N x N),
``mu_ops`` ({"x", "y", "z"} -> N x N or None), ``c_ops`` (list of N x N) and ``rho0`` (a
ket, a density matrix, or None for the ground state of H0); QuTiP ``Qobj`` or numpy arrays.
``preset``: ``"tls"`` (MaxwellLink's TLS preset and the ``tls`` model's conventions:
H0 = omega |e><e|, mu = mu12 sigma_x on axis ``orientation``, C = [sqrt(1 - pe),
sqrt(pe) exp(i phase)]), ``"nlevel"`` (ground state plus N - 1 excited states from
``energies`` and ground-to-excited transition ``dipoles``, as an LR-TDDFT calculation
gives; no excited-excited or permanent dipoles; starts in C = sqrt(1 - pe) |0> +
sqrt(pe) exp(i phase) |1>) or ``"custom"`` (the file ``module``, called with ``kwargs``
plus the build parameters given at the top level, MaxwellLink's way).

Equation: d rho/dt = -i [H0 - E . mu, rho] + sum_c (c rho c^+ - {c^+ c, rho}/2).

Rates (``gamma_relax``, ``gamma_dephase``, a.u., mutable). Presets: decay of every excited
state j to the ground state, c = sqrt(gamma_relax) |0><j| (populations decay at
gamma_relax, coherences with the ground state at gamma_relax/2). Dephasing: TLS
c = sqrt(gamma_dephase) sigma_z with sigma_z = |e><e| - |g><g| (MaxwellLink's), which decays
the coherence rho_01 at exactly 2 gamma_dephase; N levels: c_j = sqrt(2 gamma_dephase)
|j><j| for every j, the same 2 gamma_dephase for every coherence. A custom module gets the
rates as keyword arguments and applies its own convention.

Propagation of one EM step dt with the field E held constant: the symmetric (Strang) split
rho <- P[U P[rho] U^+] with P = exp(L0 dt/2), L0 the field-free Liouvillian (-i[H0, .]
plus the dissipator), and U = exp(+i dt E . mu). Second order in dt (O(dt^3) local error
from the commutator of the pieces), exact for each piece: P is a scipy ``expm`` of the
N^2 x N^2 superoperator made once per (dt, rates) in ``_prepare``; U is built from an
eigendecomposition of the Hermitian E . mu (precomputed when one axis carries a dipole,
else a batched ``eigh`` per step). For the TLS without dissipation this is the ``tls``
model's split exactly; rho is re-symmetrised (rho + rho^+)/2 after every step.

Source: analytic (default) dmu_k/dt = Tr(mu_k L[rho]) of the new state and the step's field,
i.e. Tr(rho (i[H0, mu_k] - i sum_j E_j [mu_j, mu_k] + sum_c (c^+ mu_k c - {c^+ c, mu_k}/2)));
for the TLS this is the ``tls`` model's -2 omega mu12 Im(rho_01). ``fd_dmudt=true``: the
dipole difference over the step, (mu(t + dt) - mu(t)) / dt.

Extras: energy_au = Tr(H0 rho), mux_au, muy_au, muz_au = Tr(mu_k rho), populations P0 ..
P{N-1} = rho_jj, and for N = 2 also MaxwellLink's Pg, Pe, Pge_real, Pge_imag (rho_01).

Parameters are shared by all n molecules (one system, one initial state). MaxwellLink's
names are the names (``preset``, ``preset_kwargs``, ``module``, ``kwargs``, ``fd_dmudt``,
and the TLS keys its driver splits out of ``kwargs=omega=..,mu12=..``); its ``verbose``,
``checkpoint`` and ``restart`` are accepted and ignored. A build key (``omega``, ``mu12``,
``orientation``, ``pe_initial``, ``e_phase_initial``, ``gamma_relax``, ``gamma_dephase``)
reaches a custom ``build_model`` only when given (or different from its default); other
build_model keywords go in ``kwargs`` (quote it on the command line when it has commas:
``kwargs='a=1,b=2'``). ``energies`` and ``dipoles`` are text (JSON lists) or lists.

State: ``rho`` (n, N, N) complex128.

This module must never: modify a state array it was given; call a user module, QuTiP or a
matrix exponential of the superoperator inside a step; let N change with a mutable
parameter.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import qutip
import scipy.linalg

from .base import Model, Parameter, ParameterError

__all__ = ["QuTiPModel", "build_nlevel", "build_tls", "parse_kwargs_string"]

_AXES = ("x", "y", "z")
_IGNORED = "MaxwellLink's; accepted so its job scripts run, and ignored here"
# the keys MaxwellLink's driver splits out of "kwargs=omega=..,mu12=..": build parameters
_TLS_KEYS = (
    "omega",
    "mu12",
    "orientation",
    "pe_initial",
    "e_phase_initial",
    "gamma_relax",
    "gamma_dephase",
)
_NLEVEL_KEYS = (
    "energies",
    "dipoles",
    "orientation",
    "pe_initial",
    "e_phase_initial",
    "gamma_relax",
    "gamma_dephase",
)
_ARRAY_KEYS = ("energies", "dipoles")
_HERMITIAN_ATOL = 1e-10
# the optional package: a missing QuTiP is the registry's clear error (pip extra "qutip")
QUTIP_VERSION = qutip.__version__


def parse_kwargs_string(text: str | None) -> dict[str, Any]:
    """``'k1=v1,k2=v2'`` (optionally quoted) -> dict; values as Python literals where
    they parse (numbers, bools, lists), true/false as bools, else text; a bare ``k`` is
    True (MaxwellLink's reading)."""
    text = (text or "").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    out: dict[str, Any] = {}
    depth, start, parts = 0, 0, []
    for i, ch in enumerate(text):
        depth += 1 if ch in "[(" else -1 if ch in "])" else 0
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    for token in (p.strip() for p in parts):
        if not token:
            continue
        key, sep, value = token.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            out[key] = True
            continue
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value.lower() == "true" if value.lower() in ("true", "false") else value
    return out


def build_tls(
    omega=0.242,
    mu12=187.0,
    orientation=2,
    pe_initial=0.0,
    e_phase_initial=0.0,
    gamma_relax=0.0,
    gamma_dephase=0.0,
) -> dict[str, Any]:
    """The TLS preset as numpy arrays (MaxwellLink's preset and the ``tls`` model)."""
    h0 = np.diag([0.0, float(omega)]).astype(complex)
    sx = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=complex)
    mu_ops: dict[str, Any] = dict.fromkeys(_AXES)
    mu_ops[_AXES[int(orientation)]] = float(mu12) * sx
    c_ops = []
    if gamma_relax > 0:
        c_ops.append(np.sqrt(gamma_relax) * np.array([[0, 1], [0, 0]], dtype=complex))
    if gamma_dephase > 0:
        c_ops.append(np.sqrt(gamma_dephase) * np.diag([-1.0, 1.0]).astype(complex))
    pe = float(pe_initial)
    ket = np.array([np.sqrt(1 - pe), np.sqrt(pe) * np.exp(1j * e_phase_initial)])
    return {"H0": h0, "mu_ops": mu_ops, "c_ops": c_ops, "rho0": np.outer(ket, ket.conj())}


def build_nlevel(
    energies,
    dipoles,
    orientation=2,
    pe_initial=0.0,
    e_phase_initial=0.0,
    gamma_relax=0.0,
    gamma_dephase=0.0,
) -> dict[str, Any]:
    """N levels from N - 1 excitation energies and ground-to-excited transition dipoles
    ((N - 1, 3), or N - 1 numbers along ``orientation``)."""
    e = np.asarray(energies, dtype=float).reshape(-1)
    d = np.asarray(dipoles, dtype=float)
    if d.ndim == 1:
        d3 = np.zeros((d.size, 3))
        d3[:, int(orientation)] = d
        d = d3
    if e.size < 1 or d.shape != (e.size, 3):
        raise ValueError(
            f"dipoles has shape {d.shape}; expected ({e.size}, 3) or ({e.size},) for "
            f"{e.size} excitation energies"
        )
    n = e.size + 1
    h0 = np.diag(np.concatenate(([0.0], e))).astype(complex)
    mu_ops: dict[str, Any] = {}
    for k, axis in enumerate(_AXES):
        op = np.zeros((n, n), dtype=complex)
        op[0, 1:] = op[1:, 0] = d[:, k]
        mu_ops[axis] = op if d[:, k].any() else None
    c_ops = []
    for j in range(1, n):
        if gamma_relax > 0:
            c = np.zeros((n, n), dtype=complex)
            c[0, j] = np.sqrt(gamma_relax)
            c_ops.append(c)
    if gamma_dephase > 0:
        for j in range(n):
            c = np.zeros((n, n), dtype=complex)
            c[j, j] = np.sqrt(2.0 * gamma_dephase)
            c_ops.append(c)
    pe = float(pe_initial)
    ket = np.zeros(n, dtype=complex)
    ket[0] = np.sqrt(1 - pe)
    ket[1] = np.sqrt(pe) * np.exp(1j * e_phase_initial)
    return {"H0": h0, "mu_ops": mu_ops, "c_ops": c_ops, "rho0": np.outer(ket, ket.conj())}


def _matrix(obj: Any, what: str, dim: int | None) -> np.ndarray:
    full = obj.full() if hasattr(obj, "full") else obj
    a = np.array(full, dtype=complex)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or (dim is not None and a.shape[0] != dim):
        want = "square" if dim is None else f"{dim} x {dim}"
        raise ValueError(f"{what} has shape {a.shape}; expected a {want} matrix")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} is not finite")
    return a


def _hermitian(a: np.ndarray, what: str) -> np.ndarray:
    if not np.allclose(a, a.conj().T, rtol=0, atol=_HERMITIAN_ATOL * max(1.0, np.abs(a).max())):
        raise ValueError(f"{what} is not Hermitian")
    return 0.5 * (a + a.conj().T)


def _system(cfg: Any) -> dict[str, Any]:
    """A build_model result checked and as numpy: H0, mu (3, N, N), axes, c_ops, rho0."""
    if not isinstance(cfg, Mapping) or "H0" not in cfg:
        raise ValueError("build_model must return a dict with keys H0, mu_ops, c_ops, rho0")
    h0 = _hermitian(_matrix(cfg["H0"], "H0", None), "H0")
    dim = h0.shape[0]
    mu_ops = cfg.get("mu_ops") or {}
    unknown = sorted(set(mu_ops) - set(_AXES))
    if unknown:
        raise ValueError(f"mu_ops has keys {unknown}; expected x, y, z")
    mu = np.zeros((3, dim, dim), dtype=complex)
    axes = []
    for k, axis in enumerate(_AXES):
        if mu_ops.get(axis) is not None:
            mu[k] = _hermitian(_matrix(mu_ops[axis], f"mu_ops[{axis!r}]", dim), f"mu_ops[{axis!r}]")
            axes.append(k)
    c_ops = [_matrix(c, f"c_ops[{i}]", dim) for i, c in enumerate(cfg.get("c_ops") or [])]
    rho0 = cfg.get("rho0")
    if rho0 is None:
        ket = np.linalg.eigh(h0)[1][:, 0]
        rho = np.outer(ket, ket.conj())
    else:
        full = np.array(rho0.full() if hasattr(rho0, "full") else rho0, dtype=complex)
        if full.shape in ((dim,), (dim, 1)):
            ket = full.reshape(dim)
            rho = np.outer(ket, ket.conj())
        else:
            rho = _hermitian(_matrix(full, "rho0", dim), "rho0")
        if abs(np.trace(rho) - 1) > 1e-8:
            raise ValueError(f"rho0 has trace {np.trace(rho).real:.12g}; expected 1")
    return {"H0": h0, "mu": mu, "axes": tuple(axes), "c_ops": c_ops, "rho0": rho}


def _load_module(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("maxwellhub_qutip_user_model", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load a Python module from {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not callable(getattr(mod, "build_model", None)):
        raise ValueError(f"{path} defines no build_model(**kwargs)")
    return mod


def _array_text(key: str, text: str | None) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except json.JSONDecodeError as exc:
        raise ParameterError(
            f"qutip: parameter {key} = {text!r} is not a JSON list of numbers: {exc}", key
        ) from None


def _build(params: Mapping[str, Any], given: frozenset[str]) -> dict[str, Any]:
    """Call the preset or the user's build_model; ParameterError naming the key."""
    preset, module = params["preset"], params["module"]
    for key in _ARRAY_KEYS:
        if params[key] is not None and preset != "nlevel":
            raise ParameterError(f"qutip: parameter {key} is for preset=nlevel only", key)
    if (module is None) != (preset != "custom"):
        key = "module" if module is not None else "preset"
        raise ParameterError(
            f"qutip: preset={preset} with module={module}: a module file needs "
            "preset=custom, and preset=custom needs a module",
            key,
        )
    if preset == "custom":
        kw = parse_kwargs_string(params["kwargs"])
        kw.update({k: params[k] for k in _TLS_KEYS if k in given})
        key = "module"
        try:
            cfg = _load_module(module).build_model(**kw)
        except TypeError as exc:
            raise ParameterError(
                f"qutip: build_model of {module} refused the keyword arguments "
                f"{sorted(kw)} (from kwargs and the top-level build keys): {exc}",
                "kwargs",
            ) from None
        except Exception as exc:
            raise ParameterError(f"qutip: module {module}: {exc}", key) from exc
    else:
        keys = _TLS_KEYS if preset == "tls" else _NLEVEL_KEYS
        for k in sorted(given & (set(_TLS_KEYS) - set(keys))):
            raise ParameterError(f"qutip: parameter {k} is not used by preset {preset}", k)
        kw = {k: params[k] for k in keys if k not in _ARRAY_KEYS}
        extra = parse_kwargs_string(params["preset_kwargs"])
        unknown = sorted(set(extra) - set(keys))
        if unknown:
            raise ParameterError(
                f"qutip: preset_kwargs has {', '.join(unknown)}, unknown to preset "
                f"{preset}; allowed: {', '.join(keys)}",
                "preset_kwargs",
            )
        kw.update(extra)
        kw.update({k: params[k] for k in keys if k in given and k not in _ARRAY_KEYS})
        if preset == "nlevel":
            for k in _ARRAY_KEYS:
                if k in given or k not in kw:
                    kw[k] = _array_text(k, params[k])
                if kw[k] is None:
                    raise ParameterError(f"qutip: preset=nlevel needs parameter {k}", k)
        key = "preset_kwargs" if extra else ("energies" if preset == "nlevel" else "preset")
        try:
            cfg = (build_tls if preset == "tls" else build_nlevel)(**kw)
        except (TypeError, ValueError) as exc:
            raise ParameterError(f"qutip: preset {preset} with {kw}: {exc}", key) from None
    try:
        return _system(cfg)
    except ValueError as exc:
        raise ParameterError(f"qutip: the {preset} model: {exc}", key) from None


def _superoperator(h0: np.ndarray, c_ops: list[np.ndarray]) -> np.ndarray:
    """The field-free Liouvillian on row-major vec(rho): vec(A X B) = (A kron B^T) vec(X)."""
    eye = np.eye(h0.shape[0])
    lv = -1j * (np.kron(h0, eye) - np.kron(eye, h0.T))
    for c in c_ops:
        cdc = c.conj().T @ c
        lv += np.kron(c, c.conj()) - 0.5 * (np.kron(cdc, eye) + np.kron(eye, cdc.T))
    return lv


def _flat_t(a: np.ndarray) -> np.ndarray:
    """Matrices (..., N, N) as (..., N^2) rows of their transposes: Tr(A rho) is then
    flat(A) . vec(rho) with the row-major vec(rho)."""
    return np.ascontiguousarray(np.swapaxes(a, -1, -2).reshape(*a.shape[:-2], -1))


def _nonnegative(a):
    return a >= 0


class QuTiPModel(Model):
    """Open quantum systems from QuTiP (n copies of one), by the Strang split."""

    name = "qutip"
    parameters: ClassVar[Mapping[str, Parameter]] = {
        "preset": Parameter(
            "tls",
            "the system: tls, nlevel, or custom (a module file)",
            kind=str,
            shared=True,
            choices=("tls", "nlevel", "custom"),
        ),
        "preset_kwargs": Parameter(
            "", "extra preset keys as 'k=v,k=v' (MaxwellLink's)", kind=str, shared=True
        ),
        "module": Parameter(
            None,
            "Python file defining build_model(**kwargs) (preset=custom)",
            kind="path",
            shared=True,
        ),
        "kwargs": Parameter(
            "", "keyword arguments of build_model as 'k=v,k=v'", kind=str, shared=True
        ),
        "fd_dmudt": Parameter(
            False,
            "source from the dipole difference over the step (else analytic)",
            kind=bool,
            shared=True,
        ),
        "omega": Parameter(
            0.242,
            "TLS transition frequency (a.u.)",
            shared=True,
            valid=lambda a: a > 0,
            allowed="a finite number > 0",
        ),
        "mu12": Parameter(187.0, "TLS transition dipole (a.u.)", shared=True),
        "orientation": Parameter(
            2,
            "dipole axis of the TLS (and of scalar nlevel dipoles): 0, 1 or 2",
            kind=int,
            shared=True,
            valid=lambda a: (a >= 0) & (a <= 2),
            allowed="0 (x), 1 (y) or 2 (z)",
        ),
        "pe_initial": Parameter(
            0.0,
            "initial population of level 1",
            shared=True,
            valid=lambda a: (a >= 0) & (a <= 1),
            allowed="a number in [0, 1]",
        ),
        "e_phase_initial": Parameter(0.0, "initial phase of level 1 (rad)", shared=True),
        "gamma_relax": Parameter(
            0.0,
            "decay rate of excited states to the ground state (a.u.)",
            shared=True,
            mutable=True,
            valid=_nonnegative,
            allowed="a finite number >= 0",
        ),
        "gamma_dephase": Parameter(
            0.0,
            "pure dephasing rate (a.u.; coherences decay at 2 gamma_dephase)",
            shared=True,
            mutable=True,
            valid=_nonnegative,
            allowed="a finite number >= 0",
        ),
        "energies": Parameter(
            None, "nlevel: N - 1 excitation energies (a.u.), a JSON list", kind=str, shared=True
        ),
        "dipoles": Parameter(
            None,
            "nlevel: N - 1 transition dipoles (a.u.), JSON [[x, y, z], ...] or [d, ...]",
            kind=str,
            shared=True,
        ),
        "verbose": Parameter(False, _IGNORED, kind=bool, shared=True),
        "checkpoint": Parameter(
            False, _IGNORED + " (use --checkpoint-dir)", kind=bool, shared=True
        ),
        "restart": Parameter(False, _IGNORED, kind=bool, shared=True),
    }
    example_params: ClassVar[dict[str, Any]] = {
        "preset": "nlevel",
        "energies": "[0.3, 0.45]",
        "dipoles": "[[0.0, 0.5, 1.2], [0.8, 0.0, 0.3]]",
        "pe_initial": 0.3,
        "e_phase_initial": 0.4,
        "gamma_relax": 0.01,
    }
    conformance_rtol: ClassVar[float] = 1e-12

    def __init__(self, n: int = 1, **params: Any) -> None:
        self._given = frozenset(type(self)._canonical_keys(params))
        super().__init__(n, **params)

    @classmethod
    def _canonical_keys(cls, params: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
        out = super()._canonical_keys(params)
        for key in _ARRAY_KEYS:  # lists (Python, TOML) become the JSON text stored
            if key in out and isinstance(out[key][1], list | tuple | np.ndarray):
                name, value = out[key]
                out[key] = (name, json.dumps(np.asarray(value, dtype=float).tolist()))
        return out

    @classmethod
    def _validate(cls, params: dict[str, Any], n: int) -> None:
        given = frozenset(
            k for k in (*_TLS_KEYS, *_ARRAY_KEYS) if params[k] != cls.parameters[k].default
        )
        _build(params, given)

    def _apply_params(self, params: dict[str, Any]) -> None:
        saved = self._given
        self._given = saved | {k for k in _TLS_KEYS if params[k] != self.params[k]}
        try:
            super()._apply_params(params)
        except BaseException:
            self._given = saved
            raise

    def _configure(self) -> None:
        system = _build(self.params, self._given)
        dim = system["H0"].shape[0]
        old_dim: int = self.__dict__.get("_dim", dim)
        if old_dim != dim:
            raise ParameterError(
                f"qutip: the system now has {dim} levels instead of {old_dim}; a "
                "parameter change must not change the number of levels"
            )
        self._dim = dim
        self._system = system
        h0, mu, c_ops = system["H0"], system["mu"], system["c_ops"]
        # Heisenberg operators of the source, flattened so Tr(A rho) = vec(A^T) . vec(rho)
        heis = np.empty((3, dim, dim), dtype=complex)
        comm = np.zeros((3, 3, dim, dim), dtype=complex)
        for k in range(3):
            op = 1j * (h0 @ mu[k] - mu[k] @ h0)
            for c in c_ops:
                cd = c.conj().T
                op = op + cd @ mu[k] @ c - 0.5 * (cd @ c @ mu[k] + mu[k] @ cd @ c)
            heis[k] = op
            for j in range(3):
                comm[j, k] = -1j * (mu[j] @ mu[k] - mu[k] @ mu[j])
        self._heis_t = _flat_t(heis).T.copy()  # (N^2, 3)
        self._comm_t = _flat_t(comm).reshape(9, -1).T.copy() if np.abs(comm).max() > 0 else None
        self._mu_t = _flat_t(mu).T.copy()  # (N^2, 3)
        self._h0_t = _flat_t(h0[None])[0].copy()  # (N^2,)
        self._liouvillian = _superoperator(h0, c_ops)
        axes = system["axes"]
        self._one_axis: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None
        if len(axes) == 1:  # U = V exp(i dt E lambda) V^+ with mu's eigenvectors
            w, v = np.linalg.eigh(mu[axes[0]])
            self._one_axis = (axes[0], w, v, v.conj().T.copy())
        self.extras_keys = (
            "energy_au",
            "mux_au",
            "muy_au",
            "muz_au",
            *(f"P{j}" for j in range(dim)),
            *(("Pe", "Pg", "Pge_real", "Pge_imag") if dim == 2 else ()),
        )

    def _initial_state(self):
        rho = np.broadcast_to(self._system["rho0"], (self.n, self._dim, self._dim)).copy()
        return {"rho": rho}

    def _prepare(self, dt_au: float) -> None:
        self._half_t = scipy.linalg.expm(self._liouvillian * (0.5 * dt_au)).T.copy()

    def _field_unitary(self, fields: np.ndarray) -> np.ndarray | None:
        """U = exp(+i dt E . mu), (n, N, N); None when no axis carries a dipole."""
        dt = self.dt_au
        assert dt is not None
        if self._one_axis is not None:
            k, w, v, vh = self._one_axis
            phase = np.exp(1j * dt * fields[:, k, None] * w[None, :])  # (n, N)
            return (v[None] * phase[:, None, :]) @ vh
        if not self._system["axes"]:
            return None
        m = np.einsum("nk,kab->nab", fields, self._system["mu"])
        w, v = np.linalg.eigh(m)
        phase = np.exp(1j * dt * w)
        return (v * phase[:, None, :]) @ np.swapaxes(v.conj(), -1, -2)

    def _stage_impl(self, state, fields):
        n, dim = self.n, self._dim
        rho = state["rho"].reshape(n, dim * dim) @ self._half_t
        u = self._field_unitary(fields)
        if u is not None:
            rho = (u @ rho.reshape(n, dim, dim) @ np.swapaxes(u.conj(), -1, -2)).reshape(n, -1)
        rho = (rho @ self._half_t).reshape(n, dim, dim)
        rho = 0.5 * (rho + np.swapaxes(rho.conj(), -1, -2))
        flat = rho.reshape(n, -1)
        if self.params["fd_dmudt"]:
            old = (state["rho"].reshape(n, -1) @ self._mu_t).real
            sources = ((flat @ self._mu_t).real - old) / self.dt_au
        else:
            sources = (flat @ self._heis_t).real
            if self._comm_t is not None:
                per = (flat @ self._comm_t).real.reshape(n, 3, 3)  # [j, k]
                sources = sources + np.einsum("nj,njk->nk", fields, per)
        return {"rho": rho}, sources

    def _extras_impl(self, state):
        rho = state["rho"]
        flat = rho.reshape(self.n, -1)
        mu = (flat @ self._mu_t).real
        out = {
            "energy_au": (flat @ self._h0_t).real,
            "mux_au": mu[:, 0].copy(),
            "muy_au": mu[:, 1].copy(),
            "muz_au": mu[:, 2].copy(),
        }
        pops = np.diagonal(rho, axis1=1, axis2=2).real
        out.update({f"P{j}": pops[:, j].copy() for j in range(self._dim)})
        if self._dim == 2:
            out.update(
                Pg=pops[:, 0].copy(),
                Pe=pops[:, 1].copy(),
                Pge_real=rho[:, 0, 1].real.copy(),
                Pge_imag=rho[:, 0, 1].imag.copy(),
            )
        return out
