"""The single-mode cavity through :class:`EngineCoupling`: the vacuum Rabi splitting
2 g sqrt(N) in both gauges with the molecules embedded and behind the hub (ensemble
drivers), and embedded = sockets for every engine that takes dipoles."""

from __future__ import annotations

import math
import subprocess
from typing import Any

import numpy as np
import pytest
from _util import scaled

from maxwellhub import SocketHub
from maxwellhub.em import EngineCoupling, MultimodeCavity, SingleModeCavity
from maxwellhub.rabi import rabi_splitting_from_trajectory
from maxwellhub.run.launch import driver_command, driver_env, reap

OMEGA, MU12, DT, STEPS = 0.242, 187.0, 0.5, 4000
RATIO = 0.05  # g sqrt(N) / omega_c


def _eps(n: int) -> float:
    """Coupling strength eps giving g sqrt(N) = RATIO omega_c, g = eps mu12 / sqrt(2 omega_c)."""
    return RATIO * OMEGA * math.sqrt(2 * OMEGA) / (MU12 * math.sqrt(n))


def _cavity(n: int, gauge: str) -> SingleModeCavity:
    return SingleModeCavity(
        frequency_au=OMEGA,
        damping_au=0.0,
        coupling_strength=_eps(n),
        coupling_axis="z",
        include_dse=gauge == "dipole",
        gauge=gauge,
    )


# Model parameters, as add_molecules(**params: Any) takes them.
TLS: dict[str, Any] = {"omega": OMEGA, "mu12": MU12, "orientation": 2, "pe_initial": 1e-6}


def _drivers(name: str, n: int, per: int, params_file) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            driver_command(
                "tls",
                None,
                unix=name,
                timeout=60,
                extra_args=["--molecules", str(min(per, n - k)), "--params-file", str(params_file)],
            ),
            env=driver_env(),
        )
        for k in range(0, n, per)
    ]


def _run(n: int, gauge: str, where: str, tmp_path, name: str) -> EngineCoupling:
    """4000 steps of N TLS in the cavity, embedded or in ensemble drivers (2 at most)."""
    if where == "embedded":
        coupling = EngineCoupling(_cavity(n, gauge), DT, record_every=0)
        coupling.add_molecules("tls", n=n, **TLS)
        coupling.run(steps=STEPS)
        return coupling
    import json

    params = tmp_path / "tls.json"
    params.write_text(json.dumps(TLS))
    hub = SocketHub(unixsocket=name)
    procs = []
    try:
        coupling = EngineCoupling(_cavity(n, gauge), DT, hub=hub, record_every=0)
        coupling.add_socket_molecules(n=n)
        procs = _drivers(name, n, max(1, (n + 1) // 2), params)
        coupling.run(steps=STEPS)
        return coupling
    finally:
        hub.stop()
        reap(procs, 10.0)


@pytest.mark.parametrize("gauge", ["dipole", "velocity"])
@pytest.mark.parametrize(
    ("n", "where"),
    [(1, "embedded"), (10, "embedded"), (1000, "embedded"), (1, "hub"), (10, "hub"), (1000, "hub")],
)
def test_vacuum_rabi_splitting(n, where, gauge, tmp_path, unix_name):
    """N resonant TLS, weakly excited, g sqrt(N)/omega_c = 0.05: the fitted splitting of
    q_c(t) is 2 g sqrt(N) within 1% and the polaritons sit at
    sqrt(omega_c^2 + g^2 N) -/+ g sqrt(N) (dipole gauge with the DSE; velocity gauge)."""
    coupling = _run(n, gauge, where, tmp_path, unix_name)
    qc = coupling.history()["engine/qc_au"][:, 2]
    fit = rabi_splitting_from_trajectory(qc, DT)
    gn = RATIO * OMEGA
    centre = math.sqrt(OMEGA**2 + gn**2)
    print(
        f"N={n} {where} {gauge}: splitting {fit.splitting:.6f} expected {2 * gn:.6f} "
        f"error {fit.splitting / (2 * gn) - 1:+.2e}"
    )
    assert abs(fit.splitting / (2 * gn) - 1) < 0.01
    assert abs(fit.lower - (centre - gn)) < 1e-3 * OMEGA
    assert abs(fit.upper - (centre + gn)) < 1e-3 * OMEGA


@pytest.mark.parametrize("engine", ["cavity", "cavity-velocity", "multimode"])
def test_embedded_equals_sockets(engine, tmp_path, unix_name):
    """The same 300 steps with 5 TLS and 2 SHO embedded and in drivers (one ensemble of
    TLS, one SHO driver per molecule): molecules' records and the engine's to 1e-12."""
    import json

    def make():
        if engine == "multimode":
            return MultimodeCavity(
                length_au=2000.0,
                n_modes=3,
                coupling_strength=1e-3,
                coupling_axis="z",
                include_dse=True,
            )
        return SingleModeCavity(
            frequency_au=OMEGA,
            damping_au=1e-4,
            coupling_strength=2e-4,
            coupling_axis="z",
            include_dse=engine == "cavity",
            gauge="velocity" if engine.endswith("velocity") else "dipole",
            drive=lambda t: 1e-3 * math.sin(0.2 * t),
        )

    tls = dict(TLS, pe_initial=0.05)
    sho: dict[str, Any] = {"omega": 0.2, "mu0": 1.5, "orientation": 2, "q_initial": 0.3}
    xs = np.linspace(100.0, 1900.0, 7)
    runs = []
    for socket in (False, True):
        hub = SocketHub(unixsocket=unix_name) if socket else None
        procs = []
        try:
            coupling = EngineCoupling(make(), DT, hub=hub, record_every=10)
            if hub is not None:
                coupling.add_socket_molecules(positions=xs[:5])
                coupling.add_socket_molecules(positions=xs[5:])
                (tmp_path / "tls.json").write_text(json.dumps(tls))
                (tmp_path / "sho.json").write_text(json.dumps(sho))
                for mid in range(7):
                    hub.register_molecule(mid)
                # the TLS ensemble first, bound to ids 0-4, then the SHO drivers (5, 6)
                procs = _drivers(unix_name, 5, 5, tmp_path / "tls.json")
                assert hub.wait_until_bound(list(range(5)), require_init=False, timeout=scaled(60))
                procs += [
                    subprocess.Popen(
                        driver_command(
                            "sho",
                            None,
                            unix=unix_name,
                            timeout=60,
                            extra_args=["--params-file", str(tmp_path / "sho.json")],
                        ),
                        env=driver_env(),
                    )
                    for _ in range(2)
                ]
            else:
                coupling.add_molecules("tls", positions=xs[:5], **tls)
                coupling.add_molecules("sho", positions=xs[5:], **sho)
            coupling.run(steps=300)
            runs.append(coupling.history())
        finally:
            if hub is not None:
                hub.stop()
            reap(procs, 10.0)
    emb, sock = runs
    for key in ("mux_au", "muz_au", "energy_au", "engine/qc_au", "engine/mu_total_au"):
        diff = np.nanmax(np.abs(emb[key] - sock[key]))
        assert diff <= 1e-12, (key, diff)
    assert np.ptp(emb["engine/qc_au"]) > 0


def test_cavity_through_a_relay_equals_embedded(tmp_path, unix_name):
    """100 TLS in an ensemble driver behind a relay, in a cavity (dipole gauge with DSE):
    the cavity's q_c and the molecules' dipoles equal the embedded run's to 1e-12."""
    from test_relay import start_relay

    from maxwellhub.run.launch import start_driver

    n, steps = 100, 400
    tls = dict(TLS, pe_initial=1e-3)
    emb = EngineCoupling(_cavity(n, "dipole"), DT, record_every=50)
    emb.add_molecules("tls", n=n, **tls)
    emb.run(steps=steps)
    hub = SocketHub(unixsocket=unix_name)
    listen = f"{unix_name}_r"
    relay, log = start_relay(tmp_path, listen, n, ["--unix", unix_name])
    proc = start_driver(
        "tls", tls, timeout=scaled(30), unix=listen, extra_args=["--molecules", str(n)]
    )
    try:
        relayed = EngineCoupling(_cavity(n, "dipole"), DT, hub=hub, record_every=50)
        relayed.add_socket_molecules(n=n)
        relayed.run(steps=steps)
    finally:
        hub.stop()
        codes = reap([relay, proc], scaled(10))
    assert codes == [0, 0], log.read_text()[-2000:]
    a, b = emb.history(), relayed.history()
    for key in ("engine/qc_au", "engine/mu_total_au", "muz_au", "Pe"):
        # 1e-12 relative: a sum over 100 dipoles may round in another order
        scale = max(1.0, float(np.nanmax(np.abs(a[key]))))
        assert np.nanmax(np.abs(a[key] - b[key])) <= 1e-12 * scale, key
