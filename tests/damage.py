"""Damaging a DuckDB file the way a bad sector or a torn write does, for the tests of one-line damage messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb


def damaged_copies(db: Path, tmp_path: Path, prefix: str = "probe"):
    """Copies of `db`, one per half-block step, each with 64 bytes overwritten in the middle of one block:
    (copy, offset)."""
    size = db.stat().st_size
    step = 128 * 1024
    for n, offset in enumerate(range(12288 + step // 2, size, step)):
        copy = tmp_path / f"{prefix}{n}.duckdb"
        shutil.copyfile(db, copy)
        with copy.open("r+b") as f:
            f.seek(offset)
            f.write(bytes(range(64)))
        yield copy, offset


def damaged_data_copy(db: Path, tmp_path: Path, query: str) -> tuple[Path, int]:
    """The first damaged copy of `db` (damaged_copies) that still opens and on which DuckDB itself then refuses
    `query` with its checksum error, and the offset."""
    for copy, offset in damaged_copies(db, tmp_path):
        try:
            con = duckdb.connect(str(copy), read_only=True)
        except duckdb.Error:
            continue  # a header or catalog block: the open fails (also one line, but not what is tested here)
        try:
            con.execute(query).fetchall()
        except duckdb.Error as e:
            if "Corrupt database file: computed checksum" in str(e):
                return copy, offset
        finally:
            con.close()
    raise AssertionError(f"no offset of {db} gave a block DuckDB rejects on {query!r}")
