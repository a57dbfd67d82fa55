"""The documentation works as written: README.md and every page under docs/.

* Every ```python block runs, each in a fresh interpreter (blocks that need data, weights
  or long training are written as ```bash or ```text and are not run).
* Every ``python -m X`` names a module that exists (found with
  :func:`importlib.util.find_spec`, not run); a package needs a ``__main__``. Every
  ``python path.py`` / ``bash path.sh`` names a file of the repository.
* Every relative link points to an existing file, and a ``#fragment`` into a Markdown
  page to one of its headings.

The flags of the documented ``experiments.cifar10`` / ``experiments.retrieval``
commands are checked in tests/test_cli.py. Each checker has a test that makes it fail.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def doc_files(root: pathlib.Path = REPO_ROOT) -> list[pathlib.Path]:
    """README.md and every Markdown page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, line number of the opening fence)`` of each fenced block."""
    blocks, current = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if current is None:
                current = (line.strip()[3:].strip().lower(), [], number)
            else:
                blocks.append((current[0], "\n".join(current[1]) + "\n", current[2]))
                current = None
        elif current is not None:
            current[1].append(line)
    assert current is None, f"a code block opened on line {current[2]} is never closed"
    return blocks


def prose(text: str) -> str:
    """The text outside the fenced code blocks."""
    return re.sub(r"^\s*```.*?^\s*```[^\n]*$", "", text, flags=re.S | re.M)


def _python_blocks():
    found = []
    for path in doc_files():
        for lang, code, line in code_blocks(path.read_text()):
            if lang == "python":
                found.append(pytest.param(code, id=f"{path.relative_to(REPO_ROOT)}:{line}"))
    return found


def run_block(code: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this repository first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("XLA_FLAGS", None)  # a block that wants several CPU devices sets them itself
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_docs_have_python_blocks():
    ids = [p.id for p in _python_blocks()]
    assert any(i.startswith("README.md:") for i in ids), "README has no runnable example"
    assert len(ids) >= 4


@pytest.mark.parametrize("code", _python_blocks())
def test_python_block_runs(code, tmp_path):
    done = run_block(code, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def test_a_failing_block_fails(tmp_path):
    assert run_block("raise SystemExit(3)\n", tmp_path).returncode == 3
    assert run_block("import jaxmetric.no_such_module\n", tmp_path).returncode != 0


# ------------------------------------------------------------------ python -m, paths

def _find(module: str):
    try:
        return importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a parent package that does not exist
        return None


def runnable(module: str) -> bool:
    """Whether ``python -m module`` would find something to run."""
    spec = _find(module)
    if spec is None:
        return False
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        return _find(module + ".__main__") is not None
    return True


MODULE_COMMAND = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)")
SCRIPT_COMMAND = re.compile(r"\b(?:python3?|bash)\s+((?:[\w.-]+/)*[\w.-]+\.(?:py|sh))\b")


def missing_modules(text: str) -> list[str]:
    return sorted({m for m in MODULE_COMMAND.findall(text) if not runnable(m)})


def missing_scripts(text: str, root: pathlib.Path = REPO_ROOT) -> list[str]:
    return sorted({s for s in SCRIPT_COMMAND.findall(text) if not (root / s).is_file()})


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_documented_modules_and_scripts_exist(path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    text = path.read_text()
    assert missing_modules(text) == [], "python -m names a module that does not exist"
    assert missing_scripts(text) == [], "a command names a file that does not exist"


def test_the_module_check_fails_on_a_missing_module(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    text = ("python -m experiments.cifar10 --loss triplet\n"
            "run `python -m jaxmetric.report RUN_DIR`, not `python -m jaxmetric.evaluate`\n"
            "python -m jaxmetric.no_such_module\npython -m no_such_package.tool\n")
    assert missing_modules(text) == ["jaxmetric.evaluate", "jaxmetric.no_such_module",
                                     "no_such_package.tool"]
    assert missing_scripts("bash benchmarks/gpu.sh; python benchmarks/nothing.py") == [
        "benchmarks/nothing.py"]


# ------------------------------------------------------------------------------ links

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    headings = [line.lstrip("#").strip() for line in prose(path.read_text()).splitlines()
                if re.match(r"#{1,6}\s", line)]
    return {slug(h) for h in headings}


def broken_links(path: pathlib.Path) -> list[str]:
    """The relative links of a Markdown file whose target (or heading) does not exist."""
    bad = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(target)
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            bad.append(target)
    return bad


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_point_to_existing_files(path):
    assert broken_links(path) == []


def test_the_link_check_fails_on_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Some `code` here\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Title\n\n[fine](docs/page.md) [anchor](docs/page.md#some-code-here) "
        "[self](#title) [web](https://example.org/x)\n"
        "[gone](docs/missing.md) ![picture](docs/none.png) [bad anchor](docs/page.md#nope)\n"
        "```python\nx = [not](a_link.md)\n```\n")
    assert broken_links(readme) == ["docs/missing.md", "docs/none.png", "docs/page.md#nope"]
    assert slug("Data parallelism: `jax.shard_map`, not `jax.pmap`") == \
        "data-parallelism-jaxshard_map-not-jaxpmap"


# ------------------------------------------------------------------------- the README

def test_readme_keeps_the_ci_test_command():
    """CI runs the test command written in README.md's Tests section."""
    readme = (REPO_ROOT / "README.md").read_text()
    tests = readme[readme.index("\n## Tests\n"):]
    assert code_blocks(tests)[0][:2] == ("bash", "python -m pytest -q -n 2\n")


def test_every_docs_page_is_linked_from_the_index():
    index = REPO_ROOT / "docs" / "index.md"
    linked = {(index.parent / t.partition("#")[0]).resolve()
              for t in LINK.findall(index.read_text())}
    pages = {p.resolve() for p in doc_files()[1:]} - {index.resolve()}
    assert pages - linked == set(), "docs pages that docs/index.md does not link"


def test_no_control_characters_in_the_sources():
    """A ``\\frac`` or ``\\bar`` in a docstring that is not a raw string becomes a form
    feed or a backspace, and the formula renders as "rac" or "ar" without any warning."""
    control = re.compile("[\x00-\x08\x0b-\x1f\x7f]")
    bad = []
    for folder in ("jaxmetric", "experiments", "benchmarks", "tests", "docs"):
        for path in sorted((REPO_ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".md") or "_build" in path.parts:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if control.search(line):
                    bad.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()[:60]!r}")
    assert not bad, "control characters (a backslash escape in a non-raw string?):\n" + \
        "\n".join(bad)
