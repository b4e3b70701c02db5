"""Old path of :mod:`maxwellhub.run.config`, kept for scripts that import it: importing it
gives that very module (the same objects), not a copy."""

import sys

from maxwellhub.run import config as _module
from maxwellhub.run.config import *  # noqa: F403  (its names, for type checkers)

sys.modules[__name__] = _module
