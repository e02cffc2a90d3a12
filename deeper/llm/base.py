"""The one small LLM interface the whole method needs.

- `generate(chats, n, sampling)` -> n texts per chat (personas, refinement candidates, baselines), each a
  `Generation`: a str that also says whether decoding stopped at `max_new_tokens` (a cut text) rather than
  at an end token.
- `rating_probs(groups)` -> P(rating = 1..5) per item, from the next-token distribution after the
  assistant turn is prefilled (e.g. "Rating: "), renormalised over the five digits; the raw mass the
  model put on the digits is returned too, for metrics.

A chat is a list of {"role", "content"} messages. A rating group is the chats of one window: they share
the persona prefix, so backends may encode it once (KV cache / prefix caching).

Sample k of `generate(chats, n, sampling)` is drawn with seed `sampling.seed + k`, independently of the other
chats in the call: it equals sample 0 of `generate(chats, 1, replace(sampling, seed=sampling.seed + k))`.
That is what lets the response cache fetch any missing (chat, sample) alone after a crash.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
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


class Generation(str):
    """A generated text (a str: callers that want only the text use it as one) plus `stopped_at_limit`: True
    when decoding ended because it reached `max_new_tokens` (transformers: no end token among the new tokens;
    vLLM and OpenAI-compatible servers: finish_reason "length"), i.e. the text may be cut short.

    String operations (strip, slicing, ...) return a plain str: count the flag on what the backend returned."""

    stopped_at_limit: bool

    def __new__(cls, text: str, stopped_at_limit: bool):
        obj = super().__new__(cls, text)
        obj.stopped_at_limit = bool(stopped_at_limit)
        return obj

    def __reduce__(self):
        return Generation, (str(self), self.stopped_at_limit)


def stopped_at_limit(text: str) -> bool:
    """The flag of a backend's answer; a plain str (not from a backend) is a programming error, not a False."""
    if not isinstance(text, Generation):
        raise TypeError(f"expected a deeper.llm.base.Generation from the backend, got {type(text).__name__}")
    return text.stopped_at_limit


def limit_counts(texts) -> dict:
    """{"stopped_at_limit", "stopped_at_limit_share"} over backend answers: the two keys of stage metrics."""
    texts = list(texts)
    stopped = sum(stopped_at_limit(t) for t in texts)
    return {"stopped_at_limit": stopped, "stopped_at_limit_share": stopped / len(texts) if texts else None}


@dataclass
class RatingGroup:
    """Chats that share a prefix (one persona, the items of one window); `prefill` opens the answer."""

    chats: list[Chat]
    prefill: str = "Rating: "


@dataclass
class RatingResult:
    probs: np.ndarray  # (n_items, 5), rows sum to 1 (renormalised over "1".."5")
    digit_mass: np.ndarray | None = None  # (n_items,), mass on the five digits before renormalising
    # (n_items,) bool or None (= none failed): True where the backend gave up (e.g. malformed server output) and
    # returned the stated fallback (uniform probs, digit_mass 0). Such rows are counted, never cached.
    failed: np.ndarray | None = None


def uniform_result(n_items: int) -> RatingResult:
    """The fallback for items a backend could not score: uniform over 1..5, no mass on the digits, failed."""
    return RatingResult(
        probs=np.full((n_items, len(RATINGS)), 1.0 / len(RATINGS)),
        digit_mass=np.zeros(n_items),
        failed=np.ones(n_items, dtype=bool),
    )


class Counters:
    """Per-backend call counters for metrics (thread-safe: the openai backend counts from worker threads).

    calls: prompts answered (one per generated sample, one per rated item); prompt_tokens: their prompt
    lengths; completion_tokens: generated tokens; retries: repeated requests; failures: items that got a
    fallback after the last retry.
    """

    FIELDS = ("calls", "prompt_tokens", "completion_tokens", "retries", "failures")

    def __init__(self):
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.FIELDS, 0)

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self._values[name] += int(amount)

    def __getattr__(self, name):
        values = self.__dict__.get("_values")
        if values is not None and name in values:
            return values[name]
        raise AttributeError(name)

    def as_dict(self) -> dict:
        with self._lock:
            return dict(self._values)


@runtime_checkable
class LLM(Protocol):
    backend: str
    fingerprint: str  # changes whenever outputs could change: weights hash/revision + adapter hash

    def generate(self, chats: list[Chat], n: int, sampling: Sampling) -> list[list[Generation]]: ...

    def rating_probs(self, groups: list[RatingGroup]) -> list[RatingResult]: ...
