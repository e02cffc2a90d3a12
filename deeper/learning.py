"""Did training teach the policy what its pairs encode? Held-out preference pairs scored by a policy and its base.

For every held-out pair (prompt, chosen, rejected), the summed log-probability of each completion under the
trained policy (base model + adapter, loaded the way the evaluation loads it: deeper.llm.load_llm) and under the
base model alone:
- preference accuracy: the share of pairs whose chosen completion the model finds more likely than the
  rejected one, log p(chosen) > log p(rejected), for the policy and for the base;
- implicit reward margin (DPO's): beta x [(log p(chosen) - log p_base(chosen)) - (log p(rejected) -
  log p_base(rejected))], > 0 where training moved probability towards the chosen text; reward accuracy: the
  share of pairs with a margin > 0.
Intervals: a bootstrap over contexts (a context's pairs share a prompt, so they are resampled together).

Also the diagnostic world's synthetic users (deeper/diagnostic.py) as the pipeline's users: `world_users`; and
why an iteration made the pairs it made: `pair_yield`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from deeper.bootstrap import BootstrapSettings, percentile_interval
from deeper.diagnostic import Tastes, synthetic_users
from deeper.iteration import UserWindows
from deeper.methods.base import Window
from deeper.reward import NEW_COLUMNS, OLD_COLUMNS, is_negative, is_positive


def completion_logps(llm, pairs: pd.DataFrame) -> np.ndarray:
    """(pairs, 2): summed log p of the chosen and the rejected completion after each pair's prompt (chat JSON),
    under a transformers backend's model (`llm.model`, `llm.tokenizer`: with an adapter, merged at load)."""
    import torch

    model, tokenizer = llm.model, llm.tokenizer
    out = np.zeros((len(pairs), 2))
    with torch.no_grad():
        for i, (prompt, chosen, rejected) in enumerate(
            zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])
        ):
            messages = json.loads(prompt)
            head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
            for j, completion in enumerate((chosen, rejected)):
                whole = tokenizer.apply_chat_template(
                    messages + [{"role": "assistant", "content": completion}], tokenize=False
                )
                ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
                if ids[: len(head_ids)] != head_ids:
                    raise ValueError(
                        "the chat template renders the prompt differently with an answer after it"
                    )
                tensor = torch.tensor([ids], device=model.device)
                logits = model(input_ids=tensor).logits[0, :-1].float()
                logps = torch.log_softmax(logits, -1).gather(-1, tensor[0, 1:, None])[:, 0]
                out[i, j] = float(logps[len(head_ids) - 1 :].sum())
    return out


def preference_report(
    policy: np.ndarray,
    base: np.ndarray,
    contexts: Sequence[str],
    beta: float,
    bootstrap: BootstrapSettings | None = None,
) -> dict:
    """policy, base: completion_logps of the same pairs. Point estimates and intervals (resampling contexts) of
    the policy's and the base's preference accuracy, their difference, the implicit reward margin and the
    reward accuracy."""
    bootstrap = bootstrap or BootstrapSettings()
    names, index = np.unique(np.asarray(contexts), return_inverse=True)
    policy_right = (policy[:, 0] > policy[:, 1]).astype(float)
    base_right = (base[:, 0] > base[:, 1]).astype(float)
    margin = beta * ((policy[:, 0] - base[:, 0]) - (policy[:, 1] - base[:, 1]))
    values = {
        "policy_accuracy": policy_right,
        "base_accuracy": base_right,
        "accuracy_gain": policy_right - base_right,
        "implicit_margin": margin,
        "reward_accuracy": (margin > 0).astype(float),
    }
    rng = np.random.default_rng(bootstrap.seed)
    draws = rng.integers(0, len(names), size=(bootstrap.resamples, len(names)))
    counts = np.stack([np.bincount(d, minlength=len(names)) for d in draws])  # (resamples, contexts)
    pairs_per_context = np.bincount(index, minlength=len(names))
    weights = counts[:, index]  # each pair weighs as often as its context was drawn
    out: dict[str, Any] = {"pairs": len(contexts), "contexts": len(names)}
    for name, v in values.items():
        resampled = (weights * v).sum(axis=1) / (counts * pairs_per_context).sum(axis=1)
        out[name] = percentile_interval(v.mean(), resampled, bootstrap.level)
    return out


def world_users(
    catalog: Sequence[tuple[str, frozenset[str]]],
    genres: Sequence[str],
    users: int,
    windows: int,
    size: int,
    seed: int,
    noise: float = 0.5,
    domain: str = "tastes",
    id_prefix: str = "u",
    loved: str | None = None,
) -> list[tuple[UserWindows, Tastes]]:
    """deeper.diagnostic.synthetic_users as the pipeline's users (UserWindows of item type movie)."""
    made = synthetic_users(catalog, genres, users, windows, size, seed, noise, id_prefix, loved)
    return [
        (
            UserWindows(
                domain,
                u.user_id,
                "movie",
                tuple(
                    Window(titles=tuple(t for t, _ in w), ratings=tuple(r for _, r in w)) for w in u.windows
                ),
            ),
            u.tastes,
        )
        for u in made
    ]


def first_update_contrasts(
    table: pd.DataFrame, refiners: dict[str, str], bootstrap: BootstrapSettings
) -> dict:
    """The held-out first-update reward r (plots/first_update_reward.csv: method, part, domain, user_id, reward)
    of several refiners on the same evaluation users: each one's mean and every refiner minus the first, with
    paired intervals over users (deeper.bootstrap.paired_means). `refiners`: {label: method}, the first the base."""
    from deeper.bootstrap import paired_means

    r = table[table["part"] == "r"]
    missing = [m for m in refiners.values() if m not in set(r["method"])]
    if missing:
        raise ValueError(f"no first-update reward of {missing} (methods: {sorted(set(r['method']))})")
    wide = r.pivot_table(index=["domain", "user_id"], columns="method", values="reward", aggfunc="first")
    wide = wide[list(refiners.values())].dropna()  # users every refiner was scored on
    labels = list(refiners)
    values = {label: wide[refiners[label]].to_numpy() for label in labels}
    contrasts = {f"{label} - {labels[0]}": (label, labels[0]) for label in labels[1:]}
    out = paired_means(values, wide.index.get_level_values("domain").to_numpy(), bootstrap, contrasts)
    return {**out, "users": len(wide)}


def pair_yield(rewards: pd.DataFrame, tau_pos: float, tau_neg: float, delta: float) -> dict:
    """Why an iteration made the pairs it made: per context, the spread of its candidates' rewards (a pair needs
    a candidate above tau_pos and one below tau_neg, delta apart, in one context), and how the candidates'
    errors compare with the old persona's. `rewards`: a reward stage's table (context_id, r, old_eps_*,
    new_eps_*)."""
    scored = rewards[rewards["r"].notna()]
    by_context = scored.groupby("context_id")["r"]
    spread = by_context.max() - by_context.min()
    has_pos = by_context.apply(lambda r: bool(is_positive(r, tau_pos).any()))
    has_neg = by_context.apply(lambda r: bool(is_negative(r, tau_neg).any()))
    return {
        "candidates": len(scored),
        "contexts": len(spread),
        "better_than_old": int((scored["r"] > 0).sum()),
        "positives": int(is_positive(scored["r"], tau_pos).sum()),
        "negatives": int(is_negative(scored["r"], tau_neg).sum()),
        "contexts_with_positive_and_negative": int((has_pos & has_neg).sum()),
        "contexts_spread_at_least_delta": int((spread >= delta).sum()),
        "contexts_all_equal": int((spread <= 1e-9).sum()),
        "old_eps_mean": float(scored[list(OLD_COLUMNS)].to_numpy().mean()),
        "new_eps_mean": float(scored[list(NEW_COLUMNS)].to_numpy().mean()),
    }
