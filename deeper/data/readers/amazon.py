"""Amazon Review Data, 2018 (Ni, Li, McAuley) and 2014 (McAuley): JSON lines, `.gz` or not.

Reviews: overall (1..5), reviewerID, asin, unixReviewTime (else reviewTime "MM DD, YYYY").
`meta` (optional) is meta_<Category>.json: asin, title. Some 2014 dumps hold Python dict literals
instead of JSON; both are read (ast.literal_eval, never eval). Items without a meta title get the
fallback title (counted as `title_from_id`); with a meta file, a reviewed asin it lacks is `unknown_item`.
"""

from __future__ import annotations

from deeper.data.readers.common import (
    STARS_1_5,
    Source,
    TimeColumn,
    field,
    id_text,
    iter_json_objects,
    require_file,
)
from deeper.errors import InputError


def read(src: Source, sink) -> None:
    path = require_file(src.path)
    if src.meta is not None:
        require_file(src.meta)  # fail before the long review pass, not after it
    sink.add_domain(src.domain, src.item_type, src.format, str(path), item_file=src.meta is not None)
    # unixReviewTime is the day of reviewTime at 00:00 UTC: a row may give either; each field keeps one encoding
    unix_time, review_time = TimeColumn(path, "unixReviewTime"), TimeColumn(path, "reviewTime")
    rated: set[str] = set()
    for row, obj in iter_json_objects(path):
        asin = id_text(field(obj, "asin", path, row), "asin", path, row)
        if obj.get("unixReviewTime") is not None:
            ts = unix_time.parse(obj["unixReviewTime"], row)
        elif obj.get("reviewTime") is not None:
            ts = review_time.parse(obj["reviewTime"], row)
        else:
            what = (
                "field 'unixReviewTime' is null"
                if "unixReviewTime" in obj
                else "missing field 'unixReviewTime'"
            )
            raise InputError(path, f"{what} (and no 'reviewTime')", row)
        sink.rating(
            src.domain,
            id_text(field(obj, "reviewerID", path, row), "reviewerID", path, row),
            asin,
            STARS_1_5.parse(field(obj, "overall", path, row), path, row),
            ts,
        )
        rated.add(asin)
    if src.meta is not None:
        for row, obj in iter_json_objects(src.meta):
            item = obj.get("asin")
            if isinstance(item, str) and item in rated:  # meta files list millions of unrated products
                sink.title(src.domain, item, obj.get("title"))
