"""The compiled speedups: small C extensions with pure-Python fallbacks.

Everything else about the package is in pyproject.toml. Each extension is optional: when
it does not compile (no C compiler or Python headers) the install goes on and the package
runs its pure-Python path; ``./dev.sh setup`` installs gcc and python3-dev, and the test
suite fails when a compiler was there and an extension is missing. See
``maxwellhub.speedups`` for how they are loaded (and MAXWELLHUB_PURE_PYTHON=1 to turn them off).
"""

from setuptools import Extension, setup

CFLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra"]

setup(
    ext_modules=[
        # the hub's steady step: fields out, SOURCEREADY in, over epoll (maxwellhub.hub.steadyio)
        Extension(
            "maxwellhub.net._steadyc",
            ["src/maxwellhub/net/_steadyc.c"],
            extra_compile_args=CFLAGS,
            optional=True,
        ),
        # the single-molecule driver's steady step loop (maxwellhub_drivers.fastloop)
        Extension(
            "maxwellhub_drivers._driverc",
            ["src/maxwellhub_drivers/_driverc.c"],
            extra_compile_args=CFLAGS,
            optional=True,
        ),
    ]
)
