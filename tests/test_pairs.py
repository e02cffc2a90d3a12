"""Pair selection, validation split and replay on hand-computed cases."""

import json

import numpy as np
import pandas as pd
import pytest

from deeper.config import load_params
from deeper.errors import ConfigError, InputError
from deeper.pairs import (
    CANDIDATE_COLUMNS,
    PAIR_COLUMNS,
    PairConfig,
    assign_splits,
    build_pairs,
    context_hash_unit,
    pair_block_from_params,
    read_candidates,
    read_replay_pairs,
    replay_max_from_params,
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
        for ctx, rs in spec.items()
        for k, r in enumerate(rs)
    ]
    return pd.DataFrame(rows)


def as_tuples(pairs):
    return list(zip(pairs["context_id"], pairs["chosen_sample"], pairs["rejected_sample"]))


CONTEXT_A = {"a": [1.0, 0.6, 0.5, 0.2, 0.0, -0.3]}
# positives s0 1.0, s1 0.6, s2 0.5; negatives s4 0.0, s5 -0.3; s3 is in neither set.
# valid combos (margin >= 0.5): (0,5) 1.3, (0,4) 1.0, (1,5) 0.9, (2,5) 0.8, (1,4) 0.6, (2,4) 0.5


def test_largest_margin_is_greedy_and_disjoint():
    pairs, counts = select_pairs(
        candidates(CONTEXT_A), PairConfig(strategy="largest_margin", max_per_context=3)
    )
    assert as_tuples(pairs) == [("a", 0, 5), ("a", 1, 4)]
    assert pairs["margin"].tolist() == pytest.approx([1.3, 0.6])
    assert pairs["chosen"].tolist() == ["a s0", "a s1"] and pairs["rejected"].tolist() == ["a s5", "a s4"]
    assert pairs["chosen_reward"].tolist() == [1.0, 0.6] and pairs["rejected_reward"].tolist() == [-0.3, 0.0]
    assert (counts["positives"], counts["negatives"], counts["valid_combinations"]) == (3, 2, 6)


def test_all_and_best_vs_worst_and_the_cap():
    cands = candidates(CONTEXT_A)
    everything, _ = select_pairs(cands, PairConfig(strategy="all", max_per_context=None))
    assert as_tuples(everything) == [
        ("a", 0, 5),
        ("a", 0, 4),
        ("a", 1, 5),
        ("a", 2, 5),
        ("a", 1, 4),
        ("a", 2, 4),
    ]
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
    assert as_tuples(pairs) == [
        ("w", 0, 7),
        ("w", 1, 6),
        ("w", 2, 5),
        ("w", 3, 4),
    ]  # best-worst, 2nd-2nd, ...


def test_ties_margin_then_chosen_reward_then_sample():
    # a-c = 0.6 - (-0.3) is 0.8999999999999999 in floats, b-d = 0.5 - (-0.4) is 0.9: a tie after rounding,
    # so the larger chosen reward (a) goes first although its raw float margin is smaller.
    pairs, _ = select_pairs(
        candidates({"t": [0.6, 0.5, -0.3, -0.4]}), PairConfig(strategy="all", max_per_context=None)
    )
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
    spec = {
        "no_pos": [0.4, 0.1, -1.0],
        "no_neg": [1.0, 0.9, 0.1],
        "ok": [0.7, -0.1],
        "small": [0.5, 0.2, 0.1],
    }
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


def test_defaults_are_the_papers_thresholds_and_the_repositorys_pair_block():
    """Callers of the library without params (tests, notebooks) get the paper's tau_pos 0.5, tau_neg 0, delta 0.5
    (Sec. 3.4) and the pair block of params.yaml."""
    default = PairConfig()
    assert (default.tau_pos, default.tau_neg, default.delta, default.delta_key) == (0.5, 0.0, 0.5, "delta")
    block = pair_block_from_params(load_params(REPO / "params.yaml"))
    assert {name: getattr(default, name) for name in block} == block


def test_config_is_validated_and_read_from_params():
    with pytest.raises(ConfigError, match="tau_neg: must be below tau_pos"):
        PairConfig(tau_pos=0.0, tau_neg=0.0)
    with pytest.raises(ConfigError, match="pair.strategy"):
        PairConfig(strategy="random")
    with pytest.raises(ConfigError, match="pair.max_per_context"):
        PairConfig(max_per_context=0)
    params = load_params(REPO / "params.yaml")
    params["tau_pos"], params["tau_neg"] = 0.7, -0.2  # not the defaults
    first, second = PairConfig.from_params(params, 1), PairConfig.from_params(params, 2)
    assert (first.tau_pos, first.tau_neg, first.delta, first.delta_key) == (
        0.7,
        -0.2,
        params["delta"],
        "delta",
    )
    assert (second.tau_pos, second.tau_neg, second.delta, second.delta_key) == (
        0.7,
        -0.2,
        params["iter2"]["delta"],
        "iter2.delta",
    )


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
    assert set(subset.loc[subset["split"] == "val", "context_id"]) == {
        c for c in val_contexts if c in set(subset["context_id"])
    }
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
    return pd.DataFrame(
        {
            "context_id": [f"c{i}" for i in range(n)],
            "prompt": [prompt_of(f"c{i}") for i in range(n)],
            "chosen": [f"w{i}" for i in range(n)],
            "rejected": [f"l{i}" for i in range(n)],
            "chosen_reward": rewards,
            "rejected_reward": [r - m for r, m in zip(rewards, margins)],
            "margin": margins,
            "split": "train",
            "chosen_sample": 0,
            "rejected_sample": 1,
            "iteration": 1,
        }
    )


def test_replay_takes_largest_margins_strictly_above_delta():
    previous = pairs_frame([1.2, 0.8, 0.81, 0.9, 1.2, 0.5], rewards=[0.9, 1.0, 1.0, 1.0, 1.1, 1.0])
    replay, _ = select_replay(previous, min_margin=0.8, max_pairs=None)
    assert replay["context_id"].tolist() == ["c4", "c0", "c3", "c2"]  # 0.8 itself does not exceed 0.8
    assert select_replay(previous, 0.8, 2)[0]["context_id"].tolist() == ["c4", "c0"]
    assert select_replay(previous, 2.0, 10)[0].empty


def test_random_replay_is_a_seeded_sample_of_the_pairs_above_delta():
    """Appendix A.5: the replayed pairs are "randomly selected" among those with margin > 0.8."""
    margins = [0.5, 0.8] + [0.81 + 0.01 * i for i in range(18)]  # 18 above 0.8
    previous = pairs_frame(margins)
    eligible = {f"c{i}" for i in range(2, 20)}
    top = set(select_replay(previous, 0.8, 5)[0]["context_id"])
    assert top == {f"c{i}" for i in range(15, 20)}
    picks = {}
    for seed in range(60):
        replay, _ = select_replay(previous, 0.8, 5, order="random", seed=seed)
        assert len(replay) == 5 and set(replay["context_id"]) <= eligible
        assert replay["margin"].is_monotonic_decreasing  # written largest first, like largest_margin
        picks[seed] = frozenset(replay["context_id"])
    # the sample depends on the seed and the pairs only, not on the file's row order
    shuffled = previous.sample(frac=1.0, random_state=3)
    assert set(select_replay(shuffled, 0.8, 5, order="random", seed=7)[0]["context_id"]) == picks[7]
    assert set(select_replay(previous, 0.8, 5, order="random", seed=7)[0]["context_id"]) == picks[7]
    assert len(set(picks.values())) > 50 and picks[0] != top
    counts = {c: sum(c in p for p in picks.values()) for c in eligible}
    assert min(counts.values()) >= 5  # every eligible pair is drawn (expected 60 x 5/18 ~ 17 times each)
    # no cap, or a cap above the count: both orders replay every pair above delta
    assert set(select_replay(previous, 0.8, None, order="random")[0]["context_id"]) == eligible
    assert set(select_replay(previous, 0.8, 100, order="random", seed=4)[0]["context_id"]) == eligible


def test_pairs_per_context_counts_this_iterations_pairs_over_every_sampled_context():
    spec = {"a": CONTEXT_A["a"], "b": [0.9, -0.1], "c": [0.2, 0.1], "d": [0.05, 0.05]}
    _, summary = build_pairs(candidates(spec), PairConfig(max_per_context=None, val_fraction=0.0))
    assert (summary["pairs"], summary["contexts_total"], summary["contexts_with_pair"]) == (3, 4, 2)
    assert summary["pairs_per_context"] == pytest.approx(3 / 4)
    assert summary["pairs_per_context_with_pair"] == pytest.approx(3 / 2)
    previous = pairs_frame([1.2, 1.1])
    _, summary = build_pairs(
        candidates(spec),
        PairConfig(delta=0.5, max_per_context=None, val_fraction=0.0),
        iteration=2,
        replay_from=previous,
    )
    assert summary["replay_pairs"] == 2 and summary["pairs"] == 5
    assert summary["pairs_per_context"] == pytest.approx(3 / 4)  # replayed pairs are not this iteration's


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
        build_pairs(
            candidates(spec),
            config,
            2,
            replay_from=previous.drop(columns="margin"),
            replay_source="prev.parquet",
        )


def test_no_pairs_still_have_a_split_column_of_the_same_type():
    some = assign_splits(pd.DataFrame({"context_id": ["x"]}), 0.1, 0)
    none = assign_splits(pd.DataFrame({"context_id": pd.Series(dtype=str)}), 0.1, 0)
    assert list(none.columns) == ["context_id", "split"] and none.empty
    assert none["split"].dtype == some["split"].dtype
    given = pd.DataFrame({"context_id": ["x", "y"], "split": ""})
    assign_splits(given, 0.5, 0)
    assert given["split"].tolist() == ["", ""]  # a new table: the caller's is not changed


def test_small_run_guards_pick_the_contexts_by_hash():
    """With two or more contexts and nothing below val_fraction, val gets the context of SMALLEST hash; when
    every context would be val, the one of LARGEST hash trains (expected values from the function itself)."""
    ids = [f"ml/u{i}/t1" for i in range(6)]
    units = {c: context_hash_unit(c, 0) for c in ids}
    few = assign_splits(pd.DataFrame({"context_id": ids[:2]}), 1e-12, 0)
    assert dict(zip(few["context_id"], few["split"])) == {
        c: "val" if c == min(ids[:2], key=units.get) else "train" for c in ids[:2]
    }
    all_val = assign_splits(pd.DataFrame({"context_id": ids}), 0.999999, 0)
    assert all_val.loc[all_val["split"] == "train", "context_id"].tolist() == [max(ids, key=units.get)]
    # more than two contexts, none below val_fraction: still exactly the smallest hash goes to val
    many = assign_splits(pd.DataFrame({"context_id": ids}), 1e-12, 0)
    assert many.loc[many["split"] == "val", "context_id"].tolist() == [min(ids, key=units.get)]
    # one context: never forced into val (it must train), whatever val_fraction says
    assert assign_splits(pd.DataFrame({"context_id": ids[:1]}), 1e-12, 0)["split"].tolist() == ["train"]
    # val_fraction 0: no forced val context either
    assert set(assign_splits(pd.DataFrame({"context_id": ids}), 0.0, 0)["split"]) == {"train"}


def test_context_hash_is_a_uniform_unit_number_of_seed_and_id():
    ids = [f"movielens/{u}/t{t}" for u in range(400) for t in (1, 2)]
    units = np.array([context_hash_unit(c, 0) for c in ids])
    assert ((units >= 0) & (units < 1)).all()
    assert 0.45 < units.mean() < 0.55 and units.min() < 0.01 and units.max() > 0.99
    assert len(set(units)) == len(ids)
    # the seed is part of the hash, and (seed, id) cannot be confused with another split of the same characters
    assert context_hash_unit("x", 0) != context_hash_unit("x", 1)
    assert context_hash_unit("2x", 1) != context_hash_unit("x", 12)
    # stable across processes (not Python's salted hash())
    import subprocess
    import sys

    code = "from deeper.pairs import context_hash_unit as h; print(repr(h('movielens/7/t1', 3)))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outs == {repr(context_hash_unit("movielens/7/t1", 3))}


def test_all_strategy_caps_each_context_separately():
    cands = candidates({"a": [1.0, 0.9, -0.5, -0.6], "b": [1.0, 0.8, -0.5, -0.7]})
    capped, _ = select_pairs(cands, PairConfig(strategy="all", max_per_context=2, delta=0.5))
    assert capped.groupby("context_id").size().to_dict() == {"a": 2, "b": 2}
    # b: (0,3) 1.7, then the 1.5 tie (0,2) vs (1,3) goes to the larger chosen reward
    assert as_tuples(capped) == [("a", 0, 3), ("a", 0, 2), ("b", 0, 3), ("b", 0, 2)]


def test_repeated_negative_texts_are_one_candidate_before_pairing():
    cands = candidates({"a": [1.0, 0.8, -0.5, -0.5]})
    cands.loc[3, "text"] = cands.loc[2, "text"]  # the policy wrote the same bad refinement twice
    pairs, counts = select_pairs(cands, PairConfig(strategy="all", max_per_context=None, delta=0.5))
    assert as_tuples(pairs) == [("a", 0, 2), ("a", 1, 2)] and counts["duplicate_texts"] == 1
    cands.loc[1, "text"] = cands.loc[0, "text"]  # and a repeated positive
    pairs, counts = select_pairs(cands, PairConfig(strategy="all", max_per_context=None, delta=0.5))
    assert as_tuples(pairs) == [("a", 0, 2)] and counts["duplicate_texts"] == 2


def test_a_negative_or_nan_delta_and_touching_thresholds_are_refused():
    for kwargs, key in (
        ({"delta": -0.01}, "delta: must be >= 0"),
        ({"delta": float("nan")}, "delta: must be a finite"),
        ({"tau_pos": 0.0, "tau_neg": 0.0}, "tau_neg: must be below tau_pos"),
        ({"tau_pos": 1e-9, "tau_neg": 0.0}, "tau_neg: must be below tau_pos"),
        # a gap of exactly the two tolerances, or between one and two, still lets r = 1e-9 be both
        ({"tau_pos": 2e-9, "tau_neg": 0.0}, "tau_neg: must be below tau_pos"),
        ({"tau_pos": 1.5e-9, "tau_neg": 0.0}, "tau_neg: must be below tau_pos"),
        ({"tau_pos": 0.5, "tau_neg": 0.5 - 1e-9}, "tau_neg: must be below tau_pos"),
        ({"tau_pos": float("nan")}, "tau_pos: must be a finite number"),
        ({"max_per_context": 2.5}, "pair.max_per_context: must be an integer"),
    ):
        with pytest.raises(ConfigError, match=key):
            PairConfig(**kwargs)
    assert PairConfig(tau_pos=3e-9, tau_neg=0.0, delta=0.0).tau_pos == 3e-9


def test_replay_never_adds_a_pair_iteration_two_chose_again():
    """Iteration 2 re-samples an iteration-1 context with the same prompt and seeds; Model 1 writes the same
    texts, so the same pair is chosen again: it appears once, and the left-out copy is counted."""
    spec = {"ctx1": [1.0, -0.5], "ctx2": [0.9, -0.4]}
    first, _ = build_pairs(candidates(spec), PairConfig(delta=0.5, val_fraction=0.0), iteration=1)
    again = candidates({"ctx1": [1.0, -0.5], "ctx3": [1.0, -0.6]})  # ctx1's texts and rewards repeat
    pairs, summary = build_pairs(
        again, PairConfig(delta=0.8, val_fraction=0.0), iteration=2, replay_from=first, replay_max=None
    )
    assert pairs[["context_id", "chosen", "rejected"]].duplicated().sum() == 0
    assert sorted(zip(pairs["context_id"], pairs["iteration"])) == [("ctx1", 2), ("ctx2", 1), ("ctx3", 2)]
    assert summary["replay_pairs"] == 1 and summary["replay_duplicates"] == 1 and summary["pairs"] == 3
    # the cap counts pairs actually replayed: the duplicate does not use up replay_max
    capped, summary = build_pairs(
        again, PairConfig(delta=0.8, val_fraction=0.0), iteration=2, replay_from=first, replay_max=1
    )
    assert summary["replay_pairs"] == 1 and "ctx2" in set(capped["context_id"])
    # a pair with the same texts in ANOTHER context is not a duplicate
    other = candidates({"ctx9": [1.0, -0.5]})
    other["text"] = ["ctx1 s0", "ctx1 s1"]
    _, summary = build_pairs(other, PairConfig(delta=0.8, val_fraction=0.0), iteration=2, replay_from=first)
    assert summary["replay_duplicates"] == 0 and summary["replay_pairs"] == 2
    # iteration 1's summary has the same keys, and replays nothing
    first_summary = build_pairs(candidates(spec), PairConfig(delta=0.5), iteration=1)[1]
    assert first_summary["replay_duplicates"] == first_summary["replay_pairs"] == 0


def test_null_fields_and_a_non_integer_sample_are_one_line_errors_naming_the_row():
    for col in ("context_id", "prompt", "text"):
        cands = candidates(CONTEXT_A).astype({col: object})
        cands.loc[[2, 4], col] = None  # the first one is named
        with pytest.raises(InputError, match=rf"^c.parquet:3: {col} is empty$"):
            select_pairs(cands, PairConfig(), source="c.parquet")
    cands = candidates(CONTEXT_A).astype({"sample": object})
    cands.loc[[4, 5], "sample"] = ["five", "six"]
    with pytest.raises(InputError, match=r"^c.parquet:5: sample is not an integer$"):
        select_pairs(cands, PairConfig(), source="c.parquet")


def test_rows_are_counted_in_table_order_whatever_the_index_and_context_ids_are_text():
    twice = candidates({"a": [1.0, -1.0], "b": [1.0, 0.5, -1.0]})
    twice.loc[4, "sample"] = 1
    twice.index = [40, 30, 20, 10, 0]  # a frame that was filtered or sorted before
    with pytest.raises(InputError, match=r"^c.parquet:5: context 'b' has sample 1 twice$"):
        select_pairs(twice, PairConfig(), source="c.parquet")
    # the first repeat is named, as an integer even where the table holds floats
    thrice = candidates({"a": [1.0, -1.0, 0.5, 0.2]}).assign(sample=[0.0, 1.0, 1.0, 0.0])
    with pytest.raises(InputError, match=r"^c.parquet:3: context 'a' has sample 1 twice$"):
        select_pairs(thrice, PairConfig(), source="c.parquet")
    prompts = candidates({"a": [1.0, -1.0], "b": [1.0, -1.0, 0.0], "c": [1.0, -1.0]})
    prompts.loc[[3, 4, 6], "prompt"] = "[]"  # b and c, not a, have two prompts: b's first row is named
    with pytest.raises(InputError, match=r"^c.parquet:3: context 'b' has candidates with different prompts$"):
        select_pairs(prompts, PairConfig(), source="c.parquet")
    numbered = candidates({"7": [1.0, -1.0]}).assign(context_id=7)
    pairs, _ = select_pairs(numbered, PairConfig())
    assert pairs["context_id"].tolist() == ["7"]


def test_the_lowest_sample_of_a_repeated_text_is_kept_whatever_the_row_order_or_number_spelling():
    cands = candidates({"d": [1.0, 1.0, -1.0]})
    cands.loc[1, "text"] = cands.loc[0, "text"]
    pairs, _ = select_pairs(cands.iloc[::-1], PairConfig())
    assert as_tuples(pairs) == [("d", 0, 2)]
    # samples spelled as text are numbers: 9 is lower than 10
    cands = candidates({"d": [-1.0] + [1.0] * 10})
    cands.loc[10, "text"] = cands.loc[9, "text"]
    cands["sample"] = cands["sample"].astype(str)
    cands["r"] = cands["r"].astype(str)  # and rewards too (a table that went through CSV)
    pairs, _ = select_pairs(cands, PairConfig(strategy="all", max_per_context=None))
    assert 9 in set(pairs["chosen_sample"]) and 10 not in set(pairs["chosen_sample"])
    assert pairs["chosen_reward"].tolist() == [1.0] * 9


def test_margins_tie_below_1e_9_and_not_above():
    # (0,2) 1.5 and (1,3) 1.499999996 differ by 4e-9: a real difference, so the larger margin goes first although
    # (1,3) has the larger chosen reward
    pairs, _ = select_pairs(
        candidates({"m": [1.0, 1.2, -0.5, -0.299999996]}), PairConfig(strategy="all", max_per_context=None)
    )
    assert as_tuples(pairs) == [("m", 1, 2), ("m", 0, 2), ("m", 1, 3), ("m", 0, 3)]
    # chosen rewards 0.3 and 0.1 + 0.2 (0.30000000000000004) are equal: the lower sample index goes first
    noisy = candidates({"n": [0.3, 0.1 + 0.2, -0.5]})
    pairs, _ = select_pairs(noisy, PairConfig(tau_pos=0.25, strategy="all", max_per_context=None))
    assert as_tuples(pairs) == [("n", 0, 2), ("n", 1, 2)]
    # equal margin and chosen reward: the lower rejected sample first
    pairs, _ = select_pairs(
        candidates({"v": [1.0, -0.5, -0.5]}), PairConfig(strategy="all", max_per_context=None)
    )
    assert as_tuples(pairs) == [("v", 0, 1), ("v", 0, 2)]


def test_pairs_are_a_fresh_table_of_typed_columns():
    cands = candidates({"a": [2, 1, -1, -2], "b": [1, -1]})  # integer rewards
    pairs, _ = select_pairs(cands, PairConfig(strategy="largest_margin", max_per_context=None))
    assert pairs.index.tolist() == list(range(len(pairs))) == [0, 1, 2]
    for col in ("chosen_reward", "rejected_reward", "margin"):
        assert pairs[col].dtype == np.float64, col
    assert (
        pairs["chosen_sample"].dtype == pairs["rejected_sample"].dtype == pairs["iteration"].dtype == np.int64
    )
    assert pairs["iteration"].tolist() == [1, 1, 1]  # iteration 1 unless told


def test_replay_ties_and_its_table():
    """Equal margins (up to float noise) and chosen rewards: context id, then chosen sample, then rejected sample."""
    previous = pairs_frame([0.9, 0.9, 0.9, 0.9 - 1e-16, 0.9], rewards=[1.0, 1.0, 1.0, 1.0, 1.0])
    previous["context_id"] = ["c2", "c1", "c1", "c0", "c1"]
    previous["chosen_sample"] = [0, 3, 2, 0, 2]
    previous["rejected_sample"] = [1, 1, 5, 1, 4]
    previous["chosen_reward"] = [1.0, 1.0, 1.0, 0.7 + 0.3 - 1e-16, 1.0]
    previous = previous.iloc[[0, 1, 2, 4, 3]]  # not in the expected order
    replay, _ = select_replay(previous, 0.5, None)
    assert list(zip(replay["context_id"], replay["chosen_sample"], replay["rejected_sample"])) == [
        ("c0", 0, 1),
        ("c1", 2, 4),
        ("c1", 2, 5),
        ("c1", 3, 1),
        ("c2", 0, 1),
    ]
    assert list(replay.columns) == list(PAIR_COLUMNS) and replay.index.tolist() == list(range(5))
    # iteration 2's pairs given twice still leave out one copy, and count it once
    again = previous.iloc[[0]]
    kept, duplicates = select_replay(previous, 0.5, None, exclude=pd.concat([again, again]))
    assert duplicates == 1 and len(kept) == 4 and "c2" not in set(kept["context_id"])
    # nothing to replay, or nothing to compare with: no duplicates
    assert select_replay(previous, 5.0, None, exclude=again)[1] == 0
    assert select_replay(previous, 0.5, None)[1] == 0


def test_replay_max_is_checked_where_pairs_are_built():
    previous, _ = build_pairs(candidates({"p": [1.0, -0.5]}), PairConfig(delta=0.5))
    for bad, message in (
        (-1, "iter2.replay_max: must be >= 0, got -1"),
        (2.5, "iter2.replay_max: must be an integer, got 2.5"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_pairs(
                candidates({"q": [1.0, -0.5]}), PairConfig(delta=0.8), 2, replay_from=previous, replay_max=bad
            )


def test_summary_pairs_per_context():
    _, summary = build_pairs(
        candidates({"a": [1.0, 0.9, -0.5, -0.6], "b": [1.0, -0.5]}),
        PairConfig(strategy="largest_margin", max_per_context=None, val_fraction=0.0),
    )
    assert summary["pairs"] == 3 and summary["contexts_with_pair"] == 2
    assert summary["pairs_per_context_with_pair"] == pytest.approx(1.5)
    _, nothing = build_pairs(candidates({"x": [0.1, 0.2]}), PairConfig())
    assert nothing["contexts_with_pair"] == 0 and nothing["pairs_per_context_with_pair"] is None


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("r", "x", r"^c.parquet:2: r is not a number: 'x'$"),
        ("sample", 1.5, r"^c.parquet:2: sample is not an integer$"),
    ],
)
def test_a_reward_or_sample_that_is_not_a_number_is_an_error_not_a_silent_change(column, value, message):
    cands = candidates({"a": [1.0, -1.0, -0.5]}).astype({column: object})
    cands.loc[1, column] = value
    with pytest.raises(InputError, match=message):
        select_pairs(cands, PairConfig(), source="c.parquet")


def test_the_pair_stage_reads_rewards_with_their_context_prompt_and_replays_a_pairs_file(tmp_path):
    contexts = pd.DataFrame(
        {"context_id": ["c1", "c0"], "prompt": [prompt_of("c1"), prompt_of("c0")], "old_eps_prev": [1.0, 1.0]}
    )
    rewards = tmp_path / "rewards.parquet"
    pd.DataFrame(
        {
            "context_id": ["c0", "c1", "c0"],
            "sample": [0, 0, 1],
            "text": ["a", "b", "c"],
            "r": [0.9, 0.1, -0.4],
            "r_prev": [0.3, 0.0, 0.1],
        }
    ).to_parquet(rewards, index=False)
    cands = read_candidates(rewards, contexts, "contexts.parquet")
    assert sorted(cands.columns) == sorted(CANDIDATE_COLUMNS)
    assert cands["context_id"].tolist() == ["c0", "c1", "c0"]  # the rewards' row order
    assert cands["prompt"].tolist() == [prompt_of("c0"), prompt_of("c1"), prompt_of("c0")]
    pairs, _ = build_pairs(cands, PairConfig(delta=0.5))
    path = tmp_path / "pairs.parquet"
    pairs.to_parquet(path, index=False)
    pd.testing.assert_frame_equal(read_replay_pairs(path), pairs)


def test_unknown_pair_keys_are_refused_and_replay_max_may_be_null():
    params = load_params(REPO / "params.yaml")
    params["pair"]["max_pairs"] = 3
    with pytest.raises(ConfigError, match=r"pair.max_pairs: unknown key"):
        pair_block_from_params(params)
    params["iter2"]["replay_max"] = None
    assert replay_max_from_params(params) is None
    params["iter2"]["replay_max"] = 7
    assert replay_max_from_params(params) == 7


def test_extra_columns_of_the_candidates_are_ignored():
    cands = candidates(CONTEXT_A)
    plain, _ = select_pairs(cands, PairConfig())
    extra, _ = select_pairs(cands.assign(index=range(len(cands)), r_prev=0.0), PairConfig())
    pd.testing.assert_frame_equal(extra, plain)
