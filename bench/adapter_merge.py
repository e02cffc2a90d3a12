"""Benchmark: a LoRA adapter merged into the weights vs the unmerged peft model, for generation and rating.

The transformers backend merges a peft adapter into the base weights for inference
(`PeftModel.from_pretrained(model, adapter).merge_and_unload()`), which removes the adapter's extra matmuls
on every adapted linear layer. This script builds the backend twice on the same base model and adapter: as
the backend does (merged) and with its model replaced by the unmerged PeftModel (the behaviour before the
merge). Both then run the same work through the backend's own methods, in the same process, interleaved after
a warm-up:
- greedy generation: 4 refine chats (deeper/prompts/refine.txt with the bench/prefix_reuse.py persona and
  10 MovieLens titles each, the model's chat template), one batch of 4, 64 new tokens;
- rating one window (the bench/prefix_reuse.py window) with prefix reuse; the prefix memo is emptied before
  every run, so each run encodes the persona (the first window of a candidate).
It checks that the greedy tokens are identical and the rating probabilities agree within 1e-4, and writes
the medians and the ratios unmerged / merged to a JSON file.

    python bench/adapter_merge.py                        # models/embedded/smollm2-135m + models/adapters/it1
    python bench/adapter_merge.py --adapter /path/to/peft-folder --repeats 9
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.persona_windows import WINDOWS
from bench.prefix_reuse import PERSONA, machine, window_chats  # one persona for the benches
from stages._cli import user_errors  # after the repo root is on the path

# A fourth window for the fourth chat: MovieLens 100k ids 31-40.
GENERATION_WINDOWS = WINDOWS + [
    [
        "Crimson Tide (1995)",
        "Crumb (1994)",
        "Desperado (1995)",
        "Doom Generation, The (1995)",
        "Free Willy 2: The Adventure Home (1995)",
        "Mad Love (1995)",
        "Nadja (1994)",
        "Net, The (1995)",
        "Strange Days (1995)",
        "To Wong Foo, Thanks for Everything! Julie Newmar (1995)",
    ]
]


def refine_chats() -> list[list[dict]]:
    """One refine chat per window: the persona, and made-up predicted vs actual scores of its 10 titles."""
    from deeper.prompts.render import load_prompts

    prompts = load_prompts()
    return [
        prompts.render(
            "refine",
            item_type="movie",
            old_persona=PERSONA,
            comparisons=[
                (title, 1 + (3 * i + w) % 5, 1 + (2 * i + 3 * w) % 5) for i, title in enumerate(titles)
            ],
        )
        for w, titles in enumerate(GENERATION_WINDOWS)
    ]


def record_tokens(llm) -> list:
    """Make `llm.model.generate` keep the token ids it returns (the backend's `generate` returns text only)."""
    outputs = []
    generate = llm.model.generate

    def recording(*args, **kwargs):
        out = generate(*args, **kwargs)
        outputs.append(out.cpu())
        return out

    llm.model.generate = recording
    return outputs


@click.command()
@click.option(
    "--model",
    default="models/embedded/smollm2-135m",
    show_default=True,
    help="HF model folder (the fetch stage's embedded model by default).",
)
@click.option(
    "--adapter",
    default="models/adapters/it1",
    show_default=True,
    help="peft LoRA adapter folder trained on that model (the train stage's first iteration by default).",
)
@click.option("--new-tokens", default=64, show_default=True, help="Greedy tokens generated per chat.")
@click.option(
    "--repeats", default=7, show_default=True, help="Timed runs of each path (medians are reported)."
)
@click.option(
    "--out",
    default="bench/results/adapter_merge.json",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Where the JSON summary goes.",
)
@user_errors
def main(model, adapter, new_tokens, repeats, out):
    """Time the merged adapter against the unmerged PeftModel (generation and rating); write a JSON summary."""
    import numpy as np
    import peft
    import torch
    import transformers
    from peft import PeftModel

    from deeper.llm import load_llm
    from deeper.llm.base import RatingGroup, Sampling
    from deeper.llm.scoring import render_prompt, result_from_logits
    from deeper.llm.transformers_backend import PrefixMemo
    from deeper.metrics import write_json

    chats = refine_chats()
    spec = {"backend": "transformers", "name": model, "batch_size": len(chats)}
    llms = {"merged": load_llm(spec, adapter=adapter), "unmerged": load_llm(spec)}
    llms["unmerged"].model = PeftModel.from_pretrained(llms["unmerged"].model, adapter).eval()
    tokens = {path: record_tokens(llm) for path, llm in llms.items()}
    for llm in llms.values():
        llm.show_progress = False
    sampling = Sampling(temperature=0.0, max_new_tokens=new_tokens)
    group = RatingGroup(window_chats(10), prefill="Rating: ")
    merged = llms["merged"]
    prompt_tokens = [len(p) for p in merged.encode([render_prompt(merged.tokenizer, c) for c in chats])]

    def generate(path: str):
        tokens[path].clear()
        start = time.perf_counter()
        llms[path].generate(chats, 1, sampling)
        return time.perf_counter() - start, torch.cat(tokens[path])

    def rate(path: str):
        llm = llms[path]
        llm.prefix_memo = PrefixMemo()  # encode the persona in every run
        start = time.perf_counter()
        logits = llm.rating_logits(group)
        return time.perf_counter() - start, result_from_logits(logits, llm.digit_ids)

    tasks = {"generate": generate, "rate": rate}
    for task in tasks.values():  # warm-up
        for path in llms:
            task(path)
    times = {(task, path): [] for task in tasks for path in llms}
    results = {}
    for _ in range(repeats):  # interleaved, so a change in machine load hits every path alike
        for task, run in tasks.items():
            for path in llms:
                seconds, results[task, path] = run(path)
                times[task, path].append(seconds)
    same_tokens = torch.equal(results["generate", "merged"], results["generate", "unmerged"])
    max_diff = float(np.abs(results["rate", "merged"].probs - results["rate", "unmerged"].probs).max())
    median = {key: statistics.median(values) for key, values in times.items()}
    prompt_width = max(prompt_tokens)
    new = results["generate", "merged"][:, prompt_width:]
    generated = (~torch.isin(new, torch.tensor([merged.pad_id, *merged.eos_ids]))).sum(-1)
    summary = {
        "model": str(model),
        "adapter": str(adapter),
        "fingerprint": merged.fingerprint,
        "chats": len(chats),
        "batch_size": len(chats),
        "max_new_tokens": new_tokens,
        "generated_tokens": generated.tolist(),
        "prompt_tokens": prompt_tokens,
        "rating_items": len(group.chats),
        "repeats": repeats,
        "generate_merged_median_s": median["generate", "merged"],
        "generate_unmerged_median_s": median["generate", "unmerged"],
        "generate_ratio": median["generate", "unmerged"] / median["generate", "merged"],
        "rate_merged_median_s": median["rate", "merged"],
        "rate_unmerged_median_s": median["rate", "unmerged"],
        "rate_ratio": median["rate", "unmerged"] / median["rate", "merged"],
        "greedy_tokens_identical": same_tokens,
        "max_abs_diff_probs": max_diff,
        "equal_within_1e-4": max_diff <= 1e-4,
        "machine": machine(),
        "peft": peft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    write_json(out, summary, digits=6)
    click.echo(
        f"generation merged {median['generate', 'merged'] * 1000:.0f} ms vs unmerged "
        f"{median['generate', 'unmerged'] * 1000:.0f} ms: {summary['generate_ratio']:.2f}x "
        f"(greedy tokens identical: {same_tokens}); rating merged {median['rate', 'merged'] * 1000:.0f} ms vs "
        f"unmerged {median['rate', 'unmerged'] * 1000:.0f} ms: {summary['rate_ratio']:.2f}x "
        f"(max |diff| {max_diff:.2e}); wrote {out}"
    )
    if not same_tokens:
        raise SystemExit("error: the merged and the unmerged adapter generate different greedy tokens")
    if max_diff > 1e-4:
        raise SystemExit("error: the merged and the unmerged adapter disagree by more than 1e-4")


if __name__ == "__main__":
    main()
