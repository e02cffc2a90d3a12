"""Benchmark: rating one window with the persona prefix computed once vs the naive batched forward.

A realistic window: a ~300-token persona in the system message, 10 item prompts, the "Rating: " prefill.
The paths run in the same process on the same prompts (interleaved, after a warm-up): prefix reuse as the
backend does it (packed suffixes), prefix reuse with the cache copied per item (batched), and the naive
left-padded batch of full prompts. The script checks that all agree within 1e-4 and writes the medians and
the ratio naive / prefix reuse to a JSON file. The upper bound of the ratio is about the token count ratio
(n_items * prompt tokens) / (prefix + n_items * suffix tokens), reported too.

    python bench/prefix_reuse.py                       # models/embedded/smollm2-135m
    python bench/prefix_reuse.py --model /path/to/hf-folder --repeats 9
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages._cli import user_errors  # after the repo root is on the path

PERSONA = """\
This user is a 34-year-old engineer who watches films mostly on weekends, often with friends, and rates them
with care. Their favourite genre is character-driven drama: they loved slow, thoughtful stories about family,
loss and second chances, and they reward strong acting and dialogue far more than spectacle. They also enjoy
clever comedies, especially dry or dark humour in the style of the Coen brothers, and they have a soft spot
for 1970s and 1980s science fiction that takes its ideas seriously (Star Wars, Alien, Blade Runner).
They dislike loud, formulaic action films, sequels that repeat the first film, and horror that relies on
jump scares; such films usually get a 1 or a 2 from them, even when they are popular. Romantic comedies are
hit and miss: a witty script earns a 4, a predictable one a 2. Animated films surprise them: they rated
Toy Story and Aladdin highly for their writing, but they find most children's films tiresome.
They are generous with documentaries and foreign-language films, rarely giving them less than a 3.
Their ratings are spread out: they give 5s to a few films a year that moved them, and they are not shy
about 1s. Recent ratings show growing impatience with long running times and with franchise films,
and more enthusiasm for crime stories with moral ambiguity (Fargo, Pulp Fiction, The Usual Suspects).
Compared with other users, they rate critically acclaimed dramas higher and blockbusters lower."""

INSTRUCTIONS = (
    "You predict how a user rates movies on a scale from 1 (hated it) to 5 (loved it), using the user's "
    "persona below. Answer with a single digit."
)
TITLES = [
    "Toy Story (1995)",
    "GoldenEye (1995)",
    "Four Rooms (1995)",
    "Get Shorty (1995)",
    "Copycat (1995)",
    "Twelve Monkeys (1995)",
    "Babe (1995)",
    "Dead Man Walking (1995)",
    "Richard III (1995)",
    "Mortal Kombat (1995)",
]


def window_chats(n_items: int) -> list[list[dict]]:
    system = f"{INSTRUCTIONS}\n\nUser persona:\n{PERSONA}"
    return [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": f'Movie: "{title}"\nHow would this user rate this movie?'},
        ]
        for title in (TITLES * (n_items // len(TITLES) + 1))[:n_items]
    ]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What the benches record of the machine beside their ratios."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
    }


@click.command()
@click.option(
    "--model",
    default="models/embedded/smollm2-135m",
    show_default=True,
    help="HF model folder (the fetch stage's embedded model by default).",
)
@click.option("--items", default=10, show_default=True, help="Item prompts in the window.")
@click.option(
    "--repeats", default=7, show_default=True, help="Timed runs of each path (medians are reported)."
)
@click.option("--batch-size", default=16, show_default=True, help="Backend batch size (both paths).")
@click.option(
    "--out",
    default="bench/results/prefix_reuse.json",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Where the JSON summary goes.",
)
@user_errors
def main(model, items, repeats, batch_size, out):
    """Time prefix reuse against the naive batched forward on one realistic window; write a JSON summary."""
    import numpy as np
    import torch
    import transformers

    from deeper.llm import load_llm
    from deeper.llm.base import RatingGroup
    from deeper.llm.scoring import result_from_logits
    from deeper.llm.transformers_backend import PrefixMemo, common_prefix_length, packing_supported
    from deeper.metrics import write_json

    llm = load_llm({"backend": "transformers", "name": model, "batch_size": batch_size})
    group = RatingGroup(window_chats(items), prefill="Rating: ")
    prompts = llm.rating_prompt_ids(group)
    prefix = common_prefix_length(prompts)
    persona_tokens = len(llm.encode([PERSONA])[0])

    # True = the backend's default (packed suffixes on sdpa/eager attention); "batched" copies the cache per item.
    paths = {"prefix_reuse": True, "prefix_reuse_batched": "batched", "naive": False}

    def timed(path: str):
        llm.prefix_memo = PrefixMemo()  # the backend keeps the last prefix: time encoding it every run
        start = time.perf_counter()
        logits = llm.rating_logits(group, prefix_reuse=paths[path])
        return time.perf_counter() - start, result_from_logits(logits, llm.digit_ids)

    for path in paths:  # warm-up
        timed(path)
    times = {path: [] for path in paths}
    results = {}
    for _ in range(repeats):  # interleaved, so a change in machine load hits every path alike
        for path in paths:
            seconds, results[path] = timed(path)
            times[path].append(seconds)
    reuse, naive = results["prefix_reuse"], results["naive"]
    max_diff = max(float(np.abs(results[p].probs - naive.probs).max()) for p in paths)
    reuse_median, naive_median = statistics.median(times["prefix_reuse"]), statistics.median(times["naive"])
    summary = {
        "model": str(model),
        "fingerprint": llm.fingerprint,
        "items": items,
        "persona_tokens": persona_tokens,
        "prefix_tokens": prefix,
        "suffix_tokens_mean": float(np.mean([len(p) - prefix for p in prompts])),
        "prompt_tokens_mean": float(np.mean([len(p) for p in prompts])),
        "token_ratio": sum(len(p) for p in prompts) / (prefix + sum(len(p) - prefix for p in prompts)),
        "repeats": repeats,
        "naive_median_s": naive_median,
        "prefix_reuse_median_s": reuse_median,
        "ratio": naive_median / reuse_median,
        "prefix_reuse_batched_median_s": statistics.median(times["prefix_reuse_batched"]),
        "ratio_batched": naive_median / statistics.median(times["prefix_reuse_batched"]),
        "method": "packed" if packing_supported(llm.model) else "batched",
        "max_abs_diff_probs": max_diff,
        "equal_within_1e-4": max_diff <= 1e-4,
        "digit_mass_mean": float(reuse.digit_mass.mean()),
        "machine": machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    write_json(out, summary, digits=6)
    click.echo(
        f"prefix reuse {reuse_median * 1000:.0f} ms vs naive {naive_median * 1000:.0f} ms: "
        f"{summary['ratio']:.2f}x; max |diff| {max_diff:.2e} ({prefix} shared of "
        f"{summary['prompt_tokens_mean']:.0f} tokens per prompt); wrote {out}"
    )
    if max_diff > 1e-4:
        raise SystemExit("error: prefix reuse and the naive path disagree by more than 1e-4")


if __name__ == "__main__":
    main()
