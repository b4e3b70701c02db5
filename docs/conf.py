"""Sphinx configuration of the maxwellhub documentation (Sphinx + MyST).

Built offline with warnings as errors:

    sphinx-build -W --keep-going -b html docs docs/_build/html

No intersphinx, no remote images: the build never touches the network.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

project = "maxwellhub"
author = "the maxwellhub authors"
copyright = "2026, the maxwellhub authors"

try:
    from maxwellhub import __version__ as release
except Exception:  # the CLI/API pages need the package; the prose builds without it
    release = "0.1.0"
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "cli_help",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Meep, PySCF, QuTiP and ASE are imported lazily by the modules documented here; mock the
# ones a module imports at import time so the API pages build on any machine.
autodoc_mock_imports = ["meep"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
add_module_names = False

html_theme = "alabaster"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_title = f"maxwellhub {release}"
html_theme_options = {
    "description": "Meep and molecules over i-PI sockets",
    "fixed_sidebar": True,
    "page_width": "1240px",
    "sidebar_width": "240px",
}
html_sidebars = {"**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]}

# Class docstrings that are not valid reStructuredText yet. Their classes are documented
# (members, signature), but their own docstring text is dropped here until the code is
# fixed: the docstrings belong to modules being rebuilt, and the build treats warnings as
# errors. Each entry says where the problem is.
DOCSTRINGS_LEFT_OUT = {
    # src/maxwellhub/hub/sync.py, class SocketHub: its "Parameters" list ("name : text" terms,
    # some without an indented definition) is not valid reStructuredText; the hub is being
    # rebuilt in parallel, so its text is fixed there, then this entry goes.
    "maxwellhub.SocketHub",
}


def _leave_out(app, what, name, obj, options, lines):
    if what == "class" and name in DOCSTRINGS_LEFT_OUT:
        lines[:] = []


def setup(app):
    app.connect("autodoc-process-docstring", _leave_out)
