"""The shape of the source tree: which module may import which.

Every .py file under clara/, kernels/, recipes/, data/ and nutribot/ is parsed (not imported) and
mapped to the name it installs under (pyproject's package-dir: kernels/ -> clara.kernels, ...).
From those parses:

  * no import cycle among the modules at module level (imports inside functions, and those under
    `if TYPE_CHECKING:` or `if __name__ == "__main__":`, run later or never on import, so they
    cannot leave a module half-initialised);
  * the arrows point down: clara.kernels needs nothing else of clara; clara.data needs only the
    small shared helpers (clara.files, clara.stages, clara.errors, clara.command) at import time; nothing in the library reaches
    up into clara.recipes or nutribot;
  * no file imports a bare `kernels`, `data`, `recipes`, `tests` or `bench`: those names are not
    ours once installed (`kernels` is Hugging Face's package);
  * every console script in [project.scripts] names a callable that imports.

These run in well under a second and need no subprocess.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Installed name -> folder of the checkout, as pyproject's [tool.setuptools.package-dir] says.
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
FORBIDDEN_TOP_LEVEL = {"kernels", "data", "recipes", "tests", "bench"}


@dataclass(frozen=True)
class Import:
    importer: str     # module doing the import
    target: str       # the imported name, resolved to absolute form (may be outside the tree)
    line: int
    module_level: bool  # runs when the importer is imported (not in a function, nor under
                        # `if TYPE_CHECKING:` or `if __name__ == "__main__":`)
    runs: bool = True   # runs at all: False only under `if TYPE_CHECKING:` or the __main__ guard


def _module_files() -> dict[str, Path]:
    """Installed module name -> file, for every .py under the packaged folders."""
    modules: dict[str, Path] = {}
    # Longest package names first, so a folder nested inside another one keeps its own mapping.
    for package, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(kv[0])):
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            modules.setdefault(name, path)
    return modules


MODULES = _module_files()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_main_guard(test: ast.expr) -> bool:
    """`if __name__ == "__main__":` runs only when the file is the script, never on import."""
    return isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__" and \
        len(test.comparators) == 1 and isinstance(test.comparators[0], ast.Constant) and \
        test.comparators[0].value == "__main__"


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    package = importer if is_package else importer.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def _imports_of(name: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool, runs: bool = True) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(name, alias.name, child.lineno, module_level, runs) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve_relative(name, is_package, child.level, child.module) if child.level else child.module
                for alias in child.names:
                    # `from pkg import sub` imports the submodule pkg.sub when there is one.
                    sub = f"{base}.{alias.name}"
                    target = sub if sub in MODULES else base
                    found.append(Import(name, target, child.lineno, module_level, runs))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False, runs)
            elif isinstance(child, ast.If) and (_is_type_checking(child.test) or _is_main_guard(child.test)):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), False, False)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), module_level, runs)
            else:
                # Class bodies, try/with/if blocks at module level run at import time.
                visit(child, module_level, runs)

    visit(tree, True)
    return found


IMPORTS: list[Import] = [imp for name, path in MODULES.items() for imp in _imports_of(name, path)]


def _known(target: str) -> str | None:
    """The module of the tree that importing `target` runs last (its longest known prefix)."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in MODULES:
            return candidate
    return None


def _ours(imp: Import) -> str | None:
    return _known(imp.target)


def test_the_tree_is_what_pyproject_packages():
    # A sanity check on the parse itself: the folders map to the names the layout rules talk about.
    assert set(PACKAGE_DIRS) >= {"clara", "clara.kernels", "clara.data", "clara.recipes", "nutribot"}
    assert {"clara.decoder", "clara.kernels.attention", "clara.data.formats", "clara.recipes.train_sft",
            "nutribot"} <= set(MODULES)
    assert len(IMPORTS) > 100


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in IMPORTS:
        target = _ours(imp)
        if imp.module_level and target is not None and target != imp.importer:
            graph[imp.importer].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a chain a -> b -> ... -> a) per strongly connected component of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    chains = []
    for component in components:
        start = min(component)
        # Shortest path back to start inside the component (breadth first).
        previous: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & component):
                    if w == start:
                        found = v
                        break
                    if w not in previous:
                        previous[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        chain = [start]
        v = found
        while v != start:
            chain.insert(1, v)
            v = previous[v]
        chains.append(chain + [start])
    return chains


def _where(importer: str, target: str) -> str:
    lines = sorted(imp.line for imp in IMPORTS if imp.importer == importer and imp.module_level
                   and _ours(imp) == target)
    return f"{MODULES[importer].relative_to(ROOT)}:{lines[0] if lines else '?'}"


def test_no_import_cycle_at_module_level():
    graph = _graph()
    chains = _cycles(graph)
    report = []
    for chain in chains:
        steps = [f"{a} -> {b} ({_where(a, b)})" for a, b in itertools.pairwise(chain)]
        report.append(" -> ".join(chain) + "\n      " + "\n      ".join(steps))
    assert not chains, "module-level import cycles (move one import of each into the function that needs it, " \
                       "or move the shared piece into a lower module):\n  " + "\n  ".join(report)


def test_no_cycle_in_clara_is_dodged_by_an_import_inside_a_function():
    # An import moved into a function only hides a cycle; the modules still depend on each other.
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in IMPORTS:
        target = _ours(imp)
        if imp.runs and target is not None and target != imp.importer:
            graph[imp.importer].add(target)
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]


# ---------------------------------------------------------------------------------------------
# Arrows point down
# ---------------------------------------------------------------------------------------------
def _violations(importer_prefix: str, allowed, *, module_level_only: bool) -> list[str]:
    out = []
    for imp in IMPORTS:
        if not (imp.importer == importer_prefix or imp.importer.startswith(importer_prefix + ".")):
            continue
        if module_level_only and not imp.module_level:
            continue
        target = _ours(imp)
        if target is None or allowed(target):
            continue
        out.append(f"{MODULES[imp.importer].relative_to(ROOT)}:{imp.line}: {imp.importer} imports {target}"
                   f"{'' if imp.module_level else ' (inside a function)'}")
    return out


def _within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_kernels_import_nothing_else_of_clara():
    # The hot paths sit at the bottom: torch (and optional flash-attn) only. Importing a submodule
    # runs clara/__init__.py too, which is lazy and imports nothing.
    bad = _violations("clara.kernels", lambda t: _within(t, "clara.kernels") or t == "clara", module_level_only=False)
    assert not bad, "\n".join(bad)


# What clara.data needs of the rest of clara when it is imported: the shared helpers only, so that
# `clara-data validate` and the converters load without torch or the model.
DATA_AT_IMPORT = {"clara", "clara.files", "clara.stages", "clara.errors", "clara.command"}
# ...and what a few of its functions load on demand: a tokenizer to count BPE tokens
# (clara.data.pdfs), and a local model to write QA pairs (clara.data.pdf_generators's local
# generator: clara.weights.load_base and clara.generate.generate_text).
DATA_ON_DEMAND = DATA_AT_IMPORT | {"clara.tokenizer", "clara.weights", "clara.generate"}


def test_data_imports_only_the_shared_helpers_at_import_time():
    bad = _violations("clara.data", lambda t: _within(t, "clara.data") or t in DATA_AT_IMPORT, module_level_only=True)
    assert not bad, "\n".join(bad)


def test_data_loads_only_the_tokenizer_and_generator_on_demand():
    bad = _violations("clara.data", lambda t: _within(t, "clara.data") or t in DATA_ON_DEMAND, module_level_only=False)
    assert not bad, "\n".join(bad)


def test_nothing_reaches_up_into_recipes_or_nutribot():
    bad = []
    for imp in IMPORTS:
        target = _ours(imp)
        if target is None:
            continue
        up_to_recipes = _within(target, "clara.recipes") and not _within(imp.importer, "clara.recipes", "nutribot")
        up_to_nutribot = _within(target, "nutribot") and not _within(imp.importer, "nutribot")
        if up_to_recipes or up_to_nutribot:
            bad.append(imp)
    assert not bad, "\n".join(f"{MODULES[i.importer].relative_to(ROOT)}:{i.line}: {i.importer} imports {i.target}"
                              for i in bad)


def test_no_bare_import_of_names_that_are_not_ours():
    bad = [f"{MODULES[i.importer].relative_to(ROOT)}:{i.line}: import {i.target}" for i in IMPORTS
           if i.target.split(".")[0] in FORBIDDEN_TOP_LEVEL]
    # Module names handed to importlib as strings count too (clara-data's subcommand table, clara's
    # lazy API): a dotted string such as "data.validate" that names one of our files by its folder.
    def names_a_file(value: str) -> bool:
        parts = value.split(".")
        if len(parts) < 2 or parts[0] not in FORBIDDEN_TOP_LEVEL or not all(p.isidentifier() for p in parts):
            return False
        return f"clara.{value}" in MODULES or (ROOT / Path(*parts)).with_suffix(".py").is_file() or \
            (ROOT / Path(*parts) / "__init__.py").is_file()

    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and names_a_file(node.value):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: string {node.value!r}")
    assert not bad, "\n".join(bad)


def test_top_level_names_are_only_clara_and_nutribot():
    assert {name.split(".")[0] for name in PACKAGE_DIRS} == {"clara", "nutribot"}
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == set(PACKAGE_DIRS)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]


def test_the_console_scripts_are_the_documented_set():
    assert set(SCRIPTS) == {"clara-generate", "clara-train", "clara-eval", "clara-data", "clara-plan", "clara-import",
                            "nutribot"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_points_at_an_importable_callable(script):
    module_name, _, attr = SCRIPTS[script].partition(":")
    assert attr, f"{script} = {SCRIPTS[script]!r} names no function"
    assert _within(module_name, "clara", "nutribot") and module_name in MODULES, SCRIPTS[script]
    module = importlib.import_module(module_name)
    func = module
    for part in attr.split("."):
        func = getattr(func, part)
    assert callable(func), SCRIPTS[script]


def test_clara_data_subcommands_name_modules_with_a_main():
    from clara.data.cli import SUBCOMMANDS

    assert set(SUBCOMMANDS) == {"validate", "pubmedqa", "medquad", "pdfs", "kb", "bm25", "restate"}
    for name, (module_name, _) in SUBCOMMANDS.items():
        assert module_name in MODULES, (name, module_name)
        assert callable(getattr(importlib.import_module(module_name), "main", None)), (name, module_name)


def test_the_lazy_public_api_resolves():
    import clara

    for name, module_name in clara._EXPORTS.items():
        assert module_name in MODULES, (name, module_name)
        assert getattr(clara, name) is getattr(importlib.import_module(module_name), name)
