"""The shape of ``benchmarks/``: each benchmark stands alone beside ``benchmarks.common``.

* No module under ``benchmarks/`` imports another benchmark module: what two of them
  share lives in :mod:`benchmarks.common`, the one benchmark module any of them imports
  (at the top or inside a function, absolute or relative).
* :mod:`benchmarks.common` imports only the standard library when it is imported (NumPy,
  JAX, jaxmetric and PyTorch inside its functions), so the PyTorch side of a benchmark,
  a subprocess without JAX, can import it, and importing it starts no JAX backend.
* Every ``benchmarks.…`` module path spelt out as a string in the benchmarks or the
  tests (the ``-m`` of a child run, a command line), and every ``-m benchmarks.…`` in
  ``benchmarks/*.sh`` and ``.ci/``, names a module that exists.

Read from the source with :mod:`ast`: these tests import nothing from ``benchmarks``.
"""

from __future__ import annotations

import ast
import pathlib
import re
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"
SHARED = "benchmarks.common"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_module_name(p): p for p in sorted(BENCHMARKS.rglob("*.py"))}
PACKAGES = {name for name, p in FILES.items() if p.name == "__init__.py"}


def _imported(module: str, tree: ast.AST) -> set[str]:
    """Every module ``module``'s source imports, anywhere in it, as absolute names
    (``from benchmarks import x`` counts as ``benchmarks.x`` where that is a module)."""
    package = module if module in PACKAGES else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names
                       if f"{target}.{alias.name}" in FILES)
    return out


def test_the_reader_sees_the_modules():
    assert SHARED in FILES and "benchmarks.peer_training" in FILES
    assert "benchmarks.cpu.step_parts" in FILES and "benchmarks.cpu" in PACKAGES
    tree = ast.parse(FILES["benchmarks.cpu.device_sync"].read_text())
    assert SHARED in _imported("benchmarks.cpu.device_sync", tree)
    relative = ast.parse("from ..common import REPO\nfrom . import step_parts\n")
    assert _imported("benchmarks.cpu.x", relative) == {
        SHARED, "benchmarks.cpu", "benchmarks.cpu.step_parts"}


@pytest.mark.parametrize("module", sorted(FILES))
def test_benchmarks_import_no_other_benchmark_than_common(module):
    tree = ast.parse(FILES[module].read_text(), filename=str(FILES[module]))
    others = sorted(name for name in _imported(module, tree)
                    if (name == "benchmarks" or name.startswith("benchmarks."))
                    and name != SHARED and name not in PACKAGES)
    assert not others, (f"{module} imports {others}: share through {SHARED} instead of "
                        "importing another benchmark")


def test_common_imports_only_the_standard_library_at_import_time():
    tree = ast.parse(FILES[SHARED].read_text())
    top = set()
    for node in tree.body:  # module level only: imports inside functions are lazy
        if isinstance(node, ast.Import):
            top.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "benchmarks.common imports no other benchmark module"
            top.add(node.module.partition(".")[0])
        elif not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            for sub in ast.walk(node):
                assert not isinstance(sub, (ast.Import, ast.ImportFrom)), (
                    f"line {sub.lineno}: a conditional import at module level")
    others = sorted(top - sys.stdlib_module_names - {"__future__"})
    assert not others, f"benchmarks.common imports {others} at import time"


MODULE_PATH = re.compile(r"^(?:python3? -m )?(benchmarks(?:\.\w+)+)(?: |$)")
SHELL_MODULE_PATH = re.compile(r"-m (benchmarks(?:\.\w+)+)")


def _module_paths_in(path: pathlib.Path):
    """``(line, module)`` of every string constant in ``path`` that is a ``benchmarks.…``
    module path or a ``python -m benchmarks.…`` command; for a shell script, every
    ``-m benchmarks.…``."""
    if path.suffix != ".py":
        for line, text in enumerate(path.read_text().splitlines(), 1):
            for m in SHELL_MODULE_PATH.finditer(text):
                yield line, m.group(1)
        return
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = MODULE_PATH.match(node.value)
            if m:
                yield node.lineno, m.group(1)


def test_module_paths_spelt_out_exist():
    sources = (sorted(BENCHMARKS.rglob("*.py")) + sorted(BENCHMARKS.glob("*.sh"))
               + sorted((REPO_ROOT / ".ci").glob("*"))
               + [p for p in sorted((REPO_ROOT / "tests").glob("*.py"))
                  if p.resolve() != pathlib.Path(__file__).resolve()])  # not its test data
    seen, missing = set(), []
    for path in sources:
        for line, name in _module_paths_in(path):
            seen.add(name)
            if name not in FILES:
                missing.append(f"{path.relative_to(REPO_ROOT)}:{line}: {name}")
    # the reader finds the child runs' modules and the shell script's
    assert {"benchmarks.cpu.step_parts", "benchmarks.collect_run"} <= seen, sorted(seen)
    assert not missing, missing
