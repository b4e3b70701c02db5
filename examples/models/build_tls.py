"""A two-level system as a ``build_model(**kwargs)`` file in MaxwellLink 0.5.0's form.

Run it with the ``qutip`` model, MaxwellLink's parameters unchanged::

    maxwellhub-driver --unix demo --model qutip --param "preset=custom,
        module=examples/models/build_tls.py, fd_dmudt=false,
        kwargs=omega=0.242,mu12=187,orientation=2,pe_initial=1e-4,gamma_relax=1e-3"

Atomic units. H0 = omega |e><e|; dipole mu12 (|g><e| + |e><g|) along ``orientation``
(0 x, 1 y, 2 z); Lindblad operators sqrt(gamma_relax) |g><e| (population decay at
gamma_relax) and sqrt(gamma_dephase) (|e><e| - |g><g|) (coherence decay at
2 gamma_dephase); initial state sqrt(1 - pe) |g> + sqrt(pe) exp(i phase) |e>.
"""

import numpy as np
import qutip as qt


def build_model(
    omega=0.242,
    mu12=187.0,
    orientation=2,
    pe_initial=0.0,
    e_phase_initial=0.0,
    gamma_relax=0.0,
    gamma_dephase=0.0,
):
    ground, excited = qt.basis(2, 0), qt.basis(2, 1)
    lower = ground * excited.dag()
    dipole = mu12 * (lower + lower.dag())
    mu_ops = {axis: (dipole if k == orientation else None) for k, axis in enumerate("xyz")}
    c_ops = []
    if gamma_relax > 0:
        c_ops.append(np.sqrt(gamma_relax) * lower)
    if gamma_dephase > 0:
        c_ops.append(np.sqrt(gamma_dephase) * (excited * excited.dag() - ground * ground.dag()))
    state = (
        np.sqrt(1.0 - pe_initial) * ground
        + np.sqrt(pe_initial) * np.exp(1j * e_phase_initial) * excited
    )
    return dict(H0=omega * excited * excited.dag(), mu_ops=mu_ops, c_ops=c_ops, rho0=state)
