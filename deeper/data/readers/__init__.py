"""One reader per source format. A reader is `read(source, sink)`: it validates every row it reads
(`InputError` naming file and row) and streams ratings and titles into the sink (deeper.data.ingest.Sink),
counting skips there by reason."""

from __future__ import annotations

from deeper.data.readers import (
    amazon,
    deeper_windows,
    foodcom,
    google_local,
    ml100k,
    movielens100k_parquet,
    movielens_csv,
    tastes_world,
)
from deeper.data.readers.common import Source

READERS = {
    "movielens100k_parquet": movielens100k_parquet.read,
    "ml100k": ml100k.read,
    "movielens_csv": movielens_csv.read,
    "amazon2018": amazon.read,
    "amazon2014": amazon.read,
    "foodcom": foodcom.read,
    "google_local": google_local.read,
    "deeper_windows": deeper_windows.read,
    # the diagnostic world (deeper/diagnostic.py): synthetic users with genre tastes on MovieLens 100K's items
    "tastes_world": tastes_world.read,
}

# Formats whose files name their own domains and item types (a preset entry gives neither).
SELF_NAMING = frozenset({"deeper_windows"})

# Formats with a titles file (`meta` in a preset entry).
WITH_META = frozenset({"amazon2018", "amazon2014", "foodcom", "google_local"})

__all__ = ["READERS", "SELF_NAMING", "WITH_META", "Source"]
