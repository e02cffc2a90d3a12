"""LLM backends behind one interface (deeper.llm.base); `load_llm(spec)` builds one from a params block.

    models.frozen: {backend: transformers, name: models/embedded/smollm2-135m, batch_size: 16, device: cpu, dtype: float32}
    {backend: openai, name: gpt-4o-mini, base_url: ..., api_key_env: OPENAI_API_KEY, concurrency: 8, timeout: 60,
     max_retries: 5, prefill: assistant}
    {backend: vllm, name: meta-llama/Llama-3.1-8B-Instruct, max_lora_rank: 16, gpu_memory_utilization: 0.85}

Wrap the result in `deeper.llm.cache.CachedLLM` for the response cache.
"""

from __future__ import annotations

import importlib
import inspect

from deeper.errors import ConfigError
from deeper.llm.base import LLM, RATINGS, Chat, Counters, RatingGroup, RatingResult, Sampling

# backend name -> (module, class); each class's keyword arguments are the params keys it accepts.
BACKENDS = {
    "transformers": ("deeper.llm.transformers_backend", "TransformersLLM"),
    "openai": ("deeper.llm.openai_backend", "OpenAILLM"),
    "vllm": ("deeper.llm.vllm_backend", "VLLMLLM"),
}
_NOT_PARAMS = {"self", "name", "adapter", "where"}


def backend_class(backend: str, where: str = "model"):
    if backend not in BACKENDS:
        raise ConfigError(f"{where}.backend", f"{backend!r} is not one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[backend]
    return getattr(importlib.import_module(module), cls)


def spec_keys(backend: str) -> list[str]:
    """The params keys a backend accepts besides backend, name and adapter."""
    return [p for p in inspect.signature(backend_class(backend)).parameters if p not in _NOT_PARAMS]


def check_spec(spec: dict, adapter: str | None = None, where: str = "model") -> tuple[type, dict]:
    """load_llm's checks without building anything (no model, GPU, server or key needed): the backend class
    and its keyword arguments. Unknown backends and unknown or missing keys are one-line ConfigErrors."""
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
    block_adapter = spec.pop("adapter", None)
    adapter = adapter if adapter is not None else block_adapter
    allowed = spec_keys(backend)
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown key for backend {backend}; known: {', '.join(allowed)}")
    return cls, {"name": name, "adapter": str(adapter) if adapter is not None else None, "where": where, **spec}


def load_llm(spec: dict, adapter: str | None = None, where: str = "model") -> LLM:
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
