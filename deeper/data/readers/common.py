"""What every reader shares: opening files, row-numbered CSV and JSON lines, rating and time validation.

Every problem becomes `InputError(path, message, row)` ("path:row: message", row 1-based, counting the
header line), so a reader never lets a traceback or a silent drop through.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from deeper.errors import InputError

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # recipe steps and window cells are long fields

BAR_EVERY = 20_000  # lines between progress-bar updates: per-line updates would cost more than parsing


@dataclass(frozen=True)
class Source:
    """One entry of an ingest preset, paths resolved against `ingest.root`."""

    format: str
    path: Path
    meta: Path | None = None      # titles file, where the format has one; None: titles from ids
    domain: str | None = None     # None only for formats that name their domains (deeper_windows)
    item_type: str | None = None


def require_file(path: Path) -> Path:
    if not path.exists():
        raise InputError(path, "not found")
    if not path.is_file():
        raise InputError(path, "not a file")
    return path


def require_dir(path: Path) -> Path:
    if not path.exists():
        raise InputError(path, "not found")
    if not path.is_dir():
        raise InputError(path, "not a folder")
    return path


def iter_lines(path: Path, encoding: str = "utf-8", desc: str | None = None) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a text file, `.gz` or not; a BOM at the start is dropped.

    Decoding line by line names the line of a bad byte instead of failing somewhere in a buffer.
    """
    require_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        f = opener(path, "rb")
    except OSError as e:
        raise InputError(path, f"cannot open: {e.strerror or e}") from None
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=desc or path.name,
               disable=None, leave=False)
    number, pending = 0, 0
    try:
        with f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode(encoding)
                except UnicodeDecodeError as e:
                    raise InputError(path, f"not valid {encoding} text (byte {e.start + 1} of the line)", number) \
                        from None
                if number == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                pending += len(raw)
                if number % BAR_EVERY == 0:
                    bar.update(pending)
                    pending = 0
                yield number, line
    except (OSError, EOFError) as e:  # gzip damage, a vanished file
        raise InputError(path, f"cannot read: {e}", number + 1) from None
    finally:
        bar.close()
    if number == 0:
        raise InputError(path, "empty file")


class CsvRows:
    """Rows of a delimited file as (row number, dict); checks the header and the field count.

    `fieldnames` is for headerless files (MovieLens 100K), `extra_ok` lets rows carry fields after them;
    the row number is the line where the record starts (a quoted field may span lines).
    """

    def __init__(self, path: Path, required: tuple[str, ...], delimiter: str = ",",
                 encoding: str = "utf-8", fieldnames: tuple[str, ...] | None = None, quoting: bool = True,
                 extra_ok: bool = False):
        self.path, self.required, self.fieldnames, self.extra_ok = path, required, fieldnames, extra_ok
        self._lines = iter_lines(path, encoding)
        self._line_no = 0
        self._reader = csv.reader(self._text(), delimiter=delimiter, strict=True,
                                  quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE)
        self.columns: list[str] = list(fieldnames) if fieldnames else self._header()
        missing = [c for c in required if c not in self.columns]
        if missing:
            raise InputError(path, f"missing column(s) {', '.join(missing)}; found: {', '.join(self.columns)}",
                             None if fieldnames else 1)

    def _text(self):
        for number, line in self._lines:
            self._line_no = number  # how far the csv reader has read: a record starts one line later
            yield line

    def _next(self) -> tuple[int, list[str]] | None:
        start = self._line_no + 1
        try:
            return start, next(self._reader)
        except StopIteration:
            return None
        except csv.Error as e:
            raise InputError(self.path, f"not valid CSV: {e}", start) from None

    def _header(self) -> list[str]:
        first = self._next()
        if first is None:
            raise InputError(self.path, "empty file")
        return [c.strip() for c in first[1]]

    def __iter__(self) -> Iterator[tuple[int, dict[str, str]]]:
        width = len(self.columns)
        while (item := self._next()) is not None:
            row, fields = item
            if not fields:  # a blank line carries no record
                continue
            if len(fields) != width:
                if self.extra_ok and len(fields) > width:
                    fields = fields[:width]
                else:
                    raise InputError(self.path, f"expected {width} fields, found {len(fields)}", row)
            yield row, dict(zip(self.columns, fields))


def iter_json_objects(path: Path, literal_ok: bool = True, desc: str | None = None) \
        -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file. Some Amazon 2014 dumps hold Python dict literals
    instead of JSON: those are read with `ast.literal_eval` (never `eval`)."""
    any_object = False
    for number, line in iter_lines(path, desc=desc):
        text = line.strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if not literal_ok:
                raise InputError(path, f"not valid JSON: {e.msg} (column {e.colno})", number) from None
            try:
                obj = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                raise InputError(path, f"neither JSON nor a Python dict literal: {e.msg} (column {e.colno})",
                                 number) from None
        if not isinstance(obj, dict):
            raise InputError(path, f"expected an object per line, found {type(obj).__name__}", number)
        any_object = True
        yield number, obj
    if not any_object:
        raise InputError(path, "no records (only blank lines)")


def field(obj: dict, key: str, path: Path, row: int):
    """A required field of a JSON record."""
    if key not in obj or obj[key] is None:
        raise InputError(path, f"missing field '{key}'", row)
    return obj[key]


def id_text(value, what: str, path: Path, row: int) -> str:
    """User and item ids are strings; numbers keep their integer form (1, not 1.0)."""
    if type(value) is str and (text := value.strip()):  # the common case first: this runs per row
        return text
    if isinstance(value, bool) or value is None:
        raise InputError(path, f"{what} {value!r} is not an id", row)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if not text:
        raise InputError(path, f"{what} is empty", row)
    return text


@dataclass(frozen=True)
class RatingScale:
    """Valid ratings of a source: low..high in steps of `step`; `unrated` is a value meaning "no stars"
    (Food.com 0): a counted skip, not an error."""

    low: float
    high: float
    step: float = 1.0
    unrated: float | None = None

    def describe(self) -> str:
        step = "" if self.step == 1 else f" in steps of {self.step:g}"
        return f"{self.low:g}..{self.high:g}{step}"

    def parse(self, value, path: Path, row: int) -> float | None:
        """The rating as a float, None when it means "unrated"; InputError otherwise."""
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise InputError(path, f"rating {value!r} is not a number", row)
        try:
            number = float(value)
        except ValueError:
            text = value.strip()
            raise InputError(path, f"rating {text!r} is not a number" if text else "rating is empty", row) \
                from None
        if not math.isfinite(number):
            raise InputError(path, f"rating {value!r} is not a finite number", row)
        if number == self.unrated:
            return None
        steps = (number - self.low) / self.step
        if not self.low <= number <= self.high or abs(steps - round(steps)) > 1e-9:
            raise InputError(path, f"rating {number:g} outside {self.describe()}", row)
        return number


STARS_1_5 = RatingScale(1, 5)


_NUMBER = re.compile(r"^[+-]?\d+(\.\d*)?$")
_DATE_FORMATS = (  # the alternatives the sources actually use, tried in order
    "%Y-%m-%d",            # Food.com
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%dT%H:%M:%SZ",
    "%m %d, %Y",           # Amazon reviewTime "09 1, 2016"
)


def parse_time(value, path: Path, row: int, unit: str = "s") -> int:
    """Unix seconds from a number of `unit` ("s" or "ms") or from a known date format (read as UTC)."""
    if type(value) is int:
        number = value
    elif type(value) is str:
        try:
            number = int(value)  # the common case; dates and decimals take the slower path below
        except ValueError:
            return _parse_time_text(value, path, row, unit)
    elif isinstance(value, float) and math.isfinite(value):
        number = int(value)
    else:
        raise InputError(path, f"timestamp {value!r} is not a time", row)
    return number // 1000 if unit == "ms" else number


def _parse_time_text(value: str, path: Path, row: int, unit: str) -> int:
    text = value.strip()
    if _NUMBER.match(text):
        return parse_time(float(text), path, row, unit)
    for fmt in _DATE_FORMATS:
        try:
            parsed = datetime.strptime(text, fmt)
        except ValueError:
            continue
        return int(parsed.replace(tzinfo=timezone.utc).timestamp())
    try:  # ISO 8601 with an offset, e.g. 2016-09-01T10:00:00+02:00
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InputError(path, f"timestamp {text!r} is neither unix time nor a known date format "
                               "(YYYY-MM-DD, ISO 8601, 'MM DD, YYYY')", row) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp())


def clean_title(value) -> str | None:
    """A usable title or None (absent, not text, or blank). The text itself is kept as it is."""
    if not isinstance(value, str) or not value.strip():
        return None
    return value
