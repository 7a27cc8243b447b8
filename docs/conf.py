"""Sphinx configuration of mtl_optax's documentation site.

Build (offline: no intersphinx, MathJax served from the build's own `_static/mathjax`):

  pip install -e ".[docs]"
  sphinx-build -W --keep-going -b html docs docs/_build/html

Markdown pages go through myst-parser, docstrings (Google style) through napoleon, and the API
pages are autosummary stubs generated at build time. Two local extensions (`docs/ext/`):
`coverage_check` fails the build when a name of `mtl_optax.__all__` has no API entry, and
`method_catalog` renders the method catalog and the per-method cards from
`mtl_optax.registry.METHODS` and the factories' docstrings.
"""

from __future__ import annotations

import os
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "ext"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import mtl_optax  # noqa: E402

project = "mtl_optax"
author = "mtl_optax authors"
copyright = "mtl_optax authors, Apache-2.0"  # noqa: A001
release = version = mtl_optax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 from the package, copied into _static/mathjax
    "plain_docstrings",
    "coverage_check",
    "method_catalog",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "ext", "README.md"]
templates_path = ["_templates"]

# Markdown.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "substitution"]
from mtl_optax import registry  # noqa: E402

# Counted from the registry, so the pages never state a stale number.
myst_substitutions = {
    "n_methods": str(sum("@" not in name for name in registry.METHODS)),
}
myst_heading_anchors = 3

# API pages.
autosummary_generate = True
autosummary_imported_members = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Keep the names of the type aliases in signatures instead of their expanded unions.
autodoc_type_aliases = {name: name for name in (
    "optax.ScalarOrSchedule", "optax.OptState", "optax.Params", "optax.Updates",
    "tree_lib.MaskOrFn", "tree_lib.Tree", "jax.typing.ArrayLike", "np.typing.ArrayLike",
    "Tree", "MaskOrFn")}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Backticks in docstrings are code, as they read in the source.
default_role = "code"

# HTML: furo ships its assets; nothing is fetched from a CDN at build or view time.
html_theme = "furo"
html_title = f"mtl_optax {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sourcelink = False
html_copy_source = False
