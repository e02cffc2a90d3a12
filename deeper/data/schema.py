"""Tables of `data/ingest/ratings.duckdb` and columns of `windows.parquet` (docs/ARCHITECTURE.md)."""

from __future__ import annotations

TABLES = {
    "domains": "domain VARCHAR, item_type VARCHAR, source_format VARCHAR, source_path VARCHAR",
    "items": "domain VARCHAR, item_id VARCHAR, title VARCHAR",
    # ts: unix seconds, or the position for pre-windowed data; seq: row order in the source (tie-break);
    # window_hint / split_hint: only for pre-windowed data (the DEEPER authors' windows), else NULL.
    "ratings": "domain VARCHAR, user_id VARCHAR, item_id VARCHAR, rating DOUBLE, ts BIGINT, seq BIGINT, "
    "window_hint INTEGER, split_hint VARCHAR",
}

SPLITS = ("train", "eval")

WINDOW_COLUMNS = (
    "domain",
    "item_type",
    "seen",
    "user_id",
    "split",
    "window",
    "pos",
    "item_id",
    "title",
    "rating",
)
