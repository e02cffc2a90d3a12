"""Reading the Parquet files stages exchange: one checked reader, the validated windows.parquet, and the
iteration stages' tables (personas, contexts, samples) with their column lists, so a stage that only reads
them (pair@k) depends on no model code.

Every problem is a one-line `deeper.errors.InputError` naming the file and, where there is one, the row
(1-based; Parquet has no header line): a missing file (with a hint at the stage that writes it), a file
that is not Parquet, missing columns, and for windows.parquet any row the later stages could not use.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from deeper.data.schema import SPLITS, WINDOW_COLUMNS
from deeper.errors import InputError
from deeper.reward import OLD_COLUMNS

WINDOWS_HINT = "run `dvc repro window` first"


def read_parquet_checked(path: str | Path, columns: Sequence[str], hint: str) -> pd.DataFrame:
    """The whole table at `path`; InputError if the file is missing (`hint` says what writes it), is not
    readable Parquet, or lacks one of `columns`."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, f"not found; {hint}")
    try:
        table = pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as e:  # a damaged or non-Parquet file
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise InputError(path, f"not a readable Parquet file: {lines[0]}") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(
            path, f"missing column(s) {', '.join(missing)}; have {', '.join(table.column_names)}; {hint}"
        )
    return table.to_pandas()


def first_bad_row(mask) -> int:
    """The 1-based row of the first true value of a boolean mask over a table's rows in file order."""
    return int(np.flatnonzero(np.asarray(mask))[0]) + 1


def read_windows(path: str | Path) -> pd.DataFrame:
    """windows.parquet (docs/ARCHITECTURE.md), validated: columns WINDOW_COLUMNS in that order, sorted by
    domain, user_id, window, pos; `window`, `pos` and `rating` numeric.

    InputError (file and row) for: an empty text column (domain, item_type, user_id, split, title), a split
    other than train/eval, a window, pos or rating that is not a finite number, a seen that is not true/false,
    a domain both seen and unseen, a duplicate (domain, user_id, window, pos), a user with more than one split
    or item_type, and a user whose windows are not 0..k-1."""
    path = Path(path)
    df = read_parquet_checked(path, WINDOW_COLUMNS, WINDOWS_HINT)[list(WINDOW_COLUMNS)].reset_index(drop=True)
    for column in ("domain", "item_type", "user_id", "split", "title"):
        bad = ~df[column].map(lambda v: isinstance(v, str) and v.strip() != "")
        if bad.any():
            raise InputError(path, f"{column} is missing or empty", first_bad_row(bad))
    bad = ~df["split"].isin(SPLITS)
    if bad.any():
        raise InputError(
            path,
            f"split must be one of {list(SPLITS)}, got {_shown(df['split'][bad].iloc[0])}",
            first_bad_row(bad),
        )
    for column in ("window", "pos", "rating"):
        values = pd.to_numeric(df[column], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.astype(float))
        if bad.any():
            raise InputError(
                path,
                f"{column} is not a finite number: {_shown(df[column][bad].iloc[0])}",
                first_bad_row(bad),
            )
        df[column] = values
    bad = ~df["seen"].map(lambda v: isinstance(v, (bool, np.bool_)))
    if bad.any():
        raise InputError(
            path, f"seen must be true or false, got {_shown(df['seen'][bad].iloc[0])}", first_bad_row(bad)
        )
    mixed = df["seen"] != df.groupby("domain")["seen"].transform("first")
    if mixed.any():
        raise InputError(
            path, f"domain {df['domain'][mixed].iloc[0]!r} is both seen and unseen", first_bad_row(mixed)
        )
    dup = df.duplicated(["domain", "user_id", "window", "pos"])
    if dup.any():
        raise InputError(path, "duplicate (domain, user_id, window, pos)", first_bad_row(dup))
    users = df.groupby(["domain", "user_id"], sort=False)
    for column in ("split", "item_type"):
        mixed = df[column] != users[column].transform("first")
        if mixed.any():
            first = df[mixed].iloc[0]
            raise InputError(
                path,
                f"user {first['user_id']} of {first['domain']} has more than one {column}",
                first_bad_row(mixed),
            )
    # a user's windows must be 0..k-1: each window number equals its dense rank among the user's windows
    gap = df["window"] != users["window"].rank(method="dense") - 1
    if gap.any():
        first = df[gap].iloc[0]
        mine = df[(df["domain"] == first["domain"]) & (df["user_id"] == first["user_id"])]
        numbers = sorted(mine["window"].unique().tolist())
        who = f"user {first['user_id']} of {first['domain']}"
        if numbers[0] != 0:
            raise InputError(path, f"{who} has no window 0", first_bad_row(df.index.isin(mine.index)))
        raise InputError(
            path, f"{who} has windows {[_number(w) for w in numbers]}, not 0..k-1", first_bad_row(gap)
        )
    return df.sort_values(["domain", "user_id", "window", "pos"], kind="stable").reset_index(drop=True)


def _shown(value) -> str:
    """A cell's value for a message: numpy scalars as the Python value (nan, not np.float64(nan))."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _number(value):
    return int(value) if float(value).is_integer() else value


def domain_seen(windows: pd.DataFrame) -> dict[str, bool]:
    """domain -> seen (in training) of a table from `read_windows` (one value per domain)."""
    return {str(d): bool(s) for d, s in windows.groupby("domain", sort=True)["seen"].first().items()}


# ---------------------------------------------------------------- the iteration stages' tables

# `predicted`: the ratings of W_t predicted with the old persona (the O_t half the prompt shows).
CONTEXT_COLUMNS = (
    "context_id",
    "domain",
    "user_id",
    "t",
    "item_type",
    "persona_old",
    "predicted",
    "prompt",
    *OLD_COLUMNS,
)
SAMPLE_COLUMNS = ("context_id", "sample", "text", "words", "flag")
PERSONA_COLUMNS = ("domain", "user_id", "split", "persona")


def read_personas(path: str | Path, split: str = "train") -> dict[tuple[str, str], str]:
    """(domain, user_id) -> S_0 from init_personas' output."""
    path = Path(path)
    df = read_parquet_checked(path, PERSONA_COLUMNS, "run `dvc repro init_personas` first")
    bad = ~df["persona"].map(lambda v: isinstance(v, str))
    if bad.any():
        raise InputError(path, "persona is missing", first_bad_row(bad))
    dup = df.duplicated(["domain", "user_id"])
    if dup.any():
        raise InputError(path, "duplicate (domain, user_id)", first_bad_row(dup))
    rows = df[df["split"] == split]
    return {(str(d), str(u)): p for d, u, p in zip(rows["domain"], rows["user_id"], rows["persona"])}


def read_contexts(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    df = read_parquet_checked(path, CONTEXT_COLUMNS, "run `dvc repro contexts` first")
    dup = df.duplicated("context_id")
    if dup.any():
        raise InputError(path, f"context {df['context_id'][dup].iloc[0]!r} appears twice", first_bad_row(dup))
    for i, prompt in enumerate(df["prompt"], 1):
        try:
            chat = json.loads(prompt)
        except (TypeError, json.JSONDecodeError):
            chat = None
        if not (
            isinstance(chat, list)
            and chat
            and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in chat)
        ):
            raise InputError(path, "prompt is not a JSON list of chat messages", i)
    return df


def read_samples(path: str | Path, contexts: pd.DataFrame) -> pd.DataFrame:
    path = Path(path)
    df = read_parquet_checked(path, SAMPLE_COLUMNS, "run `dvc repro sample` first")
    dup = df.duplicated(["context_id", "sample"])
    if dup.any():
        raise InputError(path, "duplicate (context_id, sample)", first_bad_row(dup))
    unknown = ~df["context_id"].isin(contexts["context_id"])
    if unknown.any():
        raise InputError(
            path,
            f"context {df['context_id'][unknown].iloc[0]!r} is not in the contexts file",
            first_bad_row(unknown),
        )
    bad = ~df["text"].map(lambda v: isinstance(v, str) and v.strip() != "")
    if bad.any():
        raise InputError(path, "text is missing or empty", first_bad_row(bad))
    return df
