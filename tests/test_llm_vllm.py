"""The vllm backend's pure parts, everywhere (the real engine: tests/test_vllm_engine.py, in the vLLM venv)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from deeper.errors import ConfigError, DeeperError
from deeper.llm import check_spec, load_llm
from deeper.llm.base import Sampling
from deeper.llm.scoring import digit_token_ids, render_prompt, result_from_digit_logprobs
from deeper.llm.vllm_backend import (
    cpu_environment,
    engine_dtype,
    engine_kwargs,
    rating_params_kwargs,
    sampling_params_kwargs,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
CHAT = [
    {"role": "system", "content": "Persona: likes dramas."},
    {"role": "user", "content": "Rate Fargo (1996)."},
]


def test_sampling_params_per_sample_seed():
    sampling = Sampling(temperature=0.8, top_p=0.4, repetition_penalty=1.1, max_new_tokens=64, seed=10)
    assert sampling_params_kwargs(sampling, 3) == {
        "n": 1,
        "seed": 13,
        "temperature": 0.8,
        "top_p": 0.4,
        "repetition_penalty": 1.1,
        "max_tokens": 64,
    }


def test_rating_asks_for_every_digit_token(tiny_llama):
    from transformers import AutoTokenizer

    digit_ids = digit_token_ids(AutoTokenizer.from_pretrained(tiny_llama))
    rating = rating_params_kwargs([[7, 3], [9], [4], [5], [6]])
    assert rating == {"n": 1, "temperature": 0.0, "max_tokens": 1, "logprob_token_ids": [3, 4, 5, 6, 7, 9]}
    assert len(rating_params_kwargs(digit_ids)["logprob_token_ids"]) == sum(len(ids) for ids in digit_ids)


def test_engine_kwargs_enable_lora_only_with_an_adapter_or_when_asked():
    plain = engine_kwargs("m", None, 16, 0.8, "auto", None, None)
    assert plain["enable_prefix_caching"] is True and plain["enable_lora"] is False
    assert not {"max_lora_rank", "max_model_len", "enable_chunked_prefill", "kv_cache_memory_bytes"} & set(
        plain
    )
    tuned = engine_kwargs("m", "/a", 16, 0.8, "bfloat16", 4096, "v1")
    assert tuned["enable_lora"] is True and tuned["max_lora_rank"] == 16
    assert tuned["max_model_len"] == 4096 and tuned["revision"] == "v1" and tuned["dtype"] == "bfloat16"
    shared = engine_kwargs("m", None, 8, 0.8, "auto", None, None, enable_lora=True)
    assert shared["enable_lora"] is True and shared["max_lora_rank"] == 8


def test_engine_kwargs_scale_out_and_cpu_settings():
    gpus = engine_kwargs(
        "m", None, tensor_parallel_size=4, data_parallel_size=2, kv_cache_gib=3, block_size=32
    )
    assert (gpus["tensor_parallel_size"], gpus["data_parallel_size"]) == (4, 2)
    assert gpus["kv_cache_memory_bytes"] == 3 * 2**30 and gpus["block_size"] == 32
    assert "enable_chunked_prefill" not in gpus  # a GPU keeps vLLM's default
    # seeded requests crash the CPU engine when a prompt is split over steps: chunked prefill off there
    assert engine_kwargs("m", None, on_cpu=True)["enable_chunked_prefill"] is False
    assert (
        engine_kwargs("m", None, on_cpu=True, enable_chunked_prefill=True)["enable_chunked_prefill"] is True
    )
    assert engine_kwargs("m", None, enforce_eager=True)["enforce_eager"] is True
    assert cpu_environment(2, "0-1") == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    assert cpu_environment(None, None) == {}


def test_auto_dtype_keeps_a_float32_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert engine_dtype("auto", str(tmp_path)) == "float32"
    assert engine_kwargs(str(tmp_path), None)["dtype"] == "float32"
    assert engine_dtype("bfloat16", str(tmp_path)) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert engine_dtype("auto", str(tmp_path)) == "auto"
    assert engine_dtype("auto", "org/hub-model") == "auto"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("tensor_parallel_size", 0, "models.policy.tensor_parallel_size: must be >= 1, got 0"),
        ("data_parallel_size", 1.5, "models.policy.data_parallel_size: must be an integer, got 1.5"),
        ("max_model_len", "4k", "models.policy.max_model_len: must be a number, got '4k'"),
        ("kv_cache_gib", 0, "models.policy.kv_cache_gib: must be >= 1, got 0"),
        ("block_size", -16, "models.policy.block_size: must be >= 1, got -16"),
        ("gpu_memory_utilization", 1.5, "models.policy.gpu_memory_utilization: must be <= 1, got 1.5"),
        ("dtype", "fp8", "models.policy.dtype: 'fp8' is not one of auto, float32, bfloat16, float16"),
        ("enable_lora", "yes", "models.policy.enable_lora: must be true, false or null, got 'yes'"),
        (
            "cpu_threads_bind",
            "",
            "models.policy.cpu_threads_bind: must be a core list such as 0-1 or auto, got ''",
        ),
    ],
)
def test_check_spec_refuses_bad_scale_out_values_in_one_line(key, value, message):
    block = {"backend": "vllm", "name": "meta-llama/Llama-3.1-8B-Instruct", key: value}
    with pytest.raises(ConfigError) as err:
        check_spec(block, where="models.policy")
    assert str(err.value) == f"params.yaml: {message}"


def test_check_spec_accepts_the_scale_out_keys_and_refuses_lora_off_with_an_adapter():
    block = {
        "backend": "vllm",
        "name": "m",
        "tensor_parallel_size": 8,
        "data_parallel_size": 2,
        "max_model_len": 8192,
        "gpu_memory_utilization": 0.9,
        "kv_cache_gib": 40,
        "block_size": 16,
    }
    check_spec(block, where="models.policy")
    with pytest.raises(
        ConfigError, match=r"^params.yaml: models.policy.enable_lora: is false, but an adapter"
    ):
        check_spec({**block, "enable_lora": False}, adapter="/a", where="models.policy")


def test_prompt_text_opens_the_answer_with_the_prefill(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    text = render_prompt(tokenizer, CHAT, "Rating: ")
    assert text.startswith("<|im_start|>system\nPersona: likes dramas.<|im_end|>\n")
    assert text.endswith("<|im_start|>user\nRate Fargo (1996).<|im_end|>\n<|im_start|>assistant\nRating: ")
    # a chat that already ends with the assistant's words is continued, not answered anew
    continued = render_prompt(tokenizer, [*CHAT, {"role": "assistant", "content": "I would say"}])
    assert continued.endswith("<|im_start|>assistant\nI would say")


def test_digit_logprobs_by_token_id_to_rating():
    digit_ids = [[10, 11], [12], [13], [14, 15], [16]]
    row = {
        11: np.log(0.1),
        13: np.log(0.2),
        15: np.log(0.3),
        14: np.log(0.2),
        99: np.log(0.2),
    }  # 99: not a digit
    result = result_from_digit_logprobs([row, {12: -np.inf}], digit_ids)
    np.testing.assert_allclose(result.probs[0], [0.125, 0, 0.25, 0.625, 0], atol=1e-12)
    assert result.digit_mass[0] == pytest.approx(0.8)
    np.testing.assert_allclose(result.probs[1], [0.2] * 5)  # no mass on any digit: uniform, mass 0
    assert result.digit_mass[1] == 0


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_missing_vllm_is_one_line_error(tiny_llama):
    with pytest.raises(DeeperError) as err:
        load_llm({"backend": "vllm", "name": str(tiny_llama)}, where="models.policy")
    assert "pip install -e '.[vllm]'" in str(err.value) and "\n" not in str(err.value)
