"""The `vllm` backend: offline batches on a GPU (vllm.LLM with prefix caching, LoRA via LoRARequest).

vllm is imported only when this backend is chosen (it is an optional extra: `pip install 'deeper[vllm]'`).
Each sample is its own request with n=1 and seed = sampling.seed + k, as in every backend (deeper.llm.base);
prefix caching makes the repeated prompt cheap. A rating is the logprobs (top 20) of one generated token
after the prefilled prompt; prompts are rendered with the model's chat template and passed as token ids,
so vLLM adds no second BOS. The parts that need no GPU are the pure functions below (tested everywhere).
"""

from __future__ import annotations

from deeper.errors import ConfigError, DeeperError
from deeper.llm.base import Chat, Counters, RatingGroup, RatingResult, Sampling
from deeper.llm.fingerprint import combine, resolve_adapter, resolve_model
from deeper.llm.scoring import render_prompt, result_from_top_logprobs

TOP_LOGPROBS = 20


def sampling_params_kwargs(sampling: Sampling, index: int) -> dict:
    """SamplingParams arguments for sample `index` of a generate call."""
    return {
        "n": 1, "seed": sampling.seed + index, "temperature": sampling.temperature, "top_p": sampling.top_p,
        "repetition_penalty": sampling.repetition_penalty, "max_tokens": sampling.max_new_tokens,
    }


def rating_params_kwargs() -> dict:
    """SamplingParams arguments for a rating: one token, its top-20 logprobs (raw, before temperature)."""
    return {"n": 1, "seed": 0, "temperature": 0.0, "max_tokens": 1, "logprobs": TOP_LOGPROBS}


def engine_kwargs(model: str, adapter: str | None, max_lora_rank: int, gpu_memory_utilization: float,
                  dtype: str, max_model_len: int | None, revision: str | None) -> dict:
    """vllm.LLM arguments: prefix caching always (the persona prefix repeats), LoRA only with an adapter."""
    kwargs = {
        "model": model, "enable_prefix_caching": True, "enable_lora": bool(adapter),
        "gpu_memory_utilization": gpu_memory_utilization, "dtype": dtype, "max_logprobs": TOP_LOGPROBS,
    }
    if adapter:
        kwargs["max_lora_rank"] = max_lora_rank
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    if revision:
        kwargs["revision"] = revision
    return kwargs


def logprob_pairs(position_logprobs: dict, tokenizer=None) -> list[tuple[str, float]]:
    """vLLM's {token_id: Logprob(logprob, rank, decoded_token)} for one position -> (token text, logprob)."""
    pairs = []
    for token_id, entry in position_logprobs.items():
        text = entry.decoded_token
        if text is None and tokenizer is not None:
            text = tokenizer.decode([token_id])
        pairs.append((text or "", entry.logprob))
    return pairs


class VLLMLLM:
    backend = "vllm"

    def __init__(
        self, name: str, adapter: str | None = None, max_lora_rank: int = 16, gpu_memory_utilization: float = 0.85,
        dtype: str = "auto", max_model_len: int | None = None, revision: str | None = None,
        batch_size: int = 256, where: str = "model",
    ):
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError:
            raise DeeperError(
                f"{where}.backend: vllm is not installed (it needs a GPU): pip install 'deeper[vllm]'"
            ) from None
        from transformers import AutoTokenizer

        source = resolve_model(name, revision, f"{where}.name")
        self.fingerprint = combine(source.fingerprint, resolve_adapter(adapter, f"{where}.adapter"), dtype=dtype)
        if source.gguf_file:
            raise ConfigError(f"{where}.name", "the vllm backend takes an HF folder or hub id, not a GGUF file")
        self.name, self.adapter, self.batch_size = name, adapter, int(batch_size)
        self.counters = Counters()
        self.show_progress = True
        self.tokenizer = AutoTokenizer.from_pretrained(source.location, revision=source.revision)
        self.engine = vllm.LLM(**engine_kwargs(
            source.location, adapter, max_lora_rank, gpu_memory_utilization, dtype, max_model_len, source.revision,
        ))
        self._params = vllm.SamplingParams
        self.lora = LoRARequest("adapter", 1, str(adapter)) if adapter else None

    def _prompt(self, chat: Chat, prefill: str | None = None) -> dict:
        text = render_prompt(self.tokenizer, chat, prefill)
        return {"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]}

    def _run(self, prompts: list[dict], params: list) -> list:
        outputs = self.engine.generate(prompts, params, lora_request=self.lora, use_tqdm=self.show_progress)
        self.counters.add(
            calls=len(outputs), prompt_tokens=sum(len(p["prompt_token_ids"]) for p in prompts),
            completion_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
        )
        return outputs

    def generate(self, chats: list[Chat], n: int, sampling: Sampling) -> list[list[str]]:
        prompts = [self._prompt(chat) for chat in chats]
        jobs = [(c, k) for c in range(len(chats)) for k in range(n)]
        outputs = self._run(
            [prompts[c] for c, _ in jobs], [self._params(**sampling_params_kwargs(sampling, k)) for _, k in jobs]
        )
        flat = [o.outputs[0].text for o in outputs]
        return [flat[c * n : (c + 1) * n] for c in range(len(chats))]

    def rating_probs(self, groups: list[RatingGroup]) -> list[RatingResult]:
        prompts = [self._prompt(chat, g.prefill) for g in groups for chat in g.chats]
        params = self._params(**rating_params_kwargs())
        outputs = self._run(prompts, [params] * len(prompts))
        rows = [logprob_pairs(o.outputs[0].logprobs[0], self.tokenizer) for o in outputs]
        results, start = [], 0
        for g in groups:
            results.append(result_from_top_logprobs(rows[start : start + len(g.chats)]))
            start += len(g.chats)
        return results
