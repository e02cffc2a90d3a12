"""Food.com Recipes and Interactions (Kaggle, Li et al.): `path` is RAW_interactions.csv
(user_id,recipe_id,date,rating,review; date YYYY-MM-DD, or as copies re-save it: 2017/8/18, 8/18/2017),
`meta` (optional) is RAW_recipes.csv (name,id,...): a rated recipe it lacks is `unknown_item`.

A rating of 0 means "reviewed without stars": a counted skip (`unrated`), not an error, or kept as the
rating 0 when `ingest.zero_ratings` is keep (counted `zero_rating`; deeper.data.ingest.ZERO_RATINGS).
"""

from __future__ import annotations

from deeper.data.readers.common import (
    CsvRows,
    RatingScale,
    Source,
    TimeColumn,
    id_text,
    require_file,
)

STARS_OR_UNRATED = RatingScale(1, 5, 1, unrated=0)


def read(src: Source, sink) -> None:
    path = require_file(src.path)
    sink.add_domain(src.domain, src.item_type, src.format, str(path), item_file=src.meta is not None)
    date = TimeColumn(path, "date")
    for row, rec in CsvRows(path, ("user_id", "recipe_id", "date", "rating")):
        user = id_text(rec["user_id"], "user_id", path, row)
        recipe = id_text(rec["recipe_id"], "recipe_id", path, row)
        rating = STARS_OR_UNRATED.parse(rec["rating"], path, row)
        ts = date.parse(rec["date"], row)
        if rating is None:
            rating = sink.unrated(src.domain)  # ingest.zero_ratings: 0.0 (kept) or None (a counted skip)
        if rating is not None:
            sink.rating(src.domain, user, recipe, rating, ts)
    if src.meta is not None:
        for row, rec in CsvRows(src.meta, ("name", "id")):
            sink.title(src.domain, id_text(rec["id"], "id", src.meta, row), rec["name"])
