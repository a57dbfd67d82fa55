"""Sphinx configuration of the jaxmetric documentation.

Build the site with (from the repository root, after ``pip install -e ".[docs]"``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The API reference is generated from the docstrings: ``api.md`` asks autosummary for the
``jaxmetric`` package, recursively, so every public module gets its page
(``docs/_autosummary/``, written at build time and git-ignored) without a hand-kept list.
The Markdown pages are read by MyST and stay readable on GitHub. MathJax is served from
the built site (the copy that the ``sphinx-mathjax-offline`` package ships), so the
pages render offline. Intersphinx links to the jax, flax, optax, NumPy and Python docs
when their inventories can be reached at build time and is left out, without a warning,
when they cannot.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import pathlib
import shutil
import sys
import urllib.request

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # jaxmetric and experiments (the command-line page) from here
sys.path.insert(0, str(DOCS / "_ext"))

import jaxmetric_docs  # noqa: E402  (docs/_ext)

import jaxmetric  # noqa: E402  (this checkout's, by the path above)

project = "jaxmetric"
author = "jaxmetric developers"
copyright = "the jaxmetric developers (Apache-2.0)"
release = jaxmetric.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "myst_parser",
    "jaxmetric_docs",  # docs/_ext: the flags table, the API pages' layout, README links
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# Warnings are errors (-W) and every cross-reference must resolve.
nitpicky = True
# Text as written: "--no-augment" in a help text stays two hyphens, quotes stay straight.
smartquotes = False

# ---------------------------------------------------------------- Markdown (MyST)
# GitHub-style anchors for the headings, so ``training.md#every-loss`` works both on
# GitHub and here.
myst_heading_anchors = 6
# $$ ... $$ display math (GitHub renders it as well).
myst_enable_extensions = ["dollarmath"]
# Pages whose inline ``jaxmetric.…`` names are not turned into links: the changelog names
# the modules of earlier versions.
jaxmetric_plain_names_in = ["changelog"]

# ---------------------------------------------------------------- API reference
autosummary_generate = True
# Written afresh by every build: a stub of a module that was renamed or removed would
# otherwise stay behind as a page outside every toctree.
shutil.rmtree(DOCS / "_autosummary", ignore_errors=True)
autosummary_imported_members = False
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Everything is documented on the page of the module that defines it; a package's page
# lists what it re-exports (read from the sources at build time).
autosummary_context = {"layout": jaxmetric_docs.module_layout("jaxmetric")}

# ---------------------------------------------------------------- math
# MathJax 3 from the sphinx-mathjax-offline package, copied into the site's _static/
# (its files only: its extension's hook is not declared safe for parallel builds).
_mathjax = importlib.util.find_spec("sphinx-mathjax-offline")
if _mathjax is None or _mathjax.origin is None:
    raise RuntimeError('sphinx-mathjax-offline is missing: pip install -e ".[docs]"')
MATHJAX_STATIC = pathlib.Path(_mathjax.origin).parent / "static"
mathjax_path = "mathjax/tex-chtml.js"

# ---------------------------------------------------------------- intersphinx
INVENTORIES = {
    "python": "https://docs.python.org/3/",
    "numpy": "https://numpy.org/doc/stable/",
    "jax": "https://docs.jax.dev/en/latest/",
    "flax": "https://flax.readthedocs.io/en/latest/",
    "optax": "https://optax.readthedocs.io/en/latest/",
}


def _reachable(url: str) -> bool:
    if os.environ.get("JAXMETRIC_DOCS_OFFLINE"):
        return False
    try:
        with urllib.request.urlopen(url + "objects.inv", timeout=5) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


with concurrent.futures.ThreadPoolExecutor(len(INVENTORIES)) as pool:
    _online = dict(zip(INVENTORIES, pool.map(_reachable, INVENTORIES.values()), strict=True))
intersphinx_mapping = {name: (url, None) for name, url in INVENTORIES.items() if _online[name]}
intersphinx_timeout = 10

# Names of other projects (type hints and docstrings name jax.Array, numpy.ndarray,
# pathlib.Path, optax.GradientTransformation, faiss, ...) are never a warning: offline
# they cannot resolve, and online some still cannot, since autodoc writes type hints by
# their implementation path (jax.jaxlib._jax.Array, flax.linen.module.Module), which no
# inventory lists. Intersphinx links those it finds. Every jaxmetric name must resolve.
EXTERNAL_NAMES = [
    "(" + "|".join(sorted(sys.stdlib_module_names)) + r")(\..*)?",
    r"(numpy|np|jax|jaxlib|jnp|flax|nn|optax|chex|faiss|orbax|tensorflow_datasets|tfds|tf|"
    r"PIL|matplotlib|openTSNE|sklearn|safetensors|torch)(\..*)?",
]
nitpick_ignore_regex = [(r"py:.*", pattern) for pattern in EXTERNAL_NAMES]

# ---------------------------------------------------------------- HTML
html_theme = "sphinx_book_theme"
html_title = "jaxmetric"
html_static_path = [str(MATHJAX_STATIC)]
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    # The sidebar shows the open branch only: rendering the whole tree (every API module)
    # on every page was half of the build's time.
    "collapse_navbar": True,
    "max_navbar_depth": 4,
}
html_last_updated_fmt = None
