"""The official MovieLens 100K files: `path` is the folder with u.data and u.item.

u.data: headerless, tab-separated `user item rating unixtime`; u.item: pipe-separated, latin-1,
`movie id|movie title|release date|...`.
"""

from __future__ import annotations

from deeper.data.readers.common import (
    STARS_1_5,
    CsvRows,
    Source,
    TimeColumn,
    id_text,
    require_dir,
)

DATA_FIELDS = ("user_id", "item_id", "rating", "timestamp")
ITEM_FIELDS = ("item_id", "title")  # the genre flags after them are not needed


def read(src: Source, sink) -> None:
    folder = require_dir(src.path)
    sink.add_domain(src.domain, src.item_type, src.format, str(folder), item_file=True)
    items = folder / "u.item"
    for row, rec in CsvRows(
        items,
        ITEM_FIELDS,
        delimiter="|",
        encoding="latin-1",
        fieldnames=ITEM_FIELDS,
        quoting=False,
        extra_ok=True,
    ):
        sink.title(src.domain, id_text(rec["item_id"], "item id", items, row), rec["title"])
    data = folder / "u.data"
    timestamp = TimeColumn(data, "timestamp")
    for row, rec in CsvRows(data, DATA_FIELDS, delimiter="\t", fieldnames=DATA_FIELDS, quoting=False):
        sink.rating(
            src.domain,
            id_text(rec["user_id"], "user id", data, row),
            id_text(rec["item_id"], "item id", data, row),
            STARS_1_5.parse(rec["rating"], data, row),
            timestamp.parse(rec["timestamp"], row),
        )
