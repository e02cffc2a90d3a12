"""Can a policy write a persona the diagnostic world reads? A probe to run before the learning check's hours.

Samples N candidates for each of K iteration-1 contexts of a learning-check run (every len/K-th context of its
data/contexts/it1.parquet, so training contexts only), with the refine prompt of a prompt set, and counts:
candidates that state a taste at all (deeper.diagnostic.stated_tastes), contexts whose candidates differ in MAE on
the context's window (a pair needs a spread), and the mean MAE gain of a candidate over no persona and over the
context's old persona. MAE is the transparent model's on the window the prompt shows (its actual ratings).

    python scripts/policy_probe.py --run-dir /work/lc --model models/embedded/smollm2-135m --prompts diagnostic
    python scripts/policy_probe.py --run-dir /work/lc --model embedded:qwen2.5-coder-0.5b --prompts tuned

Results of 2026-12-07 (AMD EPYC, one thread): results/learning_check/policy_probe.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeper.diagnostic import predicted_rating, rated_lines, stated_tastes, title_genres
from deeper.llm import load_llm
from deeper.llm.base import Sampling
from deeper.prompts import PROMPT_SETS, load_prompts
from deeper.tables import read_contexts


def window_mae(persona: str, window: list[tuple[str, float]]) -> float:
    tastes = stated_tastes(persona)
    return float(np.mean([abs(predicted_rating(tastes, title_genres(t)) - a) for t, a in window]))


def states_a_taste(text: str) -> bool:
    tastes = stated_tastes(text)
    return bool(tastes.loved or tastes.disliked)


@click.command(help=__doc__)
@click.option("--run-dir", type=click.Path(file_okay=False, exists=True), required=True)
@click.option("--model", required=True, help="A transformers model: a folder or embedded:<name>.")
@click.option("--prompts", "prompt_set", type=click.Choice(sorted(PROMPT_SETS)), default="diagnostic")
@click.option("--contexts", "k", default=8, show_default=True, help="How many contexts.")
@click.option("--n", default=4, show_default=True, help="Candidates per context.")
@click.option("--max-new-tokens", default=64, show_default=True)
def main(run_dir: str, model: str, prompt_set: str, k: int, n: int, max_new_tokens: int) -> None:
    contexts = read_contexts(Path(run_dir) / "data" / "contexts" / "it1.parquet")
    contexts = contexts.iloc[:: max(len(contexts) // k, 1)].head(k)
    prompts = load_prompts(PROMPT_SETS[prompt_set])
    chats, windows = [], []
    for row in contexts.itertuples():
        # the context's window (titles, actual ratings) as its prompt shows it, rendered with the set's refine prompt
        window = rated_lines(json.loads(row.prompt)[-1]["content"])
        comparisons = [(t, p, a) for (t, a), p in zip(window, row.predicted, strict=True)]
        chats.append(
            prompts.render(
                "refine", item_type=row.item_type, old_persona=row.persona_old, comparisons=comparisons
            )
        )
        windows.append(window)
    spec = {"backend": "transformers", "name": model, "batch_size": 16, "device": "cpu", "dtype": "float32"}
    llm = load_llm(spec, where="--model")
    sampling = Sampling(
        temperature=1.0, top_p=0.4, repetition_penalty=1.1, max_new_tokens=max_new_tokens, seed=0
    )
    start = time.perf_counter()
    answers = llm.generate(chats, n, sampling)
    seconds = time.perf_counter() - start
    stating, spread, gain_none, gain_old = 0, 0, [], []
    for old, texts, window in zip(contexts["persona_old"], answers, windows):
        errors = [window_mae(t, window) for t in texts]
        stating += sum(states_a_taste(t) for t in texts)
        spread += max(errors) - min(errors) > 1e-9
        gain_none += [window_mae("", window) - e for e in errors]
        gain_old += [window_mae(old, window) - e for e in errors]
    click.echo(
        f"| {model} | {prompt_set} | {stating}/{n * len(chats)} | {spread}/{len(chats)} | "
        f"{np.mean(gain_none):+.3f} | {np.mean(gain_old):+.3f} | {seconds:.0f} |"
    )


if __name__ == "__main__":
    main()
