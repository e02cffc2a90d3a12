"""Stage train@k: DPO + LoRA + SFT term on the preference pairs (paper Sec. 3.4): Model 1, then Model 2.

\b
    python -m stages.train --iteration 1   # base policy + a fresh LoRA adapter -> models/adapters/it1
    python -m stages.train --iteration 2   # continues models/adapters/it1 -> models/adapters/it2

Loss L = L_DPO(sigmoid, beta) + alpha * L_SFT(chosen). Reads params `models.policy.name` (the base model: an HF
folder or hub id), `train` (LoRA shape, beta, lengths, optimiser, steps), the top-level `alpha`, and for
iteration 2 `iter2.reference` (the DPO reference: `base` model or `previous` = Model 1) and `iter2.train`
(overrides of `train`). The pairs file's `split` column gives train and validation pairs (whole contexts).
Writes the adapter (adapter_config.json + adapter_model.safetensors) and metrics: final train/eval DPO loss,
reward accuracy and margins, steps, pairs, pairs cut at train.max_length. The run's wall-clock seconds and
peak memory are not metrics (they change on every run): they are printed and written to train_log.json in
the adapter folder. Training curves (DPO loss, chosen/rejected rewards, margins, reward accuracy per logged step,
on the train pairs and, every `train.eval_steps` and at the end, the validation pairs) go to plots/train/it{k}
through DVCLive: `dvc plots show` / `dvc plots diff` (dvc.yaml's train_* plots). With `train.checkpoint_steps`,
the stage is resumable: a run killed midway and started again (`dvc repro`) continues from its latest checkpoint
in $DEEPER_CACHE_DIR/train/ (default .cache/deeper/train/) instead of step 0.

dvc.yaml starts it with params `train.launcher` (`python`, or e.g. `accelerate launch --multi_gpu
--num_processes 4` for DDP on four GPUs): every process trains, only the main one writes the adapter, the
metrics and the log lines.
"""

from __future__ import annotations

from pathlib import Path

import click

from deeper.assets import cache_root
from deeper.config import get
from deeper.errors import ConfigError, InputError
from deeper.llm.fingerprint import check_adapter_folder, resolve_model
from deeper.metrics import write_json
from deeper.train import TrainConfig, is_main_process, read_pairs, train_dpo
from stages._cli import PARAMS_OPTION, load_checked_params, user_errors


def base_model_path(params: dict) -> tuple[str, str]:
    """(where the base weights load from, the params name written in the adapter's config)."""
    name = str(get(params, "models.policy.name"))
    if name.endswith(".gguf"):
        raise ConfigError(
            "models.policy.name", "training needs an HF model folder or hub id, not a GGUF file"
        )
    return resolve_model(name, where="models.policy.name").location, name


def run(
    params: dict,
    iteration: int,
    pairs_path: Path,
    init_adapter: Path | None,
    out: Path,
    metrics: Path,
    curves: Path | None = None,
) -> dict:
    config = TrainConfig.from_params(params, iteration)
    reference = get(params, "iter2.reference") if iteration > 1 else "base"
    if init_adapter is not None:
        if not (init_adapter / "adapter_config.json").is_file():
            raise InputError(
                init_adapter, "no LoRA adapter here; run the previous iteration's train stage first"
            )
        check_adapter_folder(init_adapter)
    train_pairs, val_pairs = read_pairs(pairs_path)
    base, base_name = base_model_path(params)  # after the inputs: an `embedded:` model may be fetched here
    main = is_main_process()  # before training: the launcher's RANK (the process group is not up yet)
    if main:
        click.echo(
            f"training on {len(train_pairs)} pairs ({len(val_pairs)} validation), base {base}"
            + (f", from {init_adapter}, reference {reference}" if init_adapter else ""),
            err=True,
        )
    summary = train_dpo(
        base,
        train_pairs,
        val_pairs,
        out,
        config,
        init_adapter=init_adapter,
        reference=reference,
        source=str(pairs_path),
        base_name=base_name,
        curves_dir=curves,
        checkpoint_dir=cache_root() / "train",
    )
    if not main:  # several processes (train.launcher): the main one writes
        return summary
    write_json(metrics, summary)
    if not summary["trained"]:
        click.echo(
            f"warning: no training pairs in {pairs_path} (see the pair stage's metrics); "
            f"{out} carries the input model over untrained",
            err=True,
        )
    eval_loss = summary["eval"]["loss"]  # None without validation pairs
    loss_shown = "none (no validation pairs)" if eval_loss is None else f"{eval_loss:.4f}"
    click.echo(
        f"wrote {out} after {summary['steps']} steps; "
        f"eval loss {loss_shown}, truncated pairs {summary['truncated_pairs']}",
        err=True,
    )
    return summary


@click.command(help=__doc__)
@PARAMS_OPTION
@click.option("--iteration", type=click.IntRange(1, 2), required=True, help="Training iteration k (1 or 2).")
@click.option(
    "--pairs",
    "pairs_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Pairs with their split [default: data/pairs/it{k}/pairs.parquet].",
)
@click.option(
    "--init-adapter",
    default=None,
    type=click.Path(file_okay=False),
    help="Iteration 2: the adapter to continue [default: models/adapters/it{k-1}].",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False),
    help="Adapter folder to write [default: models/adapters/it{k}].",
)
@click.option(
    "--metrics",
    "metrics_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Training summary [default: metrics/train_it{k}.json].",
)
@click.option(
    "--curves",
    "curves_path",
    default=None,
    type=click.Path(file_okay=False),
    help="DVCLive folder for the training curves [default: plots/train/it{k}].",
)
@user_errors
def main(params_path, iteration, pairs_path, init_adapter, out, metrics_path, curves_path):
    k = iteration
    run(
        load_checked_params(params_path),
        k,
        Path(pairs_path or f"data/pairs/it{k}/pairs.parquet"),
        Path(init_adapter or f"models/adapters/it{k - 1}") if k > 1 else None,
        Path(out or f"models/adapters/it{k}"),
        Path(metrics_path or f"metrics/train_it{k}.json"),
        Path(curves_path or f"plots/train/it{k}"),
    )


if __name__ == "__main__":
    main()
