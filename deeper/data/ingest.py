"""Read the sources of an ingest preset into one DuckDB database (tables in deeper.data.schema).

The `Sink` is where readers put what they read: it numbers rows (`seq`, the stable tie-break), drops
exact duplicates, cleans titles (`clean_title`), gives items without a title the fallback "item <id>",
keeps or drops ratings of items the source's item file does not list (`ingest.unknown_items`), counts
every skip and remark by reason and returns the per-domain summary written to metrics/data.json.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa

from deeper.config import get
from deeper.data.readers import READERS, SELF_NAMING, WITH_META, Source
from deeper.data.readers.common import clean_title
from deeper.data.schema import TABLES
from deeper.errors import ConfigError, DeeperError, InputError, first_line
from deeper.outputs import is_disk_full, replacing

# Rows read but not kept, by reason; every domain reports every reason (0 included) so that the metrics
# keep one shape across datasets and `dvc metrics diff` lines up.
DROP_REASONS = (
    "duplicate",  # the same (user, item, rating, time) again; the same user row again (pre-windowed)
    "unrated",  # rating 0 where it means "reviewed without stars" (Food.com)
    "window_mismatch",  # pre-windowed: a window whose title and rating lists differ in length
    "unknown_user",  # pre-windowed: a JSONL window of a user the split CSVs lack
    "untitled",  # pre-windowed: an empty title (the title is the only item id there)
    "unknown_item",  # a rating of an item the item file does not list (ingest.unknown_items: drop)
)
# Rows kept with a remark.
NOTES = (
    "title_from_id",  # items with no title in the source: title = FALLBACK_TITLE_PREFIX + id
    "repeated_in_window",  # pre-windowed: an item rated twice within one window (kept)
    "title_cleaned",  # items whose title lost HTML entities, tags or extra whitespace (clean_title)
    "unknown_item",  # ratings of items the item file does not list, kept (ingest.unknown_items: keep)
    "zero_rating",  # Food.com's 0 ("reviewed without stars") kept as the rating 0 (ingest.zero_ratings: keep)
)
FALLBACK_TITLE_PREFIX = "item "
# What happens to a rating of an item that the source's item file (titles, meta) does not list: kept with
# the fallback title, or dropped. Either way it is counted (`unknown_item`) and printed by the stage.
UNKNOWN_ITEMS = ("keep", "drop")
# What happens to Food.com's rating 0 ("reviewed without stars"): dropped (counted `unrated`), or kept as the
# rating 0 (counted `zero_rating`) as the DEEPER authors' windows keep it (470 of them in food_com) and so
# their MAE counts it. The paper profile keeps; the default drops (a 0 is off the 1..5 scale the prompts ask for).
ZERO_RATINGS = ("drop", "keep")

_BATCH = 500_000
DUCKDB_MEMORY_LIMIT = (
    "1GB"  # DuckDB's own buffers while ingesting; Python's (one batch, the titles) come on top
)
_RATING_SCHEMA = pa.schema(
    [
        ("domain", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("rating", pa.float64()),
        ("ts", pa.int64()),
        ("seq", pa.int64()),
        ("window_hint", pa.int32()),
        ("split_hint", pa.string()),
    ]
)


def check_unknown_items(value) -> str:
    """`ingest.unknown_items`: keep or drop."""
    if value not in UNKNOWN_ITEMS:
        raise ConfigError("ingest.unknown_items", f"must be one of {', '.join(UNKNOWN_ITEMS)}, not {value!r}")
    return value


def check_zero_ratings(value) -> str:
    """`ingest.zero_ratings`: drop or keep."""
    if value not in ZERO_RATINGS:
        raise ConfigError("ingest.zero_ratings", f"must be one of {', '.join(ZERO_RATINGS)}, not {value!r}")
    return value


def options_from_params(params: dict) -> tuple[str, str]:
    """(`ingest.unknown_items`, `ingest.zero_ratings`), checked; absent keys take the defaults keep / drop."""
    return (
        check_unknown_items(get(params, "ingest.unknown_items", "keep")),
        check_zero_ratings(get(params, "ingest.zero_ratings", "drop")),
    )


class Sink:
    """Collects ratings and titles from readers and writes the tables into `con`."""

    def __init__(
        self, con: duckdb.DuckDBPyConnection, unknown_items: str = "keep", zero_ratings: str = "drop"
    ):
        self.zero_ratings = check_zero_ratings(zero_ratings)
        self.con = con
        self.unknown_items = check_unknown_items(unknown_items)
        self.domains: dict[str, tuple[str, str, str]] = {}
        self.listing: set[str] = set()  # domains whose source has an item file: an item not in it is unknown
        self.titles: dict[tuple[str, str], str | None] = {}  # every listed item; None: listed without a title
        self.cleaned: set[tuple[str, str]] = set()  # items whose title clean_title changed
        self.dropped: dict[str, Counter] = {}
        self.notes: dict[str, Counter] = {}
        self._columns: tuple[list, ...] = tuple([] for _ in _RATING_SCHEMA)
        self._seq = 0
        con.execute(f"CREATE TEMP TABLE staging ({TABLES['ratings']})")

    def add_domain(
        self, domain: str, item_type: str, source_format: str, source_path: str, item_file: bool = False
    ) -> None:
        """`item_file`: the source lists its items (titles, meta), so a rated item missing there is unknown."""
        if domain in self.domains:
            raise DeeperError(
                f"domain {domain!r} comes from two sources ({self.domains[domain][2]} and "
                f"{source_path}); give each source its own domain in the ingest preset"
            )
        self.domains[domain] = (item_type, source_format, source_path)
        self.dropped[domain], self.notes[domain] = Counter(), Counter()
        if item_file:
            self.listing.add(domain)

    def title(self, domain: str, item_id: str, title) -> None:
        """An item the source lists, with its title as the source spells it (cleaned here). The first
        usable title wins; an absent, blank or non-text title lists the item without one."""
        key = (domain, item_id)
        if self.titles.get(key) is not None:
            return
        cleaned = clean_title(title)
        self.titles[key] = cleaned
        if cleaned is not None and cleaned != title:
            self.cleaned.add(key)

    def rating(
        self,
        domain: str,
        user_id: str,
        item_id: str,
        rating: float,
        ts: int,
        window: int | None = None,
        split: str | None = None,
    ) -> None:
        c = self._columns
        c[0].append(domain)
        c[1].append(user_id)
        c[2].append(item_id)
        c[3].append(rating)
        c[4].append(ts)
        c[5].append(self._seq)
        c[6].append(window)
        c[7].append(split)
        self._seq += 1
        if len(c[0]) >= _BATCH:
            self._flush()

    def unrated(self, domain: str) -> float | None:
        """What a reader stores for a rating meaning "no stars" (Food.com's 0): 0.0 (counted `zero_rating`) when
        ingest.zero_ratings keeps it, else None (counted skip `unrated`: the reader stores nothing)."""
        if self.zero_ratings == "keep":
            self.note(domain, "zero_rating")
            return 0.0
        self.skip(domain, "unrated")
        return None

    def skip(self, domain: str, reason: str, n: int = 1) -> None:
        assert reason in DROP_REASONS, reason
        self.dropped[domain][reason] += n

    def note(self, domain: str, key: str, n: int = 1) -> None:
        assert key in NOTES, key
        self.notes[domain][key] += n

    def _flush(self) -> None:
        if not self._columns[0]:
            return
        batch = pa.Table.from_arrays(
            [pa.array(col, type=f.type) for col, f in zip(self._columns, _RATING_SCHEMA)],
            schema=_RATING_SCHEMA,
        )
        self.con.register("batch", batch)
        self.con.execute("INSERT INTO staging SELECT * FROM batch")
        self.con.unregister("batch")
        for col in self._columns:
            col.clear()

    def finish(self) -> dict:
        """Write domains, items, ratings; return the summary for metrics/data.json."""
        self._flush()
        con = self.con
        con.execute(f"CREATE TABLE domains ({TABLES['domains']})")
        con.executemany(
            "INSERT INTO domains VALUES (?, ?, ?, ?)",
            [(d, *info) for d, info in sorted(self.domains.items())],
        )
        # Exact duplicates: the first in source order stays.
        con.execute(f"CREATE TABLE ratings ({TABLES['ratings']})")
        con.execute("""
            INSERT INTO ratings SELECT * FROM staging
            QUALIFY row_number() OVER (PARTITION BY domain, user_id, item_id, rating, ts, window_hint
                                       ORDER BY seq) = 1
            ORDER BY domain, seq""")
        for domain, read, kept in con.execute("""
                SELECT s.domain, s.n, coalesce(r.n, 0) FROM (SELECT domain, count(*) n FROM staging GROUP BY 1) s
                LEFT JOIN (SELECT domain, count(*) n FROM ratings GROUP BY 1) r USING (domain)""").fetchall():
            self.dropped[domain]["duplicate"] += read - kept
        con.execute("DROP TABLE staging")

        keys = list(self.titles)
        titles = pa.table(
            {
                "domain": [k[0] for k in keys],
                "item_id": [k[1] for k in keys],
                "title": [self.titles[k] for k in keys],
                "cleaned": [k in self.cleaned for k in keys],
            },
            schema=pa.schema(
                [
                    ("domain", pa.string()),
                    ("item_id", pa.string()),
                    ("title", pa.string()),
                    ("cleaned", pa.bool_()),
                ]
            ),
        )
        con.register("titles", titles)
        con.register("listing", pa.table({"domain": pa.array(sorted(self.listing), type=pa.string())}))
        # Ratings of items the item file does not list: counted, then kept (fallback title) or dropped.
        con.execute("""
            CREATE TEMP TABLE unknown AS
            SELECT domain, item_id, count(*) n FROM ratings SEMI JOIN listing USING (domain)
            ANTI JOIN titles USING (domain, item_id) GROUP BY ALL""")
        reason = self.dropped if self.unknown_items == "drop" else self.notes
        for domain, n in con.execute("SELECT domain, sum(n) FROM unknown GROUP BY 1").fetchall():
            reason[domain]["unknown_item"] += int(n)
        if self.unknown_items == "drop":
            con.execute(
                "DELETE FROM ratings USING unknown u WHERE ratings.domain = u.domain "
                "AND ratings.item_id = u.item_id"
            )
        con.execute("DROP TABLE unknown")
        con.execute(f"CREATE TABLE items ({TABLES['items']})")
        con.execute(
            """
            INSERT INTO items
            SELECT r.domain, r.item_id, coalesce(t.title, ? || r.item_id)
            FROM (SELECT DISTINCT domain, item_id FROM ratings) r LEFT JOIN titles t USING (domain, item_id)
            ORDER BY 1, 2""",
            [FALLBACK_TITLE_PREFIX],
        )
        for domain, untitled, cleaned in con.execute("""
                SELECT r.domain, count(*) FILTER (WHERE t.title IS NULL), count(*) FILTER (WHERE t.cleaned)
                FROM (SELECT DISTINCT domain, item_id FROM ratings) r LEFT JOIN titles t USING (domain, item_id)
                GROUP BY 1""").fetchall():
            self.notes[domain]["title_from_id"] += untitled
            self.notes[domain]["title_cleaned"] += cleaned
        con.unregister("titles")
        con.unregister("listing")

        counts = {
            d: (u, i, n)
            for d, u, i, n in con.execute(
                "SELECT domain, count(DISTINCT user_id), count(DISTINCT item_id), count(*) FROM ratings GROUP BY 1"
            ).fetchall()
        }
        summary = {}
        for domain in sorted(self.domains):
            if domain not in counts:
                dropped = sum(self.dropped[domain].values())
                raise InputError(self.domains[domain][2], f"no ratings to keep (rows skipped: {dropped})")
            users, items, ratings = counts[domain]
            summary[domain] = {
                "users": users,
                "items": items,
                "ratings": ratings,
                "dropped": {r: self.dropped[domain][r] for r in DROP_REASONS},
                **{k: self.notes[domain][k] for k in NOTES},
            }
        total = {k: sum(s[k] for s in summary.values()) for k in ("users", "ratings", *NOTES)}
        total["dropped"] = {r: sum(s["dropped"][r] for s in summary.values()) for r in DROP_REASONS}
        total["domains"] = len(summary)
        return {"domains": summary, "total": total}


def sources_from_params(root: str, preset: str, presets: dict) -> list[Source]:
    """The sources of `ingest.presets.<preset>`, paths resolved against `ingest.root`."""
    if not isinstance(presets, dict) or preset not in presets:
        known = ", ".join(presets) if isinstance(presets, dict) else "none"
        raise ConfigError("ingest.preset", f"{preset!r} is not under ingest.presets (known: {known})")
    entries = presets[preset]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"ingest.presets.{preset}", "must be a non-empty list of sources")
    sources = []
    for i, entry in enumerate(entries):
        key = f"ingest.presets.{preset}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(key, "must be a mapping with format and path")
        fmt = entry.get("format")
        if fmt not in READERS:
            raise ConfigError(f"{key}.format", f"{fmt!r} is not one of {', '.join(READERS)}")
        needed = ["path"] + ([] if fmt in SELF_NAMING else ["domain", "item_type"])
        for name in needed:
            if not isinstance(entry.get(name), str) or not entry[name].strip():
                raise ConfigError(f"{key}.{name}", "missing")
        extra = set(entry) - {"format", "path", "meta", "domain", "item_type", "domains"}
        if (
            extra
            or (entry.get("meta") is not None and fmt not in WITH_META)
            or (entry.get("domains") is not None and fmt not in SELF_NAMING)
        ):
            unknown = sorted(extra) or (
                ["meta"] if entry.get("meta") is not None and fmt not in WITH_META else ["domains"]
            )
            raise ConfigError(f"{key}.{unknown[0]}", f"not a setting of format {fmt}")
        meta = entry.get("meta")
        sources.append(
            Source(
                fmt,
                Path(root) / entry["path"],
                Path(root) / meta if meta else None,
                entry.get("domain"),
                entry.get("item_type"),
                _folder_domains(entry.get("domains"), f"{key}.domains"),
            )
        )
    return sources


def _folder_domains(value, key: str) -> tuple[tuple[str, str], ...]:
    """A self-naming source's `domains`: folder name -> domain name, text to text, no two folders on one name."""
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip() for k, v in value.items()
    ):
        raise ConfigError(key, f"must map folder names to domain names, got {value!r}")
    names = list(value.values())
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise ConfigError(key, f"two folders are named {twice!r}")
    return tuple(sorted(value.items()))


def ingest(
    sources: list[Source], out: str | Path, unknown_items: str = "keep", zero_ratings: str = "drop"
) -> dict:
    """Read every source into a fresh database at `out` (built beside it, then moved into place);
    `unknown_items`: keep or drop ratings of items the source's item file does not list; `zero_ratings`: drop or
    keep Food.com's 0 ("no stars")."""
    check_unknown_items(unknown_items)
    check_zero_ratings(zero_ratings)
    with replacing(out) as tmp:  # a failure, a kill or a full disk leaves the previous database in place
        wal = tmp.with_name(tmp.name + ".wal")
        wal.unlink(missing_ok=True)
        try:
            con = duckdb.connect(str(tmp))
        except duckdb.Error as e:
            if is_disk_full(e):
                raise  # replacing's one line
            raise InputError(tmp, f"cannot create the database: {first_line(e)}") from None
        try:
            # DuckDB keeps tables in memory up to 80% of RAM by default, so the staging table and the
            # de-duplication grew with the rows (~360 bytes a row measured: ~10 GB for Amazon Books). A fixed limit
            # makes it spill to a folder beside the partial database instead (bench/ingest_scale.py).
            con.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
            con.execute(f"SET temp_directory = '{tmp}.spill'")
            sink = Sink(con, unknown_items, zero_ratings)
            for src in sources:
                READERS[src.format](src, sink)
            summary = sink.finish()
            con.execute("CHECKPOINT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):  # closing after a failed write may fail again (full disk)
                con.close()
            wal.unlink(missing_ok=True)
            raise
        con.close()
    return summary
