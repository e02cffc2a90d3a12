"""A damaged response cache heals: found on open or by the first read or write that meets it, moved aside (kept),
its readable rows salvaged into a fresh file, one line said, and the run goes on with the same answers.

Every cache here is a real sqlite file filled by CachedLLM over the tiny Llama, damaged for real on disk: a table
page overwritten (a torn write, a bad sector), the file cut short (a copy cut short), or the bytes of one stored
answer garbled inside an intact page (which sqlite's quick_check does not see). The pages to damage are found
from sqlite's file format (page type 13 = table leaf; page 1 holds the schema), so each test knows which rows a
page held and so which answers must come back from the cache and which must be called again.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from filelock import FileLock

from deeper.errors import DeeperError
from deeper.llm import load_llm
from deeper.llm.base import RatingGroup
from deeper.llm.cache import DB_NAME, CachedLLM, ResponseStore
from tests.stage_runs import cached_rows, stage_calls
from tests.test_init_personas import write_params
from tests.test_llm_cache import CountingLLM, chat
from tests.test_stage_kill import windows_frame  # the same users: each W_0 (so each prompt) its own
from tests.tiny import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
N = 160  # rated chats: about a dozen table pages, so that one damaged page is a part of the cache, not all of it
TABLE_LEAF = 13


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_llm({"backend": "transformers", "name": str(tiny_llama), "batch_size": 8})


def groups(n: int = N, first: int = 0) -> list[RatingGroup]:
    """n chats from chat(first) on, in groups of 40."""
    return [
        RatingGroup([chat(first + i) for i in range(start, min(start + 40, n))]) for start in range(0, n, 40)
    ]


def filled(tiny, cache: Path) -> tuple[list, dict]:
    """A cache of N real rating answers, all in the sqlite file itself (the WAL checkpointed into it on close, as
    after any finished run): the answers and key -> stored JSON text."""
    cached = CachedLLM(tiny, cache)
    answers = cached.rating_probs(groups())
    cached.store.close()
    assert not (cache / f"{DB_NAME}-wal").exists()
    rows = {key: value for key, (value, _) in cached_rows(cache).items()}
    assert len(rows) == N
    return answers, rows


def page_size(data: bytes) -> int:
    return int.from_bytes(data[16:18], "big")  # sqlite's header: the page size at offset 16


def table_leaves(data: bytes) -> list[int]:
    """0-based numbers of the pages that hold rows of the responses table (page 0 is the schema's)."""
    size = page_size(data)
    return [p for p in range(1, len(data) // size) if data[p * size] == TABLE_LEAF]


def keys_on(data: bytes, page: int, keys) -> set[str]:
    size = page_size(data)
    return {key for key in keys if key.encode() in data[page * size : (page + 1) * size]}


def overwrite_page(path: Path, page: int, seed: int = 0) -> bytes:
    """Random bytes over one whole page, as a torn write or a bad sector leaves it; the file's new bytes."""
    data = bytearray(path.read_bytes())
    size = page_size(data)
    data[page * size : (page + 1) * size] = random.Random(seed).randbytes(size)
    path.write_bytes(bytes(data))
    return bytes(data)


def garble_answer(path: Path, key: str) -> bytes:
    """Two bytes of `key`'s stored answer made invalid UTF-8, inside an intact page: sqlite sees nothing wrong."""
    data = bytearray(path.read_bytes())
    size = page_size(data)
    (page,) = [
        p for p in table_leaves(data) if key in keys_on(data, p, [key])
    ]  # its row, not its index entry
    # a cell holds the record's columns in order (key, op, value, created): the next digit_mass is the key's
    at = data.index(b'"digit_mass": ', data.index(key.encode(), page * size)) + len(b'"digit_mass": ')
    assert at < (page + 1) * size
    data[at : at + 2] = b"\xff\xfe"
    path.write_bytes(bytes(data))
    return bytes(data)


def heal_lines(err: str, path: Path) -> list[str]:
    """The lines of stderr that name the cache file (progress bars share stderr but never name it)."""
    return [line for line in err.replace("\r", "\n").splitlines() if str(path) in line]


def asides(cache: Path) -> list[Path]:
    """The damaged files moved aside (not their -wal / -shm companions)."""
    return sorted(p for p in cache.glob(f"{DB_NAME}.damaged-*") if not p.name.endswith(("-wal", "-shm")))


def assert_same_answers(got, want, atol=0.0):
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=atol)
        np.testing.assert_allclose(a.digit_mass, b.digit_mass, rtol=0, atol=atol)


def test_a_damaged_page_is_found_on_open_moved_aside_and_the_rest_salvaged(tiny, tmp_path, capfd):
    cache = tmp_path / "cache"
    path = cache / DB_NAME
    answers, rows = filled(tiny, cache)
    leaves = table_leaves(path.read_bytes())
    assert len(leaves) >= 8
    victim = leaves[len(leaves) // 2]
    lost = keys_on(path.read_bytes(), victim, rows)
    assert 0 < len(lost) < N // 4
    damaged = overwrite_page(path, victim)
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):  # what a stage met before: a traceback
        sqlite3.connect(path).execute("SELECT key, value FROM responses").fetchall()
    capfd.readouterr()

    again = CachedLLM(CountingLLM(tiny), cache)
    # found by the open check, before any call: one line naming the file, the damage, where it went, what now
    (line,) = heal_lines(capfd.readouterr().err, path)
    (aside,) = asides(cache)
    assert line.startswith(f"warning: response cache {path} is damaged (") and aside.name in line
    assert f"{N - len(lost)} answers salvaged" in line and "made again" in line
    assert (
        aside.name.startswith(f"{DB_NAME}.damaged-") and aside.read_bytes() == damaged
    )  # kept as it was found
    assert len(again.store) == N - len(lost)

    got = again.rating_probs(groups())
    assert (again.hits, again.misses) == (N - len(lost), len(lost))
    assert sum(sum(sizes) for _, sizes in again.llm.asked) == len(
        lost
    )  # only the lost answers were called again
    assert_same_answers(
        got, answers, atol=1e-6
    )  # the called-again ones in other batches: float noise at most
    stats = again.stats()
    assert (stats["cache_healed"], stats["cache_salvaged"]) == (1, N - len(lost))
    healed = {key: value for key, (value, _) in cached_rows(cache).items()}
    assert set(healed) == set(rows) and all(
        healed[k] == rows[k] for k in set(rows) - lost
    )  # salvaged verbatim
    assert heal_lines(capfd.readouterr().err, path) == []  # said once


def test_a_file_cut_short_keeps_the_rows_before_the_cut(tiny, tmp_path, capfd):
    cache = tmp_path / "cache"
    path = cache / DB_NAME
    _, rows = filled(tiny, cache)
    data = path.read_bytes()
    size, leaves = page_size(data), table_leaves(data)
    cut_page = leaves[len(leaves) * 2 // 3]
    whole_before = set().union(*(keys_on(data, p, rows) for p in leaves if p < cut_page))
    path.write_bytes(data[: cut_page * size + size // 3])  # a copy that stopped inside a table page
    capfd.readouterr()

    store = ResponseStore(cache)
    found = store.get_many(list(rows))
    (line,) = heal_lines(capfd.readouterr().err, path)
    assert "is damaged" in line and asides(cache)[0].read_bytes() == data[: cut_page * size + size // 3]
    # every row of a page wholly before the cut comes back, byte for byte; nothing comes back changed
    assert whole_before <= set(found) < set(rows)
    assert all(json.dumps(found[k]) == rows[k] for k in found)
    assert (store.healed, store.salvaged) == (1, len(found))


def test_a_garbled_answer_is_found_by_the_read_that_meets_it(tiny, tmp_path, capfd):
    cache = tmp_path / "cache"
    path = cache / DB_NAME
    answers, rows = filled(tiny, cache)
    victim = sorted(rows)[N // 2]
    written = cached_rows(cache)[victim][1]
    garble_answer(path, victim)
    # the b-tree is intact: only reading the answer shows the damage (it used to fail decoding it, a
    # traceback)
    assert sqlite3.connect(path).execute("PRAGMA quick_check").fetchone()[0] == "ok"
    capfd.readouterr()

    again = CachedLLM(CountingLLM(tiny), cache)
    assert heal_lines(capfd.readouterr().err, path) == []  # opened without a word: nothing seen yet
    got = again.rating_probs(groups())
    (line,) = heal_lines(capfd.readouterr().err, path)
    assert "a stored answer does not decode" in line and "1 damaged row left behind" in line
    assert len(asides(cache)) == 1
    assert (again.hits, again.misses, again.store.salvaged) == (N - 1, 1, N - 1)
    assert_same_answers(got, answers, atol=1e-6)
    stored = cached_rows(cache)
    assert (
        len(stored) == N and stored[victim][1] > written
    )  # the garbled one was called again and stored anew


def test_a_write_that_meets_damage_heals_and_is_written(tiny, tmp_path, capfd):
    cache = tmp_path / "cache"
    path = cache / DB_NAME
    _, rows = filled(tiny, cache)
    cached = CachedLLM(CountingLLM(tiny), cache)  # open, checked, intact
    data = path.read_bytes()
    with sqlite3.connect(path) as conn:  # new rows go after the highest rowid, into its page
        (newest,) = conn.execute("SELECT key FROM responses ORDER BY rowid DESC LIMIT 1").fetchone()
    (last_leaf,) = [p for p in table_leaves(data) if newest in keys_on(data, p, rows)]
    lost = keys_on(data, last_leaf, rows)
    overwrite_page(path, last_leaf)
    # Another connection commits, as another run writing would: this run's connection then drops the pages it
    # had read on open and reads the file again (without it, its page cache would hide the damage).
    with sqlite3.connect(path) as other:
        other.execute("PRAGMA user_version=1")
    capfd.readouterr()

    new = cached.rating_probs(
        groups(8, first=N)
    )  # new keys: not in the index, so only the write meets the page
    (line,) = heal_lines(capfd.readouterr().err, path)
    assert "database disk image is malformed" in line and len(asides(cache)) == 1
    assert (cached.hits, cached.misses, cached.store.healed, cached.store.salvaged) == (
        0,
        8,
        1,
        N - len(lost),
    )
    stored = cached_rows(cache)
    assert len(stored) == N - len(lost) + 8
    fresh = CachedLLM(CountingLLM(tiny), cache).rating_probs(groups(8, first=N))
    assert_same_answers(fresh, new)  # the answers of the write that met the damage were written


def test_a_store_opened_before_another_healed_goes_on_in_the_fresh_file(tiny, tmp_path, capfd):
    """Two stores on one cache in one run (a stage's frozen and updater models): the one that did not heal still
    holds a connection to the file that was moved aside, and must not write the run's answers into it."""
    cache = tmp_path / "cache"
    path = cache / DB_NAME
    _, rows = filled(tiny, cache)
    victim = sorted(rows)[N // 2]
    garble_answer(path, victim)  # unseen on open: both stores open it
    first, second = ResponseStore(cache), ResponseStore(cache)
    assert len(first.get_many(list(rows))) == N - 1 and first.healed == 1  # the first heals
    second.put_many([("written-after", "generate", {"text": "kept", "stopped_at_limit": False})])
    assert second.get_many(list(rows) + ["written-after"]).keys() == set(rows) - {victim} | {"written-after"}
    assert "written-after" in cached_rows(cache) and second.healed == 0
    assert len(heal_lines(capfd.readouterr().err, path)) == 1


KILLED_RUN = """
import os, sys
from deeper.llm import load_llm
from deeper.llm.cache import CachedLLM
from tests.test_cache_heal import groups
cached = CachedLLM(load_llm({"backend": "transformers", "name": sys.argv[1], "batch_size": 8}), sys.argv[2])
cached.rating_probs(groups(int(sys.argv[3]), first=int(sys.argv[4])))
os._exit(0)  # as if killed: no close, so the answers stay in the WAL, not yet copied into the file
"""


def test_answers_still_in_the_wal_move_aside_with_the_file_and_are_salvaged(tiny, tiny_llama, tmp_path):
    cache = tmp_path / "cache"
    path = cache / DB_NAME
    _, rows = filled(tiny, cache)
    data = path.read_bytes()
    victim = table_leaves(data)[len(table_leaves(data)) // 2]
    lost = keys_on(data, victim, rows)
    subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(tiny_llama), str(cache), "20", str(N)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    assert Path(f"{path}-wal").stat().st_size > 0 and path.read_bytes() == data  # 20 answers in the WAL alone
    overwrite_page(path, victim)

    store = ResponseStore(cache)
    (aside,) = asides(cache)
    assert Path(
        f"{aside}-wal"
    ).exists()  # moved with its file: a fresh file never meets the damaged one's WAL
    assert store.salvaged == N + 20 - len(lost)
    new_keys = set(cached_rows(cache)) - set(rows)
    assert len(new_keys) == 20 and len(cached_rows(cache)) == N + 20 - len(lost)
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_an_error_that_is_not_damage_is_one_line_and_moves_nothing(tmp_path):
    (tmp_path / DB_NAME).mkdir()  # sqlite cannot open it: not a damaged file, nothing to move aside
    with pytest.raises(DeeperError) as error:
        ResponseStore(tmp_path)
    assert str(error.value).startswith(f"response cache {tmp_path / DB_NAME}: ") and "\n" not in str(
        error.value
    )
    assert (tmp_path / DB_NAME).is_dir() and asides(tmp_path) == []


# --- a stage over a damaged cache
# ------------------------------------------------------------------------------

USERS = 48


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory):
    """Weights drawn wide, so that every user's prompt gets its own persona (an answer stored for another user
    or lost and made differently would change the bytes)."""
    return make_tiny_llama(tmp_path_factory.mktemp("sharp-llama"), initializer_range=0.3)


def run_init_personas(tmp_path, params, windows, cache: Path, tag: str, monkeypatch):
    monkeypatch.setenv("DEEPER_RESPONSE_CACHE", str(cache))
    out, metrics = tmp_path / tag / "init.parquet", tmp_path / tag / "personas.json"
    from stages.init_personas import main

    result = CliRunner().invoke(
        main, ["--params", params, "--windows", str(windows), "--out", str(out), "--metrics", str(metrics)]
    )
    assert result.exit_code == 0, result.output
    return result.output, out.read_bytes(), metrics.read_bytes()


def test_a_stage_over_a_damaged_cache_writes_what_it_writes_over_an_intact_one(
    sharp_llama, tmp_path, monkeypatch
):
    params = write_params(
        tmp_path, sharp_llama, max_new_tokens=64, temperature=1.0, seed=7, retries=0, min_words=0
    )
    windows = tmp_path / "windows.parquet"
    windows_frame(USERS).to_parquet(windows, index=False)
    intact, damaged = tmp_path / "intact", tmp_path / "damaged"
    _, *first = run_init_personas(tmp_path, params, windows, intact, "first", monkeypatch)
    with sqlite3.connect(intact / DB_NAME) as conn:  # the file alone holds every answer, as after a run ends
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    damaged.mkdir()
    (damaged / DB_NAME).write_bytes((intact / DB_NAME).read_bytes())
    data = (damaged / DB_NAME).read_bytes()
    rows = cached_rows(intact)
    leaves = [p for p in table_leaves(data) if keys_on(data, p, rows)]
    assert len(leaves) >= 3
    lost = keys_on(data, leaves[len(leaves) // 2], rows)
    overwrite_page(damaged / DB_NAME, leaves[len(leaves) // 2])

    output, *over_intact = run_init_personas(tmp_path, params, windows, intact, "intact", monkeypatch)
    assert stage_calls(output, "frozen")["cache_misses"] == 0
    output, *over_damaged = run_init_personas(tmp_path, params, windows, damaged, "damaged", monkeypatch)

    assert over_damaged == over_intact == first  # init.parquet and personas.json, byte for byte
    (line,) = heal_lines(output, damaged / DB_NAME)
    assert "is damaged" in line and len(asides(damaged)) == 1
    calls = stage_calls(output, "frozen")
    assert (calls["cache_healed"], calls["cache_salvaged"]) == (1, len(rows) - len(lost))
    assert (calls["cache_misses"], calls["calls"]) == (len(lost), len(lost))


# --- two processes at once
# -------------------------------------------------------------------------------------

WORKER = """
import json, sys, time
from pathlib import Path
from deeper.llm.cache import ResponseStore
cache, name, signals = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[4])
keys = json.loads(Path(sys.argv[3]).read_text())
(signals / f"started-{name}").touch()
store = ResponseStore(cache)
(signals / f"opened-{name}").touch()
while not (signals / "go").exists():
    time.sleep(0.01)
found = store.get_many(keys)
store.put_many([(f"{name}-{i}", "generate", {"text": f"{name} {i}", "stopped_at_limit": False}) for i in range(5)])
print(json.dumps({"found": sorted(found), "healed": store.healed, "salvaged": store.salvaged}))
"""


def wait_for(*paths: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"waited in vain for {paths}"
        time.sleep(0.02)


@pytest.mark.parametrize("found_by", ["open", "read"])
def test_two_processes_meeting_the_damage_at_once_move_it_once(tiny, tmp_path, found_by):
    """`open`: a damaged page; both open at the same moment, the first finds the damage and heals it before the
    second may open (the lock is held from open to heal), so the second opens the fresh file and has nothing to
    say. `read`: a garbled answer, which both open without seeing and then both read, so that both meet the
    damage and ask to heal at once. The test holds the cache's lock until both wait for it, so that neither can
    go ahead of the other."""
    cache, signals = tmp_path / "cache", tmp_path / "signals"
    signals.mkdir()
    path = cache / DB_NAME
    _, rows = filled(tiny, cache)
    data = path.read_bytes()
    if found_by == "open":
        victim = table_leaves(data)[len(table_leaves(data)) // 2]
        lost = keys_on(data, victim, rows)
        overwrite_page(path, victim)
    else:
        lost = {sorted(rows)[N // 2]}
        garble_answer(path, *lost)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(sorted(rows)))
    lock = FileLock(str(path) + ".lock")
    if found_by == "open":
        lock.acquire()  # both processes will open together, when it is released
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(cache), name, str(keys), str(signals)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    try:
        if found_by == "open":
            wait_for(signals / "started-a", signals / "started-b")
            time.sleep(1.5)  # both are now in ResponseStore(), waiting for the lock to open
            assert asides(cache) == [] and not list(
                signals.glob("opened-*")
            )  # none opens while the lock is held
            (signals / "go").touch()
            lock.release()
        else:
            wait_for(signals / "opened-a", signals / "opened-b")
            lock.acquire()
            (signals / "go").touch()
            time.sleep(1.5)  # both read the garbled answer (milliseconds) and now wait for the lock to heal
            assert asides(cache) == []  # none moves the file while the lock is held
            lock.release()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        if lock.is_locked:
            lock.release()
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs  # both finish
    reports = [json.loads(out) for out, _ in outs]
    lines = [heal_lines(err, path) for _, err in outs]

    assert len(asides(cache)) == 1  # moved once
    moved = [r for r, ls in zip(reports, lines) if any("moved it aside to" in line for line in ls)]
    assert len(moved) == 1 and moved[0]["salvaged"] == N - len(lost)
    if found_by == "read":  # both met it: one moved it, the other says it went on with the fresh file
        assert sorted(len(ls) for ls in lines) == [1, 1] and [r["healed"] for r in reports] == [1, 1]
        assert sum("another run already moved it aside" in ls[0] for ls in lines) == 1
    else:  # the second opened after the heal: a sound file, nothing to say
        assert sorted(len(ls) for ls in lines) == [0, 1] and sorted(r["healed"] for r in reports) == [0, 1]
    for report in reports:
        assert report["found"] == sorted(set(rows) - lost)
    final = cached_rows(cache)
    assert len(final) == N - len(lost) + 10
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone() == ("ok",)
