"""The package's import graph, read from the source (ast, nothing executed): no cycle, and the layering of
recipes (a recipe never imports another recipe; the library never imports a recipe).

Every import counts, also those inside functions: a cycle hidden in a function still ties two modules
together. ``from llmlab.train import Trainer`` is followed through the package's lazy export table
(``_LAZY`` in its ``__init__.py``) to the module that defines ``Trainer``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llmlab"
# Shared by the recipes; everything else in llmlab/recipes/ is one stage's recipe.
RECIPE_SHARED = {"llmlab.recipes", "llmlab.recipes.common", "llmlab.recipes.rl_loop"}
# Above the recipes: they may import them (command modules, the pipeline orchestrator, the demo app).
ABOVE_RECIPES = ("llmlab.pipeline", "llmlab.apps", "llmlab.cli", "llmlab.__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def lazy_table(tree: ast.Module) -> dict[str, str]:
    """A package ``__init__``'s ``_LAZY = {"name": "module", ...}`` table."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            if isinstance(node.value, ast.Dict):
                return {
                    k.value: v.value
                    for k, v in zip(node.value.keys, node.value.values)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)
                }
    return {}


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """module -> the llmlab modules it imports (directly, or as the parent packages Python runs first)."""
    modules = all_modules()
    trees = {m: ast.parse(p.read_text(encoding="utf-8"), str(p)) for m, p in modules.items()}
    lazy = {m: lazy_table(t) for m, t in trees.items() if modules[m].name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for mod, tree in trees.items():
        is_pkg = modules[mod].name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        targets.add(sub)
                    elif base in lazy and alias.name in lazy[base]:
                        targets.add(lazy[base][alias.name])
                    else:
                        targets.add(base)
        edges: set[str] = set()
        for t in targets:
            if t in modules:
                edges.add(t)
                edges.update(p for p in _parents(t) if p in modules)
        edges.discard(mod)
        # A module's own parent packages are already running when it is imported: not a new dependency.
        edges.difference_update(_parents(mod))
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def is_recipe(mod: str) -> bool:
    return mod.startswith("llmlab.recipes.") and mod not in RECIPE_SHARED


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_recipe_never_imports_another_recipe():
    graph = import_graph()
    bad = [(m, t) for m, ts in graph.items() if is_recipe(m) for t in ts if is_recipe(t) and t != m]
    assert not bad, f"recipe imports another recipe: {bad}"


def test_the_library_never_imports_a_recipe():
    graph = import_graph()
    bad = [
        (m, t)
        for m, ts in graph.items()
        if not m.startswith("llmlab.recipes") and not m.endswith(".cli") and not m.startswith(ABOVE_RECIPES)
        for t in ts
        if t.startswith("llmlab.recipes.")
    ]
    assert not bad, f"library module imports a recipe: {bad}"


def test_the_model_never_imports_quant():
    graph = import_graph()
    bad = [
        (m, t)
        for m, ts in graph.items()
        if m.startswith("llmlab.model")
        for t in ts
        if t.startswith("llmlab.quant")
    ]
    assert not bad, f"model/ reaches up into quant/: {bad}"


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert find_cycle(graph) == cycle


def test_lazy_exports_are_followed(tmp_path):
    """``from llmlab.train import Trainer`` is an edge to llmlab.train.trainer, not to the lazy package."""
    graph = import_graph()
    assert "llmlab.train.trainer" in graph["llmlab.recipes.sft"]
