"""deeper/bootstrap.py: paired bootstrap over evaluation users, resampled within domains."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deeper.bootstrap import BootstrapSettings, paired_bootstrap
from deeper.errors import DeeperError
from deeper.rollout import summarize_method

ROUNDS = 2


def table(maes: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    """{(domain, user): [mae of round 0..ROUNDS]} -> the rows of an evaluation table that the bootstrap reads."""
    rows = [
        {
            "domain": d,
            "user_id": u,
            "seen": True,
            "round": s,
            "mae": m,
            "persona_tokens": 10,
            "mae_w0": 1.0,
            "mae_w1": 1.0,
            "mae_w2": 1.0,
            "items": 10,
            "predict_failed_items": 0,
            "update_failure": None,
            "update_flag": None,
            "predicted": [1.0, 2.0],
            "actual": [1.0, 2.0],
            "answers": [] if s == 0 else ["new"],
            "update_stopped_at_limit": 0,
        }
        for (d, u), values in maes.items()
        for s, m in enumerate(values)
    ]
    return pd.DataFrame(rows)


RNG = np.random.default_rng(7)
USERS = {("ml", f"u{i}"): list(RNG.uniform(0.5, 1.5, ROUNDS + 1)) for i in range(6)}
USERS.update({("food", f"f{i}"): list(RNG.uniform(0.2, 0.8, ROUNDS + 1)) for i in range(3)})
FAST = BootstrapSettings(resamples=500, level=0.9, seed=3)


def test_estimates_are_the_reports_own_numbers():
    t = table(USERS)
    out = paired_bootstrap({"deeper": t}, ROUNDS, FAST)["methods"]["deeper"]
    summary = summarize_method(t, ROUNDS)["all"]
    assert out["mean_mae"]["estimate"] == pytest.approx(
        np.mean([summary[f"mae_r{s}"] for s in range(1, ROUNDS + 1)])
    )
    assert out["reduction_pct"]["estimate"] == pytest.approx(summary["reduction_pct"])
    for stat in out.values():
        assert stat["low"] < stat["estimate"] < stat["high"]


def test_pairing_cancels_what_every_method_shares():
    """Another method that is worse by exactly 0.1 for every user in every round: the difference's interval is
    that 0.1, although each method's own interval is wide."""
    worse = {k: [m + 0.1 for m in v] for k, v in USERS.items()}
    out = paired_bootstrap({"deeper": table(USERS), "other": table(worse)}, ROUNDS, FAST, reference="deeper")
    diff = out["vs_deeper"]["other"]["mean_mae"]
    assert diff == pytest.approx({"estimate": -0.1, "low": -0.1, "high": -0.1})
    own = out["methods"]["other"]["mean_mae"]
    assert own["high"] - own["low"] > 0.05
    assert set(out["vs_deeper"]) == {"other"}


def test_users_are_resampled_within_their_domain():
    """One user per domain: every resample is the same users, so the interval is the estimate itself."""
    one_each = {("a", "u"): [1.0, 0.5, 0.8], ("b", "v"): [0.4, 0.9, 0.2]}
    stat = paired_bootstrap({"deeper": table(one_each)}, ROUNDS, FAST)["methods"]["deeper"]["mean_mae"]
    assert stat["low"] == stat["high"] == pytest.approx(stat["estimate"]) == pytest.approx((0.7 + 0.5) / 2)


def test_seeded_and_shaped_for_metrics():
    a = paired_bootstrap({"deeper": table(USERS), "x": table(USERS)}, ROUNDS, FAST)
    assert a == paired_bootstrap({"deeper": table(USERS), "x": table(USERS)}, ROUNDS, FAST)
    b = paired_bootstrap(
        {"deeper": table(USERS)}, ROUNDS, BootstrapSettings(resamples=500, level=0.9, seed=4)
    )
    assert b["methods"]["deeper"]["mean_mae"]["low"] != a["methods"]["deeper"]["mean_mae"]["low"]
    assert (a["resamples"], a["level"], a["seed"]) == (500, 0.9, 3)
    wider = paired_bootstrap(
        {"deeper": table(USERS)}, ROUNDS, BootstrapSettings(resamples=500, level=0.99, seed=3)
    )
    narrow, wide = a["methods"]["deeper"]["mean_mae"], wider["methods"]["deeper"]["mean_mae"]
    assert wide["low"] <= narrow["low"] and wide["high"] >= narrow["high"]
    assert "vs_deeper" not in paired_bootstrap({"x": table(USERS)}, ROUNDS, FAST, reference="deeper")
    # the reference is the caller's (the first of evaluate.methods), never a name the code assumes
    assert not any(k.startswith("vs_") for k in a)
    named = paired_bootstrap({"deeper": table(USERS), "x": table(USERS)}, ROUNDS, FAST, reference="x")
    assert set(named["vs_x"]) == {"deeper"}


def test_methods_on_other_users_are_refused():
    fewer = dict(list(USERS.items())[1:])
    with pytest.raises(DeeperError, match="different users"):
        paired_bootstrap({"deeper": table(USERS), "x": table(fewer)}, ROUNDS, FAST)


def test_one_interval_formatter_for_every_page_and_log_line():
    from deeper.bootstrap import format_interval
    from deeper.review import Interval

    assert format_interval({"estimate": 0.7071, "low": 0.6329, "high": 0.78}) == "0.707 [0.633, 0.780]"
    assert (
        format_interval({"estimate": -0.02, "low": -0.055, "high": 0.007}, signed=True)
        == "-0.020 [-0.055, +0.007]"
    )
    assert format_interval({"estimate": 12.345, "low": 1.0, "high": 20.0}, 1) == "12.3 [1.0, 20.0]"
    assert format_interval(Interval(-24.3764, -82.2122, 21.0091), 1) == "-24.4 [-82.2, 21.0]"  # an object too
    # a missing or non-finite bound shows the estimate alone; a missing estimate shows the dash
    assert format_interval({"estimate": 1.0, "low": float("nan"), "high": 2.0}) == "1.000"
    assert format_interval(Interval(1.0, 0.5, None), 3) == "1.000"
    assert format_interval({"estimate": float("nan"), "low": 0.0, "high": 1.0}) == "—"
    assert format_interval({"estimate": True, "low": 0.0, "high": 1.0}) == "—"
    assert format_interval(None) == format_interval({}) == "—"
