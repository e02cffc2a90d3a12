"""Shared by the backends: the prompt text of a chat, and P(rating) from a next-token distribution.

The rating is read from the token that follows the prefilled assistant turn (e.g. "Rating: "). A tokenizer
may spell a digit several ways ("1", " 1", "▁1"); the probability of a rating is the sum over its spellings,
and the five sums are renormalised. `digit_mass` is the total before renormalising (how much the model
wanted to answer with a digit at all).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from deeper.errors import DeeperError
from deeper.llm.base import RATINGS, Chat, RatingResult

# Below this total probability on the digits 1-5 an answer is not a rating (SmolLM2 and Qwen put 0.3-1.0 there
# after "Rating: "; a model that ignored the prefill puts ~0, and top-20 logprobs without a digit give exactly 0).
MIN_DIGIT_MASS = 1e-4


def render_prompt(tokenizer, chat: Chat, prefill: str | None = None) -> str:
    """The model's chat template as text, opened for the assistant's answer, plus the prefill.

    A chat that already ends with an assistant message is continued rather than answered.
    transformers 5 returns a BatchEncoding unless tokenize=False, so the text is rendered here and
    tokenised by the caller (with add_special_tokens=False: the template already holds them).
    """
    continues = bool(chat) and chat[-1].get("role") == "assistant"
    text = tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=not continues, continue_final_message=continues
    )
    return text + (prefill or "")


def digit_token_ids(tokenizer) -> list[list[int]]:
    """For each rating "1".."5", the ids of the single tokens that decode to it, whitespace stripped."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab_size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(vocab_size)])
    ids: list[list[int]] = [[] for _ in RATINGS]
    for token_id, text in enumerate(texts):
        stripped = text.strip()
        if token_id not in special and stripped in RATINGS:
            ids[RATINGS.index(stripped)].append(token_id)
    missing = [d for d, found in zip(RATINGS, ids) if not found]
    if missing:
        raise ValueError(f"the tokenizer has no single token for the ratings {missing}")
    return ids


class DigitTokens:
    """For a backend with `tokenizer` and `name`: `digit_ids`, computed once; a tokenizer without single-token
    digits is a one-line DeeperError naming the model."""

    _digit_ids: list[list[int]] | None = None
    tokenizer: Any  # the backend's (set in its __init__)
    name: str

    @property
    def digit_ids(self) -> list[list[int]]:
        if self._digit_ids is None:
            try:
                self._digit_ids = digit_token_ids(self.tokenizer)
            except ValueError as e:
                raise DeeperError(f"model {self.name}: {e}") from None
        return self._digit_ids


def _result(digit_probs: np.ndarray) -> RatingResult:
    """(n, 5) unnormalised digit probabilities -> renormalised probs + digit mass. A row whose mass is below
    MIN_DIGIT_MASS did not answer with a rating at all (e.g. "Rating" from a server that ignored the prefill):
    renormalising would invent a distribution (uniform -> a confident-looking 3), so the row is the failed
    fallback (uniform, mass as measured, failed=True), counted by predict and never stored in the cache."""
    mass = digit_probs.sum(axis=1)
    failed = ~(mass >= MIN_DIGIT_MASS)  # NaN mass fails too
    probs = np.full_like(digit_probs, 1.0 / len(RATINGS))
    probs[~failed] = digit_probs[~failed] / mass[~failed, None]
    return RatingResult(probs=probs, digit_mass=np.where(np.isfinite(mass), mass, 0.0), failed=failed)


def result_from_logits(logits, digit_ids: list[list[int]]) -> RatingResult:
    """Rows of next-token logits (a torch tensor, (n, vocab)) -> RatingResult, summed per digit in float64."""
    import torch

    probs = torch.softmax(logits.double(), dim=-1)
    digit_probs = torch.stack([probs[:, ids].sum(dim=-1) for ids in digit_ids], dim=-1)
    return _result(digit_probs.cpu().numpy())


def result_from_top_logprobs(rows: Iterable[Iterable[tuple[str, float]]]) -> RatingResult:
    """Rows of (token text, logprob) pairs (a server's top_logprobs) -> RatingResult.

    Tokens are matched after stripping whitespace; a digit missing from the top list counts as 0.
    """
    table = []
    for pairs in rows:
        row = [0.0] * len(RATINGS)
        for token, logprob in pairs:
            stripped = (token or "").strip()
            if stripped in RATINGS and logprob is not None and math.isfinite(logprob):
                row[RATINGS.index(stripped)] += math.exp(logprob)
        table.append(row)
    return _result(np.asarray(table, dtype=np.float64).reshape(-1, len(RATINGS)))


def result_from_digit_logprobs(rows: Iterable[dict], digit_ids: list[list[int]]) -> RatingResult:
    """Rows of {token id: logprob} (an engine's logprobs of the digit tokens) -> RatingResult.

    A digit's probability is the sum over its spellings (`digit_token_ids`); an id absent from a row counts 0.
    """
    table = [
        [sum(math.exp(row[i]) for i in ids if i in row and math.isfinite(row[i])) for ids in digit_ids]
        for row in rows
    ]
    return _result(np.asarray(table, dtype=np.float64).reshape(-1, len(RATINGS)))
