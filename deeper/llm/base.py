"""The one small LLM interface the whole method needs.

- `generate(chats, n, sampling)` -> n texts per chat (personas, refinement candidates, baselines).
- `rating_probs(groups)` -> P(rating = 1..5) per item, from the next-token distribution after the
  assistant turn is prefilled (e.g. "Rating: "), renormalised over the five digits; the raw mass the
  model put on the digits is returned too, for metrics.

A chat is a list of {"role", "content"} messages. A rating group is the chats of one window: they share
the persona prefix, so backends may encode it once (KV cache / prefix caching).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

Chat = list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]
RATINGS = ("1", "2", "3", "4", "5")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def key(self) -> dict:
        return asdict(self)


@dataclass
class RatingGroup:
    """Chats that share a prefix (one persona, the items of one window); `prefill` opens the answer."""

    chats: list[Chat]
    prefill: str = "Rating: "


@dataclass
class RatingResult:
    probs: np.ndarray  # (n_items, 5), rows sum to 1 (renormalised over "1".."5")
    digit_mass: np.ndarray = field(default=None)  # (n_items,), mass on the five digits before renormalising


@runtime_checkable
class LLM(Protocol):
    backend: str
    fingerprint: str  # changes whenever outputs could change: weights hash/revision + adapter hash

    def generate(self, chats: list[Chat], n: int, sampling: Sampling) -> list[list[str]]: ...

    def rating_probs(self, groups: list[RatingGroup]) -> list[RatingResult]: ...
