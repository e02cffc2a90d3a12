"""Shared entry wrapper for stage commands: user errors become one line on stderr and exit 1."""

from __future__ import annotations

import functools
import sys

import click

from deeper.errors import DeeperError, first_line

PARAMS_OPTION = click.option(
    "--params",
    "params_path",
    default="params.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The params file (DVC's `-S` edits params.yaml).",
)


def echo_calls(role: str, llm) -> None:
    """One line per model of an LLM stage, `<role>: {calls, tokens, ..., cache_hits, cache_misses}`: how many
    calls the backend answered and how many the response cache did (after a kill, what the re-run redid)."""
    click.echo(f"{role}: {llm.stats()}", err=True)


def user_errors(fn):
    """Print DeeperError (and a missing file) as `error: <one line>` instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeeperError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except OSError as e:  # a full disk met outside deeper.outputs (a log, a checkpoint): one line too
            from deeper.outputs import (  # here: importing it would make it every stage's dep
                DiskFull,
                is_disk_full,
            )

            if not is_disk_full(e):
                raise
            click.echo(
                f"error: {DiskFull(e.filename or 'a file the stage was writing', first_line(e))}", err=True
            )
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; re-run to resume", err=True)
            sys.exit(130)

    return wrapper


def load_checked_params(path) -> dict:
    """params.yaml, every block it has checked (deeper.validate) before the stage does any work: a bad value
    anywhere stops the first stage DVC runs, in seconds, with one line naming its key."""
    from deeper.config import load_params
    from deeper.validate import check_params

    params = load_params(path)
    check_params(params, every_block=False)
    return params
