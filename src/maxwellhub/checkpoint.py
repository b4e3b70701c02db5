"""Old path of :mod:`maxwellhub.run.checkpoint`, kept for scripts that import it: importing it
gives that very module (the same objects), not a copy."""

import sys

from maxwellhub.run import checkpoint as _module
from maxwellhub.run.checkpoint import *  # noqa: F403  (its names, for type checkers)

sys.modules[__name__] = _module
