"""Raw rating sources -> one DuckDB database (`ingest`) -> time-ordered windows per user (`window`).

- `readers/`: one module per source format; each streams validated ratings and titles into a `Sink`.
- `ingest.py`: the `Sink` (deduplicates, cleans and fills titles, counts unknown items, writes
  `ratings.duckdb`) and the source list from params.
- `window.py`: cuts each user's ratings into windows, splits users into train/eval, writes Parquet.
- `schema.py`: the table and column names both stages share (docs/ARCHITECTURE.md).
"""
