"""Apply a profile (profiles/<name>.yaml: params overrides) as a DVC experiment.

\b
    python -m stages.profile paper                  # check it; print the `dvc exp run -S ...` command
    python -m stages.profile paper --run            # run that command
    python -m stages.profile paper --run -S ingest.root=/data/deeper-raw --name paper
                                                    # other arguments go to `dvc exp run`, after the profile's
                                                    # (after `--` all of them, e.g. a dvc option named --params)

Not a pipeline stage: it only composes `dvc exp run`. Every key of the profile must exist in params.yaml, and
the resulting params pass the stages' own validator (deeper.validate: every block, from fetch to evaluate)
before anything runs; nothing here needs a GPU, a server or a key. A profile with a parity table
(deeper/parity.py: the paper) prints it first, on stderr: each setting of the paper and of the authors' code,
the profile's value, the test that pins it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import click

from deeper.config import load_params
from deeper.parity import PARITY, render
from deeper.profile import apply_profile, dvc_flags, load_profile
from deeper.validate import check_params
from stages._cli import PARAMS_OPTION, user_errors


def checked(
    name: str, params_path: str = "params.yaml", extra: tuple[str, ...] = ()
) -> tuple[list[str], dict]:
    """The checked `dvc exp run` command of profile `name` (argv, no shell) and the params it gives."""
    params = load_params(params_path)
    entries = load_profile(name, params)
    applied = apply_profile(params, entries)
    check_params(applied)
    return ["dvc", "exp", "run", *dvc_flags(entries), *extra], applied


def command(name: str, params_path: str = "params.yaml", extra: tuple[str, ...] = ()) -> list[str]:
    """The checked `dvc exp run` command of profile `name` (argv, no shell)."""
    return checked(name, params_path, extra)[0]


def print_plan(applied: dict, params_path: str, sample: str, as_json: bool) -> None:
    """The profile's cost and time plan (deeper.plan) on stdout."""
    import json

    from deeper.errors import ConfigError
    from deeper.iteration import user_windows
    from deeper.personas import token_counter
    from deeper.plan import PlanSettings, PromptSizes, plan_lines, planned_users, price_lines, render, totals
    from deeper.tables import read_windows

    windows = read_windows(sample)  # a one-line error names the file, and `dvc repro window` that writes it
    settings = PlanSettings.from_params(applied)
    notes = []
    tokenizer = str(applied["persona"]["tokenizer"])
    try:
        count = token_counter(tokenizer, local_only=True)  # a plan never waits on the network
    except ConfigError:  # a hub tokenizer not in the local cache: count with the workspace's own
        fallback = str(load_params(params_path)["persona"]["tokenizer"])
        count = token_counter(fallback, local_only=True)
        notes.append(
            f"tokens counted with {fallback}: persona.tokenizer {tokenizer} is not on this machine "
            f"(counts of other tokenizers differ by some percent)"
        )
    sizes = PromptSizes(
        applied,
        user_windows(windows, "train")[:SAMPLE_USERS],
        user_windows(windows, "eval")[:SAMPLE_USERS],
        count,
        settings.persona_tokens,
    )
    users, per_domain = planned_users(applied)
    lines = plan_lines(applied, users, sizes, settings)
    notes += price_lines(applied, lines, settings)
    notes.append(
        "not planned: DPO training (train@1, train@2; its pairs are only known once rewards exist), calls "
        "retried after a degenerate persona or an unparsable answer (the stage metrics count them)"
    )
    if any(
        src.get("format") == "deeper_windows"
        for src in applied["ingest"]["presets"][applied["ingest"]["preset"]]
    ):
        notes.append(
            "users as window.domains asks; a source with its own split (the authors' windows) holds at most its own "
            "users and fewer for training (docs/data.md counts them), so fewer calls than planned"
        )
    notes.append(
        f"prompts rendered on {len(sizes.train_users)} training and {len(sizes.eval_users)} evaluation users "
        f"of {sample}"
    )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "users": {"train": users.train, "eval": users.eval},
                    "per_domain": per_domain,
                    "stages": [vars(line) for line in lines],
                    "total": totals(lines),
                    "notes": notes,
                },
                indent=1,
                sort_keys=True,
            )
        )
    else:
        click.echo(render(applied, lines, users, per_domain, notes), nl=False)


SAMPLE_USERS = 20  # users of each split whose prompts are rendered: enough for a mean, seconds to render


@click.command(help=__doc__, context_settings={"ignore_unknown_options": True})
@PARAMS_OPTION
@click.option("--run", "run_it", is_flag=True, help="Run `dvc exp run` instead of printing the command.")
@click.option(
    "--plan",
    "plan_it",
    is_flag=True,
    help="Print the cost and time plan instead: per stage that calls a model, the calls, prompt and "
    "completion tokens, dollars (live and Batch API) and GPU-hours (deeper/plan.py says how each "
    "is counted; prices and GPU speed are params `plan`).",
)
@click.option(
    "--sample",
    default="data/window/windows.parquet",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="With --plan: the windows file whose users the prompts are rendered on.",
)
@click.option("--json", "as_json", is_flag=True, help="With --plan: print the plan as JSON.")
@click.argument("name")
@click.argument("dvc_args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def main(params_path, run_it, plan_it, sample, as_json, name, dvc_args):
    argv, applied = checked(name, params_path, dvc_args)
    if plan_it:
        print_plan(applied, params_path, sample, as_json)
        return
    if name in PARITY:
        click.echo(render(PARITY[name], applied) + "\n", err=True)
    if not run_it:
        click.echo(shlex.join(argv))
        return
    click.echo(f"running: {shlex.join(argv)}", err=True)
    sys.exit(subprocess.call(argv, env=with_interpreter_on_path()))


def with_interpreter_on_path() -> dict:
    """The environment with this interpreter's bin folder first on PATH: `dvc` and the stages' `python -m ...`
    commands are then this environment's, also when the venv was not activated (`.venv/bin/python -m
    stages.profile ...`)."""
    bin_dir = os.path.dirname(sys.executable)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


if __name__ == "__main__":
    main()
