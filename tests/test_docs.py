"""The documentation site builds offline with warnings as errors, and has its main pages."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from _util import REPO_ROOT, scaled

pytestmark = pytest.mark.slow

HAVE_SPHINX = all(importlib.util.find_spec(m) for m in ("sphinx", "myst_parser"))


@pytest.mark.skipif(
    not HAVE_SPHINX,
    reason="sphinx and myst-parser are not installed: pip install -e '.[docs]'",
)
def test_docs_build_without_warnings(tmp_path):
    """sphinx-build -W exits 0 and writes the index, a tutorial and the API page."""
    out = tmp_path / "html"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(REPO_ROOT / "docs"),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=scaled(300),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for page in ("index.html", "tutorials/main-job.html", "reference/api.html"):
        assert (out / page).is_file(), f"{page} was not written"
    api = (out / "reference" / "api.html").read_text()
    assert "MeepCoupling" in api and "SocketHub" in api
