"""Stage report: the evaluation tables of all methods -> metrics/eval.json and plots/mae_by_round.csv.

    python -m stages.report                      # as `dvc repro report` runs it
    python -m stages.report --eval-dir /tmp/eval --metrics /tmp/eval.json --plot /tmp/mae.csv

metrics/eval.json (read with `dvc metrics show` / `dvc metrics diff`):
    rounds
    methods.<method>.domains.<domain>:
        users, mae_r0 .. mae_r<rounds> (eps_{t+1|S_t}), reduction_pct (mae_r0 -> last round, positive = better),
        first_update.{prev,curr,fut}.{before,after,delta} (S_0 vs S_1 on W_0, W_1, W_2: the paper's Table 1),
        persona_tokens.r0 .. r<rounds>, predict_failed_items, update_failures, update_flags
    methods.<method>.{seen,unseen,all}: the same numbers averaged over those domains (each domain weighs the
        same, as the paper's averages; counts summed), plus `domains` (how many)
    first_update_reward.<refiner>: the reward of the first update on held-out users (deeper/reward.py with
        params reward.weights; r and its parts, shares by tau_pos / tau_neg), for the refiners (untrained,
        deeper_it1, deeper) among `evaluate.methods`; `.domains.<domain>` the mean r per domain
plots/mae_by_round.csv: method, round, mae (averaged over domains); `dvc plots show` draws one line per method.
"""

from __future__ import annotations

import csv
from pathlib import Path

import click
import pandas as pd

from deeper.config import get, load_params
from deeper.errors import ConfigError
from deeper.methods import method_spec
from deeper.metrics import write_json
from deeper.reward import RewardWeights, compute_rewards, summarize_rewards
from deeper.rollout import first_update_errors, mae_by_round, read_eval_table, summarize_method
from stages._cli import PARAMS_OPTION, user_errors
from stages.evaluate import rounds_from_params


def methods_from_params(params: dict) -> list[str]:
    methods = get(params, "evaluate.methods")
    if not isinstance(methods, list) or not methods or len(set(methods)) != len(methods):
        raise ConfigError("evaluate.methods", f"must be a non-empty list of distinct method names, got {methods!r}")
    for name in methods:
        method_spec(name)
    return methods


def build_report(tables: dict[str, pd.DataFrame], rounds: int, weights: RewardWeights, tau_pos: float,
                 tau_neg: float) -> tuple[dict, list[dict]]:
    """(metrics, plot rows) from each method's evaluation table."""
    metrics: dict = {"rounds": rounds, "methods": {}, "first_update_reward": {}}
    plot = []
    for method, table in tables.items():
        metrics["methods"][method] = summarize_method(table, rounds)
        for s, value in enumerate(mae_by_round(table, rounds)):
            plot.append({"method": method, "round": s, "mae": round(value, 4)})
        if method_spec(method).is_refiner:
            rewards = compute_rewards(first_update_errors(table), weights, source=f"data/eval/{method}.parquet")
            summary = summarize_rewards(rewards, tau_pos, tau_neg)
            summary["domains"] = {str(d): float(r.mean()) for d, r in rewards.groupby("domain")["r"]}
            metrics["first_update_reward"][method] = summary
    return metrics, plot


def run(params: dict, eval_dir: Path, metrics_path: Path, plot_path: Path) -> dict:
    rounds = rounds_from_params(params)
    methods = methods_from_params(params)
    weights = RewardWeights.from_params(params)
    tau_pos, tau_neg = float(get(params, "tau_pos")), float(get(params, "tau_neg"))
    tables = {m: read_eval_table(eval_dir / f"{m}.parquet", m, rounds) for m in methods}
    metrics, plot = build_report(tables, rounds, weights, tau_pos, tau_neg)
    write_json(metrics_path, metrics)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    with plot_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "round", "mae"])
        writer.writeheader()
        writer.writerows(plot)
    for method in methods:
        overall = metrics["methods"][method]["all"]
        first, last, cut = (overall.get(k) for k in ("mae_r0", f"mae_r{rounds}", "reduction_pct"))
        shown = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in (first, last)]
        cut_shown = f"{cut:.1f} %" if isinstance(cut, float) else str(cut)
        click.echo(f"{method:>11}: mae r0 {shown[0]} -> r{rounds} {shown[1]} (reduction {cut_shown})", err=True)
    return metrics


@click.command(help=__doc__.split("\n\n")[0] + "\n\n" + (
    "Per method and domain: the future-window error after each round (mae_r0 ..), its reduction from round 0 "
    "to the last (reduction_pct), the first update's errors on the previous, current and future windows, "
    "persona tokens per round and failures; averages over seen, unseen and all domains; the held-out reward "
    "of the first update for the refiners. The shape is documented in stages/report.py."))
@PARAMS_OPTION
@click.option("--eval-dir", default="data/eval", show_default=True, type=click.Path(file_okay=False),
              help="Where the evaluate stages wrote <method>.parquet.")
@click.option("--metrics", "metrics_path", default="metrics/eval.json", show_default=True,
              type=click.Path(dir_okay=False), help="Errors per round, method and domain; first update; rewards.")
@click.option("--plot", "plot_path", default="plots/mae_by_round.csv", show_default=True,
              type=click.Path(dir_okay=False), help="method, round, mae (averaged over domains).")
@user_errors
def main(params_path, eval_dir, metrics_path, plot_path):
    run(load_params(params_path), Path(eval_dir), Path(metrics_path), Path(plot_path))


if __name__ == "__main__":
    main()
