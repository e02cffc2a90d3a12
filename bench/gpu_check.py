"""The GPU check (issue 21 item 8): what a reviewer needs to know before spending GPU-days, in under 8 minutes on
one H100 with no network.

1. DPO training through the training stage's own code (deeper.train.train_dpo, curves off: no DVCLive there) with
   the paper profile's trainer settings (profiles/paper.yaml: LoRA r 16 / alpha 32 on all linear layers, beta 0.2,
   SFT weight 0.1 per pair, batch 4 x 8 accumulation, max length 2048, bf16 weights and autocast, gradient
   checkpointing, dropout off, cosine schedule) on a random model of SmolLM2-135M's shape (nothing to download),
   except the learning rate and warmup: 1e-4 after 5 steps instead of 5e-6 after 250, so that a loss that falls
   is visible within the check's steps. Prints steps/s, pairs/s, peak GPU memory and the loss of the first and
   last steps.
2. The transformers backend (deeper.llm.transformers_backend) on the same model: generation (tokens/s) and the
   logprob ratings (items/s) on the device.

    python bench/gpu_check.py                 # cuda, bf16, 40 DPO steps (bash bench/gpu_check.sh wraps it)
    python bench/gpu_check.py --cpu           # this machine: a tiny model, float32, 4 steps (tests/test_gpu_check.py)

Writes the numbers as JSON to --out (default: $OUT/gpu_check.json where $OUT is set, else nothing) and prints
them. The prompts are the paper profile's refine prompts rendered on made-up windows, the chosen persona a
stated taste and the rejected one assistant chatter, so the pairs are easy and the loss must fall.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHOSEN = "This viewer loves thoughtful dramas and slow science fiction, and dislikes loud action comedies."
REJECTED = "I'm ready to assist you. Please go ahead and provide the user's persona."
TITLES = [f"Film number {i} (19{60 + i})" for i in range(30)]


def make_pairs(n: int, prompts) -> pd.DataFrame:  # noqa: F821
    """n preference pairs whose prompts are the paper's refine prompt over a 10-item window."""
    import pandas as pd

    rows = []
    for i in range(n):
        window = [(TITLES[(i + k) % len(TITLES)], 3.0, float(1 + (i + k) % 5)) for k in range(10)]
        chat = prompts.render("refine", item_type="movie", old_persona=CHOSEN, comparisons=window)
        rows.append(
            {
                "context_id": f"c{i}",
                "prompt": json.dumps(chat),
                "chosen": f"{CHOSEN} ({i})",
                "rejected": REJECTED,
            }
        )
    return pd.DataFrame(rows)


def paper_train_config(cpu: bool, steps: int):
    from deeper.config import load_params
    from deeper.profile import apply_profile, load_profile
    from deeper.train import TrainConfig

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    config = TrainConfig.from_params(apply_profile(params, load_profile("paper", params)), iteration=1)
    config = replace(config, lr=1e-4, warmup_steps=5, max_steps=steps, eval_steps=None, checkpoint_steps=None)
    if cpu:  # this machine: no bf16 instructions, two cores
        config = replace(
            config,
            bf16=False,
            dtype="float32",
            per_device_batch=2,
            grad_accum=1,
            max_length=1024,
            warmup_steps=1,
        )
    return config


def check(cpu: bool, steps: int) -> dict:
    import torch
    from transformers import TrainerCallback

    from deeper.llm import load_llm
    from deeper.llm.base import RatingGroup, Sampling
    from deeper.prompts import PROMPT_SETS, load_prompts
    from deeper.train import train_dpo
    from tests.tiny import SMOLLM2_SHAPE, make_tiny_llama

    device = "cpu" if cpu else "cuda"
    if not cpu and not torch.cuda.is_available():
        raise click.ClickException("no CUDA device: run with --cpu for the CPU mode")
    out: dict = {
        "device": torch.cuda.get_device_name(0) if not cpu else "cpu",
        "torch": torch.__version__,
        "bf16_supported": bool(not cpu and torch.cuda.is_bf16_supported()),
    }
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model = make_tiny_llama(work / "model", shape=None if cpu else SMOLLM2_SHAPE)
    prompts = load_prompts(PROMPT_SETS["published"])  # the paper profile's prompts
    config = paper_train_config(cpu, steps)
    pairs_per_step = config.per_device_batch * config.grad_accum
    pairs = make_pairs(pairs_per_step * steps, prompts)
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    summary = train_dpo(model, pairs, pairs.head(0), work / "adapter", config, callbacks=(Losses(),))
    seconds = time.perf_counter() - start
    k = max(1, min(5, len(losses) // 2))
    out["train"] = {
        "settings": {
            f: getattr(config, f)
            for f in (
                "lora_r",
                "lora_alpha",
                "beta",
                "sft_weight",
                "sft_normalization",
                "per_device_batch",
                "grad_accum",
                "max_length",
                "bf16",
                "dtype",
                "gradient_checkpointing",
                "disable_dropout",
                "lr",
                "warmup_steps",
            )
        },
        "steps": summary["steps"],
        "seconds": round(seconds, 1),
        "steps_per_s": round(summary["steps"] / seconds, 3),
        "pairs_per_s": round(summary["steps"] * pairs_per_step / seconds, 2),
        "longest_tokens": summary["longest_tokens"],
        "loss_first": round(sum(losses[:k]) / k, 4) if losses else None,
        "loss_last": round(sum(losses[-k:]) / k, 4) if losses else None,
        "peak_gpu_gib": None if cpu else round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    out["train"]["loss_falls"] = bool(losses) and out["train"]["loss_last"] < out["train"]["loss_first"]

    dtype = "float32" if cpu else "bfloat16"
    llm = load_llm(
        {"backend": "transformers", "name": str(model), "device": device, "dtype": dtype, "batch_size": 16}
    )
    llm.show_progress = False
    chats = [json.loads(p) for p in pairs["prompt"].head(16)]
    new_tokens = 16 if cpu else 128
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    texts = llm.generate(chats, 1, Sampling(temperature=1.0, top_p=0.4, max_new_tokens=new_tokens, seed=0))
    seconds = time.perf_counter() - start
    generated = sum(len(llm.tokenizer(t[0], add_special_tokens=False)["input_ids"]) for t in texts)
    groups = [
        RatingGroup(
            [[*chat[:-1], {"role": "user", "content": f"{chat[-1]['content']}\n{t}"}] for t in TITLES[:10]]
        )
        for chat in chats
    ]
    start_r = time.perf_counter()
    results = llm.rating_probs(groups)
    seconds_r = time.perf_counter() - start_r
    out["generate"] = {
        "chats": len(chats),
        "tokens": generated,
        "tokens_per_s": round(generated / seconds, 1),
    }
    out["ratings"] = {
        "items": sum(len(g.chats) for g in groups),
        "items_per_s": round(sum(len(g.chats) for g in groups) / seconds_r, 1),
        "probs_sum_to_1": bool(all(abs(r.probs.sum(axis=1) - 1).max() < 1e-4 for r in results)),
        "peak_gpu_gib": None if cpu else round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    return out


@click.command(help=__doc__)
@click.option(
    "--cpu", is_flag=True, help="The CPU mode: a tiny model in float32, a few steps (this machine)."
)
@click.option(
    "--steps", type=click.IntRange(2), default=None, help="DPO steps [default: 40 on cuda, 4 on cpu]."
)
@click.option(
    "--out", "out_path", type=click.Path(dir_okay=False), default=None, help="Write the numbers here."
)
def main(cpu: bool, steps: int | None, out_path: str | None) -> None:
    result = check(cpu, steps or (4 if cpu else 40))
    text = json.dumps(result, indent=1)
    click.echo(text)
    target = out_path or (str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None)
    if target:
        Path(target).write_text(text + "\n", encoding="utf-8")
    t = result["train"]
    click.echo(
        f"DPO: {t['steps']} steps, {t['steps_per_s']} steps/s, {t['pairs_per_s']} pairs/s, loss "
        f"{t['loss_first']} -> {t['loss_last']} ({'falls' if t['loss_falls'] else 'DOES NOT FALL'}), peak "
        f"{t['peak_gpu_gib']} GiB; generation {result['generate']['tokens_per_s']} tokens/s; ratings "
        f"{result['ratings']['items_per_s']} items/s",
        err=True,
    )
    if not t["loss_falls"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
