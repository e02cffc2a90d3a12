"""Read the sources of an ingest preset into one DuckDB database (tables in deeper.data.schema).

The `Sink` is where readers put what they read: it numbers rows (`seq`, the stable tie-break), drops
exact duplicates, gives items without a title the fallback "item <id>", counts every skip by reason and
returns the per-domain summary written to metrics/data.json.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa

from deeper.data.readers import READERS, SELF_NAMING, WITH_META, Source
from deeper.data.schema import TABLES
from deeper.errors import ConfigError, DeeperError, InputError

# Rows read but not kept, by reason; every domain reports every reason (0 included) so that the metrics
# keep one shape across datasets and `dvc metrics diff` lines up.
DROP_REASONS = (
    "duplicate",        # the same (user, item, rating, time) again; the same user row again (pre-windowed)
    "unrated",          # rating 0 where it means "reviewed without stars" (Food.com)
    "window_mismatch",  # pre-windowed: a window whose title and rating lists differ in length
    "unknown_user",     # pre-windowed: a JSONL window of a user the split CSVs lack
    "untitled",         # pre-windowed: an empty title (the title is the only item id there)
)
# Rows kept with a remark.
NOTES = (
    "title_from_id",        # items with no title in the source: title = FALLBACK_TITLE_PREFIX + id
    "repeated_in_window",   # pre-windowed: an item rated twice within one window (kept)
)
FALLBACK_TITLE_PREFIX = "item "

_BATCH = 500_000
_RATING_SCHEMA = pa.schema([
    ("domain", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()), ("rating", pa.float64()),
    ("ts", pa.int64()), ("seq", pa.int64()), ("window_hint", pa.int32()), ("split_hint", pa.string()),
])


class Sink:
    """Collects ratings and titles from readers and writes the tables into `con`."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con
        self.domains: dict[str, tuple[str, str, str]] = {}
        self.titles: dict[tuple[str, str], str] = {}
        self.dropped: dict[str, Counter] = {}
        self.notes: dict[str, Counter] = {}
        self._columns: tuple[list, ...] = tuple([] for _ in _RATING_SCHEMA)
        self._seq = 0
        con.execute(f"CREATE TEMP TABLE staging ({TABLES['ratings']})")

    def add_domain(self, domain: str, item_type: str, source_format: str, source_path: str) -> None:
        if domain in self.domains:
            raise DeeperError(f"domain {domain!r} comes from two sources ({self.domains[domain][2]} and "
                              f"{source_path}); give each source its own domain in the ingest preset")
        self.domains[domain] = (item_type, source_format, source_path)
        self.dropped[domain], self.notes[domain] = Counter(), Counter()

    def title(self, domain: str, item_id: str, title: str | None) -> None:
        """The first usable title of an item wins; None (absent or blank) is ignored."""
        if title is not None:
            self.titles.setdefault((domain, item_id), title)

    def rating(self, domain: str, user_id: str, item_id: str, rating: float, ts: int,
               window: int | None = None, split: str | None = None) -> None:
        c = self._columns
        c[0].append(domain), c[1].append(user_id), c[2].append(item_id), c[3].append(rating)
        c[4].append(ts), c[5].append(self._seq), c[6].append(window), c[7].append(split)
        self._seq += 1
        if len(c[0]) >= _BATCH:
            self._flush()

    def skip(self, domain: str, reason: str, n: int = 1) -> None:
        assert reason in DROP_REASONS, reason
        self.dropped[domain][reason] += n

    def note(self, domain: str, key: str, n: int = 1) -> None:
        assert key in NOTES, key
        self.notes[domain][key] += n

    def _flush(self) -> None:
        if not self._columns[0]:
            return
        batch = pa.Table.from_arrays([pa.array(col, type=f.type) for col, f in zip(self._columns, _RATING_SCHEMA)],
                                     schema=_RATING_SCHEMA)
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
        con.executemany("INSERT INTO domains VALUES (?, ?, ?, ?)",
                        [(d, *info) for d, info in sorted(self.domains.items())])
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

        titles = pa.table({"domain": [k[0] for k in self.titles], "item_id": [k[1] for k in self.titles],
                           "title": list(self.titles.values())})
        con.register("titles", titles)
        con.execute(f"CREATE TABLE items ({TABLES['items']})")
        con.execute("""
            INSERT INTO items
            SELECT r.domain, r.item_id, coalesce(t.title, ? || r.item_id)
            FROM (SELECT DISTINCT domain, item_id FROM ratings) r LEFT JOIN titles t USING (domain, item_id)
            ORDER BY 1, 2""", [FALLBACK_TITLE_PREFIX])
        for domain, n in con.execute("""
                SELECT r.domain, count(*) FROM (SELECT DISTINCT domain, item_id FROM ratings) r
                ANTI JOIN titles t USING (domain, item_id) GROUP BY 1""").fetchall():
            self.notes[domain]["title_from_id"] += n
        con.unregister("titles")

        counts = {d: (u, i, n) for d, u, i, n in con.execute(
            "SELECT domain, count(DISTINCT user_id), count(DISTINCT item_id), count(*) FROM ratings GROUP BY 1"
        ).fetchall()}
        summary = {}
        for domain in sorted(self.domains):
            if domain not in counts:
                dropped = sum(self.dropped[domain].values())
                raise InputError(self.domains[domain][2], f"no ratings to keep (rows skipped: {dropped})")
            users, items, ratings = counts[domain]
            summary[domain] = {
                "users": users, "items": items, "ratings": ratings,
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
        extra = set(entry) - {"format", "path", "meta", "domain", "item_type"}
        if extra or (entry.get("meta") is not None and fmt not in WITH_META):
            unknown = sorted(extra) or ["meta"]
            raise ConfigError(f"{key}.{unknown[0]}", f"not a setting of format {fmt}")
        meta = entry.get("meta")
        sources.append(Source(fmt, Path(root) / entry["path"], Path(root) / meta if meta else None,
                              entry.get("domain"), entry.get("item_type")))
    return sources


def ingest(sources: list[Source], out: str | Path) -> dict:
    """Read every source into a fresh database at `out` (built beside it, then moved into place)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    for stale in (tmp, tmp.with_name(tmp.name + ".wal")):
        stale.unlink(missing_ok=True)
    try:
        con = duckdb.connect(str(tmp))
    except duckdb.Error as e:
        raise InputError(tmp, f"cannot create the database: {str(e).splitlines()[0]}") from None
    try:
        sink = Sink(con)
        for src in sources:
            READERS[src.format](src, sink)
        summary = sink.finish()
        con.execute("CHECKPOINT")
    except BaseException:
        con.close()
        tmp.unlink(missing_ok=True)
        raise
    con.close()
    os.replace(tmp, out)
    return summary
