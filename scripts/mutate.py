"""A small, honest mutation tester: AST mutants of a module, each run against pytest in a copy of the repo.

    python scripts/mutate.py deeper/pairs.py deeper/reward.py \
        --tests "tests/test_pairs.py tests/test_reward.py tests/test_params.py tests/test_tables.py" \
        --equivalent bench/results/mutation_equivalent.yaml --report bench/results/mutation.md

Each mutant changes one place of the source (the rest of the file stays byte for byte):
- comparisons: < <=, > >=, < >, == !=, in / not in, is / is not
- arithmetic and masks: + -, * /, // /, ** *, & |; += -=; and / or; `not x`, `-x`, `~x` -> `x`
- numbers: an int n -> n+1, n-1; a float x -> x+1, x-1, 0 (and x*10, x/10 when 0 < |x| < 1); True <-> False
- names: min max, idxmin idxmax, head tail, any all, isna notna, nsmallest nlargest
- strings that select a behaviour: "first" "last", "left" "inner", "both" "left_only", "big" "little",
  "mergesort" "quicksort", "train" "val", "coerce" "raise"
- a call of drop_duplicates, sort_values, reset_index, round, astype, copy, unique, drop, head, tail or merge
  skipped (`x.drop_duplicates(...)` -> `x`); a keyword argument dropped from a call; an `if` condition negated; a statement replaced by `pass`
Not mutated: docstrings, imports, annotations (not evaluated: `from __future__ import annotations`), and the text of
f-string messages.

The mutated file is written into a copy of the repo's tracked files (never into the checkout); a forked child of a
process that has already imported the third-party modules runs pytest (`-x`) in that copy, so subprocesses the tests
start see the mutant too. One traced run of the unmutated code maps which tests run which lines; a mutant runs only
the tests that run its lines in process, fastest first, then every test that starts a subprocess (it may import the
mutant unseen). Code that runs at import (module level, class bodies, defaults) runs every test. A mutant no test
runs survives without a run. A survivor listed in the `--equivalent` file (key -> reason) counts as equivalent; any
other survivor is a gap in the suite and the script exits 1.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

COMPARE_SWAPS = {
    ast.Lt: (ast.LtE, ast.Gt),
    ast.LtE: (ast.Lt, ast.GtE),
    ast.Gt: (ast.GtE, ast.Lt),
    ast.GtE: (ast.Gt, ast.LtE),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
}
BINOP_SWAPS = {
    ast.Add: (ast.Sub,),
    ast.Sub: (ast.Add,),
    ast.Mult: (ast.Div,),
    ast.Div: (ast.Mult,),
    ast.FloorDiv: (ast.Div,),
    ast.Pow: (ast.Mult,),
    ast.BitAnd: (ast.BitOr,),
    ast.BitOr: (ast.BitAnd,),
    ast.Mod: (ast.Mult,),
}
NAME_SWAPS = {
    "min": "max",
    "max": "min",
    "idxmin": "idxmax",
    "idxmax": "idxmin",
    "head": "tail",
    "tail": "head",
    "any": "all",
    "all": "any",
    "isna": "notna",
    "notna": "isna",
    "nsmallest": "nlargest",
    "nlargest": "nsmallest",
}
STRING_SWAPS = {
    "first": "last",
    "last": "first",
    "left": "inner",
    "both": "left_only",
    "big": "little",
    "little": "big",
    "mergesort": "quicksort",
    "train": "val",
    "val": "train",
    "coerce": "raise",
}
SKIPPABLE_METHODS = {
    "drop_duplicates",
    "sort_values",
    "reset_index",
    "round",
    "astype",
    "copy",
    "unique",
    "drop",
    "head",
    "tail",
    "merge",
}  # `x.method(...)` -> `x`
DROPPABLE = (
    ast.Assign,
    ast.AugAssign,
    ast.Expr,
    ast.Raise,
    ast.If,
    ast.For,
    ast.Continue,
    ast.Break,
    ast.Return,
)


@dataclass
class Mutant:
    path: str
    line: int
    function: str
    kind: str
    original: str
    mutated: str
    start: int  # byte offsets of the replaced span in the file
    end: int
    end_line: int
    import_time: (
        bool  # runs when the module is imported (module level, class body, defaults): every test sees it
    )
    key: str = ""
    status: str = ""  # killed / survived / equivalent / timeout / invalid
    killed_by: str = ""
    reason: str = ""


class Collector(ast.NodeVisitor):
    """Every mutant of one module, in source order."""

    def __init__(self, path: str, source: bytes):
        self.path, self.source = path, source
        starts, pos = [], 0
        for line in source.splitlines(keepends=True):
            starts.append(pos)
            pos += len(line)
        self.line_starts = starts
        self.function = "<module>"
        self.import_time = True
        self.mutants: list[Mutant] = []

    def span(self, node) -> tuple[int, int]:
        return (
            self.line_starts[node.lineno - 1] + node.col_offset,
            self.line_starts[node.end_lineno - 1] + node.end_col_offset,
        )

    def text(self, node) -> str:
        start, end = self.span(node)
        return self.source[start:end].decode()

    def add(self, node, kind: str, replacement: str, wrap: bool = True):
        start, end = self.span(node)
        self.mutants.append(
            Mutant(
                self.path,
                node.lineno,
                self.function,
                kind,
                self.text(node),
                f"({replacement})" if wrap else replacement,
                start,
                end,
                node.end_lineno,
                self.import_time,
            )
        )

    def with_field(self, node, **changes) -> str:
        new = copy.deepcopy(node)
        for name, value in changes.items():
            setattr(new, name, value)
        return ast.unparse(new)

    # ----- structure: what is not mutated
    def visit_Module(self, node):
        self.body(node.body)

    def visit_FunctionDef(self, node):
        outer, self.function = (
            self.function,
            (node.name if self.function == "<module>" else f"{self.function}.{node.name}"),
        )
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(default)
        outer_time, self.import_time = self.import_time, False
        self.body(node.body)
        self.function, self.import_time = outer, outer_time

    def visit_ClassDef(self, node):
        outer, self.function = self.function, node.name
        self.body(node.body)
        self.function = outer

    def body(self, statements):
        for i, stmt in enumerate(statements):
            if (
                i == 0
                and isinstance(stmt, ast.Expr)
                and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)
            ):
                continue  # docstring
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(stmt, DROPPABLE):
                self.add(stmt, "drop statement", "pass", wrap=False)
            self.visit(stmt)

    def visit_AnnAssign(self, node):  # dataclass fields and annotated names: the value only
        if node.value is not None:
            self.visit(node.value)

    def visit_If(self, node):
        self.add(node.test, "negate condition", f"not ({self.text(node.test)})")
        self.visit(node.test)
        self.body(node.body)
        self.body(node.orelse)

    def visit_For(self, node):
        self.visit(node.iter)
        self.body(node.body)
        self.body(node.orelse)

    def visit_With(self, node):
        for item in node.items:
            self.visit(item.context_expr)
        self.body(node.body)

    def visit_Try(self, node):
        self.body(node.body)
        for handler in node.handlers:
            self.body(handler.body)
        self.body(node.orelse)
        self.body(node.finalbody)

    def visit_JoinedStr(self, node):
        pass  # message text

    # ----- expressions
    def visit_Compare(self, node):
        for i, op in enumerate(node.ops):
            for new in COMPARE_SWAPS.get(type(op), ()):
                ops = list(node.ops)
                ops[i] = new()
                self.add(node, "comparison", self.with_field(node, ops=ops))
        self.generic_visit(node)

    def visit_BinOp(self, node):
        for new in BINOP_SWAPS.get(type(node.op), ()):
            self.add(node, "operator", self.with_field(node, op=new()))
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        for new in BINOP_SWAPS.get(type(node.op), ()):
            self.add(node, "operator", self.with_field(node, op=new()), wrap=False)
        self.visit(node.value)

    def visit_BoolOp(self, node):
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        self.add(node, "and/or", self.with_field(node, op=other))
        self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
            self.add(node, "drop unary", self.text(node.operand))
        self.generic_visit(node)

    def visit_IfExp(self, node):
        self.add(node, "negate condition", self.with_field(node, test=ast.UnaryOp(ast.Not(), node.test)))
        self.generic_visit(node)

    def visit_Constant(self, node):
        value = node.value
        if isinstance(value, bool):
            self.add(node, "constant", repr(not value))
        elif isinstance(value, int):
            for new in (value + 1, value - 1):
                self.add(node, "constant", repr(new))
        elif isinstance(value, float):
            news = [value + 1, value - 1] + ([0.0] if value != 0 else [])
            if 0 < abs(value) < 1:
                news += [value * 10, value / 10]
            for new in dict.fromkeys(news):
                self.add(node, "constant", repr(new))
        elif isinstance(value, str) and value in STRING_SWAPS:
            self.add(node, "string", repr(STRING_SWAPS[value]))

    def visit_Name(self, node):
        if node.id in NAME_SWAPS and isinstance(node.ctx, ast.Load):
            self.add(node, "name", NAME_SWAPS[node.id])

    def visit_Attribute(self, node):
        if node.attr in NAME_SWAPS:
            self.add(node, "name", self.with_field(node, attr=NAME_SWAPS[node.attr]))
        self.generic_visit(node)

    def visit_Call(self, node):
        if isinstance(node.func, ast.Attribute) and node.func.attr in SKIPPABLE_METHODS:
            self.add(node, f"skip .{node.func.attr}()", self.text(node.func.value))
        for i in range(len(node.keywords)):
            if node.keywords[i].arg is not None:
                self.add(
                    node,
                    f"drop {node.keywords[i].arg}=",
                    self.with_field(node, keywords=node.keywords[:i] + node.keywords[i + 1 :]),
                )
        self.generic_visit(node)


def collect(path: str) -> list[Mutant]:
    source = (REPO / path).read_bytes()
    collector = Collector(path, source)
    collector.visit(ast.parse(source))
    seen: dict[str, int] = {}
    for m in collector.mutants:
        base = f"{m.path} | {m.function} | {m.kind} | {' '.join(m.original.split())} -> {' '.join(m.mutated.split())}"
        seen[base] = seen.get(base, 0) + 1
        m.key = base if seen[base] == 1 else f"{base} | #{seen[base]}"
    return collector.mutants


def module_sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256((REPO / path).read_bytes()).hexdigest()


def mutated_source(m: Mutant) -> bytes:
    source = (REPO / m.path).read_bytes()
    return source[: m.start] + m.mutated.encode() + source[m.end :]


def copy_repo(dest: Path):
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(
        b"\0"
    )
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


class Recorder:
    """pytest plugin: the node id of the first failing test (or module that failed to import)."""

    def __init__(self):
        self.failed = ""

    def pytest_runtest_logreport(self, report):
        if report.failed and not self.failed:
            self.failed = report.nodeid

    def pytest_collectreport(self, report):
        if report.failed and not self.failed:
            self.failed = f"{report.nodeid} (collection)"


class Tracer:
    """pytest plugin: per test, the lines of the target files it runs in process, whether it starts a subprocess
    (which may run them too, unseen), and its duration."""

    def __init__(self, targets: dict[str, str]):
        self.targets = targets  # absolute file -> path as given
        self.tests: dict[str, dict] = {}
        self.hits: set[tuple[str, int]] = set()
        self.spawned = False

    def trace(self, frame, event, arg):
        path = self.targets.get(frame.f_code.co_filename)
        if path is None:
            return None

        def local(frame, event, arg):
            if event == "line":
                self.hits.add((path, frame.f_lineno))
            return local

        self.hits.add((path, frame.f_lineno))
        return local

    def pytest_configure(self, config):
        tracer, original = self, subprocess.Popen.__init__

        def spying_init(popen, *args, **kwargs):
            tracer.spawned = True
            original(popen, *args, **kwargs)

        subprocess.Popen.__init__ = spying_init

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        import threading

        self.hits, self.spawned, began = set(), False, time.monotonic()
        sys.settrace(self.trace)
        threading.settrace(self.trace)
        yield
        sys.settrace(None)
        threading.settrace(None)
        lines: dict[str, list[int]] = {}
        for path, line in sorted(self.hits):
            lines.setdefault(path, []).append(line)
        self.tests[item.nodeid] = {
            "lines": lines,
            "subprocess": self.spawned,
            "duration": round(time.monotonic() - began, 3),
        }


def coverage_map(copy_root: Path, tests: list[str], modules: list[str], log: Path) -> dict[str, dict]:
    """{test node id: {lines: {module: [line, ...]}, subprocess: bool, duration: s}}, in collection order, from one
    traced run of the unmutated code (in a forked child, so this process never imports the modules)."""

    def work():
        tracer = Tracer({str(copy_root / m): m for m in modules})
        return int(pytest.main([*tests, "-q", "-p", "no:cacheprovider"], plugins=[tracer])), {
            "tests": tracer.tests
        }

    outcome = forked(copy_root, log, work)
    if outcome.get("code") != 0:
        raise SystemExit(f"the unmutated code fails {' '.join(tests)}:\n{log.read_text()[-3000:]}")
    return outcome["tests"]


def warm_imports(copy_root: Path, tests: list[str], log: Path) -> int:
    """Import here every third-party module that collecting `tests` imports (pytest plugins included), so that
    each forked run starts with them loaded; the repo's own modules are never imported here."""

    def work():
        code = int(pytest.main([*tests, "--collect-only", "-q", "-p", "no:cacheprovider"]))
        files = {name: getattr(module, "__file__", None) or "" for name, module in list(sys.modules.items())}
        return code, {
            "modules": [
                name
                for name, file in files.items()
                if file.startswith((sys.prefix, sys.base_prefix)) and not file.startswith(str(copy_root))
            ]
        }

    import importlib

    loaded = 0
    for name in forked(copy_root, log, work).get("modules", []):
        try:
            importlib.import_module(name)
            loaded += 1
        except Exception:  # noqa: BLE001, S112  (imports only in its own context: the child imports it itself)
            continue
    return loaded


def select_tests(m: Mutant, tests_map: dict[str, dict]) -> list[str]:
    """The tests that can see mutant m, cheapest first: those that run its lines in process, then those that start a
    subprocess (it may import the mutant). Import-time code is seen by every test."""
    if m.import_time:
        return sorted(tests_map, key=lambda t: (tests_map[t]["subprocess"], tests_map[t]["duration"]))
    lines = set(range(m.line, m.end_line + 1))
    covering = [t for t, info in tests_map.items() if lines & set(info["lines"].get(m.path, ()))]
    in_process = sorted(
        (t for t in covering if not tests_map[t]["subprocess"]), key=lambda t: tests_map[t]["duration"]
    )
    spawning = [t for t, info in tests_map.items() if info["subprocess"] and t not in in_process]
    return in_process + spawning if covering else []


def enter_copy(copy_root: Path, log: Path):
    """In a forked child: its own process group, cwd and import path in the copy, output to the log."""
    os.setpgid(0, 0)
    os.chdir(copy_root)
    sys.path.insert(0, str(copy_root))
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def forked(copy_root: Path, log: Path, work, timeout: float | None = None) -> dict:
    """Run `work() -> (exit code, payload dict)` in a forked child inside copy_root; its {"code": ..., **payload},
    {"timeout": True} when it ran longer than `timeout` (its process group is killed), or {} when it died."""
    result = Path(tempfile.mkstemp(prefix="mutate-", suffix=".json")[1])
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            enter_copy(copy_root, log)
            code, payload = work()
            result.write_text(json.dumps({"code": code, **payload}))
        finally:
            os._exit(code)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if deadline is not None and time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            result.unlink(missing_ok=True)
            return {"timeout": True}
        time.sleep(0.05)
    try:
        outcome = json.loads(result.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        outcome = {}
    result.unlink(missing_ok=True)
    return outcome


def run_tests(copy_root: Path, tests: list[str], timeout: float, log: Path) -> tuple[str, str]:
    """Run pytest in a forked child inside copy_root: ('passed'|'failed'|'timeout'|'error', first failing test).
    Tests run in the order given."""

    def work():
        recorder = Recorder()
        code = int(pytest.main([*tests, "-x", "-q", "-p", "no:cacheprovider"], plugins=[recorder]))
        return code, {"failed": recorder.failed}

    outcome = forked(copy_root, log, work, timeout)
    if outcome.get("timeout"):
        return "timeout", ""
    if outcome.get("code") == 0:
        return "passed", ""
    if not outcome.get("failed") and outcome.get("code") != 1:
        return (
            "error",
            f"pytest exit {outcome.get('code')}: {log.read_text()[-500:]}",
        )  # usage / internal error
    return "failed", outcome.get("failed") or f"pytest exit {outcome.get('code')}"


def install(copy_root: Path, path: str, source: bytes, stamp: int):
    """Write one version of the module; a fresh mtime and no __pycache__ so no stale bytecode is ever loaded."""
    target = copy_root / path
    target.write_bytes(source)
    os.utime(target, (stamp, stamp))
    shutil.rmtree(target.parent / "__pycache__", ignore_errors=True)


def load_equivalent(path: Path | None) -> dict[str, str]:
    if path is None or not path.exists():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def run_mutants(
    args, mutants: list[Mutant], tests: list[str], equivalent: dict[str, str], shard: int, shards: int
) -> bool:
    """Run each mutant of this shard that has no status yet; False when the unmutated code fails."""
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        root, log = Path(tmp) / "repo", Path(tmp) / "pytest.log"
        copy_repo(root)
        originals = {path: (REPO / path).read_bytes() for path in args.modules}
        stamp = int(time.time()) + 10
        for path, source in originals.items():
            install(root, path, source, stamp)
        print(f"{warm_imports(root, tests, log)} modules imported before forking", flush=True)
        tests_map = coverage_map(root, tests, args.modules, log)
        status, failed = run_tests(
            root, list(tests_map), 3600, log
        )  # node ids as selected: they must run and pass
        if status != "passed":
            print(
                f"the unmutated code fails the mapped tests: {failed}\n{log.read_text()[-3000:]}",
                file=sys.stderr,
            )
            return False
        print(f"coverage of {len(tests_map)} tests mapped", flush=True)
        timeout = max(60.0, 5 * sum(info["duration"] for info in tests_map.values()))
        json_path = args.json or (args.report.with_suffix(".json") if args.report else None)
        order = list(enumerate(mutants))
        for i, m in reversed(order) if args.reverse else order:
            if m.status or i % shards != shard:
                continue  # killed in a --resume run, or another shard's
            source = mutated_source(m)
            try:
                compile(source, m.path, "exec")
            except SyntaxError:
                m.status = "invalid"
                continue
            stamp += 2
            install(root, m.path, source, stamp)
            selected = select_tests(m, tests_map)
            status, failed = run_tests(root, selected, timeout, log) if selected else ("passed", "")
            if status != "passed":
                m.status, m.killed_by = {"failed": "killed"}.get(status, status), failed
            else:
                m.status = "equivalent" if m.key in equivalent else "survived"
                m.reason = equivalent.get(m.key, "") or ("" if selected else "no test runs this line")
            install(root, m.path, originals[m.path], stamp + 1)
            if json_path:
                write_json(json_path, mutants)
            print(
                f"[{i + 1}/{len(mutants)}] {m.status:10s} {m.path}:{m.line} {m.original!r} -> {m.mutated!r}"
                f"{'  (' + m.killed_by + ')' if m.killed_by else ''}",
                flush=True,
            )

    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="+", help="module files, relative to the repo root")
    ap.add_argument(
        "--tests",
        required=True,
        help="test files (space separated); each mutant runs those of their tests that can see it",
    )
    ap.add_argument("--equivalent", type=Path, help="YAML: mutant key -> why it is equivalent")
    ap.add_argument("--lines", default="", help="only mutants on these lines, e.g. 200-215,250")
    ap.add_argument("--report", type=Path, help="write a Markdown report here (and the JSON beside it)")
    ap.add_argument(
        "--shard", default="0/1", help="K/N: run only mutants whose index is K modulo N (run N at once)"
    )
    ap.add_argument(
        "--reverse", action="store_true", help="run the mutants last to first (a second worker on a shard)"
    )
    ap.add_argument(
        "--json", type=Path, help="write every mutant's state here after each run (default: beside --report)"
    )
    ap.add_argument(
        "--resume",
        type=Path,
        action="append",
        default=[],
        help="a previous run's JSON: its killed mutants stay killed (adding tests "
        "cannot revive one; valid only while the modules are unchanged, "
        "checked), the others run again",
    )
    ap.add_argument(
        "--notes", type=Path, help="Markdown appended to the report (findings, checks of single tests)"
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: report the --resume runs' results, "
        "with the --equivalent file applied to survivors",
    )
    ap.add_argument("--list", action="store_true", help="only list the mutants")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    sys.dont_write_bytecode = True

    equivalent = load_equivalent(args.equivalent)
    lines: set[int] = set()
    for part in filter(None, args.lines.split(",")):
        low, _, high = part.partition("-")
        lines.update(range(int(low), int(high or low) + 1))
    mutants = [m for path in args.modules for m in collect(path) if not lines or m.line in lines]
    if args.list:
        for i, m in enumerate(mutants):
            print(f"{i:4d} {m.path}:{m.line} [{m.kind}] {m.original!r} -> {m.mutated!r}")
        return 0
    previous = {}
    for resume in args.resume:
        previous.update({m["key"]: m for m in json.loads(resume.read_text()) if m["status"]})
    for m in mutants:
        old = previous.get(m.key)
        if (
            not old
            or old["original"] != m.original
            or old["mutated"] != m.mutated
            or old.get("source_sha256") != module_sha256(m.path)
        ):
            continue
        if old["status"] in ("killed", "timeout"):
            m.status, m.killed_by = old["status"], old["killed_by"]
        elif old["status"] in ("survived", "equivalent") and m.key in equivalent:
            m.status, m.reason = "equivalent", equivalent[m.key]  # argued equivalent: not run again
        elif args.report_only:
            m.status, m.killed_by, m.reason = old["status"], old["killed_by"], old["reason"]
    tests = args.tests.split()

    shard, shards = (int(x) for x in args.shard.split("/"))
    if args.report_only:
        mutants = [m for m in mutants if m.status]
    elif not run_mutants(args, mutants, tests, equivalent, shard, shards):
        return 2

    mutants = [m for i, m in enumerate(mutants) if m.status or i % shards == shard]
    counts = {
        s: sum(m.status == s for m in mutants)
        for s in ("killed", "timeout", "equivalent", "survived", "invalid", "error")
    }
    print(json.dumps({"mutants": len(mutants), **counts}))
    unused = sorted(set(equivalent) - {m.key for m in mutants})
    if unused and not lines:
        print(
            f"{len(unused)} key(s) of {args.equivalent} match no mutant (the code changed: review them):",
            *unused,
            sep="\n  ",
        )
    for m in mutants:
        if m.status == "survived":
            print(f"SURVIVED  {m.key}")
    if args.report:
        write_report(args, mutants, counts)
    return 1 if counts["survived"] or counts["error"] else 0


def cell(code: str) -> str:
    """Code on one line, safe inside a Markdown table cell."""
    return " ".join(code.split()).replace("|", "\\|")


def write_report(args, mutants: list[Mutant], counts: dict):
    import importlib.metadata

    command = "python scripts/mutate.py " + " ".join(args.modules) + f' --tests "{args.tests}"'
    if args.equivalent:
        command += f" --equivalent {args.equivalent}"
    resumed = ""
    if args.resume:
        resumed = (
            f"This report resumed {', '.join(f'`{r}`' for r in args.resume)} (shards of the same command, "
            "run at once): their killed mutants and the survivors argued equivalent were not run again (the "
            "modules are byte for byte the same, checked; tests were only added since); the other survivors "
            "ran again with the final tests. The command above without `--resume` runs every mutant."
        )
        if args.report_only:
            resumed = (
                f"This report was written from {', '.join(f'`{r}`' for r in args.resume)} without running "
                "anything (`--report-only`): the results of the runs, with the equivalents file applied to "
                "the survivors. The command above without `--resume`/`--report-only` runs every mutant."
            )
    if args.notes:
        command += f" --notes {args.notes}"
    command += f" --report {args.report}"
    out = [
        "# Mutation testing of " + ", ".join(args.modules),
        "",
        (
            "Written by `scripts/mutate.py` (this repo's AST mutation runner; Python "
            f"{sys.version.split()[0]}, pytest {importlib.metadata.version('pytest')}). Reproduce from the repo root:"
        ),
        "",
        f"    OMP_NUM_THREADS=1 .venv/bin/{command}",
        "",
        *([resumed, ""] if resumed else []),
        "| mutants | killed | timeout (killed) | equivalent | survived | invalid (not compiled) | error (not run) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        (
            f"| {len(mutants)} | {counts['killed']} | {counts['timeout']} | {counts['equivalent']} | {counts['survived']} "
            f"| {counts['invalid']} | {counts['error']} |"
        ),
        "",
        "Per module:",
        "",
    ]
    for path in args.modules:
        mine = [m for m in mutants if m.path == path]
        out.append(
            f"- {path}: {len(mine)} mutants, "
            + ", ".join(
                f"{sum(m.status == s for m in mine)} {s}"
                for s in ("killed", "timeout", "equivalent", "survived")
            )
        )
    out += [
        "",
        (
            "An equivalent mutant changes no result beyond a 1e-9 tolerance; each is argued below, from the "
            "`--equivalent` file. A survivor is a gap in the suite."
        ),
        "",
    ]
    for title, status in (("Survivors (gaps)", "survived"), ("Equivalent mutants", "equivalent")):
        rows = [m for m in mutants if m.status == status]
        out += [f"## {title}: {len(rows)}", ""]
        if rows:
            out += ["| where | mutant | why |", "| --- | --- | --- |"]
            out += [
                f"| {m.path}:{m.line} `{m.function}` | `{cell(m.original)}` -> `{cell(m.mutated)}` | {m.reason} |"
                for m in rows
            ]
            out.append("")
    if args.notes:
        out += [args.notes.read_text().rstrip(), ""]
    args.report.write_text("\n".join(out) + "\n")
    write_json(args.json or args.report.with_suffix(".json"), mutants)


def write_json(path: Path, mutants: list[Mutant]):
    """Every mutant's state; written whole and renamed, so a reader never sees half a file."""
    part = path.with_name(path.name + ".part")
    part.write_text(
        json.dumps([{**asdict(m), "source_sha256": module_sha256(m.path)} for m in mutants], indent=1) + "\n"
    )
    part.replace(path)


if __name__ == "__main__":
    sys.exit(main())
