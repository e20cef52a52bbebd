"""Sphinx configuration for the ckpt_callbacks documentation.

The build is offline (CI reaches no documentation hosts, so no intersphinx) and strict: tox runs
``sphinx-build -W``, so a broken docstring or a missing module fails CI instead of shipping a
half-rendered page. The API pages come from the code's Google-style docstrings through autodoc and
napoleon; prose pages may be reStructuredText or Markdown (MyST).
"""

from __future__ import annotations

import configparser
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent

# Import the package from this checkout, so the docs build without installing it first.
sys.path.insert(0, str(_ROOT))


def _version() -> str:
    """Read the version from setup.cfg, the single place it is written."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(_ROOT / "setup.cfg", encoding="utf-8")
    return config["metadata"]["version"]


project = "ckpt_callbacks"
author = "the ckpt_callbacks authors"
copyright = f"%Y, {author}"
release = _version()
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
nitpicky = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"

napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Lets Markdown pages link to a section by its heading (`[x](composer.md#pruning)`).
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"ckpt_callbacks {release}"
