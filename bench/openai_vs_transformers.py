"""Benchmark: rating prompts through the openai backend + a local llama.cpp server vs the transformers backend.

The same prompts through both: W windows of N MovieLens titles each, the logprob-mode prediction template
(deeper/prompts/predict_item.txt) with a ~300-token persona per window (each window its own user, so no
persona is shared across windows), the "Rating: " prefill. The openai backend talks to llama-cpp-python's
server (scripts/llamacpp_server.py) serving the embedded SmolLM2 GGUF; the transformers backend runs the
same model dequantised to fp32 in this process, with its persona prefix reuse. Each path rates one window
first as a warm-up, then all windows once, timed. The script also reports how far the two backends' rating
probabilities are apart, and writes everything with the machine and versions to a JSON file.

    python bench/openai_vs_transformers.py                   # embedded smollm2-135m, 10 x 10, server threads 1 and 2
    python bench/openai_vs_transformers.py --windows 3 --n-threads 2

Needs llama-cpp-python (scripts/install_llamacpp.sh) in this interpreter or in $LLAMACPP_PYTHON.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.prefix_reuse import PERSONA, cpu_model  # one persona for the benches

MODEL = "smollm2-135m"


def load_launcher():
    spec = importlib.util.spec_from_file_location("llamacpp_server", REPO / "scripts" / "llamacpp_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def movie_titles(count: int) -> list[str]:
    """The first `count` MovieLens 100k titles (by movie id) from the embedded dataset."""
    import pyarrow.parquet as pq

    from deeper.assets import ensure_embedded_dataset

    items = (
        pq.read_table(
            ensure_embedded_dataset("movielens100k") / "MovieLens100k_items.parquet.brotli",
            columns=["movie_id", "movie_title"],
        )
        .to_pandas()
        .sort_values("movie_id")
    )
    titles = items["movie_title"].tolist()
    if len(titles) < count:
        raise SystemExit(f"error: the dataset has {len(titles)} titles, fewer than {count}")
    return titles[:count]


def rating_groups(windows: int, items: int):
    from deeper.llm.base import RatingGroup
    from deeper.prompts.render import load_prompts

    prompts = load_prompts()
    prefill = prompts.prefill("predict_item")
    titles = movie_titles(windows * items)
    return [
        RatingGroup(
            [
                prompts.render(
                    "predict_item", persona=f"(User {w + 1}.) {PERSONA}", item_type="movie", item=t
                )
                for t in titles[w * items : (w + 1) * items]
            ],
            prefill,
        )
        for w in range(windows)
    ]


def timed_rating(llm, groups) -> tuple[float, list]:
    llm.rating_probs(groups[:1])  # warm-up: weights paged in, server and kernels started
    start = time.perf_counter()
    results = llm.rating_probs(groups)
    return time.perf_counter() - start, results


def server_versions(python: str) -> dict:
    code = "import llama_cpp, fastapi, uvicorn; print(llama_cpp.__version__, fastapi.__version__, uvicorn.__version__)"
    out = subprocess.run([python, "-c", code], check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(
            f"error: llama-cpp-python is not installed for {python}: run scripts/install_llamacpp.sh "
            "or set LLAMACPP_PYTHON"
        )
    llama_cpp, fastapi, uvicorn = out.stdout.split()
    return {"llama_cpp_python": llama_cpp, "fastapi": fastapi, "uvicorn": uvicorn}


def cpu_features(log_path: Path) -> str:
    """The CPU features line llama.cpp logs at start (which SIMD paths the build uses)."""
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("CPU :"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@click.command()
@click.option("--gguf", default=None, help="GGUF to serve (default: the embedded smollm2-135m).")
@click.option(
    "--hf-model", default=None, help="The same model as an HF folder (default: the embedded smollm2-135m)."
)
@click.option("--windows", default=10, show_default=True, help="Rating windows (one persona each).")
@click.option("--items", default=10, show_default=True, help="Items per window.")
@click.option(
    "--n-threads",
    "n_threads",
    multiple=True,
    type=int,
    default=(1, 2),
    show_default=True,
    help="llama.cpp server threads; repeat to time several (one server each).",
)
@click.option(
    "--concurrency",
    default=1,
    show_default=True,
    help="openai backend requests in flight (llama-cpp-python answers one at a time).",
)
@click.option("--batch-size", default=16, show_default=True, help="transformers backend batch size.")
@click.option(
    "--out",
    default="bench/results/openai_vs_transformers.json",
    show_default=True,
    type=click.Path(dir_okay=False),
)
def main(gguf, hf_model, windows, items, n_threads, concurrency, batch_size, out):
    """Rating throughput (prompts/s) of openai backend + llama.cpp server vs the transformers backend."""
    import numpy as np
    import openai
    import torch
    import transformers

    from deeper import assets
    from deeper.llm import load_llm
    from deeper.metrics import write_json

    python = os.environ.get("LLAMACPP_PYTHON") or sys.executable
    versions = server_versions(python)
    gguf = Path(gguf) if gguf else assets.ensure_gguf(MODEL)
    hf_model = Path(hf_model) if hf_model else assets.ensure_embedded_model(MODEL)
    groups = rating_groups(windows, items)
    prompts = windows * items
    load_before = os.getloadavg()[0]

    local = load_llm({"backend": "transformers", "name": str(hf_model), "batch_size": batch_size})
    local.show_progress = False
    prompt_tokens = [len(ids) for g in groups for ids in local.rating_prompt_ids(g)]
    persona_tokens = len(local.encode([PERSONA])[0])
    local_seconds, local_results = timed_rating(local, groups)
    click.echo(f"transformers: {prompts / local_seconds:.2f} prompts/s", err=True)

    launcher = load_launcher()
    served, features, served_results = [], "unknown", None
    for threads in n_threads:
        log = Path(out).with_suffix(f".server{threads}.log")
        try:
            with launcher.LlamaCppServer(gguf, python=python, n_threads=threads, log_path=log) as server:
                remote = load_llm(
                    {
                        "backend": "openai",
                        "name": MODEL,
                        "base_url": server.base_url,
                        "concurrency": concurrency,
                        "timeout": 300,
                    }
                )
                remote.show_progress = False
                seconds, served_results = timed_rating(remote, groups)
            features = cpu_features(log)
        finally:
            log.unlink(missing_ok=True)
        served.append(
            {
                "n_threads": threads,
                "seconds": seconds,
                "prompts_per_s": prompts / seconds,
                "failures": remote.counters.failures,
            }
        )
        click.echo(f"openai + llama.cpp ({threads} threads): {prompts / seconds:.2f} prompts/s", err=True)

    local_probs = np.vstack([r.probs for r in local_results])
    served_probs = np.vstack([r.probs for r in served_results])
    diff = np.abs(served_probs - local_probs)
    best = max(served, key=lambda s: s["prompts_per_s"])
    local_pps = prompts / local_seconds
    summary = {
        "model": MODEL,
        "gguf": gguf.name,
        "windows": windows,
        "items_per_window": items,
        "prompts": prompts,
        "persona_tokens": persona_tokens,
        "prompt_tokens_mean": float(np.mean(prompt_tokens)),
        "transformers": {
            "seconds": local_seconds,
            "prompts_per_s": local_pps,
            "batch_size": batch_size,
            "torch_threads": torch.get_num_threads(),
            "prefix_reuse": True,
        },
        "openai_llamacpp": {"concurrency": concurrency, "runs": served},
        "ratio_transformers_over_llamacpp": local_pps / best["prompts_per_s"],
        "agreement": {
            "max_abs_diff_probs": float(diff.max()),
            "mean_abs_diff_probs": float(diff.mean()),
            "argmax_agreement": float((served_probs.argmax(1) == local_probs.argmax(1)).mean()),
            "max_abs_diff_expected_rating": float(
                np.abs((served_probs - local_probs) @ np.arange(1, 6)).max()
            ),
            "digit_mass_mean_transformers": float(
                np.concatenate([r.digit_mass for r in local_results]).mean()
            ),
            "digit_mass_mean_llamacpp": float(np.concatenate([r.digit_mass for r in served_results]).mean()),
        },
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "llamacpp_cpu_features": features,
            "load_average_1m_before": load_before,
            "load_average_1m_after": os.getloadavg()[0],
            "python": platform.python_version(),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "openai": openai.__version__,
            **versions,
        },
    }
    write_json(out, summary, digits=4)
    click.echo(
        f"transformers {local_pps:.2f} prompts/s vs openai + llama.cpp {best['prompts_per_s']:.2f} prompts/s "
        f"({best['n_threads']} threads): {summary['ratio_transformers_over_llamacpp']:.2f}x; "
        f"max |dP| {diff.max():.3f}; wrote {out}"
    )


if __name__ == "__main__":
    main()
