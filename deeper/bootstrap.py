"""Error bars the paper does not give: a paired bootstrap over evaluation users.

Every method is evaluated on the same users, so one resample of users serves all methods (paired): a user who
is hard for every method stays in or out for all of them, and the difference DEEPER minus another method gets
an interval much narrower than the two methods' own intervals would suggest. Users are resampled within their
domain (each domain keeps its number of users), and each resample is summarised exactly as metrics/eval.json
summarises the run (deeper/rollout.py): each domain's statistics from its round means, then their average over
domains.

Statistics, for rounds 1..R (R = evaluate.rounds):
- mean_mae: the mean over rounds 1..R of eps_{t+1|S_t} (docs/runs.md's "mean of rounds 1-4" for R = 4),
- reduction_pct: 100 * (mae_r0 - mae_rR) / mae_r0 (positive = better),
and, against the reference method (DEEPER), reference minus method of each (a negative mean_mae difference means
DEEPER predicts better). Intervals are percentile intervals of `resamples` resamples drawn with `seed`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from deeper.config import get
from deeper.errors import DeeperError
from deeper.params import mapping, param

STATISTICS = ("mean_mae", "reduction_pct")
NO_VALUE = "—"


def format_interval(value, digits: int = 3, signed: bool = False) -> str:
    """An interval as every page and log line shows it, "0.707 [0.633, 0.780]" (signed: "+0.707 [...]"):
    `value` is a {estimate, low, high} mapping (percentile_interval's) or an object with those attributes
    (deeper.review.Interval). The estimate alone where a bound is missing or not finite; NO_VALUE where the
    estimate is."""
    if value is None:
        return NO_VALUE
    parts = [
        value.get(k) if isinstance(value, Mapping) else getattr(value, k, None)
        for k in ("estimate", "low", "high")
    ]
    finite = [isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in parts]
    spec = f"{'+' if signed else ''}.{digits}f"
    if not finite[0]:
        return NO_VALUE
    if not (finite[1] and finite[2]):
        return format(parts[0], spec)
    return f"{format(parts[0], spec)} [{format(parts[1], spec)}, {format(parts[2], spec)}]"


@dataclass(frozen=True)
class BootstrapSettings:
    resamples: int = 2000
    level: float = 0.95
    seed: int = 0

    @classmethod
    def from_params(cls, params: dict) -> BootstrapSettings:
        """params `evaluate.bootstrap`: {resamples, level, seed}, checked."""
        mapping(get(params, "evaluate.bootstrap"), "evaluate.bootstrap", known=("resamples", "level", "seed"))
        return cls(
            resamples=param(params, "evaluate.bootstrap.resamples", integer=True, low=100),
            level=param(params, "evaluate.bootstrap.level", low=0.0, low_open=True, high=1.0, high_open=True),
            seed=param(params, "evaluate.bootstrap.seed", integer=True, low=0),
        )


def domain_draws(domains, settings: BootstrapSettings) -> dict[str, np.ndarray]:
    """One draw of users per domain, shared by every quantity measured on those users (paired): domain ->
    (resamples, users of the domain) row indices into that domain's users (in their order in `domains`)."""
    domains = np.asarray(domains)
    rng = np.random.default_rng(settings.seed)
    return {
        d: rng.integers(0, int((domains == d).sum()), size=(settings.resamples, int((domains == d).sum())))
        for d in sorted(set(domains.tolist()))
    }


def percentile_interval(estimate, samples, level: float) -> dict:
    """{estimate, low, high}: the point estimate and the central `level` percentile interval of its resamples."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return {"estimate": float(estimate), "low": float(low), "high": float(high)}


def paired_means(
    values: dict[str, np.ndarray],
    domains,
    settings: BootstrapSettings,
    contrasts: dict[str, tuple[str, str]] | None = None,
) -> dict:
    """Per-user values of several conditions measured on the same users -> {"means": {name: interval},
    "contrasts": {name: interval of a - b}}. A statistic is the mean over domains of each domain's mean (each
    domain weighs the same, as metrics/eval.json), resampled with one draw of users for every condition."""
    domains = np.asarray(domains)
    draws = domain_draws(domains, settings)
    estimates, samples = {}, {}
    for name, column in values.items():
        column = np.asarray(column, dtype=float)
        if column.shape != domains.shape or not np.isfinite(column).all():
            raise DeeperError(f"bootstrap: condition {name} needs one finite value per user")
        per_domain = [column[domains == d] for d in draws]
        estimates[name] = float(np.mean([v.mean() for v in per_domain]))
        samples[name] = np.mean([v[idx].mean(axis=1) for v, idx in zip(per_domain, draws.values())], axis=0)
    return {
        "means": {n: percentile_interval(estimates[n], samples[n], settings.level) for n in values},
        "contrasts": {
            n: percentile_interval(estimates[a] - estimates[b], samples[a] - samples[b], settings.level)
            for n, (a, b) in (contrasts or {}).items()
        },
    }


def user_matrix(table: pd.DataFrame, rounds: int) -> pd.DataFrame:
    """One row per (domain, user_id), sorted; columns 0..rounds: the user's eps_{s+1|S_s}."""
    wide = table.pivot_table(index=["domain", "user_id"], columns="round", values="mae", aggfunc="first")
    missing = [s for s in range(rounds + 1) if s not in wide.columns]
    if missing or wide[list(range(rounds + 1))].isna().any().any():
        raise DeeperError(f"bootstrap: a user lacks the error of round {missing[0] if missing else '?'}")
    return wide[list(range(rounds + 1))].sort_index()


def _statistics(round_means: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per domain (..., rounds + 1) round means -> each statistic averaged over domains (each domain weighs the
    same, and the reduction is each domain's own, as metrics/eval.json's `all`), shape (...)."""
    stats: dict[str, list[np.ndarray]] = {"mean_mae": [], "reduction_pct": []}
    for means in round_means:
        r0, last = means[..., 0], means[..., -1]
        stats["mean_mae"].append(means[..., 1:].mean(axis=-1))
        stats["reduction_pct"].append(100.0 * (r0 - last) / r0)
    return {name: np.mean(values, axis=0) for name, values in stats.items()}


def paired_bootstrap(
    tables: dict[str, pd.DataFrame],
    rounds: int,
    settings: BootstrapSettings = BootstrapSettings(),
    reference: str | None = None,
) -> dict:
    """{"resamples", "level", "seed", "methods": {m: {stat: {estimate, low, high}}},
    "vs_<reference>": {m: {stat: {estimate, low, high}}}} (reference minus m; absent without the reference)."""
    if not tables:
        return {}
    matrices = {m: user_matrix(t, rounds) for m, t in tables.items()}
    first_name, first = next(iter(matrices.items()))
    for name, matrix in matrices.items():
        if not matrix.index.equals(first.index):
            raise DeeperError(f"bootstrap: methods {first_name} and {name} were evaluated on different users")
    domains = first.index.get_level_values("domain")
    draws = domain_draws(domains, settings)
    estimates, samples = {}, {}
    for name, matrix in matrices.items():
        point, resampled = [], []
        for d, idx in draws.items():
            values = matrix.to_numpy()[np.asarray(domains == d)]  # (users, rounds + 1)
            point.append(values.mean(axis=0))
            resampled.append(values[idx].mean(axis=1))  # (resamples, rounds + 1)
        estimates[name] = _statistics(point)
        samples[name] = _statistics(resampled)

    def interval(estimate, draws_):
        return percentile_interval(estimate, draws_, settings.level)

    out = {
        "resamples": settings.resamples,
        "level": settings.level,
        "seed": settings.seed,
        "methods": {m: {s: interval(estimates[m][s], samples[m][s]) for s in STATISTICS} for m in matrices},
    }
    if reference in matrices:
        out[f"vs_{reference}"] = {
            m: {
                s: interval(estimates[reference][s] - estimates[m][s], samples[reference][s] - samples[m][s])
                for s in STATISTICS
            }
            for m in matrices
            if m != reference
        }
    return out
