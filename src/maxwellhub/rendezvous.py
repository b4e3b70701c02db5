"""Old path of :mod:`maxwellhub.net.rendezvous`, kept for code that imports it: importing it
gives that very module (the same objects), not a copy."""

import sys

from maxwellhub.net import rendezvous as _module
from maxwellhub.net.rendezvous import *  # noqa: F403  (its names, for type checkers)

sys.modules[__name__] = _module
