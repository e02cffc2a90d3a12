"""Persona text helpers shared by every stage that writes personas: cleaning, length, degenerate checks.

Lengths: `persona_words` counts whitespace-separated words (the paper's "at least 200 words");
`persona_tokens` counts tokens of one fixed tokenizer (params `persona.tokenizer`), the same for every
method and model, so that lengths compare across methods and rounds (the paper's Table 2).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple

from deeper.config import get
from deeper.errors import ConfigError
from deeper.llm.base import Sampling, stopped_at_limit
from deeper.params import number, sampling_block

# persona keys left out of params (S_0, Appendix A.1); params.yaml sets every one
PERSONA_SAMPLING_DEFAULTS = Sampling(
    temperature=0.7, top_p=0.9, repetition_penalty=1.1, max_new_tokens=256, seed=0
)


@dataclass(frozen=True)
class PersonaSettings:
    """params `persona`: how S_0 is generated, degenerate-output handling, the tokenizer that counts lengths."""

    sampling: Sampling
    retries: int
    min_words: int
    tokenizer: str

    @classmethod
    def from_params(cls, params: dict) -> PersonaSettings:
        block = get(params, "persona")
        sampling = sampling_block(
            block, "persona", PERSONA_SAMPLING_DEFAULTS, extra=("retries", "min_words", "tokenizer")
        )
        tokenizer = block.get("tokenizer")
        if not tokenizer or not isinstance(tokenizer, str):
            raise ConfigError(
                "persona.tokenizer", "missing: a tokenizer folder or hub id to count persona tokens"
            )
        return cls(
            sampling,
            number(block.get("retries", 2), "persona.retries", integer=True, low=0),
            number(block.get("min_words", 20), "persona.min_words", integer=True, low=0),
            tokenizer,
        )


# A label models often echo before the persona: "**User Persona:**", "## Refined persona", "Updated Long-Term Persona:".
_LABEL = r"[#*_\s]*(?:(?:the|user|user's|refined|updated|improved|new|initial|merged|final|long-term|short-term)\s+){0,3}persona"
_LABEL_LINE_RE = re.compile(rf"^{_LABEL}[*_:\s]*$", re.IGNORECASE)  # the whole first line is the label
_LABEL_PREFIX_RE = re.compile(
    rf"^{_LABEL}\s*[*_]*\s*:[*_]*\s*", re.IGNORECASE
)  # "Persona: The user ..." keeps the text


def clean_persona(text: str) -> str:
    """Strip whitespace and a leading "Persona:"-style label; the rest of the text is kept as written."""
    text = (text or "").strip()
    lines = text.split("\n", 1)
    if _LABEL_LINE_RE.match(lines[0]):
        text = lines[1].strip() if len(lines) > 1 else ""
    else:
        text = _LABEL_PREFIX_RE.sub("", text, count=1).strip()
    return text


def count_words(text: str) -> int:
    return len(text.split())


def degenerate_reason(text: str, min_words: int) -> str | None:
    """Why a generated persona is unusable, or None: "empty" (no letters or digits), "too_short"
    (< min_words words) or "repetitive" (a loop: fewer than 30% of its word trigrams are distinct)."""
    if not re.search(r"\w", text or ""):
        return "empty"
    words = text.lower().split()
    if len(words) < min_words:
        return "too_short"
    trigrams = list(zip(words, words[1:], words[2:]))
    if len(trigrams) >= 20 and len(set(trigrams)) < 0.3 * len(trigrams):
        return "repetitive"
    return None


class TokenCounter:
    """Counts tokens with one Hugging Face tokenizer (a local folder or a hub id)."""

    def __init__(self, tokenizer: str, local_only: bool = False):
        from transformers import AutoTokenizer

        try:  # local_only: a folder, or a hub id already in the Hugging Face cache; never the network
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=local_only)
        except (OSError, ValueError) as e:
            raise ConfigError(
                "persona.tokenizer", f"cannot load tokenizer {tokenizer!r}: {str(e).splitlines()[0]}"
            ) from None
        self.name = str(tokenizer)

    def __call__(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=4)
def token_counter(tokenizer: str, local_only: bool = False) -> TokenCounter:
    return TokenCounter(tokenizer, local_only)


def best_attempt(attempts: list[str], min_words: int) -> int:
    """The index of the first usable attempt, else of the longest one."""
    for index, text in enumerate(attempts):
        if degenerate_reason(text, min_words) is None:
            return index
    return max(range(len(attempts)), key=lambda index: count_words(attempts[index]))


def init_chat(prompts, item_type: str, rated: Iterable[tuple[str, float]]) -> list[dict]:
    """The chat that writes a persona from (title, rating) pairs (template `init`, paper Appendix A.1): S_0 from
    W_0 (stage init_personas), and the headroom stage's oracles from the window being predicted."""
    return prompts.render("init", item_type=item_type, ratings=list(rated))


class GeneratedPersonas(NamedTuple):
    personas: list[str]  # cleaned, one per chat
    attempts: list[int]  # generations each took (1 + retries used)
    stopped_at_limit: list[bool]  # the kept generation ended at max_new_tokens (may be cut short)


def generate_personas(
    llm, chats: list, settings: PersonaSettings, log: Callable[[str], None] | None = None
) -> GeneratedPersonas:
    """S_0 for each chat of the `init` template (cleaned), the number of attempts each took and whether the
    kept one stopped at the token limit.

    A degenerate generation is re-sampled with seed+1 .. seed+retries (not at temperature 0: greedy decoding
    would repeat itself); if all fail, the longest attempt is kept. `log` gets one line per retry round. The
    cached LLM shows the progress bar, chunks the calls and stores each chunk as it finishes (a killed run
    resumes)."""
    attempts: list[list[str]] = [[] for _ in chats]
    at_limit: list[list[bool]] = [[] for _ in chats]
    todo = list(range(len(chats)))
    max_attempts = 1 + (settings.retries if settings.sampling.temperature > 0 else 0)
    for attempt in range(max_attempts):
        if attempt and log is not None:
            log(f"retry {attempt}: {len(todo)} degenerate personas, seed +{attempt}")
        sampling = replace(settings.sampling, seed=settings.sampling.seed + attempt)
        texts = llm.generate([chats[i] for i in todo], 1, sampling)
        for i, text in zip(todo, texts):
            attempts[i].append(clean_persona(text[0]))
            at_limit[i].append(stopped_at_limit(text[0]))
        todo = [i for i in todo if degenerate_reason(attempts[i][-1], settings.min_words) is not None]
        if not todo:
            break
    kept = [best_attempt(a, settings.min_words) for a in attempts]
    return GeneratedPersonas(
        [a[k] for a, k in zip(attempts, kept)],
        [len(a) for a in attempts],
        [flags[k] for flags, k in zip(at_limit, kept)],
    )
