"""The paper's ablations (Tables 19-21) as queued DVC experiments, and their comparison table.

\b
    python -m stages.ablations run       # queue all, run the queue (one at a time), write the table
    python -m stages.ablations queue     # only queue: `dvc exp run --queue -n ablation-<name> -S ...`
    python -m stages.ablations start     # run the queue (`dvc queue start`) and wait for it
    python -m stages.ablations table     # the table from `dvc exp show --json` -> results/ablations/

Ablations (profiles/ablations/<name>.yaml): future_only and decayed reward weights (Table 19), inc_ft (Table 21:
the RL pipeline on IncUpdate's prompt), qwen_backbone (Table 26: DPO trains another model on the same pairs);
Table 20 (iteration 1 vs 2) is every row's Model 1 vs Model 2 column.
Each experiment starts from HEAD's committed outputs, so only the stages its params reach re-run (from the DVC
cache after `make repro`). Not a pipeline stage: it only composes `dvc exp run` / `dvc queue` / `dvc exp show`.
Queued experiments run in temporary copies of the repo; the response cache and downloads stay shared through
$DEEPER_CACHE_DIR (set to ./.cache/deeper unless already set). Run it from the repository's root.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click

from deeper.ablations import available, comparison, experiment_name, markdown, queue_commands, write
from deeper.config import load_params
from deeper.errors import DeeperError
from stages._cli import PARAMS_OPTION, user_errors

UNFINISHED = ("Queued", "Running")


def _dvc(*args: str, capture: bool = False, env: dict | None = None) -> str:
    done = subprocess.run(
        ["dvc", *args], env=env, text=True, check=False, stdout=subprocess.PIPE if capture else None
    )
    if done.returncode != 0:
        raise DeeperError(f"`dvc {shlex.join(args)}` exited with {done.returncode}")
    return done.stdout or ""


def _queue(params_path: str, names: tuple[str, ...]) -> list[str]:
    commands = queue_commands(load_params(params_path), list(names))
    for argv in commands:
        click.echo(f"queueing: {shlex.join(argv)}", err=True)
        _dvc(*argv[1:])
    return [argv[argv.index("-n") + 1] for argv in commands]


def _statuses(names: list[str]) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from `dvc queue status` (last column)."""
    found = {}
    for line in _dvc("queue", "status", capture=True).splitlines():
        words = line.split()
        for name in names:
            if name in words:
                found[name] = words[-1]
    return found


def _start(names: list[str], poll_seconds: float) -> None:
    env = {**os.environ}
    env.setdefault("DEEPER_CACHE_DIR", str(Path.cwd() / ".cache" / "deeper"))
    _dvc("queue", "start", "--jobs", "1", env=env)
    started, last = time.monotonic(), None
    while True:
        statuses = _statuses(names)
        line = ", ".join(f"{n}: {statuses.get(n, '?')}" for n in names)
        if line != last:
            click.echo(f"[{(time.monotonic() - started) / 60:5.1f} min] {line}", err=True)
            last = line
        if not any(statuses.get(n) in UNFINISHED for n in names):
            break
        time.sleep(poll_seconds)
    failed = [n for n in names if statuses.get(n) != "Success"]
    if failed:
        raise DeeperError(
            f"experiments not successful: {', '.join(failed)}; `dvc queue logs <name>` shows why"
        )
    click.echo(
        f"all {len(names)} experiments finished in {(time.monotonic() - started) / 60:.1f} min", err=True
    )


def _table(out: str, commits: int = 1) -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], text=True, capture_output=True, check=True)
    rev = head.stdout.strip()
    rows = comparison(json.loads(_dvc("exp", "show", "--json", "-n", str(commits), capture=True)), rev)
    write(rows, Path(out), rev)
    click.echo(markdown(rows))
    click.echo(f"wrote {out}/comparison.md and comparison.json ({len(rows) - 1} ablations)", err=True)


NAMES = click.argument("names", nargs=-1, type=click.Choice(available()))
OUT = click.option(
    "--out", default="results/ablations", show_default=True, help="Folder of the comparison table."
)
POLL = click.option(
    "--poll-seconds", default=30.0, show_default=True, help="How often the queue's status is read."
)


@click.group(help=__doc__)
def main():
    pass


@main.command(help="Queue the ablations NAMES (default: all) as `dvc exp run --queue -n ablation-<name>`.")
@PARAMS_OPTION
@NAMES
@user_errors
def queue(params_path, names):
    _queue(params_path, names)


@main.command(help="Run the queued ablations one at a time (`dvc queue start -j 1`) and wait for them.")
@NAMES
@POLL
@user_errors
def start(names, poll_seconds):
    _start([experiment_name(n) for n in (names or available())], poll_seconds)


@main.command(
    help="Write the comparison table of HEAD and its ablation experiments from `dvc exp show --json`."
)
@OUT
@click.option(
    "--commits",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Also take ablations run from the COMMITS-1 commits before HEAD (the newest run of each name; "
    "the table's `baseline` column says which commit each ran from).",
)
@user_errors
def table(out, commits):
    _table(out, commits)


@main.command(help="Queue the ablations NAMES (default: all), run them, write the table.")
@PARAMS_OPTION
@NAMES
@OUT
@POLL
@user_errors
def run(params_path, names, out, poll_seconds):
    _start(_queue(params_path, names), poll_seconds)
    _table(out)


if __name__ == "__main__":
    sys.exit(main())
