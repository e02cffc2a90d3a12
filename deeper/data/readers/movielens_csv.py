"""MovieLens CSV releases (ml-latest-small, ml-20m, ml-25m): `path` is the folder with ratings.csv
(userId,movieId,rating,timestamp; half stars 0.5..5) and movies.csv (movieId,title,genres)."""

from __future__ import annotations

from deeper.data.readers.common import (
    CsvRows,
    RatingScale,
    Source,
    TimeColumn,
    id_text,
    require_dir,
)

HALF_STARS = RatingScale(0.5, 5, 0.5)


def read(src: Source, sink) -> None:
    folder = require_dir(src.path)
    sink.add_domain(src.domain, src.item_type, src.format, str(folder), item_file=True)
    movies = folder / "movies.csv"
    for row, rec in CsvRows(movies, ("movieId", "title")):
        sink.title(src.domain, id_text(rec["movieId"], "movieId", movies, row), rec["title"])
    ratings = folder / "ratings.csv"
    timestamp = TimeColumn(ratings, "timestamp")
    for row, rec in CsvRows(ratings, ("userId", "movieId", "rating", "timestamp")):
        sink.rating(
            src.domain,
            id_text(rec["userId"], "userId", ratings, row),
            id_text(rec["movieId"], "movieId", ratings, row),
            HALF_STARS.parse(rec["rating"], ratings, row),
            timestamp.parse(rec["timestamp"], row),
        )
