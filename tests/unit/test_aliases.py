"""Old import paths that users and their scripts name stay importable, as the same module
objects as the new paths (not copies): ``maxwellhub_drivers.models`` -> ``maxwellhub.models``,
and the job, MPI and MPMD modules that moved into ``maxwellhub.run`` and
``maxwellhub.parallel``."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from _util import scaled

import maxwellhub.models

#: The model modules users import by their old path; the optional-package ones need it.
SUBMODULES = {"base": None, "tls": None, "sho": None, "rttddft": "pyscf",
              "open_quantum": "qutip", "ase_md": "ase"}  # fmt: skip


def test_old_package_is_the_new_one():
    import maxwellhub_drivers.models as old
    from maxwellhub_drivers.models import Model, ParameterError, create_model

    assert old is maxwellhub.models
    assert Model is maxwellhub.models.Model and ParameterError is maxwellhub.models.ParameterError
    assert create_model is maxwellhub.models.create_model
    assert old.__spec__ is not None and old.__spec__.name == "maxwellhub.models"


@pytest.mark.parametrize("name", sorted(SUBMODULES))
def test_old_submodules_are_the_new_ones(name):
    needs = SUBMODULES[name]
    if needs:
        pytest.importorskip(needs)
    old = importlib.import_module(f"maxwellhub_drivers.models.{name}")
    new = importlib.import_module(f"maxwellhub.models.{name}")
    assert old is new
    assert sys.modules[f"maxwellhub_drivers.models.{name}"] is new
    assert new.__spec__ is not None and new.__spec__.name == f"maxwellhub.models.{name}"


def test_old_dotted_model_path_names_the_same_class():
    from maxwellhub_drivers.models.tls import TLSModel

    assert TLSModel is maxwellhub.models.tls.TLSModel
    got = maxwellhub.models.get_model_class("maxwellhub_drivers.models.tls:TLSModel")
    assert got is TLSModel


def test_unknown_old_submodule_is_module_not_found():
    with pytest.raises(ModuleNotFoundError, match=r"maxwellhub_drivers\.models\.nope"):
        importlib.import_module("maxwellhub_drivers.models.nope")


def test_old_path_first_in_a_fresh_interpreter():
    """Imported by the old path before anything else: one module under both names."""
    code = (
        "from maxwellhub_drivers.models.sho import SHOModel\n"
        "from maxwellhub_drivers.models import Model\n"
        "import maxwellhub.models.sho as new, maxwellhub.models as pkg\n"
        "assert SHOModel is new.SHOModel and Model is pkg.Model\n"
        "assert issubclass(SHOModel, Model)\n"
        "print('same')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(60)
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "same", proc.stderr[-2000:]


#: Old module path -> new one, for the moved modules that docs and scripts import.
MOVED = {
    "maxwellhub.runner": "maxwellhub.run.runner",
    "maxwellhub.config": "maxwellhub.run.config",
    "maxwellhub.checkpoint": "maxwellhub.run.checkpoint",
    "maxwellhub.launch": "maxwellhub.run.launch",
    "maxwellhub.mpi": "maxwellhub.parallel.mpi",
    "maxwellhub.mpmd": "maxwellhub.parallel.mpmd",
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_modules_keep_their_old_path(old):
    new = importlib.import_module(MOVED[old])
    assert importlib.import_module(old) is new
    assert sys.modules[old] is new and new.__name__ == MOVED[old]


def test_old_names_are_the_same_objects():
    from maxwellhub.launch import start_driver
    from maxwellhub.mpi import comm_world
    from maxwellhub.parallel.mpi import comm_world as new_comm_world
    from maxwellhub.run.launch import start_driver as new_start_driver

    assert start_driver is new_start_driver and comm_world is new_comm_world


def test_python_m_old_mpmd_path_still_runs_the_placeholder():
    """`python -m maxwellhub.mpmd` is the documented MPMD driver-side command."""
    proc = subprocess.run(
        [sys.executable, "-m", "maxwellhub.mpmd", "--help"],
        capture_output=True, text=True, timeout=scaled(60),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "usage: python -m maxwellhub.mpmd COMMAND" in proc.stderr
