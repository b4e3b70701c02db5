"""maxwellhub_drivers: the driver process and its molecular models.

- the models live in :mod:`maxwellhub.models` (the model interface, the built-in ``tls``
  and ``sho`` models and the registry, usable embedded, without any socket);
  ``maxwellhub_drivers.models`` and its modules stay importable as the same modules
  (:mod:`maxwellhub_drivers._aliases`);
- :mod:`maxwellhub_drivers.client`: the blocking client loop, :func:`run_client`;
- :mod:`maxwellhub_drivers.cli`: the ``maxwellhub-driver`` console script.

Importing this package limits BLAS/OpenMP to one thread unless the environment already
says otherwise: many drivers share a machine, and a per-process thread pool would
oversubscribe it. It must run before numpy is imported, so nothing above imports numpy.
"""

import os

#: Thread-count variables of the BLAS/OpenMP runtimes numpy may load.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

for _var in THREAD_ENV_VARS:
    os.environ.setdefault(_var, "1")
del _var

from . import _aliases  # noqa: E402, F401  (the old maxwellhub_drivers.models paths)
