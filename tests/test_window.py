"""Windowing and the user split on real data: MovieLens 100K (raw, timed) and the DEEPER authors' windows."""

from __future__ import annotations

import ast
import csv
import os
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from deeper.data.ingest import ingest
from deeper.data.readers import Source
from deeper.data.readers.common import clean_title
from deeper.data.schema import WINDOW_COLUMNS
from deeper.data.window import make_windows, spec_from_params

WINDOW = {
    "size": 10,
    "count": 6,
    "train_count": 4,
    "seed": 0,
    "default": {"train_users": 24, "eval_users": 8, "seen": True},
    "domains": {},
}


def windows(db: Path, out: Path, **changes) -> tuple[list[dict], dict]:
    spec, default, overrides = spec_from_params({**WINDOW, **changes})
    metrics = make_windows(db, out, spec, default, overrides)
    return pq.read_table(out).to_pylist(), metrics


def by_user(rows: list[dict]) -> dict[str, list[dict]]:
    users = defaultdict(list)
    for r in rows:
        users[r["user_id"]].append(r)
    return users


# --- raw data: MovieLens 100K ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml(tmp_path_factory, shared_data) -> tuple[Path, dict[str, list[tuple]]]:
    """The database, and each user's ratings read straight from u.data: (ts, line, item, rating)."""
    folder = shared_data / "raw" / "ml-100k"
    db = tmp_path_factory.mktemp("ml") / "r.duckdb"
    ingest([Source("ml100k", folder, None, "movielens", "movie")], db)
    ratings = defaultdict(list)
    with open(folder / "u.data", encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            user, item, rating, ts = line.split("\t")
            ratings[user].append((int(ts), line_no, item, float(rating)))
    return db, ratings


def test_windows_are_time_ordered_with_source_order_breaking_ties(ml, tmp_path):
    db, ratings = ml
    expected = {u: sorted(r)[:60] for u, r in ratings.items() if len(r) >= 60}
    # the data has users rating several movies in the same second inside their first 60: ties matter
    assert sum(len({t for t, *_ in r}) < 60 for r in expected.values()) > 100
    rows, metrics = windows(
        db, tmp_path / "w.parquet", default={"train_users": 0, "eval_users": 10_000, "seen": True}
    )
    got = by_user(rows)
    assert set(got) == set(expected)
    for user, seq in expected.items():
        assert [(r["window"], r["pos"], r["item_id"], r["rating"]) for r in got[user]] == [
            (i // 10, i % 10, item, rating) for i, (_, _, item, rating) in enumerate(seq)
        ], user
    m = metrics["domains"]["movielens"]
    assert m["eligible_users"] == {
        "train": sum(len(r) >= 40 for r in ratings.values()),
        "eval": len(expected),
    }
    assert m["skipped_users"] == {
        "too_few_ratings": sum(len(r) < 40 for r in ratings.values()),
        "too_few_windows": 0,
    }
    # asking for more eval users than exist takes all and says so
    assert m["eval_users"] == len(expected) == 497 and m["requested_users"]["eval"] == 10_000
    assert m["windows"] == 6 * 497 and m["ratings"] == 60 * 497 and m["short_windows"] == 0


def test_split_counts_seed_and_file_shape(ml, tmp_path):
    db, ratings = ml
    rows, metrics = windows(db, tmp_path / "a.parquet")
    table = pq.read_table(tmp_path / "a.parquet")
    assert tuple(table.column_names) == WINDOW_COLUMNS
    assert [str(t) for t in table.schema.types] == [
        "string",
        "string",
        "bool",
        "string",
        "string",
        "int32",
        "int32",
        "string",
        "string",
        "double",
    ]
    keys = [(r["domain"], r["user_id"], r["window"], r["pos"]) for r in rows]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    splits = {s: {r["user_id"] for r in rows if r["split"] == s} for s in ("train", "eval")}
    assert len(splits["train"]) == 24 and len(splits["eval"]) == 8 and not splits["train"] & splits["eval"]
    users = by_user(rows)
    assert all(len({r["window"] for r in users[u]}) == 6 for u in splits["eval"])
    # a train user keeps its full windows: at least train_count, at most count
    assert all(
        4 <= len({r["window"] for r in users[u]}) == min(len(ratings[u]) // 10, 6) for u in splits["train"]
    )
    assert metrics["domains"]["movielens"]["unused_users"] == 645 - 32
    again, _ = windows(db, tmp_path / "b.parquet")
    assert again == rows  # same seed, same file content
    other, other_metrics = windows(db, tmp_path / "c.parquet", seed=1)
    assert {r["user_id"] for r in other} != {r["user_id"] for r in rows}
    # drawn users: the metrics name the draw and tell the two seeds' evaluation users apart
    m, o = metrics["domains"]["movielens"], other_metrics["domains"]["movielens"]
    assert (m["users_from"], o["users_from"]) == ("drawn (window.seed 0)", "drawn (window.seed 1)")
    assert m["eval_users_sha256"] != o["eval_users_sha256"]
    from deeper.data.window import users_digest

    assert m["eval_users_sha256"] == users_digest(list(splits["eval"]))


def test_domain_override_and_seen_flag(ml, tmp_path):
    db, _ = ml
    rows, metrics = windows(
        db,
        tmp_path / "w.parquet",
        domains={
            "movielens": {"train_users": 0, "eval_users": 5, "seen": False},
            "amazon_arts": {"eval_users": 86},
        },
    )  # absent domains are fine
    assert {(r["split"], r["seen"]) for r in rows} == {("eval", False)}
    assert len({r["user_id"] for r in rows}) == 5
    m = metrics["domains"]["movielens"]
    assert (m["train_users"], m["eval_users"]) == (0, 5) and m["requested_users"] == {"train": 0, "eval": 5}


def test_window_size_is_a_parameter(ml, tmp_path):
    db, ratings = ml
    rows, metrics = windows(db, tmp_path / "w.parquet", size=8)
    assert {r["pos"] for r in rows} == set(range(8))
    assert metrics["domains"]["movielens"]["eligible_users"]["eval"] == sum(
        len(r) >= 48 for r in ratings.values()
    )


# --- pre-windowed data: the DEEPER authors' windows ----------------------------------------------------------


@pytest.fixture(scope="module")
def authors(tmp_path_factory, shared_data) -> tuple[Path, Path]:
    """Two of the six domains (links into ../shared/data, never copies): Food.com has train users and
    zeros, Google Local has users missing window 5."""
    root = tmp_path_factory.mktemp("authors")
    for domain in ("food_com", "google_local"):
        os.symlink(shared_data / "deeper" / domain, root / domain)
    db = root / "r.duckdb"
    ingest([Source("deeper_windows", root)], db)
    return db, shared_data / "deeper"


def csv_windows(path: Path) -> dict[str, list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        return {
            row["id"]: [ast.literal_eval(row[f"windows_{k}"]) for k in range(5)] for row in csv.DictReader(f)
        }


def test_prewindowed_data_keeps_its_windows_and_split(authors, tmp_path):
    db, folder = authors
    everyone = {"train_users": 100_000, "eval_users": 100_000, "seen": True}
    rows, metrics = windows(db, tmp_path / "w.parquet", default=everyone)
    food = folder / "food_com" / "split_data"
    train, test = csv_windows(food / "train_dataset.csv"), csv_windows(food / "test_dataset.csv")
    users = by_user([r for r in rows if r["domain"] == "food_com"])
    assert {u for u, rs in users.items() if rs[0]["split"] == "train"} == set(train)  # the file's split wins
    assert {u for u, rs in users.items() if rs[0]["split"] == "eval"} <= set(test)
    for user, rs in users.items():
        source = (train | test)[user]
        for k in range(5):
            mine = [(r["pos"], r["title"], r["rating"]) for r in rs if r["window"] == k]
            kept = [
                (clean_title(t), float(x)) for t, x in zip(source[k]["items"], source[k]["ratings"]) if x != 0
            ]
            assert mine == [(p, t, x) for p, (t, x) in enumerate(kept)], (
                user,
                k,
            )  # zeros skipped, order kept
    # eval users: W0..W5 (count = 6, the JSONL's W6 is not needed); train users: their five CSV windows
    assert {len({r["window"] for r in rs}) for rs in users.values() if rs[0]["split"] == "eval"} == {6}
    assert {len({r["window"] for r in rs}) for rs in users.values() if rs[0]["split"] == "train"} == {5}
    food_m, google_m = metrics["domains"]["food_com"], metrics["domains"]["google_local"]
    assert food_m["train_users"] == 1000 and food_m["eligible_users"]["train"] == 1000
    assert food_m["eval_users"] + food_m["skipped_users"]["too_few_windows"] == len(test)
    assert food_m["short_windows"] > 0  # windows that lost a zero rating
    # Google Local: the iteration files lack window 5 for four users (one of them a merged-title window)
    assert google_m["skipped_users"] == {"too_few_ratings": 0, "too_few_windows": 4}
    assert google_m["eval_users"] == 822 and google_m["train_users"] == 0


def test_prewindowed_users_are_drawn_within_their_split(authors, tmp_path):
    db, _ = authors
    rows, metrics = windows(db, tmp_path / "w.parquet")
    for domain, (train, eval_) in (("food_com", (24, 8)), ("google_local", (0, 8))):
        m = metrics["domains"][domain]
        assert (m["train_users"], m["eval_users"]) == (train, eval_)
        assert len({r["user_id"] for r in rows if r["domain"] == domain}) == train + eval_
    assert {r["item_type"] for r in rows if r["domain"] == "google_local"} == {"local_business"}


def test_the_paper_profile_trains_only_users_with_fifty_ratings(tmp_path):
    """Sec. 4.1: training users have at least 50 ratings. With the paper profile's window block a user with 49
    ratings (four full windows) is a counted skip, one with 50 a training user (small files, no shared data)."""
    from deeper.config import load_params
    from deeper.profile import apply_profile, load_profile
    from tests.conftest import REPO

    params = load_params(REPO / "params.yaml")
    paper = apply_profile(params, load_profile("paper", params))["window"]
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n" + "".join(f"{i},Movie {i} (1999),Drama\n" for i in range(100)),
        encoding="utf-8",
    )
    rows = [(user, i) for user, n in (("49", 49), ("50", 50)) for i in range(n)]
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{user},{i},4.0,{1000 + i}\n" for user, i in rows),
        encoding="utf-8",
    )
    db = tmp_path / "r.duckdb"
    ingest([Source("movielens_csv", folder, None, "movielens", "movie")], db)
    split = {"train_users": 10, "eval_users": 0, "seen": True}
    got, metrics = windows(db, tmp_path / "w.parquet", **{**paper, "default": split, "domains": {}})
    assert {r["user_id"] for r in got if r["split"] == "train"} == {"50"}
    assert metrics["domains"]["movielens"]["skipped_users"]["too_few_ratings"] == 1


def _authors_csv(path: Path, users: list[tuple[str, str]], item_type: str = "product") -> None:
    """An authors' split CSV: (user id, split) rows with five windows of two items."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["id", "item_type", "split", "dataset_name", "source_url", *(f"windows_{k}" for k in range(5))]
        )
        for user, split in users:
            writer.writerow(
                [
                    user,
                    item_type,
                    split,
                    path.parts[-3],
                    "https://example.org",
                    *(
                        repr({"items": [f"{user} item {k}a", f"{user} item {k}b"], "ratings": [4.0, 2.0]})
                        for k in range(5)
                    ),
                ]
            )


def test_the_authors_folders_are_the_papers_domains_with_their_users_and_flags(tmp_path):
    """The deeper_authors preset of params.yaml names the authors' folders as the paper's domains, so the
    window.domains entries apply: Sports (only full_dataset.csv, as in the authors' repository) is unseen with
    no training users, Food.com is the seen `recipe` domain (small files, no shared data)."""
    from deeper.config import load_params
    from deeper.data.ingest import sources_from_params
    from tests.conftest import REPO

    params = load_params(REPO / "params.yaml")
    root = tmp_path / "raw"
    food, sports = (
        root / "deeper" / "food_com" / "split_data",
        root / "deeper" / "amazon_sports_and_outdoors" / "split_data",
    )
    _authors_csv(food / "train_dataset.csv", [("t1", "train"), ("t2", "train")], "recipe")
    _authors_csv(food / "test_dataset.csv", [("e1", "eval")], "recipe")
    _authors_csv(
        sports / "full_dataset.csv", [("s1", "eval"), ("s2", "test"), ("s3", "eval")], "sports_outdoors"
    )
    sources = sources_from_params(str(root), "deeper_authors", params["ingest"]["presets"])
    db = tmp_path / "r.duckdb"
    summary = ingest(sources, db)
    assert sorted(summary["domains"]) == ["amazon_sports", "recipe"]
    window = {**params["window"], "count": 5, "train_count": 5}
    rows, metrics = windows(db, tmp_path / "w.parquet", **window)
    seen = {(r["domain"], r["split"]): r["seen"] for r in rows}
    assert seen == {("recipe", "train"): True, ("recipe", "eval"): True, ("amazon_sports", "eval"): False}
    # the item-type label is the files' own spelling (what every prompt's {{item_type}} shows)
    assert {(r["domain"], r["item_type"]) for r in rows} == {
        ("recipe", "recipe"),
        ("amazon_sports", "sports_outdoors"),
    }
    assert metrics["domains"]["amazon_sports"]["eval_users"] == 3  # full_dataset.csv: test counts as eval
    assert metrics["domains"]["amazon_sports"]["requested_users"] == {"train": 0, "eval": 185}
    assert metrics["domains"]["recipe"]["train_users"] == 2
    # the metrics say which users ran: the source's split, and a digest of exactly these evaluation users
    from deeper.data.window import users_digest

    sports = metrics["domains"]["amazon_sports"]
    assert sports["users_from"] == "source split"
    assert sports["eval_users_sha256"] == users_digest(["s3", "s2", "s1"]) != users_digest(["s1", "s2"])
    assert len(sports["eval_users_sha256"]) == 16


def test_a_missing_authors_folder_says_where_to_get_it(tmp_path):
    """The paper profile reads the authors' windows by default: without them, ingest says where they come from
    and what the switch to the raw files is, in one line."""
    from deeper.config import load_params
    from deeper.data.ingest import sources_from_params
    from deeper.errors import InputError
    from tests.conftest import REPO

    presets = load_params(REPO / "params.yaml")["ingest"]["presets"]
    with pytest.raises(InputError) as e:
        ingest(sources_from_params(str(tmp_path), "deeper_authors", presets), tmp_path / "r.duckdb")
    assert str(tmp_path / "deeper") in str(e.value) and "\n" not in str(e.value)
    assert "github.com/sheep333c/DEEPER" in str(e.value) and "-S ingest.preset=paper_raw" in str(e.value)
    assert not (tmp_path / "r.duckdb").exists()


def test_the_authors_domain_names_are_checked(tmp_path):
    from deeper.data.ingest import sources_from_params
    from deeper.errors import ConfigError

    entry = {"format": "deeper_windows", "path": "deeper"}
    for domains, message in (
        ({"a": "x", "b": "x"}, "two folders are named 'x'"),
        (["a"], "must map folder names"),
        ({"a": ""}, "must map folder names"),
    ):
        with pytest.raises(ConfigError, match=rf"ingest\.presets\.p\[0\]\.domains: {message}"):
            sources_from_params(str(tmp_path), "p", {"p": [{**entry, "domains": domains}]})
    with pytest.raises(ConfigError, match=r"\.domains: not a setting of format foodcom"):
        sources_from_params(
            str(tmp_path),
            "p",
            {
                "p": [
                    {
                        "format": "foodcom",
                        "path": "f",
                        "domain": "r",
                        "item_type": "recipe",
                        "domains": {"a": "b"},
                    }
                ]
            },
        )


def test_the_authors_windows_run_as_the_papers_seen_domains(shared_data, tmp_path):
    """../shared/data holds the authors' six seen domains: through the preset they are the paper's names,
    every one seen (the unseen four are not in it)."""
    from deeper.config import load_params
    from deeper.data.ingest import sources_from_params
    from tests.conftest import REPO

    params = load_params(REPO / "params.yaml")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(shared_data / "deeper", root / "deeper")
    db = tmp_path / "r.duckdb"
    ingest(sources_from_params(str(root), "deeper_authors", params["ingest"]["presets"]), db)
    rows, metrics = windows(db, tmp_path / "w.parquet", **params["window"])
    assert sorted(metrics["domains"]) == [
        "amazon_books",
        "amazon_clothing",
        "amazon_movies_tv",
        "local_business",
        "movielens",
        "recipe",
    ]
    assert {r["seen"] for r in rows} == {True}
