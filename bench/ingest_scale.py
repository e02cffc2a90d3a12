"""Ingest at paper scale (issue 21 item 7): stages.ingest's reader vs DuckDB's own reader of the same file.

For each raw format the paper's sources come in (amazon2018 JSON lines with reviewText, movielens_csv,
foodcom CSV with review text, google_local JSON lines) and each row count, the command writes a file of that
shape (seeded, in a temporary folder; ~20 ratings a user, ~10 an item, review texts of ~40 words), then times,
each in a fresh process so that peak RSS is that of the run alone:
- `ours`: deeper.data.ingest.ingest of one source of the format (every validation, the de-duplication, the
  final tables), the database written to disk;
- `duckdb`: DuckDB's native reader of the same ratings file into a table (read_json / read_csv, no checks).
It writes bench/results/ingest_scale.json: seconds, peak RSS (MB) and ratios per format and row count, with the
machine's CPU model. A ratio `speed` = duckdb seconds / ours seconds (1 = as fast as the native reader).

    python bench/ingest_scale.py --rows 1000000 --rows 5000000
    python bench/ingest_scale.py --rows 20000 --formats amazon2018 --out /tmp/x.json   # a quick look
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.prefix_reuse import machine

FORMATS = ("amazon2018", "movielens_csv", "foodcom", "google_local")
WORDS = [
    "great",
    "good",
    "fine",
    "tasty",
    "bad",
    "awful",
    "loved",
    "hated",
    "quick",
    "slow",
    "easy",
    "hard",
    "fresh",
    "salty",
    "sweet",
    "cheap",
]


def _text(rng: random.Random, n: int = 40) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def generate(fmt: str, rows: int, folder: Path, seed: int = 0) -> tuple[dict, Path]:
    """Write a source of `fmt` with `rows` ratings under `folder`; return (its preset entry, the ratings file)."""
    rng = random.Random(seed)
    users, items = max(rows // 20, 1), max(rows // 10, 1)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "amazon2018":
        path = folder / "Books_5.json"
        with path.open("w") as f:
            for i in range(rows):
                t = 1_300_000_000 + rng.randrange(300_000_000)
                f.write(
                    json.dumps(
                        {
                            "overall": float(rng.randint(1, 5)),
                            "verified": True,
                            "reviewTime": "01 1, 2015",
                            "reviewerID": f"A{rng.randrange(users):012d}",
                            "asin": f"B{rng.randrange(items):09d}",
                            "reviewerName": "reader",
                            "reviewText": _text(rng),
                            "summary": _text(rng, 5),
                            "unixReviewTime": t - t % 86400,
                        }
                    )
                    + "\n"
                )
        meta = folder / "meta_Books.json"
        with meta.open("w") as f:
            for i in range(items):
                f.write(json.dumps({"asin": f"B{i:09d}", "title": f"Book {i}", "category": ["Books"]}) + "\n")
        return {"format": fmt, "path": path.name, "meta": meta.name, "domain": "d", "item_type": "book"}, path
    if fmt == "movielens_csv":
        sub = folder / "ml"
        sub.mkdir(exist_ok=True)
        with (sub / "movies.csv").open("w") as f:
            f.write("movieId,title,genres\n")
            for i in range(items):
                f.write(f"{i},Movie {i} (1995),Drama\n")
        path = sub / "ratings.csv"
        with path.open("w") as f:
            f.write("userId,movieId,rating,timestamp\n")
            for _ in range(rows):
                f.write(
                    f"{rng.randrange(users)},{rng.randrange(items)},{rng.randint(1, 10) / 2},"
                    f"{1_000_000_000 + rng.randrange(400_000_000)}\n"
                )
        return {"format": fmt, "path": "ml", "domain": "d", "item_type": "movie"}, path
    if fmt == "foodcom":
        path = folder / "RAW_interactions.csv"
        with path.open("w") as f:
            f.write("user_id,recipe_id,date,rating,review\n")
            for _ in range(rows):
                f.write(
                    f"{rng.randrange(users)},{rng.randrange(items)},20{rng.randint(10, 18)}-0{rng.randint(1, 9)}-1"
                    f'{rng.randint(0, 9)},{rng.randint(1, 5)},"{_text(rng)}"\n'
                )
        meta = folder / "RAW_recipes.csv"
        with meta.open("w") as f:
            f.write("name,id,minutes\n")
            for i in range(items):
                f.write(f"recipe {i},{i},30\n")
        return {
            "format": fmt,
            "path": path.name,
            "meta": meta.name,
            "domain": "d",
            "item_type": "recipe",
        }, path
    if fmt == "google_local":
        path = folder / "review-New_York.json"
        with path.open("w") as f:
            for _ in range(rows):
                f.write(
                    json.dumps(
                        {
                            "user_id": str(10**20 + rng.randrange(users)),
                            "name": "visitor",
                            "time": 1_500_000_000_000 + rng.randrange(10**11),
                            "rating": rng.randint(1, 5),
                            "text": _text(rng),
                            "pics": None,
                            "resp": None,
                            "gmap_id": f"0x{rng.randrange(items):x}:0x1",
                        }
                    )
                    + "\n"
                )
        meta = folder / "meta-New_York.json"
        with meta.open("w") as f:
            for i in range(items):
                f.write(
                    json.dumps(
                        {
                            "name": f"Place {i}",
                            "gmap_id": f"0x{i:x}:0x1",
                            "address": f"Place {i}, 1 Main St, New York, NY 10001",
                        }
                    )
                    + "\n"
                )
        return {
            "format": fmt,
            "path": path.name,
            "meta": meta.name,
            "domain": "d",
            "item_type": "local business",
        }, path
    raise click.BadParameter(f"unknown format {fmt}")


OURS = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from deeper.data.ingest import ingest, sources_from_params
start = time.perf_counter()
summary = ingest(sources_from_params({root!r}, "p", {{"p": [{entry!r}]}}), {db!r})
seconds = time.perf_counter() - start
print("RESULT " + json.dumps({{"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "ratings": summary["domains"]["d"]["ratings"]}}))
"""
NATIVE = """
import json, resource, time, duckdb
start = time.perf_counter()
con = duckdb.connect({db!r})
con.execute("CREATE TABLE t AS SELECT * FROM {reader}")
n = con.execute("SELECT count(*) FROM t").fetchone()[0]
con.close()
seconds = time.perf_counter() - start
print("RESULT " + json.dumps({{"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ratings": n}}))
"""


def _run(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise click.ClickException(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
    # the result is marked: DuckDB's progress bar writes to stdout too, without a line break
    marked = re.findall(r"RESULT (\{.*\})", done.stdout)
    if not marked:
        raise click.ClickException(f"no result line; the run printed: {done.stdout[-500:]!r}")
    return json.loads(marked[-1])


def measure(fmt: str, rows: int, work: Path, baseline: str | None = None) -> dict:
    folder = work / f"{fmt}-{rows}"
    entry, ratings_file = generate(fmt, rows, folder)
    repo = str(Path(__file__).resolve().parents[1])
    ours = _run(OURS.format(repo=repo, root=str(folder), entry=entry, db=str(folder / "ours.duckdb")))
    before = None
    if baseline is not None:  # the same file through another checkout's ingest (before/after a change)
        before = _run(
            OURS.format(repo=baseline, root=str(folder), entry=entry, db=str(folder / "before.duckdb"))
        )
    reader = (
        f"read_json('{ratings_file}', format='newline_delimited')"
        if ratings_file.suffix == ".json"
        else f"read_csv('{ratings_file}')"
    )
    native = _run(NATIVE.format(db=str(folder / "native.duckdb"), reader=reader))
    return {
        "format": fmt,
        "rows": rows,
        "file_mb": round(ratings_file.stat().st_size / 2**20, 1),
        "ours": {k: round(v, 2) if isinstance(v, float) else v for k, v in ours.items()},
        "duckdb": {k: round(v, 2) if isinstance(v, float) else v for k, v in native.items()},
        **(
            {"before": {k: round(v, 2) if isinstance(v, float) else v for k, v in before.items()}}
            if before
            else {}
        ),
        "speed": round(native["seconds"] / ours["seconds"], 3),
        "rss_ratio": round(ours["rss_mb"] / native["rss_mb"], 2),
    }


@click.command(help=__doc__)
@click.option(
    "--rows", "row_counts", type=int, multiple=True, default=(1_000_000, 5_000_000), show_default=True
)
@click.option("--formats", type=click.Choice(FORMATS), multiple=True, default=FORMATS)
@click.option(
    "--out", default="bench/results/ingest_scale.json", show_default=True, type=click.Path(dir_okay=False)
)
@click.option(
    "--baseline",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Another checkout (e.g. a git worktree of the previous commit) whose ingest runs on the same files.",
)
def main(row_counts: tuple[int, ...], formats: tuple[str, ...], out: str, baseline: str | None) -> None:
    results = []
    with tempfile.TemporaryDirectory(prefix="ingest-scale-") as tmp:
        for rows in row_counts:
            for fmt in formats:
                result = measure(fmt, rows, Path(tmp), baseline)
                click.echo(
                    f"{fmt} {rows:,} rows: ours {result['ours']['seconds']} s / {result['ours']['rss_mb']} MB, duckdb "
                    f"{result['duckdb']['seconds']} s / {result['duckdb']['rss_mb']} MB: speed {result['speed']}x",
                    err=True,
                )
                results.append(result)
                for f in (Path(tmp) / f"{fmt}-{rows}").iterdir():  # the next size needs the disk
                    f.unlink() if f.is_file() else None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"machine": machine(), "results": results}, indent=1) + "\n")
    click.echo(f"wrote {out}", err=True)


if __name__ == "__main__":
    main()
