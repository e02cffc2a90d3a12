"""Stage `ingest`: read the raw sources of one preset into data/ingest/ratings.duckdb.

python -m stages.ingest                      # the preset in params.yaml (embedded: MovieLens 100K)
dvc exp run -S ingest.root=../shared/data -S ingest.preset=deeper_authors
"""

from __future__ import annotations

import click

from deeper.config import get
from deeper.data.ingest import NOTES, ingest, options_from_params, sources_from_params
from deeper.data.readers import READERS
from deeper.metrics import write_json
from stages._cli import PARAMS_OPTION, load_checked_params, user_errors


@click.command(
    help=f"""Read every source of `ingest.presets.<ingest.preset>` (paths under `ingest.root`) into
one DuckDB database with the tables domains, items and ratings (docs/ARCHITECTURE.md).

Each source names a format: {", ".join(READERS)} (deeper_windows: the DEEPER authors' windows, domains from
its folder names; tastes_world: the diagnostic world's synthetic users, a test of the trainer).
Every row is validated: a bad row stops the stage with one line naming the file and row (a time column
keeps the encoding of its first row: unix time, date, or date with a time). Rows that are known not to be
ratings (duplicates, Food.com's 0 = no stars unless `ingest.zero_ratings` keeps it, ...) are skipped and counted per reason; rows kept with a
remark are counted too (titles cleaned of HTML, titles made from ids, `unknown_item`: ratings of items the
source's item file does not list, kept with the title "item <id>" or dropped as `ingest.unknown_items`
says). Both are printed per domain and written to the metrics file with users, items and ratings."""
)
@PARAMS_OPTION
@click.option(
    "--out",
    default="data/ingest/ratings.duckdb",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The database to write (replaced as a whole).",
)
@click.option(
    "--metrics",
    "metrics_path",
    default="metrics/data.json",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Per-domain counts and skips by reason.",
)
@user_errors
def main(params_path: str, out: str, metrics_path: str) -> None:
    params = load_checked_params(params_path)
    unknown_items, zero_ratings = options_from_params(params)
    sources = sources_from_params(
        get(params, "ingest.root"), get(params, "ingest.preset"), get(params, "ingest.presets")
    )
    summary = ingest(sources, out, unknown_items, zero_ratings)
    write_json(metrics_path, summary)
    for domain, s in summary["domains"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items() if v) or "none"
        noted = ", ".join(f"{k} {s[k]}" for k in NOTES if s[k])
        click.echo(
            f"{domain}: {s['users']} users, {s['items']} items, {s['ratings']} ratings; dropped: {dropped}"
            + (f"; kept with a remark: {noted}" if noted else "")
        )


if __name__ == "__main__":
    main()
