"""The shape of the package: roles in packages, imports one way, private names at home.

* **Rooms by role.** The top level holds only the core every role shares: modules that
  at least two packages import (``utils``, ``parallel``, ``distributed``) and the
  public core roles re-exported by ``jaxmetric/__init__.py`` (``distances``,
  ``mining``). Everything else lives in its package: ``losses``, ``models``, ``data``,
  ``evaluate``, ``train``, ``report``, ``search``.
* **Floors.** Packages form layers (:data:`LAYERS`) and every import between two of
  them goes to a lower floor.
* No module of ``jaxmetric`` uses another module's private names (``_x``): neither
  ``from jaxmetric.m import _x`` nor ``m._x``, nor a private module (``jaxmetric._m``).
  What modules share is public and lives where its concern lives (shared helpers in
  :mod:`jaxmetric.utils`).
* The imports between ``jaxmetric`` modules form no circle: neither those that run when
  a module is imported, nor the ones inside functions (a circle through a lazy import is
  still a two-way dependency).
* ``import jaxmetric.evaluate`` needs only NumPy (and the JAX core of the package): it
  does not load the report, the pictures, training, orbax or the optional dependencies.

The graph is read from the source with :mod:`ast`, so these tests import nothing.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "jaxmetric"


# ------------------------------------------------------------------------- reading


def _module_files() -> dict[str, pathlib.Path]:
    """``{"jaxmetric.evaluate.knn": path, "jaxmetric.evaluate": .../__init__.py, ...}``."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve_from(module: str, node: ast.ImportFrom) -> str | None:
    """The absolute module name of ``from ... import`` in ``module`` (None if outside)."""
    if node.level:
        base = module.split(".") if _is_package(module) else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    return name if name == "jaxmetric" or name.startswith("jaxmetric.") else None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module, *, top_level: bool):
    """Import statements; with ``top_level`` only those run when the module is imported
    (not inside functions, not under ``if TYPE_CHECKING``)."""
    if not top_level:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
        elif isinstance(node, ast.stmt):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    stack.append(child)
                elif isinstance(child, ast.excepthandler):
                    stack.extend(child.body)


def _targets(module: str, node) -> list[str]:
    """The jaxmetric modules an import statement loads."""
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == "jaxmetric" or alias.name.startswith("jaxmetric."):
                out.append(alias.name)
        return out
    source = _resolve_from(module, node)
    if source is None:
        return out
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        out.append(sub if sub in MODULES else source)
    return out


def _tree(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))


def _graph(*, top_level: bool) -> dict[str, set[str]]:
    graph = {}
    for module in MODULES:
        targets = set()
        for node in _import_nodes(_tree(module), top_level=top_level):
            targets.update(t for t in _targets(module, node) if t in MODULES)
        # Importing jaxmetric.x first runs jaxmetric/__init__.py; that edge (and the one to
        # a module's own package) is how every package works, not a dependency.
        graph[module] = {t for t in targets
                         if t != module and t != "jaxmetric" and not module.startswith(t + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _private_uses(module: str) -> set[tuple[str, str]]:
    """``(module, "other._name")`` for each private name of another module it uses."""
    tree = _tree(module)
    uses = set()
    bound: dict[str, str] = {}  # local name -> jaxmetric module it refers to
    for node in _import_nodes(tree, top_level=False):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "jaxmetric":
                    continue
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound["jaxmetric"] = "jaxmetric"
                for part in alias.name.split(".")[1:]:
                    if _is_private(part):
                        uses.add((module, alias.name))
            continue
        source = _resolve_from(module, node)
        if source is None:
            continue
        if any(_is_private(part) for part in source.split(".")[1:]):
            uses.add((module, source))
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            if sub in MODULES:
                bound[alias.asname or alias.name] = sub
            if _is_private(alias.name) and source != module:
                uses.add((module, f"{source}.{alias.name}"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = []
        value = node
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in bound:
            continue
        target = bound[value.id]
        for attr in reversed(chain):
            if f"{target}.{attr}" in MODULES:
                target = f"{target}.{attr}"
                continue
            if _is_private(attr) and target != module:
                uses.add((module, f"{target}.{attr}"))
            break
    return uses


# ------------------------------------------------------------------------- the rules


LAYERS = {
    "utils": 0, "parallel": 0,
    "distances": 1, "mining": 1, "distributed": 1,
    "losses": 2, "models": 2, "data": 2, "evaluate": 2,
    "train": 3,
    "report": 4,
    "search": 5, "tune": 5,
}
"""The floor of each top-level module or package: imports go to a lower floor only."""

CORE_ROLES = {"distances", "mining"}
"""Top-level modules that are public roles of the core (``jaxmetric/__init__.py``)."""


def _room(module: str) -> str:
    """The top-level module or package of ``jaxmetric.x.y`` (``"x"``)."""
    return module.split(".")[1] if "." in module else "jaxmetric"


def test_the_reader_sees_the_package():
    assert {"jaxmetric", "jaxmetric.losses", "jaxmetric.losses.triplet",
            "jaxmetric.losses.registry", "jaxmetric.models", "jaxmetric.data",
            "jaxmetric.evaluate", "jaxmetric.evaluate.knn", "jaxmetric.report",
            "jaxmetric.report.visualize", "jaxmetric.train", "jaxmetric.utils"} <= set(MODULES)
    graph = _graph(top_level=True)
    assert "jaxmetric.evaluate" in graph["jaxmetric.report.visualize"]
    assert "jaxmetric.evaluate.knn" in graph["jaxmetric.evaluate.protocols"]
    lazy = _graph(top_level=False)
    assert "jaxmetric.train" in lazy["jaxmetric.report.run"]
    assert "jaxmetric.train" not in graph["jaxmetric.report.run"]


def test_every_room_has_a_floor():
    rooms = {_room(m) for m in MODULES} - {"jaxmetric"}
    assert rooms == set(LAYERS), "a top-level module or package without a floor in LAYERS"


def test_imports_go_down_the_floors():
    bad = sorted(f"{m} -> {t}" for m, targets in _graph(top_level=False).items()
                 for t in targets
                 if _room(m) != "jaxmetric" and _room(t) != "jaxmetric" and _room(m) != _room(t)
                 and LAYERS[_room(t)] >= LAYERS[_room(m)])
    assert bad == [], "imports that go up or sideways: " + ", ".join(bad)


def test_top_level_modules_are_shared_or_core_roles():
    """A top-level module that only one package uses belongs in that package."""
    graph = _graph(top_level=False)
    lonely = []
    for module in MODULES:
        if module.count(".") != 1 or _is_package(module) or _room(module) in CORE_ROLES:
            continue
        users = {_room(u) for u, targets in graph.items()
                 if module in targets and _room(u) not in (_room(module), "jaxmetric")}
        if len(users) < 2:
            lonely.append(f"{module} (used by {sorted(users) or 'nothing'})")
    assert lonely == [], "top-level modules one package uses: " + ", ".join(lonely)


def test_the_floor_checks_catch_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "jaxmetric" / "losses" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from jaxmetric.train import fit\n")
    monkeypatch.setitem(MODULES, "jaxmetric.losses.fake", fake)
    with pytest.raises(AssertionError, match="jaxmetric.losses.fake -> jaxmetric.train"):
        test_imports_go_down_the_floors()
    lone = tmp_path / "jaxmetric" / "lonely.py"
    lone.write_text("X = 1\n")
    monkeypatch.setitem(MODULES, "jaxmetric.lonely", lone)
    with pytest.raises(AssertionError, match="jaxmetric.lonely"):
        test_top_level_modules_are_shared_or_core_roles()


def test_no_private_names_across_modules():
    uses = sorted(set().union(*(_private_uses(m) for m in MODULES)))
    assert not uses, "private names used across modules (make them public or move them): " \
        + ", ".join(f"{m} uses {name}" for m, name in uses)


def test_the_checks_catch_private_uses(tmp_path, monkeypatch):
    fake = tmp_path / "jaxmetric" / "fake.py"
    fake.parent.mkdir()
    fake.write_text("from jaxmetric.evaluate.knn import _default_m\n"
                    "from jaxmetric import evaluate\n"
                    "import jaxmetric.evaluate.metrics as em\n"
                    "def f():\n"
                    "    return evaluate.knn._resolve_ivfpq, em._knn_correct, evaluate.embed\n")
    monkeypatch.setitem(MODULES, "jaxmetric.fake", fake)
    assert _private_uses("jaxmetric.fake") == {
        ("jaxmetric.fake", "jaxmetric.evaluate.knn._default_m"),
        ("jaxmetric.fake", "jaxmetric.evaluate.knn._resolve_ivfpq"),
        ("jaxmetric.fake", "jaxmetric.evaluate.metrics._knn_correct"),
    }


@pytest.mark.parametrize("top_level", [True, False], ids=["at-import", "with-lazy-imports"])
def test_no_import_circle(top_level):
    assert _cycles(_graph(top_level=top_level)) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _loaded_by(statement: str) -> list[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT, check=True)
    return json.loads(done.stdout.splitlines()[-1])


HEAVY = ("jaxmetric.report", "jaxmetric.report.visualize", "jaxmetric.train", "jaxmetric.data",
         "jaxmetric.models", "orbax", "flax.training", "optax", "faiss", "sklearn", "tqdm",
         "matplotlib", "openTSNE", "tensorflow")


def test_importing_evaluate_loads_no_upper_layer_or_optional_dependency():
    loaded = _loaded_by("import jaxmetric.evaluate")
    assert "jaxmetric.evaluate.protocols" in loaded
    bad = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert bad == []


def test_importing_the_pictures_loads_neither_training_nor_data():
    loaded = _loaded_by("import jaxmetric.report.visualize")
    assert "jaxmetric.report.visualize" in loaded
    upper = ("jaxmetric.train", "jaxmetric.data", "orbax", "flax.training")
    assert [m for m in loaded if any(m == u or m.startswith(u + ".") for u in upper)] == []


def test_code_map_names_every_module():
    """Every module of the package and the experiments appears in the code map of
    docs/architecture.md, and the map names no file that does not exist."""
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    page = (root / "docs" / "architecture.md").read_text()
    start = page.index("| file | concept |")
    end = page.find("\n#", start)
    table = page[start:end if end != -1 else len(page)]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    named = set()
    for row in rows:
        cell = row.split("|")[1]
        folder = ""
        for name in re.findall(r"`([^`]+)`", cell):
            if name.endswith("/"):
                folder = name
            elif "/" in name:
                named.add(name)
                folder = name.rsplit("/", 1)[0] + "/"
            else:
                named.add(folder + name)
    modules = {str(p.relative_to(root)) for top in ("jaxmetric", "experiments")
               for p in (root / top).rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    assert modules - named == set(), "modules missing from the code map"
    assert named - modules == set(), "the code map names files that do not exist"
