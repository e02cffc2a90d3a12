"""Persona text helpers shared by every stage that writes personas: cleaning, length, degenerate checks.

Lengths: `persona_words` counts whitespace-separated words (the paper's "at least 200 words");
`persona_tokens` counts tokens of one fixed tokenizer (params `persona.tokenizer`), the same for every
method and model, so that lengths compare across methods and rounds (the paper's Table 2).
"""

from __future__ import annotations

import re
from functools import lru_cache

from deeper.errors import ConfigError

# A label models often echo before the persona: "**User Persona:**", "## Refined persona", "Updated Long-Term Persona:".
_LABEL = r"[#*_\s]*(?:(?:the|user|user's|refined|updated|improved|new|initial|merged|final|long-term|short-term)\s+){0,3}persona"
_LABEL_LINE_RE = re.compile(rf"^{_LABEL}[*_:\s]*$", re.IGNORECASE)  # the whole first line is the label
_LABEL_PREFIX_RE = re.compile(rf"^{_LABEL}\s*[*_]*\s*:[*_]*\s*", re.IGNORECASE)  # "Persona: The user ..." keeps the text


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

    def __init__(self, tokenizer: str):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        except (OSError, ValueError) as e:
            raise ConfigError(
                "persona.tokenizer", f"cannot load tokenizer {tokenizer!r}: {str(e).splitlines()[0]}"
            ) from None
        self.name = str(tokenizer)

    def __call__(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=4)
def token_counter(tokenizer: str) -> TokenCounter:
    return TokenCounter(tokenizer)
