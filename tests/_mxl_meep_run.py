"""Run MaxwellLink 0.5.0's Meep solver with one socket TLS on a chosen hub; print JSON.

Runs inside the peer venv .peers/maxwelllink-meep (Debian's Meep, maxwelllink==0.5.0),
with the repository's src/ on PYTHONPATH so that ``--hub ours`` imports this worktree's
maxwellhub. Usage:

    python tests/_mxl_meep_run.py --hub ours|theirs --unix NAME [--until 3]

It builds the hub (MaxwellLink's documented API: ``SocketHub(unixsocket=NAME, timeout=...,
latency=...)``), a socket ``maxwelllink.Molecule(hub=hub, ...)`` in a
``maxwelllink.MeepSimulation(hub=hub, molecules=[...])``, starts MaxwellLink's own
``mxl_driver --unix --address NAME --model tls`` and runs; then it prints one line
``RESULT {...}`` with every number of the molecule's trajectory as float.hex (bitwise
comparable) and the compatibility attributes it read from the hub.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

TLS = "omega=0.242, mu12=187, orientation=2, pe_initial=1e-2"


def _hexed(value):
    """Return value with every float (and numpy scalar/array) as float.hex text."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _hexed(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_hexed(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_hexed(v) for v in value.tolist()]
    if isinstance(value, complex | np.complexfloating):
        return [float(value.real).hex(), float(value.imag).hex()]
    if isinstance(value, float | np.floating):
        return float(value).hex()
    if isinstance(value, np.integer):
        return int(value)
    return value


def main() -> None:
    """Run one coupled simulation and print its trajectory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hub", choices=("ours", "theirs"), required=True)
    parser.add_argument("--unix", required=True)
    parser.add_argument("--until", type=float, default=3.0)
    args = parser.parse_args()

    import maxwelllink as mxl
    import meep as mp

    mp.verbosity(0)
    hub_class: Any = mxl.SocketHub
    if args.hub == "ours":
        from maxwellhub import SocketHub

        hub_class = SocketHub
    hub = hub_class(unixsocket=args.unix, timeout=60.0, latency=1e-5)
    attrs: dict[str, Any] = {
        "type": f"{type(hub).__module__}.{type(hub).__qualname__}",
        "unixsocket_path": hub.unixsocket_path,
        "paused_before": hub.paused,
    }
    driver = Path(sys.executable).parent / "mxl_driver"
    proc = subprocess.Popen(
        [str(driver), "--unix", "--address", args.unix, "--model", "tls", "--param", TLS],
        stdout=subprocess.DEVNULL,
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # MaxwellLink prints per molecule
            molecule = mxl.Molecule(
                hub=hub,
                center=mp.Vector3(0, 0, 0),
                size=mp.Vector3(1, 1, 1),
                sigma=0.1,
                dimensions=2,
                resolution=10,
                polarization_type="numerical",
            )
            sim = mxl.MeepSimulation(
                cell_size=mp.Vector3(8, 8, 0),
                geometry=[],
                sources=[],
                boundary_layers=[mp.PML(3.0)],
                resolution=10,
                time_units_fs=0.1,
                hub=hub,
                molecules=[molecule],
            )
            sim.run(until=args.until)
        attrs["expected"] = sorted(hub.expected)
        attrs["paused_after"] = hub.paused
        field = sim.get_field_point(mp.Ez, mp.Vector3(0.5, 0.3, 0))
        result = {
            "hub": attrs,
            "steps": len(molecule.additional_data_history),
            "history": _hexed(list(molecule.additional_data_history)),
            "ez": _hexed(complex(field)),
        }
    finally:
        with contextlib.suppress(Exception):
            hub.stop()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    result["driver_exit"] = proc.returncode
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # MPI finalisation in Debian's Meep can linger; the result is out


if __name__ == "__main__":
    main()
