"""scripts/cut_rounds.py (docs/refiner.md's `deeper refine` example) on a small ingest database and
windows file: the rounds hold the evaluation users' ratings in time order, cut at window boundaries, in a format the
movielens_csv reader takes back."""

from __future__ import annotations

import csv
import importlib.util

import yaml
from click.testing import CliRunner

from deeper.data.ingest import ingest
from deeper.data.window import make_windows, spec_from_params
from deeper.serve import input_source, read_new_ratings
from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("cut_rounds", REPO / "scripts" / "cut_rounds.py")
cut_rounds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cut_rounds)


def test_three_rounds_of_the_eval_users(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    # 3 users x 60 ratings, timestamps in reverse file order (the cut follows time, not the file)
    with (raw / "ratings.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        w.writerows((u, item, 1 + (u + item) % 5, 10_000 - item) for u in (1, 2, 3) for item in range(1, 61))
    with (raw / "movies.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["movieId", "title"])
        w.writerows((i, f'Film {i}, the "cut"') for i in range(1, 61))
    db = tmp_path / "ratings.duckdb"
    ingest([input_source("movielens_csv", raw, domain="movielens", item_type="movie")], db)
    window = {
        "size": 10,
        "count": 6,
        "train_count": 4,
        "seed": 0,
        "default": {"train_users": 2, "eval_users": 1, "seen": True},
    }
    windows = tmp_path / "windows.parquet"
    make_windows(db, windows, *spec_from_params(window))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"window": window}))
    out = tmp_path / "rounds"
    result = CliRunner().invoke(
        cut_rounds.main,
        ["--ratings-db", str(db), "--windows", str(windows), "--params", str(params), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    import pandas as pd

    eval_user = pd.read_parquet(windows).query("split == 'eval'")["user_id"].unique().tolist()
    assert len(eval_user) == 1
    read = {}
    for name in ("round1", "round2", "round3"):
        users, _ = read_new_ratings(
            input_source("movielens_csv", out / name, domain="movielens", item_type="movie")
        )
        assert list(users) == [("movielens", eval_user[0])]
        read[name] = users[("movielens", eval_user[0])][1]
    # items 60, 59, ... are the oldest first; round 1 = W0 + W1, round 2 = W2, round 3 = W3 + half of W4
    assert [r.item_id for r in read["round1"]] == [str(i) for i in range(60, 40, -1)]
    assert [r.item_id for r in read["round2"]] == [str(i) for i in range(40, 30, -1)]
    assert [r.item_id for r in read["round3"]] == [str(i) for i in range(30, 15, -1)]
    assert read["round1"][0].title == 'Film 60, the "cut"' and read["round1"][0].ts == 10_000 - 60
    assert read["round1"][0].rating == 1 + (int(eval_user[0]) + 60) % 5
