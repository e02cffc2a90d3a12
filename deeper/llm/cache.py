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
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deeper.errors import DeeperError
from deeper.llm.base import RATINGS, Chat, Generation, RatingGroup, RatingResult, Sampling, stopped_at_limit

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
        llm.backend, llm.fingerprint, "generate", chat, sampling={**sampling.key(), "seed": sampling.seed + index}
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
            raise sqlite3.OperationalError(f"could not switch to WAL mode (journal mode {mode!r}): database is locked")
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


class ResponseStore:
    """key -> JSON value in sqlite (WAL); one connection per thread; every put is one transaction."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DeeperError(f"cannot create the response cache {self.directory}: {e.strerror}") from None
        self.path = self.directory / DB_NAME
        self._local = threading.local()
        self._connect()

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                _switch_to_wal(conn)
                conn.execute("PRAGMA synchronous=NORMAL")  # with WAL: safe against a killed process
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS responses ("
                    "key TEXT PRIMARY KEY, op TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL)"
                )
            except sqlite3.Error as e:
                raise DeeperError(f"response cache {self.path}: {e}") from None
            self._local.conn = conn
        return conn

    def get_many(self, keys: list[str]) -> dict[str, object]:
        conn, found = self._connect(), {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            part = unique[start : start + 500]
            marks = ",".join("?" * len(part))
            for key, value in conn.execute(f"SELECT key, value FROM responses WHERE key IN ({marks})", part):
                found[key] = json.loads(value)
        return found

    def put_many(self, rows: list[tuple[str, str, object]]) -> None:
        """Store (key, op, value) rows in one transaction (all or nothing)."""
        if not rows:
            return
        conn, now = self._connect(), time.time()
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT OR REPLACE INTO responses (key, op, value, created) VALUES (?, ?, ?, ?)",
                [(key, op, json.dumps(value), now) for key, op, value in rows],
            )

    def __len__(self) -> int:
        return self._connect().execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


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
        return {**inner, "cache_hits": self.hits, "cache_misses": self.misses, "failed_ratings": self.failed_ratings}

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
        with tqdm(total=total, initial=total - len(missing), desc="generate", unit="sample",
                  disable=not missing) as bar:

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
        return texts

    # --- rating ---------------------------------------------------------------------------------------

    def rating_probs(self, groups: list[RatingGroup]) -> list[RatingResult]:
        keys = [[rating_key(self, chat, g.prefill) for chat in g.chats] for g in groups]
        found = self.store.get_many([key for row in keys for key in row])
        results = []
        pieces = []  # (group index, item indices) of cache misses, at most batch_size items each
        for g, (group, row) in enumerate(zip(groups, keys)):
            n_items = len(group.chats)
            result = RatingResult(
                probs=np.zeros((n_items, len(RATINGS))), digit_mass=np.zeros(n_items),
                failed=np.zeros(n_items, dtype=bool),
            )
            todo = []
            for j, key in enumerate(row):
                if key in found:
                    result.probs[j] = found[key]["probs"]
                    result.digit_mass[j] = found[key]["digit_mass"]
                else:
                    todo.append(j)
            pieces += [(g, part) for part in _chunks(todo, self.batch_size)]
            results.append(result)
        total = sum(len(row) for row in keys)
        n_missing = sum(len(items) for _, items in pieces)
        self.hits += total - n_missing
        self.misses += n_missing
        with tqdm(total=total, initial=total - n_missing, desc="rate", unit="item", disable=not n_missing) as bar:
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
                    value = {"probs": [float(p) for p in answer.probs[pos]], "digit_mass": float(answer.digit_mass[pos])}
                    rows.append((keys[g][j], "rating", value))
        self.store.put_many(rows)
