"""Persona -> predicted 1-5 ratings of a window's items, and the error eps = MAE against the actual ratings.

Two modes (params `predict.mode`):
- `logprob`: one chat per item (template predict_item: the persona is the role-play instruction, the answer
  is prefilled with "Rating: "), grouped per window so that backends encode the persona prefix once;
  `llm.rating_probs` gives P(1..5) per item. The rating is the expected value over 1..5 or the most likely
  digit (`predict.rating`: expected | argmax). No parsing, no failures; the mass the model put on the five
  digits before renormalising is reported (`digit_mass_mean`). Items a backend could not score at all (e.g. a
  remote server's malformed answer) come back uniform, i.e. rating 3, and are counted in `backend_failed_items`.
- `json`: the paper's way (Appendix A.2), one generated answer per window listing
  {"item_name", "predict_rating"} for all its items, parsed leniently (code fences, text around the list,
  broken JSON objects, names matched by normalised title, else by position). An item the answer gives no
  valid rating for gets FALLBACK_RATING = 3, the midpoint of the 1-5 scale, and is counted in
  `parse_failed_items`; a prediction is never NaN. A window whose answer leaves an item without a valid
  rating is asked once more with seed + 1 (`retried_windows`); the retry's answer is kept when it leaves fewer
  items without one (a deterministic backend at temperature 0 answers the same: the retry then changes nothing).

`predict_windows(llm, requests, settings)` predicts many (persona, window) requests in one call.
`mae(pred, actual)` is the one definition of the window error; the reward imports it from here.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
from tqdm.auto import tqdm

from deeper.config import get
from deeper.errors import ConfigError, DeeperError
from deeper.llm.base import LLM, RatingGroup, Sampling, stopped_at_limit
from deeper.params import mapping, number, sampling_block
from deeper.prompts import PromptSet, load_prompts

MODES = ("logprob", "json")
RATING_RULES = ("expected", "argmax")
SCALE = np.arange(1, 6, dtype=float)
FALLBACK_RATING = 3.0  # json mode: the scale midpoint, for an item the answer gives no valid rating


def mae(pred, actual) -> float:
    """Mean absolute error of one window (the paper's eps_{t|S}); both arguments 1-D, same length, finite."""
    p, a = np.asarray(pred, dtype=float), np.asarray(actual, dtype=float)
    if p.ndim != 1 or p.shape != a.shape or p.size == 0:
        raise ValueError(
            f"mae needs two non-empty 1-D arrays of one length, got shapes {p.shape} and {a.shape}"
        )
    if not (np.isfinite(p).all() and np.isfinite(a).all()):
        raise ValueError("mae got a NaN or infinite rating")
    return float(np.abs(p - a).mean())


# ---------------------------------------------------------------- settings and data


# predict.json keys left out of params: greedy, one JSON list of a window in at most 384 new tokens
JSON_SAMPLING_DEFAULTS = Sampling(
    temperature=0.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=384, seed=0
)
PREDICT_KEYS = ("mode", "rating", "windows_per_call", "json")
DEFAULT_MAX_PARSE_FAILED_SHARE = 0.05  # see PredictSettings.max_parse_failed_share


@dataclass(frozen=True)
class PredictSettings:
    mode: str = "logprob"
    rating: str = "expected"  # logprob mode: expected value or most likely digit
    # Requests handed to the backend per call: the step of the progress bar (the cached backend chunks each
    # call further to its batch size and stores every chunk as it finishes).
    windows_per_call: int = 64
    json_sampling: Sampling = JSON_SAMPLING_DEFAULTS
    # json mode: the share of items left without a valid rating after the retry past which the stage stops
    # (predict.json.max_parse_failed_share). Each such item is predicted FALLBACK_RATING (3); one in twenty at 3
    # moves a method's MAE by up to ~0.05-0.1 (|3 - actual| is up to 2 stars), the size of the differences
    # between methods the paper reports, so past 5% the numbers would measure the model's JSON, not its personas.
    max_parse_failed_share: float = DEFAULT_MAX_PARSE_FAILED_SHARE

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError("predict.mode", f"must be one of {list(MODES)}, got {self.mode!r}")
        if self.rating not in RATING_RULES:
            raise ConfigError("predict.rating", f"must be one of {list(RATING_RULES)}, got {self.rating!r}")
        if not isinstance(self.windows_per_call, int) or self.windows_per_call < 1:
            raise ConfigError(
                "predict.windows_per_call", f"must be a positive integer, got {self.windows_per_call!r}"
            )

    @classmethod
    def from_params(cls, params: dict) -> PredictSettings:
        """From the `predict` block of params.yaml (every key optional; defaults as in the dataclass)."""
        block = mapping(get(params, "predict", {}), "predict", known=PREDICT_KEYS, nullable=True)
        json_block = dict(mapping(block.get("json") or {}, "predict.json"))
        max_failed = number(
            json_block.pop("max_parse_failed_share", DEFAULT_MAX_PARSE_FAILED_SHARE),
            "predict.json.max_parse_failed_share",
            low=0.0,
            high=1.0,
        )
        sampling = sampling_block(json_block, "predict.json", defaults=JSON_SAMPLING_DEFAULTS)
        windows_per_call = number(
            block.get("windows_per_call", 64), "predict.windows_per_call", integer=True, low=1
        )
        return cls(
            mode=block.get("mode", "logprob"),
            rating=block.get("rating", "expected"),
            windows_per_call=windows_per_call,
            json_sampling=sampling,
            max_parse_failed_share=max_failed,
        )


@dataclass
class WindowRequest:
    """One persona to test against one window's items; `actual` (the user's ratings) gives the window's MAE."""

    persona: str
    item_type: str
    titles: Sequence[str]
    actual: Sequence[float] | None = None


@dataclass
class WindowPrediction:
    ratings: np.ndarray  # (n_items,) predicted ratings in [1, 5], never NaN
    mae: float | None  # vs the request's actual ratings (None without them)
    probs: np.ndarray | None = None  # logprob mode: (n_items, 5)
    digit_mass: np.ndarray | None = None  # logprob mode: (n_items,)
    failed: np.ndarray | None = None  # (n_items,) bool: True where a fallback rating was used (json: no valid
    # rating in the answer -> FALLBACK_RATING; logprob: the backend's uniform fallback)
    answer: str | None = None  # json mode: the generated text


@dataclass
class PredictStats:
    mode: str
    windows: int = 0
    items: int = 0
    digit_mass_sum: float = 0.0  # logprob mode
    backend_failed_items: int = 0  # logprob mode: items the backend returned its uniform fallback for
    parse_failed_items: int = 0  # json mode: items that got FALLBACK_RATING
    unparsed_windows: int = 0  # json mode: answers in which no rating entry was found at all
    invalid_entries: int = 0  # json mode: entries whose rating was missing, non-numeric or outside 1..5
    retried_windows: int = 0  # json mode: windows asked again (seed + 1) after an answer left an item unrated
    stopped_at_limit_windows: int = (
        0  # json mode: windows whose kept answer reached max_new_tokens (cut short)
    )
    first_failed_answer: str | None = (
        None  # json mode: the first answer that left an item unrated (messages only)
    )

    def add(self, other: PredictStats) -> None:
        """Sum every count into this one (every field but the mode, so a new count cannot be left out)."""
        if other.mode != self.mode:
            raise ValueError(f"cannot add {other.mode} prediction stats to {self.mode} ones")
        for f in fields(self):
            if f.name == "first_failed_answer":
                self.first_failed_answer = (
                    self.first_failed_answer
                    if self.first_failed_answer is not None
                    else other.first_failed_answer
                )
            elif f.name != "mode":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_metrics(self) -> dict:
        """What a reviewer reads: counts, plus the digit mass (logprob) or the failures and fallback (json)."""
        out = {"mode": self.mode, "windows": self.windows, "items": self.items}
        if self.mode == "logprob":
            out["digit_mass_mean"] = self.digit_mass_sum / self.items if self.items else None
            out["backend_failed_items"] = self.backend_failed_items
        else:
            out.update(
                parse_failed_items=self.parse_failed_items,
                parse_failed_share=self.parse_failed_items / self.items if self.items else None,
                unparsed_windows=self.unparsed_windows,
                invalid_entries=self.invalid_entries,
                retried_windows=self.retried_windows,
                stopped_at_limit_windows=self.stopped_at_limit_windows,
                stopped_at_limit_share=self.stopped_at_limit_windows / self.windows if self.windows else None,
                fallback_rating=FALLBACK_RATING,
            )
        return out


# ---------------------------------------------------------------- prediction


def predict_windows(
    llm: LLM,
    requests: Sequence[WindowRequest],
    settings: PredictSettings | None = None,
    prompts: PromptSet | None = None,
    progress: str | None = None,
) -> tuple[list[WindowPrediction], PredictStats]:
    """Predict every request's window; `progress` is a tqdm description (None: no bar)."""
    settings = settings or PredictSettings()
    prompts = prompts or load_prompts()
    for i, req in enumerate(requests):
        if len(req.titles) == 0:
            raise ValueError(f"request {i}: the window has no items")
        if req.actual is not None and len(req.actual) != len(req.titles):
            raise ValueError(f"request {i}: {len(req.titles)} titles but {len(req.actual)} actual ratings")
    step = _predict_logprob if settings.mode == "logprob" else _predict_json
    stats = PredictStats(mode=settings.mode)
    out: list[WindowPrediction] = []
    with tqdm(
        total=len(requests), desc=progress or "predict", unit="window", disable=progress is None
    ) as bar:
        for start in range(0, len(requests), settings.windows_per_call):
            chunk = requests[start : start + settings.windows_per_call]
            preds, chunk_stats = step(llm, chunk, settings, prompts)
            out.extend(preds)
            stats.add(chunk_stats)
            bar.update(len(chunk))
            if settings.mode == "json":
                # checked after every call, so a model that cannot write JSON stops a paid run early
                check_parse_failures(llm, stats, settings.max_parse_failed_share)
    return out, stats


def check_parse_failures(llm, stats: PredictStats, limit: float) -> None:
    """Stop (one line) when more than `limit` of the items so far were left without a valid rating."""
    if not stats.items or stats.parse_failed_items / stats.items <= limit:
        return
    inner = getattr(llm, "llm", llm)  # a CachedLLM wraps the backend
    first = " ".join(str(stats.first_failed_answer or "").split())
    first = first if len(first) <= 120 else first[:117] + "..."
    raise DeeperError(
        f"predict.json: {llm.backend} model {getattr(inner, 'name', '?')} left {stats.parse_failed_items} of "
        f"{stats.items} items ({stats.parse_failed_items / stats.items:.0%}) without a valid rating after the retry, "
        f"more than predict.json.max_parse_failed_share {limit:g}; first such answer: {first!r}. Use a model that "
        f"writes the JSON list, raise the limit, or predict.mode: logprob"
    )


def _window_mae(req: WindowRequest, ratings: np.ndarray) -> float | None:
    return None if req.actual is None else mae(ratings, req.actual)


def _predict_logprob(llm, requests, settings, prompts) -> tuple[list[WindowPrediction], PredictStats]:
    prefill = prompts.prefill("predict_item")
    groups = [
        RatingGroup(
            chats=[
                prompts.render("predict_item", persona=r.persona, item_type=r.item_type, item=t)
                for t in r.titles
            ],
            prefill=prefill,
        )
        for r in requests
    ]
    results = llm.rating_probs(groups)
    if len(results) != len(groups):
        raise RuntimeError(
            f"backend {llm.backend} returned {len(results)} results for {len(groups)} rating groups"
        )
    stats = PredictStats(mode="logprob")
    preds = []
    for req, res in zip(requests, results):
        probs = np.asarray(res.probs, dtype=float)
        if probs.shape != (len(req.titles), 5) or not np.isfinite(probs).all():
            raise RuntimeError(f"backend {llm.backend} returned rating probabilities of shape {probs.shape}")
        ratings = probs @ SCALE if settings.rating == "expected" else probs.argmax(axis=1) + 1.0
        mass = None if res.digit_mass is None else np.asarray(res.digit_mass, dtype=float)
        failed = np.zeros(len(req.titles), bool) if res.failed is None else np.asarray(res.failed, dtype=bool)
        preds.append(
            WindowPrediction(ratings, _window_mae(req, ratings), probs=probs, digit_mass=mass, failed=failed)
        )
        stats.windows += 1
        stats.items += len(req.titles)
        stats.backend_failed_items += int(failed.sum())
        stats.digit_mass_sum += float(mass.sum()) if mass is not None else math.nan
    return preds, stats


def _predict_json(llm, requests, settings, prompts) -> tuple[list[WindowPrediction], PredictStats]:
    chats = [
        prompts.render("predict", persona=r.persona, item_type=r.item_type, items=list(r.titles))
        for r in requests
    ]
    answers = [texts[0] for texts in llm.generate(chats, 1, settings.json_sampling)]
    parsed_all = [parse_json_ratings(a, r.titles) for a, r in zip(answers, requests)]
    # one retry, seed + 1, for the windows whose answer left an item without a valid rating
    retry = [i for i, parsed in enumerate(parsed_all) if None in parsed.ratings]
    if retry:
        again = llm.generate(
            [chats[i] for i in retry],
            1,
            replace(settings.json_sampling, seed=settings.json_sampling.seed + 1),
        )
        for i, texts in zip(retry, again):
            answer = texts[0]
            parsed = parse_json_ratings(answer, requests[i].titles)
            if parsed.ratings.count(None) < parsed_all[i].ratings.count(None):
                answers[i], parsed_all[i] = answer, parsed
    stats = PredictStats(mode="json", retried_windows=len(retry))
    preds = []
    for req, answer, parsed in zip(requests, answers, parsed_all):
        ratings = np.array([FALLBACK_RATING if r is None else r for r in parsed.ratings], dtype=float)
        ok = np.array([r is not None for r in parsed.ratings])
        preds.append(WindowPrediction(ratings, _window_mae(req, ratings), failed=~ok, answer=answer))
        stats.windows += 1
        stats.items += len(req.titles)
        stats.parse_failed_items += int((~ok).sum())
        if (~ok).any() and stats.first_failed_answer is None:
            stats.first_failed_answer = str(answer)
        stats.unparsed_windows += int(parsed.entries == 0)
        stats.invalid_entries += parsed.invalid_entries
        stats.stopped_at_limit_windows += stopped_at_limit(answer)
    return preds, stats


# ---------------------------------------------------------------- lenient JSON answers


@dataclass
class ParsedAnswer:
    ratings: list[float | None]  # per item of the window, in order; None: no valid rating found
    entries: int  # rating entries found in the answer (0: nothing parseable)
    invalid_entries: int  # entries found whose rating is missing, non-numeric or outside 1..5


_FENCE_RE = re.compile(r"```[ \t]*[\w-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_OBJECT_RE = re.compile(r"\{[^{}]*\}", re.DOTALL)
_NAME_RE = re.compile(r"""["']?item_name["']?\s*:\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)')""", re.DOTALL)
_RATING_RE = re.compile(r"""["']?predict_rating["']?\s*:\s*["']?\s*(-?\d+(?:\.\d+)?)""")
_NUMBER_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*5)?\s*$")


def normalise_name(text: str) -> str:
    """Compare titles by letters and digits only (case, accents' composition, quotes and spaces ignored)."""
    return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", str(text)).casefold())


def _rating_value(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        x = float(value)
    else:
        m = _NUMBER_RE.match(str(value))
        if not m:
            return None
        x = float(m.group(1))
    return x if math.isfinite(x) and 1.0 <= x <= 5.0 else None


def _entries_from_json(candidate: str) -> list[tuple[str | None, object]]:
    """The first JSON list of rating objects in `candidate` (text around it ignored; a list wrapped in an
    object such as {"ratings": [...]} counts), as (name, raw rating) pairs."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", candidate):
        try:
            value, _ = decoder.raw_decode(candidate, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            value = next((v for v in value.values() if isinstance(v, list)), None)
        objs = [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []
        if objs and any("predict_rating" in o or "item_name" in o for o in objs):
            return [(o.get("item_name"), o.get("predict_rating")) for o in objs]
    return []


def _entries_from_fragments(candidate: str) -> list[tuple[str | None, object]]:
    """Broken JSON (single quotes, missing commas, cut off): read each {...} object with two regexes."""
    entries = []
    for obj in _OBJECT_RE.findall(candidate):
        rating = _RATING_RE.search(obj)
        name = _NAME_RE.search(obj)
        if not rating and not name:
            continue
        name_text = None
        if name:
            name_text = name.group(1) if name.group(1) is not None else name.group(2)
            try:
                name_text = json.loads(f'"{name_text}"') if name.group(1) is not None else name_text
            except json.JSONDecodeError:
                pass
        entries.append((name_text, rating.group(1) if rating else None))
    return entries


def _extract_entries(text: str) -> list[tuple[str | None, object]]:
    """Rating entries of an answer: from a JSON list where there is one, else (or where a broken answer
    yields more) from its {...} fragments. Code fences are looked into first."""
    candidates = [m.group(1) for m in _FENCE_RE.finditer(text)] + [text]
    best: list = []
    for candidate in candidates:
        for entries in (_entries_from_json(candidate), _entries_from_fragments(candidate)):
            if len(entries) > len(best):
                best = entries
        if best:
            return best
    return best


def parse_json_ratings(text: str, titles: Sequence[str]) -> ParsedAnswer:
    """Match the answer's entries to the window's items: by normalised title (exact, then containment, first
    unassigned item in order, so repeated titles fill in order), then leftover entries by position when the
    answer has one entry per item. Items left without a valid rating are None."""
    entries = _extract_entries(text or "")
    n = len(titles)
    keys = [normalise_name(t) for t in titles]
    ratings: list[float | None] = [None] * n
    taken = [False] * n
    invalid = 0
    leftovers = []
    for pos, (name, raw) in enumerate(entries):
        value = _rating_value(raw)
        key = normalise_name(name) if isinstance(name, str) else ""
        j = None
        if key:
            j = next((i for i in range(n) if not taken[i] and keys[i] == key), None)
            if j is None and len(key) >= 3:
                j = next(
                    (i for i in range(n) if not taken[i] and keys[i] and (key in keys[i] or keys[i] in key)),
                    None,
                )
        if j is None:
            leftovers.append((pos, value, raw))
            continue
        taken[j] = True
        if value is None:
            invalid += 1
        else:
            ratings[j] = value
    if len(entries) == n:
        for pos, value, _raw in leftovers:
            if not taken[pos]:
                taken[pos] = True
                if value is None:
                    invalid += 1
                else:
                    ratings[pos] = value
    else:
        invalid += sum(1 for _pos, value, raw in leftovers if value is None and raw is not None)
    return ParsedAnswer(ratings=ratings, entries=len(entries), invalid_entries=invalid)
