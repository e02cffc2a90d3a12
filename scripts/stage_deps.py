"""Write each stage's code dependencies into dvc.yaml from the import graph, so no person keeps them by hand.

    python scripts/stage_deps.py            # rewrite the code deps of every stage in dvc.yaml
    python scripts/stage_deps.py --check    # exit 1 naming each stale stage (tests/test_stage_deps.py runs it)

A stage's code deps are the files of every module whose code `python -m stages.<name>` may run (`reached`: what
it imports, directly or through others, at module level or inside a function, or names in a registry string,
scripts/import_graph.py, and the packages whose __init__ runs on the way); then:
- a package folder replaces its files where the stage imports every module of it, or where the folder holds
  data files next to its code (the prompt templates of deeper/prompts): a new file there is a dep at once;
- left out, with what only they import: modules that cannot change an output (package markers of deeper/ and
  stages/, stages/_cli.py which prints errors and checks params with the whole-file validator, deeper/errors.py
  which holds messages): a change there stops a stage or changes nothing, and would re-run the whole DAG.
Every other dep (data, models, `${...}` templates) stays as written, after the code, in its order. dvc.yaml is
rewritten with ruamel.yaml's round trip (comments and layout kept; a file without a change is the same bytes).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.import_graph import PACKAGES, imports, modules

EXEMPT = {"deeper/__init__.py", "stages/__init__.py", "stages/_cli.py", "deeper/errors.py"}


def _yaml():
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def stage_module(body: dict) -> str:
    return next(word for word in str(body["cmd"]).split() if word.startswith("stages."))


def reached(root: Path, stage: str, known=None, graph=None, eager=None) -> set[str]:
    """The modules whose code a run of `stage` may execute. A module the code imports (at module level or in a
    function, or by a registry string) may have any of its functions called: its imports are followed the same
    way. A package whose submodule is imported runs its __init__, but only that file's module-level imports:
    those are followed only at module level. The exempt modules' imports are not followed (stages/_cli.py
    imports the whole-file params validator, which imports every block's owner; checking params never changes
    an output)."""
    known = known or modules(root)
    graph = graph or imports(root)
    eager = eager or imports(root, eager=True)
    stop = {m for m, p in known.items() if p.relative_to(root).as_posix() in EXEMPT}
    full, only_eager = set(), set()
    todo = [(stage, True)]
    while todo:
        module, is_full = todo.pop()
        if module in full or (not is_full and module in only_eager):
            continue
        (full if is_full else only_eager).add(module)
        if module in stop:
            continue
        edges = graph if is_full else eager
        todo.extend((target, is_full) for target, _line in edges.get(module, ()))
        parts = module.split(".")
        todo.extend(
            (".".join(parts[:i]), False) for i in range(1, len(parts)) if ".".join(parts[:i]) in known
        )
    return full | only_eager


def code_deps(root: Path, stage: str, graph=None, known=None, eager=None) -> list[str]:
    """The code deps of the stage whose module is `stage` (e.g. stages.contexts), stage file first."""
    known = known or modules(root)
    mods = reached(root, stage, known, graph, eager)
    files = {known[m].relative_to(root).as_posix() for m in mods} - EXEMPT
    packages = sorted(
        {p.parent.relative_to(root).as_posix() for p in known.values() if p.name == "__init__.py"}
        - set(PACKAGES),
        key=lambda p: (p.count("/"), p),
    )
    for package in packages:  # top-down: a collapsed folder takes its subpackages with it
        if any(f == package or f.startswith(package + "/") for f in files if not f.endswith(".py")):
            continue  # already collapsed into a parent folder
        inside = {f for f in files if f.startswith(package + "/")}
        if not inside:
            continue
        folder = root / package
        code = {p.relative_to(root).as_posix() for p in folder.rglob("*.py")} - EXEMPT
        has_data = any(
            p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts for p in folder.rglob("*")
        )
        if has_data or code <= files:
            files = (files - inside) | {package}
    own = f"{stage.replace('.', '/')}.py"
    return [own, *sorted(files - {own})]


def is_code(dep: str) -> bool:
    return str(dep).startswith(tuple(f"{p}/" for p in PACKAGES))


def updated(root: Path) -> tuple[str, list[str]]:
    """dvc.yaml's text with every stage's code deps regenerated, and the stages whose deps changed."""
    yaml = _yaml()
    path = root / "dvc.yaml"
    doc = yaml.load(path.read_text(encoding="utf-8"))
    known, graph, eager = modules(root), imports(root), imports(root, eager=True)
    changed = []
    for name, stage in doc["stages"].items():
        body = stage.get("do", stage)
        deps = body.get("deps")
        if deps is None:
            continue
        new = code_deps(root, stage_module(body), graph, known, eager) + [d for d in deps if not is_code(d)]
        if [str(d) for d in deps] != new:
            changed.append(name)
            deps[:] = new
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue(), changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="Only check: exit 1 naming each stale stage.")
    args = parser.parse_args(argv)
    text, changed = updated(ROOT)
    if args.check:
        if changed:
            print(
                f"dvc.yaml: stale code deps of {', '.join(changed)}: run `python scripts/stage_deps.py`",
                file=sys.stderr,
            )
            return 1
        return 0
    if changed:
        (ROOT / "dvc.yaml").write_text(text, encoding="utf-8")
    print(
        f"dvc.yaml: code deps of {len(changed)} stages rewritten"
        + (f" ({', '.join(changed)})" if changed else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
