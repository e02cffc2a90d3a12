"""The `transformers` backend: a local HF folder, a GGUF file or a hub id, optionally with a peft adapter.

Generation: left-padded batches of `batch_size` sequences. Sampling draws each sequence's tokens with its own
seeded generator (Gumbel-max over the temperature/top-p filtered logits), so sample k of a chat depends only
on the chat and `seed + k`, never on which other chats share the batch (the cache may fetch any sample alone).

Rating: the chats of one RatingGroup share the persona prefix. Their prompts are tokenised, the longest
common token prefix is run once, and all items' suffixes are scored in one forward against its KV cache
(`score_prefix_reuse`). The last prefix's KV cache is kept (`PrefixMemo`), so consecutive groups with the same
persona (a candidate's previous, current and next window) encode it once. `score_naive` runs the full prompts as a left-padded batch; it is the reference
(tests, bench) and the path for single-item groups.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from deeper.errors import ConfigError, DeeperError
from deeper.llm.base import Chat, Counters, Generation, RatingGroup, RatingResult, Sampling
from deeper.llm.fingerprint import combine, resolve_adapter, resolve_model
from deeper.llm.scoring import DigitTokens, render_prompt, result_from_logits

DTYPES = ("float32", "bfloat16", "float16", "auto")


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all prompts."""
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    for i in range(shortest):
        token = first[i]
        if any(p[i] != token for p in prompts):
            return i
    return shortest


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int):
    """Token id lists -> (input_ids, attention_mask), both (n, longest), padded on the left."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask


def score_naive(model, prompts: Sequence[Sequence[int]], pad_id: int, batch_size: int):
    """Next-token logits (n, vocab) after each full prompt: left-padded batches, one forward each."""
    import torch

    device = model.device
    out = []
    for chunk in _batches(list(prompts), batch_size):
        input_ids, mask = left_padded(chunk, pad_id)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=False,
            logits_to_keep=1,
        ).logits[:, -1]
        out.append(logits.float())
    return torch.cat(out)


def packing_supported(model) -> bool:
    """Whether a custom 4D attention mask is honoured as is: sdpa/eager attention, no sliding window."""
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    sliding = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True) is not False
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager") and not sliding


class PrefixMemo:
    """The KV cache of the last scored prefix. Never mutated: every use scores against a deep copy."""

    def __init__(self) -> None:
        self.tokens: tuple[int, ...] = ()
        self.cache: Any = None  # the model's past_key_values for self.tokens
        self.hits = 0

    def get(self, model, tokens: Sequence[int]):
        import torch

        tokens = tuple(tokens)
        if tokens == self.tokens and self.cache is not None:
            self.hits += 1
            return self.cache
        prefix = torch.tensor([list(tokens)], device=model.device)
        self.cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
        self.tokens = tokens
        return self.cache


def score_prefix_reuse(
    model,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    method: str = "auto",
    memo: PrefixMemo | None = None,
):
    """Same result as `score_naive`, computing the shared token prefix once.

    The prefix runs once; its KV cache then serves every batch of suffixes, in one of two ways:
    - "packed": the batch's suffixes are concatenated into one sequence after the prefix, with a 4D mask that
      lets each token see the prefix and the earlier tokens of its own suffix, and positions that restart
      after the prefix for each suffix. No padding, and the cache is not copied per item.
    - "batched": the cache is copied to a batch of right-padded suffixes (real tokens never see padding), the
      attention mask covers prefix + suffix, and positions continue after the prefix. For attention kernels
      that take no custom mask (flash attention) or models with sliding windows.
    Either way each item's logits are read at its own last real token. With a `memo`, a prefix equal to the
    previous call's is not run again.
    """
    import torch

    prefix_len = min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1)
    if len(prompts) == 1 or prefix_len < 1:
        return score_naive(model, prompts, pad_id, batch_size)
    if method == "auto":
        method = "packed" if packing_supported(model) else "batched"
    score_suffixes = {"packed": _score_packed, "batched": _score_batched}[method]
    prefix_cache = (memo or PrefixMemo()).get(model, prompts[0][:prefix_len])
    out = []
    for chunk in _batches([p[prefix_len:] for p in prompts], batch_size):
        cache = copy.deepcopy(prefix_cache)  # each forward appends to the cache it is given
        out.append(score_suffixes(model, cache, prefix_len, chunk, pad_id).float())
    return torch.cat(out)


def _score_packed(model, cache, prefix_len: int, suffixes, pad_id: int):
    import torch

    device = model.device
    lengths = torch.tensor([len(s) for s in suffixes])
    segment = torch.repeat_interleave(torch.arange(len(suffixes)), lengths)
    offset = torch.cat([torch.arange(n) for n in lengths.tolist()])
    total = int(lengths.sum())
    own_past = (segment[:, None] == segment[None, :]) & (offset[None, :] <= offset[:, None])
    allowed = torch.cat([torch.ones(total, prefix_len, dtype=torch.bool), own_past], dim=1)[None, None]
    if model.config._attn_implementation == "eager":  # eager attention adds the mask to the scores
        allowed = torch.zeros(allowed.shape, dtype=model.dtype).masked_fill(
            ~allowed, torch.finfo(model.dtype).min
        )
    input_ids = torch.tensor([[t for s in suffixes for t in s]])
    last = lengths.cumsum(0) - 1  # (n_items,): each suffix's last token in the packed sequence
    # logits_to_keep as a 1D tensor of positions (the documented form; transformers 5.19 indexes a 2D one
    # into an extra dimension)
    return model(
        input_ids=input_ids.to(device),
        attention_mask=allowed.to(device),
        position_ids=(prefix_len + offset)[None].to(device),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=last.to(device),
    ).logits[0]


def _score_batched(model, cache, prefix_len: int, suffixes, pad_id: int):
    import torch

    device = model.device
    rows, width = len(suffixes), max(len(s) for s in suffixes)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, prefix_len + width), dtype=torch.long)
    mask[:, :prefix_len] = 1
    for row, ids in enumerate(suffixes):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, prefix_len : prefix_len + len(ids)] = 1
    position_ids = torch.arange(prefix_len, prefix_len + width).expand(rows, width)
    last = torch.tensor([len(s) - 1 for s in suffixes])
    # logits_to_keep keeps the same positions in every row (a 1D tensor): keep each row's last position, then
    # pick that row's own
    keep, which = torch.unique(last, sorted=True, return_inverse=True)
    cache.batch_repeat_interleave(rows)
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=position_ids.to(device),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=keep.to(device),
    ).logits
    return logits[torch.arange(rows), which.to(logits.device)]


class SeededSampler:
    """A logits processor that samples each row with its own torch.Generator (Gumbel-max trick).

    Used with greedy decoding: argmax(log p / T + Gumbel noise) is a draw from softmax(log p / T) after top-p
    filtering. One generator per row, seeded with that row's seed, makes each row reproducible on its own.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        import torch
        from transformers import LogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(float(temperature))]
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(float(top_p)))

    def __call__(self, input_ids, scores):
        import torch

        for warper in self.warpers:
            scores = warper(input_ids, scores)
        scores = scores.float()
        # Every row's generator draws a uniform for each vocabulary entry at every step, so a row's draws depend
        # on its seed alone. The noise is needed only where top-p left a finite score (argmax never picks -inf;
        # top-p 0.4 keeps a few dozen of ~49k entries), so its two logs run on those entries only.
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        kept = torch.isfinite(scores)
        noisy = torch.full_like(scores, float("-inf"))
        noisy[kept] = scores[kept] - torch.log(
            -torch.log(uniform.to(scores.device)[kept].clamp(min=1e-20, max=1.0 - 1e-7))
        )
        return noisy


class TransformersLLM(DigitTokens):
    backend = "transformers"

    def __init__(
        self,
        name: str,
        adapter: str | None = None,
        batch_size: int = 16,
        device: str = "cpu",
        dtype: str = "float32",
        revision: str | None = None,
        where: str = "model",
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise ConfigError(f"{where}.dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        source = resolve_model(name, revision, f"{where}.name")
        self.fingerprint = combine(
            source.fingerprint, resolve_adapter(adapter, f"{where}.adapter"), dtype=dtype
        )
        self.name, self.adapter, self.batch_size, self.device = name, adapter, int(batch_size), device
        self.counters = Counters()
        self.show_progress = True
        load = {"gguf_file": source.gguf_file, "revision": source.revision}
        load = {k: v for k, v in load.items() if v is not None}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source.location, **load)
            model = AutoModelForCausalLM.from_pretrained(
                source.location, dtype=dtype if dtype == "auto" else getattr(torch, dtype), **load
            )
        except (OSError, ValueError) as e:
            raise DeeperError(f"cannot load model {name}: {str(e).splitlines()[0]}") from None
        if adapter:
            from peft import PeftModel

            # Inference only: merging the LoRA weights into the base removes the adapter's extra matmuls on
            # every linear layer (bench/adapter_merge.py: generation 1.22x, rating 1.13x faster on SmolLM2, same
            # greedy tokens; the fingerprint still names the adapter).
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        self.model = model.to(device).eval()  # type: ignore[arg-type]  # its @wraps(Module.to) drops self
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = self.tokenizer.pad_token_id
        eos = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        eos.update(configured if isinstance(configured, list) else [configured])
        self.eos_ids = sorted(i for i in eos if i is not None)
        self.prefix_memo = PrefixMemo()

    # --- prompts ---------------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def rating_prompt_ids(self, group: RatingGroup) -> list[list[int]]:
        return self.encode([render_prompt(self.tokenizer, chat, group.prefill) for chat in group.chats])

    # --- the interface ---------------------------------------------------------------------------------

    def generate(self, chats: list[Chat], n: int, sampling: Sampling) -> list[list[Generation]]:
        import torch

        prompts = self.encode([render_prompt(self.tokenizer, chat) for chat in chats])
        greedy = sampling.temperature == 0
        # One row per (chat, sample); greedy samples are all the same, so one row per chat.
        rows = [(c, k) for c in range(len(chats)) for k in range(1 if greedy else n)]
        rows.sort(key=lambda r: len(prompts[r[0]]))  # similar lengths together: less padding
        texts: dict[tuple[int, int], Generation] = {}
        eos, not_text = torch.tensor(self.eos_ids), torch.tensor([self.pad_id, *self.eos_ids])
        batches = list(_batches(rows, self.batch_size))
        for batch in tqdm(
            batches,
            desc="generate",
            unit="batch",
            leave=False,
            disable=not self.show_progress or len(batches) < 2,
        ):
            input_ids, mask = left_padded([prompts[c] for c, _ in batch], self.pad_id)
            width = input_ids.shape[1]
            processors = (
                []
                if greedy
                else [
                    SeededSampler([sampling.seed + k for _, k in batch], sampling.temperature, sampling.top_p)
                ]
            )
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    generation_config=self._generation_config(sampling),
                    logits_processor=processors,
                )
            new = out[:, width:].cpu()
            for (c, k), tokens in zip(batch, new):
                real = tokens[~torch.isin(tokens, not_text)]
                # generate() ends a row at an end token (then pads) or at max_new_tokens: no end token = the limit
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                assert isinstance(text, str)  # one row of tokens decodes to one string
                texts[(c, k)] = Generation(text, stopped_at_limit=not bool(torch.isin(tokens, eos).any()))
                self.counters.add(calls=1, prompt_tokens=len(prompts[c]), completion_tokens=len(real))
        return [[texts[(c, 0 if greedy else k)] for k in range(n)] for c in range(len(chats))]

    def _generation_config(self, sampling: Sampling):
        from transformers import GenerationConfig

        return GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=sampling.max_new_tokens,
            repetition_penalty=sampling.repetition_penalty,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )

    def rating_logits(self, group: RatingGroup, prefix_reuse: bool | str = True):
        """Next-token logits (n_items, vocab) after each item's prefilled prompt.

        prefix_reuse: True (the best way for this model), "packed" or "batched" (see score_prefix_reuse),
        or False (the naive full-prompt batch).
        """
        import torch

        prompts = self.rating_prompt_ids(group)
        with torch.inference_mode():
            if prefix_reuse:
                method = prefix_reuse if isinstance(prefix_reuse, str) else "auto"
                logits = score_prefix_reuse(
                    self.model, prompts, self.pad_id, self.batch_size, method, memo=self.prefix_memo
                )
            else:
                logits = score_naive(self.model, prompts, self.pad_id, self.batch_size)
        self.counters.add(calls=len(prompts), prompt_tokens=sum(len(p) for p in prompts))
        return logits

    def rating_probs(self, groups: list[RatingGroup], prefix_reuse: bool | str = True) -> list[RatingResult]:
        results = []
        total = sum(len(g.chats) for g in groups)
        with tqdm(
            total=total,
            desc="rate",
            unit="item",
            leave=False,
            disable=not self.show_progress or len(groups) < 2,
        ) as bar:
            for group in groups:
                if not group.chats:
                    results.append(RatingResult(np.zeros((0, 5)), np.zeros(0), np.zeros(0, dtype=bool)))
                    continue
                results.append(result_from_logits(self.rating_logits(group, prefix_reuse), self.digit_ids))
                bar.update(len(group.chats))
        return results
