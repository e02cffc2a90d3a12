"""The vllm backend: its pure parts everywhere; the engine itself only where vllm and a GPU are present."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest

from deeper.errors import DeeperError
from deeper.llm import load_llm
from deeper.llm.base import RatingGroup, Sampling
from deeper.llm.scoring import render_prompt, result_from_top_logprobs
from deeper.llm.vllm_backend import engine_kwargs, logprob_pairs, rating_params_kwargs, sampling_params_kwargs

HAS_VLLM = importlib.util.find_spec("vllm") is not None
CHAT = [{"role": "system", "content": "Persona: likes dramas."}, {"role": "user", "content": "Rate Fargo (1996)."}]


def test_sampling_params_per_sample_seed():
    sampling = Sampling(temperature=0.8, top_p=0.4, repetition_penalty=1.1, max_new_tokens=64, seed=10)
    assert sampling_params_kwargs(sampling, 3) == {
        "n": 1, "seed": 13, "temperature": 0.8, "top_p": 0.4, "repetition_penalty": 1.1, "max_tokens": 64,
    }
    rating = rating_params_kwargs()
    assert rating["max_tokens"] == 1 and rating["logprobs"] == 20


def test_engine_kwargs_enable_lora_only_with_an_adapter():
    plain = engine_kwargs("m", None, 16, 0.8, "auto", None, None)
    assert plain["enable_prefix_caching"] is True and plain["enable_lora"] is False
    assert "max_lora_rank" not in plain and "max_model_len" not in plain
    tuned = engine_kwargs("m", "/a", 16, 0.8, "bfloat16", 4096, "v1")
    assert tuned["enable_lora"] is True and tuned["max_lora_rank"] == 16
    assert tuned["max_model_len"] == 4096 and tuned["revision"] == "v1"


def test_prompt_text_opens_the_answer_with_the_prefill(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    text = render_prompt(tokenizer, CHAT, "Rating: ")
    assert text.startswith("<|im_start|>system\nPersona: likes dramas.<|im_end|>\n")
    assert text.endswith("<|im_start|>user\nRate Fargo (1996).<|im_end|>\n<|im_start|>assistant\nRating: ")
    # a chat that already ends with the assistant's words is continued, not answered anew
    continued = render_prompt(tokenizer, [*CHAT, {"role": "assistant", "content": "I would say"}])
    assert continued.endswith("<|im_start|>assistant\nI would say")


def test_logprob_pairs_to_rating(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    four = tokenizer.convert_tokens_to_ids("4")
    entries = {
        four: SimpleNamespace(logprob=np.log(0.5), decoded_token=None),  # decoded by the tokenizer
        1001: SimpleNamespace(logprob=np.log(0.2), decoded_token=" 4"),
        1002: SimpleNamespace(logprob=np.log(0.1), decoded_token="2"),
        1003: SimpleNamespace(logprob=np.log(0.2), decoded_token="Hello"),
    }
    result = result_from_top_logprobs([logprob_pairs(entries, tokenizer)])
    np.testing.assert_allclose(result.probs[0], [0, 0.125, 0, 0.875, 0], atol=1e-12)
    assert result.digit_mass[0] == pytest.approx(0.8)


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_missing_vllm_is_one_line_error(tiny_llama):
    with pytest.raises(DeeperError) as err:
        load_llm({"backend": "vllm", "name": str(tiny_llama)}, where="models.policy")
    assert "pip install 'deeper[vllm]'" in str(err.value) and "\n" not in str(err.value)


def _gpu() -> bool:
    import torch

    return HAS_VLLM and torch.cuda.is_available()


@pytest.mark.slow
@pytest.mark.skipif(not _gpu(), reason="needs vllm and a GPU")
def test_vllm_engine_on_the_embedded_model():
    from deeper.assets import ensure_embedded_model

    path = str(ensure_embedded_model("smollm2-135m"))
    llm = load_llm({"backend": "vllm", "name": path, "dtype": "float32", "gpu_memory_utilization": 0.3})
    sampling = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=4)
    out = llm.generate([CHAT], 2, sampling)
    assert out == llm.generate([CHAT], 2, sampling) and len(out[0]) == 2
    assert llm.generate([CHAT], 1, Sampling(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=5))[0][0] == out[0][1]
    group = RatingGroup([CHAT, [CHAT[0], {"role": "user", "content": "Rate Toy Story (1995)."}]])
    result = llm.rating_probs([group])[0]
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0)
    reference = load_llm({"backend": "transformers", "name": path, "device": "cuda"}).rating_probs([group])[0]
    np.testing.assert_allclose(result.probs, reference.probs, atol=2e-2)
