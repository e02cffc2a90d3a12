"""What the report stage makes of the evaluation tables: metrics, the plots' data and the case-study page.

Pure functions of the tables (deeper/rollout.py's per-method tables); stages/report.py writes their results.
"""

from __future__ import annotations

import pandas as pd

from deeper.errors import ConfigError
from deeper.reward import RewardWeights, compute_rewards, summarize_rewards
from deeper.rollout import first_update_errors, mae_by_round, summarize_method

# The plot data files the report writes into --plots-dir, and their columns.
PLOT_FILES = {
    "persona_similarity.csv": ["method", "round", "similarity"],
    "mae_by_round.csv": ["method", "round", "mae"],
    "mae_by_round_domain.csv": ["method", "domain", "round", "mae"],
    "first_update_reward.csv": ["method", "part", "domain", "user_id", "reward"],
}


def build_report(
    tables: dict[str, pd.DataFrame],
    rounds: int,
    weights: RewardWeights,
    tau_pos: float,
    tau_neg: float,
    refiners: set[str] | frozenset[str] = frozenset(),
) -> tuple[dict, dict[str, list[dict]]]:
    """(metrics, plot rows by file name) from each method's evaluation table; `refiners`: the methods whose
    first update is scored as a reward (the ones that run DEEPER's refine prompt)."""
    metrics: dict = {"rounds": rounds, "methods": {}, "first_update_reward": {}}
    plots: dict[str, list[dict]] = {name: [] for name in PLOT_FILES}
    for method, table in tables.items():
        summary = summarize_method(table, rounds)
        metrics["methods"][method] = summary
        for s, value in enumerate(mae_by_round(table, rounds)):
            plots["mae_by_round.csv"].append({"method": method, "round": s, "mae": round(value, 4)})
        groups = {
            **summary["domains"],
            **{g: summary[g] for g in ("seen", "unseen", "all") if summary[g]["domains"]},
        }
        for group, numbers in groups.items():
            for s in range(rounds + 1):
                plots["mae_by_round_domain.csv"].append(
                    {"method": method, "domain": group, "round": s, "mae": round(numbers[f"mae_r{s}"], 4)}
                )
        if method in refiners:
            rewards = compute_rewards(
                first_update_errors(table), weights, source=f"data/eval/{method}.parquet"
            )
            reward_summary = summarize_rewards(rewards, tau_pos, tau_neg)
            reward_summary["domains"] = {str(d): float(r.mean()) for d, r in rewards.groupby("domain")["r"]}
            metrics["first_update_reward"][method] = reward_summary
            for row in rewards.sort_values(["domain", "user_id"]).itertuples():
                for part in ("r", "r_prev", "r_curr", "r_fut"):
                    plots["first_update_reward.csv"].append(
                        {
                            "method": method,
                            "part": part,
                            "domain": row.domain,
                            "user_id": row.user_id,
                            "reward": round(float(getattr(row, part)), 4),
                        }
                    )
    return metrics, plots


def persona_similarity(tables: dict[str, pd.DataFrame], rounds: int, embedder) -> tuple[dict, list[dict]]:
    """({method: {r1..: mean similarity of S_{s-1} and S_s}}, plot rows), or ({}, []) without an embedder."""
    from deeper.similarity import consecutive_similarity, similarity_by_round

    if embedder is None:
        return {}, []
    metrics, rows = {}, []
    for method, table in tables.items():
        metrics[method] = similarity_by_round(consecutive_similarity(table, rounds, embedder), rounds)
        rows += [
            {"method": method, "round": int(k[1:]), "similarity": round(v, 4)}
            for k, v in metrics[method].items()
        ]
    return metrics, rows


def case_study(tables: dict[str, pd.DataFrame], rounds: int, user: str | None = None) -> str:
    """The paper's Table 27 for one evaluation user (`domain/user_id`; default: the first in sorted order):
    the persona each method wrote in each round with that round's error, as Markdown."""
    first = next(iter(tables.values()))
    keys = sorted({f"{d}/{u}" for d, u in zip(first["domain"], first["user_id"])})
    user = user or keys[0]
    if user not in keys:
        raise ConfigError("--case-user", f"{user!r} is not an evaluation user; e.g. {keys[0]!r}")
    domain, user_id = user.split("/", 1)
    lines = [
        f"# Case study: user {user_id} ({domain})",
        "",
        (
            "Each method's persona after each update round s, and the error eps_{s+1|S_s} with which it predicts "
            "the next window's ratings (written by the report stage; round 0 is every method's shared S_0)."
        ),
        "",
    ]
    for method, table in tables.items():
        rows = table[(table["domain"] == domain) & (table["user_id"] == user_id)].sort_values("round")
        lines += [f"## {method}", ""]
        for row in rows.itertuples():
            note = (
                f"; update failed ({row.update_failure}), previous persona kept" if row.update_failure else ""
            )
            lines += [
                f"### round {row.round}: MAE {row.mae:.3f}, {row.persona_words} words{note}",
                "",
                *[f"> {line}" if line else ">" for line in str(row.persona).splitlines()],
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"
