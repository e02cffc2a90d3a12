"""Stage pair@k: DPO preference pairs from the rewarded candidates (paper Sec. 3.4, Appendix A.5).

\b
    python -m stages.pair --iteration 1   # tau_pos, tau_neg, delta
    python -m stages.pair --iteration 2   # tau_pos, tau_neg, iter2.delta + replay of iteration-1 pairs

Positive set r >= tau_pos, negative set r <= tau_neg, and a pair needs a margin of at least delta; how pairs
are chosen among the valid combinations, the validation split and the replay are deeper/pairs.py's (params
`pair`, and `iter2.delta`, `iter2.replay_max`, `iter2.replay_order` for iteration 2). Each pair carries its context's refine
prompt (chat messages as JSON), so training needs this file only.
"""

from __future__ import annotations

from pathlib import Path

import click

from deeper.metrics import write_json
from deeper.outputs import write_parquet
from deeper.pairs import (
    PairConfig,
    build_pairs,
    read_candidates,
    read_replay_pairs,
    replay_max_from_params,
    replay_order_from_params,
)
from deeper.tables import read_contexts
from stages._cli import PARAMS_OPTION, load_checked_params, user_errors


def run(
    params: dict,
    iteration: int,
    contexts_path: Path,
    rewards_path: Path,
    previous: Path | None,
    out: Path,
    metrics: Path,
) -> dict:
    config = PairConfig.from_params(params, iteration)
    contexts = read_contexts(contexts_path)
    candidates = read_candidates(rewards_path, contexts, str(contexts_path))
    replay = replay_max = None
    replay_order = "largest_margin"
    if iteration > 1:
        replay = read_replay_pairs(previous)
        replay_max, replay_order = replay_max_from_params(params), replay_order_from_params(params)
    pairs, summary = build_pairs(
        candidates,
        config,
        iteration,
        source=str(rewards_path),
        replay_from=replay,
        replay_max=replay_max,
        replay_source=str(previous),
        replay_order=replay_order,
    )
    write_parquet(pairs, out)
    write_json(metrics, summary)
    replayed = f"{summary['replay_pairs']} replayed"
    if summary["replay_duplicates"]:
        replayed += f", {summary['replay_duplicates']} already chosen again not replayed"
    click.echo(
        f"wrote {out}: {summary['pairs']} pairs ({replayed}) from "
        f"{summary['contexts_with_pair']} of {summary['contexts_total']} contexts",
        err=True,
    )
    return summary


@click.command(help=__doc__)
@PARAMS_OPTION
@click.option("--iteration", type=click.IntRange(1, 2), required=True, help="Training iteration k (1 or 2).")
@click.option(
    "--contexts",
    "contexts_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="The contexts (for the prompts) [default: data/contexts/it{k}.parquet].",
)
@click.option(
    "--rewards",
    "rewards_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="The rewarded candidates [default: data/rewards/it{k}.parquet].",
)
@click.option(
    "--previous",
    default=None,
    type=click.Path(dir_okay=False),
    help="Iteration 2: the previous pairs to replay [default: data/pairs/it{k-1}/pairs.parquet].",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="Pairs with their split [default: data/pairs/it{k}/pairs.parquet].",
)
@click.option(
    "--metrics",
    "metrics_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Pair counts, mean margin, contexts with a pair [default: metrics/pairs_it{k}.json].",
)
@user_errors
def main(params_path, iteration, contexts_path, rewards_path, previous, out, metrics_path):
    k = iteration
    run(
        load_checked_params(params_path),
        k,
        Path(contexts_path or f"data/contexts/it{k}.parquet"),
        Path(rewards_path or f"data/rewards/it{k}.parquet"),
        Path(previous or f"data/pairs/it{k - 1}/pairs.parquet") if k > 1 else None,
        Path(out or f"data/pairs/it{k}/pairs.parquet"),
        Path(metrics_path or f"metrics/pairs_it{k}.json"),
    )


if __name__ == "__main__":
    main()
