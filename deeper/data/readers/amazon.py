"""Amazon Review Data, 2018 (Ni, Li, McAuley) and 2014 (McAuley): JSON lines, `.gz` or not.

Reviews: overall (1..5), reviewerID, asin, unixReviewTime (else reviewTime "MM DD, YYYY").
`meta` (optional) is meta_<Category>.json: asin, title. Some 2014 dumps hold Python dict literals
instead of JSON; both are read (ast.literal_eval, never eval). Items without a meta title get the
fallback title (counted as `title_from_id`).
"""

from __future__ import annotations

from deeper.data.readers.common import (
    STARS_1_5,
    Source,
    clean_title,
    field,
    id_text,
    iter_json_objects,
    parse_time,
    require_file,
)
from deeper.errors import InputError


def read(src: Source, sink) -> None:
    path = require_file(src.path)
    if src.meta is not None:
        require_file(src.meta)  # fail before the long review pass, not after it
    sink.add_domain(src.domain, src.item_type, src.format, str(path))
    rated: set[str] = set()
    for row, obj in iter_json_objects(path):
        asin = id_text(field(obj, "asin", path, row), "asin", path, row)
        if obj.get("unixReviewTime") is not None:
            ts = parse_time(obj["unixReviewTime"], path, row)
        elif obj.get("reviewTime") is not None:
            ts = parse_time(obj["reviewTime"], path, row)
        else:
            raise InputError(path, "missing field 'unixReviewTime' (and no 'reviewTime')", row)
        sink.rating(src.domain, id_text(field(obj, "reviewerID", path, row), "reviewerID", path, row), asin,
                    STARS_1_5.parse(field(obj, "overall", path, row), path, row), ts)
        rated.add(asin)
    if src.meta is not None:
        for row, obj in iter_json_objects(src.meta):
            asin = obj.get("asin")
            if isinstance(asin, str) and asin in rated:  # meta files list millions of unrated products
                sink.title(src.domain, asin, clean_title(obj.get("title")))
