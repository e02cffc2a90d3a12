"""Cut each user's ratings into windows and split users into train/eval, per domain.

- Raw data: a user's ratings in time order (ts, then seq: the source order breaks ties) are cut into
  windows of `size`; only full windows count, at most `count` of them.
- Pre-windowed data (the DEEPER authors' windows, `window_hint` set): the source's windows are kept as
  they are (a window may hold fewer than `size` ratings after skips) and the source's split wins.
- A user needs `count` windows for evaluation (W_0 plus one window per predicted round) and
  `train_count` for training (iteration 2 rewards reach W_3); fewer is a counted skip.
- Users are drawn per domain with `seed`: evaluation users first, then training users from the rest.
  Asking for more users than there are takes all of them; the metrics report both numbers.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from deeper.data.schema import SPLITS, TABLES, WINDOW_COLUMNS
from deeper.duck import is_damage, is_not_duckdb
from deeper.errors import ConfigError, DeeperError, InputError, first_line
from deeper.outputs import write_parquet
from deeper.params import fill, mapping, number

SKIP_REASONS = (
    "too_few_ratings",  # raw data: fewer than size * min(count, train_count) ratings
    "too_few_windows",  # pre-windowed: windows 0.. of the source stop before the split's need
)
SPLIT_KEYS = ("train_users", "eval_users", "seen")


@dataclass(frozen=True)
class WindowSpec:
    size: int
    count: int  # windows an evaluation user needs (and the most any user keeps)
    train_count: int  # windows a training user needs
    seed: int


@dataclass(frozen=True)
class DomainSplit:
    train_users: int
    eval_users: int
    seen: bool


def spec_from_params(window: dict) -> tuple[WindowSpec, DomainSplit, dict[str, dict]]:
    """The `window` params block, checked: (spec, default split, per-domain overrides)."""
    if not isinstance(window, dict):
        raise ConfigError("window", "must be a mapping")
    numbers = {
        key: number(window.get(key), f"window.{key}", integer=True, low=low)
        for key, low in (("size", 1), ("count", 1), ("train_count", 1), ("seed", 0))
    }
    if numbers["train_count"] > numbers["count"]:
        raise ConfigError("window.train_count", f"must be <= window.count ({numbers['count']})")
    default = _split("window.default", window.get("default"), None)
    domains = window.get("domains") or {}
    if not isinstance(domains, dict):
        raise ConfigError("window.domains", "must be a mapping of domain -> {train_users, eval_users, seen}")
    for name, override in domains.items():
        _split(f"window.domains.{name}", override, default)  # checked now, applied per domain later
    return WindowSpec(**numbers), default, domains


def _split(key: str, block, default: DomainSplit | None) -> DomainSplit:
    def check(name, value):
        if name != "seen":
            return number(value, f"{key}.{name}", integer=True, low=0)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}.seen", f"must be true or false, not {value!r}")
        return value

    return DomainSplit(**fill(mapping(block, key, known=SPLIT_KEYS), key, SPLIT_KEYS, default, check))


def split_of(domain: str, default: DomainSplit, overrides: dict[str, dict]) -> DomainSplit:
    """The users a domain gets: its `window.domains` entry over `window.default`."""
    return _split(f"window.domains.{domain}", overrides[domain], default) if domain in overrides else default


REBUILD = "rebuild it from the raw files: dvc repro -f --single-item ingest"


def damaged(db_path: Path, error: BaseException) -> InputError:
    """The one line for an ingest database DuckDB finds damaged (or not a database at all)."""
    what = "damaged" if is_damage(error) else "not a DuckDB database, or its header is damaged"
    return InputError(db_path, f"{what} ({first_line(error)}); {REBUILD}")


def _open(db_path: Path) -> duckdb.DuckDBPyConnection:
    if not db_path.is_file():
        raise InputError(db_path, "not found; run the ingest stage first (dvc repro ingest)")
    try:
        con = duckdb.connect(str(db_path), read_only=True)
    except duckdb.Error as e:
        if is_damage(e) or is_not_duckdb(e):
            raise damaged(db_path, e) from None
        raise InputError(db_path, f"cannot open the database: {first_line(e)}") from None
    tables = {t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    missing = [t for t in TABLES if t not in tables]
    if missing:
        con.close()
        raise InputError(db_path, f"missing table(s) {', '.join(missing)}; {REBUILD}")
    return con


def _full_windows(windows: list[int], count: int) -> int:
    """How many windows 0, 1, ... a user has without a gap, at most `count`."""
    have, n = set(windows), 0
    while n < count and n in have:
        n += 1
    return n


def _draw(pool: list[str], k: int, seed: int, domain: str, split: str) -> list[str]:
    # A string seed is hashed deterministically (not with PYTHONHASHSEED); one stream per domain and split,
    # so adding a domain does not change the users of another.
    rng = random.Random(f"{seed}:{domain}:{split}")
    return rng.sample(sorted(pool), min(k, len(pool)))


def users_digest(users: list[str]) -> str:
    """The first 16 hex digits of the SHA-256 of the sorted user ids, one a line: the same set, the same digest."""
    return hashlib.sha256("".join(f"{u}\n" for u in sorted(users)).encode()).hexdigest()[:16]


def choose_users(con, spec: WindowSpec, default: DomainSplit, overrides: dict) -> tuple[list[tuple], dict]:
    """Rows (domain, user_id, split, windows) of the chosen users, and the per-domain counts."""
    domains = con.execute("SELECT domain FROM domains ORDER BY domain").fetchall()
    chosen, report = [], {}
    for (domain,) in domains:
        split = split_of(domain, default, overrides)
        kinds = con.execute(
            """
            SELECT count(*) FILTER (window_hint IS NULL), count(*) FILTER (window_hint IS NOT NULL)
            FROM ratings WHERE domain = ?""",
            [domain],
        ).fetchone()
        if kinds[0] and kinds[1]:
            raise DeeperError(
                f"domain {domain!r} mixes pre-windowed and raw ratings; give them separate domains"
            )
        prewindowed = kinds[1] > 0
        skipped = dict.fromkeys(SKIP_REASONS, 0)
        pools: dict[str, list[str]] = {s: [] for s in SPLITS}
        windows_of: dict[str, int] = {}
        if prewindowed:
            users = con.execute(
                """
                SELECT user_id, min(split_hint), max(split_hint), list(DISTINCT window_hint)
                FROM ratings WHERE domain = ? GROUP BY user_id""",
                [domain],
            ).fetchall()
            for user, hint, other_hint, windows in users:
                if hint != other_hint or hint not in SPLITS:
                    raise DeeperError(
                        f"domain {domain!r}: user {user!r} has split hints {hint!r}/{other_hint!r}"
                    )
                n = _full_windows(windows, spec.count)
                if n >= (spec.count if hint == "eval" else spec.train_count):
                    pools[hint].append(user)
                    windows_of[user] = n
                else:
                    skipped["too_few_windows"] += 1
        else:
            users = con.execute(
                "SELECT user_id, count(*) FROM ratings WHERE domain = ? GROUP BY user_id", [domain]
            ).fetchall()
            for user, n_ratings in users:
                n = min(n_ratings // spec.size, spec.count)
                if n >= spec.train_count:
                    pools["train"].append(user)
                if n >= spec.count:
                    pools["eval"].append(user)
                if n >= min(spec.count, spec.train_count):
                    windows_of[user] = n
                else:
                    skipped["too_few_ratings"] += 1
        picked = {"eval": _draw(pools["eval"], split.eval_users, spec.seed, domain, "eval")}
        taken = set(picked["eval"])
        rest = [u for u in pools["train"] if u not in taken]  # raw data: a user is in both pools
        picked["train"] = _draw(rest, split.train_users, spec.seed, domain, "train")
        for s in SPLITS:
            chosen += [(domain, user, s, windows_of[user], split.seen) for user in picked[s]]
        report[domain] = {
            "users": len(users),
            "eligible_users": {s: len(pools[s]) for s in SPLITS},
            "requested_users": {"train": split.train_users, "eval": split.eval_users},
            "train_users": len(picked["train"]),
            "eval_users": len(picked["eval"]),
            "unused_users": len(windows_of) - len(picked["train"]) - len(picked["eval"]),
            "skipped_users": skipped,
            # which users these are: the source's own split (the authors' windows) or a draw from the raw
            # ratings, and a digest of the evaluation users' ids, so that two runs' users can be compared
            "users_from": "source split" if prewindowed else f"drawn (window.seed {spec.seed})",
            "eval_users_sha256": users_digest(picked["eval"]),
        }
    return chosen, report


_CHOSEN_SCHEMA = pa.schema(
    [
        ("domain", pa.string()),
        ("user_id", pa.string()),
        ("split", pa.string()),
        ("n_windows", pa.int32()),
        ("seen", pa.bool_()),
    ]
)


def make_windows(
    db_path: str | Path, out: str | Path, spec: WindowSpec, default: DomainSplit, overrides: dict
) -> dict:
    """Write windows.parquet (columns deeper.data.schema.WINDOW_COLUMNS); return the metrics."""
    db_path, out = Path(db_path), Path(out)
    con = _open(db_path)
    try:
        chosen, report = choose_users(con, spec, default, overrides)
        con.register(
            "chosen",
            pa.Table.from_arrays(
                [
                    pa.array(c, type=f.type)
                    for c, f in zip(zip(*chosen) if chosen else [[]] * 5, _CHOSEN_SCHEMA)
                ],
                schema=_CHOSEN_SCHEMA,
            ),
        )
        # Raw users: position in time order -> (window, pos); pre-windowed: the source's window, position
        # within it. Either way (ts, seq) orders, seq being the source order.
        table = con.sql(
            """
            WITH placed AS (
                SELECT r.domain, r.user_id, c.split, c.seen, c.n_windows, r.item_id, r.rating, r.window_hint,
                       row_number() OVER (PARTITION BY r.domain, r.user_id, r.window_hint ORDER BY r.ts, r.seq) - 1
                         AS idx
                FROM ratings r JOIN chosen c USING (domain, user_id)),
            windowed AS (
                SELECT *, CASE WHEN window_hint IS NULL THEN idx // $size ELSE window_hint END AS "window",
                          CASE WHEN window_hint IS NULL THEN idx % $size ELSE idx END AS pos
                FROM placed)
            SELECT w.domain, d.item_type, w.seen, w.user_id, w.split, w."window"::INTEGER AS "window",
                   w.pos::INTEGER AS pos, w.item_id, i.title, w.rating
            FROM windowed w JOIN domains d USING (domain) JOIN items i USING (domain, item_id)
            WHERE w."window" < w.n_windows
            ORDER BY w.domain, w.user_id, w."window", w.pos""",
            params={"size": spec.size},
        ).to_arrow_table()
        con.unregister("chosen")
        con.register("written", table)
        per_domain = {
            d: (n, short, r)
            for d, n, short, r in con.execute(
                """
            SELECT domain, count(*), count(*) FILTER (n < $size), sum(n)
            FROM (SELECT domain, user_id, "window", count(*) n FROM written GROUP BY ALL) GROUP BY 1""",
                {"size": spec.size},
            ).fetchall()
        }
    except duckdb.Error as e:
        if is_damage(e):  # a damaged block is met by the first query that reads it
            raise damaged(db_path, e) from None
        raise
    finally:
        con.close()
    assert tuple(table.column_names) == WINDOW_COLUMNS, table.column_names
    write_parquet(table, out)
    for domain, entry in report.items():
        windows, short, ratings = per_domain.get(domain, (0, 0, 0))
        entry.update(windows=windows, short_windows=short, ratings=int(ratings or 0))
    total = {
        k: sum(e[k] for e in report.values())
        for k in ("users", "train_users", "eval_users", "unused_users", "windows", "short_windows", "ratings")
    }
    total["skipped_users"] = {r: sum(e["skipped_users"][r] for e in report.values()) for r in SKIP_REASONS}
    total["domains"] = len(report)
    return {
        "domains": report,
        "total": total,
        "spec": {"size": spec.size, "count": spec.count, "train_count": spec.train_count, "seed": spec.seed},
    }
