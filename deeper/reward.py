"""DEEPER's three-part reward (paper Sec. 3.3) and its summary for metrics.

For a refinement at time t from the old persona S_{t-1} to a candidate S_t, each part is how much the
candidate lowers the prediction error (MAE) of the old persona on one window:

    r_prev = eps_{t-1|S_{t-1}} - eps_{t-1|S_t}   previous preservation
    r_curr = eps_{t|S_{t-1}}   - eps_{t|S_t}     current reflection
    r_fut  = eps_{t+1|S_{t-1}} - eps_{t+1|S_t}   future advancement
    r      = w_prev r_prev + w_curr r_curr + w_fut r_fut

Input: one row per candidate with the old persona's errors `old_eps_{prev,curr,fut}` (shared by all the
candidates of a context) and the candidate's own errors `new_eps_{prev,curr,fut}`. A NaN error (a window
the frozen model could not score) gives a NaN reward: such candidates are counted as `unscored` and never
enter a pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from deeper.config import get
from deeper.errors import ConfigError, InputError
from deeper.params import mapping, number

PARTS = ("prev", "curr", "fut")
OLD_COLUMNS = tuple(f"old_eps_{p}" for p in PARTS)
NEW_COLUMNS = tuple(f"new_eps_{p}" for p in PARTS)
REWARD_COLUMNS = tuple(f"r_{p}" for p in PARTS) + ("r",)
# Rewards are differences of MAEs over 10 ratings, so a reward that "equals" a threshold is often off by
# one float ulp (0.49999999999999994); thresholds are compared with this tolerance.
THRESHOLD_TOLERANCE = 1e-9


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the three parts. Paper default: balanced (1, 1, 1), the best in every domain (Table 19).
    Appendix D.2 ablations: future only (0, 0, 1); decayed (0.25, 0.5, 1)."""

    prev: float = 1.0
    curr: float = 1.0
    fut: float = 1.0

    @classmethod
    def from_params(cls, params: dict) -> RewardWeights:
        """Each weight a finite number >= 0, not all 0 (a zero reward would leave no pair to learn from)."""
        raw = mapping(get(params, "reward.weights"), "reward.weights", known=PARTS)
        missing = [p for p in PARTS if p not in raw]
        if missing:
            raise ConfigError(f"reward.weights.{missing[0]}", f"missing; the weights are {list(PARTS)}")
        values = {k: number(raw[k], f"reward.weights.{k}", low=0.0) for k in PARTS}
        if not any(values.values()):
            raise ConfigError("reward.weights", "at least one weight must be > 0")
        return cls(**values)


def compute_rewards(
    errors: pd.DataFrame, weights: RewardWeights = RewardWeights(), source: str = "rewards"
) -> pd.DataFrame:
    """Return a copy of `errors` with the columns r_prev, r_curr, r_fut and r added (vectorised).

    `source` names the input in error messages (a file path, usually); rows there are 1-based data rows.
    """
    missing = [c for c in OLD_COLUMNS + NEW_COLUMNS if c not in errors.columns]
    if missing:
        raise InputError(source, f"missing columns {missing}; have {list(errors.columns)}")
    out = errors.copy()
    values = {}
    for col in OLD_COLUMNS + NEW_COLUMNS:
        values[col] = pd.to_numeric(out[col], errors="coerce")
        for bad, what in (
            (values[col].isna() & out[col].notna(), "is not a number"),
            (values[col] < 0, "is negative"),
        ):
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                value = out[col].iloc[row]
                value = value.item() if isinstance(value, np.generic) else value
                raise InputError(source, f"{col} {what}: {value!r}", row + 1)
    for part, old, new in zip(PARTS, OLD_COLUMNS, NEW_COLUMNS):
        out[f"r_{part}"] = values[old] - values[new]
    out["r"] = weights.prev * out["r_prev"] + weights.curr * out["r_curr"] + weights.fut * out["r_fut"]
    return out


def is_positive(r, tau_pos: float):
    return r >= tau_pos - THRESHOLD_TOLERANCE


def is_negative(r, tau_neg: float):
    return r <= tau_neg + THRESHOLD_TOLERANCE


def summarize_rewards(rewards: pd.DataFrame, tau_pos: float, tau_neg: float) -> dict:
    """Metrics of a reward table (output of `compute_rewards`): mean/std of r and each part over the scored
    candidates, the share in the positive (r >= tau_pos) and negative (r <= tau_neg) sets, and the share better
    than the old persona (r > 0). Shares are over scored candidates."""
    scored = rewards[rewards["r"].notna()]
    n = len(scored)
    summary: dict = {
        "candidates": len(rewards),
        "unscored": int(len(rewards) - n),
        "contexts": int(rewards["context_id"].nunique()) if "context_id" in rewards.columns else None,
    }
    for col in REWARD_COLUMNS:
        values = scored[col].to_numpy(dtype=float)
        summary[col] = {
            "mean": float(values.mean()) if n else None,
            "std": float(values.std(ddof=0)) if n else None,
        }
    r = scored["r"].to_numpy(dtype=float)
    summary["share_positive"] = float(is_positive(r, tau_pos).mean()) if n else None
    summary["share_negative"] = float(is_negative(r, tau_neg).mean()) if n else None
    summary["share_better_than_old"] = float((r > THRESHOLD_TOLERANCE).mean()) if n else None
    return summary
