"""The Batch API for the openai backend (issue 21, item 4; deeper/llm/openai_batch.py) against the local fake
OpenAI server's /v1/files and /v1/batches (a real protocol fake: the `openai` client itself talks to it), with
its injected faults: a failed line, an expired batch, a refused input, a batch still running, and a stage
SIGKILLed while it polls. Answers land in the response cache under the same keys as live answers; nothing is
uploaded or paid twice; the key is never written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from deeper.config import load_params
from deeper.errors import DeeperError
from deeper.llm import load_llm
from deeper.llm.base import RatingGroup, Sampling
from deeper.llm.cache import CachedLLM
from deeper.llm.openai_batch import BatchPending, batch_dir
from tests.conftest import REPO
from tests.openai_fake_server import FakeOpenAIServer, expected_probs, generated_text
from tests.test_stage_kill import windows_frame

KEY = "sk-test-batch-7d1e-DO-NOT-STORE"
CHATS = [[{"role": "user", "content": f"Describe taste {i}"}] for i in range(6)]
SAMPLING = Sampling(temperature=0.7, top_p=0.9, repetition_penalty=1.0, max_new_tokens=50, seed=3)


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPER_TEST_KEY", KEY)
    monkeypatch.setenv("DEEPER_RESPONSE_CACHE", str(tmp_path / "responses"))
    return tmp_path


def make_llm(server, **overrides):
    spec = {
        "backend": "openai",
        "name": "fake-model",
        "base_url": server.base_url,
        "api_key_env": "DEEPER_TEST_KEY",
        "timeout": 5,
        "max_retries": 2,
        "retry_base_delay": 0.01,
        "retry_max_delay": 0.02,
        "batch": True,
        "batch_poll_s": 0.0,
        "batch_wait_s": 30.0,
    }
    llm = load_llm({**spec, **overrides})
    llm.show_progress = False
    return llm


def live_requests(server) -> int:
    return sum(r["path"].rstrip("/") == "/v1/chat/completions" for r in server.requests)


def expected(chat, k=0):
    return generated_text(chat, SAMPLING.seed + k, SAMPLING.temperature)


def test_a_batch_answers_as_live_calls_would_and_the_cache_keeps_them(env):
    with FakeOpenAIServer(batch_polls=3) as server:
        cached = CachedLLM(make_llm(server))
        out = cached.generate(CHATS, 2, SAMPLING)
        assert [[str(g) for g in row] for row in out] == [[expected(c, 0), expected(c, 1)] for c in CHATS]
        assert (server.uploads, server.batches_created, live_requests(server)) == (1, 1, 0)
        assert server.retrieves >= 3  # polled until it completed
        sent = [json.loads(line) for line in server.files["file-1"].decode().splitlines()]
        assert sent[0]["url"] == "/v1/chat/completions" and sent[0]["body"]["seed"] == SAMPLING.seed
        assert sent[1]["body"]["seed"] == SAMPLING.seed + 1 and sent[0]["body"]["model"] == "fake-model"
        assert cached.stats()["calls"] == 12 and cached.stats()["cache_misses"] == 12
        # the same calls again: the response cache answers, no batch is sent
        again = CachedLLM(make_llm(server)).generate(CHATS, 2, SAMPLING)
        assert again == out and server.batches_created == 1
        # a live backend with the same settings reads the batch's answers: the batch flag is not in the key
        live = CachedLLM(make_llm(server, batch=False))
        assert live.generate(CHATS, 2, SAMPLING) == out and live_requests(server) == 0
    assert list(batch_dir().glob("*.json")) == []  # collected: no state left behind


def test_more_requests_than_one_batch_holds_go_out_as_batches_submitted_together(env):
    with FakeOpenAIServer(batch_polls=2) as server:
        llm = make_llm(server, batch_max_requests=4, batch_wait_s=0.0)
        with pytest.raises(BatchPending) as caught:
            CachedLLM(llm).generate(CHATS, 1, SAMPLING)
        # both batches exist before either is waited on
        assert server.batches_created == 2
        assert [b["request_counts"]["total"] for b in server.batches.values()] == [4, 2]
        assert str(caught.value).startswith(
            "openai backend: 2 batches (batch_1, batch_2) of 6 requests is "
            "validating (0 done) after batch_wait_s=0 s;"
        )
        out = CachedLLM(make_llm(server, batch_max_requests=4)).generate(CHATS, 1, SAMPLING)
        assert [str(row[0]) for row in out] == [expected(c) for c in CHATS]
        assert (server.uploads, server.batches_created, live_requests(server)) == (2, 2, 0)


def test_ratings_through_a_batch(env):
    groups = [
        RatingGroup(chats=[[{"role": "user", "content": f"item {i}"}] for i in range(3)], prefill="Rating: ")
    ]
    with FakeOpenAIServer() as server:
        result = make_llm(server).rating_probs(groups)[0]
        for i, chat in enumerate(groups[0].chats):
            probs, _mass = expected_probs([*chat, {"role": "assistant", "content": "Rating: "}])
            np.testing.assert_allclose(result.probs[i], probs, atol=1e-9)
        assert not result.failed.any() and server.batches_created == 1


@pytest.mark.parametrize("fault, resent", [("fail_line", 1), ("expire", 3)])
def test_failed_and_expired_lines_are_sent_again_as_a_smaller_batch(env, fault, resent):
    with FakeOpenAIServer(batch_faults=[fault]) as server:
        llm = make_llm(server)
        out = llm.generate(CHATS, 1, SAMPLING)
        assert [str(row[0]) for row in out] == [expected(c) for c in CHATS]
        assert server.batches_created == 2
        second = server.batches["batch_2"]
        assert second["request_counts"]["total"] == resent
        assert llm.counters.retries == resent and live_requests(server) == 0


def test_lines_failing_in_every_batch_are_one_line_for_generations_and_a_fallback_for_ratings(env):
    with (
        FakeOpenAIServer(batch_faults=["fail_line"] * 2) as server,
        pytest.raises(DeeperError, match=r"1 of 6 batch requests still failed after 2 batches$"),
    ):
        make_llm(server, batch_max_rounds=2).generate(CHATS, 1, SAMPLING)
    groups = [
        RatingGroup(chats=[[{"role": "user", "content": f"item {i}"}] for i in range(3)], prefill="Rating: ")
    ]
    with FakeOpenAIServer(batch_faults=["fail_line"] * 2) as server:
        llm = make_llm(server, batch_max_rounds=2)
        result = llm.rating_probs(groups)[0]
        assert result.failed.tolist() == [True, False, False] and llm.counters.failures == 1
        np.testing.assert_allclose(result.probs[0], [0.2] * 5)


def test_a_refused_batch_is_one_line_with_its_first_error(env):
    with FakeOpenAIServer(batch_faults=["refuse"]) as server, pytest.raises(DeeperError) as caught:
        make_llm(server).generate(CHATS, 1, SAMPLING)
    assert str(caught.value) == (
        "openai backend: " + server.base_url + " model fake-model: batch batch_1 was "
        "refused: line 1 is not valid JSON"
    )


def test_a_batch_still_running_stops_with_one_line_and_the_next_run_collects_it(env):
    with FakeOpenAIServer(batch_polls=4) as server:
        with pytest.raises(BatchPending) as caught:
            CachedLLM(make_llm(server, batch_wait_s=0.0)).generate(CHATS, 1, SAMPLING)
        assert str(caught.value) == (
            "openai backend: batch batch_1 of 6 requests is validating (0 done) after batch_wait_s=0 s; run the "
            "stage again later (`dvc repro`): it picks the batch up, nothing is sent or paid twice"
        )
        state = list(batch_dir().glob("*.json"))
        assert len(state) == 1 and json.loads(state[0].read_text())["batch_id"] == "batch_1"
        assert KEY not in state[0].read_text()
        out = CachedLLM(make_llm(server)).generate(CHATS, 1, SAMPLING)
        assert [str(row[0]) for row in out] == [expected(c) for c in CHATS]
        assert (server.uploads, server.batches_created) == (1, 1)


def test_batch_must_be_true_or_false(env):
    with (
        FakeOpenAIServer() as server,
        pytest.raises(DeeperError, match=r"^params\.yaml: model\.batch: must be true or false, got 'yes'$"),
    ):
        make_llm(server, batch="yes")


# ------------------------------------------------------------------ a real stage killed while it polls


def stage_setup(server, batch: bool, tokenizer) -> dict:
    params = load_params(REPO / "params.yaml")
    params["models"]["frozen"] = {
        "backend": "openai",
        "name": "fake-model",
        "base_url": server.base_url,
        "api_key_env": "DEEPER_TEST_KEY",
        "timeout": 5,
        "max_retries": 1,
        "batch": batch,
        "batch_poll_s": 0.2,
        "batch_wait_s": 120.0,
    }
    params["persona"].update(retries=0, min_words=0, max_new_tokens=40, tokenizer=str(tokenizer))
    return params


def run_stage(tmp_path, name, params, cache):
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    windows_frame(6).to_parquet(folder / "windows.parquet", index=False)
    argv = [
        sys.executable,
        "-m",
        "stages.init_personas",
        "--params",
        str(folder / "params.yaml"),
        "--windows",
        str(folder / "windows.parquet"),
        "--out",
        str(folder / "init.parquet"),
        "--metrics",
        str(folder / "p.json"),
    ]
    run_env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DEEPER_RESPONSE_CACHE": str(cache),
        "DEEPER_TEST_KEY": KEY,
        "OMP_NUM_THREADS": "1",
    }
    return folder, argv, run_env


def test_a_stage_killed_while_it_polls_resumes_the_same_batch(tmp_path, tiny_llama):
    with FakeOpenAIServer(batch_polls=10_000) as server:  # never finishes until the test lets it
        params = stage_setup(server, batch=True, tokenizer=tiny_llama)
        folder, argv, run_env = run_stage(tmp_path, "batch", params, tmp_path / "cache")
        proc = subprocess.Popen(
            argv, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while server.retrieves < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.killpg(proc.pid, signal.SIGKILL)  # mid-poll: the batch was created and is being waited on
        proc.wait()
        assert (server.uploads, server.batches_created) == (1, 1)
        server.batch_polls = 1  # the batch finishes at the next retrieve
        done = subprocess.run(argv, env=run_env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert "batch: resuming batch_1 (6 requests, completed)" in done.stderr
        assert (server.uploads, server.batches_created, live_requests(server)) == (1, 1, 0)
        # the same personas a live run writes (a fresh cache, live calls)
        params["models"]["frozen"]["batch"] = False
        live_folder, live_argv, live_env = run_stage(tmp_path, "live", params, tmp_path / "live-cache")
        assert subprocess.run(live_argv, env=live_env, capture_output=True, check=False).returncode == 0
        assert live_requests(server) == 6
    batch_out = pd.read_parquet(folder / "init.parquet")
    live_out = pd.read_parquet(live_folder / "init.parquet")
    assert batch_out["persona"].tolist() == live_out["persona"].tolist()
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
