"""The import layers of deeper/ and stages/ hold: nothing imports in a circle, and no module imports from a
layer above its own. The layer table is docs/ARCHITECTURE.md's "Layers" section, read here, so the diagram a
reader trusts is the rule the tests keep.

The graph is read from the source with `ast` (no import runs, no extra dependency) and counts every import: at
module level, inside functions (the lazy imports that once hid the library's one circle) and under
TYPE_CHECKING, plus a dotted string that names a repository module (a registry that `importlib` loads by name,
such as deeper.llm's BACKENDS). Files are read when a test runs (through `REPO`), so the checks can be run on
an edited copy of the tree."""

from __future__ import annotations

import re

import pytest

from scripts.import_graph import PACKAGES, imports
from tests.conftest import REPO

# package markers that may stay out of the table: they hold a docstring and a version, and import nothing
MARKERS = {"deeper"}


def layers(text: str) -> list[tuple[str, list[str]]]:
    """[(layer, [module prefixes])] from the table of the "## Layers" section, top layer first."""
    section = re.search(r"^## Layers\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    assert section, "docs/ARCHITECTURE.md has no '## Layers' section"
    rows = re.findall(r"^\| ([^|`]+?) \| ([^|]+) \|", section.group(1), re.MULTILINE)
    table = [(layer, re.findall(r"`([\w.]+)`", cell)) for layer, cell in rows if layer != "layer"]
    assert len(table) >= 3 and all(names for _, names in table), f"no layer table under '## Layers': {rows}"
    return table


def layer_of(module: str, table) -> int | None:
    """The index (0: top) of the layer whose entry is the longest prefix of `module`: an entry names a module
    and everything under it, so `deeper.llm.base` may sit lower than the rest of `deeper.llm`."""
    best = None
    for index, (_, names) in enumerate(table):
        for name in names:
            covers = module == name or module.startswith(name + ".")
            if covers and (best is None or len(name) > len(best[1])):
                best = (index, name)
    return best[0] if best else None


def upward(graph, table) -> list[str]:
    """One line per import of a module from a layer above its own."""
    found = []
    for module, targets in graph.items():
        own = layer_of(module, table)
        for target, line in targets:
            theirs = layer_of(target, table)
            if own is not None and theirs is not None and theirs < own:
                found.append(
                    f"{module}:{line} ({table[own][0]}) imports {target} ({table[theirs][0]}, above)"
                )
    return sorted(found)


def circle(graph) -> list[str]:
    """The modules of one import circle, first one repeated at the end (empty when there is none)."""
    edges = {module: sorted({target for target, _ in targets}) for module, targets in graph.items()}
    state, path = {}, []  # state: 1 on the current path, 2 done

    def visit(module):
        state[module] = 1
        path.append(module)
        for target in edges.get(module, ()):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return []

    for module in sorted(edges):
        if module not in state and (found := visit(module)):
            return found
    return []


@pytest.fixture(scope="module")
def tree():
    return imports(REPO), layers((REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8"))


def test_every_module_has_a_layer(tree):
    graph, table = tree
    missing = [m for m in graph if m not in MARKERS and layer_of(m, table) is None]
    assert not missing, f"add these modules to the table of docs/ARCHITECTURE.md's '## Layers': {missing}"
    assert not any(graph[m] for m in MARKERS), "a package marker outside the table imports a module"


def test_no_module_imports_in_a_circle(tree):
    graph, _ = tree
    found = circle(graph)
    assert not found, "import circle: " + " -> ".join(found)


def test_no_module_imports_from_a_layer_above_its_own(tree):
    graph, table = tree
    found = upward(graph, table)
    assert not found, "upward imports (docs/ARCHITECTURE.md, '## Layers'):\n" + "\n".join(found)


def test_the_checks_see_a_function_level_upward_import_and_its_circle(tmp_path):
    """The rule bites: a lazy import inside a function is an import, and counts for both checks."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "deeper" / "rollout.py").write_text("from deeper.params import number\n")
    (tmp_path / "deeper" / "params.py").write_text("def check():\n    from deeper import rollout\n")
    (tmp_path / "stages" / "evaluate.py").write_text("from deeper.rollout import run\n")
    table = [
        ("commands", ["stages"]),
        ("orchestration", ["deeper.rollout"]),
        ("foundations", ["deeper.params"]),
    ]
    graph = imports(tmp_path)
    assert graph["deeper.params"] == [("deeper.rollout", 2)]
    assert upward(graph, table) == [
        "deeper.params:2 (foundations) imports deeper.rollout (orchestration, above)"
    ]
    assert circle(graph) == ["deeper.params", "deeper.rollout", "deeper.params"]
    (tmp_path / "deeper" / "params.py").write_text("def check():\n    pass\n")
    assert upward(imports(tmp_path), table) == [] and circle(imports(tmp_path)) == []
