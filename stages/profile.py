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


def checked(name: str, params_path: str = "params.yaml", extra: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    """The checked `dvc exp run` command of profile `name` (argv, no shell) and the params it gives."""
    params = load_params(params_path)
    entries = load_profile(name, params)
    applied = apply_profile(params, entries)
    check_params(applied)
    return ["dvc", "exp", "run", *dvc_flags(entries), *extra], applied


def command(name: str, params_path: str = "params.yaml", extra: tuple[str, ...] = ()) -> list[str]:
    """The checked `dvc exp run` command of profile `name` (argv, no shell)."""
    return checked(name, params_path, extra)[0]


@click.command(help=__doc__, context_settings={"ignore_unknown_options": True})
@PARAMS_OPTION
@click.option("--run", "run_it", is_flag=True, help="Run `dvc exp run` instead of printing the command.")
@click.argument("name")
@click.argument("dvc_args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def main(params_path, run_it, name, dvc_args):
    argv, applied = checked(name, params_path, dvc_args)
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
