"""What every reader shares: opening files, row-numbered CSV and JSON lines, rating and time validation,
title cleaning.

Every problem becomes `InputError(path, message, row)` ("path:row: message", row 1-based, counting the
header line), so a reader never lets a traceback or a silent drop through.
"""

from __future__ import annotations

import ast
import csv
import gzip
import html
import json
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timezone
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
    meta: Path | None = None  # titles file, where the format has one; None: titles from ids
    domain: str | None = None  # None only for formats that name their domains (deeper_windows)
    item_type: str | None = None
    # deeper_windows: folder name -> domain name (a folder not listed keeps its name); a tuple of pairs so the
    # Source stays hashable
    domains: tuple[tuple[str, str], ...] = ()


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
    bar = tqdm(
        total=path.stat().st_size,
        unit="B",
        unit_scale=True,
        desc=desc or path.name,
        disable=None,
        leave=False,
    )
    number, pending = 0, 0
    try:
        with f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode(encoding)
                except UnicodeDecodeError as e:
                    raise InputError(
                        path, f"not valid {encoding} text (byte {e.start + 1} of the line)", number
                    ) from None
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

    def __init__(
        self,
        path: Path,
        required: tuple[str, ...],
        delimiter: str = ",",
        encoding: str = "utf-8",
        fieldnames: tuple[str, ...] | None = None,
        quoting: bool = True,
        extra_ok: bool = False,
    ):
        self.path, self.required, self.fieldnames, self.extra_ok = path, required, fieldnames, extra_ok
        self._lines = iter_lines(path, encoding)
        self._line_no = 0
        self._reader = csv.reader(
            self._text(),
            delimiter=delimiter,
            strict=True,
            quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE,
        )
        self.columns: list[str] = list(fieldnames) if fieldnames else self._header()
        missing = [c for c in required if c not in self.columns]
        if missing:
            raise InputError(
                path,
                f"missing column(s) {', '.join(missing)}; found: {', '.join(self.columns)}",
                None if fieldnames else 1,
            )

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


def iter_json_objects(
    path: Path, literal_ok: bool = True, desc: str | None = None
) -> Iterator[tuple[int, dict]]:
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
                raise InputError(
                    path, f"neither JSON nor a Python dict literal: {e.msg} (column {e.colno})", number
                ) from None
        if not isinstance(obj, dict):
            raise InputError(path, f"expected an object per line, found {type(obj).__name__}", number)
        any_object = True
        yield number, obj
    if not any_object:
        raise InputError(path, "no records (only blank lines)")


def field(obj: dict, key: str, path: Path, row: int):
    """A required field of a JSON record: absent and null are told apart, so the user knows what to fix."""
    if key not in obj:
        raise InputError(path, f"missing field '{key}'", row)
    if obj[key] is None:
        raise InputError(path, f"field '{key}' is null", row)
    return obj[key]


def id_text(value, what: str, path: Path, row: int) -> str:
    """User and item ids are strings; numbers keep their integer form (1, not 1.0)."""
    if type(value) is str and (text := value.strip()):  # the common case first: this runs per row
        return text
    if value is None:
        raise InputError(path, f"{what} is null", row)
    if isinstance(value, bool):
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
        if value is None:
            raise InputError(path, "rating is null", row)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise InputError(path, f"rating {value!r} is not a number", row)
        try:
            number = float(value)
        except ValueError:
            text = value.strip()
            raise InputError(
                path, f"rating {text!r} is not a number" if text else "rating is empty", row
            ) from None
        if not math.isfinite(number):
            raise InputError(path, f"rating {value!r} is not a finite number", row)
        if number == self.unrated:
            return None
        steps = (number - self.low) / self.step
        if not self.low <= number <= self.high or abs(steps - round(steps)) > 1e-9:
            raise InputError(path, f"rating {number:g} outside {self.describe()}", row)
        return number


STARS_1_5 = RatingScale(1, 5)


# --- times ------------------------------------------------------------------------------------------------

# What a time value encodes. One column keeps the encoding of its first row: a date is midnight while a unix
# time has seconds, so mixing them re-orders a user's ratings within a day (and a misread unit by years).
UNIX, DATE, DATETIME = "unix time", "date", "date with a time of day"
# Unix times in the wrong unit: seconds beyond 10^11 (the year 5138) are milliseconds; milliseconds below
# 10^11 (March 1973, before any rating source) are seconds.
UNIT_LIMIT = 10**11

_NUMBER = re.compile(r"^[+-]?\d+(\.\d*)?$")
_DATE_FORMATS = (  # the spellings the sources and their re-saved copies use, with what each encodes
    ("%Y-%m-%d", DATE),  # Food.com, ISO
    ("%Y/%m/%d", DATE),  # Food.com copies: 2017/8/18
    ("%m/%d/%Y", DATE),  # Food.com copies re-saved by US spreadsheets: 8/18/2017 (month first)
    ("%m %d, %Y", DATE),  # Amazon reviewTime "09 1, 2016"
    ("%Y-%m-%d %H:%M:%S", DATETIME),
    ("%Y/%m/%d %H:%M:%S", DATETIME),
    ("%m/%d/%Y %H:%M", DATETIME),  # spreadsheets write minutes only
    ("%m/%d/%Y %H:%M:%S", DATETIME),
)
KNOWN_SPELLINGS = "YYYY-MM-DD, YYYY/M/D, M/D/YYYY, 'MM DD, YYYY', ISO 8601"
_DAY_FIRST = re.compile(r"^(\d{1,2})/(\d{1,2})/\d{4}\b")


class TimeColumn:
    """Unix seconds from one time column of one file, from a unix time in `unit` ("s" or "ms") or a known
    date spelling (read as UTC). Every row must use the encoding of the column's first row (see UNIX)."""

    def __init__(self, path: Path, name: str, unit: str = "s"):
        self.path, self.name, self.unit = path, name, unit
        self.kind: str | None = None
        self.first_row: int | None = None
        self._formats = list(_DATE_FORMATS)  # the last spelling that matched is tried first

    def parse(self, value, row: int) -> int:
        if type(value) is str:
            try:
                number = int(value)  # the common case; dates and decimals take the slower path
            except ValueError:
                return self._text(value, row)
        elif type(value) is int:
            number = value
        else:
            return self._other(value, row)
        if self.kind is UNIX and self.unit == "s" and number < UNIT_LIMIT:  # this runs per row: checks inline
            return number
        return self._unix(number, row)

    def _other(self, value, row: int) -> int:
        if isinstance(value, float) and math.isfinite(value):
            return self._unix(int(value), row)
        if isinstance(value, datetime):  # a Parquet timestamp column
            return self._seconds(value, DATETIME, row)
        if isinstance(value, date):
            return self._seconds(datetime(value.year, value.month, value.day), DATE, row)
        if value is None:
            raise InputError(self.path, f"{self.name} is null", row)
        raise InputError(self.path, f"{self.name} {value!r} is not a time", row)

    def _encoding(self, kind: str, shown, row: int) -> None:
        if self.kind is None:
            self.kind, self.first_row = kind, row
        elif kind != self.kind:
            raise InputError(
                self.path,
                f"{self.name} {shown!r} is a {kind}, but row {self.first_row} of this "
                f"column is a {self.kind}: one column must keep one time encoding",
                row,
            )

    def _unix(self, number: int, row: int) -> int:
        if self.kind is not UNIX:
            self._encoding(UNIX, number, row)
        if self.unit == "ms":
            if number < UNIT_LIMIT:
                raise InputError(
                    self.path, f"{self.name} {number} is too small for unix milliseconds (seconds?)", row
                )
            return number // 1000
        if number >= UNIT_LIMIT:
            raise InputError(
                self.path, f"{self.name} {number} is too large for unix seconds (milliseconds?)", row
            )
        return number

    def _seconds(self, parsed: datetime, kind: str, row: int, shown=None) -> int:
        self._encoding(kind, shown or str(parsed), row)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return int(parsed.timestamp())

    def _text(self, value: str, row: int) -> int:
        text = value.strip()
        if not text:
            raise InputError(self.path, f"{self.name} is empty", row)
        if _NUMBER.match(text):
            return self._unix(int(float(text)), row)
        for i, (fmt, kind) in enumerate(self._formats):
            try:
                parsed = datetime.strptime(text, fmt)
            except ValueError:
                continue
            if i:
                self._formats.insert(0, self._formats.pop(i))
            return self._seconds(parsed, kind, row, text)
        try:  # ISO 8601 with a T, fractions or an offset, e.g. 2016-09-01T10:00:00+02:00
            parsed = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            return self._seconds(parsed, DATETIME if "T" in text or ":" in text else DATE, row, text)
        if (m := _DAY_FIRST.match(text)) and int(m.group(1)) > 12 >= int(m.group(2)):
            raise InputError(
                self.path,
                f"{self.name} {text!r} puts the day first; slashed dates are read month first (M/D/YYYY)",
                row,
            )
        raise InputError(
            self.path,
            f"{self.name} {text!r} is neither unix time nor a known date format ({KNOWN_SPELLINGS})",
            row,
        )


# --- titles -----------------------------------------------------------------------------------------------

# Scraped titles carry HTML: entities (&amp; &quot; &#39; &eacute;, sometimes escaped twice), stray tags and
# the end of an attribute (`Evolution" />` in the DEEPER authors' Amazon windows). A prompt gets the text.
_ENTITY = re.compile(r"&(?:#\d+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")  # only with the `;`: "AT&T" stays
_TAG = re.compile(
    r"</?(?:a|b|br|div|em|font|h\d|i|img|li|p|small|span|strong|sub|sup|td|tr|u|ul)\b[^<>]*>", re.IGNORECASE
)
_ATTRIBUTE_END = re.compile(r"\s*[\"']?\s*/>\s*$")
_SPACES = re.compile(r"\s+")
_NEEDS_CLEANING = re.compile(r"[&<>]|\s\s|^\s|\s$|[^\S ]")  # the fast path: most titles are clean


def clean_title(value) -> str | None:
    """The title a prompt shows, or None when there is none (absent, not text, or nothing left): HTML
    entities decoded, stray tags and attribute residue removed, runs of whitespace made one space."""
    if not isinstance(value, str):
        return None
    if not _NEEDS_CLEANING.search(value):
        return value or None
    text = value
    for _ in range(3):  # "&amp;quot;" is escaped twice
        decoded = _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
        if decoded == text:
            break
        text = decoded
    text = _ATTRIBUTE_END.sub("", _TAG.sub(" ", text))
    return _SPACES.sub(" ", text).strip() or None
