"""The response cache: hits skip the backend, keys separate what could differ, several processes, resume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from deeper.llm import load_llm
from deeper.llm.base import Generation, RatingGroup, Sampling, limit_counts
from deeper.llm.cache import CachedLLM, ResponseStore, default_cache_dir, generate_key, rating_key

REPO = Path(__file__).resolve().parents[1]
SAMPLING = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=0)


def chat(i: int) -> list[dict]:
    return [
        {"role": "system", "content": "Persona: a curious reader."},
        {"role": "user", "content": f"Rate item {i}"},
    ]


class CountingLLM:
    """Delegates to a real backend; records what reached it and can slow each call down (for the kill test)."""

    def __init__(self, llm, delay: float = 0.0):
        self.llm, self.delay = llm, delay
        self.backend, self.fingerprint, self.batch_size = llm.backend, llm.fingerprint, llm.batch_size
        self.counters, self.asked = llm.counters, []

    def generate(self, chats, n, sampling):
        self.asked.append(("generate", len(chats), n, sampling.seed))
        time.sleep(self.delay)
        return self.llm.generate(chats, n, sampling)

    def rating_probs(self, groups):
        self.asked.append(("rating", [len(g.chats) for g in groups]))
        return self.llm.rating_probs(groups)


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_llm({"backend": "transformers", "name": str(tiny_llama), "batch_size": 4})


def test_hits_skip_the_backend(tiny, tmp_path):
    first = CachedLLM(CountingLLM(tiny), tmp_path)
    chats = [chat(i) for i in range(5)]
    groups = [RatingGroup(chats[:3]), RatingGroup(chats[3:])]
    texts = first.generate(chats, 2, SAMPLING)
    probs = first.rating_probs(groups)
    assert first.misses == 10 + 5 and first.hits == 0
    again = CachedLLM(CountingLLM(tiny), tmp_path)  # a new process would see the same
    assert again.generate(chats, 2, SAMPLING) == texts
    cached = again.rating_probs(groups)
    assert again.llm.asked == [] and again.hits == 15 and again.misses == 0
    for a, b in zip(probs, cached):
        np.testing.assert_array_equal(a.probs, b.probs)  # JSON keeps float64 exactly
        np.testing.assert_array_equal(a.digit_mass, b.digit_mass)
    assert again.stats()["cache_hits"] == 15


def test_only_missing_samples_and_items_reach_the_backend(tiny, tmp_path):
    cached = CachedLLM(CountingLLM(tiny), tmp_path)
    chats = [chat(i) for i in range(3)]
    one = cached.generate(chats[:2], 1, SAMPLING)  # sample 0 of chats 0, 1
    cached.llm.asked.clear()
    three = cached.generate(chats, 3, SAMPLING)
    # chat 2 had nothing: one call for its 3 samples; chats 0, 1 need samples 1 and 2: seeds 1 and 2 alone.
    assert sorted(cached.llm.asked) == [("generate", 1, 3, 0), ("generate", 2, 1, 1), ("generate", 2, 1, 2)]
    assert [row[0] for row in three[:2]] == [row[0] for row in one]
    assert three == tiny.generate(chats, 3, SAMPLING)  # the same as one uncached call
    cached.llm.asked.clear()
    group = RatingGroup(chats)
    cached.rating_probs([RatingGroup(chats[1:2])])
    cached.llm.asked.clear()
    full = cached.rating_probs([group])[0]
    assert cached.llm.asked == [("rating", [2])]
    np.testing.assert_allclose(full.probs, tiny.rating_probs([group])[0].probs, atol=1e-4)


def test_the_stopped_at_limit_flag_is_stored_with_the_text(tiny, tmp_path):
    """Each answer comes back from the cache with the flag the backend gave it; an entry stored before the flag
    existed is a miss (generated again and replaced), never an answer without its flag."""

    class OddSeedsUnfinished(CountingLLM):
        """The real texts; the flag set from the sample's seed, so both values go through the store."""

        def generate(self, chats, n, sampling):
            return [
                [Generation(t, stopped_at_limit=(sampling.seed + k) % 2 == 1) for k, t in enumerate(row)]
                for row in super().generate(chats, n, sampling)
            ]

    chats = [chat(i) for i in range(3)]
    first = CachedLLM(OddSeedsUnfinished(tiny), tmp_path)
    cut = first.generate(chats, 2, SAMPLING)
    assert [[t.stopped_at_limit for t in row] for row in cut] == [[False, True]] * 3
    again = CachedLLM(CountingLLM(tiny), tmp_path)
    assert [[(t, t.stopped_at_limit) for t in row] for row in again.generate(chats, 2, SAMPLING)] == [
        [(t, t.stopped_at_limit) for t in row] for row in cut
    ] and again.llm.asked == []

    store = ResponseStore(tmp_path)
    old_key = generate_key(again, chats[0], SAMPLING, 1)
    store.put_many([(old_key, "generate", {"text": "written by an older version"})])
    refreshed = again.generate(chats, 2, SAMPLING)
    assert again.llm.asked == [("generate", 1, 1, 1)] and refreshed == cut
    # the plain backend's own flag now: six new tokens, the tiny random model never ends that soon
    assert refreshed[0][1].stopped_at_limit
    assert store.get_many([old_key])[old_key] == {"text": str(cut[0][1]), "stopped_at_limit": True}


def test_a_backend_answer_without_the_flag_is_refused(tiny, tmp_path):
    class PlainText(CountingLLM):
        def generate(self, chats, n, sampling):
            return [[str(t) for t in row] for row in super().generate(chats, n, sampling)]

    with pytest.raises(TypeError, match="Generation"):
        CachedLLM(PlainText(tiny), tmp_path).generate([chat(0)], 1, SAMPLING)


def test_limit_counts_are_the_two_metric_keys():
    answers = [
        Generation("a", stopped_at_limit=True),
        Generation("b", stopped_at_limit=False),
        Generation("c", stopped_at_limit=False),
    ]
    assert limit_counts(iter(answers)) == {"stopped_at_limit": 1, "stopped_at_limit_share": 1 / 3}
    assert limit_counts([]) == {"stopped_at_limit": 0, "stopped_at_limit_share": None}
    with pytest.raises(TypeError, match="Generation"):
        limit_counts(["plain"])


def test_keys_separate_everything_that_changes_outputs():
    base = SimpleNamespace(backend="transformers", fingerprint="sha256:w")
    key = generate_key(base, chat(0), SAMPLING, 0)
    assert generate_key(base, chat(0), SAMPLING, 0) == key
    others = [
        generate_key(base, chat(1), SAMPLING, 0),
        generate_key(base, chat(0), Sampling(temperature=0.5, top_p=0.9, max_new_tokens=6), 0),
        generate_key(base, chat(0), Sampling(temperature=1.0, top_p=0.9, max_new_tokens=7), 0),
        generate_key(
            base, chat(0), Sampling(temperature=1.0, top_p=0.9, max_new_tokens=6, repetition_penalty=1.1), 0
        ),
        generate_key(base, chat(0), Sampling(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=5), 0),
        generate_key(base, chat(0), SAMPLING, 1),
        generate_key(
            SimpleNamespace(backend="transformers", fingerprint="sha256:w;adapter=sha256:a"),
            chat(0),
            SAMPLING,
            0,
        ),
        generate_key(SimpleNamespace(backend="vllm", fingerprint="sha256:w"), chat(0), SAMPLING, 0),
        rating_key(base, chat(0), "Rating: "),
    ]
    assert len({key, *others}) == len(others) + 1
    assert rating_key(base, chat(0), "Rating: ") != rating_key(base, chat(0), "Score: ")
    # sample k of seed s is the sample of seed s + k: the same call, the same key
    assert generate_key(base, chat(0), SAMPLING, 2) == generate_key(
        base, chat(0), Sampling(1.0, 0.9, 1.0, 6, 2), 0
    )


def test_cache_location_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPER_RESPONSE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("DEEPER_CACHE_DIR", str(tmp_path / "b"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("DEEPER_RESPONSE_CACHE")
    assert default_cache_dir() == tmp_path / "b" / "responses"
    monkeypatch.delenv("DEEPER_CACHE_DIR")
    monkeypatch.chdir(tmp_path)
    assert default_cache_dir() == tmp_path / ".cache" / "deeper" / "responses"


WRITER = """
import sys, time
from deeper.llm.cache import ResponseStore
while time.time() < float(sys.argv[3]):  # both open the new cache at the same moment
    pass
store = ResponseStore(sys.argv[1])
name = sys.argv[2]
for start in range(0, 300, 10):
    rows = [(f"{name}-{i}", "generate", {"text": f"{name} {i}"}) for i in range(start, start + 10)]
    rows += [(f"shared-{start // 10}", "generate", {"text": "same"})]
    store.put_many(rows)
print(len(store))
"""


def test_two_processes_write_at_once(tmp_path):
    start = time.time() + 3  # after both have imported deeper
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), name, str(start)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    store = ResponseStore(tmp_path)
    assert len(store) == 630
    found = store.get_many([f"{n}-{i}" for n in "ab" for i in range(300)])
    assert found["b-299"] == {"text": "b 299"} and len(found) == 600


def test_opening_waits_while_another_process_holds_a_new_cache(tmp_path):
    # A new cache file (sqlite's default rollback journal) on which another connection holds a write lock, as
    # the other of two stages opening a new cache at the same moment does while it switches to WAL: sqlite
    # refuses our switch at once ("database is locked", its busy timeout not consulted; CI failed on it).
    # Opening must wait for the lock to go.
    other = sqlite3.connect(tmp_path / "responses.sqlite3", isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE held (x)")
    other.execute("BEGIN IMMEDIATE")  # a write lock until COMMIT
    release = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    release.start()
    started = time.monotonic()
    store = ResponseStore(tmp_path)
    waited = time.monotonic() - started
    release.join()
    assert waited >= 0.4  # it waited for the lock, it did not open around it
    assert store._connect().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.put_many([("k", "generate", {"text": "x"})])
    assert store.get_many(["k"]) == {"k": {"text": "x"}}
    other.close()


def resumable_stage(llm, cache_dir, n_chats: int, delay: float) -> dict:
    """The stage of the kill test: many generate calls through CachedLLM; reports what reached the backend."""
    cached = CachedLLM(CountingLLM(llm, delay), cache_dir)
    texts = cached.generate([chat(i) for i in range(n_chats)], 2, SAMPLING)
    return {"calls": llm.counters.calls, "hits": cached.hits, "misses": cached.misses, "texts": texts}


def run_worker(model_dir: str, cache_dir: str, n_chats: str, delay: str) -> None:
    llm = load_llm({"backend": "transformers", "name": model_dir, "batch_size": 4})
    print(json.dumps(resumable_stage(llm, cache_dir, int(n_chats), float(delay))))


def test_killed_run_resumes_with_only_the_missing_calls(tiny, tiny_llama, tmp_path):
    n_chats, total = 30, 60  # 2 samples each; chunks of 2 chats (4 sequences), each committed on return
    store = ResponseStore(tmp_path)
    code = "import sys; from tests.test_llm_cache import run_worker; run_worker(*sys.argv[1:])"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tiny_llama), str(tmp_path), str(n_chats), "0.15"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while len(store) < 8:
        assert proc.poll() is None, "the worker finished before it could be killed"
        assert time.monotonic() < deadline, "the worker committed nothing in time"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(store)
    assert 8 <= committed < total and committed % 4 == 0  # whole chunks only
    # The re-run (a fresh backend, so its counters start at 0) asks the backend only for what is missing.
    fresh = load_llm({"backend": "transformers", "name": str(tiny_llama), "batch_size": 4})
    report = resumable_stage(fresh, tmp_path, n_chats, 0.0)
    assert report["calls"] == total - committed
    assert report["hits"] == committed and report["misses"] == total - committed
    assert len(store) == total
    assert report["texts"] == tiny.generate([chat(i) for i in range(n_chats)], 2, SAMPLING)
