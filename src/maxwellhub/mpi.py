"""Old path of :mod:`maxwellhub.parallel.mpi`, kept for scripts that import it: importing it
gives that very module (the same objects), not a copy."""

import sys

from maxwellhub.parallel import mpi as _module
from maxwellhub.parallel.mpi import *  # noqa: F403  (its names, for type checkers)

sys.modules[__name__] = _module
