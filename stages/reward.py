"""Stage reward@k: each candidate's prediction errors and DEEPER's three-part reward (paper Sec. 3.3).

\b
    python -m stages.reward --iteration 1

For a candidate S_t of a context at step t, the frozen model predicts windows W_{t-1}, W_t and W_{t+1} with
it; r_prev, r_curr and r_fut are how much it lowers the old persona's errors there, r their weighted sum
(deeper/reward.py). Reads params `models.frozen`, `predict`, `reward.weights`, and `tau_pos` / `tau_neg`
for the shares of candidates in the positive and negative sets reported in the metrics. Predictions go
through the response cache: a killed run resumes where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from deeper.iteration import candidate_errors, load_frozen, read_user_windows
from deeper.pairs import thresholds_from_params
from deeper.predict import PredictSettings
from deeper.prompts import prompts_from_params
from deeper.reward import RewardWeights, compute_rewards, summarize_rewards
from deeper.tables import read_contexts, read_samples
from stages._cli import PARAMS_OPTION, load_checked_params, user_errors
from stages._tail import stage_tail


def run(
    params: dict, contexts_path: Path, samples_path: Path, windows: Path, out: Path, metrics: Path
) -> dict:
    start = time.perf_counter()
    weights = RewardWeights.from_params(params)
    tau_pos, tau_neg = thresholds_from_params(params)
    settings = PredictSettings.from_params(params)
    contexts = read_contexts(contexts_path)
    samples = read_samples(samples_path, contexts)
    users = read_user_windows(windows, split="train")
    frozen = load_frozen(params)
    click.echo(f"{len(samples)} candidates x 3 windows to predict", err=True)
    errors, stats = candidate_errors(contexts, samples, users, frozen, settings, prompts_from_params(params))
    rewards = compute_rewards(errors, weights, source=str(samples_path))
    rewards = rewards.merge(contexts[["context_id", "t"]], on="context_id", how="left")
    summary = summarize_rewards(rewards, tau_pos, tau_neg)
    summary["r_mean_by_step"] = {
        f"t{t}": float(rows["r"].mean()) for t, rows in rewards.groupby("t", sort=True)
    }
    summary["predict"] = stats.to_metrics()
    mean_r = summary["r"]["mean"]  # None when no candidate could be scored
    mean_shown = "none scored" if mean_r is None else f"{mean_r:.3f}"
    what = f"{len(rewards)} rewarded candidates, mean r {mean_shown},"
    stage_tail(rewards, out, metrics, summary, {"frozen": frozen}, what, start)
    return summary


@click.command(help=__doc__)
@PARAMS_OPTION
@click.option("--iteration", type=click.IntRange(1, 2), required=True, help="Training iteration k (1 or 2).")
@click.option(
    "--contexts",
    "contexts_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="The contexts [default: data/contexts/it{k}.parquet].",
)
@click.option(
    "--samples",
    "samples_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="The candidates [default: data/samples/it{k}.parquet].",
)
@click.option(
    "--windows",
    default="data/window/windows.parquet",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The window stage's output.",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="One row per candidate: text, old_eps_*, new_eps_*, r_prev, r_curr, r_fut, r, t "
    "[default: data/rewards/it{k}.parquet].",
)
@click.option(
    "--metrics",
    "metrics_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Mean/std of r and its parts, shares positive/negative/better [default: metrics/reward_it{k}.json].",
)
@user_errors
def main(params_path, iteration, contexts_path, samples_path, windows, out, metrics_path):
    k = iteration
    run(
        load_checked_params(params_path),
        Path(contexts_path or f"data/contexts/it{k}.parquet"),
        Path(samples_path or f"data/samples/it{k}.parquet"),
        Path(windows),
        Path(out or f"data/rewards/it{k}.parquet"),
        Path(metrics_path or f"metrics/reward_it{k}.json"),
    )


if __name__ == "__main__":
    main()
