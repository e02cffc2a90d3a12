"""Preference pairs from rewarded candidates (paper Sec. 3.4), the validation split and iteration-2 replay.

Input: one row per candidate, columns `context_id, prompt, sample, text, r` (`prompt` is the refine prompt as
chat-messages JSON, the same for every candidate of a context; `sample` the candidate's index in its context;
`r` from `deeper.reward.compute_rewards`, NaN when unscored).

Rules:
- positive set r >= tau_pos, negative set r <= tau_neg (tau_neg < tau_pos, so the sets are disjoint), and a
  pair (chosen w, rejected l) needs r_w - r_l >= delta. Thresholds allow float rounding (reward.THRESHOLD_TOLERANCE).
- Candidates with the same text in one context are one candidate (the lowest sample index is kept): a small
  policy repeats itself, and a repeated text must not be trained on as several pairs.
- Among all valid positive x negative combinations of a context, `strategy` chooses (the paper does not say how;
  it reports ~3.2 pairs per context from 15 candidates):
  - `largest_margin`: greedily take the combination with the largest margin, then the next among those whose
    chosen and rejected are both unused, ...: every candidate appears in at most one pair, up to
    `max_per_context` pairs (null: no cap). The first pair is best vs worst, the second second-best vs
    second-worst, and so on.
  - `best_vs_worst`: only the first of those (one pair per context).
  - `all`: every valid combination (candidates reused), up to `max_per_context` if set.
  Order, and so the tie-break: margin desc, chosen reward desc, chosen sample asc, rejected sample asc.
- Validation: whole contexts are held out, never single pairs (a context's pairs never straddle train/val).
  A context is `val` when a seeded hash of its id, read as a number in [0, 1), is below `val_fraction`; the
  same context id gets the same split in both iterations. Two guards for small runs: with pairs in at least two
  contexts and val_fraction > 0, val gets at least the context of smallest hash; train always keeps at least
  the context of largest hash (so a single context trains).
- Replay (iteration 2): iteration-1 pairs whose margin exceeds (strictly) the iteration-2 delta, at most
  `replay_max` of them, chosen as `iter2.replay_order` says: `largest_margin` (the largest margins; ties: chosen
  reward desc, context id asc, samples asc) or `random` (Appendix A.5: "randomly selected"; a sample seeded by
  `pair.seed` from the pairs in (context id, samples) order). Either way the replayed pairs are written in
  largest-margin order, and with no cap (or fewer pairs than it) both take every pair. A pair
  (context, chosen text, rejected text) that iteration 2 chose again is not replayed: it appears once, and the
  copies left out are counted (`replay_duplicates`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from deeper.config import get
from deeper.errors import ConfigError, InputError
from deeper.params import NumberRule, mapping, number, param
from deeper.reward import THRESHOLD_TOLERANCE, is_negative, is_positive
from deeper.tables import first_bad_row, read_parquet_checked

CANDIDATE_COLUMNS = ("context_id", "prompt", "sample", "text", "r")
REWARD_COLUMNS = ("context_id", "sample", "text", "r")  # what pairing reads of the reward stage's output
PAIR_COLUMNS = (
    "context_id",
    "prompt",
    "chosen",
    "rejected",
    "chosen_reward",
    "rejected_reward",
    "margin",
    "split",
    "chosen_sample",
    "rejected_sample",
    "iteration",
)
STRATEGIES = ("largest_margin", "best_vs_worst", "all")
REPLAY_ORDERS = ("largest_margin", "random")  # iter2.replay_order
# params pair.<name>: ranges of its numbers (deeper.params.number)
PAIR_RULES: dict[str, NumberRule] = {
    "max_per_context": {"integer": True, "low": 1, "nullable": True},  # null: no cap
    "val_fraction": {"low": 0.0, "high": 1.0, "high_open": True},
    "seed": {"integer": True, "low": 0},
}
# Margins are sorted after rounding so that float noise (0.30000000000000004 vs 0.3) does not decide a tie.
MARGIN_DECIMALS = 9


@dataclass(frozen=True)
class PairConfig:
    tau_pos: float = 0.5
    tau_neg: float = 0.0
    delta: float = 0.5
    strategy: str = "largest_margin"
    max_per_context: int | None = 3
    val_fraction: float = 0.1
    seed: int = 0
    delta_key: str = "delta"  # the params key delta came from (iteration 2: iter2.delta), for messages

    def __post_init__(self):
        check_thresholds(self.tau_pos, self.tau_neg)
        number(self.delta, self.delta_key, low=0.0)
        check_strategy(self.strategy)
        for name, rule in PAIR_RULES.items():
            number(getattr(self, name), f"pair.{name}", **rule)

    @classmethod
    def from_params(cls, params: dict, iteration: int) -> PairConfig:
        """Iteration 1 uses the top-level delta, iteration 2 `iter2.delta` (paper: 0.5 then 0.8)."""
        delta_key = "delta" if iteration == 1 else "iter2.delta"
        tau_pos, tau_neg = thresholds_from_params(params)
        return cls(
            tau_pos=tau_pos,
            tau_neg=tau_neg,
            delta=param(params, delta_key, low=0.0),
            delta_key=delta_key,
            **pair_block_from_params(params),
        )


def check_strategy(strategy) -> str:
    if strategy not in STRATEGIES:
        raise ConfigError("pair.strategy", f"must be one of {list(STRATEGIES)}, got {strategy!r}")
    return strategy


def pair_block_from_params(params: dict) -> dict:
    """params `pair` (how pairs are chosen and split), checked: strategy, max_per_context, val_fraction, seed."""
    mapping(get(params, "pair"), "pair", known=("strategy", *PAIR_RULES))
    return {
        "strategy": check_strategy(get(params, "pair.strategy")),
        **{name: param(params, f"pair.{name}", **rule) for name, rule in PAIR_RULES.items()},
    }


def check_thresholds(tau_pos: float, tau_neg: float) -> tuple[float, float]:
    """tau_pos and tau_neg as finite numbers, tau_neg below tau_pos by more than the two tolerances
    (is_positive / is_negative each allow THRESHOLD_TOLERANCE: closer thresholds would make one candidate both
    positive and negative)."""
    tau_pos, tau_neg = number(tau_pos, "tau_pos"), number(tau_neg, "tau_neg")
    if not tau_pos - tau_neg > 2 * THRESHOLD_TOLERANCE:
        raise ConfigError(
            "tau_neg",
            f"must be below tau_pos by more than {2 * THRESHOLD_TOLERANCE:g} "
            f"(got tau_neg {tau_neg}, tau_pos {tau_pos})",
        )
    return tau_pos, tau_neg


def thresholds_from_params(params: dict) -> tuple[float, float]:
    """(tau_pos, tau_neg), checked: the positive and negative sets of the pair and reward stages."""
    return check_thresholds(get(params, "tau_pos"), get(params, "tau_neg"))


def replay_max_from_params(params: dict) -> int | None:
    """`iter2.replay_max`: how many iteration-1 pairs iteration 2 replays at most (null: all above iter2.delta)."""
    return param(params, "iter2.replay_max", integer=True, low=0, nullable=True)


def replay_order_from_params(params: dict) -> str:
    """`iter2.replay_order`: which iteration-1 pairs fill replay_max (largest_margin | random)."""
    order = get(params, "iter2.replay_order")
    if order not in REPLAY_ORDERS:
        raise ConfigError("iter2.replay_order", f"must be one of {list(REPLAY_ORDERS)}, got {order!r}")
    return order


def read_candidates(rewards_path: str | Path, contexts: pd.DataFrame, contexts_source: str) -> pd.DataFrame:
    """The reward stage's candidates (REWARD_COLUMNS) with their context's prompt: CANDIDATE_COLUMNS.
    InputError (file, row) for an unreadable file or a candidate whose context is not in `contexts`."""
    path = Path(rewards_path)
    rewards = read_parquet_checked(path, REWARD_COLUMNS, "run `dvc repro reward` first")[list(REWARD_COLUMNS)]
    unknown = ~rewards["context_id"].isin(contexts["context_id"])
    if unknown.any():
        raise InputError(
            path,
            f"context {rewards['context_id'][unknown].iloc[0]!r} is not in {contexts_source}",
            first_bad_row(unknown),
        )
    return rewards.merge(contexts[["context_id", "prompt"]], on="context_id", how="left")


def read_replay_pairs(path: str | Path) -> pd.DataFrame:
    """The previous iteration's pairs (PAIR_COLUMNS), replayed in iteration 2."""
    return read_parquet_checked(path, PAIR_COLUMNS, "run the previous iteration's pair stage first")


def validate_candidates(candidates: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check the columns and that each context has one prompt and unique sample indices; return a clean copy."""
    missing = [c for c in CANDIDATE_COLUMNS if c not in candidates.columns]
    if missing:
        raise InputError(source, f"missing columns {missing}; have {list(candidates.columns)}")
    df = candidates.reset_index(drop=True)
    for col in ("context_id", "prompt", "text"):
        bad = df[col].isna()
        if bad.any():
            raise InputError(source, f"{col} is empty", int(np.flatnonzero(bad.to_numpy())[0]) + 1)
    # A missing reward (NaN: a window the frozen model could not score) is a counted `unscored`; anything else that
    # is not a number is bad input, not a silent NaN. A sample index must be a whole number, not truncated.
    rewards = pd.to_numeric(df["r"], errors="coerce")
    bad = rewards.isna() & df["r"].notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(source, f"r is not a number: {df['r'].iloc[row]!r}", row + 1)
    df = df.assign(context_id=df["context_id"].astype(str), r=rewards)
    samples = pd.to_numeric(df["sample"], errors="coerce")
    bad = samples.isna() | (samples != samples.round())
    if bad.any():
        raise InputError(source, "sample is not an integer", int(np.flatnonzero(bad.to_numpy())[0]) + 1)
    df["sample"] = samples.astype(np.int64)
    dup = df.duplicated(["context_id", "sample"])
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise InputError(
            source, f"context {df['context_id'][row]!r} has sample {df['sample'][row]} twice", row + 1
        )
    prompts = df.groupby("context_id")["prompt"].nunique()
    if (prompts > 1).any():
        ctx = prompts[prompts > 1].index[0]
        row = int(np.flatnonzero((df["context_id"] == ctx).to_numpy())[0])
        raise InputError(source, f"context {ctx!r} has candidates with different prompts", row + 1)
    return df


def select_pairs(
    candidates: pd.DataFrame, config: PairConfig, source: str = "candidates", iteration: int = 1
) -> tuple[pd.DataFrame, dict]:
    """Pairs of one iteration (split column not set yet) and counts for the summary."""
    df = validate_candidates(candidates, source)
    scored = df[df["r"].notna()]
    unique = scored.sort_values(["context_id", "sample"]).drop_duplicates(
        ["context_id", "text"], keep="first"
    )
    pos = unique[is_positive(unique["r"], config.tau_pos)]
    neg = unique[is_negative(unique["r"], config.tau_neg)]
    combos = pos.merge(neg[["context_id", "sample", "text", "r"]], on="context_id", suffixes=("_w", "_l"))
    combos["margin"] = combos["r_w"] - combos["r_l"]
    combos = combos[combos["margin"] >= config.delta - THRESHOLD_TOLERANCE]
    combos = (
        combos.assign(
            _margin_key=combos["margin"].round(MARGIN_DECIMALS),
            _reward_key=combos["r_w"].round(MARGIN_DECIMALS),
        )
        .sort_values(
            ["context_id", "_margin_key", "_reward_key", "sample_w", "sample_l"],
            ascending=[True, False, False, True, True],
            kind="mergesort",
        )
        .reset_index(drop=True)
    )
    if config.strategy == "all":
        chosen = (
            combos
            if config.max_per_context is None
            else combos.groupby("context_id").head(config.max_per_context)
        )
    else:
        cap = 1 if config.strategy == "best_vs_worst" else config.max_per_context
        chosen = combos.loc[_greedy_disjoint(combos, cap)]
    pairs = pd.DataFrame(
        {
            "context_id": chosen["context_id"],
            "prompt": chosen["prompt"],
            "chosen": chosen["text_w"],
            "rejected": chosen["text_l"],
            "chosen_reward": chosen["r_w"].astype(float),
            "rejected_reward": chosen["r_l"].astype(float),
            "margin": chosen["margin"].astype(float),
            "split": "",
            "chosen_sample": chosen["sample_w"].astype(np.int64),
            "rejected_sample": chosen["sample_l"].astype(np.int64),
            "iteration": np.int64(iteration),
        }
    ).reset_index(drop=True)
    counts = {
        "candidates": len(df),
        "unscored": int(len(df) - len(scored)),
        "duplicate_texts": int(len(scored) - len(unique)),
        "positives": len(pos),
        "negatives": len(neg),
        "contexts_total": int(df["context_id"].nunique()),
        "valid_combinations": len(combos),
    }
    return pairs, counts


def _greedy_disjoint(combos: pd.DataFrame, cap: int | None) -> list[int]:
    """Indices of combos (sorted per context by preference) taken greedily, each candidate at most once
    (positives and negatives are disjoint sets, so a sample index names one candidate of a context)."""
    taken: list[int] = []
    used: set[tuple[str, int]] = set()
    per_context: dict[str, int] = {}
    for idx, ctx, w, l in zip(combos.index, combos["context_id"], combos["sample_w"], combos["sample_l"]):
        if cap is not None and per_context.get(ctx, 0) >= cap:
            continue
        if (ctx, w) in used or (ctx, l) in used:
            continue
        used.update(((ctx, w), (ctx, l)))
        per_context[ctx] = per_context.get(ctx, 0) + 1
        taken.append(idx)
    return taken


def context_hash_unit(context_id: str, seed: int) -> float:
    """A context id's seeded hash as a number in [0, 1): stable across runs, machines and iterations."""
    digest = hashlib.sha256(f"{seed}\x00{context_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(pairs: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    """Set `split` to train/val per context (see the module docstring)."""
    out = pairs.copy()
    contexts = sorted(out["context_id"].unique())
    if not contexts:
        out["split"] = pd.Series(dtype=str)
        return out
    units = pd.Series({c: context_hash_unit(c, seed) for c in contexts})
    val = set(units.index[units < val_fraction])
    if not val and len(contexts) >= 2 and val_fraction > 0:
        val.add(units.idxmin())
    if len(val) == len(contexts):
        val.discard(units.idxmax())  # training needs pairs; a lone context always trains
    out["split"] = np.where(out["context_id"].isin(val), "val", "train")
    return out


PAIR_IDENTITY = ["context_id", "chosen", "rejected"]  # one pair, however often it is chosen


def select_replay(
    previous_pairs: pd.DataFrame,
    min_margin: float,
    max_pairs: int | None,
    exclude: pd.DataFrame | None = None,
    order: str = "largest_margin",
    seed: int = 0,
) -> tuple[pd.DataFrame, int]:
    """Iteration-1 pairs with margin > min_margin, at most max_pairs (null: all) chosen by `order` (the largest
    margins, or a sample seeded by `seed`), written largest first, and how many
    of them were left out because `exclude` (iteration 2's own pairs) already holds the same pair: iteration 2
    re-samples the iteration-1 contexts with the same prompts and seeds, so Model 1 can write the same texts
    and the same pair can be chosen again; it is trained once."""
    previous_pairs = previous_pairs.reset_index(drop=True)  # the random order picks rows by index
    kept = previous_pairs[previous_pairs["margin"] > min_margin + THRESHOLD_TOLERANCE]
    duplicates = 0
    if exclude is not None and len(kept):
        seen = kept[PAIR_IDENTITY].merge(exclude[PAIR_IDENTITY].drop_duplicates(), how="left", indicator=True)
        again = (seen["_merge"] == "both").to_numpy()
        duplicates = int(again.sum())
        kept = kept[~again]
    kept = (
        kept.assign(_m=kept["margin"].round(MARGIN_DECIMALS), _r=kept["chosen_reward"].round(MARGIN_DECIMALS))
        .sort_values(
            ["_m", "_r", "context_id", "chosen_sample", "rejected_sample"],
            ascending=[False, False, True, True, True],
            kind="mergesort",
        )
        .drop(columns=["_m", "_r"])
    )
    if max_pairs is not None and order == "random" and len(kept) > max_pairs:
        # positions in a canonical (context, samples) order, so the sample depends on the pairs and the seed only
        canonical = kept.sort_values(
            ["context_id", "chosen_sample", "rejected_sample", "chosen", "rejected"], kind="mergesort"
        ).index
        picked = set(canonical[np.random.default_rng(seed).permutation(len(kept))[: int(max_pairs)]])
        kept = kept[kept.index.isin(picked)]
    elif max_pairs is not None:
        kept = kept.head(int(max_pairs))
    return kept.reset_index(drop=True), duplicates


def build_pairs(
    candidates: pd.DataFrame,
    config: PairConfig,
    iteration: int = 1,
    source: str = "candidates",
    replay_from: pd.DataFrame | None = None,
    replay_max: int | None = None,
    replay_source: str = "replay pairs",
    replay_order: str = "largest_margin",
) -> tuple[pd.DataFrame, dict]:
    """Pairs of one iteration with their split, plus replay pairs for iteration 2, and the summary for metrics.

    `replay_from`: the previous iteration's pairs; those with margin > config.delta (up to `replay_max`) that
    this iteration did not choose itself join the new pairs before the split is assigned, so their contexts
    split the same way as new ones.
    """
    pairs, counts = select_pairs(candidates, config, source, iteration)
    replay_count = duplicates = 0
    if replay_from is not None:
        missing = [c for c in PAIR_COLUMNS if c not in replay_from.columns]
        if missing:
            raise InputError(replay_source, f"missing columns {missing}; have {list(replay_from.columns)}")
        replay_max = number(replay_max, "iter2.replay_max", integer=True, low=0, nullable=True)
        replay, duplicates = select_replay(
            replay_from[list(PAIR_COLUMNS)],
            config.delta,
            replay_max,
            exclude=pairs,
            order=replay_order,
            seed=config.seed,
        )
        replay_count = len(replay)
        pairs = pd.concat([pairs, replay], ignore_index=True)
    pairs = assign_splits(pairs, config.val_fraction, config.seed)
    pairs = pairs[list(PAIR_COLUMNS)].reset_index(drop=True)
    return pairs, summarize_pairs(pairs, {**counts, "replay_duplicates": duplicates}, replay_count)


def summarize_pairs(pairs: pd.DataFrame, counts: dict, replay_pairs: int = 0) -> dict:
    n = len(pairs)
    contexts_with_pair = int(pairs["context_id"].nunique())
    return {
        **counts,
        "pairs": int(n),
        "replay_pairs": int(replay_pairs),
        "mean_margin": float(pairs["margin"].mean()) if n else None,
        "contexts_with_pair": contexts_with_pair,
        # this iteration's own pairs (replay excluded) per context it sampled: the paper's 34,782 / 10,800 = 3.2
        "pairs_per_context": float((n - replay_pairs) / counts["contexts_total"])
        if counts.get("contexts_total")
        else None,
        "pairs_per_context_with_pair": float(n / contexts_with_pair) if contexts_with_pair else None,
        "train_pairs": int((pairs["split"] == "train").sum()),
        "val_pairs": int((pairs["split"] == "val").sum()),
        "val_contexts": int(pairs.loc[pairs["split"] == "val", "context_id"].nunique()),
    }
