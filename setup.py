"""Package discovery for setuptools (everything else is in pyproject.toml).

The driver code lives in ``drivers/`` but is imported as ``maxwellhub_drivers`` (the
``package-dir`` mapping in pyproject.toml), which ``[tool.setuptools.packages.find]``
cannot express: it names packages after their directories. So both trees are found here,
and a new subpackage ships in the wheel without editing a list.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["maxwellhub", "maxwellhub.*"])
packages += ["maxwellhub_drivers"] + [
    f"maxwellhub_drivers.{name}" for name in find_packages("drivers")
]

setup(packages=packages)
