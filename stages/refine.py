"""Stage refine@k: Model k refines the newest contexts of iteration k once, S_{t-1} -> S_t, for every
training user: the old personas of iteration k+1's new contexts (paper Appendix A.5, iteration 2).

\b
    python -m stages.refine --iteration 1   # Model 1 (policy + models/adapters/it1): S_0 -> S_1

Exactly the `deeper` evaluation method's update (deeper.methods.Refine on each context's stored input):
one sample per persona, drawn with the `sample` settings (temperature, top_p, repetition_penalty,
max_new_tokens, seed; not n). An answer with no text keeps the old persona (failure "empty"); a looping one
is used (flag "repetitive"); both are counted. Reads params `models.policy` and those `sample` keys. Calls
go through the response cache: a killed run resumes where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from deeper.iteration import SampleSettings, load_policy, read_user_windows, refine_personas
from deeper.methods import trained_update_from_params
from deeper.prompts import prompts_from_params
from deeper.tables import read_contexts
from stages._cli import PARAMS_OPTION, load_checked_params, user_errors
from stages._tail import stage_tail


def run(params: dict, contexts_path: Path, windows: Path, adapter: Path, out: Path, metrics: Path) -> dict:
    start = time.perf_counter()
    sampling = SampleSettings.from_params(params).sampling
    contexts = read_contexts(contexts_path)
    latest = contexts[contexts["t"] == contexts["t"].max()]
    users = read_user_windows(windows, split="train")
    policy = load_policy(params, adapter)
    click.echo(
        f"refining {len(latest)} personas (step t={int(latest['t'].max())}) with the policy + {adapter}",
        err=True,
    )
    refined, counts = refine_personas(
        latest,
        users,
        policy,
        sampling,
        prompts_from_params(params),
        source=str(contexts_path),
        update=trained_update_from_params(params),
    )
    what = f"{counts['refined']} personas ({counts['empty']} empty answers kept the old one)"
    stage_tail(refined, out, metrics, counts, {"policy": policy}, what, start)
    return counts


@click.command(help=__doc__)
@PARAMS_OPTION
@click.option("--iteration", type=click.IntRange(1, 1), required=True, help="The model's iteration k (1).")
@click.option(
    "--contexts",
    "contexts_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Iteration k's contexts; the newest step's are refined [default: data/contexts/it{k}.parquet].",
)
@click.option(
    "--windows",
    default="data/window/windows.parquet",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The window stage's output.",
)
@click.option(
    "--adapter",
    default=None,
    type=click.Path(file_okay=False),
    help="Model k's LoRA adapter on the policy [default: models/adapters/it{k}].",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="One persona per context: domain, user_id, split, persona, t, context_id, failure, flag "
    "[default: data/personas/refined_it{k}.parquet].",
)
@click.option(
    "--metrics",
    "metrics_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Refined, empty and repetitive counts [default: metrics/refine_it{k}.json].",
)
@user_errors
def main(params_path, iteration, contexts_path, windows, adapter, out, metrics_path):
    k = iteration
    run(
        load_checked_params(params_path),
        Path(contexts_path or f"data/contexts/it{k}.parquet"),
        Path(windows),
        Path(adapter or f"models/adapters/it{k}"),
        Path(out or f"data/personas/refined_it{k}.parquet"),
        Path(metrics_path or f"metrics/refine_it{k}.json"),
    )


if __name__ == "__main__":
    main()
