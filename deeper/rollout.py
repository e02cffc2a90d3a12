"""Multi-round evaluation of one persona update method (paper Sec. 4.1, Appendix C).

For each user, S_0 is the initial persona. For t = 1..rounds:
    predict W_t with S_{t-1} (frozen model)       -> eps_{t|S_{t-1}}
    S_t = method(S_{t-1}, W_t ratings, those predictions, W_0..W_t)
and after the last round: predict W_{rounds+1} with S_rounds -> eps_{rounds+1|S_rounds}.
Every step runs for all users at once (one batch of requests per step), so backends and the response
cache see many requests per call.

The first update is also measured on the previous, current and future windows (the paper's Table 1):
S_0 and S_1 each predict W_0, W_1 and W_2. The rollout already has eps_{1|S_0} and eps_{2|S_1}; the other
four errors are extra predictions, made in the same batches as the rollout's own.

Output (`RolloutResult.table`): one row per user and persona round s = 0..rounds:
    domain, user_id, seen, round (s), persona (S_s), persona_tokens, persona_words,
    update_failure (the update that wrote S_s failed and S_{s-1} was kept: reason, else None),
    update_flag (S_s was used but looks degenerate: reason, else None), answers (raw update answers),
    mae (= eps_{s+1|S_s}, the rollout's error), predicted and actual (that window's ratings, item by item: the
    pairwise choice task reads them), items, predict_failed_items (items of that window that got a
    fallback rating), mae_w0, mae_w1, mae_w2 (errors of S_s on W_0..W_2; rounds 0 and 1 only, else NaN),
    update_stopped_at_limit (answers of the update that wrote S_s that reached max_new_tokens; 0 in round 0).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from deeper.config import get
from deeper.errors import ConfigError, InputError
from deeper.iteration import user_windows
from deeper.llm.base import LLM, Sampling, stopped_at_limit
from deeper.methods.base import UpdateInput, UpdateMethod, Window
from deeper.params import mapping, number, sampling_block
from deeper.personas import count_words
from deeper.predict import PredictSettings, PredictStats, WindowRequest, predict_windows
from deeper.prompts import PromptSet
from deeper.tables import domain_seen, read_parquet_checked, read_personas, read_windows

USER_KEYS = ("domains", "per_domain")


@dataclass(frozen=True)
class EvaluateSettings:
    """params `evaluate`: rounds, the methods the report gathers (in its order), which users, and how every
    method generates its updates (keys left out of `evaluate.sampling` take Sampling's defaults)."""

    rounds: int
    methods: dict  # name -> deeper.methods.MethodSpec, in the report's order
    sampling: Sampling
    domains: tuple[str, ...] | None  # None: every domain
    per_domain: int | None  # None: every user of a domain

    @classmethod
    def from_params(cls, params: dict) -> EvaluateSettings:
        from deeper.methods import methods_from_params

        rounds = number(get(params, "evaluate.rounds"), "evaluate.rounds", integer=True, low=1)
        methods = methods_from_params(get(params, "evaluate.methods"))
        sampling = sampling_block(get(params, "evaluate.sampling"), "evaluate.sampling", defaults=Sampling())
        users = mapping(get(params, "evaluate.users", {}), "evaluate.users", known=USER_KEYS, nullable=True)
        domains = users.get("domains")
        if domains is not None and (
            not isinstance(domains, list) or not all(isinstance(d, str) for d in domains)
        ):
            raise ConfigError(
                "evaluate.users.domains", f"must be null (all) or a list of domain names, got {domains!r}"
            )
        per_domain = number(
            users.get("per_domain"), "evaluate.users.per_domain", integer=True, low=1, nullable=True
        )
        return cls(rounds, methods, sampling, None if domains is None else tuple(domains), per_domain)


# Windows the first update is measured on (Table 1): previous, current, future.
FIRST_UPDATE_WINDOWS = (0, 1, 2)
COLUMNS = (
    "domain",
    "user_id",
    "seen",
    "round",
    "persona",
    "persona_tokens",
    "persona_words",
    "update_failure",
    "update_flag",
    "answers",
    "mae",
    "items",
    "predict_failed_items",
    "mae_w0",
    "mae_w1",
    "mae_w2",
    "predicted",
    "actual",
    "update_stopped_at_limit",
)


@dataclass(frozen=True)
class EvalUser:
    domain: str
    user_id: str
    item_type: str
    seen: bool
    windows: tuple[Window, ...]  # W_0, W_1, ... (at least rounds + 2)
    persona0: str  # S_0


@dataclass
class RolloutResult:
    table: pd.DataFrame
    predict_stats: PredictStats
    seconds: dict = field(default_factory=dict)  # predict / update wall time
    updates: int = 0  # update() inputs handled (users x rounds)


def windows_needed(rounds: int) -> int:
    """W_0 for S_0, then one window per round, then the one the last persona is tested on."""
    return rounds + 2


def load_eval_users(
    windows: Path, personas: Path, rounds: int, domains: list[str] | None, per_domain: int | None
) -> tuple[list[EvalUser], dict]:
    """The evaluation users with S_0 and enough windows; skips counted by reason."""
    table = read_windows(windows)
    seen = domain_seen(table)
    if domains is not None:
        unknown = sorted(set(domains) - set(seen))
        if unknown:
            raise ConfigError(
                "evaluate.users.domains", f"no domain {unknown[0]!r} in {windows}; have {sorted(seen)}"
            )
    initial = read_personas(personas, split="eval")
    skipped = {"too_few_windows": 0, "no_persona": 0}
    users: list[EvalUser] = []
    taken: dict[str, int] = {}
    for user in user_windows(table, split="eval"):  # sorted by domain, user_id
        if domains is not None and user.domain not in domains:
            continue
        if per_domain is not None and taken.get(user.domain, 0) >= per_domain:
            continue
        persona = initial.get((user.domain, user.user_id))
        if persona is None:
            skipped["no_persona"] += 1
            continue
        if len(user.windows) < windows_needed(rounds):
            skipped["too_few_windows"] += 1
            continue
        taken[user.domain] = taken.get(user.domain, 0) + 1
        users.append(
            EvalUser(user.domain, user.user_id, user.item_type, seen[user.domain], user.windows, persona)
        )
    if not users:
        raise InputError(
            windows,
            f"no evaluation user with an initial persona and {windows_needed(rounds)} windows "
            f"(skipped: {skipped})",
        )
    return users, skipped


def rollout(
    users: Sequence[EvalUser],
    method: UpdateMethod,
    frozen: LLM,
    rounds: int,
    predict_settings: PredictSettings | None = None,
    count_tokens: Callable[[str], float] | None = None,
    progress: bool = True,
    label: str | None = None,
    prompts: PromptSet | None = None,
) -> RolloutResult:
    """Run `rounds` updates of `method` for every user; see the module docstring for the table. `prompts`: the
    template set of the predictions (the method holds its own)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for u in users:
        if len(u.windows) < windows_needed(rounds):
            raise ValueError(
                f"user {u.domain}/{u.user_id} has {len(u.windows)} windows; "
                f"{rounds} rounds need {windows_needed(rounds)}"
            )
    label = label or method.name
    predict_settings = predict_settings or PredictSettings()
    count_tokens = count_tokens or (lambda text: math.nan)
    n = len(users)
    personas: list[list[str]] = [[u.persona0] for u in users]  # personas[i][s] = S_s
    failures: list[list[str | None]] = [[None] for _ in users]
    flags: list[list[str | None]] = [[None] for _ in users]
    answers: list[list[tuple[str, ...]]] = [[()] for _ in users]
    # (user index, persona round, window) -> (predicted ratings, mae, failed item count)
    results: dict[tuple[int, int, int], tuple[np.ndarray, float, int]] = {}
    stats = PredictStats(mode=predict_settings.mode)
    seconds = {"predict": 0.0, "update": 0.0}

    def predict(keys: list[tuple[int, int, int]], desc: str) -> None:
        keys = [k for k in dict.fromkeys(keys) if k not in results]
        requests = [
            WindowRequest(
                persona=personas[i][s],
                item_type=users[i].item_type,
                titles=users[i].windows[w].titles,
                actual=users[i].windows[w].ratings,
            )
            for i, s, w in keys
        ]
        start = time.perf_counter()
        preds, step_stats = predict_windows(
            frozen, requests, predict_settings, prompts, progress=desc if progress else None
        )
        seconds["predict"] += time.perf_counter() - start
        stats.add(step_stats)
        for key, pred in zip(keys, preds):
            failed = 0 if pred.failed is None else int(np.asarray(pred.failed).sum())
            assert pred.mae is not None  # every request above carries the window's actual ratings
            results[key] = (np.asarray(pred.ratings, dtype=float), float(pred.mae), failed)

    def first_update_keys(s: int) -> list[tuple[int, int, int]]:
        return [(i, s, w) for i in range(n) for w in FIRST_UPDATE_WINDOWS]

    with tqdm(total=rounds, desc=f"evaluate {label}", unit="round", disable=not progress) as bar:
        for t in range(1, rounds + 1):
            keys = [(i, t - 1, t) for i in range(n)]
            extra = first_update_keys(0) if t == 1 else first_update_keys(1) if t == 2 else []
            predict(keys + extra, f"{label} round {t}: predict")
            inputs = [
                UpdateInput(
                    item_type=users[i].item_type,
                    persona=personas[i][t - 1],
                    history=tuple(users[i].windows[: t + 1]),
                    predictions=tuple(results[(i, t - 1, t)][0]),
                )
                for i in range(n)
            ]
            start = time.perf_counter()
            updated = method.update(inputs) if inputs else []
            if len(updated) != n:
                raise RuntimeError(f"method {method.name} returned {len(updated)} updates for {n} users")
            seconds["update"] += time.perf_counter() - start
            for i, res in enumerate(updated):
                personas[i].append(res.persona)
                failures[i].append(res.failure)
                flags[i].append(res.flag)
                answers[i].append(tuple(res.generated))
            bar.update(1)
        extra = first_update_keys(1) if rounds == 1 else []
        predict([(i, rounds, rounds + 1) for i in range(n)] + extra, f"{label}: predict the last window")

    rows = []
    for i, u in enumerate(users):
        for s in range(rounds + 1):
            predicted, err, failed = results[(i, s, s + 1)]
            persona = personas[i][s]
            row = {
                "domain": u.domain,
                "user_id": u.user_id,
                "seen": bool(u.seen),
                "round": s,
                "persona": persona,
                "persona_tokens": count_tokens(persona),
                "persona_words": count_words(persona),
                "update_failure": failures[i][s],
                "update_flag": flags[i][s],
                "answers": list(answers[i][s]),
                "mae": err,
                "items": len(u.windows[s + 1].titles),
                "predict_failed_items": failed,
                "predicted": [float(p) for p in predicted],
                "actual": [float(a) for a in u.windows[s + 1].ratings],
                "update_stopped_at_limit": sum(stopped_at_limit(a) for a in answers[i][s]),
            }
            for w in FIRST_UPDATE_WINDOWS:
                row[f"mae_w{w}"] = results[(i, s, w)][1] if (i, s, w) in results and s <= 1 else math.nan
            rows.append(row)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return RolloutResult(table=table, predict_stats=stats, seconds=seconds, updates=n * rounds)


# ---------------------------------------------------------------- summaries (the report stage)

FIRST_UPDATE_PARTS = {"prev": "mae_w0", "curr": "mae_w1", "fut": "mae_w2"}


def read_eval_table(path: str | Path, method: str, rounds: int) -> pd.DataFrame:
    """A method's evaluation table (COLUMNS) with rows for rounds 0..rounds; InputError if not."""
    path = Path(path)
    table = read_parquet_checked(path, COLUMNS, f"run `dvc repro evaluate@{method}`")
    have = sorted(table["round"].unique().tolist())
    if have != list(range(rounds + 1)):
        raise InputError(
            path,
            f"has rounds {have}, params evaluate.rounds={rounds} needs 0..{rounds}; "
            f"re-run `dvc repro evaluate@{method}`",
        )
    return table


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else None


def reduction_pct(first: float | None, last: float | None) -> float | None:
    """Relative reduction of the error from round 0 to the last round, in percent (positive = better)."""
    if first is None or last is None or first == 0:
        return None
    return 100.0 * (first - last) / first


def pairwise_accuracy(predicted, actual) -> tuple[float, int]:
    """The paper's pairwise choice task (Table 25) from the rating predictions: over every pair of a window's
    items that the user rated differently, the share where the item predicted higher is the one rated higher
    (a tie in the predictions counts half). (accuracy, pairs); (nan, 0) without such a pair."""
    p, a = np.asarray(predicted, dtype=float), np.asarray(actual, dtype=float)
    i, j = np.triu_indices(len(a), k=1)
    differ = a[i] != a[j]
    if not differ.any():
        return math.nan, 0
    agree = np.sign(p[i] - p[j])[differ] * np.sign(a[i] - a[j])[differ]
    return float(np.mean((agree + 1) / 2)), int(differ.sum())


def summarize_domain(table: pd.DataFrame, rounds: int) -> dict:
    """One domain's rows of a rollout table -> the numbers of metrics/eval.json."""
    out: dict = {"users": int(table["user_id"].nunique())}
    by_round = table.groupby("round")
    mae = by_round["mae"].mean()
    tokens = by_round["persona_tokens"].mean()
    # beside each error, the share of its window's items that got a fallback rating (json: no parsable rating
    # after the retry; logprob: the backend could not score it), which sits in the MAE as a 3
    failed = by_round["predict_failed_items"].sum() / by_round["items"].sum()
    for s in range(rounds + 1):
        out[f"mae_r{s}"] = float(mae.get(s, math.nan))
        out[f"mae_r{s}_parse_failed_share"] = float(failed.get(s, math.nan))
    out["reduction_pct"] = reduction_pct(out["mae_r0"], out[f"mae_r{rounds}"])
    # the pairwise choice task per round: pairs of every user of the domain pooled
    pairs = table.apply(
        lambda row: pairwise_accuracy(row["predicted"], row["actual"]), axis=1, result_type="expand"
    )
    pairs.columns = ["accuracy", "pairs"]
    pairs["round"], pairs["correct"] = table["round"].to_numpy(), pairs["accuracy"].fillna(0) * pairs["pairs"]
    by = pairs.groupby("round")[["correct", "pairs"]].sum()
    out["pairwise_accuracy"] = {
        f"r{s}": float(by.loc[s, "correct"] / by.loc[s, "pairs"])
        if s in by.index and by.loc[s, "pairs"]
        else math.nan
        for s in range(rounds + 1)
    }
    out["persona_tokens"] = {f"r{s}": float(tokens.get(s, math.nan)) for s in range(rounds + 1)}
    first = {}
    for part, column in FIRST_UPDATE_PARTS.items():
        before = float(table.loc[table["round"] == 0, column].mean())
        after = float(table.loc[table["round"] == 1, column].mean())
        first[part] = {"before": before, "after": after, "delta": after - before}
    out["first_update"] = first
    out["predict_failed_items"] = int(table["predict_failed_items"].sum())
    out["update_failures"] = int(table["update_failure"].notna().sum())
    out["update_flags"] = int(table["update_flag"].notna().sum())
    # update answers that reached evaluate.sampling.max_new_tokens (cut short) among all update answers
    answers = int(table["answers"].map(len).sum())
    out["update_stopped_at_limit_share"] = (
        float(table["update_stopped_at_limit"].sum() / answers) if answers else math.nan
    )
    return out


def average_domains(domains: dict[str, dict]) -> dict:
    """Average of the per-domain numbers (each domain weighs the same, as the paper's averages);
    counts are summed."""
    if not domains:
        return {"domains": 0}
    values = list(domains.values())

    def merge(items: list):
        first = items[0]
        if isinstance(first, dict):
            return {k: merge([it[k] for it in items]) for k in first}
        return _mean(items)

    out = {
        k: merge([v[k] for v in values])
        for k in values[0]
        if k not in ("users", "predict_failed_items", "update_failures", "update_flags")
    }
    for k in ("users", "predict_failed_items", "update_failures", "update_flags"):
        out[k] = int(sum(v[k] for v in values))
    out["domains"] = len(values)
    return out


def summarize_method(table: pd.DataFrame, rounds: int) -> dict:
    """Per domain, then averages over the seen, the unseen and all domains."""
    domains = {str(d): summarize_domain(rows, rounds) for d, rows in table.groupby("domain", sort=True)}
    seen = {str(d) for d, rows in table.groupby("domain") if bool(rows["seen"].iloc[0])}
    return {
        "domains": domains,
        "seen": average_domains({d: v for d, v in domains.items() if d in seen}),
        "unseen": average_domains({d: v for d, v in domains.items() if d not in seen}),
        "all": average_domains(domains),
    }


def first_update_errors(table: pd.DataFrame) -> pd.DataFrame:
    """Per user: the old persona's (S_0) and the new one's (S_1) errors on the previous, current and future
    windows, in deeper/reward.py's columns (old_eps_*, new_eps_*)."""
    keys = ["domain", "user_id"]
    old = table[table["round"] == 0].set_index(keys)
    new = table[table["round"] == 1].set_index(keys)
    out = pd.DataFrame(index=old.index)
    for part, column in FIRST_UPDATE_PARTS.items():
        out[f"old_eps_{part}"] = old[column]
        out[f"new_eps_{part}"] = new[column].reindex(old.index)
    out = out.reset_index()
    out["context_id"] = out["domain"] + "/" + out["user_id"]
    return out


def mae_by_round(table: pd.DataFrame, rounds: int) -> list[float]:
    """eps_{s+1|S_s} for s = 0..rounds, averaged over domains (each domain weighs the same)."""
    per_domain = table.groupby(["domain", "round"])["mae"].mean().unstack("round")
    return [float(per_domain[s].mean()) if s in per_domain else math.nan for s in range(rounds + 1)]
