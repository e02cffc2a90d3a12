"""Persona headroom: how much can any persona move the frozen model's predictions? (Run it before training.)

A refiner can only help if the frozen model reads the persona. On the evaluation users, the frozen model
predicts one future window W_w (params `headroom.window`, default W_1: the window the evaluation's round 0
predicts with S_0) given each of these personas (CONDITIONS):
- none: an empty persona (the prompt's persona section left blank),
- shuffled: another user's S_0 from the same domain (a seeded derangement; a domain with one user borrows
  from the other domains, counted in `shuffled_across_domains`),
- own: the user's own S_0 (its error is the evaluation's round-0 error),
- oracle: a persona written by the same frozen model with the same persona prompt (`init`) and settings
  (params `persona`) from W_w itself, the very window being predicted,
- oracle_all: the same, written from all of the user's windows W_0 .. W_last.
Two differences summarise it (CONTRASTS, paired over users):
- sensitivity = MAE(shuffled) - MAE(own): > 0 when the model predicts better from the right user's persona,
  i.e. it reads personas at all; an interval through 0 means another user's persona serves as well;
- headroom = MAE(own) - MAE(oracle): what a persona that knew the answer gains over S_0, a practical ceiling
  for any refinement (headroom_all: the same with oracle_all).
The spread of predictions within a window (mean over users of the standard deviation of the window's
predicted ratings) says whether the model tells items apart at all: a model that predicts ~3 for everything
has no room for a persona to act on.

Intervals: deeper.bootstrap.paired_means, the report's paired bootstrap over users (resampled within domains,
each domain weighing the same), with params `evaluate.bootstrap`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from deeper.bootstrap import BootstrapSettings, paired_means
from deeper.config import get
from deeper.errors import ConfigError
from deeper.params import mapping, number
from deeper.personas import PersonaSettings, generate_personas, init_chat
from deeper.predict import PredictSettings, WindowRequest, predict_windows
from deeper.prompts import PromptSet
from deeper.rollout import EvalUser

CONDITIONS = ("none", "shuffled", "own", "oracle", "oracle_all")
CONTRASTS = {
    "sensitivity": ("shuffled", "own"),
    "headroom": ("own", "oracle"),
    "headroom_all": ("own", "oracle_all"),
}
# One row per user and condition (data/headroom/users.parquet).
COLUMNS = ("domain", "user_id", "condition", "persona", "mae", "spread", "predicted", "actual")
HEADROOM_KEYS = ("window", "seed")


@dataclass(frozen=True)
class HeadroomSettings:
    """params `headroom`: the window predicted (>= 1: W_0 wrote S_0) and the seed of the shuffle."""

    window: int = 1
    seed: int = 0

    @classmethod
    def from_params(cls, params: dict) -> HeadroomSettings:
        block = mapping(get(params, "headroom"), "headroom", known=HEADROOM_KEYS)
        window = number(block.get("window", 1), "headroom.window", integer=True, low=1)
        count = get(params, "window.count", None)
        if isinstance(count, int) and window >= count:
            raise ConfigError(
                "headroom.window",
                f"W_{window} does not exist: users have window.count={count} windows (W_0 .. W_{count - 1})",
            )
        return cls(window, number(block.get("seed", 0), "headroom.seed", integer=True, low=0))


def shuffled_donors(users: Sequence[EvalUser], seed: int) -> tuple[list[int], int]:
    """For each user, the index of another user whose S_0 it gets: a seeded derangement within the user's
    domain (a random cycle through its users), and over all users for a domain with a single user. Returns
    (donors, users whose donor came from another domain)."""
    rng = np.random.default_rng(seed)
    donors = [-1] * len(users)
    across = 0
    by_domain: dict[str, list[int]] = {}
    for i, user in enumerate(users):
        by_domain.setdefault(user.domain, []).append(i)
    for domain in sorted(by_domain):
        members = by_domain[domain]
        if len(members) == 1:
            if len(users) < 2:
                raise ConfigError(
                    "evaluate.users", "the shuffled condition needs at least two evaluation users"
                )
            others = [j for j in range(len(users)) if j != members[0]]
            donors[members[0]] = others[int(rng.integers(len(others)))]
            across += 1
            continue
        cycle = [members[k] for k in rng.permutation(len(members))]
        for k, i in enumerate(cycle):
            donors[i] = cycle[(k + 1) % len(cycle)]
    return donors, across


def check_window(users: Sequence[EvalUser], window: int) -> None:
    """ConfigError naming the first user without W_window (before any model is loaded)."""
    short = [u for u in users if len(u.windows) <= window]
    if short:
        raise ConfigError(
            "headroom.window",
            f"W_{window} does not exist: user {short[0].user_id} has windows "
            f"W_0 .. W_{len(short[0].windows) - 1}",
        )


@dataclass
class HeadroomResult:
    table: (
        pd.DataFrame
    )  # COLUMNS, one row per user and condition, users in order, conditions in CONDITIONS order
    summary: dict  # metrics/headroom.json


def measure(
    users: Sequence[EvalUser],
    frozen,
    prompts: PromptSet,
    persona: PersonaSettings,
    predict: PredictSettings,
    settings: HeadroomSettings,
    bootstrap: BootstrapSettings,
    log: Callable[[str], None] | None = None,
) -> HeadroomResult:
    """Every condition's error on W_{settings.window} for every user, and the summary with intervals."""
    w = settings.window
    check_window(users, w)
    donors, across = shuffled_donors(users, settings.seed)

    def written_from(user: EvalUser, windows) -> list:
        return init_chat(
            prompts,
            user.item_type,
            (item for window in windows for item in zip(window.titles, window.ratings)),
        )

    chats = [written_from(u, [u.windows[w]]) for u in users] + [written_from(u, u.windows) for u in users]
    written = generate_personas(frozen, chats, persona, log=log)
    n = len(users)
    personas = {
        "none": [""] * n,
        "shuffled": [users[d].persona0 for d in donors],
        "own": [u.persona0 for u in users],
        "oracle": written.personas[:n],
        "oracle_all": written.personas[n:],
    }
    requests = [
        WindowRequest(personas[c][i], u.item_type, u.windows[w].titles, u.windows[w].ratings)
        for c in CONDITIONS
        for i, u in enumerate(users)
    ]
    predictions, stats = predict_windows(frozen, requests, predict, prompts, progress=f"headroom W_{w}")

    rows = []
    for k, (request, prediction) in enumerate(zip(requests, predictions)):
        user = users[k % n]
        assert request.actual is not None  # every request above carries the window's ratings
        rows.append(
            (
                user.domain,
                user.user_id,
                CONDITIONS[k // n],
                request.persona,
                prediction.mae,
                float(np.std(prediction.ratings)),
                [float(x) for x in prediction.ratings],
                [float(x) for x in request.actual],
            )
        )
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    # users x conditions, in the users' order (the bootstrap pairs them by position)
    mae = {c: table["mae"].to_numpy()[i * n : (i + 1) * n] for i, c in enumerate(CONDITIONS)}
    intervals = paired_means(mae, [u.domain for u in users], bootstrap, CONTRASTS)
    spread = {
        c: float(table["spread"].to_numpy()[i * n : (i + 1) * n].mean()) for i, c in enumerate(CONDITIONS)
    }
    summary = {
        "window": w,
        "users": n,
        "domains": sorted({u.domain for u in users}),
        "conditions": {c: {"mae": intervals["means"][c], "spread": spread[c]} for c in CONDITIONS},
        **intervals["contrasts"],
        "shuffled_across_domains": across,
        "oracle_stopped_at_limit_share": float(np.mean(written.stopped_at_limit)),
        "predict": stats.to_metrics(),
        "bootstrap": {"resamples": bootstrap.resamples, "level": bootstrap.level, "seed": bootstrap.seed},
    }
    return HeadroomResult(table, summary)


def plot_rows(summary: dict) -> list[dict]:
    """plots/headroom.csv: one row per condition, its mean MAE and interval (the `headroom` template draws
    them as points with error bars)."""
    return [
        {"condition": c, "mae": v["mae"]["estimate"], "low": v["mae"]["low"], "high": v["mae"]["high"]}
        for c, v in summary["conditions"].items()
    ]
