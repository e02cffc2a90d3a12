"""Benchmark: a candidate persona's consecutive windows with the prefix KV cache kept vs encoded per window.

The reward stage rates each candidate persona on 3 consecutive windows (previous, current, next) of 10 items.
The transformers backend keeps the last prefix's KV cache (`PrefixMemo`), so when the windows of one persona
follow each other the persona is encoded once for all of them. This script rates one persona on 3 windows
(the bench/prefix_reuse.py persona and chat, MovieLens titles 1-10, 11-20 and 21-30) through the backend's
`rating_probs` two ways, in the same process on the same prompts (interleaved, after a warm-up): one
PrefixMemo shared by the 3 windows (the backend's behaviour; a new memo per run, so every run encodes the
persona once) and a new PrefixMemo per window (the behaviour before the memo: the persona encoded 3 times).
It checks that both agree within 1e-4 and writes the medians and the ratio fresh / shared to a JSON file.
The upper bound of the ratio is about the token count ratio windows * (prefix + suffixes) / (prefix +
windows * suffixes), reported too.

    python bench/persona_windows.py                       # models/embedded/smollm2-135m
    python bench/persona_windows.py --model /path/to/hf-folder --repeats 9
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.prefix_reuse import INSTRUCTIONS, PERSONA, TITLES, machine  # one persona for the benches
from stages._cli import user_errors  # after the repo root is on the path

# Three consecutive windows: the prefix_reuse titles (MovieLens 100k ids 1-10), then ids 11-20 and 21-30.
WINDOWS = [
    TITLES,
    [
        "Seven (Se7en) (1995)",
        "Usual Suspects, The (1995)",
        "Mighty Aphrodite (1995)",
        "Postino, Il (1994)",
        "Mr. Holland's Opus (1995)",
        "French Twist (Gazon maudit) (1995)",
        "From Dusk Till Dawn (1996)",
        "White Balloon, The (1995)",
        "Antonia's Line (1995)",
        "Angels and Insects (1995)",
    ],
    [
        "Muppet Treasure Island (1996)",
        "Braveheart (1995)",
        "Taxi Driver (1976)",
        "Rumble in the Bronx (1995)",
        "Birdcage, The (1996)",
        "Brothers McMullen, The (1995)",
        "Bad Boys (1995)",
        "Apollo 13 (1995)",
        "Batman Forever (1995)",
        "Belle de jour (1967)",
    ],
]


def window_chats(titles: list[str]) -> list[list[dict]]:
    """bench/prefix_reuse.py's window (its persona and instructions) with the given titles."""
    system = f"{INSTRUCTIONS}\n\nUser persona:\n{PERSONA}"
    return [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": f'Movie: "{title}"\nHow would this user rate this movie?'},
        ]
        for title in titles
    ]


@click.command()
@click.option(
    "--model",
    default="models/embedded/smollm2-135m",
    show_default=True,
    help="HF model folder (the fetch stage's embedded model by default).",
)
@click.option(
    "--repeats", default=7, show_default=True, help="Timed runs of each path (medians are reported)."
)
@click.option("--batch-size", default=16, show_default=True, help="Backend batch size (both paths).")
@click.option(
    "--out",
    default="bench/results/persona_windows.json",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Where the JSON summary goes.",
)
@user_errors
def main(model, repeats, batch_size, out):
    """Time a persona's 3 windows with a shared PrefixMemo against a fresh one per window; write a JSON summary."""
    import numpy as np
    import torch
    import transformers

    from deeper.llm import load_llm
    from deeper.llm.base import RatingGroup
    from deeper.llm.transformers_backend import PrefixMemo, common_prefix_length, packing_supported
    from deeper.metrics import write_json

    llm = load_llm({"backend": "transformers", "name": model, "batch_size": batch_size})
    llm.show_progress = False
    groups = [RatingGroup(window_chats(titles), prefill="Rating: ") for titles in WINDOWS]
    prompts = [llm.rating_prompt_ids(g) for g in groups]
    prefixes = [common_prefix_length(p) for p in prompts]
    suffixes = [sum(len(p) - prefix for p in window) for prefix, window in zip(prefixes, prompts)]
    persona_tokens = len(llm.encode([PERSONA])[0])

    def shared():  # the backend: one memo, so windows 2 and 3 reuse window 1's persona cache
        llm.prefix_memo = memo = PrefixMemo()
        return llm.rating_probs(groups), [memo.hits]

    def fresh():  # before the memo: every window encodes the persona again
        results, hits = [], []
        for group in groups:
            llm.prefix_memo = memo = PrefixMemo()
            results += llm.rating_probs([group])
            hits.append(memo.hits)
        return results, hits

    paths = {"shared_memo": shared, "fresh_memo": fresh}

    def timed(path: str):
        start = time.perf_counter()
        results, hits = paths[path]()
        return time.perf_counter() - start, results, sum(hits)

    for path in paths:  # warm-up
        timed(path)
    times = {path: [] for path in paths}
    results, hits = {}, {}
    for _ in range(repeats):  # interleaved, so a change in machine load hits every path alike
        for path in paths:
            seconds, results[path], hits[path] = timed(path)
            times[path].append(seconds)
    max_diff = max(
        float(np.abs(a.probs - b.probs).max()) for a, b in zip(results["shared_memo"], results["fresh_memo"])
    )
    shared_median, fresh_median = (
        statistics.median(times["shared_memo"]),
        statistics.median(times["fresh_memo"]),
    )
    windows = len(groups)
    summary = {
        "model": str(model),
        "fingerprint": llm.fingerprint,
        "windows": windows,
        "items_per_window": [len(g.chats) for g in groups],
        "persona_tokens": persona_tokens,
        "prefix_tokens": prefixes,
        "suffix_tokens_per_window": suffixes,
        "token_ratio": sum(p + s for p, s in zip(prefixes, suffixes)) / (prefixes[0] + sum(suffixes)),
        "memo_hits_per_run": hits,
        "repeats": repeats,
        "fresh_memo_median_s": fresh_median,
        "shared_memo_median_s": shared_median,
        "ratio": fresh_median / shared_median,
        "method": "packed" if packing_supported(llm.model) else "batched",
        "max_abs_diff_probs": max_diff,
        "equal_within_1e-4": max_diff <= 1e-4,
        "digit_mass_mean": float(np.mean([r.digit_mass.mean() for r in results["shared_memo"]])),
        "machine": machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    write_json(out, summary, digits=6)
    click.echo(
        f"{windows} windows, shared memo {shared_median * 1000:.0f} ms vs fresh memo per window "
        f"{fresh_median * 1000:.0f} ms: {summary['ratio']:.2f}x; max |diff| {max_diff:.2e} (memo hits per run "
        f"{hits['shared_memo']} vs {hits['fresh_memo']}; prefix {prefixes[0]} tokens); wrote {out}"
    )
    if max_diff > 1e-4:
        raise SystemExit("error: the shared and the fresh memo disagree by more than 1e-4")
    if hits["shared_memo"] != windows - 1 or hits["fresh_memo"] != 0:
        raise SystemExit(
            f"error: expected {windows - 1} memo hits per run with the shared memo and none with "
            f"fresh ones, got {hits['shared_memo']} and {hits['fresh_memo']}"
        )


if __name__ == "__main__":
    main()
