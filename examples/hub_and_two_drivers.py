"""A hub and two drivers, no Meep (the README example).

Run: .venv/bin/python examples/hub_and_two_drivers.py
"""

import json
import subprocess

import numpy as np

from maxwellhub import SocketHub

DRIVER = ["maxwellhub-driver", "--unix", "readme_example", "--param", "omega=0.242"]
with SocketHub(unixsocket="readme_example", timeout=30) as hub:  # /tmp/socketmxl_readme_example
    ids = [hub.register_molecule_return_id() for _ in range(2)]  # molecules 0 and 1
    drivers = [subprocess.Popen([*DRIVER, "--model", m]) for m in ("tls", "sho")]
    hub.wait_until_bound({m: {"dt_au": 0.5} for m in ids})  # INIT carries dt_au and the id
    for step in range(3):
        field = np.array([0.0, 0.0, 1e-3 * np.sin(0.242 * 0.5 * step)])  # E at each molecule, a.u.
        results = hub.step({m: {"efield_au": field} for m in ids})  # one barrier step
        for m in ids:
            extras = json.loads(results[m]["extra"])
            print(step, m, "dmu/dt =", results[m]["amp"], "time_au =", extras["time_au"])
for d in drivers:
    d.wait(timeout=10)  # drivers exit 0 after STOP
