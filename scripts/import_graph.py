"""The import graph of deeper/ and stages/, read from the source with `ast` (no import runs, no extra dependency).

It counts every import: at module level, inside functions (lazy imports) and under TYPE_CHECKING, plus a dotted
string that names a repository module (a registry that `importlib` loads by name, such as deeper.llm's BACKENDS).
Used by tests/test_layers.py (no circle, no upward import) and scripts/stage_deps.py (each stage's code
dependencies in dvc.yaml).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("deeper", "stages")


def modules(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of every .py under the packages (a package is its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _known(name: str, known) -> str | None:
    """The longest repository module `name` is or lies in: deeper.llm.base.Sampling -> deeper.llm.base."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _walk(tree: ast.AST, eager: bool):
    """Every node of `tree`; with `eager`, only those that run when the module is imported (not the bodies of
    functions, which run when called)."""
    if not eager:
        yield from ast.walk(tree)
        return
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(
            child
            for child in ast.iter_child_nodes(node)
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        )


def imports(root: Path, eager: bool = False) -> dict[str, list[tuple[str, int]]]:
    """{module: [(repository module it imports, line), ...]}, every import statement of the file wherever it
    stands; imports of the module itself and of other libraries are left out. With `eager`, only the imports
    that run when the module is imported (module level and class bodies; no function body, no registry string)."""
    known = modules(root)
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = []
        for node in _walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), eager):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from . import x`, `from ..y import z`
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                # `from deeper.llm import cache` imports the module deeper.llm.cache, not a name of deeper.llm
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                    for alias in node.names
                ]
            elif (
                not eager
                and isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and "." in node.value
            ):
                targets = [node.value] if node.value in known else []
            for target in targets:
                module = _known(target, known)
                if module and module != name:
                    found.append((module, node.lineno))
        graph[name] = found
    return graph
