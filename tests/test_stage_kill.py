"""A stage killed by SIGKILL under `dvc repro` resumes without redoing a finished model call, and writes the
bytes an uninterrupted run writes.

Two scratch repos run the real init_personas stage (dvc.yaml's definition, copied code) on the tiny Llama,
sampled (temperature 1, seeded), each repo with its own response cache. batch_size 1 makes every backend
call its own cache chunk, committed as it returns: a finished call is a committed row. In the first repo,
dvc and the stage (one process group) are killed once a few rows are committed, and a second `dvc repro`
finishes the stage; the second repo runs it once, uninterrupted. The tiny Llama's weights are drawn wider
than the `tiny_llama` fixture's, so that every user's prompt gets its own persona (an answer stored for the
wrong user would change the bytes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pandas as pd
import pytest

from tests.stage_runs import DVC, cached_rows, dvc, dvc_env, dvc_run, pipeline_repo, stage_calls
from tests.test_init_personas import MOVIES
from tests.tiny import make_tiny_llama

pytestmark = pytest.mark.skipif(DVC is None, reason="dvc is not installed")

USERS = 40
KILL_AFTER = 3  # committed chunks (= users) before the kill: the stage has ~37 calls left to make
OUTPUTS = ["data/personas/init.parquet", "metrics/personas.json", "dvc.lock"]


def windows_frame(users: int) -> pd.DataFrame:
    """`users` users with two windows of four movies each, every W_0 (so every prompt) its own."""
    rows = []
    for u in range(users):
        for window in range(2):
            for pos in range(4):
                title = (
                    f"Film no. {u}" if window == pos == 0 else MOVIES[(u + window * 4 + pos) % len(MOVIES)]
                )
                rows.append(
                    {
                        "domain": "movielens",
                        "item_type": "movie",
                        "seen": True,
                        "user_id": f"u{u:02d}",
                        "split": "eval" if u % 4 == 0 else "train",
                        "window": window,
                        "pos": pos,
                        "item_id": f"m{u}-{window}-{pos}",
                        "title": title,
                        "rating": float(1 + (u + pos) % 5),
                    }
                )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("sharp-llama"), initializer_range=0.3)


def make_repo(path, model_dir):
    model = {
        "backend": "transformers",
        "name": "models/embedded/tiny-llama",
        "adapter": None,
        "batch_size": 1,
        "device": "cpu",
        "dtype": "float32",
    }
    persona = {
        "temperature": 1.0,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
        "max_new_tokens": 32,
        "seed": 7,
        "retries": 0,
        "min_words": 0,
        "tokenizer": "models/embedded/tiny-llama",
    }
    repo = pipeline_repo(
        path,
        ["init_personas"],
        {"models.frozen": model, "models.policy": model, "persona": persona},
        {"tiny-llama": model_dir},
    )
    (repo / "data" / "window").mkdir(parents=True)
    windows_frame(USERS).to_parquet(repo / "data" / "window" / "windows.parquet", index=False)
    return repo


def kill_after_commits(repo, env, cache, commits: int) -> int:
    """Start `dvc repro` in its own process group; SIGKILL the group (dvc and the stage) as soon as the
    response cache holds `commits` rows. The number of rows committed when it died."""
    log_path = repo.parent / f"{repo.name}-killed.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [DVC, "repro"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 300
        while proc.poll() is None and len(cached_rows(cache)) < commits and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"not killed: the stage ended first\n{log_path.read_text()}"
    return len(cached_rows(cache))


def test_a_killed_stage_resumes_without_repeating_a_finished_call(tmp_path, sharp_llama):
    killed, whole = make_repo(tmp_path / "killed", sharp_llama), make_repo(tmp_path / "whole", sharp_llama)
    killed_cache, whole_cache = tmp_path / "cache-killed", tmp_path / "cache-whole"
    killed_env = dvc_env(DEEPER_RESPONSE_CACHE=str(killed_cache))

    done = kill_after_commits(killed, killed_env, killed_cache, KILL_AFTER)
    assert KILL_AFTER <= done < USERS, f"the kill came after {done} of {USERS} calls"
    assert not (killed / "data" / "personas" / "init.parquet").exists() and not (killed / "dvc.lock").exists()
    before = cached_rows(killed_cache)

    resumed = dvc_run("repro", cwd=killed, env=killed_env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    uninterrupted = dvc_run("repro", cwd=whole, env=dvc_env(DEEPER_RESPONSE_CACHE=str(whole_cache)))
    assert uninterrupted.returncode == 0, uninterrupted.stdout + uninterrupted.stderr

    # (a) The resumed run answered every call finished before the kill from the cache, and asked the backend
    # for the others only; the rows committed before the kill were neither asked for nor written again.
    calls = stage_calls(resumed.stdout + resumed.stderr, "frozen")
    assert (calls["cache_hits"], calls["cache_misses"], calls["calls"]) == (done, USERS - done, USERS - done)
    after = cached_rows(killed_cache)
    assert len(after) == USERS and {key: after[key] for key in before} == before
    calls = stage_calls(uninterrupted.stdout + uninterrupted.stderr, "frozen")
    assert (calls["cache_hits"], calls["cache_misses"], calls["calls"]) == (0, USERS, USERS)

    # (b) The same bytes as the uninterrupted run: personas, metrics, and dvc.lock (so the same output hashes).
    for name in OUTPUTS:
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    personas = pd.read_parquet(killed / "data" / "personas" / "init.parquet")["persona"]
    assert len(personas) == USERS and personas.nunique() == USERS  # sampled texts, one per user's own prompt
    assert "up to date" in dvc("status", cwd=killed, env=killed_env).lower()
