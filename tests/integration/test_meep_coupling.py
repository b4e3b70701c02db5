"""Molecules in real Meep: field reads, spontaneous emission in 1D/2D/3D, superradiance,
energy conservation (embedded models; socket and MPI runs are in test_meep_transport.py).

Reference numbers: the physics table of docs/performance.md (tau = 0.1 fs, resolution 10,
Gaussian sigma 0.1).
Every run prints its measured errors (pytest -s shows them).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from maxwellhub.analysis import compare_to_curve, fit_decay_rate, golden_rule_rate
from maxwellhub.errors import UsageError
from maxwellhub.units import MeepUnits

mp = pytest.importorskip("meep")
from maxwellhub.em import MeepCoupling  # noqa: E402  (needs meep)

pytestmark = pytest.mark.meep
UNITS = MeepUnits(0.1)
OMEGA_AU, MU_AU = 0.242, 187.0


def setup_module() -> None:
    mp.verbosity(0)


def _cell(kind: str):
    """(simulation, axis, TLS orientation, dimensions of the golden rule) for a case."""
    if kind == "1d":  # MaxwellLink's 1D: a 2D cell without y extent, Ez
        return (
            mp.Simulation(cell_size=mp.Vector3(8, 0), resolution=10, boundary_layers=[mp.PML(3.0)]),
            "z",
            2,
            1,
        )
    if kind == "1d-z":  # Meep's own 1D cell along z, Ex
        return (
            mp.Simulation(
                cell_size=mp.Vector3(0, 0, 8),
                dimensions=1,
                resolution=10,
                boundary_layers=[mp.PML(3.0)],
            ),
            "x",
            0,
            1,
        )
    if kind == "2d":
        return (
            mp.Simulation(cell_size=mp.Vector3(8, 8), resolution=10, boundary_layers=[mp.PML(3.0)]),
            "z",
            2,
            2,
        )
    raise ValueError(kind)


def _relax(
    sim, axis, orientation, *, p0, until, n=1, mu_au=MU_AU, omega_au=OMEGA_AU, sigma=0.1, **options
):
    """Run n identical TLS at the origin; return (time in Meep units, Pe (T, n))."""
    coupling = MeepCoupling(sim, time_units_fs=0.1, **options)
    coupling.add_molecules(
        "tls",
        centers=[(0, 0, 0)] * n,
        sigma=sigma,
        axis=axis,
        omega=omega_au,
        mu12=mu_au,
        orientation=orientation,
        pe_initial=p0,
    )
    sim.run(coupling.step_function(), until=until)
    history = coupling.history()
    return UNITS.time_au_to_meep(history["time_au"][:, 0]), history["Pe"]


def _report(label, t, pe, dims, omega_au=OMEGA_AU, mu_au=MU_AU, sigma=0.1):
    omega = UNITS.frequency_au_to_meep(omega_au)
    mu = UNITS.dipole_au_to_meep(mu_au)
    gamma = golden_rule_rate(dims, omega, mu)
    errors = compare_to_curve(t, pe, gamma)
    fitted = fit_decay_rate(t, pe)
    kernel_gamma = golden_rule_rate(dims, omega, mu, sigma=sigma)
    print(
        f"\n{label}: std {errors['std']:.2e} max {errors['max']:.2e} | fitted gamma "
        f"{fitted:.5g} golden rule {gamma:.5g} ({fitted / gamma - 1:+.2%}), with the "
        f"kernel's form factor {kernel_gamma:.5g} ({fitted / kernel_gamma - 1:+.2%})"
    )
    return errors, fitted, kernel_gamma


# ---------------------------------------------------------------- reading the field


@pytest.mark.parametrize("dims, axis", [(2, "z"), (2, "x"), (3, "xyz"), (1, "x")])
def test_point_kernel_reads_meeps_interpolated_field(dims, axis):
    """A point-kernel molecule reads exactly Meep's get_field_point at its centre (the
    DFT-buffer view, the site decoding and the time alignment are right)."""
    cell = {1: mp.Vector3(0, 0, 4), 2: mp.Vector3(4, 4), 3: mp.Vector3(2, 2, 2)}[dims]
    center = {
        1: mp.Vector3(0, 0, 0.137),
        2: mp.Vector3(0.137, -0.211),
        3: mp.Vector3(0.137, -0.211, 0.06),
    }[dims]
    components = [{"x": mp.Ex, "y": mp.Ey, "z": mp.Ez}[a] for a in axis]
    sources = [
        mp.Source(
            mp.ContinuousSource(frequency=0.4, width=0.5),
            component=c,
            center=mp.Vector3(0, 0, -0.5) if dims == 1 else mp.Vector3(-0.4, 0.3),
        )
        for c in components
    ]
    sim = mp.Simulation(cell_size=cell, dimensions=dims, resolution=10, sources=sources)
    coupling = MeepCoupling(sim, time_units_fs=0.1)
    coupling.add_molecules("tls", centers=[center], sigma=0, axis=axis, mu12=0.0)
    seen = []

    def compare(sim):
        read = UNITS.efield_au_to_meep(coupling.fields_au[0])
        direct = [sim.get_field_point(c, center).real for c in components]
        seen.append(([read["xyz".index(a)] for a in axis], direct))

    sim.run(coupling.step_function(), compare, until=3)
    read, direct = (np.array(x) for x in zip(*seen, strict=True))
    assert np.abs(direct).max() > 1e-3
    np.testing.assert_allclose(read, direct, rtol=0, atol=1e-12 * np.abs(direct).max())


# ---------------------------------------------------------------- spontaneous emission


@pytest.mark.parametrize("kind, p0", [("1d", 0.1), ("1d-z", 0.1), ("2d", 1e-4)])
def test_spontaneous_emission_1d_2d(kind, p0):
    """A TLS relaxes on the golden-rule curve: std < 3e-3, max < 8e-3 (relative to P0),
    and the fitted rate is within 1% of the Gaussian kernel's golden-rule rate (the
    point-dipole rate is 0.8% (1D) and 1.7% (2D) higher: the kernel's form factor)."""
    sim, axis, orientation, dims = _cell(kind)
    t, pe = _relax(sim, axis, orientation, p0=p0, until=90)
    errors, fitted, kernel_gamma = _report(kind, t, pe[:, 0], dims)
    assert errors["std"] < 3e-3 and errors["max"] < 8e-3
    assert fitted == pytest.approx(kernel_gamma, rel=1e-2)


def test_ten_molecules_at_one_point_reproduce_one():
    """10 TLS at one point with mu/sqrt(10) each relax like one TLS with mu (2D)."""
    sim, axis, orientation, dims = _cell("2d")
    t, pe = _relax(sim, axis, orientation, p0=1e-4, until=90, n=10, mu_au=MU_AU / np.sqrt(10))
    sim1, *_ = _cell("2d")
    _, single = _relax(sim1, axis, orientation, p0=1e-4, until=90)
    errors, _, _ = _report("2d, 10 at one point", t, pe[:, 0], dims)
    assert errors["std"] < 3e-3 and errors["max"] < 8e-3
    np.testing.assert_allclose(pe, np.repeat(single, 10, axis=1), rtol=0, atol=1e-12)


def test_spontaneous_emission_3d():
    """3D (cell 3, PML 1, omega 0.484 a.u., mu 0.1 Meep along x, P0 0.1, until 40):
    std < 1e-2 and max < 3e-2 -- because each molecule's own Coulomb field is removed;
    with it the error is MaxwellLink's (std ~ 0.08, max ~ 0.2)."""

    def run(subtract):
        sim = mp.Simulation(
            cell_size=mp.Vector3(3, 3, 3), resolution=10, boundary_layers=[mp.PML(1.0)]
        )
        return _relax(
            sim,
            "x",
            0,
            p0=0.1,
            until=40,
            omega_au=0.484,
            mu_au=UNITS.dipole_meep_to_au(0.1),
            subtract_self_coulomb=subtract,
        )

    t, pe = run(True)
    errors, _, _ = _report("3d", t, pe[:, 0], 3, omega_au=0.484, mu_au=UNITS.dipole_meep_to_au(0.1))
    assert errors["std"] < 1e-2 and errors["max"] < 3e-2
    t, pe = run(False)
    raw, _, _ = _report(
        "3d with the self Coulomb field",
        t,
        pe[:, 0],
        3,
        omega_au=0.484,
        mu_au=UNITS.dipole_meep_to_au(0.1),
    )
    assert raw["std"] > 3e-2


# ---------------------------------------------------------------- energy


def test_sho_and_field_conserve_energy():
    """An SHO in a closed, lossless 2D cell: field energy + oscillator energy stays within
    2.5e-3 of its initial value over 4000 steps while 6% of it sloshes into the field,
    and the mean does not drift (first vs last tenth: < 2e-4). The bound is the O(dt)
    staggering of E (t_n), H (t_n - dt/2) and the oscillator's reported energy (averaged
    over the two records around t_n), not a loss."""
    sim = mp.Simulation(cell_size=mp.Vector3(2, 2), resolution=10)
    coupling = MeepCoupling(sim, time_units_fs=0.1)
    coupling.add_molecules(
        "sho",
        centers=[(0.03, -0.02)],
        sigma=0.1,
        axis="z",
        omega=0.242,
        mu0=187.0,
        orientation=2,
        p_initial=1.0,
    )
    energies = []

    def field_energy(sim):
        field = sim.field_energy_in_box(center=mp.Vector3(), size=mp.Vector3(2, 2))
        energies.append(UNITS.frequency_meep_to_au(field))

    sim.run(coupling.step_function(), field_energy, until=4000 * 0.05)
    molecule = coupling.history()["energy_au"][:, 0]
    n = min(len(energies), len(molecule)) - 1
    field = np.array(energies[1:n])
    e = field + 0.5 * (molecule[: n - 1] + molecule[1:n])
    deviation = np.abs(e - e[0]) / e[0]
    tenth = len(e) // 10
    drift = abs(e[-tenth:].mean() - e[:tenth].mean()) / e[0]
    print(
        f"\nSHO: field share {field.max() / e[0]:.3f}, max |E - E0| / E0 "
        f"{deviation.max():.2e}, drift of the mean {drift:.1e}"
    )
    assert field.max() > 0.05 * e[0]  # the oscillator really exchanges energy
    assert deviation.max() < 2.5e-3
    assert drift < 2e-4


# ---------------------------------------------------------------- misuse


@pytest.mark.parametrize("kernels", [True, False])
def test_sparse_products_match_scipy(kernels, monkeypatch):
    """The adaptor's sparse products (scipy's C kernels called directly, or scipy's @ when
    they cannot be imported) equal scipy's, with rows restricted to the coupled blocks."""
    from maxwellhub.em.meep import sites as adaptor

    if not kernels:
        monkeypatch.setattr(adaptor, "_csr_matvec", None)
    rng = np.random.default_rng(0)
    block = sp.random(10, 50, density=0.2, format="csr", random_state=rng)
    matrix = sp.vstack([sp.csr_matrix((10, 50)), block, sp.csr_matrix((10, 50))]).tocsr()
    x, y = rng.normal(size=50), rng.normal(size=30)
    y[:10] = y[20:] = 0.0  # the products only use the rows in range
    out_read, out_emit = np.full(30, np.nan), np.full(50, np.nan)
    out_read[:10] = out_read[20:] = 0.0
    rows = slice(10, 20)
    np.testing.assert_allclose(
        adaptor._matvec(matrix, x, out_read, rows), matrix @ x, rtol=1e-14, atol=1e-14
    )
    np.testing.assert_allclose(
        adaptor._matvec(matrix, y, out_emit, rows, transposed=True),
        matrix.T @ y,
        rtol=1e-14,
        atol=1e-14,
    )


def test_misuse_is_refused():
    """Kernels outside the cell, bad axes and late additions are usage errors."""
    sim = mp.Simulation(cell_size=mp.Vector3(2, 2), resolution=10)
    coupling = MeepCoupling(sim)
    with pytest.raises(UsageError, match="axis"):
        coupling.add_molecules("tls", centers=[(0, 0)], axis="w")
    coupling.add_molecules("tls", centers=[(0.95, 0)], sigma=0.1)
    with pytest.raises(UsageError, match="outside the cell"):
        sim.run(coupling.step_function(), until=0.1)
    sim = mp.Simulation(cell_size=mp.Vector3(2, 2), resolution=10)
    coupling = MeepCoupling(sim)
    coupling.add_molecules("tls", centers=[(0, 0)])
    sim.run(coupling.step_function(), until=0.1)
    with pytest.raises(UsageError, match="before the run"):
        coupling.add_molecules("tls", centers=[(0.5, 0)])
