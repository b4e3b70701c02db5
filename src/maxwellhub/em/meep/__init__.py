"""Molecules inside a Meep simulation: field reads, sources, the step function.

Two modules: :mod:`~maxwellhub.em.meep.sites`, the one that touches Meep's internals
(the kernel sites, the DFT accumulators read in place, ``add_srcdata``), and
:mod:`~maxwellhub.em.meep.coupling`, the coupling API (:class:`MeepCoupling`: molecules,
the step function, the per-step MPI exchange, the checkpoint state).

Usage (a 2D cell, one embedded two-level system and one behind a socket driver)::

    import meep as mp
    from maxwellhub import SocketHub
    from maxwellhub.em import MeepCoupling

    sim = mp.Simulation(cell_size=mp.Vector3(8, 8), resolution=10,
                        boundary_layers=[mp.PML(3.0)])
    hub = SocketHub(unixsocket="demo")                 # inert on MPI ranks > 0
    coupling = MeepCoupling(sim, time_units_fs=0.1, hub=hub)
    coupling.add_molecules("tls", centers=[(0, 0)], sigma=0.1, axis="z",
                           omega=0.242, mu12=187.0, orientation=2, pe_initial=1e-4)
    coupling.add_socket_molecules(centers=[(1, 0)], sigma=0.1, axis="z")
    sim.run(coupling.step_function(), until=90)        # or coupling.run(until=90)
    pe = coupling.history()["Pe"]                      # (records, molecules), rank 0

How one step works (Meep calls the step function before each ``fields.step()``, when E
is at t_n and the molecular state at t_n - dt/2): read the kernel-weighted E of every
molecule, step every embedded group with one batched ``model.step`` (and the socket
molecules with one hub barrier), then write the new dmu/dt -- which belongs to
t_n + dt/2, exactly when Meep evaluates electric currents in that step -- into Meep's
source amplitudes. The molecular propagation is a midpoint rule on Meep's leapfrog.

Kernels live on the Yee sites of each field component: a Gaussian of width sigma (cut at
3 sigma) or, with ``sigma=0``, the multilinear "hat" of a point, normalised so that
sum(w) dV = 1 exactly over the sites (in every chunk and on every MPI rank). The field is
read as sum(w E) dV and the current emitted as w dmu/dt at the very same sites: read and
emission are exact transposes for every component.

Reading fields: ``sim.get_array`` costs about 40 ns per point and 5 us per call in Meep
1.25 (it interpolates to the centred grid through a generic per-point loop). Instead,
molecules are grouped into a few boxes, and each box has a zero-frequency DFT monitor on
the Yee grid updated every step: Meep's own C loop then adds E(t_{n+1}) * scale to the
monitor's accumulator at the end of each step. We view that accumulator with numpy
(``dft_chunk.dft`` is a raw ``complex<double>*``), read it and zero it: O(1) Python calls
per step (the tests check the view against ``get_field_point``). What a site costs per step
(measured, Meep 1.25): the DFT update about 3 ns and the source about 1 ns inside
``fields.step()``, our copy and zeroing about 1 ns, ``add_srcdata`` about 2 ns; one kernel
weight costs about 0.6 ns in each of the two sparse products (read and emission).

Updating source amplitudes in Meep 1.25 (what we found): ``fields.add_srcdata`` copies
the amplitudes into the C++ ``src_vol`` and nothing exposes them for writing; the index
vector of a ``sourcedata`` cannot be built from Python (only Meep fills it, e.g.
``dft_fields.fourier_sourcedata``); per-molecule ``CustomSource`` time functions cost 4-6
Python callbacks per molecule per step (MaxwellLink's way); ``change_sources`` rebuilds
everything, the user's sources included. But ``fields_chunk::add_source`` *combines* a
new ``src_vol`` with an existing one of the same component, time function and index
vector by adding the amplitudes in place (``src_vol::combinable`` /
``add_amplitudes_from``). So ``fourier_sourcedata`` of the same DFT monitor (each site's
position encoded in the amplitudes it returns) gives every chunk's Yee-site indices once,
in the monitor's order; we add one ``src_vol`` per box, chunk and component whose time
function is the constant 1 (one shared ``CustomSource``: a few callbacks per step in
all), and every step call ``add_srcdata`` once per box, chunk and component with
new - current amplitudes: O(1) Python calls per step, O(sites) C work, the user's own
sources untouched. We mirror what Meep holds, so the rounding of the increments never
accumulates. Consequences: do not call ``change_sources``, ``reset_meep`` or
``restart_fields`` once the molecules are coupled (detected: the step raises), and
``until_after_sources`` never ends (the molecule sources never stop).

Checkpoints (:mod:`maxwellhub.checkpoint`): between steps the coupling's whole state is a
dict of arrays (:meth:`MeepCoupling.checkpoint_state`); :meth:`MeepCoupling.restore_state`
rebuilds the sites, zeroes the DFT accumulators and adds the saved amplitudes to Meep's
zero ones, so Meep holds exactly the mirrored values and a resumed run is bitwise the
uninterrupted one (Meep's own ``dump_fields``/``load_fields`` carry the fields). Under
MPI each rank saves and restores the amplitudes of its own chunks' sites, and a stop
request (:attr:`MeepCoupling.stop_request`, set by a signal handler on any rank) rides in
the per-step Reduce to rank 0, whose decision every rank reads from the per-step Bcast
(:attr:`MeepCoupling.stop_agreed`): all ranks stop at the same step.

This module never makes a Python call per molecule or per grid point in a step (except
the hub's per-socket-molecule requests), never talks to the hub on MPI ranks other than 0,
never pickles (amplitudes reach the other ranks with ``Bcast``), and never converts units
itself (the factors of :mod:`maxwellhub.units` are folded into the kernel matrices once).
The step reuses preallocated site- and molecule-sized arrays: fresh ones of 10^4 molecules
made malloc give pages back to the kernel and fault them in again every step. Meep is
imported lazily.
"""

from __future__ import annotations

from .coupling import MeepCoupling
from .sites import component_axis

__all__ = ["MeepCoupling", "component_axis"]
