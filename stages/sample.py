"""Stage sample@k: M candidate refinements per context from the policy (paper Sec. 3.4, Appendix A.5).

\b
    python -m stages.sample --iteration 1   # the base policy (params models.sampler)
    python -m stages.sample --iteration 2   # Model 1: params models.policy + models/adapters/it1

Reads params `models.sampler` (k=1) or `models.policy` (k=2; the model DPO trains, Model 1 on it) and `sample` (n, temperature, top_p, repetition_penalty, max_new_tokens, seed).
Sample k of a context is drawn with seed `sample.seed + k`. Each candidate is cleaned like every generated
persona (whitespace, a leading "Refined persona:" label); one with no text left cannot be role-played and is
dropped, a looping one is kept with flag "repetitive"; both are counted in the metrics, with duplicate texts
and copies of the old persona. Calls go through the response cache: a killed run resumes where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from deeper.iteration import POLICY_ROLES, SampleSettings, load_policy, sample_candidates
from deeper.tables import read_contexts
from stages._cli import PARAMS_OPTION, load_checked_params, user_errors
from stages._tail import stage_tail


def run(
    params: dict,
    iteration: int,
    contexts_path: Path,
    adapter: Path | None,
    out: Path,
    metrics: Path,
    role: str = "policy",
) -> dict:
    start = time.perf_counter()
    settings = SampleSettings.from_params(params)
    contexts = read_contexts(contexts_path)
    policy = load_policy(params, adapter, role)
    click.echo(
        f"{len(contexts)} contexts x {settings.n} candidates from models.{role}"
        f"{f' + {adapter}' if adapter else ''}",
        err=True,
    )
    samples, counts = sample_candidates(contexts, policy, settings.n, settings.sampling)
    what = f"{len(samples)} candidates ({counts['empty']} empty dropped)"
    stage_tail(samples, out, metrics, counts, {"policy": policy}, what, start)
    return counts


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
    "--adapter",
    default=None,
    type=click.Path(file_okay=False),
    help="LoRA adapter on the model [default: none for k=1, models/adapters/it{k-1} after].",
)
@click.option(
    "--model",
    "role",
    default=None,
    type=click.Choice(POLICY_ROLES),
    help="The params block models.<model> that samples [default: sampler for k=1 (the base policy whose "
    "candidates become the pairs), policy after (Model 1 is an adapter on the model DPO trains)].",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="Candidates: context_id, sample, text, words, flag [default: data/samples/it{k}.parquet].",
)
@click.option(
    "--metrics",
    "metrics_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Candidate counts (kept, empty, repetitive, duplicates) [default: metrics/sample_it{k}.json].",
)
@user_errors
def main(params_path, iteration, contexts_path, adapter, out, metrics_path, role):
    k = iteration
    run(
        load_checked_params(params_path),
        k,
        Path(contexts_path or f"data/contexts/it{k}.parquet"),
        Path(adapter) if adapter else (Path(f"models/adapters/it{k - 1}") if k > 1 else None),
        Path(out or f"data/samples/it{k}.parquet"),
        Path(metrics_path or f"metrics/sample_it{k}.json"),
        role or ("sampler" if k == 1 else "policy"),
    )


if __name__ == "__main__":
    main()
