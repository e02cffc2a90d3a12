"""Stage contexts@k: the refinement contexts of DEEPER's training iteration k (paper Sec. 3.4, Appendix A.5).

\b
    python -m stages.contexts --iteration 1   # (S_0, O_1) for every training user, S_0 from init_personas
    python -m stages.contexts --iteration 2   # the iteration-1 contexts + (S_1, O_2), S_1 from refine@1

A context at step t = k holds the old persona S_{t-1} (from --personas), the refine prompt (S_{t-1} and,
for window W_t, the actual ratings beside those predicted with S_{t-1}) and the old persona's errors on
W_{t-1}, W_t and W_{t+1}, which every candidate's reward is measured against. Users without a persona or
without windows up to W_{t+1} are skipped and counted. Reads params `models.frozen` and `predict`.
Predictions go through the response cache: a killed run resumes where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import pandas as pd

from deeper.errors import InputError
from deeper.iteration import build_contexts, load_frozen, read_user_windows, states_from_personas
from deeper.methods import trained_update_from_params
from deeper.predict import PredictSettings
from deeper.prompts import prompts_from_params
from deeper.reward import OLD_COLUMNS, PARTS
from deeper.tables import read_contexts, read_personas
from stages._cli import PARAMS_OPTION, load_checked_params, user_errors
from stages._tail import stage_tail


def summarize(contexts: pd.DataFrame, new: int, skipped: dict, predict: dict) -> dict:
    by_step = {
        f"t{t}": {
            "contexts": len(rows),
            "old_eps": {p: float(rows[c].mean()) for p, c in zip(PARTS, OLD_COLUMNS)},
        }
        for t, rows in contexts.groupby("t", sort=True)
    }
    return {
        "contexts": len(contexts),
        "new_contexts": new,
        "by_step": by_step,
        "skipped_users": skipped,
        "predict": predict,
    }


def run(
    params: dict,
    iteration: int,
    windows: Path,
    personas: Path,
    previous: Path | None,
    out: Path,
    metrics: Path,
) -> dict:
    start = time.perf_counter()
    settings = PredictSettings.from_params(params)
    update = trained_update_from_params(params)
    users = read_user_windows(windows, split="train")
    old = read_contexts(previous) if previous is not None else None
    states, skipped = states_from_personas(users, read_personas(personas, split="train"), t=iteration)
    frozen = load_frozen(params)
    click.echo(f"{len(states)} new contexts at t={iteration}; skipped users: {skipped}", err=True)
    new, stats = build_contexts(states, frozen, settings, prompts_from_params(params), update=update)
    contexts = pd.concat([old, new], ignore_index=True) if old is not None else new
    twice = contexts["context_id"].duplicated()
    if twice.any():
        raise InputError(
            previous, f"context {contexts['context_id'][twice].iloc[0]!r} is built again at t={iteration}"
        )
    summary = summarize(contexts, len(new), skipped, stats.to_metrics())
    what = f"{len(contexts)} contexts ({len(new)} new)"
    stage_tail(contexts, out, metrics, summary, {"frozen": frozen}, what, start)
    return summary


@click.command(help=__doc__)
@PARAMS_OPTION
@click.option(
    "--iteration",
    type=click.IntRange(1, 2),
    required=True,
    help="Training iteration k (1 or 2); its new contexts are at step t = k.",
)
@click.option(
    "--windows",
    default="data/window/windows.parquet",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The window stage's output (training users).",
)
@click.option(
    "--personas",
    default=None,
    type=click.Path(dir_okay=False),
    help="The old personas S_{k-1}: columns domain, user_id, split, persona [default: k=1 "
    "data/personas/init.parquet, else data/personas/refined_it{k-1}.parquet].",
)
@click.option(
    "--previous",
    default=None,
    type=click.Path(dir_okay=False),
    help="Contexts kept from the previous iteration [default: none for k=1, data/contexts/it{k-1}.parquet].",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="Contexts, one row each [default: data/contexts/it{k}.parquet].",
)
@click.option(
    "--metrics",
    "metrics_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Counts and the old personas' mean errors per step [default: metrics/contexts_it{k}.json].",
)
@user_errors
def main(params_path, iteration, windows, personas, previous, out, metrics_path):
    k = iteration
    run(
        load_checked_params(params_path),
        k,
        Path(windows),
        Path(
            personas
            or ("data/personas/init.parquet" if k == 1 else f"data/personas/refined_it{k - 1}.parquet")
        ),
        Path(previous) if previous else (Path(f"data/contexts/it{k - 1}.parquet") if k > 1 else None),
        Path(out or f"data/contexts/it{k}.parquet"),
        Path(metrics_path or f"metrics/contexts_it{k}.json"),
    )


if __name__ == "__main__":
    main()
