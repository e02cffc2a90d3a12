"""Food.com Recipes and Interactions (Kaggle, Li et al.): `path` is RAW_interactions.csv
(user_id,recipe_id,date,rating,review; date YYYY-MM-DD), `meta` is RAW_recipes.csv (name,id,...).

A rating of 0 means "reviewed without stars": a counted skip (`unrated`), not an error.
"""

from __future__ import annotations

from deeper.data.readers.common import (
    CsvRows,
    RatingScale,
    Source,
    clean_title,
    id_text,
    parse_time,
    require_file,
)

STARS_OR_UNRATED = RatingScale(1, 5, 1, unrated=0)


def read(src: Source, sink) -> None:
    path = require_file(src.path)
    sink.add_domain(src.domain, src.item_type, src.format, str(path))
    for row, rec in CsvRows(path, ("user_id", "recipe_id", "date", "rating")):
        user = id_text(rec["user_id"], "user_id", path, row)
        recipe = id_text(rec["recipe_id"], "recipe_id", path, row)
        rating = STARS_OR_UNRATED.parse(rec["rating"], path, row)
        ts = parse_time(rec["date"], path, row)
        if rating is None:
            sink.skip(src.domain, "unrated")
        else:
            sink.rating(src.domain, user, recipe, rating, ts)
    if src.meta is not None:
        for row, rec in CsvRows(src.meta, ("name", "id")):
            sink.title(src.domain, id_text(rec["id"], "id", src.meta, row), clean_title(rec["name"]))
