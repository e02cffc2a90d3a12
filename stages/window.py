"""Stage `window`: time-ordered windows per user and the train/eval user split -> data/window/windows.parquet.

python -m stages.window
dvc exp run -S window.size=8                 # re-runs window (and what follows), never ingest
"""

from __future__ import annotations

import click

from deeper.config import get
from deeper.data.window import make_windows, spec_from_params
from deeper.metrics import write_json
from stages._cli import PARAMS_OPTION, load_checked_params, user_errors


@click.command(
    help="""Cut each user's ratings into windows and choose train and eval users, per domain.

Raw data: a user's ratings in time order (ties in source order) make windows of `window.size`; an eval
user needs `window.count` full windows, a train user `window.train_count`. The DEEPER authors' data keeps
its own windows and train/eval split. Users are drawn with `window.seed`; the numbers per domain come
from `window.default`, overridden by `window.domains.<domain>` (more than available: all are taken and
the metrics say so). Writes one row per rating kept (domain, item_type, seen, user_id, split, window,
pos, item_id, title, rating) and per-domain counts: eligible, chosen, skipped users by reason, windows."""
)
@PARAMS_OPTION
@click.option(
    "--db",
    default="data/ingest/ratings.duckdb",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The ingest stage's database.",
)
@click.option(
    "--out",
    default="data/window/windows.parquet",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The windows file to write.",
)
@click.option(
    "--metrics",
    "metrics_path",
    default="metrics/window.json",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Per-domain user and window counts.",
)
@user_errors
def main(params_path: str, db: str, out: str, metrics_path: str) -> None:
    spec, default, overrides = spec_from_params(get(load_checked_params(params_path), "window"))
    summary = make_windows(db, out, spec, default, overrides)
    write_json(metrics_path, summary)
    for domain, s in summary["domains"].items():
        click.echo(
            f"{domain}: {s['train_users']} train / {s['eval_users']} eval users, {s['windows']} windows"
        )
        for split in ("train", "eval"):
            wanted, got = s["requested_users"][split], s[f"{split}_users"]
            if got < wanted:
                click.echo(f"{domain}: asked for {wanted} {split} users, {got} eligible; took all", err=True)


if __name__ == "__main__":
    main()
