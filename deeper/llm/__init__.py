"""LLM backends behind one interface (deeper.llm.base); `load_llm(spec)` builds one from a params block.

    models.frozen: {backend: transformers, name: models/embedded/smollm2-135m, batch_size: 16, device: cpu, dtype: float32}
    {backend: openai, name: gpt-4o-mini, base_url: ..., api_key_env: OPENAI_API_KEY, concurrency: 8, timeout: 60,
     max_retries: 5, prefill: assistant}
    {backend: vllm, name: meta-llama/Llama-3.1-8B-Instruct, max_lora_rank: 16, gpu_memory_utilization: 0.85,
     tensor_parallel_size: 1, data_parallel_size: 1, max_model_len: 4096, kv_cache_gib: null}
    {backend: tastes, name: transparent}   (the diagnostic world's rule-based predictor, deeper/diagnostic.py)

Wrap the result in `deeper.llm.cache.CachedLLM` for the response cache.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import TYPE_CHECKING

from deeper.errors import ConfigError
from deeper.llm.base import LLM, RATINGS, Chat, Counters, RatingGroup, RatingResult, Sampling
from deeper.llm.fingerprint import EMBEDDED_PREFIX

if TYPE_CHECKING:
    from deeper.params import NumberRule

# backend name -> (module, class); each class's keyword arguments are the params keys it accepts.
BACKENDS = {
    "transformers": ("deeper.llm.transformers_backend", "TransformersLLM"),
    "openai": ("deeper.llm.openai_backend", "OpenAILLM"),
    "vllm": ("deeper.llm.vllm_backend", "VLLMLLM"),
    # the diagnostic world's transparent frozen model (deeper/diagnostic.py): a test of the trainer, no weights
    "tastes": ("deeper.llm.tastes_backend", "TastesLLM"),
}
_NOT_PARAMS = {"self", "name", "adapter", "where"}
# Numeric keys of the backends' params blocks and their ranges (deeper.params.number), whichever backend has them.
NUMBER_RULES: dict[str, NumberRule] = {
    "batch_size": {"integer": True, "low": 1, "nullable": True},
    "concurrency": {"integer": True, "low": 1},
    "timeout": {"low": 0.0, "low_open": True},
    "max_retries": {"integer": True, "low": 0},
    "retry_base_delay": {"low": 0.0},
    "retry_max_delay": {"low": 0.0},
    "max_lora_rank": {"integer": True, "low": 1},
    "gpu_memory_utilization": {"low": 0.0, "low_open": True, "high": 1.0},
    "max_model_len": {"integer": True, "low": 1, "nullable": True},
    "tensor_parallel_size": {"integer": True, "low": 1},
    "data_parallel_size": {"integer": True, "low": 1},
    "kv_cache_gib": {"integer": True, "low": 1, "nullable": True},
    "block_size": {"integer": True, "low": 1, "nullable": True},
    "batch_poll_s": {"low": 0.0},
    "batch_wait_s": {"low": 0.0},
    "batch_max_rounds": {"integer": True, "low": 1},
    "batch_max_requests": {"integer": True, "low": 1, "high": 50_000},  # OpenAI's limit per batch
}


def backend_class(backend: str, where: str = "model"):
    if backend not in BACKENDS:
        raise ConfigError(f"{where}.backend", f"{backend!r} is not one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[backend]
    return getattr(importlib.import_module(module), cls)


def spec_keys(backend: str) -> list[str]:
    """The params keys a backend accepts besides backend, name and adapter."""
    return [p for p in inspect.signature(backend_class(backend)).parameters if p not in _NOT_PARAMS]


def check_spec(spec: dict, adapter: str | Path | None = None, where: str = "model") -> tuple[type[LLM], dict]:
    """load_llm's checks without building anything (no model, GPU, server or key needed): the backend class
    and its keyword arguments. Unknown backends, unknown or missing keys and values a backend's own
    `check_settings` refuses are one-line ConfigErrors."""
    if not isinstance(spec, dict):
        raise ConfigError(where, "must be a mapping with at least `backend` and `name`")
    spec = dict(spec)
    backend = spec.pop("backend", None)
    if backend is None:
        raise ConfigError(f"{where}.backend", f"missing; one of {', '.join(BACKENDS)}")
    cls = backend_class(backend, where)
    name = spec.pop("name", None)
    if not name or not isinstance(name, str):
        raise ConfigError(f"{where}.name", "missing: a model folder, hub id or served model name")
    if name.startswith(EMBEDDED_PREFIX):  # known before anything is fetched
        from deeper.assets import names

        llms = [n for n in names("model") if n not in names("embedder")]
        if backend == "openai" or name[len(EMBEDDED_PREFIX) :] not in llms:
            raise ConfigError(
                f"{where}.name",
                f"{name!r}: the embedded models a local backend can load are "
                + ", ".join(EMBEDDED_PREFIX + n for n in llms),
            )
    block_adapter = spec.pop("adapter", None)
    adapter = adapter if adapter is not None else block_adapter
    allowed = spec_keys(backend)
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}", f"unknown key for backend {backend}; known: {', '.join(allowed)}"
        )
    from deeper.params import number

    for key, value in spec.items():
        if key in NUMBER_RULES:
            spec[key] = number(value, f"{where}.{key}", **NUMBER_RULES[key])
    kwargs = {"name": name, "adapter": str(adapter) if adapter is not None else None, "where": where, **spec}
    check_settings = getattr(cls, "check_settings", None)  # a backend's own checks of what is not a number
    if check_settings is not None:
        defaults = {
            k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty
        }
        check_settings({**defaults, **kwargs}, where)
    return cls, kwargs


def load_llm(spec: dict, adapter: str | Path | None = None, where: str = "model") -> LLM:
    """Build the backend a params block names. `adapter` (a peft folder) overrides the block's `adapter`.

    `where` names the block in error messages (e.g. "models.frozen"). Unknown backends, unknown or missing
    keys, a missing model folder or key: one-line ConfigError / DeeperError.
    """
    cls, kwargs = check_spec(spec, adapter, where)
    return cls(**kwargs)


__all__ = [
    "BACKENDS",
    "LLM",
    "RATINGS",
    "Chat",
    "Counters",
    "RatingGroup",
    "RatingResult",
    "Sampling",
    "check_spec",
    "load_llm",
]
