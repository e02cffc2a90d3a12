"""What every persona update method takes and returns, and the shared generate-then-clean step.

An update at the end of window W_t turns the old persona S_{t-1} into S_t. Methods see the same input,
`UpdateInput`, and use the parts their paradigm allows (paper Sec. 2):
- refinement (DEEPER and the untrained refiner): S_{t-1}, the actual ratings of W_t and the ratings
  predicted for W_t with S_{t-1};
- extension: IncUpdate (S_{t-1} + W_t ratings), HierMerge (a short-term persona from W_t, merged into S_{t-1});
- regeneration: FullRegen (all ratings W_0..W_t), SlideRegen (W_t only).

Methods update a whole batch of users at once, so that a backend gets many requests per call.
A generated persona is cleaned (`deeper.personas.clean_persona`). One with no text at all cannot be
role-played: the user keeps S_{t-1} and the update counts as failed ("empty"). A looping answer is used
as written (the prediction error judges it) and only flagged ("repetitive").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from deeper.llm.base import LLM, Chat, Sampling
from deeper.personas import clean_persona, degenerate_reason
from deeper.prompts import PromptSet, load_prompts

# Reasons an update is counted as failed (the old persona is kept) or flagged (the new one is used).
FAILED_REASONS = ("empty",)
FLAGGED_REASONS = ("repetitive",)


@dataclass(frozen=True)
class Window:
    """One window's items, in order, with the user's actual ratings."""

    titles: tuple[str, ...]
    ratings: tuple[float, ...]

    def __post_init__(self):
        if len(self.titles) != len(self.ratings) or not self.titles:
            raise ValueError(
                f"a window needs as many ratings as titles (>0), got {len(self.titles)} and {len(self.ratings)}"
            )

    def pairs(self) -> list[tuple[str, float]]:
        return list(zip(self.titles, self.ratings))


@dataclass(frozen=True)
class UpdateInput:
    """One user's update at the end of window W_t.

    `history` is W_0..W_t, oldest first: its last window is the current one. `predictions` are the ratings
    of W_t predicted with `persona` (S_{t-1}) by the frozen model, in the order of W_t's items.
    """

    item_type: str
    persona: str
    history: tuple[Window, ...]
    predictions: tuple[float, ...]

    def __post_init__(self):
        if not self.history:
            raise ValueError("an update needs at least the current window")
        if len(self.predictions) != len(self.current.titles):
            raise ValueError(
                f"{len(self.predictions)} predictions for a current window of {len(self.current.titles)} items"
            )

    @property
    def current(self) -> Window:
        return self.history[-1]

    def all_ratings(self) -> list[tuple[str, float]]:
        return [pair for window in self.history for pair in window.pairs()]

    def comparisons(self) -> list[tuple[str, float, float]]:
        """(title, predicted, actual) for every item of the current window."""
        return [(t, p, a) for (t, a), p in zip(self.current.pairs(), self.predictions)]


@dataclass
class UpdateResult:
    persona: str  # S_t (S_{t-1} again when the update failed)
    failure: str | None = None  # a FAILED_REASONS entry: the old persona was kept
    flag: str | None = None  # a FLAGGED_REASONS entry: the new persona is used but looks degenerate
    generated: tuple[str, ...] = ()  # raw answers of this update's calls, in call order (for inspection)


class UpdateMethod(ABC):
    """A persona update method: `update(inputs)` -> one result per input, in order."""

    name: str = ""

    def __init__(self, llm: LLM, sampling: Sampling, prompts: PromptSet | None = None):
        self.llm = llm
        self.sampling = sampling
        self.prompts = prompts or load_prompts()

    @abstractmethod
    def update(self, inputs: Sequence[UpdateInput]) -> list[UpdateResult]: ...

    @abstractmethod
    def planned_chats(self, item: UpdateInput) -> list[Chat]:
        """The chats one update of `item` sends, in order, rendered without a model (an answer a later call
        needs is stood in for by the old persona): what the cost plan (deeper.plan) counts tokens on."""

    def _generate(self, chats: list[Chat]) -> list[str]:
        """One answer per chat (all chats in one backend call)."""
        if not chats:
            return []
        answers = self.llm.generate(chats, 1, self.sampling)
        if len(answers) != len(chats):
            raise RuntimeError(f"backend returned {len(answers)} answers for {len(chats)} chats")
        return [texts[0] if texts else "" for texts in answers]


def finish(old_persona: str, raw: str, generated: tuple[str, ...] | None = None) -> UpdateResult:
    """Clean a generated persona; keep the old one where the answer has no text at all."""
    generated = generated if generated is not None else (raw,)
    persona = clean_persona(raw)
    reason = degenerate_reason(persona, min_words=0)
    if reason in FAILED_REASONS:
        return UpdateResult(persona=old_persona, failure=reason, generated=generated)
    return UpdateResult(persona=persona, flag=reason, generated=generated)


class SingleCallMethod(UpdateMethod):
    """A method that renders one template per user and generates once."""

    template: str = ""

    @abstractmethod
    def values(self, item: UpdateInput) -> dict: ...

    def chat(self, item: UpdateInput) -> Chat:
        """The rendered prompt of one update (the iteration stages train on exactly this prompt)."""
        return self.prompts.render(self.template, **self.values(item))

    def planned_chats(self, item: UpdateInput) -> list[Chat]:
        return [self.chat(item)]

    def update(self, inputs: Sequence[UpdateInput]) -> list[UpdateResult]:
        chats = [self.chat(item) for item in inputs]
        answers = self._generate(chats)
        return [finish(item.persona, answer) for item, answer in zip(inputs, answers)]
