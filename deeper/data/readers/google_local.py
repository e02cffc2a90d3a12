"""Google Local reviews 2021 (Li, Ni, McAuley), one state's review-<State>.json and meta-<State>.json.

Review lines: {user_id, name, time (unix ms), rating (1..5), text, pics, resp, gmap_id};
meta lines: {name, gmap_id, address, category, ...}. The title is the meta `address`, which starts with
the business name ("Name, street, city, ST zip", as in the DEEPER authors' windows), else `name`.
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


def read(src: Source, sink) -> None:
    path = require_file(src.path)
    if src.meta is not None:
        require_file(src.meta)
    sink.add_domain(src.domain, src.item_type, src.format, str(path), item_file=src.meta is not None)
    time = TimeColumn(path, "time", unit="ms")
    rated: set[str] = set()
    for row, obj in iter_json_objects(path):
        place = id_text(field(obj, "gmap_id", path, row), "gmap_id", path, row)
        sink.rating(
            src.domain,
            id_text(field(obj, "user_id", path, row), "user_id", path, row),
            place,
            STARS_1_5.parse(field(obj, "rating", path, row), path, row),
            time.parse(field(obj, "time", path, row), row),
        )
        rated.add(place)
    if src.meta is not None:
        for row, obj in iter_json_objects(src.meta):
            gmap_id = obj.get("gmap_id")
            if isinstance(gmap_id, str) and gmap_id in rated:
                sink.title(src.domain, gmap_id, obj.get("address"))  # the first usable title wins:
                sink.title(src.domain, gmap_id, obj.get("name"))  # the name only where the address is none
