"""The persona store of `deeper refine`: one DuckDB file with every user's whole persona history.

Tables (plain SQL: `duckdb personas.duckdb "SELECT ..."`):
- `personas`: one row per (domain, user_id, round). Round 0 is S_0, written by the frozen model from the
  user's first full window (`writer` = 'init'); round r >= 1 is S_r, refined by the policy + adapter from the
  gap on the r-th window after it (`writer` = 'refine'): the window's items (`item_ids`, `titles`, `ts`),
  the ratings S_{r-1} predicted (`predicted`) and the actual ones (`actual`), `mae_before` = their MAE (the
  error of the old persona on that window), the persona's length, the fingerprints of the frozen model, of the
  policy (weights + adapter) and of the adapter alone, and `created_at` (UTC).
- `pending`: ratings waiting for a full window (fewer than `window.size` so far), in arrival order.

Identity (idempotence): a rating is (domain, user_id, item_id, rating, ts); one already in the store (in a
round's window or pending) is skipped, so re-running the same input adds nothing. A round's `window_key` is
the sha256 of its window's (item_id, rating, ts) list, unique per user.

Concurrency: DuckDB lets one process at a time open a file for writing, and a second open fails. Every access
here opens the file under a file lock (`<store>.lock`) and closes it before releasing the lock, so runs and
`deeper show` wait for each other only as long as one read or one write transaction takes, never for model
calls. A run reads the users' state, computes without the lock, then writes in one transaction after checking
that the state it computed from is still the store's (`StaleState` otherwise: the caller plans again).

Damage: DuckDB keeps a checksum per 256 KiB block and verifies it when it reads the block, so a damaged block
(a torn write, a bad sector, a copy cut short) surfaces as a duckdb error on open or on the first query that
reads that block. `connect` turns every such error, wherever in the caller's queries it comes, into one line
(`StoreDamaged`: the file, DuckDB's words, the two ways back: import the last `deeper store export`, or replay
the rating files), so no command shows a traceback and none has to check for itself. `deeper store check`
(deeper.store_tools) reads every block on purpose.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
from filelock import FileLock, Timeout

from deeper.duck import is_damage, is_not_duckdb
from deeper.errors import DeeperError, InputError, first_line
from deeper.outputs import DiskFull, is_disk_full

LOCK_TIMEOUT_S = 600.0  # a write transaction takes well under a second; ten minutes means a stuck process

PERSONA_FIELDS = (
    ("domain", "VARCHAR NOT NULL"),
    ("user_id", "VARCHAR NOT NULL"),
    ("round", "INTEGER NOT NULL"),
    ("item_type", "VARCHAR NOT NULL"),
    ("persona", "VARCHAR NOT NULL"),
    ("persona_words", "INTEGER NOT NULL"),
    ("persona_tokens", "INTEGER NOT NULL"),
    ("writer", "VARCHAR NOT NULL"),
    ("window_key", "VARCHAR NOT NULL"),
    ("item_ids", "VARCHAR[] NOT NULL"),
    ("titles", "VARCHAR[] NOT NULL"),
    ("ts", "BIGINT[] NOT NULL"),
    ("actual", "DOUBLE[] NOT NULL"),
    ("predicted", "DOUBLE[]"),
    ("mae_before", "DOUBLE"),
    ("predict_failed_items", "INTEGER"),
    ("update_failure", "VARCHAR"),
    ("update_flag", "VARCHAR"),
    ("frozen_fingerprint", "VARCHAR NOT NULL"),
    ("policy_fingerprint", "VARCHAR"),
    ("adapter", "VARCHAR"),
    ("adapter_fingerprint", "VARCHAR"),
    ("created_at", "TIMESTAMP NOT NULL"),
)
PENDING_FIELDS = (
    ("domain", "VARCHAR NOT NULL"),
    ("user_id", "VARCHAR NOT NULL"),
    ("item_type", "VARCHAR NOT NULL"),
    ("pos", "INTEGER NOT NULL"),
    ("item_id", "VARCHAR NOT NULL"),
    ("title", "VARCHAR NOT NULL"),
    ("rating", "DOUBLE NOT NULL"),
    ("ts", "BIGINT NOT NULL"),
)
# The version of the two tables' columns (PERSONA_FIELDS, PENDING_FIELDS): an export records it and an import
# refuses another, so a backup is never read into columns it was not written from. Bump it with any change.
SCHEMA_VERSION = 1
PERSONA_COLUMNS = tuple(name for name, _ in PERSONA_FIELDS)
PENDING_COLUMNS = tuple(name for name, _ in PENDING_FIELDS)
SCHEMA = (
    (
        f"CREATE TABLE IF NOT EXISTS personas ({', '.join(f'{n} {t}' for n, t in PERSONA_FIELDS)}, "
        "PRIMARY KEY (domain, user_id, round), UNIQUE (domain, user_id, window_key))"
    ),
    (
        f"CREATE TABLE IF NOT EXISTS pending ({', '.join(f'{n} {t}' for n, t in PENDING_FIELDS)}, "
        "PRIMARY KEY (domain, user_id, item_id, rating, ts))"
    ),
)
TABLES = {"personas": PERSONA_FIELDS, "pending": PENDING_FIELDS}
KEYS = {
    "personas": ("domain", "user_id", "round"),
    "pending": ("domain", "user_id", "pos"),
}  # one row each, in order

# DuckDB's words for a file it cannot read back (measured with DuckDB 2.0 on stores with bytes overwritten or cut
# off, tests/test_store_tools.py): a block whose checksum fails ("Corrupt database file: computed checksum ...
# does not match stored checksum ..."; FATAL "Data Corruption Error" when a write meets it), a file shorter than
# its blocks ("Could not read enough bytes"), a database a fatal error closed ("invalidated"). Matched on the
# message because DuckDB raises them as the base duckdb.Error or as IOException/FatalException alike.


def ways_back(store: str | Path) -> str:
    """The two ways to a sound store, named in every damage message (docs/refiner.md, "Damage, backups and
    replay"). Ratings already in a store are skipped, so replaying a file the restored export holds adds nothing."""
    return (
        f"ways back: (1) `deeper store import BACKUP_DIR {store} --force` restores the last export (the damaged "
        f"file is kept, renamed), then replay the rating files refined since; or (2) move the file aside and "
        f"replay every rating file in its original order: `deeper refine FILE --store {store} ...` on each "
        f"(ratings already in the store are skipped; the response cache answers the calls already made: no "
        f"model call again)"
    )


class StoreDamaged(InputError):
    """The persona store's file cannot be read back: one line with the file, DuckDB's words and the ways back.
    `index`: only an index block failed, every row reads back (deeper.store_tools.check_store tells)."""

    def __init__(self, path, detail: str, index: bool = False):
        self.detail, self.index = detail, index
        rescue = (
            f"every row still reads back, so `deeper store export {path} DIR` then (1) with DIR loses "
            f"nothing; "
            if index
            else ""
        )
        super().__init__(
            path,
            f"damaged{' index' if index else ''} ({detail}); nothing was written; {rescue}{ways_back(path)}",
        )


@dataclass(frozen=True)
class Rating:
    """One rating of a user, as the ingest readers give it (title cleaned, rating on the 1-5 scale)."""

    item_id: str
    title: str
    rating: float
    ts: int

    @property
    def key(self) -> tuple[str, float, int]:
        return (self.item_id, float(self.rating), int(self.ts))


def window_key(ratings: Sequence[Rating]) -> str:
    text = json.dumps([list(r.key) for r in ratings], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class UserState:
    """What the store holds of one user: the latest round and persona, the pending ratings, every rating seen."""

    domain: str
    user_id: str
    last_round: int | None = None  # None: the user is new to the store
    persona: str | None = None
    pending: list[Rating] = field(default_factory=list)
    known: set[tuple] = field(
        default_factory=set
    )  # Rating.key of every rating in a round's window or pending

    def token(self) -> tuple:
        """Changes whenever a write changed this user: compared before writing."""
        return (self.last_round, tuple(r.key for r in self.pending))


class StaleState(DeeperError):
    """Another run wrote some of these users between this run's read and its write."""


class PersonaStore:
    def __init__(self, path: str | Path, lock_timeout: float = LOCK_TIMEOUT_S):
        self.path = Path(path)
        self.lock = FileLock(str(self.path) + ".lock", timeout=lock_timeout)

    @contextmanager
    def connect(self, write: bool) -> Iterator[duckdb.DuckDBPyConnection | None]:
        """The open database under the file lock (None when reading a store that does not exist yet).

        A damaged file raises StoreDamaged, whether DuckDB notices on open, on the schema check here or in any
        query of the caller (a damaged data block is read only by the query that needs it)."""
        try:
            with self.lock:
                if not write and not self.path.exists():
                    yield None
                    return
                if write:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    con = duckdb.connect(str(self.path), read_only=not write)
                except duckdb.Error as e:
                    raise self.open_error(e) from None
                try:
                    tables = self._check_schema(con)
                    if not tables and not write:
                        yield None
                        return
                    yield con
                except duckdb.Error as e:
                    if is_damage(e):
                        raise StoreDamaged(self.path, first_line(e)) from None
                    if is_disk_full(e):  # the write's transaction rolled back: the store is as it was
                        raise DiskFull(self.path, first_line(e)) from None
                    raise  # not damage: a bug here, whose traceback is what a fix needs
                finally:
                    try:
                        con.close()
                    except duckdb.Error:  # a database a fatal error invalidated may refuse even this
                        pass
        except Timeout:
            raise DeeperError(
                f"{self.path}: locked by another run for {self.lock.timeout:g} s ({self.lock.lock_file})"
            ) from None

    def open_error(self, e: duckdb.Error) -> DeeperError:
        """The one line for a file DuckDB would not open."""
        first = first_line(e)
        if is_disk_full(e):
            return DiskFull(self.path, first)
        if is_damage(e):
            return StoreDamaged(self.path, first)
        if is_not_duckdb(e):
            # DuckDB cannot tell a damaged header from another kind of file; say both
            return InputError(
                self.path,
                f"not a DuckDB persona store ({first}); if it was one, its header is "
                f"damaged: {ways_back(self.path)}",
            )
        if "lock" in first.lower():  # a process outside this lock (e.g. a duckdb shell) has it open
            return DeeperError(f"{self.path}: open in another process; close it and re-run ({first})")
        return InputError(self.path, f"not a DuckDB persona store: {first}")

    def _check_schema(self, con) -> set[str]:
        """The store's tables; InputError unless they are this version's personas and pending (an empty file is
        a new store)."""
        tables = {
            t
            for (t,) in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
            ).fetchall()
        }
        if tables and not set(TABLES) <= tables:
            raise InputError(self.path, f"not a persona store (tables: {', '.join(sorted(tables))})")
        if tables:
            for table, fields in TABLES.items():
                have = con.execute(
                    "SELECT column_name, data_type FROM information_schema.columns WHERE "
                    "table_schema = 'main' AND table_name = ? ORDER BY ordinal_position",
                    [table],
                ).fetchall()
                if have != column_types(fields):
                    raise InputError(
                        self.path,
                        f"table {table} has other columns than this version of deeper "
                        f"writes ({schema_difference(have, column_types(fields))})",
                    )
        return tables

    # ------------------------------------------------------------------ reading

    def states(self, users: Sequence[tuple[str, str]]) -> dict[tuple[str, str], UserState]:
        """The state of each (domain, user_id); users the store does not know get an empty state."""
        with self.connect(write=False) as con:
            if con is None:
                return {u: UserState(*u) for u in users}
            return _read_states(con, users, known=True)

    def history(self, user_id: str, domain: str | None = None) -> list[dict]:
        """Every round of one user, oldest first; a one-line error for an unknown or ambiguous user."""
        with self.connect(write=False) as con:
            if con is None:
                raise InputError(self.path, "no persona store here yet; run `deeper refine` first")
            domains = [
                d
                for (d,) in con.execute(
                    "SELECT DISTINCT domain FROM personas WHERE user_id = ? ORDER BY 1", [user_id]
                ).fetchall()
            ]
            if domain is not None:
                domains = [d for d in domains if d == domain]
            if not domains:
                raise InputError(
                    self.path, f"no user {user_id!r}" + (f" in domain {domain!r}" if domain else "")
                )
            if len(domains) > 1:
                raise InputError(
                    self.path, f"user {user_id!r} is in domains {', '.join(domains)}; pick one with --domain"
                )
            cur = con.execute(
                f"SELECT {', '.join(PERSONA_COLUMNS)} FROM personas WHERE domain = ? AND user_id = ? "
                "ORDER BY round",
                [domains[0], user_id],
            )
            rows = [dict(zip(PERSONA_COLUMNS, row)) for row in cur.fetchall()]
            count = con.execute(
                "SELECT count(*) FROM pending WHERE domain = ? AND user_id = ?", [domains[0], user_id]
            ).fetchone()
            assert count is not None  # count(*) always gives one row
            pending = count[0]
        for row in rows:
            row["pending_after"] = None
        if rows:
            rows[-1]["pending_after"] = int(pending)
        return rows

    # ------------------------------------------------------------------ writing

    def write(
        self,
        expected: dict[tuple[str, str], UserState],
        rounds: list[dict],
        pending: dict[tuple[str, str], list[tuple[str, Rating]]],
    ) -> None:
        """In one transaction: add `rounds` (dicts of PERSONA_COLUMNS) and replace the pending ratings of the
        users in `pending` ((item_type, rating) in arrival order). Raises StaleState, writing nothing, when a
        user of `expected` changed since it was read."""
        users = sorted(expected)
        with self.connect(write=True) as con:
            assert con is not None  # connect(write=True) always yields a connection
            for statement in SCHEMA:
                con.execute(statement)
            con.execute("BEGIN TRANSACTION")
            try:
                now_state = _read_states(con, users, known=False)
                changed = [u for u in users if now_state[u].token() != expected[u].token()]
                if changed:
                    raise StaleState(f"{self.path}: {len(changed)} users changed by another run")
                if pending:
                    con.executemany(
                        "DELETE FROM pending WHERE domain = ? AND user_id = ?", [list(u) for u in pending]
                    )
                    rows = [
                        (d, u, item_type, pos, r.item_id, r.title, r.rating, r.ts)
                        for (d, u), items in pending.items()
                        for pos, (item_type, r) in enumerate(items)
                    ]
                    if rows:
                        con.executemany(
                            f"INSERT INTO pending VALUES ({', '.join('?' * len(PENDING_COLUMNS))})", rows
                        )
                if rounds:
                    con.executemany(
                        f"INSERT INTO personas ({', '.join(PERSONA_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(PERSONA_COLUMNS))})",
                        [[row[c] for c in PERSONA_COLUMNS] for row in rounds],
                    )
                con.execute("COMMIT")
            except BaseException:
                try:
                    con.execute("ROLLBACK")
                except duckdb.Error:
                    # a fatal error (a damaged block met by this write) already ended the transaction uncommitted;
                    # the first error, raised below, is the one that says what happened
                    pass
                raise


def column_types(fields) -> list[tuple[str, str]]:
    """(name, DuckDB type) of a table's fields as information_schema names them (no NOT NULL)."""
    return [(name, kind.removesuffix(" NOT NULL")) for name, kind in fields]


def schema_difference(have: list[tuple[str, str]], want: list[tuple[str, str]]) -> str:
    missing = [f"{n} {t}" for n, t in want if (n, t) not in have]
    extra = [f"{n} {t}" for n, t in have if (n, t) not in want]
    parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
        [f"unexpected {', '.join(extra)}"] if extra else []
    )
    return "; ".join(parts) or "same columns in another order"


def _read_states(con, users: Sequence[tuple[str, str]], known: bool) -> dict[tuple[str, str], UserState]:
    """The users' latest round and persona and pending ratings; with `known`, every rating key they have."""
    out = {u: UserState(*u) for u in users}
    if not users:
        return out
    con.register(
        "wanted",
        pa.table(
            {
                "domain": pa.array([u[0] for u in users], pa.string()),
                "user_id": pa.array([u[1] for u in users], pa.string()),
            }
        ),
    )
    try:
        for domain, user_id, rnd, persona in con.execute("""
                SELECT domain, user_id, round, persona FROM personas SEMI JOIN wanted USING (domain, user_id)
                QUALIFY row_number() OVER (PARTITION BY domain, user_id ORDER BY round DESC) = 1""").fetchall():
            out[(domain, user_id)].last_round, out[(domain, user_id)].persona = rnd, persona
        for domain, user_id, item_id, title, rating, ts in con.execute("""
                SELECT domain, user_id, item_id, title, rating, ts FROM pending
                SEMI JOIN wanted USING (domain, user_id) ORDER BY domain, user_id, pos""").fetchall():
            out[(domain, user_id)].pending.append(Rating(item_id, title, rating, ts))
        if known:
            for domain, user_id, item_id, rating, ts in con.execute("""
                    SELECT domain, user_id, unnest(item_ids), unnest(actual), unnest(ts) FROM personas
                    SEMI JOIN wanted USING (domain, user_id)""").fetchall():
                out[(domain, user_id)].known.add((item_id, float(rating), int(ts)))
    finally:
        con.unregister("wanted")
    for state in out.values():
        state.known.update(r.key for r in state.pending)
    return out
