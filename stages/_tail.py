"""The end of every stage that calls a model, in one place. Not in stages/_cli.py: that module is exempt from
dvc.yaml's generated code deps (it only checks params and prints errors), and this one writes outputs."""

from __future__ import annotations

import time

import click

from deeper.metrics import write_json
from deeper.outputs import write_parquet
from stages._cli import echo_calls


def stage_tail(
    table, out, metrics_path, summary: dict, models: dict, what: str, start: float | None = None, schema=None
) -> None:
    """The end of every stage that calls a model: its table (written whole or not at all), its metrics, one line
    of calls per model (echo_calls) and "wrote <out>: <what> in <seconds> s"."""
    write_parquet(table, out, schema)
    write_json(metrics_path, summary)
    for role, llm in models.items():
        echo_calls(role, llm)
    took = f" in {time.perf_counter() - start:.1f} s" if start is not None else ""
    click.echo(f"wrote {out}: {what}{took}", err=True)
