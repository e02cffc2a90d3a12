"""The content-addressed response cache: `CachedLLM(llm)` answers from disk what was asked before.

Key = sha256 of canonical JSON {backend, model fingerprint (weights + adapter), op, the exact chat messages,
and for generate the sampling parameters with the sample's own seed (sample k of seed s is drawn with
seed s + k, see deeper.llm.base), for rating the prefill}. The key never holds an API key.

Storage: one sqlite3 database in WAL mode with a busy timeout, so several processes can read and write at
once. Location: $DEEPER_RESPONSE_CACHE, else $DEEPER_CACHE_DIR/responses, else ./.cache/deeper/responses.

Only cache misses reach the backend, in chunks of its batch size; each chunk is committed as soon as it
returns, so a killed stage loses at most one chunk and its re-run redoes only the calls that had not finished.
Rating rows a backend marks as failed (its fallback) are returned but not stored: a re-run tries them again.

A generated answer is stored as {"text", "stopped_at_limit"} and comes back as the backend gave it (a
deeper.llm.base.Generation). An entry written before the flag existed ({"text"} alone) counts as a miss and is
generated again (the same seed gives the same text), so no answer is ever reported without its flag.

A damaged file (a torn write, a bad sector, a copy cut short) never stops a stage: the cache only saves time.
It is found on open (sqlite's quick_check) or by the first read or write that meets it (sqlite's "malformed" /
"not a database", or a stored answer that no longer decodes), moved aside to responses.sqlite3.damaged-<UTC
time> (never deleted), its readable rows are copied into a fresh file, one line on stderr names both and says
what happens now, and the stage goes on, calling again what the fresh file lacks. The stage's call summary
counts it (cache_healed, cache_salvaged). A file lock beside the cache makes sure two processes meeting the
damage at once move it once. Other sqlite errors (locked, disk full) are one `error:` line, not a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
from filelock import FileLock
from tqdm import tqdm

from deeper.errors import DeeperError, first_line
from deeper.llm.base import RATINGS, Chat, Generation, RatingGroup, RatingResult, Sampling, stopped_at_limit
from deeper.outputs import DiskFull, is_disk_full

DB_NAME = "responses.sqlite3"
BUSY_TIMEOUT_MS = 120_000


def default_cache_dir() -> Path:
    if os.environ.get("DEEPER_RESPONSE_CACHE"):
        return Path(os.environ["DEEPER_RESPONSE_CACHE"])
    if os.environ.get("DEEPER_CACHE_DIR"):
        return Path(os.environ["DEEPER_CACHE_DIR"]) / "responses"
    return Path.cwd() / ".cache" / "deeper" / "responses"


def call_key(backend: str, fingerprint: str, op: str, messages: Chat, **fields) -> str:
    payload = {"backend": backend, "fingerprint": fingerprint, "op": op, "messages": messages, **fields}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def generate_key(llm, chat: Chat, sampling: Sampling, index: int) -> str:
    return call_key(
        llm.backend,
        llm.fingerprint,
        "generate",
        chat,
        sampling={**sampling.key(), "seed": sampling.seed + index},
    )


def rating_key(llm, chat: Chat, prefill: str) -> str:
    return call_key(llm.backend, llm.fingerprint, "rating", chat, prefill=prefill)


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """Put the database in WAL mode, waiting for other processes that open it at the same moment.

    Switching the journal mode needs the database to itself, and while another connection holds a write lock
    (as the other opener does while it switches) sqlite answers "database is locked" at once, without waiting
    the busy timeout: two processes opening a new cache together failed about one time in four (measured).
    WAL mode persists in the file, so only the first opener switches; the others find it done. Retry with a
    growing pause until the busy timeout.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause, mode = 0.005, None
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if mode != "wal":
                # answers the mode in force afterwards: the old one when it could not switch
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode == "wal":
                return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e):
                raise
        if time.monotonic() + pause > deadline:
            raise sqlite3.OperationalError(
                f"could not switch to WAL mode (journal mode {mode!r}): database is locked"
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


# sqlite's result codes that mean the file itself is damaged (primary codes; the extended ones share the low
# byte): CORRUPT ("database disk image is malformed") and NOTADB ("file is not a database", a damaged header).
_DAMAGED_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
# ...and the extended I/O codes of a page that cannot be read whole: a bad sector (EIO) or a file cut short.
# Other errors (locked, disk full, read-only, out of memory) are not damage: moving the file aside would not
# help and would throw away a good cache, so they stop the stage with one line instead.
_DAMAGED_IO_CODES = {sqlite3.SQLITE_IOERR_READ, sqlite3.SQLITE_IOERR_SHORT_READ}
_SALVAGE_BATCH = 1000
_INT64 = (-(2**63), 2**63 - 1)
_HEALS_PER_CALL = 2  # a cache damaged again right after it was replaced points at the disk, not at the file


class _Unreadable(Exception):
    """A row that sqlite returns but that does not decode: its page was overwritten without breaking the
    b-tree (quick_check reads structure, not content). The file is damaged as surely as when sqlite says so."""


def _damage(error: sqlite3.Error) -> str | None:
    """What sqlite found, when `error` says the file is damaged; None for any other error."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is None or ((code & 0xFF) not in _DAMAGED_CODES and code not in _DAMAGED_IO_CODES):
        return None
    return str(error)


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file `path` is now (device, inode); None when there is none. A heal moves the file and makes a new
    one at the same path, so a connection opened on another identity reads the file that was moved aside."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _decode_row(key: bytes, op: bytes, value: bytes) -> tuple[str, str, dict]:
    """(key, op, value) of a stored row, read as bytes so that a damaged text reaches us instead of failing
    inside sqlite3's decoding; ValueError (UnicodeDecodeError, json's error) when it is not one that put_many
    wrote: printable key, a known op, a JSON object with the op's fields."""
    key_text, op_text = bytes(key).decode("utf-8"), bytes(op).decode("utf-8")
    data = json.loads(bytes(value).decode("utf-8"))  # strict: a control character (zeroed bytes) is an error
    if not (key_text.isascii() and key_text.isprintable() and key_text) or not isinstance(data, dict):
        raise ValueError("not a stored row")
    if (op_text, "text" in data, "probs" in data and "digit_mass" in data) not in {
        ("generate", True, False),
        ("rating", False, True),
    }:
        raise ValueError(f"not a stored {op_text!r} answer")
    return key_text, op_text, data


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())  # quick_check's report spans lines
    return line if len(line) <= limit else line[: limit - 3] + "..."


class ResponseStore:
    """key -> JSON value in sqlite (WAL); one connection per thread; every put is one transaction.

    A damaged file heals: it is moved aside (`responses.sqlite3.damaged-<UTC time>`, never deleted), the rows
    still readable are copied into a fresh file at the same path, one line on stderr says so, and the read or
    write that met the damage runs again on the fresh file. `healed` and `salvaged` count it for the call summary.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DeeperError(f"cannot create the response cache {self.directory}: {e.strerror}") from None
        self.path = self.directory / DB_NAME
        # One lock per cache file, beside it (the cache may be anywhere: $DEEPER_RESPONSE_CACHE). Held to open
        # a connection and to heal, so that two processes meeting the damage at once do not both move the
        # file, and none opens the path in the moment between the moves of the -wal and of the file (sqlite
        # would pair the damaged file's WAL with the fresh file). Reads and writes do not take it: sqlite
        # locks those.
        self._lock = FileLock(str(self.path) + ".lock")
        self._local = threading.local()
        self.healed = 0  # times this store met a damaged file and went on with a fresh one
        self.salvaged = 0  # answers those heals copied from the damaged file into the fresh one
        self._run(lambda conn: None)  # open now: damage found by the open check heals before the stage starts

    # --- connections ----------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            if self._local.identity == _identity(self.path):
                return conn
            # Another process (or store) healed: this connection still reads the file that was moved aside.
            # Closing it does not checkpoint into the path: sqlite skips the checkpoint of a moved file.
            self._close_local()
        with self._lock:
            try:
                return self._open()
            except (sqlite3.DatabaseError, _Unreadable) as e:
                found = self._damage_found(e)
            # Healed under the same hold of the lock: a process waiting to open meanwhile opens the fresh file,
            # not the damaged one (released in between, both opened it and both healed: seen in the tests).
            self._heal(found)
            return self._local.conn if self._local.conn is not None else self._open()

    def _open(self) -> sqlite3.Connection:
        """A new connection for this thread, on the file now at the path, checked; the caller holds the lock."""
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        self._local.conn, self._local.identity = conn, _identity(self.path)  # the lock keeps the path still
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        _switch_to_wal(conn)
        conn.execute("PRAGMA synchronous=NORMAL")  # with WAL: safe against a killed process
        conn.execute(
            "CREATE TABLE IF NOT EXISTS responses ("
            "key TEXT PRIMARY KEY, op TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL)"
        )
        # Damage in pages this run would not read is found here too, before a write lands next to it.
        # It reads every page (measured: 0.09 s for a 45 MB cache of 100,000 answers).
        check = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        if check != "ok":
            raise _Unreadable("quick_check: " + check.replace("*** in database main ***", "").strip())
        return conn

    def _close_local(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = self._local.identity = None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:  # closing a connection to a damaged file may fail; it is dropped either way
                pass

    def _damage_found(self, error: sqlite3.Error | _Unreadable) -> str:
        """What was found, when `error` says the file is damaged; any other sqlite error becomes one line
        (DeeperError: locked, disk full, I/O, read-only), a misuse of sqlite3 here stays a bug's traceback."""
        if isinstance(error, _Unreadable):
            return str(error)
        found = _damage(error)
        if found is not None:
            return found
        if is_disk_full(error):  # sqlite rolled the write back: the cache holds every finished chunk
            raise DiskFull(self.path, first_line(error)) from None
        if isinstance(error, sqlite3.OperationalError):
            raise DeeperError(f"response cache {self.path}: {error}") from None
        raise error

    def _run(self, op):
        """`op(connection)`, healing the file and running `op` again when the file turns out to be damaged; any
        other sqlite or file-system error is one line (DeeperError), never a traceback."""
        for attempt in range(_HEALS_PER_CALL + 1):
            try:
                return op(self._connect())
            except (sqlite3.DatabaseError, _Unreadable) as e:
                found = self._damage_found(e)
            except OSError as e:  # the lock file: a read-only or vanished folder
                raise DeeperError(f"response cache {self.path}: {e.strerror or e}") from None
            if attempt == _HEALS_PER_CALL:
                raise DeeperError(
                    f"response cache {self.path} is damaged again right after it was replaced ({_one_line(found)}): "
                    f"check the disk, or set DEEPER_RESPONSE_CACHE to a folder on another one"
                ) from None
            self._heal(found)

    # --- healing --------------------------------------------------------------------------------------

    def _aside_path(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        base = self.directory / f"{DB_NAME}.damaged-{stamp}"
        aside, n = base, 1
        while any(Path(f"{aside}{suffix}").exists() for suffix in ("", "-wal", "-shm")):
            n += 1
            aside = Path(f"{base}-{n}")
        return aside

    def _heal(self, found: str) -> None:
        met = getattr(self._local, "identity", None)
        self._close_local()
        try:
            with self._lock:
                if _identity(self.path) != met:
                    # Another process met the damage too and healed first (its line says where the file went):
                    # moving the path now would move its fresh cache. Go on with that one.
                    self.healed += 1
                    print(
                        f"warning: response cache {self.path} was damaged ({_one_line(found)}); another run "
                        f"already moved it aside and made a fresh one: going on with that, calling again what "
                        f"it lacks",
                        file=sys.stderr,
                        flush=True,
                    )
                    return
                aside = self._aside_path()
                # The WAL (committed answers not yet copied into the file) and its index move first and the
                # file last: a crash between the moves then leaves the damaged file at the path (healed again
                # on the next run), never a fresh file paired with the damaged file's WAL.
                for suffix in ("-wal", "-shm", ""):
                    if Path(f"{self.path}{suffix}").exists():
                        os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
                conn = (
                    self._open()
                )  # the fresh file (not _connect: a fresh file found damaged is not healed again)
                salvaged, skipped = _salvage(aside, conn)
        except (OSError, sqlite3.Error, _Unreadable) as e:  # e.g. a read-only folder; the fresh file damaged
            why = (e.strerror or e) if isinstance(e, OSError) else e
            raise DeeperError(
                f"response cache {self.path} is damaged ({_one_line(found)}) and could not be "
                f"replaced: {why}; move it away by hand and re-run"
            ) from None
        self.healed += 1
        self.salvaged += salvaged
        lost = f", {skipped} damaged row{'s' * (skipped != 1)} left behind" if skipped else ""
        print(
            f"warning: response cache {self.path} is damaged ({_one_line(found)}): moved it aside to {aside.name} "
            f"(kept), {salvaged} answers salvaged into a fresh cache{lost}; the calls it no longer answers are "
            f"made again",
            file=sys.stderr,
            flush=True,
        )

    # --- rows -----------------------------------------------------------------------------------------

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        unique = list(dict.fromkeys(keys))

        def read(conn):
            found = {}
            for start in range(0, len(unique), 500):
                part = unique[start : start + 500]
                marks = ",".join("?" * len(part))
                query = (
                    f"SELECT CAST(key AS BLOB), CAST(op AS BLOB), CAST(value AS BLOB) FROM responses "
                    f"WHERE key IN ({marks})"
                )
                for key, op, value in conn.execute(query, part):
                    try:
                        key, _, found[key] = _decode_row(key, op, value)
                    except ValueError as e:
                        raise _Unreadable(f"a stored answer does not decode: {e}") from None
            if not set(found) <= set(unique):  # the key index led to a row of another key
                raise _Unreadable("the key index points at other rows")
            return found

        return self._run(read)

    def put_many(self, rows: Sequence[tuple[str, str, object]]) -> None:
        """Store (key, op, value) rows in one transaction (all or nothing)."""
        if not rows:
            return
        now = time.time()
        encoded = [(key, op, json.dumps(value), now) for key, op, value in rows]

        def write(conn):
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "INSERT OR REPLACE INTO responses (key, op, value, created) VALUES (?, ?, ?, ?)", encoded
                )

        self._run(write)

    def __len__(self) -> int:
        return self._run(lambda conn: conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        self._close_local()


def _salvage(aside: Path, fresh: sqlite3.Connection) -> tuple[int, int]:
    """Copy the rows of the damaged file `aside` that still read and decode into `fresh`: (copied, skipped).

    Read-only (the damaged file stays as it was found, for whoever wants to look at it), with writable_schema,
    which makes sqlite trust the file's size over its header: a file cut short then still gives the rows of its
    first part (measured: half of them for a file cut in half, none without). The table is read in rowid order;
    where a page fails, the next readable rowid is found by probing (doubling steps, then bisection), so a bad
    page costs only its own rows. Measured on 5,000 answers (2.4 MB): one overwritten 4 KiB table page loses 11,
    three pages 22, 512 bytes inside a page 2, an index page none (the index is rebuilt); the header or the
    table's root page loses all. No row is changed (every salvaged row equal to the one written). 100,000 answers
    (47 MB) take about 5 s. Python's sqlite3 has no `.recover` (that is the sqlite3 shell's, and the sqlite_dbpage
    table it needs is not compiled in), so pages the b-tree no longer reaches are not looked at.
    """
    try:
        old = sqlite3.connect(f"file:{aside}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error:
        return 0, 0
    copied = skipped = 0
    batch: list[tuple] = []

    def flush():
        nonlocal copied, batch
        if batch:
            with fresh:
                fresh.execute("BEGIN IMMEDIATE")
                # OR IGNORE: an answer written meanwhile (a retried call) is as good as the salvaged one
                cur = fresh.executemany(
                    "INSERT OR IGNORE INTO responses (key, op, value, created) VALUES (?, ?, ?, ?)", batch
                )
                copied += max(cur.rowcount, 0)
            batch = []

    select = (
        "SELECT rowid, CAST(key AS BLOB), CAST(op AS BLOB), CAST(value AS BLOB), created FROM responses "
        "WHERE rowid >= ? ORDER BY rowid"
    )

    def readable_from(start: int) -> bool:
        try:
            old.execute(select + " LIMIT 1", (start,)).fetchone()
            return True
        except sqlite3.DatabaseError:
            return False

    def next_readable(bad: int) -> int | None:
        step = 1
        while not readable_from(min(bad + step, _INT64[1])):
            if bad + step >= _INT64[1]:
                return None
            step *= 2
        good = min(bad + step, _INT64[1])
        while good - bad > 1:
            mid = (bad + good) // 2
            bad, good = (bad, mid) if readable_from(mid) else (mid, good)
        return good

    start: int | None = _INT64[0]
    budget = 0

    def take(row) -> None:
        nonlocal start, skipped, budget
        rowid, key, op, value, created = row
        start = max(start, rowid) + 1 if rowid < _INT64[1] else None  # always forward, whatever a page claims
        budget -= 1
        try:
            key, op, _ = _decode_row(key, op, value)
            batch.append((key, op, bytes(value).decode("utf-8"), float(created)))
        except (ValueError, TypeError):
            skipped += 1
        if len(batch) >= _SALVAGE_BATCH:
            flush()

    try:
        # a bound on the rows read, whatever a damaged page claims: no row of this table is smaller than 16
        # bytes
        budget = (
            sum(os.path.getsize(f"{aside}{s}") for s in ("", "-wal") if os.path.exists(f"{aside}{s}")) // 16
        )
        old.execute("PRAGMA writable_schema=ON")
        while start is not None and budget > 0:
            try:
                for row in old.execute(select, (start,)):  # a scan while the pages read
                    take(row)
                    if start is None or budget <= 0:
                        break
                else:
                    start = None
            except sqlite3.DatabaseError:
                # sqlite3's cursor reads one row ahead of the row it hands out, so the last good row before
                # the bad page went down with the error (measured). Read on one row at a time (LIMIT 1 does
                # not read ahead) up to the bad page, then find where the readable rows start again.
                while start is not None and budget > 0:
                    try:
                        row = old.execute(select + " LIMIT 1", (start,)).fetchone()
                    except sqlite3.DatabaseError:
                        start = next_readable(start)
                        break
                    if row is None:
                        start = None
                    else:
                        take(row)
        flush()
    except (sqlite3.Error, OSError):
        flush()  # what was read before the error is kept; the rest of the file is not readable this way
    finally:
        old.close()
    return copied, skipped


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def cached_generation(value: dict | None) -> Generation | None:
    """A stored answer, or None (a miss) when absent or stored without its stopped_at_limit flag."""
    if value is None or "stopped_at_limit" not in value:
        return None
    return Generation(value["text"], stopped_at_limit=value["stopped_at_limit"])


class CachedLLM:
    """Any backend behind the response cache; same interface, plus hit/miss counters."""

    def __init__(self, llm, cache_dir: str | Path | None = None):
        self.llm = llm
        self.backend, self.fingerprint = llm.backend, llm.fingerprint
        self.store = ResponseStore(cache_dir if cache_dir is not None else default_cache_dir())
        self.batch_size = max(1, int(getattr(llm, "batch_size", 16)))
        self.hits = self.misses = 0
        self.failed_ratings = 0  # rating rows the backend marked failed (returned, never stored)
        if hasattr(llm, "show_progress"):
            llm.show_progress = False  # this wrapper shows one bar over all items

    @property
    def counters(self):
        return self.llm.counters

    def stats(self) -> dict:
        inner = self.llm.counters.as_dict() if hasattr(self.llm, "counters") else {}
        return {
            **inner,
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "failed_ratings": self.failed_ratings,
            # a damaged cache file met by this run (moved aside, replaced by a fresh one) and the answers
            # carried over from it: the rest of its answers are among cache_misses, called again
            "cache_healed": self.store.healed,
            "cache_salvaged": self.store.salvaged,
        }

    # --- generate -------------------------------------------------------------------------------------

    def generate(self, chats: list[Chat], n: int, sampling: Sampling) -> list[list[Generation]]:
        keys = [[generate_key(self, chat, sampling, k) for k in range(n)] for chat in chats]
        found = self.store.get_many([key for row in keys for key in row])
        texts = [[cached_generation(found.get(key)) for key in row] for row in keys]
        missing = [(c, k) for c, row in enumerate(texts) for k, text in enumerate(row) if text is None]
        total = len(chats) * n
        self.hits += total - len(missing)
        self.misses += len(missing)
        whole = [c for c, row in enumerate(texts) if all(t is None for t in row)]
        whole_set = set(whole)
        with tqdm(
            total=total, initial=total - len(missing), desc="generate", unit="sample", disable=not missing
        ) as bar:

            def run(indices: list[int], n_run: int, run_sampling: Sampling, first: int):
                out = self.llm.generate([chats[c] for c in indices], n_run, run_sampling)
                rows = []
                for c, samples in zip(indices, out):
                    for j, text in enumerate(samples):
                        texts[c][first + j] = text
                        value = {"text": str(text), "stopped_at_limit": stopped_at_limit(text)}
                        rows.append((keys[c][first + j], "generate", value))
                self.store.put_many(rows)
                bar.update(len(rows))

            # Chats with every sample missing: one call for n samples each.
            for part in _chunks(whole, max(1, self.batch_size // max(n, 1))):
                run(part, n, sampling, 0)
            # The rest (some samples cached): sample k alone is the first sample of seed + k.
            by_index: dict[int, list[int]] = {}
            for c, k in missing:
                if c not in whole_set:
                    by_index.setdefault(k, []).append(c)
            for k, indices in sorted(by_index.items()):
                for part in _chunks(indices, self.batch_size):
                    run(part, 1, replace(sampling, seed=sampling.seed + k), k)
        return cast(list[list[Generation]], texts)  # run() filled in every missing sample

    # --- rating ---------------------------------------------------------------------------------------

    def rating_probs(self, groups: list[RatingGroup]) -> list[RatingResult]:
        keys = [[rating_key(self, chat, g.prefill) for chat in g.chats] for g in groups]
        found = self.store.get_many([key for row in keys for key in row])
        results = []
        pieces = []  # (group index, item indices) of cache misses, at most batch_size items each
        for g, (group, row) in enumerate(zip(groups, keys)):
            n_items = len(group.chats)
            digit_mass = np.zeros(n_items)  # result.digit_mass
            result = RatingResult(
                probs=np.zeros((n_items, len(RATINGS))),
                digit_mass=digit_mass,
                failed=np.zeros(n_items, dtype=bool),
            )
            todo = []
            for j, key in enumerate(row):
                if key in found:
                    result.probs[j] = found[key]["probs"]
                    digit_mass[j] = found[key]["digit_mass"]
                else:
                    todo.append(j)
            pieces += [(g, part) for part in _chunks(todo, self.batch_size)]
            results.append(result)
        total = sum(len(row) for row in keys)
        n_missing = sum(len(items) for _, items in pieces)
        self.hits += total - n_missing
        self.misses += n_missing
        with tqdm(
            total=total, initial=total - n_missing, desc="rate", unit="item", disable=not n_missing
        ) as bar:
            chunk, size = [], 0
            for piece in pieces + [None]:
                if piece is not None and size + len(piece[1]) <= self.batch_size:
                    chunk.append(piece)
                    size += len(piece[1])
                    continue
                if chunk:
                    self._rate_chunk(groups, keys, results, chunk)
                    bar.update(size)
                chunk, size = ([piece], len(piece[1])) if piece is not None else ([], 0)
        return results

    def _rate_chunk(self, groups, keys, results, chunk) -> None:
        asked = [RatingGroup([groups[g].chats[j] for j in items], groups[g].prefill) for g, items in chunk]
        answers = self.llm.rating_probs(asked)
        rows = []
        for (g, items), answer in zip(chunk, answers):
            failed = answer.failed if answer.failed is not None else np.zeros(len(items), dtype=bool)
            for pos, j in enumerate(items):
                results[g].probs[j] = answer.probs[pos]
                results[g].digit_mass[j] = answer.digit_mass[pos]
                results[g].failed[j] = bool(failed[pos])
                self.failed_ratings += bool(failed[pos])
                if not failed[pos]:
                    value = {
                        "probs": [float(p) for p in answer.probs[pos]],
                        "digit_mass": float(answer.digit_mass[pos]),
                    }
                    rows.append((keys[g][j], "rating", value))
        self.store.put_many(rows)
