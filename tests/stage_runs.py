"""Running stages for real: scratch DVC repositories (the venv's `dvc` CLI, as `make test` puts it on PATH),
the model calls a stage printed, the rows of a response cache.

`init_repo` makes an empty git + DVC repo. `pipeline_repo` makes one that runs stages of this project's own
dvc.yaml for real: a copy of deeper/ and stages/ (their dvc.yaml deps), the named stages as dvc.yaml defines
them, this repo's params.yaml with dotted overrides (like `dvc exp run -S`), and model folders under
models/embedded/ (a dep of every LLM stage). Its inputs (e.g. data/window/windows.parquet) are the test's own.
`stage_calls` reads the counts an LLM stage prints (stages._cli.echo_calls); `cached_rows` reads the sqlite
response cache (deeper.llm.cache) while a stage may be writing it.
"""

from __future__ import annotations

import ast
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

from deeper.llm.cache import DB_NAME
from tests.conftest import REPO

DVC = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
CODE_DIRS = ("deeper", "stages")


def dvc_env(**extra: str) -> dict:
    """The environment `dvc` runs in: no analytics, this venv's python first on PATH (stage commands say
    `python`), plus `extra`."""
    return {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **extra,
    }


def dvc_run(
    *args: str, cwd: Path, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`dvc <args>` with its stdout and stderr (a stage's output goes to dvc's), whatever its exit code."""
    return subprocess.run(
        [DVC, *args],
        cwd=cwd,
        env=env or dvc_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def dvc(*args: str, cwd: Path, env: dict | None = None) -> str:
    """`dvc <args>`, which must succeed; its stdout."""
    done = dvc_run(*args, cwd=cwd, env=env)
    assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def init_repo(repo: Path, dvcignore: bool = False) -> Path:
    """An empty git + DVC repo at `repo`; with `dvcignore`, this project's .dvcignore."""
    repo.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc("init", "-q", cwd=repo)
    if dvcignore:
        shutil.copy(REPO / ".dvcignore", repo / ".dvcignore")
    return repo


def pipeline_repo(repo: Path, stages: list[str], overrides: dict, models: dict[str, Path]) -> Path:
    """A scratch repo that runs `stages` of this project's dvc.yaml (copied code, real commands).

    overrides: dotted params keys -> values set in a copy of params.yaml ("models.frozen": {...} replaces
    the whole block). models: folder name under models/embedded -> a model folder to copy there.
    """
    init_repo(repo, dvcignore=True)
    for name in CODE_DIRS:
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    defined = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {s: defined[s] for s in stages}}, sort_keys=False)
    )
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name, folder in models.items():
        shutil.copytree(folder, repo / "models" / "embedded" / name)
    return repo


def stage_calls(output: str, role: str) -> dict:
    """The counts an LLM stage printed for its model `role` (its last such line): the backend's `calls`,
    tokens, retries, failures, and the response cache's `cache_hits` and `cache_misses`."""
    lines = [line for line in output.splitlines() if line.startswith(f"{role}: {{")]
    assert lines, f"no `{role}: {{...}}` line in the stage's output:\n{output}"
    return ast.literal_eval(lines[-1].removeprefix(f"{role}: "))


def cached_rows(cache_dir: Path) -> dict[str, tuple[str, float]]:
    """key -> (value, created) of every committed row of a response cache; empty before the stage made it."""
    db = Path(cache_dir) / DB_NAME
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return {
                key: (value, created)
                for key, value, created in conn.execute("SELECT key, value, created FROM responses")
            }
    except sqlite3.OperationalError:  # the table is not created yet
        return {}
