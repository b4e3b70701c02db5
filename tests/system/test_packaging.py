"""The package installs like any other: a wheel built from the tree carries every package,
the default config and the typing markers, and once installed in a fresh venv (Debian's
Meep from the system site, nothing from this tree) `maxwellhub run` with no argument runs
the default main job from an empty directory.

Offline: the wheel is built with the current venv's setuptools (--no-build-isolation) and
installed with --no-deps --no-index; the fresh venv sees only the system site packages
(numpy, Meep, h5py, matplotlib), which is all the main job needs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from _util import REPO_ROOT, scaled

pytestmark = [pytest.mark.slow, pytest.mark.meep]

SYSTEM_PYTHON = Path("/usr/bin/python3")


def _clean_env() -> dict[str, str]:
    """The environment without anything that would make the tree importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


#: What a build reads: copied to a temporary tree, so that setuptools' build/ and
#: egg-info directories are never written into the repository (nor raced by two runs).
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "CITATION.cff", "src")

#: The compiled speedups the wheel must carry (built by setup.py from src/'s C sources).
EXTENSIONS = ("maxwellhub/net/_steadyc", "maxwellhub_drivers/_driverc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("source")
    # not the editable install's in-place builds: the wheel's build compiles its own
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    for name in SOURCES:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, tree / name, ignore=ignore)
        else:
            shutil.copy2(src, tree / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out), str(tree)],
        capture_output=True, text=True, timeout=scaled(120), cwd=out, env=_clean_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (built,) = out.glob("maxwellhub-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv (system site packages only) with the wheel installed; its bin/."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip("Debian's /usr/bin/python3 (with Meep) is not here")
    venv = tmp_path_factory.mktemp("venv") / "v"
    env = _clean_env()
    subprocess.run(
        [str(SYSTEM_PYTHON), "-m", "venv", "--system-site-packages", str(venv)],
        check=True, timeout=scaled(120), env=env,
    )  # fmt: skip
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
         "--no-index", "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True, timeout=scaled(120), env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv / "bin"


def _packages_in_tree() -> set[str]:
    """Import names of every package under src/ (each directory is its package's name)."""
    src = REPO_ROOT / "src"
    return {".".join(init.parent.relative_to(src).parts) for init in src.rglob("__init__.py")}


def test_wheel_contents(wheel):
    """Every package of the tree, the default config, py.typed, licence and citation."""
    files = set(zipfile.ZipFile(wheel).namelist())
    packages = _packages_in_tree()
    assert {"maxwellhub", "maxwellhub.hub", "maxwellhub.models"} <= packages
    for package in packages:
        assert f"{package.replace('.', '/')}/__init__.py" in files, f"{package} not in wheel"
    for path in ("maxwellhub/data/relax_2d.toml", "maxwellhub/py.typed",
                 "maxwellhub_drivers/py.typed"):  # fmt: skip
        assert path in files
    for ext in EXTENSIONS:  # compiled by the wheel's build (a C compiler is set up here)
        assert any(f.startswith(f"{ext}.") and f.endswith(".so") for f in files), ext
    dist_info = {Path(f).name for f in files if ".dist-info/" in f}
    assert {"LICENSE", "CITATION.cff", "entry_points.txt"} <= dist_info
    entry_points = next(f for f in files if f.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "maxwellhub = maxwellhub.cli:main" in text
    assert "maxwellhub-driver = maxwellhub_drivers.cli:main" in text


def test_packaged_default_config_is_the_example():
    """Users read examples/relax_2d.toml; `maxwellhub run` reads the packaged copy."""
    from maxwellhub.run.runner import DEFAULT_CONFIG

    assert DEFAULT_CONFIG == REPO_ROOT / "src" / "maxwellhub" / "data" / "relax_2d.toml"
    assert DEFAULT_CONFIG.read_bytes() == (REPO_ROOT / "examples" / "relax_2d.toml").read_bytes()


def test_citation_and_licence():
    """CITATION.cff names the project and the team; LICENSE is the MIT text."""
    cff = (REPO_ROOT / "CITATION.cff").read_text()
    assert "cff-version: 1.2.0" in cff and "title: maxwellhub" in cff
    assert 'name: "maxwellhub developers"' in cff and "license: MIT" in cff
    assert (REPO_ROOT / "LICENSE").read_text().startswith("MIT License")


def test_installed_wheel_runs_default_job_from_empty_directory(installed, tmp_path):
    """`maxwellhub run` with no argument: the packaged default job runs to completion."""
    env = _clean_env()
    where = subprocess.run(
        [str(installed / "python"), "-c", "import maxwellhub; print(maxwellhub.__file__)"],
        capture_output=True, text=True, timeout=scaled(60), cwd=tmp_path, env=env,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr[-2000:]
    assert "site-packages" in where.stdout and str(REPO_ROOT) not in where.stdout
    impl = subprocess.run(
        [str(installed / "python"), "-c",
         "from maxwellhub.net import steadyio; from maxwellhub_drivers import fastloop;"
         "print(steadyio.IMPL, fastloop.compiled() is not None)"],
        capture_output=True, text=True, timeout=scaled(60), cwd=tmp_path, env=env,
    )  # fmt: skip
    assert impl.stdout.split() == ["C", "True"], impl.stderr[-2000:]  # the speedups run
    proc = subprocess.run(
        [str(installed / "maxwellhub"), "run"],
        capture_output=True, text=True, timeout=scaled(120), cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["steps"] == 1801 and summary["molecules"] == 1
    assert (tmp_path / summary["hdf5"]).is_file()
    assert (tmp_path / "out" / "relax_2d" / "populations.png").stat().st_size > 10_000
