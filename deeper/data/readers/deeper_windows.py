"""The DEEPER authors' preprocessed windows (github.com/sheep333c/DEEPER, data/data_process/).

`path` is a folder of domain folders; the domain is the folder name, or the name the preset entry's
`domains` gives it (the authors' folders are not the paper's domain names: `amazon_automative`, `food_com`).
Each has
- split_data/{train,test}_dataset.csv: one user a row, `id,item_type,split,...,windows_0..windows_4`, each
  cell a Python literal {'items': [titles], 'ratings': [ratings]} (ast.literal_eval, never eval);
  train -> split_hint 'train', test -> 'eval'. A folder with neither (the authors' unseen Arts, Automotive and
  Sports) is read from split_data/full_dataset.csv, each row's split from its `split` column (train | eval;
  test counts as eval); where train or test files exist, full_dataset.csv (their union) is not read.
- test_iterations/test_iteration_{t}.jsonl: one eval user a line with U{k}/I{k} (ratings/titles of
  windows t-1, t, t+1): the only source of windows 5 and 6. Windows the CSV has are taken from the CSV.

There are no item ids: the id is the title without HTML entities and quote marks, because the CSV and
the JSONL spell 2-3% of titles differently ("&amp;" vs "&", double vs single quotes); the first spelling
seen is the title.
Quirks kept or counted: Food.com ratings of 0 (counted `unrated`, or kept: ingest.zero_ratings), MovieLens half stars, an item repeated
within a window (kept, counted `repeated_in_window`), an empty title (dropped, counted `untitled`:
a few Amazon books), a window whose title and rating lists differ in
length (dropped, counted `window_mismatch`: two titles merged into one in a few Google JSONL lines).
"""

from __future__ import annotations

import ast
import html
import re
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

from deeper.data.readers.common import (
    CsvRows,
    RatingScale,
    Source,
    clean_title,
    field,
    id_text,
    iter_json_objects,
    require_dir,
)
from deeper.errors import InputError

# One scale for the whole format: half stars (MovieLens), 0 = reviewed without stars (Food.com).
SCALE = RatingScale(0.5, 5, 0.5, unrated=0)
SPLIT_FILES = (("train_dataset.csv", "train"), ("test_dataset.csv", "eval"))
FULL_FILE = "full_dataset.csv"  # read only where SPLIT_FILES are absent; split from the row's `split`
ROW_SPLITS = {"train": "train", "eval": "eval", "test": "eval"}
WINDOW_COLUMN = re.compile(r"windows_(\d+)")
ITERATION_FILE = re.compile(r"test_iteration_(\d+)\.jsonl")
RATINGS_KEY = re.compile(r"U(\d+)")
# The JSONL spells a title like the CSV except for HTML entities ("&amp;" -> "&") and quote marks (double
# -> single; twice "@" -> "'"): the id drops exactly those. Case and spaces stay: Food.com has distinct
# recipes "mandarin chicken" and "mandarin  chicken".
_QUOTES = re.compile("[\"'`@\u2018\u2019\u201c\u201d]")


def item_id_from_title(title: str) -> str:
    """The same item under the CSV's and the JSONL's spelling gets the same id."""
    return _QUOTES.sub("", html.unescape(title)) or title


@dataclass
class Window:
    titles: list[str]
    ratings: list[float | None]  # None: unrated (0)
    dropped: int = 0  # > 0: title and rating lists differ in length; the window is dropped


@dataclass
class User:
    split: str
    windows: dict[int, Window] = dc_field(default_factory=dict)


def _window(titles, ratings, path: Path, row: int, where: str) -> Window:
    if not isinstance(titles, list) or not isinstance(ratings, list):
        raise InputError(path, f"{where}: expected lists of titles and ratings", row)
    for title in titles:
        if not isinstance(title, str):
            raise InputError(path, f"{where}: title {title!r} is not text", row)
    parsed = [SCALE.parse(r, path, row) for r in ratings]
    if len(titles) != len(ratings):
        return Window([], [], dropped=max(len(titles), len(ratings)))
    return Window(titles, parsed)


def _cell(text: str, path: Path, row: int, column: str) -> Window | None:
    if not text.strip():
        return None
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        raise InputError(path, f"{column}: not a Python literal", row) from None
    if not isinstance(value, dict) or "items" not in value or "ratings" not in value:
        raise InputError(path, f"{column}: expected {{'items': [...], 'ratings': [...]}}", row)
    return _window(value["items"], value["ratings"], path, row, column)


# Where a user gets these files (the message of a missing folder; docs/data.md says the same).
DOWNLOAD = (
    "the DEEPER authors' windows go here: git clone https://github.com/sheep333c/DEEPER and copy its "
    "data/data_process/ folder to this path (or draw users from the raw files instead: -S ingest.preset=paper_raw)"
)


def read(src: Source, sink) -> None:
    if not src.path.exists():
        raise InputError(src.path, f"not found: {DOWNLOAD}")
    root = require_dir(src.path)
    folders = sorted(p for p in root.iterdir() if (p / "split_data").is_dir())
    if not folders:
        looked_for = " or ".join(f"<domain>/split_data/{name}" for name, _ in SPLIT_FILES)
        hint = (
            "; this is a domain folder itself: give its parent as path"
            if (root / "split_data").is_dir()
            else ""
        )
        raise InputError(root, f"no domain folder: looked for {looked_for} under it{hint}")
    names = dict(src.domains)
    for folder in folders:
        read_domain(folder, src.format, sink, names.get(folder.name, folder.name))


def read_domain(folder: Path, source_format: str, sink, domain: str | None = None) -> None:
    domain, users, item_type = domain or folder.name, {}, None
    csv_files: list[tuple[Path, str | None]] = [
        (folder / "split_data" / name, split)
        for name, split in SPLIT_FILES
        if (folder / "split_data" / name).exists()
    ]
    if not csv_files and (folder / "split_data" / FULL_FILE).exists():
        csv_files = [(folder / "split_data" / FULL_FILE, None)]
    if not csv_files:
        raise InputError(
            folder / "split_data", f"has neither train_dataset.csv nor test_dataset.csv nor {FULL_FILE}"
        )
    duplicates = 0
    for path, file_split in csv_files:
        rows = CsvRows(path, ("id", "item_type", "windows_0") + (("split",) if file_split is None else ()))
        columns = sorted((int(m.group(1)), c) for c in rows.columns if (m := WINDOW_COLUMN.fullmatch(c)))
        for row, rec in rows:
            split = file_split
            if split is None:
                split = ROW_SPLITS.get(rec["split"].strip())
                if split is None:
                    raise InputError(
                        path, f"split {rec['split']!r} is not one of {', '.join(ROW_SPLITS)}", row
                    )
            user_id = id_text(rec["id"], "id", path, row)
            row_type = rec["item_type"].strip()
            if not row_type:
                raise InputError(path, "item_type is empty", row)
            if item_type is None:
                item_type = row_type
            elif row_type != item_type:
                raise InputError(
                    path, f"item_type {row_type!r} differs from {item_type!r} of earlier rows", row
                )
            windows = {
                k: w for k, column in columns if (w := _cell(rec[column], path, row, column)) is not None
            }
            if user_id in users:  # the same user twice: keep the first row
                duplicates += sum(len(w.ratings) + w.dropped for w in windows.values())
                continue
            users[user_id] = User(split, windows)
    sink.add_domain(domain, item_type, source_format, str(folder))
    sink.skip(domain, "duplicate", duplicates)
    _add_jsonl_windows(folder / "test_iterations", domain, users, sink)
    ids: dict[str, str] = {}  # title -> item id; titles repeat across users
    for user_id, user in users.items():
        position = 0  # the pre-windowed data has no times: ts is the position in the user's sequence
        for k in sorted(user.windows):
            window = user.windows[k]
            if window.dropped:
                sink.skip(domain, "window_mismatch", window.dropped)
                position += window.dropped
                continue
            in_window: set[str] = set()
            for title, rating in zip(window.titles, window.ratings):
                item_id = ids.get(title) or ids.setdefault(title, item_id_from_title(title))
                titled = clean_title(title) is not None  # the sink keeps the cleaned title
                if item_id in in_window and titled:
                    sink.note(domain, "repeated_in_window")
                in_window.add(item_id)
                if titled and rating is None:
                    rating = sink.unrated(domain)  # ingest.zero_ratings: 0.0 (kept) or None (a counted skip)
                if not titled:
                    sink.skip(domain, "untitled")
                elif rating is not None:
                    sink.title(domain, item_id, title)
                    sink.rating(domain, user_id, item_id, rating, position, window=k, split=user.split)
                position += 1


def _add_jsonl_windows(folder: Path, domain: str, users: dict[str, User], sink) -> None:
    """Windows the CSV lacks (5 and 6), from the test-iteration files, joined by user id."""
    if not folder.is_dir():
        return
    files = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := ITERATION_FILE.fullmatch(p.name)))
    unknown: set[tuple[str, int]] = set()
    for _, path in files:
        for row, obj in iter_json_objects(path, literal_ok=False):
            user_id = id_text(field(obj, "id", path, row), "id", path, row)
            user = users.get(user_id)
            for key in obj:
                if not (m := RATINGS_KEY.fullmatch(key)):
                    continue
                k = int(m.group(1))
                if user is not None and k in user.windows and not user.windows[k].dropped:
                    continue
                window = _window(field(obj, f"I{k}", path, row), obj[key], path, row, f"I{k}/U{k}")
                if user is None:
                    if (user_id, k) not in unknown:
                        unknown.add((user_id, k))
                        sink.skip(domain, "unknown_user", len(window.ratings) + window.dropped)
                elif k not in user.windows or not window.dropped:
                    user.windows[k] = window
