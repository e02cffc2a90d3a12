"""How every stage loads a model: the backend a params block names (deeper.llm.load_llm) behind the response
cache (deeper.llm.cache.CachedLLM). A module of its own because it sits above both."""

from __future__ import annotations

from pathlib import Path

from deeper.llm import load_llm
from deeper.llm.cache import CachedLLM


def load_cached(spec: dict, adapter: str | Path | None = None, where: str = "model") -> CachedLLM:
    """The model of params block `spec` (+ a LoRA adapter folder) behind the response cache: a killed run
    resumes, a re-run pays nothing for what it already asked. `where` names the block in error messages."""
    return CachedLLM(load_llm(spec, adapter=adapter, where=where))
