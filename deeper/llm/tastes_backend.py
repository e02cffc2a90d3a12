"""The `tastes` backend: the diagnostic world's transparent frozen model (deeper/diagnostic.py), no weights.

    models.frozen: {backend: tastes, name: transparent}

A test of the trainer, not of the paper's claim: it reads a persona the way deeper.diagnostic.stated_tastes
says, so a persona that states a user's genre tastes predicts that user's ratings better, by construction.
- rating_probs: the item is the last line of the chat's last user message (every predict_item template ends
  with the quoted title); the persona is the rest of the chat's text. P(1..5) peaks at
  deeper.diagnostic.predicted_rating. Deterministic; digit mass 1.
- generate: a persona in words `stated_tastes` reads back. From the rated lines of the last user message
  (S_0, FullRegen, SlideRegen, IncUpdate, refine: the window's actual ratings) when it has any, else
  restating the tastes the chat states (HierMerge's merge). The same text for every sample and seed.
"""

from __future__ import annotations

import json

import numpy as np

from deeper.diagnostic import (
    RULE_VERSION,
    predicted_rating,
    rated_lines,
    rating_distribution,
    stated_tastes,
    tastes_from_ratings,
    title_genres,
)
from deeper.errors import ConfigError
from deeper.llm.base import RATINGS, Chat, Counters, Generation, RatingGroup, RatingResult, Sampling


def _item_and_persona(chat: Chat) -> tuple[str, str]:
    """(title, persona text): the title from the last line of the last user message, the rest as persona."""
    user = max(i for i, m in enumerate(chat) if m["role"] == "user")
    lines = chat[user]["content"].rstrip().splitlines()
    last = lines[-1].strip() if lines else ""
    try:
        title = json.loads(last) if last.startswith('"') else last
    except json.JSONDecodeError:
        title = last
    rest = [m["content"] for i, m in enumerate(chat) if i != user] + ["\n".join(lines[:-1])]
    return str(title), "\n".join(rest)


def persona_for(chat: Chat) -> str:
    """What this backend writes for a chat (see the module docstring)."""
    user = [m["content"] for m in chat if m["role"] == "user"]
    rated = rated_lines(user[-1]) if user else []
    if rated:
        return tastes_from_ratings(rated).describe()
    return stated_tastes("\n".join(m["content"] for m in chat)).describe()


class TastesLLM:
    backend = "tastes"

    def __init__(
        self, name: str, adapter: str | None = None, where: str = "model", batch_size: int | None = 64
    ):
        if adapter is not None:
            raise ConfigError(f"{where}.adapter", "the tastes backend has no weights, so no adapter")
        self.name = name
        self.fingerprint = f"{RULE_VERSION}:{name}"
        self.batch_size = batch_size or 64
        self.counters = Counters()

    def rating_probs(self, groups: list[RatingGroup]) -> list[RatingResult]:
        results = []
        for group in groups:
            probs = np.empty((len(group.chats), len(RATINGS)))
            for j, chat in enumerate(group.chats):
                title, persona = _item_and_persona(chat)
                probs[j] = rating_distribution(predicted_rating(stated_tastes(persona), title_genres(title)))
            self.counters.add(calls=len(group.chats))
            results.append(RatingResult(probs=probs, digit_mass=np.ones(len(group.chats))))
        return results

    def generate(self, chats: list[Chat], n: int, sampling: Sampling) -> list[list[Generation]]:
        self.counters.add(calls=len(chats) * n)
        return [[Generation(persona_for(chat), stopped_at_limit=False)] * n for chat in chats]
