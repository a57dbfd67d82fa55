"""The ``>>>`` examples in the docstrings run and print what they show.

Every public module of ``jaxmetric`` whose source has a ``>>>`` example is run through
:mod:`doctest` (found by walking the package, so a new module's examples are checked
without being listed), with the options the API pages show them under. A module whose
imports need an optional extra that is not installed is skipped, saying which.
"""

from __future__ import annotations

import doctest
import importlib
import pathlib
import pkgutil

import pytest

import jaxmetric

PACKAGE_DIR = pathlib.Path(jaxmetric.__file__).parent


def modules_with_examples() -> list[str]:
    """The public modules of jaxmetric whose source holds a ``>>>`` example."""
    found = []
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="jaxmetric."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        spec = info.module_finder.find_spec(info.name.rpartition(".")[2])
        if spec is not None and spec.origin and ">>> " in pathlib.Path(spec.origin).read_text():
            found.append(info.name)
    if ">>> " in (PACKAGE_DIR / "__init__.py").read_text():
        found.insert(0, "jaxmetric")
    return sorted(found)


MODULES = modules_with_examples()


def test_the_examples_are_found():
    assert "jaxmetric.losses.triplet" in MODULES
    assert len(MODULES) >= 8, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ImportError as error:  # an optional extra (faiss, matplotlib, ...) is missing
        pytest.skip(f"{name} needs {error.name}, not installed")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples fail in {name}"
    assert result.attempted > 0, name


def test_a_wrong_example_fails():
    """The check can fail: an example whose output differs is counted as failed."""
    finder = doctest.DocTestFinder()

    def shown():
        """
        >>> 1 + 1
        3
        """

    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(shown, "shown", globs={}):
        runner.run(test, out=lambda _: None)
    assert runner.summarize(verbose=False).failed == 1
