"""Bad input through the stage commands: one line `error: path:row: message` and exit 1, or a counted skip.

Each case writes a small source next to a params.yaml in a temporary folder and runs the click command
there (as DVC would, from the repository root), so what is checked is what the user sees.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from stages.ingest import main as ingest_main
from stages.window import main as window_main

MOVIES = "movieId,title,genres\n1,Toy Story (1995),Animation\n2,Heat (1995),Action\n"
RATINGS_HEADER = "userId,movieId,rating,timestamp\n"
RATINGS = RATINGS_HEADER + "1,1,4.0,964982703\n1,2,3.5,964982704\n"
SMALL_WINDOWS = {
    "size": 2,
    "count": 2,
    "train_count": 1,
    "seed": 0,
    "default": {"train_users": 0, "eval_users": 5, "seen": True},
}


def setup(
    folder: Path, sources: list[dict], files: dict[str, str | bytes], window: dict | None = None, **ingest
) -> None:
    """params.yaml with one preset `t` under root `raw` (and any other `ingest` keys), and the given files
    under raw/."""
    folder.mkdir(parents=True, exist_ok=True)
    params = {
        "ingest": {"root": "raw", "preset": "t", "presets": {"t": sources}, **ingest},
        "window": window or SMALL_WINDOWS,
    }
    (folder / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    for name, content in files.items():
        path = folder / "raw" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", newline="")


def run(command, folder: Path, monkeypatch):
    monkeypatch.chdir(folder)
    return CliRunner().invoke(command, [])


def error_line(result) -> str:
    """The one line the user sees; a handled error, never a traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an unhandled exception
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def ingest_error(tmp_path, monkeypatch, sources, files) -> str:
    setup(tmp_path, sources, files)
    return error_line(run(ingest_main, tmp_path, monkeypatch))


ML_CSV = [{"format": "movielens_csv", "path": "ml", "domain": "movielens", "item_type": "movie"}]


@pytest.mark.parametrize(
    "ratings, expected",
    [
        (
            RATINGS_HEADER.replace("rating,", "") + "1,1,964982703\n",
            "raw/ml/ratings.csv:1: missing column(s) rating; found: userId, movieId, timestamp",
        ),
        (RATINGS + "1,2,four,964982705\n", "raw/ml/ratings.csv:4: rating 'four' is not a number"),
        (RATINGS + "1,2,,964982705\n", "raw/ml/ratings.csv:4: rating is empty"),
        (RATINGS + "1,2,nan,964982705\n", "raw/ml/ratings.csv:4: rating 'nan' is not a finite number"),
        (RATINGS + "1,2,6,964982705\n", "raw/ml/ratings.csv:4: rating 6 outside 0.5..5 in steps of 0.5"),
        (RATINGS + "1,2,3.7,964982705\n", "raw/ml/ratings.csv:4: rating 3.7 outside 0.5..5 in steps of 0.5"),
        (RATINGS + "1,2,0,964982705\n", "raw/ml/ratings.csv:4: rating 0 outside 0.5..5 in steps of 0.5"),
        (
            RATINGS + "1,2,4,yesterday\n",
            "raw/ml/ratings.csv:4: timestamp 'yesterday' is neither unix time nor a known date format",
        ),
        (RATINGS + "1,2,4\n", "raw/ml/ratings.csv:4: expected 4 fields, found 3"),
        (RATINGS + '1,"2,4,964982705\n', "raw/ml/ratings.csv:4: not valid CSV: unexpected end of data"),
        (RATINGS + ",2,4,964982705\n", "raw/ml/ratings.csv:4: userId is empty"),
        ("", "raw/ml/ratings.csv: empty file"),
        (RATINGS_HEADER, "raw/ml: no ratings to keep (rows skipped: 0)"),
        (
            RATINGS.encode() + b"1,2,4,9649827\xff5\n",
            "raw/ml/ratings.csv:4: not valid utf-8 text (byte 14 of the line)",
        ),
    ],
    ids=[
        "missing-column",
        "non-numeric",
        "empty-rating",
        "nan",
        "above-range",
        "not-a-half-step",
        "zero",
        "timestamp-format",
        "short-row",
        "unclosed-quote",
        "empty-user",
        "empty-file",
        "header-only",
        "not-utf8",
    ],
)
def test_movielens_csv_bad_ratings_file(tmp_path, monkeypatch, ratings, expected):
    line = ingest_error(tmp_path, monkeypatch, ML_CSV, {"ml/movies.csv": MOVIES, "ml/ratings.csv": ratings})
    assert line.startswith(f"error: {expected}"), line


def test_missing_and_unreadable_files(tmp_path, monkeypatch):
    assert (
        ingest_error(tmp_path / "a", monkeypatch, ML_CSV, {"ml/ratings.csv": RATINGS})
        == "error: raw/ml/movies.csv: not found"
    )
    folder = tmp_path / "b"
    (folder / "raw" / "ml" / "ratings.csv").mkdir(parents=True)
    assert (
        ingest_error(folder, monkeypatch, ML_CSV, {"ml/movies.csv": MOVIES})
        == "error: raw/ml/ratings.csv: not a file"
    )
    assert ingest_error(tmp_path / "c", monkeypatch, ML_CSV, {}) == "error: raw/ml: not found"


def test_movies_file_missing_title_column(tmp_path, monkeypatch):
    line = ingest_error(
        tmp_path, monkeypatch, ML_CSV, {"ml/movies.csv": "movieId,name\n1,x\n", "ml/ratings.csv": RATINGS}
    )
    assert line == "error: raw/ml/movies.csv:1: missing column(s) title; found: movieId, name"


@pytest.mark.parametrize(
    "times, expected",
    [
        (["2000-07-30", "2000-07-31"], [964915200, 965001600]),
        (["2000/7/30", "2000/07/31"], [964915200, 965001600]),  # Food.com copies
        (["7/30/2000", "07/31/2000"], [964915200, 965001600]),  # month first (US spreadsheets)
        (["2000-07-30 18:05:03", "2000-07-30T18:05:04"], [964980303, 964980304]),
        (["2000-07-30T18:05:03Z", "2000-07-30T20:05:03+02:00"], [964980303, 964980303]),
        (["7/30/2000 18:05", "7/30/2000 18:06:30"], [964980300, 964980390]),
        (["964982703.0", " 964982704 "], [964982703, 964982704]),
    ],
    ids=[
        "iso-date",
        "slashed-year-first",
        "slashed-month-first",
        "date-time",
        "iso-offsets",
        "spreadsheet",
        "decimal",
    ],
)
def test_known_time_spellings_are_parsed(tmp_path, monkeypatch, times, expected):
    ratings = RATINGS_HEADER + "".join(f"1,{i},4,{t}\n" for i, t in enumerate(times, 1))
    setup(tmp_path, ML_CSV, {"ml/movies.csv": MOVIES, "ml/ratings.csv": ratings})
    result = run(ingest_main, tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    with duckdb.connect("data/ingest/ratings.duckdb", read_only=True) as con:
        assert [t for (t,) in con.execute("SELECT ts FROM ratings ORDER BY seq").fetchall()] == expected


@pytest.mark.parametrize(
    "times, expected",
    [
        # unix seconds, then a date: the date is midnight and would sort before the same day's earlier ratings
        (
            ["964982703", "964982704", "2000-07-30"],
            (
                "raw/ml/ratings.csv:4: timestamp '2000-07-30' is a date, but row 2 of this column is a unix time: "
                "one column must keep one time encoding"
            ),
        ),
        (
            ["2000-07-30", "964982704"],
            "raw/ml/ratings.csv:3: timestamp 964982704 is a unix time, but row 2 of this column is a date: ",
        ),
        (
            ["2000-07-30", "2000-07-30T18:05:03Z"],
            (
                "raw/ml/ratings.csv:3: timestamp '2000-07-30T18:05:03Z' is a date with a time of day, but row 2 of "
                "this column is a date: "
            ),
        ),
        (
            ["964982703", "964982704000"],  # milliseconds among seconds: the year 32720
            "raw/ml/ratings.csv:3: timestamp 964982704000 is too large for unix seconds (milliseconds?)",
        ),
        (
            ["30/7/2000"],
            (
                "raw/ml/ratings.csv:2: timestamp '30/7/2000' puts the day first; slashed dates are read "
                "month first (M/D/YYYY)"
            ),
        ),
        (["964982703", " "], "raw/ml/ratings.csv:3: timestamp is empty"),
    ],
    ids=["date-among-unix", "unix-among-dates", "time-among-dates", "ms-among-seconds", "day-first", "empty"],
)
def test_a_time_column_keeps_one_encoding(tmp_path, monkeypatch, times, expected):
    ratings = RATINGS_HEADER + "".join(f"1,{i},4,{t}\n" for i, t in enumerate(times, 1))
    line = ingest_error(tmp_path, monkeypatch, ML_CSV, {"ml/movies.csv": MOVIES, "ml/ratings.csv": ratings})
    assert line.startswith(f"error: {expected}"), line


def test_duplicate_rows_are_a_counted_skip(tmp_path, monkeypatch):
    ratings = RATINGS + "1,1,4.0,964982703\n" + "1,1,4.0,964982703\n"
    setup(tmp_path, ML_CSV, {"ml/movies.csv": MOVIES, "ml/ratings.csv": ratings})
    result = run(ingest_main, tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    data = json.loads(Path("metrics/data.json").read_text())
    assert data["domains"]["movielens"]["dropped"]["duplicate"] == 2
    assert data["domains"]["movielens"]["ratings"] == 2
    assert "duplicate 2" in result.output


# --- the other formats -----------------------------------------------------------------------------------

ML100K = [{"format": "ml100k", "path": "ml-100k", "domain": "movielens", "item_type": "movie"}]
U_ITEM = "1|Toy Story (1995)|01-Jan-1995||http://x|0|0\n2|GoldenEye (1995)|01-Jan-1995||http://y|0|1\n"


@pytest.mark.parametrize(
    "data, item, expected",
    [
        (
            "196\t1\t3\t881250949\n196\t2\t3.5\t881250950\n",
            U_ITEM,
            "raw/ml-100k/u.data:2: rating 3.5 outside 1..5",
        ),
        ("196\t1\t3\n", U_ITEM, "raw/ml-100k/u.data:1: expected 4 fields, found 3"),
        ("196\t1\t3\t881250949\t7\n", U_ITEM, "raw/ml-100k/u.data:1: expected 4 fields, found 5"),
        ("196\t1\t3\t881250949\n", "1\n", "raw/ml-100k/u.item:1: expected 2 fields, found 1"),
    ],
)
def test_ml100k_bad_rows(tmp_path, monkeypatch, data, item, expected):
    line = ingest_error(tmp_path, monkeypatch, ML100K, {"ml-100k/u.data": data, "ml-100k/u.item": item})
    assert line == f"error: {expected}"


PARQUET = [{"format": "movielens100k_parquet", "path": "ml", "domain": "movielens", "item_type": "movie"}]


def write_parquet(path: Path, columns: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, compression="brotli")


def test_parquet_missing_column_null_rating_and_damaged_file(tmp_path, monkeypatch):
    items = {"movie_id": [1, 2], "movie_title": ["Toy Story (1995)", "Heat (1995)"]}
    good = {"user_id": [1, 1], "movie_id": [1, 2], "rating": [4, 5], "timestamp": [881250949, 881250950]}
    folder = tmp_path / "raw" / "ml"
    write_parquet(folder / "MovieLens100k_items.parquet.brotli", items)
    write_parquet(
        folder / "MovieLens100k_data.parquet.brotli", {k: v for k, v in good.items() if k != "rating"}
    )
    setup(tmp_path, PARQUET, {})
    line = error_line(run(ingest_main, tmp_path, monkeypatch))
    assert (
        line == "error: raw/ml/MovieLens100k_data.parquet.brotli: missing column(s) rating; "
        "found: user_id, movie_id, timestamp"
    )
    write_parquet(folder / "MovieLens100k_data.parquet.brotli", {**good, "rating": [4, None]})
    assert (
        error_line(run(ingest_main, tmp_path, monkeypatch))
        == "error: raw/ml/MovieLens100k_data.parquet.brotli:2: rating is null"
    )
    (folder / "MovieLens100k_data.parquet.brotli").write_bytes(b"PAR1 this is not parquet")
    line = error_line(run(ingest_main, tmp_path, monkeypatch))
    assert line.startswith("error: raw/ml/MovieLens100k_data.parquet.brotli: not a readable Parquet file: ")


AMAZON = [{"format": "amazon2018", "path": "amazon/Books_5.json", "domain": "books", "item_type": "book"}]
REVIEW = {
    "overall": 5.0,
    "reviewerID": "A1",
    "asin": "B1",
    "unixReviewTime": 1472688000,
    "reviewTime": "09 1, 2016",
}


@pytest.mark.parametrize(
    "lines, expected",
    [
        (
            [json.dumps(REVIEW), '{"overall": 4.0, "reviewerID": "A2",'],
            "raw/amazon/Books_5.json:2: neither JSON nor a Python dict literal",
        ),
        (
            [json.dumps({k: v for k, v in REVIEW.items() if k != "overall"})],
            "raw/amazon/Books_5.json:1: missing field 'overall'",
        ),
        ([json.dumps({**REVIEW, "overall": None})], "raw/amazon/Books_5.json:1: field 'overall' is null"),
        ([json.dumps({**REVIEW, "asin": None})], "raw/amazon/Books_5.json:1: field 'asin' is null"),
        (
            [json.dumps({**REVIEW, "unixReviewTime": None, "reviewTime": None})],
            "raw/amazon/Books_5.json:1: field 'unixReviewTime' is null (and no 'reviewTime')",
        ),
        (
            [json.dumps({**REVIEW, "overall": "five"})],
            "raw/amazon/Books_5.json:1: rating 'five' is not a number",
        ),
        ([json.dumps({**REVIEW, "overall": 0.0})], "raw/amazon/Books_5.json:1: rating 0 outside 1..5"),
        (["", json.dumps([REVIEW])], "raw/amazon/Books_5.json:2: expected an object per line, found list"),
        (
            [json.dumps({k: v for k, v in REVIEW.items() if "Time" not in k})],
            "raw/amazon/Books_5.json:1: missing field 'unixReviewTime' (and no 'reviewTime')",
        ),
        (
            [json.dumps({**REVIEW, "unixReviewTime": None, "reviewTime": "Sept 1st"})],
            "raw/amazon/Books_5.json:1: reviewTime 'Sept 1st' is neither unix time nor a known date format",
        ),
        (
            [json.dumps(REVIEW), json.dumps({**REVIEW, "unixReviewTime": "2016-09-01"})],
            "raw/amazon/Books_5.json:2: unixReviewTime '2016-09-01' is a date, but row 1 of this column is a unix time",
        ),
        (["", "  "], "raw/amazon/Books_5.json: no records (only blank lines)"),
    ],
)
def test_amazon_bad_lines(tmp_path, monkeypatch, lines, expected):
    line = ingest_error(tmp_path, monkeypatch, AMAZON, {"amazon/Books_5.json": "\n".join(lines) + "\n"})
    assert line.startswith(f"error: {expected}"), line


def test_amazon_review_time_fallback_gzip_and_missing_meta(tmp_path, monkeypatch):
    no_unix = {k: v for k, v in REVIEW.items() if k != "unixReviewTime"}
    body = (json.dumps(no_unix) + "\n" + repr({**REVIEW, "reviewerID": "A2"}) + "\n").encode()
    sources = [{**AMAZON[0], "path": "amazon/Books_5.json.gz"}]
    setup(tmp_path, sources, {"amazon/Books_5.json.gz": gzip.compress(body)})
    result = run(ingest_main, tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    with duckdb.connect("data/ingest/ratings.duckdb", read_only=True) as con:
        assert con.execute("SELECT user_id, ts FROM ratings ORDER BY seq").fetchall() == [
            ("A1", 1472688000),
            ("A2", 1472688000),
        ]  # "09 1, 2016" is that day
    setup(tmp_path, [{**sources[0], "meta": "amazon/meta_Books.json"}], {})
    assert (
        error_line(run(ingest_main, tmp_path, monkeypatch)) == "error: raw/amazon/meta_Books.json: not found"
    )
    (tmp_path / "raw" / "amazon" / "Books_5.json.gz").write_bytes(gzip.compress(body)[:30])
    setup(tmp_path, sources, {})
    assert error_line(run(ingest_main, tmp_path, monkeypatch)).startswith(
        "error: raw/amazon/Books_5.json.gz:1: cannot read"
    )


FOODCOM = [
    {
        "format": "foodcom",
        "path": "food/RAW_interactions.csv",
        "meta": "food/RAW_recipes.csv",
        "domain": "recipe",
        "item_type": "recipe",
    }
]
RECIPES = "name,id,minutes\nbest pie,10,30\n"


def test_foodcom_bad_date_and_rating(tmp_path, monkeypatch):
    header = "user_id,recipe_id,date,rating,review\n"
    bad_date = header + '1,10,2009-12-09,5,"fine, really"\n2,10,12/09/2009,4,ok\n3,10,09.12.2009,4,ok\n'
    assert (
        ingest_error(
            tmp_path / "a",
            monkeypatch,
            FOODCOM,
            {"food/RAW_interactions.csv": bad_date, "food/RAW_recipes.csv": RECIPES},
        )
        == "error: raw/food/RAW_interactions.csv:4: date '09.12.2009' is neither unix time nor a known date "
        "format (YYYY-MM-DD, YYYY/M/D, M/D/YYYY, 'MM DD, YYYY', ISO 8601)"
    )
    bad_rating = header + '1,10,2009-12-09,5,"a review\nover two lines"\n2,10,2009-12-10,-1,ok\n'
    assert (
        ingest_error(
            tmp_path / "b",
            monkeypatch,
            FOODCOM,
            {"food/RAW_interactions.csv": bad_rating, "food/RAW_recipes.csv": RECIPES},
        )
        == "error: raw/food/RAW_interactions.csv:4: rating -1 outside 1..5"
    )  # row 4: the review spans lines 2-3


def test_foodcom_all_unrated_is_an_error_not_an_empty_domain(tmp_path, monkeypatch):
    rows = "user_id,recipe_id,date,rating,review\n1,10,2009-12-09,0,x\n"
    assert (
        ingest_error(
            tmp_path,
            monkeypatch,
            FOODCOM,
            {"food/RAW_interactions.csv": rows, "food/RAW_recipes.csv": RECIPES},
        )
        == "error: raw/food/RAW_interactions.csv: no ratings to keep (rows skipped: 1)"
    )


DEEPER = [{"format": "deeper_windows", "path": "deeper"}]
CSV_HEAD = "id,item_type,split,dataset_name,source_url,windows_0,windows_1\n"
CELL = "\"{'items': ['a', 'b'], 'ratings': [4, 5]}\""


@pytest.mark.parametrize(
    "row, expected",
    [
        (
            f"u2,movie,eval,x,y,{CELL},\"{{'items': ['a', 'b'], 'ratings': [4, 5]\"",
            "raw/deeper/d/split_data/test_dataset.csv:3: windows_1: not a Python literal",
        ),
        (
            f"u2,movie,eval,x,y,{CELL},\"['a', 'b']\"",
            "raw/deeper/d/split_data/test_dataset.csv:3: windows_1: expected {'items': [...], 'ratings': [...]}",
        ),
        (
            f"u2,movie,eval,x,y,{CELL},\"{{'items': ['a', 'b'], 'ratings': [4, 9]}}\"",
            "raw/deeper/d/split_data/test_dataset.csv:3: rating 9 outside 0.5..5 in steps of 0.5",
        ),
        (
            f"u2,movie,eval,x,y,{CELL},\"{{'items': ['a', 'b'], 'ratings': [4, '__import__']}}\"",
            "raw/deeper/d/split_data/test_dataset.csv:3: rating '__import__' is not a number",
        ),
        (
            f"u2,book,eval,x,y,{CELL},{CELL}",
            "raw/deeper/d/split_data/test_dataset.csv:3: item_type 'book' differs from 'movie' of earlier rows",
        ),
    ],
)
def test_deeper_windows_bad_cells(tmp_path, monkeypatch, row, expected):
    body = CSV_HEAD + f"u1,movie,eval,x,y,{CELL},{CELL}\n" + row + "\n"
    assert (
        ingest_error(tmp_path, monkeypatch, DEEPER, {"deeper/d/split_data/test_dataset.csv": body})
        == f"error: {expected}"
    )


def test_deeper_windows_jsonl_needs_titles_for_its_ratings(tmp_path, monkeypatch):
    body = CSV_HEAD + f"u1,movie,eval,x,y,{CELL},{CELL}\n"
    line = json.dumps({"id": "u1", "iteration": 1, "U0": [4, 5], "I0": ["a", "b"], "U2": [3, 3]})
    assert (
        ingest_error(
            tmp_path,
            monkeypatch,
            DEEPER,
            {
                "deeper/d/split_data/test_dataset.csv": body,
                "deeper/d/test_iterations/test_iteration_1.jsonl": line,
            },
        )
        == "error: raw/deeper/d/test_iterations/test_iteration_1.jsonl:1: missing field 'I2'"
    )


def test_deeper_windows_unknown_jsonl_user_and_duplicate_user_are_counted(tmp_path, monkeypatch):
    body = CSV_HEAD + f"u1,movie,eval,x,y,{CELL},{CELL}\n" + f"u1,movie,eval,x,y,{CELL},{CELL}\n"
    lines = [
        json.dumps({"id": "u1", "U1": [4, 5], "I1": ["a", "b"], "U2": [1, 2], "I2": ["c", "d"]}),
        json.dumps({"id": "ghost", "U1": [4, 5], "I1": ["a", "b"], "U2": [1, 2, 3], "I2": ["c", "d", "e"]}),
    ]
    setup(
        tmp_path,
        DEEPER,
        {
            "deeper/d/split_data/test_dataset.csv": body,
            "deeper/d/test_iterations/test_iteration_1.jsonl": "\n".join(lines) + "\n",
        },
    )
    assert run(ingest_main, tmp_path, monkeypatch).exit_code == 0
    dropped = json.loads(Path("metrics/data.json").read_text())["domains"]["d"]["dropped"]
    assert dropped["duplicate"] == 4 and dropped["unknown_user"] == 5
    with duckdb.connect("data/ingest/ratings.duckdb", read_only=True) as con:
        assert con.execute("SELECT window_hint, count(*) FROM ratings GROUP BY 1 ORDER BY 1").fetchall() == [
            (0, 2),
            (1, 2),
            (2, 2),
        ]  # W2 joined from the JSONL; W1 stays the CSV's


# --- ratings of items the item file does not list ----------------------------------------------------------


def test_unknown_items_are_counted_printed_and_kept_by_default(tmp_path, monkeypatch):
    ratings = RATINGS + "1,3,5.0,964982705\n2,3,2.0,964982706\n"  # movie 3 is not in movies.csv
    setup(tmp_path, ML_CSV, {"ml/movies.csv": MOVIES, "ml/ratings.csv": ratings})
    result = run(ingest_main, tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "movielens: 2 users, 3 items, 4 ratings; dropped: none; kept with a remark: title_from_id 1, unknown_item 2"
    ]
    s = json.loads(Path("metrics/data.json").read_text())["domains"]["movielens"]
    assert (s["unknown_item"], s["dropped"]["unknown_item"], s["ratings"]) == (2, 0, 4)
    with duckdb.connect("data/ingest/ratings.duckdb", read_only=True) as con:
        assert con.execute("SELECT title FROM items WHERE item_id = '3'").fetchall() == [("item 3",)]


def test_unknown_items_dropped_when_asked(tmp_path, monkeypatch):
    ratings = RATINGS + "1,3,5.0,964982705\n2,3,2.0,964982706\n"
    setup(tmp_path, ML_CSV, {"ml/movies.csv": MOVIES, "ml/ratings.csv": ratings}, unknown_items="drop")
    result = run(ingest_main, tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["movielens: 1 users, 2 items, 2 ratings; dropped: unknown_item 2"]
    s = json.loads(Path("metrics/data.json").read_text())["domains"]["movielens"]
    assert (s["unknown_item"], s["dropped"]["unknown_item"], s["title_from_id"]) == (0, 2, 0)
    with duckdb.connect("data/ingest/ratings.duckdb", read_only=True) as con:
        assert con.execute("SELECT user_id, item_id FROM ratings ORDER BY seq").fetchall() == [
            ("1", "1"),
            ("1", "2"),
        ]
        assert con.execute("SELECT item_id FROM items").fetchall() == [("1",), ("2",)]


def test_unknown_items_need_an_item_file_and_a_valid_setting(tmp_path, monkeypatch):
    # no meta file: nothing is unknown, every title comes from the id (as before)
    body = json.dumps(REVIEW) + "\n"
    setup(tmp_path / "a", AMAZON, {"amazon/Books_5.json": body}, unknown_items="drop")
    result = run(ingest_main, tmp_path / "a", monkeypatch)
    assert result.output.splitlines() == [
        "books: 1 users, 1 items, 1 ratings; dropped: none; kept with a remark: title_from_id 1"
    ]
    # a meta file that lacks the rated asin: all its ratings are unknown; dropping them leaves nothing
    sources = [{**AMAZON[0], "meta": "amazon/meta_Books.json"}]
    meta = json.dumps({"asin": "B2", "title": "Other"}) + "\n"
    setup(
        tmp_path / "b",
        sources,
        {"amazon/Books_5.json": body, "amazon/meta_Books.json": meta},
        unknown_items="drop",
    )
    assert (
        error_line(run(ingest_main, tmp_path / "b", monkeypatch))
        == "error: raw/amazon/Books_5.json: no ratings to keep (rows skipped: 1)"
    )
    setup(tmp_path / "c", ML_CSV, {"ml/movies.csv": MOVIES, "ml/ratings.csv": RATINGS}, unknown_items="skip")
    assert (
        error_line(run(ingest_main, tmp_path / "c", monkeypatch))
        == "error: params.yaml: ingest.unknown_items: must be one of keep, drop, not 'skip'"
    )


# --- scraped titles are cleaned before they reach a prompt, and counted ---------------------------------------


def test_scraped_titles_are_cleaned_and_counted(tmp_path, monkeypatch):
    movies = MOVIES + (
        "3,Fast &amp; Furious (2009),Action\n"
        '4,"Weird Al&#39;s &quot;Tour&quot; <span>Live</span> (2010)",Comedy\n'
        '5,"Evolution,Science/Mathematics"" />",Documentary\n'
        "6,AT&T (1999),Drama\n"
    )
    ratings = RATINGS + "".join(f"1,{i},4.0,96498270{i}\n" for i in range(3, 7))
    setup(tmp_path, ML_CSV, {"ml/movies.csv": movies, "ml/ratings.csv": ratings})
    result = run(ingest_main, tmp_path, monkeypatch)
    assert result.output.splitlines() == [
        "movielens: 1 users, 6 items, 6 ratings; dropped: none; kept with a remark: title_cleaned 3"
    ]
    with duckdb.connect("data/ingest/ratings.duckdb", read_only=True) as con:
        assert dict(con.execute("SELECT item_id, title FROM items WHERE item_id > '2'").fetchall()) == {
            "3": "Fast & Furious (2009)",
            "4": 'Weird Al\'s "Tour" Live (2010)',
            "5": "Evolution,Science/Mathematics",
            "6": "AT&T (1999)",
        }


# --- a folder of the wrong shape names what it looked for ----------------------------------------------------


def test_deeper_windows_folder_errors_name_the_files_looked_for(tmp_path, monkeypatch):
    body = CSV_HEAD + f"u1,movie,eval,x,y,{CELL},{CELL}\n"
    assert (
        ingest_error(tmp_path / "a", monkeypatch, DEEPER, {"deeper/notes.txt": "x"})
        == "error: raw/deeper: no domain folder: looked for <domain>/split_data/train_dataset.csv or "
        "<domain>/split_data/test_dataset.csv under it"
    )
    # the path names one domain folder instead of the folder of domains
    assert (
        ingest_error(
            tmp_path / "b",
            monkeypatch,
            [{"format": "deeper_windows", "path": "deeper/d"}],
            {"deeper/d/split_data/test_dataset.csv": body},
        )
        == "error: raw/deeper/d: no domain folder: looked for <domain>/split_data/train_dataset.csv or "
        "<domain>/split_data/test_dataset.csv under it; this is a domain folder itself: give its parent as path"
    )
    assert (
        ingest_error(tmp_path / "c", monkeypatch, DEEPER, {"deeper/d/split_data/readme.txt": "x"})
        == "error: raw/deeper/d/split_data: has neither train_dataset.csv nor test_dataset.csv nor full_dataset.csv"
    )
    # full_dataset.csv (the authors' unseen domains): each row's split must be train, eval or test
    assert (
        ingest_error(
            tmp_path / "d",
            monkeypatch,
            DEEPER,
            {"deeper/d/split_data/full_dataset.csv": CSV_HEAD + f"u1,movie,dev,x,y,{CELL},{CELL}\n"},
        )
        == "error: raw/deeper/d/split_data/full_dataset.csv:2: split 'dev' is not one of train, eval, test"
    )


GOOGLE = [
    {"format": "google_local", "path": "google/review-New_York.json", "domain": "local", "item_type": "place"}
]


def test_google_times_are_milliseconds_throughout(tmp_path, monkeypatch):
    def review(time):
        return json.dumps(
            {
                "user_id": "1",
                "name": "A",
                "time": time,
                "rating": 5,
                "text": None,
                "pics": None,
                "resp": None,
                "gmap_id": "0x1",
            }
        )

    body = review(1566604210000) + "\n" + review(1566604211) + "\n"  # the second in seconds: 1970 as ms
    assert (
        ingest_error(tmp_path, monkeypatch, GOOGLE, {"google/review-New_York.json": body})
        == "error: raw/google/review-New_York.json:2: time 1566604211 is too small for unix milliseconds (seconds?)"
    )


# --- params ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, expected",
    [
        (
            {"format": "csv", "path": "ml", "domain": "d", "item_type": "x"},
            "error: params.yaml: ingest.presets.t[0].format: 'csv' is not one of movielens100k_parquet, ml100k,",
        ),
        (
            {"format": "movielens_csv", "path": "ml", "item_type": "x"},
            "error: params.yaml: ingest.presets.t[0].domain: missing",
        ),
        (
            {"format": "movielens_csv", "path": "ml", "domain": "d", "item_type": "x", "meta": "m.csv"},
            "error: params.yaml: ingest.presets.t[0].meta: not a setting of format movielens_csv",
        ),
    ],
)
def test_bad_ingest_params(tmp_path, monkeypatch, source, expected):
    line = ingest_error(tmp_path, monkeypatch, [source], {})
    assert line.startswith(expected), line


def test_bad_window_params_and_missing_database(tmp_path, monkeypatch):
    setup(tmp_path, ML_CSV, {}, window={**SMALL_WINDOWS, "train_count": 3})
    assert (
        error_line(run(window_main, tmp_path, monkeypatch))
        == "error: params.yaml: window.train_count: must be <= window.count (2)"
    )
    setup(tmp_path, ML_CSV, {}, window={**SMALL_WINDOWS, "domains": {"movielens": {"eval_users": -1}}})
    assert (
        error_line(run(window_main, tmp_path, monkeypatch))
        == "error: params.yaml: window.domains.movielens.eval_users: must be >= 0, got -1"
    )
    setup(tmp_path, ML_CSV, {})
    assert (
        error_line(run(window_main, tmp_path, monkeypatch))
        == "error: data/ingest/ratings.duckdb: not found; run the ingest stage first (dvc repro ingest)"
    )
    (tmp_path / "data" / "ingest").mkdir(parents=True)
    (tmp_path / "data" / "ingest" / "ratings.duckdb").write_bytes(b"not a database at all" * 100)
    line = error_line(run(window_main, tmp_path, monkeypatch))
    assert line.startswith(
        "error: data/ingest/ratings.duckdb: not a DuckDB database, or its header is damaged ("
    )
    assert line.endswith("); rebuild it from the raw files: dvc repro -f --single-item ingest")


# --- titles that could break things reach windows.parquet intact (whitespace made one space) -----------

AWKWARD_TITLES = {
    "1": "{persona} and {{doubled}} braces",
    "2": "He said \"hi\", then 'bye'",
    "3": "first line\nsecond line",
    "4": "tab\tseparated",
    "5": "Amélie – 千と千尋の神隠し 🎬",
    "6": "zero\ufeffwidth no-break space inside",
    "7": "trailing backslash \\",
    "8": "  leading and trailing spaces  ",
}
# What a prompt gets: whitespace made one space (a newline would break a prompt's one-title-a-line list);
# braces, quotes, backslashes and every other character stay exactly as they are.
AWKWARD_TITLES_SHOWN = {
    **AWKWARD_TITLES,
    "3": "first line second line",
    "4": "tab separated",
    "8": "leading and trailing spaces",
}


def csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def test_awkward_titles_reach_windows_and_short_users_are_counted(tmp_path, monkeypatch):
    movies = "\ufeffmovieId,title,genres\n" + "".join(
        f"{i},{csv_field(t)},Drama\n" for i, t in AWKWARD_TITLES.items()
    )
    ratings = (
        RATINGS_HEADER
        + "".join(f"1,{i},{int(i) % 5 + 1},{1000 + int(i)}\n" for i in AWKWARD_TITLES)
        + "2,1,4,5000\n"
    )  # user 2: one rating, below size * count = 4
    setup(
        tmp_path,
        ML_CSV,
        {"ml/movies.csv": movies, "ml/ratings.csv": ratings},
        window={**SMALL_WINDOWS, "size": 4},
    )
    assert run(ingest_main, tmp_path, monkeypatch).exit_code == 0
    result = run(window_main, tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    table = pq.read_table("data/window/windows.parquet").to_pylist()
    assert [(r["window"], r["pos"], r["item_id"]) for r in table] == [
        (w, p, str(4 * w + p + 1)) for w in range(2) for p in range(4)
    ]
    assert {r["item_id"]: r["title"] for r in table} == AWKWARD_TITLES_SHOWN
    assert json.loads(Path("metrics/data.json").read_text())["domains"]["movielens"]["title_cleaned"] == 3
    skipped = json.loads(Path("metrics/window.json").read_text())["domains"]["movielens"]["skipped_users"]
    assert skipped == {"too_few_ratings": 1, "too_few_windows": 0}


# --- a real process: no traceback on stderr --------------------------------------------------------------


def test_real_process_prints_one_line_and_exits_1(tmp_path):
    setup(tmp_path, ML_CSV, {"ml/movies.csv": MOVIES, "ml/ratings.csv": RATINGS + "1,2,10,964982705\n"})
    proc = subprocess.run(
        [sys.executable, "-m", "stages.ingest"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == "error: raw/ml/ratings.csv:4: rating 10 outside 0.5..5 in steps of 0.5\n"
