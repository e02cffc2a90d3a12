"""DEEPER's iterative offline RL (paper Sec. 3.4, Appendix A.5): contexts, candidate sampling, candidate errors.

A context is one refinement step at time t of one training user: the old persona S_{t-1} and the
observation O_t (the actual ratings of window W_t and those the frozen model predicted with S_{t-1}). Its
prompt is the refine template, rendered exactly as the `deeper` evaluation method renders it (training
prompt = deployment prompt). The old persona's errors on W_{t-1}, W_t and W_{t+1} (`old_eps_prev/curr/fut`)
are computed once per context and shared by all its candidates.

- iteration 1: contexts (S_0, O_1) at t = 1 for every training user (`states_from_personas`).
- iteration 2: Model 1 refines each iteration-1 context once, S_0 -> S_1 (`refine_states`), and S_1 gives
  the new contexts (S_1, O_2) at t = 2; iteration 2 samples on the iteration-1 contexts plus these.
- sampling: M candidates per context from the policy (`sample_candidates`), taken as the evaluation's
  update takes an answer: cleaned; one with no text ("empty") cannot be role-played and is dropped
  (counted); a looping one ("repetitive") is kept and flagged.
- candidate errors: each candidate predicts W_{t-1}, W_t, W_{t+1} with the frozen model
  (`candidate_errors`, columns `new_eps_*`); deeper/reward.py turns old and new errors into rewards.

Every LLM call goes through the caller's LLM, a CachedLLM in the stages: it chunks the calls, shows
progress and stores each chunk as it returns, so a killed stage resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deeper.config import get
from deeper.errors import ConfigError, InputError
from deeper.llm.base import LLM, Sampling, limit_counts
from deeper.methods.base import FAILED_REASONS, FLAGGED_REASONS, UpdateInput, Window
from deeper.methods.refine import Refine
from deeper.params import number, sampling_block
from deeper.personas import clean_persona, count_words, degenerate_reason
from deeper.predict import PredictSettings, PredictStats, WindowRequest, predict_windows
from deeper.prompts import PromptSet, load_prompts
from deeper.reward import NEW_COLUMNS, OLD_COLUMNS, PARTS
from deeper.tables import (
    CONTEXT_COLUMNS,
    PERSONA_COLUMNS,
    SAMPLE_COLUMNS,
    read_windows,
)

# Windows of refinement step t, relative to t: previous, current, future (the reward's three parts).
OFFSETS = dict(zip(PARTS, (-1, 0, 1)))


def context_id(domain: str, user_id: str, t: int) -> str:
    """Stable across runs and iterations: pair splits hash it, iteration 2 reuses the iteration-1 ids."""
    return f"{domain}/{user_id}/t{t}"


# ---------------------------------------------------------------- settings and models

POLICY_ROLES = ("policy", "sampler")  # the params blocks models.<role> that load_policy can load


@dataclass(frozen=True)
class SampleSettings:
    """params `sample`: n candidates per context and how they are drawn (also S_1's one sample)."""

    n: int
    sampling: Sampling

    @classmethod
    def from_params(cls, params: dict) -> SampleSettings:
        block = get(params, "sample")
        sampling = sampling_block(block, "sample", extra=("n",))
        return cls(n=number(get(params, "sample.n"), "sample.n", integer=True, low=1), sampling=sampling)


def load_policy(params: dict, adapter: str | Path | None = None, role: str = "policy"):
    """The policy of params `models.<role>` (+ a LoRA adapter folder) behind the response cache. `role` is
    "policy" (the refiner DPO trains, and Models 1 and 2 on it) or "sampler" (the model that samples iteration
    1's candidates; a block of its own so that training another backbone on the same pairs re-runs training and
    what follows, not the sampling: the paper's Table 26)."""
    from deeper.llm.loading import load_cached

    if role not in POLICY_ROLES:
        raise ConfigError("role", f"{role!r} is not one of {', '.join(POLICY_ROLES)}")
    if adapter is not None and not Path(adapter).is_dir():
        raise InputError(adapter, "adapter folder not found; run the previous iteration's train stage first")
    return load_cached(get(params, f"models.{role}"), adapter=adapter, where=f"models.{role}")


def load_frozen(params: dict):
    """The frozen model of params `models.frozen` (all predictions) behind the response cache."""
    from deeper.llm.loading import load_cached

    return load_cached(get(params, "models.frozen"), where="models.frozen")


def load_frozen_and_writer(params: dict, role: str, adapter: str | Path | None = None) -> tuple:
    """(frozen model, the model of params `models.<role>` + `adapter` that writes persona updates), both behind
    the response cache; one model, loaded once, where both blocks name the same model and there is no adapter."""
    from deeper.llm.loading import load_cached

    frozen = load_frozen(params)
    if adapter is None and get(params, f"models.{role}") == get(params, "models.frozen"):
        return frozen, frozen
    return frozen, load_cached(get(params, f"models.{role}"), adapter=adapter, where=f"models.{role}")


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class UserWindows:
    domain: str
    user_id: str
    item_type: str
    windows: tuple[Window, ...]  # W_0, W_1, ... in order


@dataclass(frozen=True)
class State:
    """A user's persona S_{t-1} before refinement step t (the context's old persona)."""

    user: UserWindows
    t: int
    persona: str


def user_windows(windows: pd.DataFrame, split: str = "train") -> list[UserWindows]:
    """The users of `split` with all their windows, from a table validated by `deeper.tables.read_windows`."""
    users = []
    for (domain, user_id), rows in windows[windows["split"] == split].groupby(
        ["domain", "user_id"], sort=True
    ):
        windows_of_user = tuple(
            Window(titles=tuple(w["title"]), ratings=tuple(float(r) for r in w["rating"]))
            for _, w in rows.groupby("window", sort=True)
        )
        users.append(UserWindows(domain, str(user_id), rows["item_type"].iloc[0], windows_of_user))
    return users


def read_user_windows(path: str | Path, split: str = "train") -> list[UserWindows]:
    """The users of `split` in windows.parquet with all their windows; InputError (file, row) on bad rows."""
    return user_windows(read_windows(path), split)


def states_from_personas(users: Sequence[UserWindows], personas: dict[tuple[str, str], str], t: int = 1):
    """The states of step t: S_{t-1} = `personas`' persona of every user that has one and windows up to t+1.

    Returns (states, skipped): skipped counts users by reason ("no_persona", "too_few_windows")."""
    states, skipped = [], {"no_persona": 0, "too_few_windows": 0}
    for user in users:
        persona = personas.get((user.domain, user.user_id))
        if persona is None:
            skipped["no_persona"] += 1
        elif len(user.windows) < t + 2:
            skipped["too_few_windows"] += 1
        else:
            states.append(State(user, t, persona))
    return states, skipped


# ---------------------------------------------------------------- contexts


def _window_requests(state: State) -> list[WindowRequest]:
    """Requests for W_{t-1}, W_t, W_{t+1} (in PARTS order) with the state's persona."""
    return [
        WindowRequest(
            persona=state.persona, item_type=state.user.item_type, titles=w.titles, actual=w.ratings
        )
        for w in (state.user.windows[state.t + o] for o in OFFSETS.values())
    ]


def update_input(state: State, predictions: Iterable[float]) -> UpdateInput:
    """The refine method's input: S_{t-1}, the history up to W_t and the ratings predicted for W_t."""
    return UpdateInput(
        item_type=state.user.item_type,
        persona=state.persona,
        history=tuple(state.user.windows[: state.t + 1]),
        predictions=tuple(float(p) for p in predictions),
    )


def refine_chat(item: UpdateInput, prompts: PromptSet, update: type = Refine) -> list[dict]:
    """The update's prompt exactly as the evaluation method renders it (it needs no model for that): the refine
    prompt for DEEPER; another update's (params refiner.update) for an ablation such as Inc-FT."""
    return update(llm=None, sampling=Sampling(), prompts=prompts).chat(item)


def build_contexts(
    states: Sequence[State],
    frozen: LLM,
    settings: PredictSettings,
    prompts: PromptSet | None = None,
    progress: str | None = "contexts: predict with the old personas",
    update: type = Refine,
) -> tuple[pd.DataFrame, PredictStats]:
    """One context per state: the old persona's three errors and the prompt of `update` (CONTEXT_COLUMNS)."""
    prompts = prompts or load_prompts()
    requests = [req for s in states for req in _window_requests(s)]
    preds, stats = predict_windows(frozen, requests, settings, prompts, progress=progress)
    rows = []
    for i, state in enumerate(states):
        mine = dict(zip(PARTS, preds[3 * i : 3 * i + 3]))
        old_errors = {}
        for part, col in zip(PARTS, OLD_COLUMNS):
            error = mine[part].mae
            assert error is not None  # each request of _window_requests carries the window's actual ratings
            old_errors[col] = float(error)
        item = update_input(state, mine["curr"].ratings)
        rows.append(
            {
                "context_id": context_id(state.user.domain, state.user.user_id, state.t),
                "domain": state.user.domain,
                "user_id": state.user.user_id,
                "t": state.t,
                "item_type": state.user.item_type,
                "persona_old": state.persona,
                "predicted": list(item.predictions),
                "prompt": json.dumps(refine_chat(item, prompts, update), ensure_ascii=False),
                **old_errors,
            }
        )
    return pd.DataFrame(rows, columns=list(CONTEXT_COLUMNS)), stats


REFINED_COLUMNS = (*PERSONA_COLUMNS, "t", "context_id", "failure", "flag")


def refine_personas(
    contexts: pd.DataFrame,
    users: Sequence[UserWindows],
    policy: LLM,
    sampling: Sampling,
    prompts: PromptSet | None = None,
    source: str = "contexts",
    update: type = Refine,
) -> tuple[pd.DataFrame, dict]:
    """The policy refines each context's old persona once, S_{t-1} -> S_t (REFINED_COLUMNS; `t` is the step
    the new persona is the old persona of, `context_id` the context it was refined from).

    This is the `deeper` evaluation method itself (Refine.update on each context's own input): an update
    with no text keeps the old persona (failure "empty"), a looping one is used (flag "repetitive")."""
    prompts = prompts or load_prompts()
    by_user = {(u.domain, u.user_id): u for u in users}
    items = []
    for row_number, row in enumerate(contexts.itertuples(index=False), 1):
        user = by_user.get((row.domain, row.user_id))
        if user is None:
            raise InputError(source, f"context {row.context_id}: user not in the windows file", row_number)
        item = update_input(State(user, int(row.t), row.persona_old), row.predicted)
        if refine_chat(item, prompts, update) != json.loads(row.prompt):
            raise InputError(
                source, f"context {row.context_id}: prompt differs from its persona and windows", row_number
            )
        items.append(item)
    results = update(policy, sampling, prompts).update(items)
    out = pd.DataFrame(
        {
            "domain": contexts["domain"].to_numpy(),
            "user_id": contexts["user_id"].to_numpy(),
            "split": "train",
            "persona": [r.persona for r in results],
            "t": contexts["t"].to_numpy() + 1,
            "context_id": contexts["context_id"].to_numpy(),
            "failure": [r.failure for r in results],
            "flag": [r.flag for r in results],
        },
        columns=list(REFINED_COLUMNS),
    )
    counts = {
        "refined": len(out),
        **{r: int((out["failure"] == r).sum()) for r in FAILED_REASONS},
        **{r: int((out["flag"] == r).sum()) for r in FLAGGED_REASONS},
        "words": float(out["persona"].map(count_words).mean()) if len(out) else None,
    }
    counts.update(
        limit_counts(answer for r in results for answer in r.generated)
    )  # answers cut at max_new_tokens
    return out, counts


# ---------------------------------------------------------------- candidates


def clean_candidate(raw: str) -> tuple[str, str | None]:
    """A generated candidate as the evaluation's update would take it (deeper.methods.base.finish), and why
    it is degenerate: a FAILED_REASONS entry (the evaluation would keep the old persona: dropped here), a
    FLAGGED_REASONS entry (used as written: kept), or None."""
    text = clean_persona(raw)
    return text, degenerate_reason(text, min_words=0)


def sample_candidates(
    contexts: pd.DataFrame, policy: LLM, n: int, sampling: Sampling
) -> tuple[pd.DataFrame, dict]:
    """n candidate refinements per context (SAMPLE_COLUMNS) and counts for metrics.

    All chats go to the policy in one call (a CachedLLM chunks, shows progress and resumes); sample k of a
    context is drawn with seed sampling.seed + k, so the table does not depend on a resumed run. Candidates
    the evaluation would reject ("empty") are dropped, looping ones ("repetitive") kept with their flag."""
    chats = [json.loads(p) for p in contexts["prompt"]]
    ids = list(contexts["context_id"])
    old = dict(zip(ids, contexts["persona_old"]))
    rows = []
    counts: dict[str, Any] = {
        "contexts": len(ids),
        "requested": len(ids) * n,
        **dict.fromkeys(FAILED_REASONS + FLAGGED_REASONS, 0),
        "duplicate_texts": 0,
        "copies_old_persona": 0,
    }
    answers = policy.generate(chats, n, sampling)
    # every requested candidate, kept or dropped, that reached max_new_tokens (cut short)
    counts.update(limit_counts(text for texts in answers for text in texts))
    for cid, texts in zip(ids, answers):
        if len(texts) != n:
            raise RuntimeError(f"backend returned {len(texts)} samples for context {cid}, asked {n}")
        seen = set()
        for k, raw in enumerate(texts):
            text, reason = clean_candidate(raw)
            if reason is not None:
                counts[reason] += 1
            if reason in FAILED_REASONS:
                continue
            counts["duplicate_texts"] += text in seen
            counts["copies_old_persona"] += text == clean_persona(old[cid])
            seen.add(text)
            rows.append(
                {"context_id": cid, "sample": k, "text": text, "words": count_words(text), "flag": reason}
            )
    samples = pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS))
    counts["kept"] = len(samples)
    words = samples["words"]
    counts["words"] = (
        {"mean": float(words.mean()), "min": int(words.min()), "max": int(words.max())}
        if len(samples)
        else {}
    )
    return samples, counts


def candidate_errors(
    contexts: pd.DataFrame,
    samples: pd.DataFrame,
    users: Sequence[UserWindows],
    frozen: LLM,
    settings: PredictSettings,
    prompts: PromptSet | None = None,
    progress: str | None = "rewards: predict with the candidates",
) -> tuple[pd.DataFrame, PredictStats]:
    """Each candidate's errors on its context's W_{t-1}, W_t, W_{t+1} (new_eps_*), beside the old persona's
    (old_eps_*): one row per candidate, ready for deeper.reward.compute_rewards."""
    by_user = {(u.domain, u.user_id): u for u in users}
    ctx = contexts.set_index("context_id")
    requests = []
    for cid, text in zip(samples["context_id"], samples["text"]):
        row = ctx.loc[cid]
        user = by_user.get((row["domain"], row["user_id"]))
        if user is None or len(user.windows) < int(row["t"]) + 2:
            raise InputError(
                "contexts",
                f"context {cid}: windows {int(row['t']) - 1}..{int(row['t']) + 1} not in the windows file",
            )
        requests.extend(_window_requests(State(user, int(row["t"]), text)))
    preds, stats = predict_windows(frozen, requests, settings, prompts or load_prompts(), progress=progress)
    out = samples[["context_id", "sample", "text"]].reset_index(drop=True)
    maes = np.array([p.mae for p in preds], dtype=float).reshape(len(out), len(PARTS))
    for j, col in enumerate(NEW_COLUMNS):
        out[col] = maes[:, j]
    old = ctx[list(OLD_COLUMNS)].reindex(out["context_id"]).reset_index(drop=True)
    return pd.concat([out, old], axis=1), stats
