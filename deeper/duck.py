"""What a damaged DuckDB file looks like, for the two databases this project owns: the ingest stage's
data/ingest/ratings.duckdb and the persona store. DuckDB checks every block it reads (a checksum per block), so
damage surfaces as an error on open or in the first query that reads a damaged block; these are its marks."""

from __future__ import annotations

DAMAGE_MARKS = ("corrupt database file", "data corruption", "could not read enough bytes", "invalidated")
NOT_DUCKDB_MARK = "not a valid duckdb database file"  # a file of another kind, or one whose header is damaged


def is_damage(error: BaseException) -> bool:
    """True for a DuckDB error that says the file is damaged (not a bug in a query, not a lock)."""
    import duckdb

    return isinstance(error, duckdb.Error) and any(m in str(error).lower() for m in DAMAGE_MARKS)


def is_not_duckdb(error: BaseException) -> bool:
    """True for DuckDB's refusal of a file that is not a database, or whose header is damaged."""
    return NOT_DUCKDB_MARK in str(error).lower()
