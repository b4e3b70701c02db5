"""The documentation site builds offline with warnings as errors, and has its main pages."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
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
    for page in ("install.html", "explanation/architecture.html", "reference/control.html"):
        assert (out / page).is_file(), f"{page} was not written"


def _example_body(path) -> str:
    """An example file without its module docstring: what the README shows of it."""
    text = path.read_text()
    end = ast.parse(text).body[0].end_lineno
    return "\n".join(text.splitlines()[end:]).strip("\n")


def _python_blocks(markdown: str) -> list[str]:
    return [b.strip("\n") for b in re.findall(r"```python\n(.*?)```", markdown, flags=re.S)]


def test_readme_examples_are_the_example_files():
    """The README's two examples are, character for character, files that the tests run
    (examples/hub_and_two_drivers.py in tests/system/test_examples.py, the Meep one below)."""
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = _python_blocks(readme)
    examples = REPO_ROOT / "examples"
    assert blocks == [
        _example_body(examples / "hub_and_two_drivers.py"),
        _example_body(examples / "meep_in_your_script.py"),
    ]
    assert len(blocks[0].splitlines()) <= 22 and len(blocks[1].splitlines()) <= 17


def test_readme_is_short_and_links_resolve():
    """About 150 lines, and every relative link points at a file of the repository."""
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 170
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    relative = [link for link in links if "://" not in link]
    assert len(relative) > 20
    for link in relative:
        assert (REPO_ROOT / link).exists(), f"README links to a missing file: {link}"


def test_no_internal_issue_numbers_in_docs():
    """Readers cannot look up the team's issue numbers: none in the README or the site."""
    pattern = re.compile(r"\bissue[ -]?#?\d", re.I)
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
    assert len(pages) > 30
    found = [f"{p.relative_to(REPO_ROOT)}: {m.group(0)}" for p in pages
             for m in pattern.finditer(p.read_text())]  # fmt: skip
    assert not found, found


@pytest.mark.meep
def test_readme_meep_example_runs(tmp_path):
    """examples/meep_in_your_script.py (the README's Meep example) runs to the end: the
    embedded and the socket molecule relax alike."""
    pytest.importorskip("meep")
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "meep_in_your_script.py")],
        capture_output=True,
        text=True,
        timeout=scaled(120),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("final Pe"))
    embedded, socket = json.loads(line.split(":", 1)[1])
    assert 0 < embedded < 1e-4 and abs(embedded - socket) <= 1e-12
