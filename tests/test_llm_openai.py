"""The openai backend through the real `openai` client against a local OpenAI-compatible server (127.0.0.1)."""

from __future__ import annotations

import numpy as np
import pytest

from deeper.errors import ConfigError, DeeperError
from deeper.llm import load_llm
from deeper.llm.base import RatingGroup, Sampling
from deeper.llm.cache import CachedLLM
from tests.openai_fake_server import FakeOpenAIServer, expected_probs, generated_text

KEY = "sk-test-4f2c9e-DO-NOT-STORE"
CHATS = [
    [{"role": "system", "content": "persona text"}, {"role": "user", "content": f"Rate item {i}"}]
    for i in range(4)
]


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("DEEPER_TEST_KEY", KEY)
    return "DEEPER_TEST_KEY"


def make_llm(server, key_env, **overrides):
    spec = {
        "backend": "openai",
        "name": "fake-model",
        "base_url": server.base_url,
        "api_key_env": key_env,
        "concurrency": 2,
        "timeout": 5,
        "max_retries": 3,
        "retry_base_delay": 0.01,
        "retry_max_delay": 0.05,
    }
    return load_llm({**spec, **overrides})


def with_prefill(chat, prefill="Rating: "):
    return [*chat, {"role": "assistant", "content": prefill}]


def test_generate_sends_one_request_per_sample_with_its_seed(key_env):
    with FakeOpenAIServer() as server:
        llm = make_llm(server, key_env)
        sampling = Sampling(temperature=0.7, top_p=0.4, repetition_penalty=1.1, max_new_tokens=12, seed=10)
        out = llm.generate(CHATS[:2], 3, sampling)
    assert out == [[generated_text(chat, 10 + k, 0.7) for k in range(3)] for chat in CHATS[:2]]
    bodies = [r["body"] for r in server.requests]
    assert len(bodies) == 6 and sorted(b["seed"] for b in bodies) == [10, 10, 11, 11, 12, 12]
    assert all(b["max_tokens"] == 12 and b["top_p"] == 0.4 and b["repetition_penalty"] == 1.1 for b in bodies)
    assert all(b["model"] == "fake-model" for b in bodies)
    assert llm.counters.calls == 6 and llm.counters.retries == 0


def test_finish_reason_length_marks_a_generation_stopped_at_the_limit(key_env):
    with FakeOpenAIServer() as server:
        llm = make_llm(server, key_env)
        ((whole,),) = llm.generate(CHATS[:1], 1, Sampling(max_new_tokens=12, seed=0))
        ((cut,),) = llm.generate(CHATS[:1], 1, Sampling(max_new_tokens=3, seed=0))
    assert whole == generated_text(CHATS[0], 0, 1.0) and not whole.stopped_at_limit
    assert cut == " ".join(whole.split(" ")[:3]) and cut.stopped_at_limit


def test_rating_reads_digits_from_top_logprobs(key_env):
    with FakeOpenAIServer() as server:
        llm = make_llm(server, key_env)
        result = llm.rating_probs([RatingGroup(CHATS[:3]), RatingGroup(CHATS[3:])])
    assert [r.probs.shape for r in result] == [(3, 5), (1, 5)]
    flat = np.vstack([r.probs for r in result])
    for chat, probs, mass in zip(CHATS, flat, np.concatenate([r.digit_mass for r in result])):
        want, want_mass = expected_probs(with_prefill(chat))  # " 4" counts for 4
        np.testing.assert_allclose(probs, want, atol=1e-9)
        assert mass == pytest.approx(want_mass)
    body = server.requests[0]["body"]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["messages"][-1] == {"role": "assistant", "content": "Rating: "}


def test_prefill_none_sends_the_chat_as_is(key_env):
    with FakeOpenAIServer() as server:
        llm = make_llm(server, key_env, prefill="none")
        result = llm.rating_probs([RatingGroup(CHATS[:1])])[0]
    assert server.requests[0]["body"]["messages"] == CHATS[0]
    np.testing.assert_allclose(result.probs[0], expected_probs(CHATS[0])[0], atol=1e-9)


def test_rating_extra_body_goes_with_ratings_only(key_env):
    """A vLLM server continues the prefilled answer only when told so; a generation must not be told."""
    flags = {"continue_final_message": True, "add_generation_prompt": False}
    with FakeOpenAIServer() as server:
        llm = make_llm(server, key_env, extra_body={"top_k": 5}, rating_extra_body=flags)
        llm.generate(CHATS[:1], 1, Sampling(max_new_tokens=4))
        llm.rating_probs([RatingGroup(CHATS[:1])])
    generation, rating = (r["body"] for r in server.requests)
    assert generation["top_k"] == 5 and not set(flags) & set(generation)
    assert rating["top_k"] == 5 and {k: rating[k] for k in flags} == flags
    assert llm.fingerprint != make_llm(server, key_env, extra_body={"top_k": 5}).fingerprint


@pytest.mark.parametrize("fault", ["429", "500", "sleep:3"])
def test_transient_fault_is_retried_then_succeeds(key_env, fault):
    with FakeOpenAIServer(faults=[fault]) as server:
        llm = make_llm(server, key_env, timeout=1.0, concurrency=1)
        out = llm.generate(CHATS[:1], 1, Sampling(seed=3))
    assert out == [[generated_text(CHATS[0], 3, 1.0)]]
    assert len(server.requests) == 2 and server.requests[0]["fault"] == fault
    assert llm.counters.retries == 1 and llm.counters.calls == 1


@pytest.mark.parametrize("fault", ["nojson", "nochoices", "nologprobs"])
def test_malformed_reply_is_retried_then_a_counted_failure_with_fallback(key_env, fault):
    with FakeOpenAIServer(faults=[fault] * 4) as server:  # max_retries 3: four malformed replies in a row
        llm = make_llm(server, key_env, concurrency=1)
        result = llm.rating_probs([RatingGroup(CHATS[:2])])[0]
    assert result.failed.tolist() == [True, False]
    np.testing.assert_allclose(result.probs[0], [0.2] * 5)  # the stated fallback: uniform, no digit mass
    assert result.digit_mass[0] == 0.0 and not np.isnan(result.probs).any()
    np.testing.assert_allclose(result.probs[1], expected_probs(with_prefill(CHATS[1]))[0], atol=1e-9)
    assert llm.counters.failures == 1 and llm.counters.retries == 3


def test_malformed_reply_then_success_is_no_failure(key_env):
    with FakeOpenAIServer(faults=["nologprobs"]) as server:
        llm = make_llm(server, key_env, concurrency=1)
        result = llm.rating_probs([RatingGroup(CHATS[:1])])[0]
    assert not result.failed.any() and llm.counters.failures == 0 and llm.counters.retries == 1


def test_retries_exhausted_is_one_line_error(key_env):
    with FakeOpenAIServer(faults=["500"] * 4) as server:
        llm = make_llm(server, key_env, concurrency=1)
        with pytest.raises(DeeperError) as err:
            llm.generate(CHATS[:1], 1, Sampling())
    text = str(err.value)
    assert "gave up after 4 tries: HTTP 500" in text and "\n" not in text and KEY not in text
    assert len(server.requests) == 4


def test_client_error_is_not_retried(key_env):
    with FakeOpenAIServer() as server:
        llm = make_llm(server, key_env, base_url=server.base_url.replace("/v1", "/wrong"))
        with pytest.raises(DeeperError, match="404"):
            llm.generate(CHATS[:1], 1, Sampling())
    assert len(server.requests) == 1


def test_concurrency_bound_is_respected(key_env):
    # The server holds the first 3 requests until 3 are in flight: the bound, and no more, is reached.
    with FakeOpenAIServer(hold_first=3, delay=0.02) as server:
        llm = make_llm(server, key_env, concurrency=3)
        out = llm.generate(CHATS, 3, Sampling())
    assert len(server.requests) == 12 and all(len(row) == 3 for row in out)
    assert server.max_in_flight == 3


def test_key_goes_in_the_header_and_never_in_the_cache(key_env, tmp_path):
    with FakeOpenAIServer() as server:
        llm = CachedLLM(make_llm(server, key_env), tmp_path / "cache")
        llm.generate(CHATS[:2], 2, Sampling())
        llm.rating_probs([RatingGroup(CHATS)])
    assert {r["headers"]["authorization"] for r in server.requests} == {f"Bearer {KEY}"}
    assert KEY not in llm.fingerprint
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files and all(KEY.encode() not in p.read_bytes() for p in files)
    assert all(b"DO-NOT-STORE" not in p.read_bytes() for p in files)


def test_missing_key_is_a_config_error_except_on_loopback(monkeypatch):
    monkeypatch.delenv("DEEPER_ABSENT_KEY", raising=False)
    spec = {"backend": "openai", "name": "m", "api_key_env": "DEEPER_ABSENT_KEY"}
    with pytest.raises(ConfigError, match="DEEPER_ABSENT_KEY is not set"):
        load_llm({**spec, "base_url": "https://api.example.invalid/v1"})
    with FakeOpenAIServer() as server:
        llm = load_llm({**spec, "base_url": server.base_url})
        llm.generate(CHATS[:1], 1, Sampling())
    assert server.requests[0]["headers"]["authorization"] == "Bearer EMPTY"


def test_base_url_credentials_stay_out_of_the_fingerprint(key_env):
    llm = load_llm(
        {
            "backend": "openai",
            "name": "m",
            "base_url": "http://user:pw@127.0.0.1:9/v1",
            "api_key_env": key_env,
        }
    )
    assert "pw" not in llm.fingerprint and "127.0.0.1:9/v1" in llm.fingerprint


def test_a_reply_without_rating_digits_is_a_counted_failure_never_cached(key_env, tmp_path):
    """Top logprobs without a digit (the model said "Rating"): not a uniform "3" passed off as a prediction,
    but a failed row; the cache keeps nothing for it, so the next run asks again and gets the real answer."""
    with FakeOpenAIServer(faults=["nodigits"]) as server:
        cached = CachedLLM(make_llm(server, key_env, concurrency=1), tmp_path)
        first = cached.rating_probs([RatingGroup(CHATS[:2])])[0]
        assert first.failed.tolist() == [True, False]
        np.testing.assert_allclose(first.probs[0], [0.2] * 5)
        assert first.digit_mass[0] == 0.0
        assert cached.stats()["failed_ratings"] == 1
        again = cached.rating_probs([RatingGroup(CHATS[:2])])[0]
    assert len(server.requests) == 3  # the failed item was asked again; the good one came from the cache
    assert not again.failed.any()
    np.testing.assert_allclose(again.probs[0], expected_probs(with_prefill(CHATS[0]))[0], atol=1e-9)
