"""The openai backend against a real llama.cpp server (llama-cpp-python) serving the embedded SmolLM2 GGUF.

The server is started by scripts/llamacpp_server.py (which makes it continue a prefilled assistant turn) on a
free 127.0.0.1 port, once for this module. Skipped when llama-cpp-python is not installed: it has no wheel on
PyPI and takes minutes to compile, so it is an opt-in build (scripts/install_llamacpp.sh). LLAMACPP_PYTHON may
name another interpreter that has it (e.g. a separate venv).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deeper.llm import load_llm
from deeper.llm.base import RATINGS, RatingGroup, Sampling
from deeper.prompts.render import load_prompts

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
PERSONAS = [
    (
        "A retired teacher who loves family animation, musicals and gentle comedies, and finds violent action "
        "films, horror and crude humour a waste of an evening."
    ),
    (
        "A student who watches science fiction and thrillers every weekend, rewards clever plots and twists, and "
        "is bored by slow romances and period dramas."
    ),
]
TITLES = [
    "Toy Story (1995)",
    "GoldenEye (1995)",
    "Sense and Sensibility (1995)",
    "Alien (1979)",
    "Scream (1996)",
]


def load_launcher():
    """scripts/llamacpp_server.py as a module (scripts/ is not a package: it is also run as a script)."""
    spec = importlib.util.spec_from_file_location("llamacpp_server", REPO / "scripts" / "llamacpp_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def server_python() -> str:
    """The interpreter that runs the server; skips the module when it has no llama-cpp-python."""
    python = os.environ.get("LLAMACPP_PYTHON") or sys.executable
    check = subprocess.run(
        [python, "-c", "import llama_cpp.server"], check=False, capture_output=True, text=True
    )
    if check.returncode != 0:
        pytest.skip(
            f"llama-cpp-python not installed for {python}: run scripts/install_llamacpp.sh "
            "(or set LLAMACPP_PYTHON to a python that has it)"
        )
    return python


def rating_groups() -> list[RatingGroup]:
    """The real logprob-mode prediction prompts (deeper/prompts/predict_item.txt), one group per persona."""
    prompts = load_prompts()
    prefill = prompts.prefill("predict_item")
    return [
        RatingGroup(
            [prompts.render("predict_item", persona=p, item_type="movie", item=t) for t in TITLES], prefill
        )
        for p in PERSONAS
    ]


@pytest.fixture(scope="module")
def embedded():
    from deeper import assets

    return assets.ensure_gguf(MODEL), assets.ensure_embedded_model(MODEL)


@pytest.fixture(scope="module")
def server(embedded, tmp_path_factory):
    python = server_python()
    launcher = load_launcher()
    log = tmp_path_factory.mktemp("llamacpp") / "server.log"
    # One thread: with two, a decode step waits for both cores, and on a busy machine (pytest, other jobs) that
    # made generation 6x slower (161 vs 25 ms per token); prompt scoring was the same speed either way.
    with launcher.LlamaCppServer(embedded[0], python=python, n_threads=1, log_path=log) as running:
        yield running  # terminated (and waited for) on exit


@pytest.fixture(scope="module")
def llm(server):
    backend = load_llm(
        {
            "backend": "openai",
            "name": MODEL,
            "base_url": server.base_url,
            "prefill": "assistant",
            "concurrency": 2,
            "timeout": 120,
        }
    )
    backend.show_progress = False
    return backend


@pytest.fixture(scope="module")
def transformers_llm(embedded):
    backend = load_llm({"backend": "transformers", "name": str(embedded[1]), "batch_size": 16})
    backend.show_progress = False
    return backend


@pytest.fixture(scope="module")
def served_ratings(llm):
    return llm.rating_probs(rating_groups())


def test_server_continues_the_prefilled_assistant_turn(server, transformers_llm):
    """The server's prompt is token for token the transformers backend's prefilled prompt, digits come next."""
    import openai

    group = rating_groups()[0]
    client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY")
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[*group.chats[0], {"role": "assistant", "content": group.prefill}],
        max_tokens=1,
        temperature=0,
        logprobs=True,
        top_logprobs=20,
    )
    # llama-cpp-python's own template handling would close the prefill and open a new turn: 6 tokens more.
    assert reply.usage.prompt_tokens == len(transformers_llm.rating_prompt_ids(group)[0])
    assert reply.choices[0].message.content.strip() in RATINGS


def test_rating_probs_are_distributions_with_digit_mass(llm, served_ratings):
    assert [r.probs.shape for r in served_ratings] == [(len(TITLES), 5)] * len(PERSONAS)
    for result in served_ratings:
        np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-9)
        assert np.all(result.probs > 0)  # every digit was in the top 20
        # With the prefill continued the model answers with a digit (measured 0.82-0.86; a new turn: ~0.16).
        assert np.all((result.digit_mass > 0.6) & (result.digit_mass <= 1.0))
        assert not np.any(result.failed)
    assert llm.counters.failures == 0 and llm.counters.calls >= len(TITLES) * len(PERSONAS)


def test_rating_probs_agree_with_the_transformers_backend(served_ratings, transformers_llm):
    """Same weights, same prompt tokens: only llama.cpp's arithmetic differs.

    The HF folder is the GGUF dequantised to fp32, so both run the same Q4_1 numbers; llama.cpp additionally
    rounds activations to 8 bits (Q8_1) for the quantised matmuls and keeps the KV cache in fp16. Measured on
    these 10 prompts: max |dP| 0.019-0.032 (mean 0.005-0.007), max |d digit mass| 0.011, expected ratings within
    0.1. The bounds below are about twice that; a wrong prompt (e.g. a new assistant turn) or wrong token
    mapping moves the probabilities by 0.1-0.5 and the digit mass by ~0.7.
    """
    reference = transformers_llm.rating_probs(rating_groups())
    served = np.vstack([r.probs for r in served_ratings])
    local = np.vstack([r.probs for r in reference])
    diff = np.abs(served - local)
    assert diff.max() < 0.07 and diff.mean() < 0.015
    mass_diff = np.abs(
        np.concatenate([r.digit_mass for r in served_ratings])
        - np.concatenate([r.digit_mass for r in reference])
    )
    assert mass_diff.max() < 0.03
    scale = np.arange(1, 6)
    assert np.abs(served @ scale - local @ scale).max() < 0.2
    # The most likely rating agrees wherever transformers' top two are not within the noise above.
    top2 = np.sort(local, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.07
    assert clear.sum() >= len(local) // 2
    np.testing.assert_array_equal(served[clear].argmax(axis=1), local[clear].argmax(axis=1))


def test_generate_returns_n_texts_and_a_seed_repeats_its_samples(server):
    """Seeded samples repeat when the server sees the same sequence of requests.

    llama-cpp-python keeps the previous request's tokens in its KV cache and evaluates only what is new; a prompt
    evaluated partly from the cache gets slightly different logits than one evaluated whole, so a seeded sample
    can change with what the server ran before (measured: the same request gave 2 different texts over 6
    histories). With concurrency 1 the backend sends its requests in a fixed order, so a repeated call repeats
    its samples; across runs the response cache (CachedLLM) is what keeps samples fixed.
    """
    llm = load_llm(
        {"backend": "openai", "name": MODEL, "base_url": server.base_url, "concurrency": 1, "timeout": 120}
    )
    llm.show_progress = False
    chats = [
        [{"role": "user", "content": "Describe your favourite film in one sentence."}],
        [
            {"role": "system", "content": PERSONAS[0]},
            {"role": "user", "content": "Which film would you recommend?"},
        ],
    ]
    sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=11)
    first = llm.generate(chats, 2, sampling)
    again = llm.generate(chats, 2, sampling)
    other_seed = llm.generate(chats, 2, Sampling(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=500))
    assert [len(samples) for samples in first] == [2, 2]
    assert all(isinstance(t, str) and t.strip() for samples in first for t in samples)
    assert again == first
    assert any(samples[0] != samples[1] for samples in first)  # seeds 11 and 12 draw different texts
    assert other_seed != first
    assert llm.counters.calls == 12
