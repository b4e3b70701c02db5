"""Old path of :mod:`maxwellhub.parallel.mpmd`, kept for scripts that import it (importing
it gives that very module) and as the documented MPMD placeholder command
``python -m maxwellhub.mpmd COMMAND...``."""

import sys

if __name__ == "__main__":
    from maxwellhub.parallel.mpmd import main

    sys.exit(main())
else:
    from maxwellhub.parallel import mpmd as _module
    from maxwellhub.parallel.mpmd import *  # noqa: F403  (its names, for type checkers)

    sys.modules[__name__] = _module
