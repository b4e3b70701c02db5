"""Old path of :mod:`maxwellhub.run.runner`, kept for scripts that import it: importing it
gives that very module (the same objects), not a copy."""

import sys

from maxwellhub.run import runner as _module
from maxwellhub.run.runner import *  # noqa: F403  (its names, for type checkers)

sys.modules[__name__] = _module
