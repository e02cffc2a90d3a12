"""Shared by the backends: the prompt text of a chat, and P(rating) from a next-token distribution.

The rating is read from the token that follows the prefilled assistant turn (e.g. "Rating: "). A tokenizer
may spell a digit several ways ("1", " 1", "▁1"); the probability of a rating is the sum over its spellings,
and the five sums are renormalised. `digit_mass` is the total before renormalising (how much the model
wanted to answer with a digit at all).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from deeper.llm.base import RATINGS, Chat, RatingResult


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


def _result(digit_probs: np.ndarray) -> RatingResult:
    """(n, 5) unnormalised digit probabilities -> renormalised probs + digit mass (uniform when the mass is 0)."""
    mass = digit_probs.sum(axis=1)
    probs = np.full_like(digit_probs, 1.0 / len(RATINGS))
    nonzero = mass > 0
    probs[nonzero] = digit_probs[nonzero] / mass[nonzero, None]
    return RatingResult(probs=probs, digit_mass=mass, failed=np.zeros(len(mass), dtype=bool))


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
