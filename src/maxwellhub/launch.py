"""Old path of :mod:`maxwellhub.run.launch`, kept for scripts that import it: importing it
gives that very module (the same objects), not a copy."""

import sys

from maxwellhub.run import launch as _module
from maxwellhub.run.launch import *  # noqa: F403  (its names, for type checkers)

sys.modules[__name__] = _module
