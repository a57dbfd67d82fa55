"""What the jaxmetric documentation adds to Sphinx.

* Each function, class and constant is documented once, on the page of the module that
  defines it; a package's page lists and links what it re-exports (:func:`reexported`).
  A reference by the name a module imports it under resolves to that entry:
  ``jaxmetric.losses.triplet_loss`` (defined in ``jaxmetric.losses.triplet``), or
  ``:class:`TrainConfig``` in a module that imports it (:func:`name_aliases`, read
  from the sources).
* Data, attribute and property docstrings are left as written (napoleon would read
  their first ``text: text`` line as a type); a constant without a docstring shows its
  value, not its type's docstring; a class field whose default is a function or a class
  is not documented as a method or a nested class.
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
import ast
import importlib
import importlib.util
import inspect
import os
import pathlib
import pkgutil
import re
from collections.abc import Collection

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx import addnodes
from sphinx.util.docutils import SphinxDirective

__all__ = ["ArgparseFlags", "flag_rows", "imported_names", "module_layout", "name_aliases",
           "public_modules", "reexported", "references_as_list", "resolve_alias", "setup",
           "undocumented_constants"]

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


def _top_level_statements(body):
    """The statements run when a module is imported (into ``if`` / ``try``, not into
    functions or classes)."""
    for node in body:
        yield node
        if isinstance(node, ast.If | ast.Try):
            for block in (node.body, node.orelse, getattr(node, "finalbody", []),
                          *(h.body for h in getattr(node, "handlers", []))):
                yield from _top_level_statements(block)


def module_imports(module: str) -> dict[str, str]:
    """``{local name: "jaxmetric.x.y"}``: what a module's top-level imports bind to
    names of the package (read from its source; nothing is imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return {}
    tree = ast.parse(pathlib.Path(spec.origin).read_text(), filename=spec.origin)
    package = module if spec.submodule_search_locations is not None else \
        module.rpartition(".")[0]
    root = module.partition(".")[0]
    bound = {}
    for node in _top_level_statements(tree.body):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == root or source.startswith(root + "."):
                for alias in node.names:
                    bound[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.partition(".")[0] == root:
                    local = alias.asname or alias.name.partition(".")[0]
                    bound[local] = alias.name if alias.asname else root
    return bound


def imported_names(module: str) -> list[str]:
    """Every name a module's top-level imports bind (of any package): autodoc leaves
    them to the module that defines them."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    tree = ast.parse(pathlib.Path(spec.origin).read_text(), filename=spec.origin)
    names = set()
    for node in _top_level_statements(tree.body):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                names.add(alias.asname or alias.name.partition(".")[0])
    return sorted(names - {"annotations", "*"})


def undocumented_constants(module: str, also: Collection[str] = ()) -> list[str]:
    """The public names a module assigns at its top level, with no docstring after
    them, that it exports (``__all__``), spells as a constant (``UPPER_CASE``) or that
    are named in ``also`` (a package re-exports them): autodoc would leave them out,
    and the docstrings refer to them."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    tree = ast.parse(pathlib.Path(spec.origin).read_text(), filename=spec.origin)
    exported = set(getattr(importlib.import_module(module), "__all__", ()))
    found = []
    body = tree.body
    for position, node in enumerate(body):
        if isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        else:
            continue
        following = body[position + 1] if position + 1 < len(body) else None
        documented = isinstance(following, ast.Expr) and isinstance(
            following.value, ast.Constant) and isinstance(following.value.value, str)
        for name in targets:
            if not documented and not name.startswith("_") and (
                    name in exported or name.isupper() or name in also) and name not in found:
                found.append(name)
    return found


def module_layout(package: str) -> dict[str, dict[str, list[str]]]:
    """``{module: {"imported": [...], "reexported": [...], "constants": [...]}}`` for
    the API pages' template: the names autodoc skips there, what the page lists as
    exported, and the constants it documents by their value."""
    exported = reexported(package)
    wanted: dict[str, set[str]] = {}
    for targets in exported.values():
        for target in targets:
            module, _, name = target.rpartition(".")
            wanted.setdefault(module, set()).add(name)
    return {module: {"imported": imported_names(module),
                     "reexported": exported.get(module, []),
                     "constants": undocumented_constants(module, wanted.get(module, ()))}
            for module in public_modules(package)}


def name_aliases(package: str) -> dict[str, str]:
    """``{"jaxmetric.losses.triplet_loss": "jaxmetric.losses.triplet.triplet_loss", ...}``:
    every name that a module of ``package`` imports from another, and what it is."""
    aliases = {}
    for module in public_modules(package):
        for local, target in module_imports(module).items():
            if f"{module}.{local}" != target:
                aliases[f"{module}.{local}"] = target
    return aliases


def resolve_alias(name: str, aliases: dict[str, str]) -> str:
    """Follow ``aliases`` (for ``name`` or its longest prefix) to where a name is
    defined: ``jaxmetric.report.run.train.fit`` -> ``jaxmetric.train.loop.fit``."""
    for _ in range(32):  # a chain of re-exports is short; a circle stops here
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in aliases:
                name = ".".join([aliases[prefix], *parts[cut:]])
                break
        else:
            return name
    return name


def reexported(package: str) -> dict[str, list[str]]:
    """``{module: [where each name of its __all__ that it imports is defined]}``: what
    a package's page lists (and links) rather than documents a second time."""
    aliases = name_aliases(package)
    out = {}
    for module in public_modules(package):
        imported = module_imports(module)
        names = getattr(importlib.import_module(module), "__all__", [])
        targets = [resolve_alias(f"{module}.{n}", aliases) for n in names if n in imported]
        if targets:
            out[module] = targets
    return out


class _Names:
    """The package's name aliases, read once per build."""

    aliases: dict[str, str] = {}


def _read_aliases(app) -> None:
    _Names.aliases = name_aliases(app.config.jaxmetric_package)


def _resolve_imported_name(app, env, node, contnode):
    """A reference that the Python domain did not find, by the name it has where it is
    written: ``:class:`TrainConfig``` in a module that imports it, or
    ``jaxmetric.losses.triplet_loss`` (defined in ``jaxmetric.losses.triplet``)."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".")
    module, cls = node.get("py:module"), node.get("py:class")
    candidates = [target, f"{app.config.jaxmetric_package}.{target}"]
    if module and cls:
        candidates.append(f"{module}.{cls}.{target}")
    if module:
        candidates.append(f"{module}.{target}")
    domain = env.get_domain("py")
    for name in candidates:
        defined = resolve_alias(name, _Names.aliases)
        if defined != name:
            found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                        defined, node, contnode)
            if found is not None:
                return found
    # Last, a name that ends exactly one documented full name of the package
    # (``:func:`eval_view``` written in another module than the one defining it).
    suffix = "." + target
    matches = [full for full in domain.objects
               if full.endswith(suffix) and full.startswith(app.config.jaxmetric_package + ".")
               and not domain.objects[full].aliased]
    if len(matches) == 1:
        return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                   matches[0], node, contnode)
    return None


REFERENCES = re.compile(r"^(\s*)References:\s*$")


def references_as_list(lines: list[str]) -> None:
    """A ``References:`` section whose entries hang (continuation lines indented deeper
    than the first) becomes a bullet list, one item per reference, in place; a section
    without hanging lines is one paragraph and stays as it is."""
    i = 0
    while i < len(lines):
        match = REFERENCES.match(lines[i])
        i += 1
        if not match:
            continue
        head = len(match.group(1))
        end = i
        while end < len(lines) and (not lines[end].strip() or
                                    len(lines[end]) - len(lines[end].lstrip()) > head):
            end += 1
        body = [line for line in lines[i:end] if line.strip()]
        if not body:
            continue
        base = min(len(line) - len(line.lstrip()) for line in body)
        if all(len(line) - len(line.lstrip()) == base for line in body):
            continue
        items = []
        for line in body:
            text = line.strip()
            if len(line) - len(line.lstrip()) == base:
                items.append(" " * base + "- " + text)
            else:
                items.append(" " * (base + 2) + text)
        lines[i:end] = [*items, ""]
        i += len(items) + 1


def _references(app, what, name, obj, options, lines):
    references_as_list(lines)


def _no_borrowed_docstring(app, what, name, obj, options, lines):
    """A constant without a docstring of its own is shown by its value alone, not with
    the docstring of its type (``dict``) or of what it wraps (a ``partial``'s class)."""
    if what != "data":
        return
    module, _, short = name.rpartition(".")
    layout = app.config.autosummary_context.get("layout", {})
    if short in layout.get(module, {}).get("constants", ()):
        lines[:] = []


def _skip_borrowed_members(app, what, name, obj, skip, options):
    """In a class, an attribute whose value is a function or class of another name
    (``dtype = jnp.float32``, ``act = nn.relu``) is a field with a default, not a method
    or a nested class: its value's docstring is not the field's (the class docstring's
    ``Attributes:`` documents it)."""
    if what == "class" and (inspect.isfunction(obj) or inspect.isclass(obj)) and \
            getattr(obj, "__name__", name) != name:
        return True
    return None


class _PlainAttributeDocstrings:
    """Data, attribute and property docstrings are plain reST here: napoleon would read
    a first line ``Fewest classes on either side: 2`` as a type and its description.
    Their lines are kept before napoleon runs and put back after it."""

    kept: dict[tuple[str, str], list[str]] = {}

    @classmethod
    def keep(cls, app, what, name, obj, options, lines):
        if what in ("data", "attribute", "property"):
            cls.kept[(what, name)] = list(lines)

    @classmethod
    def restore(cls, app, what, name, obj, options, lines):
        if (what, name) in cls.kept:
            lines[:] = cls.kept.pop((what, name))


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
            if value.startswith("{"):  # choices: room to wrap between them
                value = value.replace(",", ", ")
            rows.append((flags, value, text))
        if rows:
            # argparse's group of the flags outside any group is "options"
            groups.append((group.title if group.title != "options" else "general", rows))
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
    """Links of the Markdown pages to files outside docs/: ``../README.md`` and
    ``../CHANGELOG.md`` lead to the site's pages that show them; any other file that
    exists (a result folder's README.md) is shipped with the site as a download."""
    env = app.env
    srcdir = pathlib.Path(app.srcdir).resolve()
    root = srcdir.parent
    here = pathlib.Path(env.doc2path(env.docname)).parent
    for node in list(doctree.findall(addnodes.download_reference)) + [
            n for n in doctree.findall(addnodes.pending_xref)
            if n.get("refdomain") == "doc" and n.get("reftype") == "myst"]:
        target = node["reftarget"]
        if isinstance(node, addnodes.download_reference):
            path = (here / target).resolve()
        else:  # MyST names a Markdown file without its .md: by its absolute path when
            # it lies outside docs/, else as a docname
            path = pathlib.Path(target + ".md").resolve()
            if not path.is_absolute() or path.is_relative_to(srcdir) or not path.exists():
                continue
        page = PAGES_FOR_FILES.get(path.name) if path.parent == root else None
        if page is not None:
            new = addnodes.pending_xref("", refdomain="doc", reftarget=page,
                                        reftargetid=None, refdoc=env.docname,
                                        reftype="myst",
                                        refexplicit=node.get("refexplicit", True))
        elif isinstance(node, addnodes.pending_xref) and path.is_file():
            new = addnodes.download_reference(
                "", refdomain=None, reftarget=os.path.relpath(path, here),
                refdoc=env.docname, reftype="myst", refexplicit=True)
        else:
            continue
        for child in node.children:
            child = child.deepcopy()
            if isinstance(child, nodes.Element) and page is not None:
                child["classes"] = [c for c in child["classes"] if c != "download"]
            new += child
        node.replace_self(new)


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
    if not str(app.env.doc2path(app.env.docname)).endswith(".md") or \
            app.env.docname in app.config.jaxmetric_plain_names_in:
        return
    for literal in list(doctree.findall(nodes.literal)):
        text = literal.astext()
        name = text.removesuffix("()")
        if not FULL_NAME.fullmatch(name) or any(p.startswith("_") for p in name.split(".")) \
                or isinstance(literal.parent, (
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
    app.add_config_value("jaxmetric_package", "jaxmetric", "env")
    app.add_config_value("jaxmetric_plain_names_in", [], "env")
    app.connect("builder-inited", _read_aliases)
    app.connect("missing-reference", _resolve_imported_name, priority=600)
    app.connect("autodoc-skip-member", _skip_borrowed_members)
    app.connect("autodoc-process-docstring", _no_borrowed_docstring, priority=250)
    app.connect("autodoc-process-docstring", _references, priority=300)
    app.connect("autodoc-process-docstring", _PlainAttributeDocstrings.keep, priority=400)
    app.connect("autodoc-process-docstring", _PlainAttributeDocstrings.restore, priority=600)
    app.add_directive("argparse-flags", ArgparseFlags)
    # Before sphinx.environment.collectors.asset collects the downloads (priority 500).
    app.connect("doctree-read", _link_files_to_pages, priority=400)
    app.connect("doctree-read", _link_full_names)
    # After the Python domain and intersphinx have tried (they run at priority 500).
    app.connect("missing-reference", _unlinked_but_real, priority=900)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
