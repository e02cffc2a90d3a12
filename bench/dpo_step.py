"""Benchmark: seconds and peak memory per DPO pair-step on this machine, for the settings TRL and peft offer.

The learning check (profiles/learning_check.yaml) needs hundreds of DPO steps where the default takes one. This
script builds the stage's own trainer (deeper.train.build_trainer: TRL DPOTrainer + peft LoRA + the SFT term) on
refine pairs of the pipeline's length (the bench/adapter_merge.py refine chats, ~420-520 prompt tokens; chosen
and rejected personas of ~150 tokens), one pair per step, and times the optimizer steps with a callback (the
first step is a warm-up and not counted). Each setting runs in its own process, so its peak RSS is its own:

- baseline: the embedded default's settings (gradient checkpointing on, reference log-probs on every step);
- no_checkpointing: gradient_checkpointing false (no recomputed forward in the backward pass);
- precompute_ref: TRL's precompute_ref_log_probs (the reference forward runs once per pair before training;
  its cost is reported apart, and per pair-step amortised over the epochs of the learning check);
- no_checkpointing+precompute_ref: both.

The yardstick in the same run: one plain torch forward (no grad) of the same pair (chosen and rejected as one
batch of two, the base model), so every setting is also given as forwards per step (a backward pass through the
frozen base costs about two forwards, a recomputation one, a reference one).
Not benchmarked, with the reason written to the results: padding-free batches (TRL 1.16 disables
`padding_free` "after a refactor" and falls back to padding; one pair per step has no padding to save anyway)
and bf16 autocast (needs the CPU's native bf16 instructions: the `lscpu` flags avx512_bf16 / amx_bf16).

    OMP_NUM_THREADS=1 python bench/dpo_step.py            # ~25 min on one AMD EPYC core
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.adapter_merge import refine_chats
from bench.prefix_reuse import PERSONA, machine
from stages._cli import user_errors  # after the repo root is on the path

SETTINGS = {
    "baseline": {"gradient_checkpointing": True, "precompute_ref_log_probs": False},
    "no_checkpointing": {"gradient_checkpointing": False, "precompute_ref_log_probs": False},
    "precompute_ref": {"gradient_checkpointing": True, "precompute_ref_log_probs": True},
    "no_checkpointing+precompute_ref": {"gradient_checkpointing": False, "precompute_ref_log_probs": True},
}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def bench_pairs(count: int):
    """`count` refine pairs: the bench's refine chats (cycled), the bench persona as chosen, the same sentences in
    reverse order as rejected (a different text of the same length)."""
    import pandas as pd

    chats = refine_chats()
    sentences = PERSONA.split(". ")
    rejected = ". ".join(reversed(sentences))
    rows = [
        {
            "context_id": f"c{i}",
            "prompt": json.dumps(chats[i % len(chats)]),
            "chosen": PERSONA,
            "rejected": rejected,
            "split": "train",
        }
        for i in range(count)
    ]
    return pd.DataFrame(rows)


def cpu_flags() -> set[str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    for line in out.splitlines():
        if line.startswith("Flags:"):
            return set(line.split(":", 1)[1].split())
    return set()


def run_setting(model: str, name: str, steps: int) -> dict:
    """One setting in this process: build the stage's trainer, train `steps` pair-steps, time each step."""
    import tempfile

    import torch
    from transformers import TrainerCallback

    from deeper.train import TrainConfig, build_trainer, pairs_to_examples

    config = TrainConfig(
        max_steps=steps, per_device_batch=1, grad_accum=1, max_length=896, lr=1e-4, **SETTINGS[name]
    )
    examples = pairs_to_examples(bench_pairs(steps), "bench")
    step_seconds: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_seconds.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as work_dir:
        started = time.perf_counter()
        trainer = build_trainer(model, examples, [], config, work_dir)
        build_seconds = time.perf_counter() - started
        trainer.add_callback(StepTimer())
        trainer.train()
        tokens = [
            len(p) + max(len(c), len(r))
            for p, c, r in zip(
                trainer.train_dataset["prompt_ids"],
                trainer.train_dataset["chosen_ids"],
                trainer.train_dataset["rejected_ids"],
            )
        ]
        # the yardstick: a plain forward of the first pair (chosen and rejected rows) through the base model
        row = trainer.train_dataset[0]
        seqs = [row["prompt_ids"] + row["chosen_ids"], row["prompt_ids"] + row["rejected_ids"]]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        model_ = trainer.model
        forward_seconds = []
        with torch.no_grad(), model_.disable_adapter():
            model_.eval()
            for _ in range(3):
                t = time.perf_counter()
                model_(input_ids=ids, attention_mask=mask)
                forward_seconds.append(time.perf_counter() - t)
    return {
        "step_seconds": step_seconds,
        "build_seconds": build_seconds,
        "pair_tokens": tokens,
        "forward_seconds": forward_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


@click.command()
@click.option(
    "--model",
    default="models/embedded/smollm2-135m",
    show_default=True,
    help="HF model folder (the fetch stage's embedded model by default).",
)
@click.option(
    "--steps", default=4, show_default=True, help="Pair-steps per setting (the first is a warm-up)."
)
@click.option(
    "--epochs",
    default=3,
    show_default=True,
    help="Epochs over which a precomputed reference forward is amortised (the learning check's 3).",
)
@click.option(
    "--setting",
    "only",
    default=None,
    type=click.Choice(list(SETTINGS)),
    hidden=True,
    help="Run one setting in this process and print its JSON (used by the parent run).",
)
@click.option(
    "--settings",
    "chosen",
    default=",".join(SETTINGS),
    show_default=True,
    help="Comma-separated settings to run (baseline is always run: the ratios need it).",
)
@click.option(
    "--out",
    default="bench/results/dpo_step.json",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Where the JSON summary goes.",
)
@user_errors
def main(model, steps, epochs, only, chosen, out):
    """Time DPO pair-steps under each trainer setting, one process per setting; write a JSON summary."""
    if only is not None:
        print("RESULT " + json.dumps(run_setting(model, only, steps)), flush=True)
        return
    import peft
    import torch
    import transformers
    import trl

    from deeper.metrics import write_json

    wanted = {"baseline", *(c.strip() for c in chosen.split(",") if c.strip())}
    unknown = sorted(wanted - set(SETTINGS))
    if unknown:
        raise click.BadParameter(
            f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}", param_hint="--settings"
        )
    results = {}
    for name in [n for n in SETTINGS if n in wanted]:
        click.echo(f"{name} ...", err=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--model", model, "--steps", str(steps), "--setting", name],
            capture_output=True,
            text=True,
            env={**os.environ, "TQDM_DISABLE": "1"},
            check=False,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results[name] = {"error": " | ".join(tail)}
            click.echo(f"  failed: {results[name]['error']}", err=True)
            continue
        results[name] = json.loads(lines[-1][len("RESULT ") :])
    base = results.get("baseline", {})
    if "error" in base or not base:
        raise SystemExit("error: the baseline setting failed: " + base.get("error", "no result"))
    summary_settings = {}
    forward = statistics.median(base["forward_seconds"])
    for name, r in results.items():
        if "error" in r:
            summary_settings[name] = {"error": r["error"]}
            continue
        step = statistics.median(r["step_seconds"][1:])
        precompute = (
            max(0.0, r["build_seconds"] - base["build_seconds"]) / steps
            if SETTINGS[name]["precompute_ref_log_probs"]
            else 0.0
        )
        per_pair = step + precompute / epochs
        summary_settings[name] = {
            **SETTINGS[name],
            "step_median_s": step,
            "precompute_per_pair_s": precompute,
            "per_pair_step_s": per_pair,  # the step plus the precompute amortised over the epochs
            "forwards_per_pair_step": per_pair / forward,
            "ratio_to_baseline": per_pair / statistics.median(base["step_seconds"][1:]),
            "peak_rss_mb": r["peak_rss_mb"],
            "step_seconds": r["step_seconds"],
        }
    flags = cpu_flags()
    summary = {
        "model": model,
        "steps": steps,
        "epochs_amortised": epochs,
        "pair_tokens": base["pair_tokens"],
        "plain_forward_median_s": forward,
        "settings": summary_settings,
        "not_benchmarked": {
            "padding_free": "TRL 1.16 disables padding_free (falls back to padding); one pair per step pads nothing",
            "bf16_autocast": ("the CPU has " + ", ".join(sorted(flags & set(BF16_FLAGS))))
            if flags & set(BF16_FLAGS)
            else "the CPU has no native bf16 instructions (no avx512_bf16 / amx_bf16 "
            "in lscpu flags): autocast would emulate bf16 and be slower",
        },
        "machine": machine(),
        "peft": peft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }
    write_json(out, summary, digits=4)
    for name, s in summary_settings.items():
        if "error" in s:
            click.echo(f"{name:32s} failed: {s['error']}")
        else:
            click.echo(
                f"{name:32s} {s['per_pair_step_s']:6.1f} s per pair-step ({s['ratio_to_baseline']:.2f}x the "
                f"baseline, {s['forwards_per_pair_step']:.1f} forwards), peak RSS {s['peak_rss_mb']:.0f} MB"
            )
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
