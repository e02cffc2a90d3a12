"""The three-part reward and its summary, on hand-computed cases."""

import math

import numpy as np
import pandas as pd
import pytest

from deeper.config import load_params
from deeper.errors import ConfigError, InputError
from deeper.reward import RewardWeights, compute_rewards, summarize_rewards
from tests.conftest import REPO


def errors_frame(rows):
    """rows: (context_id, old_prev, old_curr, old_fut, new_prev, new_curr, new_fut)."""
    cols = [
        "context_id",
        "old_eps_prev",
        "old_eps_curr",
        "old_eps_fut",
        "new_eps_prev",
        "new_eps_curr",
        "new_eps_fut",
    ]
    return pd.DataFrame(rows, columns=cols)


def test_parts_and_weighted_sum_by_hand():
    df = errors_frame([("a", 1.0, 1.2, 1.1, 0.8, 0.5, 1.3), ("a", 1.0, 1.2, 1.1, 1.4, 1.2, 0.6)])
    balanced = compute_rewards(df)
    assert balanced["r_prev"].tolist() == pytest.approx([0.2, -0.4])
    assert balanced["r_curr"].tolist() == pytest.approx([0.7, 0.0])
    assert balanced["r_fut"].tolist() == pytest.approx([-0.2, 0.5])
    assert balanced["r"].tolist() == pytest.approx([0.7, 0.1])
    decayed = compute_rewards(df, RewardWeights(0.25, 0.5, 1.0))
    assert decayed["r"].tolist() == pytest.approx([0.25 * 0.2 + 0.5 * 0.7 - 0.2, 0.25 * -0.4 + 0.5])
    future_only = compute_rewards(df, RewardWeights(0.0, 0.0, 1.0))
    assert future_only["r"].tolist() == pytest.approx([-0.2, 0.5])
    assert "r" not in df.columns  # the input is not modified


def test_summary_by_hand_with_threshold_rounding_and_unscored():
    # 1.4 - 0.9 is 0.4999999999999999 in floating point: it must still count as r >= tau_pos = 0.5.
    df = errors_frame(
        [
            ("a", 0.0, 1.4, 0.0, 0.0, 0.9, 0.0),  # r = 0.5 (positive, better)
            ("a", 0.0, 1.0, 0.0, 0.0, 1.0, 0.0),  # r = 0   (negative, not better)
            ("b", 0.0, 1.0, 0.0, 0.0, 1.3, 0.0),  # r = -0.3 (negative)
            ("b", 0.0, 1.0, 0.0, 0.0, 0.8, 0.0),  # r = 0.2 (neither, better)
            ("b", 0.0, 1.0, 0.0, 0.0, np.nan, 0.0),  # unscored
        ]
    )
    rewards = compute_rewards(df)
    assert rewards["r"][0] < 0.5  # the float case this test is about
    assert math.isnan(rewards["r"][4])
    s = summarize_rewards(rewards, tau_pos=0.5, tau_neg=0.0)
    assert (s["candidates"], s["unscored"], s["contexts"]) == (5, 1, 2)
    assert s["share_positive"] == pytest.approx(1 / 4)
    assert s["share_negative"] == pytest.approx(2 / 4)
    assert s["share_better_than_old"] == pytest.approx(2 / 4)
    r = np.array([0.5, 0.0, -0.3, 0.2])
    assert s["r"]["mean"] == pytest.approx(r.mean())
    assert s["r"]["std"] == pytest.approx(r.std())
    assert s["r_curr"]["mean"] == pytest.approx(r.mean())
    assert s["r_prev"] == {"mean": 0.0, "std": 0.0}


def test_share_better_than_old_counts_rewards_above_zero():
    # r = 0.5, 0.2, 0.1, -0.3: three of four are better than the old persona
    rewards = compute_rewards(
        errors_frame([("a", 1.0, 1.0, 1.0, new, 1.0, 1.0) for new in (0.5, 0.8, 0.9, 1.3)])
    )
    assert summarize_rewards(rewards, tau_pos=0.5, tau_neg=0.0)["share_better_than_old"] == pytest.approx(
        3 / 4
    )


def test_summary_of_nothing_scored_has_no_numbers():
    rewards = compute_rewards(errors_frame([("a", 1.0, 1.0, 1.0, np.nan, np.nan, np.nan)]))
    s = summarize_rewards(rewards, 0.5, 0.0)
    assert s["unscored"] == 1 and s["r"]["mean"] is None and s["share_positive"] is None


def test_bad_input_is_one_line_naming_file_and_row():
    with pytest.raises(InputError, match=r"rewards.parquet: missing columns \['new_eps_fut'\]"):
        compute_rewards(
            errors_frame([("a", 1, 1, 1, 1, 1, 1)]).drop(columns="new_eps_fut"), source="rewards.parquet"
        )
    df = errors_frame([("a", 1, 1, 1, 1, 1, 1), ("a", 1, 1, 1, 1, "x", 1), ("a", 1, 1, 1, 1, "y", 1)])
    with pytest.raises(InputError, match=r"^f.parquet:2: new_eps_curr is not a number: 'x'$"):  # the first
        compute_rewards(df, source="f.parquet")
    with pytest.raises(InputError, match=r"^f.parquet:1: old_eps_prev is negative: -0.1$"):
        compute_rewards(errors_frame([("a", -0.1, 1, 1, 1, 1, 1)]), source="f.parquet")


def test_weights_from_params():
    assert RewardWeights.from_params(load_params(REPO / "params.yaml")) == RewardWeights(1.0, 1.0, 1.0)
    assert RewardWeights.from_params(
        {"reward": {"weights": {"prev": 0.25, "curr": "0.5", "fut": 1}}}
    ) == RewardWeights(0.25, 0.5, 1.0)
    # the ablations of Appendix D.2 are valid: a zero weight is allowed as long as one is > 0
    assert RewardWeights.from_params(
        {"reward": {"weights": {"prev": 0, "curr": 0, "fut": 1}}}
    ) == RewardWeights(0.0, 0.0, 1.0)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"prev": 1, "fut": 1}, "reward.weights.curr: missing"),
        ({"prev": 1, "curr": 1, "fut": 1, "now": 1}, "reward.weights.now: unknown key"),
        ({"prev": 1, "curr": "high", "fut": 1}, "reward.weights.curr: must be a number, got 'high'"),
        ({"prev": 1, "curr": True, "fut": 1}, "reward.weights.curr: must be a number, got True"),
        (
            {"prev": float("nan"), "curr": 1, "fut": 1},
            "reward.weights.prev: must be a finite number, got nan",
        ),
        ({"prev": 1, "curr": 1, "fut": float("inf")}, "reward.weights.fut: must be a finite number, got inf"),
        ({"prev": 1, "curr": -0.5, "fut": 1}, "reward.weights.curr: must be >= 0, got -0.5"),
        ({"prev": 0, "curr": 0.0, "fut": 0}, "reward.weights: at least one weight must be > 0"),
        ("balanced", "reward.weights: must be a mapping"),
    ],
)
def test_bad_weights_are_one_line_errors_naming_the_key(weights, message):
    with pytest.raises(ConfigError) as e:
        RewardWeights.from_params({"reward": {"weights": weights}})
    assert str(e.value).startswith(f"params.yaml: {message}"), str(e.value)
