"""Shared entry wrapper for stage commands: user errors become one line on stderr and exit 1."""

from __future__ import annotations

import functools
import sys

import click

from deeper.errors import DeeperError

PARAMS_OPTION = click.option(
    "--params", "params_path", default="params.yaml", show_default=True,
    type=click.Path(dir_okay=False), help="The params file (DVC's `-S` edits params.yaml).",
)


def user_errors(fn):
    """Print DeeperError (and a missing file) as `error: <one line>` instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeeperError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; re-run to resume", err=True)
            sys.exit(130)

    return wrapper
