"""The diagnostic world: a test of the TRAINER, not of the paper's claim.

No frozen model that runs on this machine reads a persona (stage headroom: another user's persona predicts as
well as the user's own). To check that the RL loop learns where there is something to learn, this module
builds a world in which the persona matters by construction:

- Items carry their genres in the title, `Toy Story (1995) [Animation, Children's, Comedy]` (GENRES: the
  MovieLens genres, so real MovieLens items keep theirs).
- A synthetic user has latent tastes: genres it loves and genres it dislikes. Its rating of an item is
  3 + STEP x (loved genres of the item - disliked genres of the item) + Gaussian noise, rounded, clipped to 1..5
  (`rate`).
- A transparent frozen predictor reads the tastes a persona states (`stated_tastes`) and rates an item by the
  same rule without noise (`predicted_rating`). It is the `tastes` backend (deeper/llm/tastes_backend.py), a
  backend like any other, so every stage runs on it unchanged.

`stated_tastes` reads sentences: a sentence that names genres (GENRE_WORDS: names, plurals, common aliases)
states them as disliked when it has a negative cue (NEGATIVE: dislike, hate, avoid, not, n't, never, ...),
else as loved when it has a positive cue (POSITIVE: love, like, enjoy, favourite, ...); a sentence with
neither states nothing. A persona that says "loves comedies; avoids horror" makes the predictor rate a
comedy 4.5 and a horror film 1.5; "I'm ready to assist you" rates every item 3.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

GENRES = (
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
# how a persona may name each genre (lower case, matched as whole words)
GENRE_WORDS = {
    "Action": ("action",),
    "Adventure": ("adventure", "adventures"),
    "Animation": ("animation", "animated", "cartoons"),
    "Children's": ("children's", "children", "kids", "family"),
    "Comedy": ("comedy", "comedies", "funny"),
    "Crime": ("crime",),
    "Documentary": ("documentary", "documentaries"),
    "Drama": ("drama", "dramas"),
    "Fantasy": ("fantasy",),
    "Film-Noir": ("film-noir", "noir"),
    "Horror": ("horror",),
    "Musical": ("musical", "musicals"),
    "Mystery": ("mystery", "mysteries"),
    "Romance": ("romance", "romances", "romantic"),
    "Sci-Fi": ("sci-fi", "science fiction", "science-fiction"),
    "Thriller": ("thriller", "thrillers"),
    "War": ("war",),
    "Western": ("western", "westerns"),
}
NEGATIVE = (
    "dislike",
    "dislikes",
    "hate",
    "hates",
    "avoid",
    "avoids",
    "not",
    "n't",
    "never",
    "no",
    "bore",
    "bores",
    "boring",
    "bored",
    "tired",
    "puts them off",
    "put off",
    "can't stand",
)
POSITIVE = (
    "love",
    "loves",
    "like",
    "likes",
    "enjoy",
    "enjoys",
    "favourite",
    "favorite",
    "adore",
    "adores",
    "prefer",
    "prefers",
    "fan",
    "fond",
    "drawn",
)
STEP = 1.5  # rating points per loved (+) or disliked (-) genre of an item
NEUTRAL = 3.0
SHARPNESS = 0.35  # the predictor's P(d) ~ exp(-|d - rating| / SHARPNESS) over the digits 1..5
RULE_VERSION = "tastes-1"  # part of the backend's fingerprint: change it when any rule above changes

_GENRE_RE = {
    g: re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in words) + r")(?![\w-])")
    for g, words in GENRE_WORDS.items()
}
_SENTENCE_RE = re.compile(r"[^.!?;\n]+")
_TITLE_GENRES_RE = re.compile(r"\[([^\[\]]*)\]\s*$")


def _has(cues: Iterable[str], sentence: str) -> bool:
    return any(
        re.search(r"(?<![\w'])" + re.escape(c) + r"(?![\w'])", sentence) or (c == "n't" and c in sentence)
        for c in cues
    )


# names no genre, so it states nothing; it makes every description at least 20 words (persona.min_words)
_RATES_THE_REST = (
    "Everything else gets a middling score from them, neither praised nor panned, whatever the film."
)


@dataclass(frozen=True)
class Tastes:
    loved: frozenset[str]
    disliked: frozenset[str]

    def describe(self) -> str:
        """A persona stating these tastes in words `stated_tastes` reads back."""
        if not self.loved and not self.disliked:
            return "This viewer has shown no clear taste for or against any genre yet. " + _RATES_THE_REST
        parts = []
        if self.loved:
            parts.append(f"This viewer loves {_join(sorted(self.loved))} and seeks them out.")
        if self.disliked:
            parts.append(f"They dislike {_join(sorted(self.disliked))} and tend to avoid them.")
        return " ".join(parts + [_RATES_THE_REST])


# how `Tastes.describe` names a genre (each is one of its GENRE_WORDS)
SPOKEN = {
    "Action": "action",
    "Adventure": "adventures",
    "Animation": "animation",
    "Children's": "children's",
    "Comedy": "comedies",
    "Crime": "crime",
    "Documentary": "documentaries",
    "Drama": "dramas",
    "Fantasy": "fantasy",
    "Film-Noir": "film-noir",
    "Horror": "horror",
    "Musical": "musicals",
    "Mystery": "mysteries",
    "Romance": "romances",
    "Sci-Fi": "sci-fi",
    "Thriller": "thrillers",
    "War": "war",
    "Western": "westerns",
}


def _join(genres: Sequence[str]) -> str:
    words = [SPOKEN[g] for g in genres]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def stated_tastes(text: str) -> Tastes:
    """The genres a persona text states as loved and as disliked (a genre stated both ways counts as neither)."""
    loved, disliked = set(), set()
    for sentence in _SENTENCE_RE.findall((text or "").lower()):
        named = {g for g, pattern in _GENRE_RE.items() if pattern.search(sentence)}
        if not named:
            continue
        if _has(NEGATIVE, sentence):
            disliked |= named
        elif _has(POSITIVE, sentence):
            loved |= named
    both = loved & disliked
    return Tastes(frozenset(loved - both), frozenset(disliked - both))


def title_genres(title: str) -> frozenset[str]:
    """The genres in the bracketed list that ends a title ("... [Comedy, Drama]"); none without one."""
    match = _TITLE_GENRES_RE.search(title or "")
    if not match:
        return frozenset()
    return frozenset(g.strip() for g in match.group(1).split(",") if g.strip() in GENRES)


def with_genres(title: str, genres: Iterable[str]) -> str:
    """A title as the diagnostic world shows it: its genres (in GENRES order) in brackets after it."""
    ordered = [g for g in GENRES if g in set(genres)]
    return f"{title} [{', '.join(ordered)}]" if ordered else title


def affinity(tastes: Tastes, genres: frozenset[str]) -> int:
    return len(genres & tastes.loved) - len(genres & tastes.disliked)


def predicted_rating(tastes: Tastes, genres: frozenset[str]) -> float:
    """The transparent predictor's rating: 3 + STEP x affinity, clipped to 1..5."""
    return float(np.clip(NEUTRAL + STEP * affinity(tastes, genres), 1.0, 5.0))


def rating_distribution(rating: float) -> np.ndarray:
    """P(1..5) peaked at `rating` (its expected value lies within 0.3 of it)."""
    logits = -np.abs(np.arange(1, 6) - rating) / SHARPNESS
    p = np.exp(logits - logits.max())
    return p / p.sum()


def rate(tastes: Tastes, genres: frozenset[str], rng: np.random.Generator, noise: float) -> float:
    """A synthetic user's rating: the predictor's rule plus Gaussian noise, rounded to a star, clipped to 1..5."""
    return float(np.clip(np.rint(NEUTRAL + STEP * affinity(tastes, genres) + rng.normal(0.0, noise)), 1, 5))


def tastes_from_ratings(rated: Iterable[tuple[str, float]]) -> Tastes:
    """Tastes a reader would infer from (title with genres, rating) pairs: a genre whose items average >= 4 is
    loved, <= 2 disliked."""
    sums: dict[str, list[float]] = {}
    for title, rating in rated:
        for g in title_genres(title):
            sums.setdefault(g, []).append(float(rating))
    loved = {g for g, v in sums.items() if np.mean(v) >= 4.0}
    disliked = {g for g, v in sums.items() if np.mean(v) <= 2.0}
    return Tastes(frozenset(loved), frozenset(disliked))


_RATED_LINE_RE = re.compile(r'^\s*\d+\.\s*("(?:[^"\\]|\\.)*")\s*:\s*(.*)$')
_ACTUAL_RE = re.compile(r"actual\s+([0-9.]+)")
_NUMBER_RE = re.compile(r"^([0-9.]+)")


def _authors_line(line: str) -> tuple[str, float] | None:
    """(title, user_rating) of a line the authors' list style renders (`{'item_name': ..., 'user_rating': 4}`,
    `{"item": ..., "user_rating": 4}`), else None."""
    line = line.strip()
    if not (line.startswith("{") and line.endswith("}")):
        return None
    try:
        record = ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    title, rating = record.get("item_name", record.get("item")), record.get("user_rating")
    if not isinstance(title, str) or isinstance(rating, bool) or not isinstance(rating, int | float):
        return None
    return title, float(rating)


def rated_lines(text: str) -> list[tuple[str, float]]:
    """(title, rating) of every rated line a prompt renders (deeper/prompts: `N. "title": 4` or
    `N. "title": predicted 3.2, actual 4`, whose actual rating is the one taken; in the authors' list style
    one dict a line, whose `user_rating` is taken)."""
    out = []
    for line in text.splitlines():
        authors = _authors_line(line)
        if authors is not None:
            out.append(authors)
            continue
        match = _RATED_LINE_RE.match(line)
        if not match:
            continue
        rest = match.group(2)
        number = _ACTUAL_RE.search(rest) or _NUMBER_RE.match(rest)
        if number:
            try:
                out.append((json.loads(match.group(1)), float(number.group(1))))
            except ValueError:
                continue
    return out


def random_tastes(
    rng: np.random.Generator, genres: Sequence[str], loved: int = 1, disliked: int = 1
) -> Tastes:
    picked = rng.choice(len(genres), size=loved + disliked, replace=False)
    return Tastes(frozenset(genres[i] for i in picked[:loved]), frozenset(genres[i] for i in picked[loved:]))


@dataclass(frozen=True)
class SyntheticUser:
    user_id: str
    tastes: Tastes
    windows: tuple[tuple[tuple[str, float], ...], ...]  # per window: (title with genres, rating) of each item


def synthetic_users(
    catalog: Sequence[tuple[str, frozenset[str]]],
    genres: Sequence[str],
    users: int,
    windows: int,
    size: int,
    seed: int,
    noise: float = 0.5,
    id_prefix: str = "u",
    loved: str | None = None,
) -> list[SyntheticUser]:
    """Users of the diagnostic world: each loves one of `genres` (or every user the genre `loved`) and dislikes
    another (seeded), and rates `windows` windows of `size` items drawn from `catalog` ((title, genres) pairs;
    titles shown with their genres) by `rate`. Half of a window comes from the user's two genres, so that
    every window says something about its tastes."""
    rng = np.random.default_rng(seed)
    half = size // 2
    by_genre = {g: [i for i, (_, gs) in enumerate(catalog) if g in gs] for g in genres}
    # a taste needs items to show in: genres with fewer than half a window of items are nobody's taste
    genres = [g for g in genres if len(by_genre[g]) >= max(half, 1)]
    if len(genres) < 2 or (loved is not None and loved not in genres):
        raise ValueError(
            f"the catalogue has too few items of the genres to build tastes from ({len(catalog)} items)"
        )
    out = []
    for u in range(users):
        if loved is None:
            tastes = random_tastes(rng, genres)
        else:
            others = [g for g in genres if g != loved]
            tastes = Tastes(frozenset({loved}), frozenset({others[int(rng.integers(len(others)))]}))
        marked = sorted({i for g in tastes.loved | tastes.disliked for i in by_genre[g]})
        built = []
        for _ in range(windows):
            picks = list(rng.choice(marked, size=half, replace=False)) + list(
                rng.choice(len(catalog), size=size - half, replace=False)
            )
            built.append(
                tuple(
                    (with_genres(catalog[i][0], catalog[i][1]), rate(tastes, catalog[i][1], rng, noise))
                    for i in picks
                )
            )
        out.append(SyntheticUser(f"{id_prefix}{u:03d}", tastes, tuple(built)))
    return out
