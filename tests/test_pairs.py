"""Pair selection, validation split and replay on hand-computed cases."""

import json

import numpy as np
import pandas as pd
import pytest

from deeper.config import load_params
from deeper.errors import ConfigError, InputError
from deeper.pairs import (
    PAIR_COLUMNS,
    PairConfig,
    assign_splits,
    build_pairs,
    context_hash_unit,
    select_pairs,
    select_replay,
)
from tests.conftest import REPO


def prompt_of(ctx):
    return json.dumps([{"role": "user", "content": f"refine the persona of {ctx}"}])


def candidates(spec):
    """spec: {context_id: [r of sample 0, r of sample 1, ...]}; text = '<ctx> s<k>'."""
    rows = [
        {"context_id": ctx, "prompt": prompt_of(ctx), "sample": k, "text": f"{ctx} s{k}", "r": r}
        for ctx, rs in spec.items() for k, r in enumerate(rs)
    ]
    return pd.DataFrame(rows)


def as_tuples(pairs):
    return list(zip(pairs["context_id"], pairs["chosen_sample"], pairs["rejected_sample"]))


CONTEXT_A = {"a": [1.0, 0.6, 0.5, 0.2, 0.0, -0.3]}
# positives s0 1.0, s1 0.6, s2 0.5; negatives s4 0.0, s5 -0.3; s3 is in neither set.
# valid combos (margin >= 0.5): (0,5) 1.3, (0,4) 1.0, (1,5) 0.9, (2,5) 0.8, (1,4) 0.6, (2,4) 0.5


def test_largest_margin_is_greedy_and_disjoint():
    pairs, counts = select_pairs(candidates(CONTEXT_A), PairConfig(strategy="largest_margin", max_per_context=3))
    assert as_tuples(pairs) == [("a", 0, 5), ("a", 1, 4)]
    assert pairs["margin"].tolist() == pytest.approx([1.3, 0.6])
    assert pairs["chosen"].tolist() == ["a s0", "a s1"] and pairs["rejected"].tolist() == ["a s5", "a s4"]
    assert pairs["chosen_reward"].tolist() == [1.0, 0.6] and pairs["rejected_reward"].tolist() == [-0.3, 0.0]
    assert (counts["positives"], counts["negatives"], counts["valid_combinations"]) == (3, 2, 6)


def test_all_and_best_vs_worst_and_the_cap():
    cands = candidates(CONTEXT_A)
    everything, _ = select_pairs(cands, PairConfig(strategy="all", max_per_context=None))
    assert as_tuples(everything) == [("a", 0, 5), ("a", 0, 4), ("a", 1, 5), ("a", 2, 5), ("a", 1, 4), ("a", 2, 4)]
    capped, _ = select_pairs(cands, PairConfig(strategy="all", max_per_context=3))
    assert as_tuples(capped) == [("a", 0, 5), ("a", 0, 4), ("a", 1, 5)]
    best, _ = select_pairs(cands, PairConfig(strategy="best_vs_worst"))
    assert as_tuples(best) == [("a", 0, 5)]
    # four positives x four negatives, all valid: the cap decides how many disjoint pairs a context gives
    wide = candidates({"w": [2.0, 1.9, 1.8, 1.7, -1.0, -1.1, -1.2, -1.3]})
    for cap, expected in ((None, 4), (3, 3), (1, 1)):
        pairs, _ = select_pairs(wide, PairConfig(strategy="largest_margin", max_per_context=cap))
        assert len(pairs) == expected
    pairs, _ = select_pairs(wide, PairConfig(strategy="largest_margin", max_per_context=None))
    assert as_tuples(pairs) == [("w", 0, 7), ("w", 1, 6), ("w", 2, 5), ("w", 3, 4)]  # best-worst, 2nd-2nd, ...


def test_ties_margin_then_chosen_reward_then_sample():
    # a-c = 0.6 - (-0.3) is 0.8999999999999999 in floats, b-d = 0.5 - (-0.4) is 0.9: a tie after rounding,
    # so the larger chosen reward (a) goes first although its raw float margin is smaller.
    pairs, _ = select_pairs(candidates({"t": [0.6, 0.5, -0.3, -0.4]}), PairConfig(strategy="all", max_per_context=None))
    assert as_tuples(pairs) == [("t", 0, 3), ("t", 0, 2), ("t", 1, 3), ("t", 1, 2)]
    # equal margin and chosen reward: the lower sample index first, and it takes the only negative
    same = candidates({"u": [-0.5, 0.8, -0.2, 0.8]})
    pairs, _ = select_pairs(same, PairConfig(strategy="all", max_per_context=None))
    assert as_tuples(pairs) == [("u", 1, 0), ("u", 3, 0), ("u", 1, 2), ("u", 3, 2)]
    pairs, _ = select_pairs(same, PairConfig(strategy="largest_margin", max_per_context=None))
    assert as_tuples(pairs) == [("u", 1, 0), ("u", 3, 2)]


def test_thresholds_are_inclusive_and_tolerate_float_rounding():
    # 1.4 - 0.9 = 0.4999999999999999: still positive at tau_pos 0.5, and its margin against 0.0 meets delta 0.5
    pairs, _ = select_pairs(candidates({"f": [1.4 - 0.9, 0.0]}), PairConfig(delta=0.5))
    assert as_tuples(pairs) == [("f", 0, 1)]
    none, _ = select_pairs(candidates({"f": [1.4 - 0.9, 0.0]}), PairConfig(delta=0.6))
    assert none.empty and list(none.columns) == list(PAIR_COLUMNS)


def test_empty_sets_and_contexts_without_pairs():
    spec = {"no_pos": [0.4, 0.1, -1.0], "no_neg": [1.0, 0.9, 0.1], "ok": [0.7, -0.1], "small": [0.5, 0.2, 0.1]}
    pairs, summary = build_pairs(candidates(spec), PairConfig(val_fraction=0.0))
    assert as_tuples(pairs) == [("ok", 0, 1)]
    assert summary["contexts_total"] == 4 and summary["contexts_with_pair"] == 1
    assert summary["pairs"] == 1 and summary["mean_margin"] == pytest.approx(0.8)
    assert summary["positives"] == 4 and summary["negatives"] == 2
    nothing, summary = build_pairs(candidates({"x": [0.1, 0.2]}), PairConfig())
    assert nothing.empty and summary["pairs"] == 0 and summary["mean_margin"] is None
    assert summary["train_pairs"] == summary["val_pairs"] == 0


def test_duplicates_and_unscored_are_counted_not_paired():
    cands = candidates({"d": [1.0, 1.0, np.nan, -1.0]})
    cands.loc[1, "text"] = cands.loc[0, "text"]  # sample 1 repeats sample 0's text
    pairs, summary = build_pairs(cands, PairConfig(strategy="all", max_per_context=None))
    assert as_tuples(pairs) == [("d", 0, 3)]
    assert summary["duplicate_texts"] == 1 and summary["unscored"] == 1 and summary["candidates"] == 4


def test_bad_candidates_are_one_line_errors():
    cands = candidates(CONTEXT_A)
    with pytest.raises(InputError, match=r"^c.parquet: missing columns \['r'\]"):
        select_pairs(cands.drop(columns="r"), PairConfig(), source="c.parquet")
    other = cands.copy()
    other.loc[3, "prompt"] = "[]"
    with pytest.raises(InputError, match=r"^c.parquet:1: context 'a' has candidates with different prompts$"):
        select_pairs(other, PairConfig(), source="c.parquet")
    twice = cands.copy()
    twice.loc[2, "sample"] = 1
    with pytest.raises(InputError, match=r"^c.parquet:3: context 'a' has sample 1 twice$"):
        select_pairs(twice, PairConfig(), source="c.parquet")


def test_config_is_validated_and_read_from_params():
    with pytest.raises(ConfigError, match="tau_neg: must be below tau_pos"):
        PairConfig(tau_pos=0.0, tau_neg=0.0)
    with pytest.raises(ConfigError, match="pair.strategy"):
        PairConfig(strategy="random")
    with pytest.raises(ConfigError, match="pair.max_per_context"):
        PairConfig(max_per_context=0)
    params = load_params(REPO / "params.yaml")
    assert PairConfig.from_params(params, 1).delta == params["delta"]
    assert PairConfig.from_params(params, 2).delta == params["iter2"]["delta"]


def many_contexts(n, prefix="u"):
    return candidates({f"movielens/{prefix}{i}/t1": [1.0, 0.8, -0.5, -0.6] for i in range(n)})


def test_validation_holds_out_whole_contexts_by_seeded_hash():
    pairs, summary = build_pairs(many_contexts(300), PairConfig(val_fraction=0.1, seed=0))
    per_context = pairs.groupby("context_id")["split"].nunique()
    assert (per_context == 1).all()  # never straddles
    val_contexts = set(pairs.loc[pairs["split"] == "val", "context_id"])
    assert 15 <= len(val_contexts) <= 45  # ~10% of 300
    assert summary["val_contexts"] == len(val_contexts)
    assert summary["val_pairs"] + summary["train_pairs"] == summary["pairs"] == 600
    expected = {c for c in per_context.index if context_hash_unit(c, 0) < 0.1}
    assert val_contexts == expected
    # deterministic, and independent of which other contexts are present (iterations agree)
    again, _ = build_pairs(many_contexts(300).iloc[::-1], PairConfig(val_fraction=0.1, seed=0))
    assert set(again.loc[again["split"] == "val", "context_id"]) == val_contexts
    subset, _ = build_pairs(many_contexts(150), PairConfig(val_fraction=0.1, seed=0))
    assert set(subset.loc[subset["split"] == "val", "context_id"]) == {c for c in val_contexts if c in set(subset["context_id"])}
    other_seed, _ = build_pairs(many_contexts(300), PairConfig(val_fraction=0.1, seed=1))
    assert set(other_seed.loc[other_seed["split"] == "val", "context_id"]) != val_contexts


def test_small_runs_keep_both_splits_non_empty():
    two = assign_splits(pd.DataFrame({"context_id": ["x", "x", "y"], "margin": [1.0, 1.0, 1.0]}), 0.1, 0)
    assert two.groupby("context_id")["split"].nunique().max() == 1
    assert set(two["split"]) == {"train", "val"}
    nearly_all = assign_splits(pd.DataFrame({"context_id": list("abcdef")}), 0.99, 0)
    assert (nearly_all["split"] == "train").sum() == 1
    one = assign_splits(pd.DataFrame({"context_id": ["x", "x"]}), 0.5, 0)
    assert set(one["split"]) == {"train"}
    none = assign_splits(pd.DataFrame({"context_id": list("abcdef")}), 0.0, 0)
    assert set(none["split"]) == {"train"}


def pairs_frame(margins, rewards=None):
    n = len(margins)
    rewards = rewards or [1.0] * n
    return pd.DataFrame({
        "context_id": [f"c{i}" for i in range(n)], "prompt": [prompt_of(f"c{i}") for i in range(n)],
        "chosen": [f"w{i}" for i in range(n)], "rejected": [f"l{i}" for i in range(n)],
        "chosen_reward": rewards, "rejected_reward": [r - m for r, m in zip(rewards, margins)], "margin": margins,
        "split": "train", "chosen_sample": 0, "rejected_sample": 1, "iteration": 1,
    })


def test_replay_takes_largest_margins_strictly_above_delta():
    previous = pairs_frame([1.2, 0.8, 0.81, 0.9, 1.2, 0.5], rewards=[0.9, 1.0, 1.0, 1.0, 1.1, 1.0])
    replay = select_replay(previous, min_margin=0.8, max_pairs=None)
    assert replay["context_id"].tolist() == ["c4", "c0", "c3", "c2"]  # 0.8 itself does not exceed 0.8
    assert select_replay(previous, 0.8, 2)["context_id"].tolist() == ["c4", "c0"]
    assert select_replay(previous, 2.0, 10).empty


def test_iteration_two_combines_new_pairs_and_replay_without_straddling():
    previous, _ = build_pairs(many_contexts(40, "old"), PairConfig(delta=0.5, val_fraction=0.1))
    # iteration 2 resamples the same contexts (same ids) plus new ones; delta 0.8 applies to the new pairs
    spec = {f"movielens/old{i}/t1": [1.0, 0.5, -0.2, 0.0] for i in range(40)}
    spec.update({f"movielens/old{i}/t2": [0.9, -0.2] for i in range(40)})
    config = PairConfig(delta=0.8, val_fraction=0.1)
    pairs, summary = build_pairs(candidates(spec), config, iteration=2, replay_from=previous, replay_max=50)
    new = pairs[pairs["iteration"] == 2]
    replayed = pairs[pairs["iteration"] == 1]
    assert (new["margin"] >= 0.8 - 1e-9).all() and len(new) == 80  # (1.0, -0.2) per t1 context, one per t2
    assert len(replayed) == summary["replay_pairs"] == 50 and (replayed["margin"] > 0.8).all()
    assert (pairs.groupby("context_id")["split"].nunique() == 1).all()
    # the replayed pairs keep the split their context had in iteration 1 (same ids, same hash)
    it1_split = dict(zip(previous["context_id"], previous["split"]))
    assert all(it1_split[c] == s for c, s in zip(replayed["context_id"], replayed["split"]))
    assert list(pairs.columns) == list(PAIR_COLUMNS)
    with pytest.raises(InputError, match="prev.parquet: missing columns"):
        build_pairs(candidates(spec), config, 2, replay_from=previous.drop(columns="margin"), replay_source="prev.parquet")
