"""Cut three rounds of "new" ratings for docs/refiner.md's `deeper refine` example from the pipeline's own data.

    python scripts/cut_rounds.py            # after `dvc repro` (reads the ingest and window stages' outputs)

The users are the evaluation split of data/window/windows.parquet: users the training never saw. Each user's
ratings, in time order as the window stage orders them (timestamp, then source order), are written as three
MovieLens CSV folders (ratings.csv: userId,movieId,rating,timestamp; movies.csv: movieId,title), the format
`deeper refine --format movielens_csv` reads:
    round1: windows W0 and W1 (S_0 from W0, then the first refinement on W1)
    round2: W2 (the second refinement)
    round3: W3 and half of W4 (the third refinement; the half window waits in the store for more ratings)
"""

from __future__ import annotations

import csv
from pathlib import Path

import click
import duckdb

from deeper.config import get, load_params
from deeper.tables import read_windows

# (first window, windows) of each round; round 3 also takes half of the window after
ROUNDS = {"round1": (0, 2), "round2": (2, 1), "round3": (3, 1)}


@click.command(help=__doc__.split("\n\n")[0])
@click.option(
    "--ratings-db", default="data/ingest/ratings.duckdb", show_default=True, type=click.Path(dir_okay=False)
)
@click.option(
    "--windows", default="data/window/windows.parquet", show_default=True, type=click.Path(dir_okay=False)
)
@click.option(
    "--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False)
)
@click.option("--domain", default="movielens", show_default=True)
@click.option("--out", default="data/refiner_example", show_default=True, type=click.Path(file_okay=False))
def main(ratings_db, windows, params_path, domain, out):
    size = int(get(load_params(params_path), "window.size"))
    table = read_windows(windows)
    users = sorted(table.loc[(table["split"] == "eval") & (table["domain"] == domain), "user_id"].unique())
    with duckdb.connect(ratings_db, read_only=True) as con:
        rows = con.execute(
            """
            SELECT r.user_id, r.item_id, i.title, r.rating, r.ts,
                   row_number() OVER (PARTITION BY r.user_id ORDER BY r.ts, r.seq) - 1 AS idx
            FROM ratings r JOIN items i USING (domain, item_id)
            WHERE r.domain = ? AND r.user_id IN (SELECT unnest(?))
            ORDER BY r.user_id, idx""",
            [domain, list(users)],
        ).fetchall()
    for name, (first, count) in ROUNDS.items():
        start, stop = first * size, (first + count) * size + (size // 2 if name == "round3" else 0)
        picked = [r for r in rows if start <= r[5] < stop]
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "ratings.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["userId", "movieId", "rating", "timestamp"])
            writer.writerows((user, item, f"{rating:g}", ts) for user, item, _, rating, ts, _ in picked)
        titles = dict(sorted({(int(item), title) for _, item, title, *_ in picked}))
        with (folder / "movies.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["movieId", "title"])
            writer.writerows(titles.items())
        click.echo(f"{folder}: {len(picked)} ratings of {len({r[0] for r in picked})} users")


if __name__ == "__main__":
    main()
