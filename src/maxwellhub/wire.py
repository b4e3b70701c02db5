"""Old path of :mod:`maxwellhub.protocol.wire`, kept for code that imports it: importing it
gives that very module (the same objects), not a copy."""

import sys

from maxwellhub.protocol import wire as _module
from maxwellhub.protocol.wire import *  # noqa: F403  (its names, for type checkers)

sys.modules[__name__] = _module
