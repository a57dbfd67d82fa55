"""What the jaxmetric documentation adds to Sphinx.

* ``documented_elsewhere(package)``: where each public function and class is documented
  once. A name re-exported by a package (``jaxmetric.losses.triplet_loss``, defined in
  ``jaxmetric.losses.triplet``) is documented with the nearest package above its module
  that exports it, under the name users import; its own module's page links there.
  autodoc marks it with its defining module's name as well (``:canonical:``), so a
  reference by either name resolves.
* The ``argparse-flags`` directive: the table of a command line's flags, built from its
  ``argparse`` parser when the site is built. For ``experiments.cifar10`` the training
  flags come from :class:`jaxmetric.train.config.TrainConfig`'s field metadata through
  :mod:`jaxmetric.train.flags`, so the table is the one ``--help`` prints and cannot
  drift from the code.
* Links from the Markdown pages to ``../README.md`` and ``../CHANGELOG.md`` (right on
  GitHub) lead to the site's front page and its changelog page instead of a download.
* In the Markdown pages, inline code that is a full ``jaxmetric.…`` name
  (```jaxmetric.search.Index```) links to its API entry, so the pages stay plain
  Markdown on GitHub. A name that is not importable fails the build (it went stale); an
  importable one that has no entry of its own (an undocumented constant) stays plain.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pathlib
import pkgutil
import re

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx import addnodes
from sphinx.util.docutils import SphinxDirective

__all__ = ["ArgparseFlags", "documented_elsewhere", "setup"]

# Files outside docs/ that Markdown pages link to, and the page of the site that shows
# them (docs/changelog.md includes CHANGELOG.md).
PAGES_FOR_FILES = {"README.md": "index", "CHANGELOG.md": "changelog"}


# ------------------------------------------------------------------ the API's layout


def public_modules(package: str) -> list[str]:
    """``package`` and every module below it whose name has no part starting with ``_``
    (so no ``__main__``), as autosummary's recursive walk finds them."""
    root = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(root.__path__, prefix=package + "."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def exported_names(module) -> list[str]:
    """The public names of a module: its ``__all__``, else what it defines itself."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [name for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__]


def documented_elsewhere(package: str) -> dict[str, list[tuple[str, str]]]:
    """``{module: [(name, documented as), ...]}``: the functions and classes that a
    module defines or re-exports and whose page is another module's.

    A function or class defined in ``m`` is documented by the nearest package above
    ``m`` that exports it (the name users import), else by ``m`` itself. Every other
    module on the path from ``m`` up to ``package`` that exports it (``m`` included) links
    there instead of repeating it. A module outside that path that re-exports a name
    (``jaxmetric.evaluate.l2_normalize``) documents it too: it is part of its API.
    """
    modules = {name: importlib.import_module(name) for name in public_modules(package)}
    exports = {name: exported_names(module) for name, module in modules.items()}
    elsewhere: dict[str, list[tuple[str, str]]] = {}
    for name, module in modules.items():
        for member in exports[name]:
            obj = getattr(module, member, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            origin = getattr(obj, "__module__", "") or ""
            if origin != name and not origin.startswith(name + "."):
                continue  # re-exported from outside its package: documented here too
            home = origin
            parent = origin.rpartition(".")[0]
            while parent and parent.startswith(package):
                if parent in modules and any(
                        getattr(modules[parent], n, None) is obj for n in exports[parent]):
                    home = parent
                    break
                parent = parent.rpartition(".")[0]
            if home != name and home in modules:
                exported_as = next(n for n in exports[home]
                                   if getattr(modules[home], n, None) is obj)
                elsewhere.setdefault(name, []).append((member, f"{home}.{exported_as}"))
    return elsewhere


# ------------------------------------------------------------------ the flags table


def load_parser(spec: str) -> argparse.ArgumentParser:
    """``"experiments.cifar10:build_parser"`` -> the parser that function builds."""
    module_name, _, function = spec.partition(":")
    if not function:
        raise ValueError(f"expected MODULE:FUNCTION, got {spec!r}")
    return getattr(importlib.import_module(module_name), function)()


def flag_rows(parser: argparse.ArgumentParser) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """``[(group title, [(flags, value, help), ...]), ...]`` of a parser, in its order,
    without ``--help`` and the hidden flags."""
    groups = []
    for group in parser._action_groups:  # argparse keeps its groups only here
        rows = []
        for action in group._group_actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            flags = ", ".join(action.option_strings) or action.dest
            if action.nargs == 0:
                value = ""
            elif action.metavar is not None:
                value = action.metavar if isinstance(action.metavar, str) else " ".join(
                    action.metavar)
            elif action.choices is not None:
                value = "{" + ",".join(map(str, action.choices)) + "}"
            else:
                value = action.dest.upper()
            text = (action.help or "").replace("%%", "%")
            if action.default not in (None, argparse.SUPPRESS, False) and \
                    "default" not in text:
                text = f"{text} (default: {action.default})" if text else \
                    f"default: {action.default}"
            rows.append((flags, value, text))
        if rows:
            groups.append((group.title, rows))
    return groups


def _table(rows: list[tuple[str, str, str]]) -> nodes.table:
    table = nodes.table(classes=["flags-table"])
    group = nodes.tgroup(cols=3)
    table += group
    for width in (25, 20, 55):
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    header = nodes.row()
    for title in ("flag", "value", "meaning"):
        header += nodes.entry("", nodes.paragraph(text=title))
    head += header
    body = nodes.tbody()
    group += body
    for flags, value, text in rows:
        row = nodes.row()
        row += nodes.entry("", nodes.paragraph("", "", nodes.literal(text=flags)))
        row += nodes.entry("", nodes.paragraph("", "", nodes.literal(text=value))
                           if value else nodes.paragraph())
        row += nodes.entry("", nodes.paragraph(text=text))
        body += row
    return table


class ArgparseFlags(SphinxDirective):
    """``.. argparse-flags:: experiments.cifar10:build_parser``: one table per argument
    group of the parser that the function returns (``:groups:`` picks groups by the
    start of their title, comma-separated)."""

    required_arguments = 1
    option_spec = {"groups": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        try:
            parser = load_parser(self.arguments[0])
        except Exception as error:  # a broken spec or parser is a build error, said here
            raise self.error(f"argparse-flags: cannot build {self.arguments[0]}: {error}") \
                from error
        wanted = [w.strip() for w in self.options.get("groups", "").split(",") if w.strip()]
        out: list[nodes.Node] = []
        for title, rows in flag_rows(parser):
            if wanted and not any(title.startswith(w) for w in wanted):
                continue
            out.append(nodes.rubric(text=title))
            out.append(_table(rows))
        if not out:
            raise self.error(f"argparse-flags: no flags in {self.arguments[0]}")
        return out


# ------------------------------------------------------------------ README, CHANGELOG


def _link_files_to_pages(app, doctree: nodes.document) -> None:
    """Turn links to the repository's README.md / CHANGELOG.md into links to the pages
    of the site that show them (before Sphinx collects downloads)."""
    env = app.env
    root = pathlib.Path(app.srcdir).resolve().parent
    for node in list(doctree.findall(addnodes.download_reference)):
        _, path = env.relfn2path(node["reftarget"], env.docname)
        path = pathlib.Path(path).resolve()
        page = PAGES_FOR_FILES.get(path.name) if path.parent == root else None
        if page is None:
            continue
        xref = addnodes.pending_xref("", refdomain="doc", reftarget=page, reftargetid=None,
                                     refdoc=env.docname, reftype="myst",
                                     refexplicit=node.get("refexplicit", True))
        for child in node.children:
            if isinstance(child, nodes.Element):
                child["classes"] = [c for c in child["classes"] if c != "download"]
            xref += child.deepcopy()
        node.replace_self(xref)


# ------------------------------------------------------------------ names in Markdown

FULL_NAME = re.compile(r"jaxmetric(?:\.[A-Za-z_]\w*)+")


def importable(name: str) -> bool:
    """Whether ``name`` (``jaxmetric.losses.triplet_loss``) names a module or one of its
    attributes (``jaxmetric.train.config.TrainConfig.peak_lr``)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attribute in parts[cut:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return False
        return True
    return False


def _link_full_names(app, doctree: nodes.document) -> None:
    """Inline code that is exactly a ``jaxmetric.…`` name (``()`` allowed) becomes a
    reference to it, in the Markdown pages only (the docstrings have their roles)."""
    if not str(app.env.doc2path(app.env.docname)).endswith(".md"):
        return
    for literal in list(doctree.findall(nodes.literal)):
        text = literal.astext()
        name = text.removesuffix("()")
        if not FULL_NAME.fullmatch(name) or isinstance(literal.parent, (
                nodes.reference, addnodes.pending_xref, nodes.literal_block)):
            continue
        xref = addnodes.pending_xref("", refdomain="py", reftype="obj", reftarget=name,
                                     refexplicit=True, refwarn=True, refdoc=app.env.docname,
                                     jaxmetric_name=True)
        xref += nodes.literal(text, text, classes=["xref", "py", "py-obj"])
        literal.replace_self(xref)


def _unlinked_but_real(app, env, node, contnode):
    """A name from a Markdown page that exists but has no entry: left as plain code."""
    if node.get("jaxmetric_name") and importable(node["reftarget"]):
        return contnode
    return None


def setup(app):
    app.add_directive("argparse-flags", ArgparseFlags)
    # Before sphinx.environment.collectors.asset collects the downloads (priority 500).
    app.connect("doctree-read", _link_files_to_pages, priority=400)
    app.connect("doctree-read", _link_full_names)
    # After the Python domain and intersphinx have tried (they run at priority 500).
    app.connect("missing-reference", _unlinked_but_real, priority=900)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
