"""`deeper store check | export | import`: is the persona store sound, a backup anyone can read, a restore.

check: every block of the store is read back. DuckDB verifies a block's checksum when it reads the block, and
only then, so what is checked is what is read (measured with DuckDB 2.0, bytes overwritten at 64 KiB steps
through a store, tests/test_store_tools.py):
- opening reads the headers and the catalog: damage there fails the open;
- the rows live in column segments that only a query reading those columns loads: a full scan of every column
  of every table (`sum(hash(<table>))`, all in DuckDB, nothing fetched to Python) reads them all;
- the primary key / unique indexes (ART) are loaded only when a write needs them, so neither the open nor any
  scan, `FORCE CHECKPOINT` or a rolled-back DELETE notices a damaged index block (measured: all four missed it).
  Re-inserting every row under a shifted key in a transaction that is rolled back walks each key's path in
  every index and loads its blocks: it found each damaged index block tried (6-block store: all; 600k-row store
  with 360 index blocks: 10 of 10 sampled). It runs on a copy in a temporary folder, so the check never writes
  to the store; a damaged index loses no row (export + import rebuilds it).

export: each table to `<table>.parquet` (ordered by its key) and `manifest.json` (format, schema version, rows,
columns and sha256 of each file): a backup DuckDB, pandas, polars, Spark or pyarrow read as it is.
import: a new store from such a folder after checking the manifest, the schema version, every file's sha256 and
columns, and the row counts; built beside the target and moved into place at the end, so a failed import
leaves no half store. An existing store is replaced only with --force and is then kept, renamed, not deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

from deeper.duck import is_damage
from deeper.errors import DeeperError, InputError, first_line
from deeper.outputs import replacing
from deeper.store import (
    KEYS,
    SCHEMA,
    SCHEMA_VERSION,
    TABLES,
    PersonaStore,
    StoreDamaged,
    column_types,
    schema_difference,
)

MANIFEST = "manifest.json"
EXPORT_FORMAT = "deeper-persona-store-export"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _aside(path: Path, why: str) -> Path:
    """A free name beside `path` saying why it was moved there (a file is moved aside, never deleted)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.{why}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{why}-{stamp}-{n}")
    return target


# ---------------------------------------------------------------------------------------------------- check


def check_store(path: str | Path) -> dict:
    """Read every block of the store; its row counts and per domain its users, rounds and pending ratings.
    Raises StoreDamaged (one line) at the first block that does not read back."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no persona store here (`deeper refine --store` creates one)")
    store = PersonaStore(path)
    report: dict[str, Any] = {
        "store": str(path),
        "bytes": path.stat().st_size,
        "tables": {t: 0 for t in TABLES},
        "domains": {},
        "indexes_checked": False,
    }
    with store.lock:  # reentrant: connect takes it again; held over the copy too, so no write slips between
        with store.connect(write=False) as con:
            if con is None:  # an empty DuckDB file: a store no refine has written to yet
                return report
            con.execute(
                "SET enable_progress_bar = false"
            ).fetchall()  # a result left open blocks the next query
            for table in TABLES:
                # hash() of the whole row reads every column segment, so every data block's checksum is verified
                scan = f"SELECT count(*), sum(hash({table})) FROM {table}"
                report["tables"][table] = con.execute(scan).fetchall()[0][0]
            for domain, users, rounds, top in con.execute(
                "SELECT domain, count(DISTINCT user_id), count(*), max(round) FROM personas GROUP BY 1 ORDER BY 1"
            ).fetchall():
                report["domains"][domain] = {
                    "users": users,
                    "rounds": rounds,
                    "highest_round": top,
                    "pending_ratings": 0,
                    "users_waiting": 0,
                }
            for domain, users, ratings in con.execute(
                "SELECT domain, count(DISTINCT user_id), count(*) FROM pending GROUP BY 1 ORDER BY 1"
            ).fetchall():
                entry = report["domains"].setdefault(domain, {"users": 0, "rounds": 0, "highest_round": None})
                entry.update(pending_ratings=ratings, users_waiting=users)
        _check_indexes(path)
    report["indexes_checked"] = True
    return report


def _check_indexes(path: Path) -> None:
    """Load every index block (see the module docstring) on a copy of the store, writing nothing to it."""
    with tempfile.TemporaryDirectory(prefix="deeper-store-check-") as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        wal = path.with_name(path.name + ".wal")  # a write killed before its checkpoint: part of the store
        if wal.exists():
            shutil.copyfile(wal, copy.with_name(copy.name + ".wal"))
        con = duckdb.connect(str(copy))
        try:
            con.execute(
                "SET enable_progress_bar = false"
            ).fetchall()  # a result left open blocks the next query
            con.execute("BEGIN TRANSACTION")
            # personas: PRIMARY KEY (domain, user_id, round) and UNIQUE (domain, user_id, window_key). A round
            # past the highest shares all but its last bytes with the existing ones, and window_key || '#' has
            # the existing key as its prefix: both walk each existing key's path down to its leaf.
            con.execute(
                "INSERT INTO personas SELECT * REPLACE (round + (SELECT max(round) + 1 FROM personas) "
                "AS round, window_key || '#' AS window_key) FROM personas"
            )
            # pending: PRIMARY KEY (domain, user_id, item_id, rating, ts); a ts past the span of all is new
            con.execute(
                "INSERT INTO pending SELECT * REPLACE (ts + (SELECT max(ts) - min(ts) + 1 FROM pending) "
                "AS ts) FROM pending"
            )
            con.execute("ROLLBACK")
        except duckdb.Error as e:
            if is_damage(e):
                raise StoreDamaged(path, first_line(e), index=True) from None
            raise DeeperError(
                f"{path}: the rows read back, but the index check could not run on a copy in "
                f"{tmp} ({first_line(e)})"
            ) from None
        finally:
            try:
                con.close()
            except duckdb.Error:
                pass


def check_lines(report: dict) -> list[str]:
    """What `deeper store check` prints for a sound store."""
    counts = ", ".join(f"{table} {n} rows" for table, n in report["tables"].items())
    lines = [
        f"{report['store']}: sound: every row of every table read back ({counts})"
        + ("; indexes checked" if report["indexes_checked"] else "")
    ]
    for domain, d in report["domains"].items():
        rounds = (
            f"{d['users']} users with a persona, {d['rounds']} rounds (highest round {d['highest_round']})"
            if d["users"]
            else "no persona yet"
        )
        lines.append(
            f"{domain}: {rounds}; {d['pending_ratings']} ratings of {d['users_waiting']} users "
            f"waiting for a full window"
        )
    if not report["domains"]:
        lines.append("no user yet")
    return lines


# --------------------------------------------------------------------------------------------------- export


def export_store(path: str | Path, folder: str | Path, force: bool = False) -> dict:
    """Every table of the store to Parquet in `folder`, with a manifest; returns the manifest."""
    path, folder = Path(path), Path(folder)
    if not path.exists():
        raise InputError(path, "no persona store here")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not force:
        raise DeeperError(
            f"{folder}: exists and is not an empty folder; export to a new folder (e.g. one named "
            f"by the date) or pass --force to replace it"
        )
    # built beside the target and swapped in whole (deeper.outputs): an interrupted export or a full disk leaves
    # no folder that looks whole, and with --force the old export goes only once the new one is complete
    with replacing(folder, folder=True) as partial:
        manifest: dict[str, Any] = {
            "format": EXPORT_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "store": str(path),
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "duckdb": duckdb.__version__,
            "tables": {},
        }
        with PersonaStore(path).connect(write=False) as con:
            if con is None:
                raise InputError(path, "an empty DuckDB file: no persona store to export yet")
            con.execute(
                "SET enable_progress_bar = false"
            ).fetchall()  # a result left open blocks the next query
            for table, fields in TABLES.items():
                out = partial / f"{table}.parquet"
                # table and key names are this module's constants; the path goes in as an argument
                con.sql(f"SELECT * FROM {table} ORDER BY {', '.join(KEYS[table])}").write_parquet(
                    str(out), compression="zstd"
                )
                rows = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
                manifest["tables"][table] = {
                    "file": out.name,
                    "rows": rows,
                    "sha256": _sha256(out),
                    "columns": dict(column_types(fields)),
                }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


# --------------------------------------------------------------------------------------------------- import


def read_manifest(folder: Path) -> dict:
    """The export's manifest, checked against this version's schema and against its own files."""
    where = folder / MANIFEST
    if not where.is_file():
        raise InputError(where, "missing: not a `deeper store export` folder")
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(where, f"not JSON ({first_line(e)}); the backup is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise InputError(where, f"not a `deeper store export` manifest (format is not {EXPORT_FORMAT!r})")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise InputError(
            where,
            f"schema version {manifest.get('schema_version')!r}, this deeper reads "
            f"{SCHEMA_VERSION}: import it with the deeper version that exported it",
        )
    tables = manifest.get("tables")
    if not isinstance(tables, dict) or set(tables) != set(TABLES):
        raise InputError(
            where,
            f"tables {sorted(tables) if isinstance(tables, dict) else tables!r}, expected {sorted(TABLES)}",
        )
    for table, fields in TABLES.items():
        entry = tables[table]
        try:
            file, rows, sha, columns = entry["file"], entry["rows"], entry["sha256"], entry["columns"]
        except (TypeError, KeyError) as e:
            raise InputError(where, f"tables.{table}: missing {e}") from None
        if not isinstance(columns, dict) or list(columns.items()) != column_types(fields):
            have = list(columns.items()) if isinstance(columns, dict) else []
            raise InputError(
                where,
                f"tables.{table}.columns differ from this version's "
                f"({schema_difference(have, column_types(fields))})",
            )
        data = folder / Path(file).name  # a name, never a path out of the folder
        if not data.is_file():
            raise InputError(data, f"missing (listed in {MANIFEST}); the backup is incomplete")
        if _sha256(data) != sha:
            raise InputError(
                data,
                f"sha256 differs from {MANIFEST}: the file was damaged or changed after the "
                f"export; use another export",
            )
        if not isinstance(rows, int) or rows < 0:
            raise InputError(where, f"tables.{table}.rows: {rows!r} is not a row count")
    return manifest


def import_store(folder: str | Path, path: str | Path, force: bool = False) -> dict:
    """A new store at `path` from an export folder; returns {"tables": rows per table, "replaced": old path}."""
    folder, path = Path(folder), Path(path)
    if not folder.is_dir():
        raise InputError(folder, "no export folder here")
    manifest = read_manifest(folder)
    if path.exists() and not force:
        raise DeeperError(
            f"{path}: a store is already here; import into a new path, or pass --force to replace "
            f"it (the old file is kept, renamed)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    store = PersonaStore(path)
    with store.lock:  # no refine or show opens the store between the check above and the move below
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.import-", suffix=".duckdb", dir=path.parent)
        os.close(fd)
        building = Path(name)
        building.unlink()  # DuckDB creates the file itself (an empty file is not a database to it)
        try:
            con = duckdb.connect(str(building))
            try:
                for statement in SCHEMA:
                    con.execute(statement)
                for table, fields in TABLES.items():
                    data = folder / Path(manifest["tables"][table]["file"]).name
                    _import_table(con, table, fields, data, manifest["tables"][table]["rows"])
            finally:
                con.close()
            replaced = None
            if path.exists():
                replaced = _aside(path, "replaced")
                path.rename(replaced)
                wal = path.with_name(path.name + ".wal")
                if wal.exists():  # the old store's log must not be replayed onto the new file
                    wal.rename(replaced.with_name(replaced.name + ".wal"))
            os.replace(building, path)
        finally:
            for leftover in (building, building.with_name(building.name + ".wal")):
                if leftover.exists():
                    leftover.unlink()
    return {
        "tables": {t: manifest["tables"][t]["rows"] for t in TABLES},
        "replaced": replaced,
        "exported_at": manifest.get("exported_at"),
    }


def _import_table(con, table: str, fields, data: Path, rows: int) -> None:
    try:
        have = [
            (n, t)
            for n, t, *_ in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(data)]).fetchall()
        ]
    except duckdb.Error as e:
        raise InputError(data, f"not a readable Parquet file ({first_line(e)}); use another export") from None
    want = column_types(fields)
    if [n for n, _ in have] != [n for n, _ in want]:
        raise InputError(data, f"columns differ from table {table}'s ({schema_difference(have, want)})")
    names = ", ".join(n for n, _ in want)
    try:
        # explicit columns and casts: a file rewritten by another tool (timestamps in ns, int64 counts) still fits
        con.execute(
            f"INSERT INTO {table} ({names}) SELECT {', '.join(f'CAST({n} AS {t})' for n, t in want)} "
            "FROM read_parquet(?)",
            [str(data)],
        )
    except duckdb.Error as e:
        raise InputError(
            data, f"does not fit table {table} ({first_line(e)}); nothing was imported"
        ) from None
    got = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
    if got != rows:
        raise InputError(
            data, f"{got} rows, the manifest says {rows}: the backup is incomplete; nothing was imported"
        )
